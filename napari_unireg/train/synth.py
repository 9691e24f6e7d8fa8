"""SynthMorph-style training pairs painted from label maps (Hoffmann et al., 2022; written from the idea).

Each image of a pair starts from a label map (the same map for both, or two different maps), gets its own
random affine + smooth deformation (nearest-neighbour on the labels), and is painted with one random intensity
per label (uniform in [0, 1], or T1-like means for FreeSurfer codes), within-label noise, a Gaussian blur, a
bias field, gamma and noise. Background and extra-cerebral codes are painted 0 so the images look like the
skull-stripped inputs the networks see at test time. The label maps come back remapped to a shared contiguous
index (0 = background) so an optional Dice loss can use them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .augment import gaussian_blur, random_bias_field, random_spatial_disp, torch_generator

__all__ = ["T1_MEANS", "background_codes", "paint", "synthesize_pair"]

#: Rough T1w intensities (white matter = 1) of FreeSurfer aseg codes, jittered when painting.
T1_MEANS: dict[int, float] = {
    2: 1.0,
    41: 1.0,
    77: 0.85,
    251: 1.0,
    252: 1.0,
    253: 1.0,
    254: 1.0,
    255: 1.0,  # cerebral WM
    7: 0.95,
    46: 0.95,  # cerebellum WM
    3: 0.6,
    42: 0.6,
    8: 0.65,
    47: 0.65,  # cortex, cerebellum cortex
    4: 0.15,
    43: 0.15,
    5: 0.2,
    44: 0.2,
    14: 0.15,
    15: 0.15,
    72: 0.15,
    24: 0.12,  # ventricles, CSF
    9: 0.85,
    48: 0.85,
    10: 0.85,
    49: 0.85,  # thalamus
    11: 0.7,
    50: 0.7,
    12: 0.75,
    51: 0.75,
    13: 0.9,
    52: 0.9,  # caudate, putamen, pallidum
    16: 0.9,
    28: 0.85,
    60: 0.85,
    85: 0.8,  # brainstem, ventral DC, optic chiasm
    17: 0.62,
    53: 0.62,
    18: 0.65,
    54: 0.65,
    26: 0.7,
    58: 0.7,  # hippocampus, amygdala, accumbens
    30: 0.5,
    62: 0.5,
    31: 0.45,
    63: 0.45,  # vessel, choroid plexus
}


def background_codes(codes: np.ndarray, brain_only: bool) -> np.ndarray:
    """Mask of the codes painted 0: label 0, plus extra-cerebral codes (>= 100) when ``brain_only``."""
    codes = np.asarray(codes)
    bg = codes == 0
    if brain_only:
        bg |= codes >= 100
    return bg


def paint(index, codes: np.ndarray, rng: np.random.Generator, cfg: Any, contrast: str):
    """Paint a ``1×1×S`` map of contiguous indices into ``codes`` (0 → background); returns ``1×1×S`` float.

    ``contrast``: 'random' (uniform means) or 't1' (:data:`T1_MEANS` with jitter, unknown codes uniform).
    """
    import torch

    k = len(codes)
    if contrast == "t1":
        scale = rng.uniform(0.8, 1.2)
        means = np.array([T1_MEANS.get(int(c), rng.uniform(0.2, 1.0)) for c in codes]) * scale
        means = means + rng.normal(0.0, 0.04, size=k)
    else:
        means = rng.uniform(0.0, 1.0, size=k)
    stds = rng.uniform(0.0, cfg.std_max, size=k)
    bg = background_codes(codes, cfg.brain_only)
    means[bg] = 0.0
    stds[bg] = 0.0
    means_t = torch.tensor(means, dtype=torch.float32)
    stds_t = torch.tensor(stds, dtype=torch.float32)
    idx = index.long()
    img = means_t[idx] + stds_t[idx] * torch.randn(idx.shape, generator=torch_generator(rng))
    mask = ~torch.as_tensor(bg)[idx]
    sigma = rng.uniform(0.0, cfg.blur_max)
    if sigma > 0.05:
        img = gaussian_blur(img, sigma)
    if cfg.bias_magnitude > 0:
        img = img * random_bias_field(tuple(img.shape[2:]), rng, cfg.bias_magnitude, cfg.bias_spacing)
    img = img.clamp(min=0.0) * mask
    fg = img[mask]
    top = float(torch.quantile(fg[:: max(1, fg.numel() // 100000)], 0.995)) if fg.numel() else 1.0
    img = (img / max(top, 1e-6)).clamp(0.0, 1.0)
    if cfg.gamma_log_std > 0:
        img = img ** float(np.exp(rng.normal(0.0, cfg.gamma_log_std)))
    if cfg.noise_std > 0:
        img = img + float(rng.uniform(0.0, cfg.noise_std)) * torch.randn(img.shape, generator=torch_generator(rng))
    return (img.clamp(0.0, 1.0) * mask).float()


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for label codes: a count and a lookup table instead of a sort
    when the codes are small non-negative integers (SynthSeg/FreeSurfer maps), the same arrays."""
    if values.size and values.min() >= 0 and values.max() < 2**16:
        present = np.flatnonzero(np.bincount(values))
        lut = np.zeros(int(present[-1]) + 1, dtype=np.intp)
        lut[present] = np.arange(present.size)
        return present.astype(values.dtype), lut[values]
    return np.unique(values, return_inverse=True)


def synthesize_pair(
    map_a: np.ndarray, map_b: np.ndarray, rng: np.random.Generator, cfg: Any, factor: int = 1, t1_codes: bool = True
) -> dict[str, Any]:
    """Moving painted from ``map_a`` and fixed from ``map_b`` (label maps at the training resolution).

    Returns numpy ``moving``, ``fixed`` (float32, [0, 1]) and ``moving_label``, ``fixed_label`` (int64,
    contiguous shared index, 0 = background/extra-cerebral). ``t1_codes``: the maps use FreeSurfer codes
    (allows ``contrast`` 't1'); otherwise the contrast is always random.
    """
    import torch

    from ..core.sample import warp_labels

    contrast = cfg.contrast
    if contrast == "mixed":
        contrast = "t1" if rng.random() < 0.5 else "random"
    if not t1_codes:
        contrast = "random"
    warped = []
    for m in (map_a, map_b):
        lab = torch.as_tensor(np.asarray(m).astype(np.int64))[None, None]
        u = random_spatial_disp(tuple(lab.shape[2:]), rng, cfg, factor)
        if u is not None:
            lab = warp_labels(lab, u)
        warped.append(lab)
    codes, inverse = _unique_inverse(np.concatenate([w.reshape(-1).numpy() for w in warped]))
    n = warped[0].numel()
    idx = [
        torch.from_numpy(inverse[:n].reshape(warped[0].shape)),
        torch.from_numpy(inverse[n:].reshape(warped[1].shape)),
    ]
    imgs = [paint(i, codes, rng, cfg, contrast) for i in idx]
    # shared contiguous label index for a Dice loss: background codes → 0, others 1..K
    bg = background_codes(codes, cfg.brain_only)
    remap = np.zeros(len(codes), dtype=np.int64)
    remap[~bg] = np.arange(1, int((~bg).sum()) + 1)
    labels = [remap[i.numpy()] for i in idx]
    return {
        "moving": imgs[0][0, 0].numpy(),
        "fixed": imgs[1][0, 0].numpy(),
        "moving_label": labels[0][0, 0],
        "fixed_label": labels[1][0, 0],
    }
