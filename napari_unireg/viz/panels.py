"""One panel of a comparison figure: the 2-D data of one slice and the function that draws it into an Axes.

Conventions (``napari_unireg/core/sample.py``): volumes are ``D0×D1×D2`` arrays, a displacement is ``3×D0×D1×D2``
in voxel units with the pull convention ``warped(p) = moving(p + u(p))`` (``1×3×S`` and channel-last ``S×3``
are accepted too). Warps use scipy, not torch: images and the deformation grid with
``map_coordinates(order=1, mode='nearest')`` (= ``grid_sample`` bilinear, border padding, align_corners=True),
label maps with ``order=0`` and zero fill (the evaluation convention of :mod:`napari_unireg.core.metrics`). Only
the requested slice is sampled, so a panel costs a 2-D interpolation, whatever the volume size.

Slice orientation (ARCHITECTURE.md §12): the 2-D slice ``vol.take(index, axis)`` (array axes ``a < b``) is
transposed, mirrored left-right and shown with ``origin='lower'``: the horizontal axis is array axis ``a``
running right→left, the vertical axis is array axis ``b`` running bottom→top. For RAS arrays (axis 0 = left→
right, 1 = posterior→anterior, 2 = inferior→superior) this is the **radiological convention**: coronal
(axis 1) and axial (axis 2) slices show the patient's right on the left of the image (axial: anterior up;
coronal: superior up); sagittal slices (axis 0) show anterior on the left, superior up.
``convention='neurological'`` skips the mirror (patient's left on the left; sagittal: anterior on the right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = [
    "CONVENTIONS",
    "in_plane_axes",
    "default_slice_index",
    "orient_slice",
    "pixel_aspect",
    "panel_aspect",
    "as_volume",
    "as_disp",
    "normalize_intensity",
    "deformed_slice",
    "difference_slice",
    "labels_slice",
    "grid_slice",
    "jacobian_slice",
    "show_slice",
    "draw_deformed",
    "draw_difference",
    "draw_labels",
    "draw_grid",
    "draw_jacobian",
    "add_scale_bar",
]

CONVENTIONS = ("radiological", "neurological")


# ----------------------------------------------------------------------------------------------------------
# geometry of a slice
# ----------------------------------------------------------------------------------------------------------
def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise UserError(f"axis must be 0, 1 or 2, got {axis!r}")
    return int(axis)


def in_plane_axes(axis: int) -> tuple[int, int]:
    """Array axes ``(horizontal, vertical)`` of a slice normal to ``axis`` (the two others, in increasing order)."""
    a, b = (k for k in range(3) if k != _check_axis(axis))
    return a, b


def default_slice_index(shape: Sequence[int], axis: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> int:
    """The paper's slice (0-based): ``N//2`` for axes 1 and 2, ``N0//2 − 10 mm`` for axis 0 (off the midline).

    On the 160×224×192 1 mm grid: 70, 112, 96 (files ``slc071of160``, ``slc113of224``, ``slc097of192``).
    """
    n = int(shape[_check_axis(axis)])
    idx = n // 2 - (int(round(10.0 / float(spacing[0]))) if axis == 0 else 0)
    return int(min(max(idx, 0), n - 1))


def _check_index(shape: Sequence[int], axis: int, index: int | None, spacing=(1.0, 1.0, 1.0)) -> int:
    if index is None:
        return default_slice_index(shape, axis, spacing)
    n = int(shape[axis])
    if not -n <= int(index) < n:
        raise UserError(f"slice {index} is outside axis {axis} (0..{n - 1})")
    return int(index) % n


def orient_slice(slice2d: np.ndarray, convention: str = "radiological") -> np.ndarray:
    """Array-order slice (``N_a×N_b``) → display array for ``imshow(origin='lower')`` (transpose, mirror)."""
    if convention not in CONVENTIONS:
        raise UserError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    out = np.asarray(slice2d).T
    return out[:, ::-1] if convention == "radiological" else out


def pixel_aspect(spacing: Sequence[float], axis: int) -> float:
    """``imshow`` aspect (pixel height / width) of a slice: vertical spacing over horizontal spacing."""
    a, b = in_plane_axes(axis)
    return float(spacing[b]) / float(spacing[a])


def panel_aspect(shape: Sequence[int], spacing: Sequence[float], axis: int) -> float:
    """Physical height / width of a slice (e.g. 224/160 for axial slices of the 1 mm 160×224×192 grid)."""
    a, b = in_plane_axes(axis)
    return (shape[b] * float(spacing[b])) / (shape[a] * float(spacing[a]))


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_volume(x: Any, name: str = "volume") -> np.ndarray:
    """A ``D0×D1×D2`` array (leading singleton batch/channel axes dropped)."""
    a = _to_numpy(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise UserError(f"{name} must be a 3-D volume, got shape {tuple(a.shape)}")
    return a


def as_disp(x: Any, shape: Sequence[int] | None = None, name: str = "displacement") -> np.ndarray:
    """A ``3×D0×D1×D2`` displacement from ``3×S``, ``1×3×S`` or channel-last ``S×3``; checks the grid."""
    u = _to_numpy(x)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim == 5 and u.shape[3] == 1 and u.shape[4] == 3:  # ITK-style X×Y×Z×1×3 holding voxel units
        u = u[:, :, :, 0, :]
    if u.ndim == 4 and u.shape[0] != 3 and u.shape[-1] == 3:
        u = np.moveaxis(u, -1, 0)
    if u.ndim != 4 or u.shape[0] != 3:
        raise UserError(f"{name} must be 3×D0×D1×D2 (or D0×D1×D2×3), got shape {tuple(u.shape)}")
    if shape is not None and tuple(u.shape[1:]) != tuple(shape):
        raise UserError(f"{name} grid {tuple(u.shape[1:])} differs from the fixed image grid {tuple(shape)}")
    return u


def normalize_intensity(vol: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Intensities for the gray 0..0.75 display of the paper (its images are in [0, 1]).

    ``none``: unchanged. ``percentile``: the development-data protocol, clip to ``[0, p99.5]`` of the voxels > 0
    and divide by p99.5. ``minmax``: ``(v − min)/(max − min)``. ``auto``: unchanged when the volume already lies
    in [0, 1] (1 % tolerance), else ``percentile``.
    """
    v = np.asarray(vol, dtype=np.float32)
    if mode == "none":
        return v
    if mode == "auto":
        lo, hi = float(v.min()), float(v.max())
        if lo >= -0.01 and hi <= 1.01:
            return v
        mode = "percentile"
    if mode == "minmax":
        lo, hi = float(v.min()), float(v.max())
        return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    if mode == "percentile":
        pos = v[v > 0]
        if pos.size == 0:
            return np.zeros_like(v)
        p = float(np.percentile(pos, 99.5))
        return np.clip(v, 0.0, p) / p if p > 0 else np.zeros_like(v)
    raise UserError(f"normalize must be auto, none, minmax or percentile, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------
# slice data (array order N_a × N_b; orient_slice turns it into the displayed array)
# ----------------------------------------------------------------------------------------------------------
def _sample_points(disp: np.ndarray | None, shape: Sequence[int], axis: int, index: int) -> np.ndarray:
    """``p + u(p)`` for the voxels ``p`` of the slice: ``3×N_a×N_b`` (float64)."""
    a, b = in_plane_axes(axis)
    coords = np.empty((3, shape[a], shape[b]), dtype=np.float64)
    coords[axis] = index
    coords[a] = np.arange(shape[a], dtype=np.float64)[:, None]
    coords[b] = np.arange(shape[b], dtype=np.float64)[None, :]
    if disp is not None:
        coords += np.take(disp, index, axis=axis + 1)
    return coords


def deformed_slice(moving: Any, disp: Any = None, axis: int = 2, index: int | None = None) -> np.ndarray:
    """``moving(p + u(p))`` on the slice (bilinear, border); ``disp=None`` gives the plain moving slice."""
    from ..core.resample import sample_points

    mov = as_volume(moving, "moving")
    index = _check_index(mov.shape, _check_axis(axis), index)
    if disp is None:
        return np.take(mov, index, axis=axis).astype(np.float32)
    u = as_disp(disp, mov.shape)
    pts = _sample_points(u, mov.shape, axis, index)
    return sample_points(mov.astype(np.float32, copy=False), pts, order=1, outside="border")


def difference_slice(
    fixed: Any, moving: Any, disp: Any = None, axis: int = 2, index: int | None = None
) -> np.ndarray:
    """``warped − fixed`` on the slice (``moving − fixed`` when ``disp`` is None)."""
    fix = as_volume(fixed, "fixed")
    mov = as_volume(moving, "moving")
    if fix.shape != mov.shape:
        raise UserError(f"fixed {fix.shape} and moving {mov.shape} must share a grid (resample first)")
    index = _check_index(fix.shape, _check_axis(axis), index)
    return deformed_slice(mov, disp, axis, index) - np.take(fix, index, axis=axis).astype(np.float32)


def labels_slice(labels: Any, disp: Any = None, axis: int = 2, index: int | None = None) -> np.ndarray:
    """Nearest-neighbour warped labels on the slice, zero outside (as :func:`metrics.warp_labels_nearest`)."""
    from ..core.resample import sample_points

    lab = as_volume(labels, "label map")
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.int32)
    index = _check_index(lab.shape, _check_axis(axis), index)
    if disp is None:
        return np.take(lab, index, axis=axis)
    u = as_disp(disp, lab.shape)
    pts = _sample_points(u, lab.shape, axis, index)
    return sample_points(lab, pts, order=0, outside="fill")


def grid_image(shape2d: Sequence[int], step: int = 8) -> np.ndarray:
    """Unwarped grid of a slice: 1 on the rows/columns ``0, step, 2·step, …`` of both in-plane axes, else 0."""
    g = np.zeros(tuple(shape2d), dtype=np.float32)
    g[::step, :] = 1.0
    g[:, ::step] = 1.0
    return g


def grid_slice(disp: Any, axis: int = 2, index: int | None = None, step: int = 8) -> np.ndarray:
    """Backward-warped deformation grid on the slice.

    The grid volume has 1-voxel lines every ``step`` voxels along the two in-plane axes and is constant along
    the slicing axis, so its trilinear/border warp equals a bilinear/border sample of the 2-D grid image at
    the in-plane components of ``p + u(p)`` (exactly, the through-plane component drops out).
    """
    from ..core.resample import sample_points

    u = as_disp(disp)
    shape = u.shape[1:]
    index = _check_index(shape, _check_axis(axis), index)
    if step < 1:
        raise UserError(f"grid step must be ≥ 1, got {step}")
    a, b = in_plane_axes(axis)
    pts = _sample_points(u, shape, axis, index)
    return sample_points(grid_image((shape[a], shape[b]), step), pts[[a, b]], order=1, outside="border")


def jacobian_slice(disp: Any, axis: int = 2, index: int | None = None) -> np.ndarray:
    """The slice of :func:`napari_unireg.core.metrics.jacobian_determinant` (central differences, border 2 = 1).

    Computed on the 5-slice slab around the slice, which gives exactly the full-volume values.
    """
    from ..core.metrics import jacobian_determinant

    u = as_disp(disp)
    shape = u.shape[1:]
    index = _check_index(shape, _check_axis(axis), index)
    a, b = in_plane_axes(axis)
    if index < 2 or index > shape[axis] - 3:
        return np.ones((shape[a], shape[b]), dtype=np.float64)
    slab = np.take(u, np.arange(index - 2, index + 3), axis=axis + 1)
    return np.take(jacobian_determinant(slab), 2, axis=axis)


# ----------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------
def show_slice(
    ax,
    slice2d: np.ndarray,
    axis: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    **imshow_kw,
):
    """Draw an array-order slice with the figure's orientation and physical aspect; returns the AxesImage."""
    kw = {"interpolation": "nearest"}
    kw.update(imshow_kw)
    im = ax.imshow(orient_slice(slice2d, convention), origin="lower", aspect=pixel_aspect(spacing, axis), **kw)
    ax.set_axis_off()
    return im


def draw_deformed(
    ax,
    moving: Any,
    disp: Any = None,
    *,
    axis: int = 2,
    index: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    cmap: str = "gray",
    vmin: float = 0.0,
    vmax: float = 0.75,
):
    """Row "Deformed": the (warped) moving image, gray 0..0.75. Pass the fixed image with ``disp=None``."""
    index = _check_index(as_volume(moving, "moving").shape, _check_axis(axis), index, spacing)
    return show_slice(ax, deformed_slice(moving, disp, axis, index), axis, spacing, convention,
                      cmap=cmap, vmin=vmin, vmax=vmax)


def draw_difference(
    ax,
    fixed: Any,
    moving: Any,
    disp: Any = None,
    *,
    axis: int = 2,
    index: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    cmap: str = "coolwarm",
    vmin: float = -0.1,
    vmax: float = 0.1,
):
    """Row "Difference": ``warped − fixed`` (``moving − fixed`` without ``disp``), coolwarm ±0.1."""
    index = _check_index(as_volume(fixed, "fixed").shape, _check_axis(axis), index, spacing)
    return show_slice(ax, difference_slice(fixed, moving, disp, axis, index), axis, spacing, convention,
                      cmap=cmap, vmin=vmin, vmax=vmax)


def draw_labels(
    ax,
    labels: Any,
    disp: Any = None,
    *,
    axis: int = 2,
    index: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    max_label: int | None = None,
    cmap=None,
    norm=None,
):
    """Row "Deformed Labels": nearest-warped labels with the ITK-SNAP-like table (``BoundaryNorm`` at k ± 0.5).

    ``max_label`` defaults to ``max(35, largest label)``; pass ``cmap``/``norm`` to use another table.
    """
    from .colors import label_cmap_norm

    lab = as_volume(labels, "label map")
    index = _check_index(lab.shape, _check_axis(axis), index, spacing)
    data = labels_slice(lab, disp, axis, index)
    if cmap is None or norm is None:
        top = max(35, int(lab.max()) if lab.size else 0) if max_label is None else int(max_label)
        c, n = label_cmap_norm(top)
        cmap = c if cmap is None else cmap
        norm = n if norm is None else norm
    return show_slice(ax, data, axis, spacing, convention, cmap=cmap, norm=norm)


def draw_grid(
    ax,
    disp: Any,
    *,
    axis: int = 2,
    index: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    step: int = 8,
    cmap: str = "gray",
    vmin: float = 0.0,
    vmax: float = 1.0,
):
    """Row "Deformation Grid (backward)": the grid volume pulled through ``disp``, gray 0..1."""
    index = _check_index(as_disp(disp).shape[1:], _check_axis(axis), index, spacing)
    return show_slice(ax, grid_slice(disp, axis, index, step), axis, spacing, convention,
                      cmap=cmap, vmin=vmin, vmax=vmax)


def draw_jacobian(
    ax,
    disp: Any,
    *,
    axis: int = 2,
    index: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    convention: str = "radiological",
    cmap: str = "bwr",
    vmin: float = -1.0,
    vmax: float = 3.0,
    contour_color: str | None = "black",
    contour_linewidth: float = 0.7,
):
    """Row "Jacobian": central-difference ``det(I + ∇u)``, bwr −1..3, black ``J = 0`` contour (folding)."""
    index = _check_index(as_disp(disp).shape[1:], _check_axis(axis), index, spacing)
    jac = jacobian_slice(disp, axis, index)
    im = show_slice(ax, jac, axis, spacing, convention, cmap=cmap, vmin=vmin, vmax=vmax)
    if contour_color is not None and contour_linewidth > 0 and jac.min() < 0.0 < jac.max():
        ax.contour(orient_slice(jac, convention), levels=[0.0], colors=[contour_color],
                   linewidths=contour_linewidth)
    return im


def add_scale_bar(
    ax,
    length_mm: float,
    spacing: Sequence[float],
    axis: int,
    *,
    color: str = "white",
    fontsize: float = 14,
    linewidth: float = 3.0,
    label: str | None = None,
):
    """A horizontal ``length_mm`` bar with its label in the lower right corner of an image panel."""
    a, _ = in_plane_axes(axis)
    length_px = float(length_mm) / float(spacing[a])
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    w, h = abs(x1 - x0), abs(y1 - y0)
    xe = max(x0, x1) - 0.05 * w
    ys = min(y0, y1) + 0.06 * h
    ax.plot([xe - length_px, xe], [ys, ys], color=color, linewidth=linewidth, solid_capstyle="butt")
    text = label if label is not None else f"{length_mm:g} mm"
    ax.text(xe - length_px / 2, ys + 0.02 * h, text, color=color, fontsize=fontsize, ha="center", va="bottom")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
