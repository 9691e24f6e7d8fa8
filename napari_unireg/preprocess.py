"""From a loaded :class:`~napari_unireg.io.Volume` to the networks' model grid and back.

The networks expect 1 mm RAS volumes on a 160×224×192 grid with intensities in [0, 1]. :func:`to_model_grid`
does canonical RAS (already done by :func:`~napari_unireg.io.load_volume`) → 1 mm resampling → intensity
normalisation → crop/pad centred on the brain, and returns a :class:`GridMapping` that maps images and
displacement fields computed on the model grid back to the user's native (fixed) grid.

Geometry used throughout (``align_corners=True`` style, as in :mod:`napari_unireg.spatial`): voxel index ``i`` is
the voxel centre; resampling keeps voxel 0's centre in place and changes the step. The model grid is therefore
always axis-aligned with the native canonical grid (``model voxel q = a·p + b`` per axis for native voxel ``p``),
which makes every mapping here separable, fast and exact at integer positions.

If a volume already is a 1 mm RAS 160×224×192 volume (e.g. the Learn2Reg/LUMIR box), the mapping is the exact
identity: no resampling, no crop, and the field/image round trips return the input values unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .io import Volume

__all__ = [
    "MODEL_SHAPE",
    "MODEL_SPACING",
    "CropPad",
    "GridMapping",
    "resample_to_spacing",
    "normalize_intensity",
    "is_normalized",
    "crop_or_pad",
    "undo_crop_or_pad",
    "foreground_bbox",
    "resample_affine",
    "to_model_grid",
]

MODEL_SHAPE = (160, 224, 192)
MODEL_SPACING = (1.0, 1.0, 1.0)
_SPACING_TOL = 1e-5


# --------------------------------------------------------------------------------------------- sampling kernels


def _sample_axis(array: np.ndarray, axis: int, coords: np.ndarray, order: int, outside: str, fill: float):
    """1D resampling of ``array`` along ``axis`` at fractional indices ``coords`` (linear or nearest).

    ``outside='border'`` clamps positions to ``[0, n-1]`` (edge values); ``'fill'`` writes ``fill`` at positions
    outside ``[0, n-1]`` (tolerance 1e-6).
    """
    n = array.shape[axis]
    coords = np.asarray(coords, dtype=np.float64)
    inside = (coords >= -1e-6) & (coords <= n - 1 + 1e-6)
    c = np.clip(coords, 0, n - 1)
    if order > 0 and np.array_equal(c, np.round(c)):
        order = 0  # integer positions (pure crop/pad): a gather is exact and much cheaper
    if order == 0:
        idx = np.clip(np.floor(c + 0.5).astype(np.int64), 0, n - 1)
        out = np.take(array, idx, axis=axis)
    else:
        i0 = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
        i1 = np.minimum(i0 + 1, n - 1)
        w = (c - i0).astype(np.float32 if array.dtype != np.float64 else np.float64)
        shape = [1] * array.ndim
        shape[axis] = len(coords)
        w = w.reshape(shape)
        a0 = np.take(array, i0, axis=axis)
        a1 = np.take(array, i1, axis=axis)
        # a0 + w·(a1 − a0) is not exact at w = 0 for large values; this form is (x·1 + y·0 = x).
        out = a0 * (1 - w) + a1 * w
    if outside == "fill" and not np.all(inside):
        shape = [1] * array.ndim
        shape[axis] = len(coords)
        out = np.where(inside.reshape(shape), out, np.asarray(fill, dtype=out.dtype))
    return out


def _sample_separable(
    array: np.ndarray,
    scale: Sequence[float],
    offset: Sequence[float],
    out_shape: Sequence[int],
    order: int,
    outside: str = "fill",
    fill: float = 0.0,
) -> np.ndarray:
    """Sample ``array`` (first 3 axes spatial) at input index ``scale·q + offset`` for every output voxel ``q``."""
    out = array
    if order > 0 and out.dtype.kind != "f":
        out = out.astype(np.float32)
    for axis in range(3):
        coords = scale[axis] * np.arange(out_shape[axis], dtype=np.float64) + offset[axis]
        if out.shape[axis] == out_shape[axis] and np.allclose(coords, np.arange(out_shape[axis]), atol=1e-9, rtol=0):
            continue  # identity along this axis: keep values bit-exact
        out = _sample_axis(out, axis, coords, order, outside, fill)
    return np.ascontiguousarray(out)


def resample_affine(
    array: np.ndarray,
    out_to_in: np.ndarray,
    out_shape: Sequence[int],
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Pull-resample ``array`` onto a grid of ``out_shape``: ``out[q] = array[out_to_in @ q]`` (4×4 voxel matrix).

    Linear (``order=1``) or nearest (``order=0``, dtype kept: label maps); ``fill`` outside the input. Uses the
    separable exact kernel when ``out_to_in`` is diagonal, :func:`scipy.ndimage.affine_transform` otherwise.
    """
    m = np.asarray(out_to_in, dtype=np.float64)
    out_shape = tuple(int(s) for s in out_shape)
    lin = m[:3, :3]
    if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9, rtol=0):
        return _sample_separable(array, np.diag(lin), m[:3, 3], out_shape, order, "fill", fill)
    from scipy.ndimage import affine_transform

    if order == 0:
        return affine_transform(array, m, output_shape=out_shape, order=0, mode="constant", cval=fill,
                                output=array.dtype)
    src = array if array.dtype.kind == "f" else array.astype(np.float32)
    # mode='constant' with order 1 treats the outer half voxel as outside; positions are in the input's index space.
    return affine_transform(src, m, output_shape=out_shape, order=1, mode="constant", cval=fill, prefilter=False)


# --------------------------------------------------------------------------------------------- resampling


def _grid_for_spacing(volume: Volume, spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the grid with ``spacing`` covering ``volume``'s field of view (voxel 0 kept)."""
    old = np.asarray(volume.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    factor = new / old  # input voxels per output voxel
    shape = tuple(int(np.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(volume.shape, factor))
    affine = volume.affine @ np.diag([*factor, 1.0])
    return shape, affine


def resample_to_spacing(volume: Volume, spacing: Sequence[float] = (1.0, 1.0, 1.0), order: int | None = None) -> Volume:
    """Resample a canonical volume to ``spacing`` mm (same orientation, voxel 0 kept, field of view kept).

    ``order`` 1 (linear) for images, 0 (nearest) for label maps (the default follows ``volume.is_label``).
    Images are smoothed before downsampling (Gaussian, σ = (factor − 1)/2 voxels) to avoid aliasing. Returns the
    volume unchanged (same object) when the spacing already matches.
    """
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    if min(spacing) <= 0:
        raise UserError(f"invalid target spacing {spacing}")
    if order is None:
        order = 0 if volume.is_label else 1
    if np.allclose(volume.spacing, spacing, rtol=0, atol=_SPACING_TOL):
        return volume
    shape, affine = _grid_for_spacing(volume, spacing)
    factor = np.asarray(spacing) / np.asarray(volume.spacing)
    data = volume.data
    if order > 0 and np.any(factor > 1.01):
        from scipy.ndimage import gaussian_filter

        sigma = [max((f - 1) / 2, 0) for f in factor]
        data = gaussian_filter(data.astype(np.float32, copy=False), sigma, mode="nearest", truncate=3.0)
    out = _sample_separable(data, factor, (0, 0, 0), shape, order, "border")
    if order > 0 and volume.data.dtype.kind == "f":
        out = out.astype(volume.data.dtype, copy=False)
    return Volume(
        data=out,
        affine=affine,
        header=volume.header,
        original_affine=volume.original_affine,
        original_shape=volume.original_shape,
        ornt=volume.ornt,
        is_label=volume.is_label,
        path=volume.path,
        name=volume.name,
    )


# --------------------------------------------------------------------------------------------- intensities


def normalize_intensity(data: np.ndarray, mask: np.ndarray | None = None, pmax: float = 99.5) -> np.ndarray:
    """Scale an image to [0, 1]: clip to ``[0, p]`` with ``p`` the ``pmax`` percentile of the foreground, divide.

    This is the data README's protocol (foreground = ``mask``, else voxels > 0; 0 outside the foreground).
    Raw scanner ranges (e.g. 0–4095) need nothing special. Negative values: a constant negative background
    (the minimum value covering ≥ 5 % of the volume, e.g. −1024) is shifted to 0 first; scattered negative
    values (interpolation ringing, noise) are clipped to 0. Returns float32.
    """
    x = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise UserError("the image contains NaN or infinite values")
    if mask is None:
        lo = float(x.min())
        if lo < 0 and np.count_nonzero(x == lo) >= 0.05 * x.size:
            x = x - lo
        mask = x > 0
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != x.shape:
            raise UserError(f"mask shape {mask.shape} does not match the image {x.shape}")
    fg = x[mask]
    if fg.size == 0:
        raise UserError("the image has no foreground (no voxel above 0): nothing to normalise")
    p = float(np.percentile(fg, pmax))
    if not p > 0:
        raise UserError(f"the image's {pmax} percentile of the foreground is {p:g}: cannot scale it to [0, 1]")
    out = np.clip(x, 0, p) / np.float32(p)
    out[~mask] = 0
    return out.astype(np.float32, copy=False)


def is_normalized(data: np.ndarray, pmax: float = 99.5) -> bool:
    """True when ``data`` is already scaled to [0, 1] like :func:`normalize_intensity` would scale it.

    Values in [0, 1] and the ``pmax`` percentile of the voxels > 0 at least 0.95 (a min–max scaled image with
    bright outliers, whose brain sits far below 1, does not pass).
    """
    x = np.asarray(data)
    if x.dtype.kind != "f" or x.min() < 0 or x.max() > 1:
        return False
    fg = x[x > 0]
    return fg.size > 0 and float(np.percentile(fg, pmax)) >= 0.95


# --------------------------------------------------------------------------------------------- crop / pad


@dataclass(frozen=True)
class CropPad:
    """Integer window of a crop/pad: ``out[q] = in[q + start]`` (``start`` < 0 means padding before)."""

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    start: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return self.in_shape == self.out_shape and not any(self.start)


def foreground_bbox(array: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive ``(lo, hi)`` voxel indices of ``array > threshold``, or None when there is no foreground."""
    fg = np.asarray(array) > threshold
    if fg.ndim > 3:
        fg = fg.reshape(fg.shape[:3] + (-1,)).any(axis=-1)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        if idx.size == 0:
            return None
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.asarray(lo), np.asarray(hi)


def _window_starts(in_shape, out_shape, bbox) -> tuple[int, int, int]:
    starts = []
    for axis, (n, s) in enumerate(zip(in_shape, out_shape)):
        if bbox is None:
            lo, hi = 0, n - 1
        else:
            lo, hi = int(bbox[0][axis]), int(bbox[1][axis])
        if n == s and hi - lo + 1 <= s:
            starts.append(0)  # already the right size and everything fits: keep it (exact identity)
            continue
        start = int(np.floor((lo + hi) / 2 - (s - 1) / 2 + 0.5))
        if hi - lo + 1 <= s:
            start = min(max(start, hi - s + 1), lo)  # the whole foreground stays inside the window
        starts.append(start)
    return tuple(starts)


def crop_or_pad(
    array: np.ndarray, shape: Sequence[int] = MODEL_SHAPE, *, foreground: np.ndarray | None = None, fill: float = 0
) -> tuple[np.ndarray, CropPad]:
    """Crop and/or pad the first three axes of ``array`` to ``shape``, centred on the brain bounding box.

    The brain is ``foreground > 0`` (default: ``array > 0``). Along an axis that already has the target length
    and holds the whole brain nothing moves. Otherwise the window is centred on the bounding box and shifted so
    the whole brain stays inside when it fits (a warning is raised when it cannot fit). Returns the new array
    and the :class:`CropPad` record for :func:`undo_crop_or_pad`.
    """
    shape = tuple(int(s) for s in shape)
    in_shape = tuple(int(s) for s in array.shape[:3])
    bbox = foreground_bbox(array if foreground is None else foreground)
    start = _window_starts(in_shape, shape, bbox)
    if bbox is not None:
        size = bbox[1] - bbox[0] + 1
        if np.any(size > np.asarray(shape)):
            warnings.warn(
                f"the brain ({tuple(int(s) for s in size)} voxels) is larger than the model grid {shape}: "
                "its edges are cropped",
                stacklevel=2,
            )
    record = CropPad(in_shape, shape, start)
    return _apply_window(array, record.start, shape, fill), record


def _apply_window(array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill: float) -> np.ndarray:
    """``out[q] = array[q + start]`` inside ``array``, ``fill`` elsewhere (integer window, exact)."""
    in_shape = array.shape[:3]
    if tuple(in_shape) == tuple(shape) and not any(start):
        return array
    out = np.full(tuple(shape) + array.shape[3:], fill, dtype=array.dtype)
    src, dst = [], []
    for n, s, a in zip(in_shape, shape, start):
        lo, hi = max(a, 0), min(a + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[tuple(dst)] = array[tuple(src)]
    return out


def undo_crop_or_pad(array: np.ndarray, record: CropPad, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: put ``array`` (``record.out_shape``) back on the original grid."""
    if tuple(array.shape[:3]) != record.out_shape:
        raise UserError(f"array of shape {tuple(array.shape)} does not match the crop record {record.out_shape}")
    return _apply_window(array, tuple(-a for a in record.start), record.in_shape, fill)


# --------------------------------------------------------------------------------------------- model grid


@dataclass
class GridMapping:
    """How the model grid sits on a native canonical grid: model voxel ``q`` ↔ native voxel ``p``.

    ``q = scale·p + offset`` per axis (``scale`` = native spacing / model spacing). ``native_affine`` and
    ``model_affine`` are the voxel → RAS mm matrices of the two grids (``model_affine`` is what a model-grid
    result should be saved with).
    """

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    crop: CropPad
    resampled: bool

    @property
    def is_identity(self) -> bool:
        return not self.resampled and self.crop.is_identity

    @property
    def native_to_model(self) -> np.ndarray:
        """4×4 voxel matrix native canonical voxel → model voxel."""
        m = np.diag([*self.scale, 1.0])
        m[:3, 3] = self.offset
        return m

    @property
    def model_to_native(self) -> np.ndarray:
        """4×4 voxel matrix model voxel → native canonical voxel."""
        m = np.diag([*(1.0 / self.scale), 1.0])
        m[:3, 3] = -self.offset / self.scale
        return m

    # -- model grid -> native grid

    def field_to_native(self, disp_model: np.ndarray) -> np.ndarray:
        """A pull displacement on the model grid (``3×model``, model voxel units) → on the native grid.

        For native voxel ``p`` at model position ``q = scale·p + offset``: ``v(p) = u(q) / scale`` (linear
        interpolation of ``u``, border values outside the model grid as in :mod:`napari_unireg.spatial`). The
        result is in native voxel units, channel = native canonical array axis, and describes the same world
        mapping: ``native_affine·(p + v(p)) = model_affine·(q + u(q))``. Exact identity for identity mappings.
        """
        u = _as_numpy_field(disp_model)
        if tuple(u.shape[1:]) != self.model_shape:
            raise UserError(f"displacement of shape {tuple(u.shape)} does not match the model grid {self.model_shape}")
        if self.is_identity:
            return u.copy()
        # Sample channel-last so the three components share the index arithmetic.
        sampled = _sample_separable(
            np.moveaxis(u, 0, -1), self.scale, self.offset, self.native_shape, order=1, outside="border"
        )
        v = np.moveaxis(sampled, -1, 0) / self.scale.reshape(3, 1, 1, 1).astype(np.float32)
        return np.ascontiguousarray(v, dtype=np.float32)

    def image_to_native(self, image_model: np.ndarray, order: int | None = None, fill: float = 0) -> np.ndarray:
        """An image (linear) or label map (nearest, integer dtype) on the model grid → the native canonical grid.

        ``fill`` outside the model grid. ``order`` defaults to 0 for integer arrays and 1 otherwise.
        """
        img = np.asarray(image_model)
        if tuple(img.shape[:3]) != self.model_shape:
            raise UserError(f"array of shape {tuple(img.shape)} does not match the model grid {self.model_shape}")
        if order is None:
            order = 0 if img.dtype.kind in "biu" else 1
        if self.is_identity:
            return img.copy()
        out = _sample_separable(img, self.scale, self.offset, self.native_shape, order, "fill", fill)
        return out.astype(img.dtype, copy=False) if order == 0 else out

    # -- native grid -> model grid

    def to_model(self, data: np.ndarray | Volume, order: int | None = None, fill: float = 0) -> np.ndarray:
        """Put another array on the same native grid (e.g. the fixed label map) onto the model grid.

        Same sampling as :func:`to_model_grid` (nearest for integer arrays/label volumes, linear otherwise),
        without normalisation. Exact (a copy or the input itself) for identity mappings.
        """
        if isinstance(data, Volume):
            if order is None:
                order = 0 if data.is_label else 1
            if data.shape != self.native_shape or not np.allclose(data.affine, self.native_affine, atol=1e-4):
                raise UserError(f"{data.name} is not on the same grid as the fixed image")
            data = data.data
        data = np.asarray(data)
        if tuple(data.shape[:3]) != self.native_shape:
            raise UserError(f"array of shape {tuple(data.shape)} does not match the native grid {self.native_shape}")
        if order is None:
            order = 0 if data.dtype.kind in "biu" else 1
        if self.is_identity:
            return data
        return self._model_from_native(data, order, fill)

    def _model_from_native(self, data: np.ndarray, order: int, fill: float) -> np.ndarray:
        spacing = self.native_affine_spacing / self.scale  # model spacing
        vol = Volume(data=data, affine=self.native_affine, is_label=(order == 0))
        res = resample_to_spacing(vol, spacing, order=order)
        return _apply_window(res.data, self.crop.start, self.model_shape, fill)

    @property
    def native_affine_spacing(self) -> np.ndarray:
        return np.sqrt((self.native_affine[:3, :3] ** 2).sum(axis=0))

    def resample_to_model(
        self, volume: Volume, world_to_moving: np.ndarray | None = None, order: int | None = None, fill: float = 0
    ) -> np.ndarray:
        """Resample any volume (its own grid) onto the model grid, optionally through a world transform.

        ``world_to_moving`` (4×4, RAS mm, pull): model-grid world point ``x`` samples ``volume`` at
        ``world_to_moving @ x`` (e.g. :attr:`napari_unireg.prealign.AffineResult.matrix`). Linear for images,
        nearest for label maps. Uses the exact path of :meth:`to_model` when the volume is on the native grid and
        no transform is given.
        """
        if order is None:
            order = 0 if volume.is_label else 1
        if (
            world_to_moving is None
            and volume.shape == self.native_shape
            and np.allclose(volume.affine, self.native_affine, atol=1e-6)
        ):
            return self.to_model(volume.data, order=order, fill=fill)
        w = np.eye(4) if world_to_moving is None else np.asarray(world_to_moving, dtype=np.float64)
        vox = np.linalg.inv(volume.affine) @ w @ self.model_affine
        return resample_affine(volume.data, vox, self.model_shape, order=order, fill=fill)


def _as_numpy_field(disp) -> np.ndarray:
    if hasattr(disp, "detach"):  # torch tensor
        disp = disp.detach().cpu().numpy()
    disp = np.asarray(disp)
    if disp.ndim == 5 and disp.shape[0] == 1:
        disp = disp[0]
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise UserError(f"a displacement field must be 3×X×Y×Z, got shape {tuple(disp.shape)}")
    return disp.astype(np.float32, copy=False)


def to_model_grid(
    volume: Volume,
    shape: Sequence[int] = MODEL_SHAPE,
    spacing: Sequence[float] = MODEL_SPACING,
    normalize: bool | str = "auto",
) -> tuple[np.ndarray, GridMapping]:
    """Canonical RAS volume → model grid array (``shape`` at ``spacing`` mm) plus the :class:`GridMapping`.

    Steps: resample to ``spacing`` (linear; nearest for label maps), normalise intensities (images only;
    ``'auto'`` skips images already in [0, 1], see :func:`is_normalized`), crop/pad to ``shape`` centred on the
    brain (``> 0``). A 1 mm RAS volume of the model shape is returned unchanged (identity mapping).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    res = resample_to_spacing(volume, spacing)
    resampled = res is not volume
    data = res.data
    if not volume.is_label and (normalize is True or (normalize == "auto" and not is_normalized(data))):
        data = normalize_intensity(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, record = crop_or_pad(data, shape)
    for w in caught:
        warnings.warn(f"{volume.name}: {w.message}", stacklevel=2)
    scale = np.asarray(volume.spacing) / np.asarray(spacing) if resampled else np.ones(3)
    offset = -np.asarray(record.start, dtype=np.float64)
    model_affine = res.affine @ _translation(record.start)
    mapping = GridMapping(
        native_shape=volume.shape,
        native_affine=volume.affine.copy(),
        model_shape=shape,
        model_affine=model_affine,
        scale=scale,
        offset=offset,
        crop=record,
        resampled=resampled,
    )
    return out, mapping


def _translation(t: Sequence[float]) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m
