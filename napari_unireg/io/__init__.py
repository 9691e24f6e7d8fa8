"""Files at the edge: NIfTI volumes (:mod:`.nifti`: the canonical RAS :class:`Volume`, label maps, Learn2Reg and
ITK displacement files) and the demo pair (:mod:`.demo`, :mod:`.demo_data`). Nothing below this package reads or
writes files."""

from .nifti import (
    MAX_LABELS,
    NIFTI_SUFFIXES,
    READ_SUFFIXES,
    Volume,
    disp_to_original_orientation,
    labels_names,
    load_disp_itk,
    load_disp_l2r,
    load_volume,
    looks_like_labels,
    save_disp_itk,
    save_disp_l2r,
    save_disp_submission,
    save_volume,
    to_original_orientation,
    volume_from_array,
)

__all__ = [
    "MAX_LABELS",
    "NIFTI_SUFFIXES",
    "READ_SUFFIXES",
    "Volume",
    "disp_to_original_orientation",
    "labels_names",
    "load_disp_itk",
    "load_disp_l2r",
    "load_volume",
    "looks_like_labels",
    "save_disp_itk",
    "save_disp_l2r",
    "save_disp_submission",
    "save_volume",
    "to_original_orientation",
    "volume_from_array",
]
