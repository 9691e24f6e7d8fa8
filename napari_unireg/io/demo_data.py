"""The embedded demo pair, built offline from what ``pip install`` brings.

Fixed: the MNI ICBM152 2009a symmetric 1 mm T1 template that the nilearn wheel ships, skull-stripped with its
brain mask, cut into the Learn2Reg/LUMIR box (160×224×192, 1 mm, RAS; the same box as the development data).
Fixed labels: six tissue labels from the template's grey/white-matter probability maps, split by hemisphere, with
the label numbers of the 35-label table (1/20 cerebral white matter, 2/21 cortex, 3/22 lateral ventricle, 13
brain stem).
Moving: the fixed brain pulled through a known smooth random deformation (a few mm, folding free) and a small
affine (so pre-alignment has work to do), with a bias field, a gamma change and noise: a different-looking
"subject" with exactly known correspondence. Moving labels are the fixed labels pulled through the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Voxel → world (mm, RAS) of the box; voxel (80, 129, 91) is the template origin.
BOX_AFFINE = np.array([[1.0, 0, 0, -80], [0, 1.0, 0, -129], [0, 0, 1.0, -91], [0, 0, 0, 1]])
BOX_SHAPE = (160, 224, 192)
DEMO_LABELS = {
    1: "Left-Cerebral-White-Matter",
    2: "Left-Cerebral-Cortex",
    3: "Left-Lateral-Ventricle",
    13: "Brain-Stem",
    20: "Right-Cerebral-White-Matter",
    21: "Right-Cerebral-Cortex",
    22: "Right-Lateral-Ventricle",
}


@dataclass
class DemoPair:
    """Arrays in the box (RAS voxel order) plus the ground-truth registration field.

    ``true_disp`` is what a perfect registration returns (voxel units, pull, fixed→moving):
    ``fixed(p) ≈ moving(p + true_disp(p))``. The moving image was made with the inverse map
    ``moving(p) = fixed(p + t(p))``, so ``true_disp`` is the numerical inverse of ``t``.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_seg: np.ndarray
    moving_seg: np.ndarray
    true_disp: np.ndarray
    affine: np.ndarray


def _to_box(img) -> np.ndarray:
    """Cut a nilearn 1 mm MNI152 volume into the box by integer offsets (no resampling)."""
    data = np.asarray(img.get_fdata(dtype=np.float32))
    offset = np.linalg.solve(img.affine, BOX_AFFINE)[:3, 3].round().astype(int)
    out = np.zeros(BOX_SHAPE, np.float32)
    src, dst = [], []
    for n_box, n_src, o in zip(BOX_SHAPE, data.shape, offset):
        lo, hi = max(0, -o), min(n_box, n_src - o)
        dst.append(slice(lo, hi))
        src.append(slice(lo + o, hi + o))
    out[tuple(dst)] = data[tuple(src)]
    return out


def template_brain() -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped MNI152 T1 in the box, intensities in [0, 1], and its tissue label map (uint8)."""
    from nilearn import datasets
    from scipy import ndimage

    t1 = _to_box(datasets.load_mni152_template(resolution=1))
    mask = _to_box(datasets.load_mni152_brain_mask(resolution=1)) > 0.5
    gm = _to_box(datasets.load_mni152_gm_template(resolution=1))
    wm = _to_box(datasets.load_mni152_wm_template(resolution=1))
    brain = np.where(mask, t1, 0.0)
    brain = np.clip(brain / np.percentile(brain[mask], 99.5), 0, 1).astype(np.float32)

    csf = np.clip(1.0 - gm - wm, 0, 1)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0)  # 0 csf, 1 gm, 2 wm
    x_mm = (np.arange(BOX_SHAPE[0]) + BOX_AFFINE[0, 3])[:, None, None]
    left = np.broadcast_to(x_mm < 0, BOX_SHAPE)
    labels = np.zeros(BOX_SHAPE, np.uint8)
    labels[mask & (tissue == 2)] = 1
    labels[mask & (tissue == 1)] = 2
    # Ventricles: the CSF of the central, deep part of the brain (the largest deep CSF components).
    deep = ndimage.binary_erosion(mask, iterations=12)
    vent = mask & (tissue == 0) & deep
    lab, n = ndimage.label(vent)
    if n:
        sizes = ndimage.sum(vent, lab, range(1, n + 1))
        keep = np.argsort(sizes)[::-1][:2] + 1
        labels[np.isin(lab, keep)] = 3
    labels[~left & (labels > 0)] += 19
    # Brain stem: brain voxels below the pons level near the midline.
    z_mm = (np.arange(BOX_SHAPE[2]) + BOX_AFFINE[2, 3])[None, None, :]
    y_mm = (np.arange(BOX_SHAPE[1]) + BOX_AFFINE[1, 3])[None, :, None]
    stem = mask & (z_mm < -25) & (np.abs(x_mm) < 14) & (y_mm > -45) & (y_mm < -10)
    labels[np.broadcast_to(stem, BOX_SHAPE)] = 13
    return brain, labels


def smooth_random_field(shape, max_mm: float, n_ctrl: int = 6, seed: int = 0) -> np.ndarray:
    """A folding-free smooth random displacement (3×shape, voxel units) with max magnitude ``max_mm``."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    ctrl = rng.normal(size=(3, n_ctrl, n_ctrl, n_ctrl))
    field = np.stack([ndimage.zoom(c, [s / n_ctrl for s in shape], order=3) for c in ctrl])
    field = field[:, : shape[0], : shape[1], : shape[2]]
    field *= max_mm / np.abs(field).max()
    return field.astype(np.float32)


def _affine_field(shape, degrees: float, scale: float, shift: tuple[float, float, float]) -> np.ndarray:
    """Displacement of a small rotation about axis 2 plus scaling and shift, about the volume centre."""
    c = (np.array(shape) - 1) / 2
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) * scale
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    rel = grid - c[:, None, None, None]
    mapped = np.einsum("ij,j...->i...", rot, rel) + c[:, None, None, None] + np.array(shift)[:, None, None, None]
    return (mapped - grid).astype(np.float32)


def make_demo_pair(seed: int = 0) -> DemoPair:
    """Build the demo pair (deterministic for a seed). Takes a few seconds."""
    from ..core.resample import sample_points

    fixed, fixed_seg = template_brain()
    rng = np.random.default_rng(seed)
    shape = fixed.shape
    deform = smooth_random_field(shape, max_mm=5.0, n_ctrl=5, seed=seed)
    affine = _affine_field(shape, degrees=4.0, scale=1.04, shift=(2.0, -3.0, 1.5))
    # Total pull map: fixed p -> p + affine(p) + deform(p + affine(p)): a smooth deformation then an affine.
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    after_affine = grid + affine
    deform_at = np.stack([sample_points(d, after_affine, order=1, outside="border") for d in deform])
    disp = affine + deform_at
    coords = grid + disp
    moving = sample_points(fixed, coords, order=1, outside="fill")
    moving_seg = sample_points(fixed_seg, coords, order=0, outside="fill").astype(np.uint8)
    # A different scanner look: bias field, gamma, noise (only inside the brain).
    bias = 1.0 + 0.15 * smooth_random_field(shape, 1.0, n_ctrl=3, seed=seed + 1)[0]
    brain = moving > 0
    moving = np.where(brain, (np.clip(moving, 0, 1) ** 0.85) * bias, 0.0)
    moving += np.where(brain, rng.normal(0, 0.015, shape), 0.0)
    moving = np.clip(moving / np.percentile(moving[brain], 99.5), 0, 1).astype(np.float32)
    return DemoPair(fixed, moving, fixed_seg, moving_seg, _inverse(disp), BOX_AFFINE.copy())


def _inverse(disp: np.ndarray) -> np.ndarray:
    """Inverse of a smooth displacement by the fixed-point solver of :mod:`napari_unireg.core.inversion`."""
    import torch

    from ..core.inversion import invert_displacement

    with torch.no_grad():
        inv = invert_displacement(torch.from_numpy(disp)[None], max_iter=100, tol=1e-3)
    return inv[0].numpy().astype(np.float32)


def write_demo_pair(out_dir, seed: int = 0) -> dict[str, str]:
    """Write the demo pair as NIfTI files into ``out_dir``; returns their paths by role."""
    from pathlib import Path

    import nibabel as nib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = make_demo_pair(seed)
    paths = {}
    for role, arr in (
        ("fixed", pair.fixed),
        ("moving", pair.moving),
        ("fixed_seg", pair.fixed_seg),
        ("moving_seg", pair.moving_seg),
    ):
        img = nib.Nifti1Image(arr, pair.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(pair.affine, code=1)
        img.set_sform(pair.affine, code=1)
        p = out / f"demo_{role}.nii.gz"
        nib.save(img, p)
        paths[role] = str(p)
    return paths
