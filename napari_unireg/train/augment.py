"""Random augmentation of training volumes (torch, CPU, run inside the DataLoader workers).

Every function takes a ``numpy.random.Generator`` so the result is a pure function of the pair index
(see :mod:`.data`). Spatial sizes given in *full-resolution voxels* are divided by ``factor`` (2 when training
at half resolution). Displacements follow the engine's convention (``spatial.py``): ``B×3×S``, voxel units,
pull (``warped(p) = image(p + u(p))``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "torch_generator",
    "gaussian_blur",
    "smooth_random_field",
    "random_affine_disp",
    "random_bias_field",
    "random_spatial_disp",
    "intensity_augment",
    "augment_pair",
]


def torch_generator(rng: np.random.Generator):
    """A CPU ``torch.Generator`` seeded from ``rng`` (fast full-size noise, still reproducible)."""
    import torch

    g = torch.Generator()
    g.manual_seed(int(rng.integers(2**62)))
    return g


def gaussian_blur(x, sigma: float | Sequence[float]):
    """Separable Gaussian blur of ``B×C×S`` (``sigma`` in voxels, 0 = none), replicate padding."""
    import torch
    import torch.nn.functional as F

    sig = [float(sigma)] * 3 if np.isscalar(sigma) else [float(s) for s in sigma]
    b, c = x.shape[:2]
    y = x.reshape(b * c, 1, *x.shape[2:])
    for axis, s in enumerate(sig):
        if s <= 0:
            continue
        r = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y.reshape(x.shape)


def _coarse_size(shape: Sequence[int], spacing: float) -> list[int]:
    return [max(2, int(math.ceil((n - 1) / max(spacing, 1.0))) + 1) for n in shape]


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(n: int, c: int, sigma: float) -> np.ndarray:
    """``n×c`` matrix of one axis of :func:`smooth_random_field`: linear interpolation of ``c`` control values onto
    ``n`` voxels (``align_corners=True``) followed by :func:`gaussian_blur`'s 1-D kernel with replicate padding.

    Both steps are linear and separable, so the field is this matrix applied along each axis of the control
    grid: the same values as upsampling the whole volume and blurring it (up to float rounding), at a small
    fraction of the cost (the blur of a full-size field was ~70 % of a training pair's data time)."""
    pos = np.arange(n, dtype=np.float64) * ((c - 1) / (n - 1) if n > 1 else 0.0)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, c - 1)
    i1 = np.minimum(i0 + 1, c - 1)
    w = pos - i0
    up = np.zeros((n, c))
    np.add.at(up, (np.arange(n), i0), 1.0 - w)
    np.add.at(up, (np.arange(n), i1), w)
    if sigma <= 0:
        return up
    r = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    blur = np.zeros((n, n))
    for j, kj in enumerate(k):
        np.add.at(blur, (np.arange(n), np.clip(np.arange(n) + j - r, 0, n - 1)), kj)
    return blur @ up


def smooth_random_field(
    shape: Sequence[int], rng: np.random.Generator, amplitude: float, spacing: float, channels: int = 3
):
    """``1×C×S`` smooth random field: uniform control values in [-amplitude, amplitude] every ``spacing`` voxels,
    trilinearly interpolated (``align_corners=True``) and lightly smoothed (Gaussian, σ = spacing/4 from a spacing
    of 4 voxels), applied axis by axis with :func:`_smoothing_matrix`."""
    import torch

    coarse = rng.uniform(-1.0, 1.0, size=(1, channels, *_coarse_size(shape, spacing))).astype(np.float32)
    sigma = spacing / 4.0 if spacing >= 4 else 0.0
    field = torch.from_numpy(coarse) * float(amplitude)
    for axis, n in enumerate(shape):
        m = torch.from_numpy(_smoothing_matrix(int(n), int(coarse.shape[2 + axis]), float(sigma)).astype(np.float32))
        field = torch.movedim(torch.tensordot(field, m, dims=([2 + axis], [1])), -1, 2 + axis)
    return field.contiguous()


def random_affine_disp(
    shape: Sequence[int], rng: np.random.Generator, rotate_deg: float, scale: float, shear: float, translate: float
):
    """``1×3×S`` displacement of a random affine map about the grid centre: ``u(p) = (A − I)(p − c) + t``."""
    import torch

    ang = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, size=3))
    rot = np.eye(3)
    for axis, a in enumerate(ang):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        rot = rot @ r
    sc = np.diag(np.exp(rng.uniform(-scale, scale, size=3)))
    sh = np.eye(3)
    off = rng.uniform(-shear, shear, size=6)
    sh[0, 1], sh[0, 2], sh[1, 0], sh[1, 2], sh[2, 0], sh[2, 1] = off
    a = rot @ sc @ sh
    t = rng.uniform(-translate, translate, size=3)
    c = (np.asarray(shape, dtype=np.float64) - 1) / 2
    m = torch.tensor(a - np.eye(3), dtype=torch.float32)
    axes = [torch.arange(n, dtype=torch.float32) - float(ci) for n, ci in zip(shape, c, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    u = torch.einsum("ij,j...->i...", m, grid) + torch.tensor(t, dtype=torch.float32).view(3, 1, 1, 1)
    return u.unsqueeze(0)


def random_bias_field(shape: Sequence[int], rng: np.random.Generator, magnitude: float, spacing: float):
    """``1×1×S`` multiplicative bias field ``exp(smooth N(0, magnitude))``."""
    import torch
    import torch.nn.functional as F

    coarse = rng.normal(0.0, magnitude, size=(1, 1, *_coarse_size(shape, spacing))).astype(np.float32)
    return torch.exp(F.interpolate(torch.from_numpy(coarse), size=tuple(shape), mode="trilinear", align_corners=True))


def random_spatial_disp(shape: Sequence[int], rng: np.random.Generator, cfg: Any, factor: int = 1):
    """Affine (probability ``affine_prob``) plus smooth deformation (``deform_prob``), or None if neither fired.

    ``cfg`` needs ``affine_prob, rotate_deg, scale, shear?, translate_vox?, deform_prob?, deform_vox,
    deform_spacing``; missing optional fields count as 0 / always.
    """
    u = None
    if rng.random() < getattr(cfg, "affine_prob", 0.0):
        u = random_affine_disp(
            shape,
            rng,
            cfg.rotate_deg,
            cfg.scale,
            getattr(cfg, "shear", 0.0),
            getattr(cfg, "translate_vox", 0.0) / factor,
        )
    if cfg.deform_vox > 0 and rng.random() < getattr(cfg, "deform_prob", 1.0):
        d = smooth_random_field(shape, rng, cfg.deform_vox / factor, cfg.deform_spacing / factor)
        u = d if u is None else u + d
    return u


def intensity_augment(img, rng: np.random.Generator, cfg: Any, mask=None):
    """Bias field, gamma and Gaussian noise on a ``1×1×S`` image in [0, 1] (each with its probability)."""
    import torch

    shape = tuple(img.shape[2:])
    keep = mask if mask is not None else torch.ones_like(img, dtype=torch.bool)
    if rng.random() < cfg.bias_prob and cfg.bias_magnitude > 0:
        img = img * random_bias_field(shape, rng, cfg.bias_magnitude, cfg.bias_spacing)
        hi = float(img.max())
        if hi > 1.0:
            img = img / hi
    if rng.random() < cfg.gamma_prob and cfg.gamma_log_std > 0:
        img = img.clamp(min=0.0) ** float(np.exp(rng.normal(0.0, cfg.gamma_log_std)))
    if rng.random() < cfg.noise_prob and cfg.noise_std > 0:
        std = float(rng.uniform(0.0, cfg.noise_std))
        img = (img + std * torch.randn(img.shape, generator=torch_generator(rng)) * keep).clamp(0.0, 1.0)
    return img * keep if mask is not None else img


def augment_pair(pair: dict[str, Any], rng: np.random.Generator, cfg: Any, factor: int = 1) -> dict[str, Any]:
    """Augment ``moving`` and ``fixed`` (numpy ``S`` arrays) independently; labels follow their image."""
    import torch

    from ..core.sample import warp, warp_labels

    out = dict(pair)
    for side in ("moving", "fixed"):
        img = torch.as_tensor(np.array(pair[side], dtype=np.float32))[None, None]
        shape = tuple(img.shape[2:])
        u = random_spatial_disp(shape, rng, cfg, factor)
        lab = pair.get(f"{side}_label")
        if u is not None:
            img = warp(img, u)
            if lab is not None:
                lab = warp_labels(torch.as_tensor(np.asarray(lab).astype(np.int64))[None, None], u)[0, 0].numpy()
        mask = img > 0 if cfg.keep_background else None
        img = intensity_augment(img, rng, cfg, mask)
        out[side] = img[0, 0].numpy()
        out[f"{side}_label"] = lab
    return out
