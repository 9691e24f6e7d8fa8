"""NIfTI reader: images as image layers, integer label maps as labels layers, in RAS world millimetres.

Each layer holds the canonical RAS array (``nibabel.as_closest_canonical`` order) with ``affine`` = the
canonical voxel→RAS matrix, so napari's world coordinates are RAS mm whatever the file's orientation (LAS, LPS,
LIA, ...), spacing honoured. ``metadata["nifti"]`` keeps the original affine, orientation and header for the
writers; label names found next to a label map (``label_table.json`` / ``dataset.json`` in its folder or the
folder above) go to ``metadata["label_names"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".nii", ".nii.gz")
LABEL_TABLES = ("label_table.json", "dataset.json")


def _is_nifti(path: Any) -> bool:
    return isinstance(path, str | Path) and str(path).lower().endswith(SUFFIXES)


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """npe2 reader contribution: a reader function for .nii/.nii.gz paths, else None."""
    paths = path if isinstance(path, list | tuple) else [path]
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    from .anatomical import orient_current_viewer

    orient_current_viewer()  # the first RAS-world layer napari adds shows the axial plane, anterior up
    return read_nifti


def _label_names_near(path: Path) -> dict[int, str]:
    from napari_unireg.io import labels_names

    for folder in (path.parent, path.parent.parent):
        for name in LABEL_TABLES:
            table = folder / name
            if table.is_file():
                try:
                    return labels_names(table)
                except Exception:  # a malformed table next to the file must not stop the image from opening
                    continue
    return {}


def volume_layer_data(vol: Any, name: str | None = None, label_names: dict[int, str] | None = None) -> tuple:
    """LayerDataTuple of a canonical :class:`~napari_unireg.io.Volume` (reader and sample data share this)."""
    from .convert import NIFTI_KEY, nifti_meta
    from .layers import display_range

    meta: dict[str, Any] = {NIFTI_KEY: nifti_meta(vol)}
    kwargs: dict[str, Any] = {"name": name or vol.name, "affine": np.asarray(vol.affine), "metadata": meta}
    if vol.is_label:
        if label_names:
            meta["label_names"] = dict(label_names)
        kwargs["opacity"] = 0.5
        return vol.data, kwargs, "labels"
    kwargs["contrast_limits"] = display_range(vol.data)
    kwargs["colormap"] = "gray"
    return vol.data, kwargs, "image"


def read_nifti(path: str | list[str]) -> list[tuple]:
    """Read one or more NIfTI files into layer data tuples (raises UserError with a one-line message)."""
    from napari_unireg.io import load_volume

    paths = path if isinstance(path, list | tuple) else [path]
    out = []
    for p in paths:
        vol = load_volume(p, kind="auto")
        names = _label_names_near(Path(p)) if vol.is_label else None
        out.append(volume_layer_data(vol, label_names=names))
    return out
