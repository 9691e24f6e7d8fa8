"""Files on disk <-> arrays in the engine's conventions (nibabel only; no torch import here).

Volumes
    :func:`load_volume` reads a NIfTI (or FreeSurfer MGH/MGZ) file, checks it (UserError on anything the user must
    fix) and returns a :class:`Volume` whose ``data`` is in **canonical RAS voxel order**
    (``nibabel.as_closest_canonical``: axis 0 = left→right, 1 = posterior→anterior, 2 = inferior→superior) with
    the matching ``affine``. The original header, affine, shape and orientation are kept so that :func:`save_volume`
    writes results back in the user's voxel order with the user's header (qform/sform kept).

Displacement fields (in memory: ``3×X×Y×Z``, voxel units of their grid, channel ``c`` = array axis ``c``, pull
convention ``warped(p) = moving(p + u(p))``; see :mod:`napari_unireg.core.sample`)
    * Learn2Reg files (:func:`save_disp_l2r` / :func:`load_disp_l2r`): ``X×Y×Z×3`` float32, voxel units, pull,
      channel = array axis, ``Nifti1Image(data, eye(4))`` (ARCHITECTURE.md §11).
    * ITK/ANTs files (:func:`save_disp_itk` / :func:`load_disp_itk`): ``X×Y×Z×1×3`` float32 vector NIfTI
      (intent ``NIFTI_INTENT_VECTOR``), components in **LPS millimetres** (ITK's physical frame), header affine =
      the grid's affine, pull: fixed physical point ``x`` maps to moving physical point ``x + d(x)``. This is what
      ``antsApplyTransforms -t warp.nii.gz`` and ``greedy -r`` read.

Every writer refuses to overwrite an existing file unless ``overwrite=True`` and writes atomically (a temporary
file in the same folder, then ``os.replace``), so a crash never leaves a half-written result under the final name.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from ..core.grid import Grid
from ..errors import UserError

__all__ = [
    "Volume",
    "load_volume",
    "volume_from_array",
    "looks_like_labels",
    "to_original_orientation",
    "disp_to_original_orientation",
    "save_volume",
    "save_disp_l2r",
    "load_disp_l2r",
    "save_disp_itk",
    "load_disp_itk",
    "labels_names",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
READ_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
MAX_LABELS = 1000
# Fraction of neighbouring non-zero voxel pairs with equal values: label maps measured 0.88-1.0 (aseg, 35-label box
# maps, SynthSeg, CerebrA, masks), brain images 0.00-0.17 (uint8 FreeSurfer brains included).
LABEL_EQUAL_NEIGHBOURS = 0.6
_RAS = axcodes2ornt(("R", "A", "S"))
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D volume in canonical RAS voxel order plus what is needed to write results back like the input.

    ``data`` is ``X×Y×Z`` (float32 for images, an integer dtype for label maps), ``affine`` maps its voxel
    indices to RAS world millimetres. ``original_affine``/``original_shape``/``ornt`` describe the file as
    stored: ``ornt`` is ``nibabel.io_orientation(original_affine)`` (stored axis ``i`` -> RAS axis ``ornt[i,0]``,
    flipped when ``ornt[i,1] == -1``).
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    original_affine: np.ndarray | None = None
    original_shape: tuple[int, ...] | None = None
    ornt: np.ndarray | None = None
    is_label: bool = False
    path: Path | None = None
    name: str = "volume"

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.original_affine is None:
            self.original_affine = self.affine.copy()
        if self.original_shape is None:
            self.original_shape = tuple(self.data.shape)
        if self.ornt is None:
            self.ornt = _RAS.copy()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])

    @property
    def grid(self) -> Grid:
        """The canonical grid (shape + affine) of the data."""
        return Grid(self.shape, self.affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three (canonical) array axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def orientation(self) -> str:
        """Axis codes of the file as stored, e.g. ``'LIA'``."""
        return "".join(nib.aff2axcodes(self.original_affine))

    def with_data(self, data: np.ndarray, *, is_label: bool | None = None, name: str | None = None) -> Volume:
        """Same grid and header, other data (e.g. a warped image or a label map to save like this volume)."""
        if tuple(data.shape[:3]) != self.shape:
            raise UserError(f"array of shape {tuple(data.shape)} does not match the volume grid {self.shape}")
        return Volume(
            data=data,
            affine=self.affine.copy(),
            header=self.header,
            original_affine=self.original_affine.copy(),
            original_shape=self.original_shape,
            ornt=self.ornt.copy(),
            is_label=self.is_label if is_label is None else is_label,
            path=self.path,
            name=self.name if name is None else name,
        )


# --------------------------------------------------------------------------------------------- helpers


def _display(path: str | os.PathLike) -> str:
    return Path(path).name or str(path)


def _oneline(exc: BaseException) -> str:
    """An exception's message on one line (nibabel's messages can span several)."""
    return " ".join(str(exc).split())


def _strip_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return any(path.name.lower().endswith(s) for s in suffixes)


def _atomic_write(path: Path, suffix: str, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (same suffix), then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _prepare_output(path: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...]) -> tuple[Path, str]:
    path = Path(path)
    if not _has_suffix(path, suffixes):
        raise UserError(f"output file {path.name!r} must end with one of {', '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists (choose another name or allow overwriting)")
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist")
    suffix = next(s for s in sorted(suffixes, key=len, reverse=True) if path.name.lower().endswith(s))
    return path, suffix


def _integer_valued(data: np.ndarray) -> bool:
    if data.dtype.kind in "biu":
        return True
    if data.dtype.kind != "f":
        return False
    # Cheap rejection on a strided sample before the full pass.
    sample = data.reshape(-1)[:: max(1, data.size // 20000)]
    if not np.all(np.isfinite(sample)) or not np.array_equal(sample, np.round(sample)):
        return False
    return bool(np.all(np.isfinite(data)) and np.array_equal(data, np.round(data)))


def _count_unique(data: np.ndarray, limit: int) -> int:
    """Distinct values of integer-valued ``data`` (bincount for small ranges); ``limit + 1`` once above ``limit``."""
    if data.dtype.kind in "biuf":
        lo, hi = float(data.min()), float(data.max())
        if hi - lo < 4_000_000:
            counts = np.bincount((data.reshape(-1) - lo).astype(np.int64))
            return int(np.count_nonzero(counts))
    sample = np.unique(data.reshape(-1)[:: max(1, data.size // 200000)])
    if len(sample) > limit:
        return limit + 1
    return len(np.unique(data))


def _equal_neighbour_fraction(data: np.ndarray) -> float:
    """Fraction of axis-neighbour pairs of non-zero voxels holding the same value (1 for a label map's inside).

    Pairs touching the background are left out: the brain outline would dominate in small volumes.
    """
    total = equal = 0
    for axis in range(data.ndim):
        a = np.moveaxis(data, axis, 0)
        x, y = a[1:], a[:-1]
        fg = (x != 0) & (y != 0)
        total += int(fg.sum())
        equal += int(((x == y) & fg).sum())
    return equal / total if total else 1.0


def looks_like_labels(data: np.ndarray) -> bool:
    """True when ``data`` looks like a label map rather than an image.

    Integer dtype or integer-valued data, at most 1000 distinct values, and piecewise constant (most neighbouring
    voxel pairs inside the foreground are equal; brain images, even uint8 ones, are not).
    """
    data = np.asarray(data)
    if data.dtype == bool:
        return True
    if not _integer_valued(data):
        return False
    if _count_unique(data, MAX_LABELS) > MAX_LABELS:
        return False
    return _equal_neighbour_fraction(data) >= LABEL_EQUAL_NEIGHBOURS


def _label_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype.kind in "biu" and data.dtype != bool:
        return data.dtype
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


# --------------------------------------------------------------------------------------------- volumes


def volume_from_array(
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    kind: str = "auto",
    name: str = "volume",
    header: nib.Nifti1Header | None = None,
    path: str | os.PathLike | None = None,
) -> Volume:
    """Check an array (any voxel order, ``affine`` = its voxel -> RAS mm matrix) and make a canonical Volume.

    Applies exactly the checks of :func:`load_volume` (``name`` is used in the messages).
    """
    if kind not in ("auto", "image", "label"):
        raise ValueError(f"kind must be 'auto', 'image' or 'label', not {kind!r}")
    data = np.asanyarray(data)
    original_shape = tuple(int(s) for s in data.shape)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise UserError(f"{name}: invalid affine (must be a finite 4x4 matrix)")

    # Shape: exactly 3 spatial dimensions; trailing singleton dimensions (X×Y×Z×1) are accepted.
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        if data.ndim == 4:  # a one-volume 4D series is common (fMRI tools, converters): accept it, but say so
            warnings.warn(f"{name}: 4D file with one volume, used as 3D", stacklevel=2)
        data = data.reshape(data.shape[:3])
    if data.ndim < 3:
        raise UserError(f"{name} is {data.ndim}D (shape {original_shape}); a 3D volume is needed")
    if data.ndim > 3:
        raise UserError(
            f"{name} is {data.ndim}D (shape {original_shape}): give one 3D volume, not a series or a vector field"
        )
    if data.size == 0 or min(data.shape) < 2:
        raise UserError(f"{name} is empty or flat (shape {original_shape}); a 3D volume is needed")
    if data.dtype.kind == "c" or data.dtype.kind not in "biuf":
        raise UserError(f"{name} has unsupported data type {data.dtype}")
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise UserError(f"{name}: degenerate affine (voxel axes are not independent)")

    if data.dtype.kind == "f":
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        if n_nan or n_inf:
            raise UserError(
                f"{name} contains {n_nan} NaN and {n_inf} infinite voxels; replace them (e.g. with 0) and try again"
            )

    lo, hi = data.min(), data.max()
    if hi == lo:
        what = "empty (every voxel is 0)" if hi == 0 else f"constant (every voxel is {float(hi):g})"
        raise UserError(f"{name} is {what}")

    label_like = looks_like_labels(data)
    if kind == "image" and label_like:
        raise UserError(
            f"{name} looks like a label map (integer values, {_count_unique(data, MAX_LABELS)} distinct), "
            "not an image: load it as a segmentation"
        )
    if kind == "label" and not label_like:
        if not _integer_valued(data):
            raise UserError(f"{name} has non-integer values: it looks like an image, not a label map")
        n = _count_unique(data, MAX_LABELS)
        if n > MAX_LABELS:
            raise UserError(f"{name} has more than {MAX_LABELS} distinct values: it looks like an image, not labels")
        # Integer valued, few values but not piecewise constant: accept (it was asked for) but say so.
        warnings.warn(f"{name}: loaded as a label map although it does not look piecewise constant", stacklevel=2)
    is_label = kind == "label" or (kind == "auto" and label_like)

    ornt = io_orientation(affine)
    if np.any(np.isnan(ornt)):
        raise UserError(f"{name}: cannot determine the orientation of the affine")
    canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    data = apply_orientation(data, ornt)
    if is_label:
        data = np.ascontiguousarray(data, dtype=_label_dtype(data))
    else:
        data = np.ascontiguousarray(data, dtype=np.float32)
    return Volume(
        data=data,
        affine=canon_affine,
        header=header,
        original_affine=affine.copy(),
        original_shape=original_shape,
        ornt=ornt,
        is_label=is_label,
        path=None if path is None else Path(path),
        name=name,
    )


def load_volume(path: str | os.PathLike, kind: str = "auto") -> Volume:
    """Read a 3D NIfTI (``.nii``/``.nii.gz``; FreeSurfer ``.mgz``/``.mgh`` too) into canonical RAS order.

    ``kind``: ``'image'`` (float32 intensities), ``'label'`` (integer label map) or ``'auto'`` (decided by
    :func:`looks_like_labels`). Raises :class:`UserError` for a missing/unreadable/corrupt file, a 2D or 4D
    volume (a trailing singleton 4th dimension is fine), an empty or constant image, NaN/Inf values, or a label
    map given as an image and vice versa. Values are not modified (no NaN replacement, no normalisation).
    """
    path = Path(path)
    label = _display(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a NIfTI file")
    if not _has_suffix(path, READ_SUFFIXES):
        raise UserError(f"{label} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise UserError(f"{label} is not a valid NIfTI file ({_oneline(exc)})") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise UserError(f"{label} cannot be read: corrupt or not a NIfTI file ({_oneline(exc)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.MGHImage):
        raise UserError(f"{label} is not a NIfTI file ({type(img).__name__})")
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, MemoryError) as exc:
        msg = f"{label}: the image data cannot be read (truncated or corrupt file: {_oneline(exc)})"
        raise UserError(msg) from None
    header = img.header.copy() if isinstance(img, nib.Nifti1Image | nib.Nifti2Image) else None
    vol = volume_from_array(data, img.affine, kind=kind, name=label, header=header, path=path)
    vol.name = _strip_suffix(path.name)
    return vol


def to_original_orientation(array_ras: np.ndarray, like: Volume) -> np.ndarray:
    """Reorder an array on ``like``'s canonical grid (``X×Y×Z[×...]``) back to the voxel order of the file."""
    array_ras = np.asanyarray(array_ras)
    if tuple(array_ras.shape[:3]) != like.shape:
        raise UserError(f"array of shape {tuple(array_ras.shape)} does not match the grid of {like.name} {like.shape}")
    back = ornt_transform(_RAS, like.ornt)
    return apply_orientation(array_ras, back)


def _canonical_to_original_voxels(like: Volume) -> np.ndarray:
    """4×4 matrix: canonical voxel index -> stored voxel index (a signed permutation plus offset)."""
    return np.linalg.inv(like.original_affine) @ like.affine


def disp_to_original_orientation(disp_3xyz: np.ndarray, like: Volume) -> np.ndarray:
    """A voxel-unit displacement ``3×X×Y×Z`` on ``like``'s canonical grid, reordered to the stored voxel order.

    Both the spatial axes and the components are permuted/flipped (component ``i`` of the result is along the
    stored array axis ``i``). For a RAS-stored file this is ``disp_3xyz`` itself (no copy): do not modify it.
    """
    disp = np.asarray(disp_3xyz)
    p = np.round(_canonical_to_original_voxels(like)[:3, :3])
    # a signed permutation: each component is ±1·x + 0·y + 0·z, exact in the field's own (float32) precision, so
    # no float64 copy of a large field is made
    if np.array_equal(p, np.eye(3)):
        comps = disp  # components already along the stored axes (a RAS-stored file): no copy at all
    else:
        comps = np.einsum("ij,j...->i...", p.astype(disp.dtype) if disp.dtype.kind == "f" else p, disp)
    moved = to_original_orientation(np.moveaxis(comps, 0, -1), like)
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0), dtype=disp.dtype)


def _save_nifti(img, path: Path) -> None:
    """``nib.save(img, path)``; a ``.gz`` file is compressed by ISA-L (``isal``, optional) when installed: the same
    gzip format and level 1 ratio, ~15× faster than zlib (the decompressed bytes are those nibabel writes)."""
    try:
        from isal import igzip
    except ImportError:
        igzip = None
    if igzip is None or not str(path).endswith(".gz"):
        nib.save(img, str(path))
        return
    with igzip.open(str(path), "wb", compresslevel=1) as fh:
        img.to_file_map({"image": nib.FileHolder(fileobj=fh)})


def save_volume(
    array_ras: np.ndarray,
    like: Volume,
    path: str | os.PathLike,
    dtype: np.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an array on ``like``'s canonical grid as NIfTI in the original voxel order, header and affine.

    The original qform/sform (codes included) are kept. ``dtype`` defaults to the array's dtype (bool -> uint8,
    float64 -> float32). Refuses to overwrite unless ``overwrite=True``; the write is atomic. Returns the path.
    """
    path, _suffix = _prepare_output(path, overwrite, NIFTI_SUFFIXES)
    data = to_original_orientation(array_ras, like)
    if dtype is None:
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32}.get(data.dtype, data.dtype)
    dtype = np.dtype(dtype)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    header = like.header.copy() if isinstance(like.header, nib.Nifti1Header) else None
    if isinstance(like.header, nib.Nifti2Header):
        img = nib.Nifti2Image(data, like.original_affine, header=header)
    else:
        img = nib.Nifti1Image(data, like.original_affine, header=header)
    if header is None:  # MGH input or array without header: write a clean scanner-space header
        img.header.set_qform(like.original_affine, code=1)
        img.header.set_sform(like.original_affine, code=1)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(None, None)  # the input's scaling would mis-scale another array
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    if img.header["dim"][0] > 3 and data.ndim == 3:
        img.header["dim"][0] = 3
    _atomic_write(path, _suffix, lambda tmp: _save_nifti(img, tmp))
    return path


# --------------------------------------------------------------------------------------------- displacements


def _check_disp(disp: np.ndarray) -> np.ndarray:
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise UserError(f"a displacement field must be 3×X×Y×Z, got shape {tuple(disp.shape)}")
    return disp


def save_disp_submission(disp_3xyz: np.ndarray, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a displacement as a Learn2Reg submission file: ``.npz`` holding one ``3×X×Y×Z`` float16 array
    (``np.savez(path, disp)``, key ``arr_0``; voxel units, pull, channel = array axis), what the Learn2Reg
    evaluation reads with ``np.load(f)['arr_0'].astype('float32')``. float16 keeps ~3 significant digits
    (0.01 voxel at 20 voxels) at half the size; NIfTI-1 has no float16 type, so the NIfTI files stay float32."""
    disp = _check_disp(disp_3xyz)
    path, suffix = _prepare_output(path, overwrite, (".npz",))
    data = np.asarray(disp, dtype=np.float16)
    _atomic_write(path, suffix, lambda tmp: np.savez(tmp, data))
    return path


def save_disp_l2r(disp_3xyz: np.ndarray, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a Learn2Reg displacement file: ``X×Y×Z×3`` float32, voxel units, pull, channel = array axis.

    ``.nii``/``.nii.gz`` (``Nifti1Image(data, eye(4))``, pixdim 1 as in the Learn2Reg evaluator) or ``.npz``
    (array ``disp``, channel-last too). Atomic, refuses to overwrite unless asked.
    """
    disp = _check_disp(disp_3xyz)
    path, suffix = _prepare_output(path, overwrite, (*NIFTI_SUFFIXES, ".npz"))
    # a channel-last view, no copy: nibabel writes it one component at a time (Fortran order: the bytes are the
    # same as those of a contiguous copy), which spares a second field in memory
    data = np.moveaxis(disp.astype(np.float32, copy=False), 0, -1)
    if suffix == ".npz":
        _atomic_write(path, suffix, lambda tmp: np.savez_compressed(tmp, disp=data))
    else:
        img = nib.Nifti1Image(data, np.eye(4))
        _atomic_write(path, suffix, lambda tmp: _save_nifti(img, tmp))
    return path


def load_disp_l2r(path: str | os.PathLike) -> np.ndarray:
    """Read a Learn2Reg displacement (``X×Y×Z×3``, ``3×X×Y×Z``, ``X×Y×Z×1×3``; NIfTI, ``.npz`` or ``.npy``).

    Returns ``3×X×Y×Z`` float32 in voxel units (pull, channel = array axis), values unchanged. A channel-last
    layout wins when both the first and the last axis have length 3 (the Learn2Reg file convention).
    """
    path = Path(path)
    label = _display(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        if _has_suffix(path, (".npz",)):
            with np.load(path) as z:
                keys = [k for k in ("disp", "flow", "arr_0") if k in z.files] or list(z.files)
                if not keys:
                    raise UserError(f"{label} holds no array")
                data = np.asarray(z[keys[0]])
        elif _has_suffix(path, (".npy",)):
            data = np.load(path)
        elif _has_suffix(path, NIFTI_SUFFIXES):
            data = np.asanyarray(nib.load(str(path)).dataobj)
        else:
            raise UserError(f"{label}: a displacement must be .nii, .nii.gz, .npz or .npy")
    except UserError:
        raise
    except Exception as exc:  # corrupt archive, truncated gzip, pickled npy, ...
        raise UserError(f"{label} cannot be read as a displacement field ({_oneline(exc)})") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 5 and data.shape[0] == 1:  # B×3×X×Y×Z with B = 1
        data = data[0]
    if data.ndim != 4 or 3 not in (data.shape[0], data.shape[-1]):
        raise UserError(f"{label}: expected a X×Y×Z×3 or 3×X×Y×Z displacement field, got shape {data.shape}")
    if data.shape[-1] == 3:
        data = np.moveaxis(data, -1, 0)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise UserError(f"{label}: the displacement field contains NaN or infinite values")
    return data


def save_disp_itk(
    disp_3xyz: np.ndarray, affine: np.ndarray, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write an ITK/ANTs displacement field for the grid ``affine`` (voxel -> RAS mm, any orientation).

    ``disp_3xyz`` is in voxel units of that grid (channel = array axis, pull). The file holds, at each voxel ``p``
    with physical point ``x = affine·p``, the vector ``d = LPS(affine[:3,:3]·u(p))`` in millimetres, so that
    ``x + d`` is the moving physical point (ITK's pull convention). Layout ``X×Y×Z×1×3`` float32, intent vector,
    qform = sform = ``affine`` (code 1).
    """
    disp = _check_disp(disp_3xyz)
    affine = np.asarray(affine, dtype=np.float64)
    path, suffix = _prepare_output(path, overwrite, NIFTI_SUFFIXES)
    to_lps_mm = _LPS @ affine[:3, :3]
    # float64 products, converted slab by slab along axis 0: a 0.5 mm field would need GBs of float64 at once
    world = np.empty((*disp.shape[1:], 3), dtype=np.float32)
    step = max(1, 2_000_000 // max(1, int(np.prod(disp.shape[2:]))))
    for s in range(0, disp.shape[1], step):
        world[s : s + step] = np.einsum("ij,j...->...i", to_lps_mm, disp[:, s : s + step].astype(np.float64))
    img = nib.Nifti1Image(world[:, :, :, None, :], affine)
    img.header.set_intent("vector", (), name="displacement")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    _atomic_write(path, suffix, lambda tmp: _save_nifti(img, tmp))
    return path


def load_disp_itk(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field (``X×Y×Z×1×3`` or ``X×Y×Z×3``, LPS mm, pull).

    Returns ``(disp, affine)``: ``disp`` is ``3×X×Y×Z`` float32 in voxel units of the file's own grid (its stored
    voxel order, channel = array axis) and ``affine`` that grid's voxel -> RAS mm matrix.
    """
    path = Path(path)
    label = _display(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise UserError(f"{label} cannot be read as an ITK displacement field ({_oneline(exc)})") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise UserError(f"{label}: expected an ITK displacement field X×Y×Z×1×3, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    to_vox = np.linalg.inv(_LPS @ affine[:3, :3])
    disp = np.einsum("ij,...j->i...", to_vox, data.astype(np.float64)).astype(np.float32)
    if not np.all(np.isfinite(disp)):
        raise UserError(f"{label}: the displacement field contains NaN or infinite values")
    return np.ascontiguousarray(disp), affine


# --------------------------------------------------------------------------------------------- label names


def _names_from_mapping(mapping: Mapping) -> dict[int, str]:
    # dataset.json style: {"labels": {"0": {"0": "background", ...}}} (one table per modality): take the first.
    if "labels" in mapping and isinstance(mapping["labels"], Mapping):
        return _names_from_mapping(mapping["labels"])
    values = list(mapping.values())
    if values and all(isinstance(v, Mapping) for v in values):
        return _names_from_mapping(values[0])
    out: dict[int, str] = {}
    for key, value in mapping.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(value, Mapping):  # {"1": {"name": "..."}}
            value = value.get("name", value.get("label", ""))
        out[idx] = str(value)
    return out


def labels_names(path_or_dict: str | os.PathLike | Mapping) -> dict[int, str]:
    """Label id -> name from a label table.

    Accepts a mapping, a JSON file (``label_table.json`` ``{"labels": {...}}``, a Learn2Reg ``dataset.json``
    ``{"labels": {"0": {...}}}`` or a plain ``{"1": "name"}``), or a text lookup table with lines
    ``id name [r g b a]`` (FreeSurferColorLUT style; ``#`` comments).
    """
    if isinstance(path_or_dict, Mapping):
        return dict(sorted(_names_from_mapping(path_or_dict).items()))
    path = Path(path_or_dict)
    if not path.exists():
        raise UserError(f"label table not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path.name} is not valid JSON ({exc})") from None
        if not isinstance(table, Mapping):
            raise UserError(f"{path.name}: expected a JSON object of label names")
        names = _names_from_mapping(table)
    else:
        names = {}
        for line in text.splitlines():
            parts = line.split("#", 1)[0].replace(",", " ").split()
            if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
                names[int(parts[0])] = parts[1]
    if not names:
        raise UserError(f"{path.name}: no label names found")
    return dict(sorted(names.items()))
