"""From a loaded :class:`~napari_unireg.io.Volume` to the networks' model grid and back.

The networks expect 1 mm RAS volumes on a 160×224×192 grid with intensities in [0, 1]. :func:`to_model_grid`
does canonical RAS (already done by :func:`~napari_unireg.io.load_volume`) → 1 mm resampling → intensity
normalisation → crop/pad centred on the brain, and returns a :class:`GridMapping` that maps images and
displacement fields computed on the model grid back to the user's native (fixed) grid.

Geometry used throughout (``align_corners=True`` style, as in :mod:`napari_unireg.core.sample`): voxel index ``i`` is
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

from ..core.intensity import MODEL_SHAPE, CropPad, apply_window, crop_or_pad, is_normalized, normalize_intensity
from ..core.grid import apply_affine_field, translation, voxel_map
from ..core.resample import resample_affine, sample_separable
from ..errors import UserError
from ..io import Volume

__all__ = ["MODEL_SHAPE", "MODEL_SPACING", "GridMapping", "resample_to_spacing", "to_model_grid"]

MODEL_SPACING = (1.0, 1.0, 1.0)
_SPACING_TOL = 1e-5


# --------------------------------------------------------------------------------------------- resampling


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
    target = volume.grid.with_spacing(spacing)
    shape, affine = target.shape, target.affine
    factor = np.asarray(spacing) / np.asarray(volume.spacing)
    data = volume.data
    if order > 0 and np.any(factor > 1.01):
        from scipy.ndimage import gaussian_filter

        sigma = [max((f - 1) / 2, 0) for f in factor]
        data = gaussian_filter(data.astype(np.float32, copy=False), sigma, mode="nearest", truncate=3.0)
    out = sample_separable(data, factor, (0, 0, 0), shape, order, "border")
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
        interpolation of ``u``, border values outside the model grid as in :mod:`napari_unireg.core.sample`). The
        result is in native voxel units, channel = native canonical array axis, and describes the same world
        mapping: ``native_affine·(p + v(p)) = model_affine·(q + u(q))``. Exact identity for identity mappings.
        """
        u = _as_numpy_field(disp_model)
        if tuple(u.shape[1:]) != self.model_shape:
            raise UserError(f"displacement of shape {tuple(u.shape)} does not match the model grid {self.model_shape}")
        if self.is_identity:
            return u.copy()
        # Sample channel-last so the three components share the index arithmetic.
        sampled = sample_separable(
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
        out = sample_separable(img, self.scale, self.offset, self.native_shape, order, "fill", fill)
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
        return apply_window(res.data, self.crop.start, self.model_shape, fill)

    @property
    def native_affine_spacing(self) -> np.ndarray:
        return np.sqrt((self.native_affine[:3, :3] ** 2).sum(axis=0))

    def coverage(self, volume: Volume, mask: np.ndarray, world_to_moving: np.ndarray | None = None,
                 step: int = 4) -> float:
        """Fraction of the model-grid voxels in ``mask`` that ``volume``'s field of view reaches (through
        ``world_to_moving``), from every ``step``-th voxel along each axis: a few thousand points, no resampling."""
        points = np.argwhere(mask[::step, ::step, ::step]).T * step  # 3×N model voxels
        if points.shape[1] == 0:
            return 1.0
        w = np.eye(4) if world_to_moving is None else np.asarray(world_to_moving, dtype=np.float64)
        vox = apply_affine_field(voxel_map(self.model_affine, volume.affine, w), points)
        upper = np.asarray(volume.shape, dtype=np.float64)[:, None] - 0.5
        return float(np.mean(np.all((vox >= -0.5) & (vox <= upper), axis=0)))

    def resample_to_model(
        self, volume: Volume, world_to_moving: np.ndarray | None = None, order: int | None = None, fill: float = 0
    ) -> np.ndarray:
        """Resample any volume (its own grid) onto the model grid, optionally through a world transform.

        ``world_to_moving`` (4×4, RAS mm, pull): model-grid world point ``x`` samples ``volume`` at
        ``world_to_moving @ x`` (e.g. :attr:`napari_unireg.core.prealign.AffineResult.matrix`). Linear for images,
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
        vox = voxel_map(self.model_affine, volume.affine, w)
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
    model_affine = res.affine @ translation(record.start)
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
