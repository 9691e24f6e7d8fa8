"""Evaluation metrics of a registration (numpy + scipy; torch tensors are accepted and converted).

Conventions (``docs/DESIGN.md``, ``core/sample.py``): a displacement ``u`` is ``3×D0×D1×D2`` (a leading batch of 1
and Learn2Reg's channel-last ``D0×D1×D2×3`` are accepted) in voxel units, pull direction:
``warped(p) = moving(p + u(p))``. Label maps are integer ``D0×D1×D2`` arrays on the fixed grid.

The definitions follow the Learn2Reg/LUMIR evaluation (ARCHITECTURE.md §10) with the rules written in the
development data README:

* Dice per label; a label absent from both maps is skipped, a label present on one side only scores 0.
* HD95 per label (mm): surface = label minus its 6-connected erosion; directed distances read from Euclidean
  distance transforms of the other surface; HD95 = max of the two directed 95th percentiles; undefined
  (skipped) when the fixed or the warped label is empty.
* Central-difference Jacobian ``J = det(I + ∇u)`` (kernel ``[-0.5, 0, 0.5]``, zero padding), 2-voxel crop;
  ``SDlogJ = std(log(clip(J + 3, 1e-9, 1e9)))``.
* NDV (Liu et al., IJCV 2024): 10 finite-difference determinants of ``T = id + u``, 1-voxel crop,
  ``Σ ½·max(−J, 0)/6`` over the mask ÷ mask size × 100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from .blocks import in_row_blocks

__all__ = [
    "warp_labels_nearest",
    "dice_per_label",
    "dice_mean",
    "hd95_per_label",
    "hd95_mean",
    "jacobian_determinant",
    "jacobian_determinant_torch",
    "sdlogj",
    "folded_fraction",
    "folded_percent",
    "digital_jacobian_determinants",
    "ndv",
    "tre",
    "inverse_consistency_error",
    "evaluate_registration",
]

# Slab thickness (along axis 0) of the chunked Jacobian/NDV computations: bounds the float64 temporaries to a
# few tens of MB on a 160×224×192 grid.
_SLAB = 16
# Thickness of the NDV sub-slabs: ~0.5 MB float64 temporaries on a 160×224×192 grid (fit a core's L2 cache).
_SUBSLAB = 2


# ----------------------------------------------------------------------------------------------------------
# input normalisation
# ----------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_disp(disp: Any, dtype=np.float64) -> np.ndarray:
    """``3×D0×D1×D2`` float64 displacement from ``3×S``, ``1×3×S`` or channel-last ``S×3``.

    ``dtype=None`` keeps a float32 field as it is (callers that convert slab by slab, to save memory)."""
    u = _to_numpy(disp)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim == 4 and u.shape[0] != 3 and u.shape[-1] == 3:
        u = np.moveaxis(u, -1, 0)
    if u.ndim != 4 or u.shape[0] != 3:
        raise UserError(f"displacement must be 3×D0×D1×D2 (or D0×D1×D2×3), got shape {tuple(u.shape)}")
    if dtype is None and u.dtype in (np.float32, np.float64):
        return u
    return np.asarray(u, dtype=np.float64)


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Integer ``D0×D1×D2`` label map (float maps are rounded; singleton batch/channel axes are dropped)."""
    a = _to_numpy(labels)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise UserError(f"{name} must be a 3-D label map, got shape {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.integer):
        if a.dtype == bool:
            return a.astype(np.uint8)
        a = np.rint(a).astype(np.int64)
    return a


def _on_grid(x: Any, grid: tuple[int, ...], what: str) -> np.ndarray:
    """``x`` as a numpy volume without leading singleton axes; :class:`UserError` unless its shape is ``grid``."""
    a = _to_numpy(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.shape != tuple(grid):
        raise UserError(f"{what} {tuple(a.shape)} is not on the displacement grid {tuple(grid)}")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise UserError(f"{what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")


def _label_counts(a: np.ndarray) -> dict[int, int]:
    """Voxel count of every value present in an integer map."""
    if a.size and a.min() >= 0 and a.max() < 2**20:
        counts = np.bincount(a.ravel().astype(np.int64, copy=False))
        nz = np.flatnonzero(counts)
        return {int(v): int(counts[v]) for v in nz}
    vals, counts = np.unique(a, return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


def _default_labels(*maps: np.ndarray) -> list[int]:
    """Union of the non-zero values of the maps, sorted."""
    present: set[int] = set()
    for m in maps:
        present.update(v for v in _label_counts(m) if v != 0)
    return sorted(present)


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------------------------------
# label warping, Dice, HD95
# ----------------------------------------------------------------------------------------------------------
def warp_labels_nearest(labels: Any, disp: Any) -> np.ndarray:
    """Pull a label map through ``disp`` with nearest neighbour, zero outside (the evaluation convention).

    ``scipy.ndimage.map_coordinates(order=0, mode='constant', cval=0)`` at ``p + u(p)``; returns the labels'
    dtype on the displacement grid.
    """
    from .resample import pull_nearest

    lab = _as_labels(labels, "labels")
    u = _as_disp(disp)
    if lab.shape != u.shape[1:]:
        raise UserError(f"label map {tuple(lab.shape)} and displacement grid {tuple(u.shape[1:])} differ")
    return pull_nearest(lab, u)


def dice_per_label(
    fixed: Any, warped: Any, labels: Sequence[int] | None = None, moving: Any = None
) -> dict[int, float]:
    """Dice ``2|A∩B|/(|A|+|B|)`` per label.

    ``labels`` defaults to the non-zero values present in either map. A label absent from both the fixed map and
    the moving map (``moving`` if given, the warped map otherwise) is skipped; a label present on one side only
    scores 0.
    """
    f = _as_labels(fixed, "fixed labels")
    w = _as_labels(warped, "warped labels")
    _check_same_shape(f, w, "dice")
    m = _as_labels(moving, "moving labels") if moving is not None else None
    if labels is None:
        labels = _default_labels(f, w) if m is None else _default_labels(f, w, m)
    cf = _label_counts(f)
    cw = _label_counts(w)
    cm = _label_counts(m) if m is not None else cw
    inter = _label_counts(f[f == w])
    out: dict[int, float] = {}
    for lab in labels:
        lab = int(lab)
        nf, nw = cf.get(lab, 0), cw.get(lab, 0)
        if nf == 0 and cm.get(lab, 0) == 0 and nw == 0:
            continue
        out[lab] = 2.0 * inter.get(lab, 0) / (nf + nw) if nf + nw else 0.0
    return out


def dice_mean(fixed: Any, warped: Any, labels: Sequence[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` (NaN when no label is defined)."""
    return _mean(dice_per_label(fixed, warped, labels).values())


def _bounding_boxes(a: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box (tuple of slices) of each label in ``a``; ``None`` when absent."""
    from scipy.ndimage import find_objects

    boxes: dict[int, tuple[slice, ...] | None] = {}
    positive = [int(v) for v in labels if int(v) > 0]
    if positive and a.min() >= 0 and max(positive) < 2**20:
        objs = find_objects(a, max_label=max(positive))
        for v in positive:
            boxes[v] = objs[v - 1]
    for v in labels:
        v = int(v)
        if v in boxes:
            continue
        mask = a == v
        if not mask.any():
            boxes[v] = None
            continue
        sl = []
        for ax in range(a.ndim):
            proj = np.flatnonzero(mask.any(axis=tuple(i for i in range(a.ndim) if i != ax)))
            sl.append(slice(int(proj[0]), int(proj[-1]) + 1))
        boxes[v] = tuple(sl)
    return boxes


def _surface(mask: np.ndarray) -> np.ndarray:
    """Label voxels minus the 6-connected erosion (voxels on the array border count as surface).

    ``binary_erosion(mask, 6-cross, border_value=0)`` keeps a voxel when it and its 6 neighbours are set, so the
    surface is a set voxel with an unset (or outside) neighbour: written as shifted slices, which on the small
    per-label crops of HD95 is ~10× faster than scipy's iterator and releases the GIL (metrics run threaded).
    """
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1, 1:-1] = mask[1:-1, 1:-1, 1:-1]
    for ax in range(3):
        lo = [slice(1, -1)] * 3
        hi = [slice(1, -1)] * 3
        lo[ax], hi[ax] = slice(0, -2), slice(2, None)
        inner[1:-1, 1:-1, 1:-1] &= mask[tuple(lo)] & mask[tuple(hi)]
    return mask & ~inner


def _dilate6(mask: np.ndarray) -> np.ndarray:
    """``binary_dilation(mask, 6-cross)`` (outside = unset) as shifted slices."""
    out = mask.copy()
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        out[tuple(a)] |= mask[tuple(b)]
        out[tuple(b)] |= mask[tuple(a)]
    return out


def hd95_per_label(
    fixed: Any,
    warped: Any,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    margin: int = 2,
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label, in the units of ``spacing`` (mm).

    Labels empty in the fixed or the warped map are skipped (undefined). Each label is cropped to the union of
    its two bounding boxes plus ``margin`` voxels (exact: every surface voxel lies inside the crop). The
    distance from a surface voxel to the other surface is a nearest-neighbour query of the other surface's
    voxel centres in mm (a k-d tree): the same value a Euclidean distance transform reads, without transforming
    every voxel of the crop.
    """
    from scipy.spatial import cKDTree

    f = _as_labels(fixed, "fixed labels")
    w = _as_labels(warped, "warped labels")
    _check_same_shape(f, w, "hd95")
    spacing = tuple(float(s) for s in spacing)
    unit = spacing == (1.0, 1.0, 1.0)
    if len(spacing) != 3:
        raise UserError(f"spacing must have 3 values, got {spacing}")
    if labels is None:
        labels = _default_labels(f, w)
    labels = [int(v) for v in labels]
    bf = _bounding_boxes(f, labels)
    bw = _bounding_boxes(w, labels)
    margin = max(int(margin), 1)  # ≥ 1 so that the erosion inside the crop equals the erosion of the volume

    def one(lab: int) -> float | None:
        if bf[lab] is None or bw[lab] is None:
            return None
        crop = tuple(
            slice(max(min(a.start, b.start) - margin, 0), min(max(a.stop, b.stop) + margin, n))
            for a, b, n in zip(bf[lab], bw[lab], f.shape)
        )
        sa = _surface(f[crop] == lab)
        sb = _surface(w[crop] == lab)
        shared = sa & sb
        n_shared = int(np.count_nonzero(shared))
        pa = np.argwhere(sa) * spacing
        pb = np.argwhere(sb) * spacing
        # A voxel on both surfaces is at distance exactly 0 (what the query would return), so only the others
        # are queried; a percentile does not depend on the order of its values. Unbalanced, uncompacted trees
        # build 3x faster and query as fast on voxel grids.
        ra, rb = sa & ~shared, sb & ~shared
        known_a, known_b = [np.zeros(n_shared)], [np.zeros(n_shared)]
        if unit:
            # on a 1 mm grid a voxel off the other surface with a 6-neighbour on it is at distance exactly 1 (the
            # smallest non-zero distance between voxel centres; the query returns sqrt(1.0) = 1.0)
            na, nb = ra & _dilate6(sb), rb & _dilate6(sa)
            known_a.append(np.ones(int(np.count_nonzero(na))))
            known_b.append(np.ones(int(np.count_nonzero(nb))))
            ra, rb = ra & ~na, rb & ~nb
        d_ab, _ = cKDTree(pb, balanced_tree=False, compact_nodes=False).query(np.argwhere(ra) * spacing, k=1)
        d_ba, _ = cKDTree(pa, balanced_tree=False, compact_nodes=False).query(np.argwhere(rb) * spacing, k=1)
        return float(max(np.percentile(np.concatenate([*known_a, d_ab]), 95),
                         np.percentile(np.concatenate([*known_b, d_ba]), 95)))

    # labels are independent and their work is numpy and the k-d tree (both release the GIL): two threads
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        values = list(pool.map(one, labels))
    return {lab: v for lab, v in zip(labels, values) if v is not None}


def hd95_mean(
    fixed: Any, warped: Any, labels: Sequence[int] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> float:
    """Mean of :func:`hd95_per_label` over the defined labels (NaN when none)."""
    return _mean(hd95_per_label(fixed, warped, labels, spacing).values())


# ----------------------------------------------------------------------------------------------------------
# Jacobian determinant, SDlogJ, folding
# ----------------------------------------------------------------------------------------------------------
def _det3(m00, m01, m02, m10, m11, m12, m20, m21, m22):
    """Determinant of 3×3 matrices given entry-wise (arrays or tensors)."""
    return m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20)


def _central_jacobian_cropped(u: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """``det(I + ∇u)`` with central differences at the voxels ``[2:-2]^3`` (there the zero padding of the
    Learn2Reg convention is never read, so plain slicing is exact). Computed in thin slabs whose temporaries
    stay in the CPU cache (each voxel's value does not depend on the slab), the slabs shared among ``threads``
    threads (numpy releases the GIL). ``out``: where to write (e.g. a float32 view: the float64 values are
    rounded once, as by a later ``astype``)."""
    _, n0, n1, n2 = u.shape
    if out is None:
        out = np.empty((max(n0 - 4, 0), max(n1 - 4, 0), max(n2 - 4, 0)), dtype=np.float64)
    if out.size == 0:
        return out

    def rows(start: int, stop: int) -> None:
        for s in range(start, stop, _SUBSLAB):
            e = min(s + _SUBSLAB, stop)
            g = [[None] * 3 for _ in range(3)]  # g[c][a] = d u_c / d x_a (+1 on the diagonal)
            # float64 rows s-1..e of a float32 field: the same values as converting the whole field first
            ub = np.asarray(u[:, s - 1 : e + 1], dtype=np.float64)
            for c in range(3):
                uc = ub[c]  # row r of uc is row s - 1 + r of u
                g[c][0] = 0.5 * (uc[2:, 2 : n1 - 2, 2 : n2 - 2] - uc[:-2, 2 : n1 - 2, 2 : n2 - 2])
                g[c][1] = 0.5 * (uc[1:-1, 3 : n1 - 1, 2 : n2 - 2] - uc[1:-1, 1 : n1 - 3, 2 : n2 - 2])
                g[c][2] = 0.5 * (uc[1:-1, 2 : n1 - 2, 3 : n2 - 1] - uc[1:-1, 2 : n1 - 2, 1 : n2 - 3])
                g[c][c] = g[c][c] + 1.0
            out[s - 2 : e - 2] = _det3(*g[0], *g[1], *g[2])

    in_row_blocks(rows, 2, n0 - 2, threads)  # rows 2 .. n0-3 are computed
    return out


def jacobian_determinant(disp: Any, dtype=np.float64, threads: int = 1) -> np.ndarray:
    """Central-difference Jacobian determinant ``det(I + ∇u)`` (full size ``D0×D1×D2``).

    Kernel ``[-0.5, 0, 0.5]`` with zero padding (Learn2Reg); the 2-voxel border, where the padding biases the
    value, is set to 1 (neutral, for display). Statistics use the cropped interior. Computed in float64;
    ``dtype=np.float32`` stores the values rounded to float32 (= ``astype(np.float32)`` of the float64 result,
    without the float64 volume: a 0.5 mm grid's would be ~0.4 GB). ``threads``: slabs computed at once (for a
    caller with the cores to itself; the metrics stage computes it beside the label overlap, in one thread).
    """
    u = _as_disp(disp, dtype=None)  # converted slab by slab: no float64 copy of a large field
    jac = np.ones(u.shape[1:], dtype=dtype)
    if min(u.shape[1:]) >= 5:
        _central_jacobian_cropped(u, out=jac[2:-2, 2:-2, 2:-2], threads=threads)
    return jac


def jacobian_determinant_torch(disp):
    """Torch twin of :func:`jacobian_determinant` for ``B×3×S`` (differentiable, any device): ``B×S``."""
    import torch

    if disp.ndim != 5 or disp.shape[1] != 3:
        raise UserError(f"displacement must be B×3×D0×D1×D2, got shape {tuple(disp.shape)}")
    _, _, n0, n1, n2 = disp.shape
    jac = torch.ones((disp.shape[0], n0, n1, n2), dtype=disp.dtype, device=disp.device)
    if min(n0, n1, n2) < 5:
        return jac
    g = [[None] * 3 for _ in range(3)]
    for c in range(3):
        uc = disp[:, c]
        g[c][0] = 0.5 * (uc[:, 3 : n0 - 1, 2 : n1 - 2, 2 : n2 - 2] - uc[:, 1 : n0 - 3, 2 : n1 - 2, 2 : n2 - 2])
        g[c][1] = 0.5 * (uc[:, 2 : n0 - 2, 3 : n1 - 1, 2 : n2 - 2] - uc[:, 2 : n0 - 2, 1 : n1 - 3, 2 : n2 - 2])
        g[c][2] = 0.5 * (uc[:, 2 : n0 - 2, 2 : n1 - 2, 3 : n2 - 1] - uc[:, 2 : n0 - 2, 2 : n1 - 2, 1 : n2 - 3])
        g[c][c] = g[c][c] + 1.0
    inner = _det3(*g[0], *g[1], *g[2])
    # pad the interior back to full size with ones (out-of-place, so autograd flows through `inner`)
    return torch.nn.functional.pad(inner - 1.0, (2, 2, 2, 2, 2, 2)) + 1.0


def _cropped_jacobian_checked(disp: Any) -> np.ndarray:
    u = _as_disp(disp)
    if min(u.shape[1:]) < 5:
        raise UserError(f"grid {tuple(u.shape[1:])} too small for the 2-voxel-cropped Jacobian (need ≥ 5)")
    return _central_jacobian_cropped(u)


def sdlogj(disp: Any) -> float:
    """Learn2Reg SDlogJ: ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the 2-voxel-cropped volume (note the +3)."""
    return _sdlogj_of(_cropped_jacobian_checked(disp))


def _sdlogj_of(jac: np.ndarray) -> float:
    return float(np.log(np.clip(jac + 3.0, 1e-9, 1e9)).std())


def folded_fraction(disp: Any) -> float:
    """Fraction of voxels with central-difference ``J ≤ 0`` in the 2-voxel-cropped volume."""
    return _folded_fraction_of(_cropped_jacobian_checked(disp))


def _folded_fraction_of(jac: np.ndarray) -> float:
    return float(np.count_nonzero(jac <= 0) / jac.size)


def folded_percent(disp: Any) -> float:
    """:func:`folded_fraction` × 100."""
    return 100.0 * folded_fraction(disp)


# ----------------------------------------------------------------------------------------------------------
# NDV: non-diffeomorphic volume (digital diffeomorphism, Liu et al. IJCV 2024)
# ----------------------------------------------------------------------------------------------------------
_ONE_SIDED = [(a, b, c) for a in "+-" for b in "+-" for c in "+-"]
_SCHEMES = ["".join(s) for s in _ONE_SIDED] + ["*1", "*2"]


def _ndv_slab(u: np.ndarray, s: int, e: int, box: tuple[int, int, int, int] | None = None) -> dict[str, np.ndarray]:
    """The 10 determinants at voxels ``[s:e] × [1:-1] × [1:-1]`` (1-voxel crop: edge replication unused), or at
    ``[s:e] × [b0:b1] × [b2:b3]`` for ``box = (b0, b1, b2, b3)`` inside that crop.

    One-sided schemes: columns are forward ``T(p+e_a) − T(p)`` or backward ``T(p) − T(p−e_a)`` differences
    (determinant 1 for the identity). ``*1``/``*2``: the central tetrahedra spanned by the backward / forward
    face diagonals ``T(p ∓ e_a ∓ e_b) − T(p)``, columns ordered so that the identity gives +2.
    """
    _, n0, n1, n2 = u.shape
    b0, b1, b2, b3 = (1, n1 - 1, 1, n2 - 1) if box is None else box

    def at(o0: int, o1: int, o2: int) -> np.ndarray:
        return u[:, s + o0 : e + o0, b0 + o1 : b1 + o1, b2 + o2 : b3 + o2]

    def diff(off: tuple[int, int, int], base: tuple[int, int, int] = (0, 0, 0)) -> list[np.ndarray]:
        """Components of ``T(p+off) − T(p+base)`` with ``T = id + u``."""
        d = at(*off) - at(*base)
        # adding 0 is skipped: it changes no value (at most the sign of a zero, which no sum below sees)
        return [d[c] + (off[c] - base[c]) if off[c] != base[c] else d[c] for c in range(3)]

    unit = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    neg = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    fwd = [diff(unit[a]) for a in range(3)]
    bwd = [diff((0, 0, 0), neg[a]) for a in range(3)]
    out: dict[str, np.ndarray] = {}
    for signs in _ONE_SIDED:
        cols = [fwd[a] if signs[a] == "+" else bwd[a] for a in range(3)]
        # matrix entry (component c, column k) = cols[k][c]
        out["".join(signs)] = _det3(
            cols[0][0], cols[1][0], cols[2][0], cols[0][1], cols[1][1], cols[2][1], cols[0][2], cols[1][2], cols[2][2]
        )
    f01, f12, f02 = diff((1, 1, 0)), diff((0, 1, 1)), diff((1, 0, 1))
    b01, b12, b02 = diff((-1, -1, 0)), diff((0, -1, -1)), diff((-1, 0, -1))
    for name, cols in (("*1", (b01, b02, b12)), ("*2", (f01, f12, f02))):
        out[name] = _det3(
            cols[0][0], cols[1][0], cols[2][0], cols[0][1], cols[1][1], cols[2][1], cols[0][2], cols[1][2], cols[2][2]
        )
    return out


def digital_jacobian_determinants(disp: Any) -> dict[str, np.ndarray]:
    """The 10 finite-difference Jacobian determinants of ``T = id + u`` on the 1-voxel-cropped grid.

    Keys ``'+++'`` … ``'---'`` (forward/backward per axis; identity → 1) and ``'*1'``, ``'*2'`` (central
    tetrahedra; identity → 2). Memory: 10 float64 volumes; :func:`ndv` streams instead.
    """
    u = _as_disp(disp)
    if min(u.shape[1:]) < 3:
        raise UserError(f"grid {tuple(u.shape[1:])} too small for NDV (need ≥ 3 per axis)")
    parts = [_ndv_slab(u, s, min(s + _SLAB, u.shape[1] - 1)) for s in range(1, u.shape[1] - 1, _SLAB)]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in _SCHEMES}


def ndv(disp: Any, mask: Any = None) -> float:
    """Non-diffeomorphic volume in % of the mask: ``Σ_schemes Σ_voxels ½·max(−J, 0)/6`` ÷ mask size × 100.

    ``mask``: a boolean map, or the fixed image (voxels > 0 are used, the data README's convention);
    ``None`` = the whole grid. Mask and sums are taken on the 1-voxel-cropped grid. Identity → 0; this equals
    the mean negative volume of the two 5-tetrahedra decompositions of each voxel cube.
    """
    u = _as_disp(disp)
    shape = u.shape[1:]
    if min(shape) < 3:
        raise UserError(f"grid {tuple(shape)} too small for NDV (need ≥ 3 per axis)")
    m = np.ones(shape, dtype=bool) if mask is None else _on_grid(mask, shape, "NDV mask") > 0
    m = m[1:-1, 1:-1, 1:-1]
    n_mask = int(np.count_nonzero(m))
    if n_mask == 0:
        return float("nan")
    # Only the mask's bounding box along axes 1 and 2 is computed: the masked voxels, their order and the slabs
    # stay the same, so the sums are bitwise those of the whole grid.
    rows = np.flatnonzero(m.any(axis=(0, 2)))
    cols = np.flatnonzero(m.any(axis=(0, 1)))
    box = (int(rows[0]) + 1, int(rows[-1]) + 2, int(cols[0]) + 1, int(cols[-1]) + 2)
    m = m[:, box[0] - 1 : box[1] - 1, box[2] - 1 : box[3] - 1]
    total = 0.0
    for s in range(1, shape[0] - 1, _SLAB):
        e = min(s + _SLAB, shape[0] - 1)
        msl = m[s - 1 : e - 1]
        if not msl.any():
            continue
        # The determinants are computed on thin sub-slabs (temporaries in the CPU cache, ~3× faster), each on its
        # own mask bounding box; the masked values are concatenated in C order, i.e. the very array that
        # ``neg[msl]`` of the whole slab is, and summed at once: the value is bitwise that of one pass per slab.
        parts = []
        for t in range(s, e, _SUBSLAB):
            te = min(t + _SUBSLAB, e)
            mt = msl[t - s : te - s]
            r = np.flatnonzero(mt.any(axis=(0, 2)))
            if r.size == 0:
                continue
            c = np.flatnonzero(mt.any(axis=(0, 1)))
            sub = (box[0] + int(r[0]), box[0] + int(r[-1]) + 1, box[2] + int(c[0]), box[2] + int(c[-1]) + 1)
            neg = sum(np.maximum(-j, 0.0) for j in _ndv_slab(u, t, te, sub).values())
            parts.append(neg[mt[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1]])
        total += float(np.concatenate(parts).sum())
    return total / 12.0 / n_mask * 100.0


# ----------------------------------------------------------------------------------------------------------
# TRE and inverse consistency
# ----------------------------------------------------------------------------------------------------------
def tre(
    fixed_landmarks_vol: Any, warped_landmarks_vol: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> float:
    """Target registration error (LUMIR): mean distance between the centroids of matching landmark labels.

    Inputs are label volumes (the moving one already warped with nearest neighbour); labels present in both
    count. Distances in the units of ``spacing`` (mm). NaN when no landmark is common.
    """
    from scipy.ndimage import center_of_mass

    f = _as_labels(fixed_landmarks_vol, "fixed landmarks")
    w = _as_labels(warped_landmarks_vol, "warped landmarks")
    _check_same_shape(f, w, "tre")
    common = sorted(set(_label_counts(f)) & set(_label_counts(w)) - {0})
    if not common:
        return float("nan")
    cf = np.asarray(center_of_mass(np.ones_like(f, dtype=np.float64), f, common), dtype=np.float64)
    cw = np.asarray(center_of_mass(np.ones_like(w, dtype=np.float64), w, common), dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(1, 3)
    return float(np.linalg.norm((cf - cw) * sp, axis=1).mean())


def _sample_linear(u: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear sampling of each channel at ``coords`` with border clamping (= grid_sample 'border')."""
    from .resample import sample_points

    return np.stack([sample_points(u[c], coords, order=1, outside="border") for c in range(3)])


def inverse_consistency_error(u12: Any, u21: Any, margin: int = 2) -> dict[str, float]:
    """Inverse-consistency error (ARCHITECTURE.md §14), in voxels.

    ``e(p) = ‖u21(p) + u12(p + u21(p))‖`` and symmetrically ``‖u12(p) + u21(p + u12(p))‖``, linear interpolation
    with border padding; the two maps are pooled over the interior (``margin`` voxels cropped on every side).
    Returns ``{'mean', 'p99'}``.
    """
    a = _as_disp(u12)
    b = _as_disp(u21)
    _check_same_shape(a, b, "inverse_consistency_error")
    grid = np.indices(a.shape[1:], dtype=np.float64)
    errs = []
    for first, second in ((b, a), (a, b)):
        resid = first + _sample_linear(second, grid + first)
        e = np.sqrt((resid**2).sum(axis=0))
        if margin > 0:
            e = e[margin:-margin, margin:-margin, margin:-margin]
        errs.append(e.ravel())
    allerr = np.concatenate(errs)
    if allerr.size == 0:
        raise UserError(f"grid {tuple(a.shape[1:])} too small for a {margin}-voxel margin")
    return {"mean": float(allerr.mean()), "p99": float(np.percentile(allerr, 99))}


# ----------------------------------------------------------------------------------------------------------
# everything at once (the CLI writes this dict to metrics.json: keep the names stable)
# ----------------------------------------------------------------------------------------------------------
def evaluate_registration(
    disp: Any,
    fixed_labels: Any = None,
    moving_labels: Any = None,
    fixed_image: Any = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """All metrics of one registration on the fixed grid.

    Always: ``sdlogj``, ``folded_pct`` (% of central-difference J ≤ 0) and ``ndv`` (% of the mask
    ``fixed_image > 0``, whole grid without ``fixed_image``). With both label maps (moving labels on the
    same grid as the fixed one, before warping): ``dice``, ``dice_per_label``, ``dice_before``,
    ``dice_before_per_label``, ``hd95``, ``hd95_per_label`` and ``hd95_undefined_labels`` (count of labels
    with a Dice but no HD95). ``labels`` defaults to the non-zero labels of either map. Per-label keys are ints.
    """
    u = _as_disp(disp)
    grid = u.shape[1:]
    if (fixed_labels is None) != (moving_labels is None):
        raise UserError("Dice/HD95 need both the fixed and the moving label maps")
    fl = ml = None
    if fixed_labels is not None:
        fl = _as_labels(fixed_labels, "fixed labels")
        ml = _as_labels(moving_labels, "moving labels")
        if fl.shape != grid or ml.shape != grid:
            raise UserError(
                f"label maps {tuple(fl.shape)}, {tuple(ml.shape)} must be on the displacement grid {tuple(grid)}"
            )
        labels = _default_labels(fl, ml) if labels is None else [int(v) for v in labels]
    mask = None if fixed_image is None else _on_grid(fixed_image, grid, "fixed image") > 0

    def overlap() -> dict[str, Any]:
        warped = warp_labels_nearest(ml, u)
        dpl = dice_per_label(fl, warped, labels, moving=ml)
        dbl = dice_per_label(fl, ml, labels)
        hpl = hd95_per_label(fl, warped, labels, spacing)
        return dict(
            dice=_mean(dpl.values()),
            dice_per_label=dpl,
            dice_before=_mean(dbl.values()),
            dice_before_per_label=dbl,
            hd95=_mean(hpl.values()),
            hd95_per_label=hpl,
            hd95_undefined_labels=sum(1 for k in dpl if k not in hpl),
        )

    def regularity() -> dict[str, Any]:
        jac = _cropped_jacobian_checked(u)  # shared by SDlogJ and folding: the Jacobian is the costly part
        return {"sdlogj": _sdlogj_of(jac), "folded_pct": 100.0 * _folded_fraction_of(jac), "ndv": ndv(u, mask)}

    if fl is None:
        return regularity()
    # The two halves share nothing and spend their time in numpy (which releases the GIL) and the k-d tree, so
    # two threads overlap them; each value is computed exactly as alone.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        reg = pool.submit(regularity)
        result = overlap()
        result.update(reg.result())
    return result
