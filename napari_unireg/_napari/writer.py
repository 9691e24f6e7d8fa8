"""NIfTI writers: image/labels layers with the original header and voxel order, and displacement fields.

* ``write_image`` / ``write_labels``: a layer opened by the reader (or a result layer, which carries the fixed
  image's file geometry) is written in the file's own voxel order with its header (``io.save_volume``); any other
  3D layer is written as is with its data→world matrix as the NIfTI affine.
* ``write_disp_l2r`` / ``write_disp_itk``: the displacement field held by a run's ``warped`` or ``|u| mm``
  layer (``metadata["unireg"]["displacement"]``), in the Learn2Reg convention (``X×Y×Z×3`` voxel units on the
  fixed canonical grid) or the ITK/ANTs one (``X×Y×Z×1×3`` LPS mm, fixed grid's affine).

napari asks before overwriting in its Save dialog, so these write with ``overwrite=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_unireg.errors import UserError


def _nifti_path(path: str) -> str:
    low = path.lower()
    return path if low.endswith((".nii", ".nii.gz")) else path + ".nii.gz"


def _label_array(arr: np.ndarray) -> np.ndarray:
    """Keep a small integer dtype (napari paints in int32/int64; NIfTI readers prefer uint8/int16)."""
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return arr.astype(dt, copy=False)
    return arr.astype(np.int64, copy=False)


def _write_volume(path: str, data: Any, attributes: dict[str, Any], is_label: bool) -> list[str]:
    from napari_unireg.io import Volume, save_volume

    from .convert import NIFTI_KEY, attributes_affine, like_from_meta

    arr = np.asarray(data)
    if arr.ndim != 3:
        raise UserError(f"only 3D layers can be written as NIfTI (this one is {arr.ndim}D)")
    if is_label:
        arr = _label_array(arr)
    path = _nifti_path(path)
    meta = (attributes.get("metadata") or {}).get(NIFTI_KEY)
    if meta is not None and tuple(meta.get("shape", ())) == arr.shape:
        like = like_from_meta(meta, arr)
    else:
        like = Volume(data=arr, affine=attributes_affine(attributes, 3))
    out = save_volume(arr, like, path, overwrite=True)
    return [str(out)]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for image layers."""
    return _write_volume(path, data, attributes, is_label=False)


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for labels layers (integer NIfTI)."""
    return _write_volume(path, data, attributes, is_label=True)


def _displacement(attributes: dict[str, Any]) -> dict[str, Any]:
    meta = (attributes.get("metadata") or {}).get("unireg") or {}
    disp = meta.get("displacement")
    if not disp:
        raise UserError(
            "this layer holds no displacement field: select the 'warped […]' or '|u| mm […]' layer of a run"
        )
    return disp


def write_disp_l2r(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Learn2Reg displacement (``X×Y×Z×3`` float32, voxel units, pull, fixed canonical grid)."""
    from napari_unireg.io import save_disp_l2r

    disp = _displacement(attributes)
    low = path.lower()
    if not low.endswith((".nii", ".nii.gz", ".npz")):
        path += ".nii.gz"
    return [str(save_disp_l2r(disp["disp"], path, overwrite=True))]


def write_disp_itk(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """ITK/ANTs displacement (``X×Y×Z×1×3`` float32 vector NIfTI, LPS mm, pull, fixed grid affine)."""
    from napari_unireg.io import save_disp_itk

    disp = _displacement(attributes)
    return [str(save_disp_itk(disp["disp"], disp["affine"], _nifti_path(path), overwrite=True))]
