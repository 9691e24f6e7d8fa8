"""napari layers <-> :class:`napari_unireg.io.Volume` (no napari import: works on any object with the layer
attributes, so it is testable with plain data).

World coordinates of this plugin's layers are RAS millimetres: a layer's full data→world matrix is taken as the
voxel→RAS affine of its data. Layers opened by the reader carry the file's geometry and header in
``metadata["nifti"]`` so that writers restore the original voxel order and header.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_unireg.io import Volume, volume_from_array

#: metadata key holding the file geometry of a layer (set by the reader and copied onto result layers).
NIFTI_KEY = "nifti"


def nifti_meta(vol: Volume) -> dict[str, Any]:
    """What a writer needs to save an array like ``vol`` (everything but the data)."""
    return {
        "affine": np.asarray(vol.affine, dtype=np.float64),
        "original_affine": np.asarray(vol.original_affine, dtype=np.float64),
        "original_shape": tuple(vol.original_shape),
        "ornt": np.asarray(vol.ornt),
        "header": vol.header,
        "path": None if vol.path is None else str(vol.path),
        "orientation": vol.orientation,
        "shape": vol.shape,
    }


def like_from_meta(meta: dict[str, Any], data: np.ndarray) -> Volume:
    """A Volume on the grid described by ``nifti_meta`` holding ``data`` (canonical order)."""
    return Volume(
        data=data,
        affine=np.asarray(meta["affine"], dtype=np.float64),
        header=meta.get("header"),
        original_affine=np.asarray(meta["original_affine"], dtype=np.float64),
        original_shape=tuple(meta["original_shape"]),
        ornt=np.asarray(meta["ornt"]),
    )


def transform_matrix(scale=None, translate=None, rotate=None, shear=None, affine=None, ndim: int = 3) -> np.ndarray:
    """napari's data→world matrix ``affine · (translate, rotate, shear, scale)`` for the last ``ndim`` axes."""
    from napari.utils.transforms import Affine, CompositeAffine

    comp = CompositeAffine(
        scale=scale if scale is not None else np.ones(ndim),
        translate=translate if translate is not None else np.zeros(ndim),
        rotate=rotate,
        shear=shear,
        ndim=ndim,
    ).affine_matrix
    aff = np.eye(ndim + 1) if affine is None else np.asarray(affine, dtype=np.float64)
    if isinstance(affine, Affine):
        aff = affine.affine_matrix
    m = aff @ comp
    return m[-4:, -4:] if m.shape[0] > 4 else m


def layer_affine(layer: Any) -> np.ndarray:
    """4×4 data→world matrix of a 3D napari layer (the world is taken as RAS mm)."""
    return transform_matrix(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, affine=layer.affine,
        ndim=layer.ndim,
    )


def attributes_affine(attributes: dict[str, Any], ndim: int) -> np.ndarray:
    """The same matrix from a writer's ``attributes`` dict (napari layer state)."""
    return transform_matrix(
        scale=attributes.get("scale"),
        translate=attributes.get("translate"),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        affine=attributes.get("affine"),
        ndim=ndim,
    )


def layer_to_volume(layer: Any, kind: str = "auto") -> Volume:
    """Engine input from a layer (no copy when the data already is canonical float32/integer).

    Raises ``UserError`` (via :func:`napari_unireg.io.volume_from_array`) for data that is not one 3D volume.
    """
    from napari_unireg.errors import UserError

    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    data = np.asarray(data)
    if data.ndim != 3:
        raise UserError(f"layer {layer.name!r} is {data.ndim}D (shape {data.shape}); a 3D volume is needed")
    if getattr(layer, "rgb", False):
        raise UserError(f"layer {layer.name!r} is an RGB image; a grey-level 3D volume is needed")
    vol = volume_from_array(data, layer_affine(layer), kind=kind, name=layer.name)
    meta = (getattr(layer, "metadata", None) or {}).get(NIFTI_KEY)
    if meta is not None and tuple(meta.get("shape", ())) == vol.shape:
        # keep the file's header and orientation: outputs written "like" this volume restore them
        vol.header = meta.get("header")
        vol.original_affine = np.asarray(meta["original_affine"], dtype=np.float64)
        vol.original_shape = tuple(meta["original_shape"])
        vol.ornt = np.asarray(meta["ornt"])
        if meta.get("path"):
            from pathlib import Path

            vol.path = Path(meta["path"])
    return vol
