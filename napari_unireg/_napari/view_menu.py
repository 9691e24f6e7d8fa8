"""Layers > Visualize menu commands: the axial plane in either left-right convention (the plugin-wide setting).

No ``from __future__ import annotations`` here: npe2 injects the viewer by the parameter's real type.
"""

import napari

from . import anatomical


def axial_radiological(viewer: napari.viewer.Viewer) -> None:
    """Axial plane, anterior up, the patient's right on the screen's left (radiological)."""
    anatomical.set_radiological(True)
    anatomical.show_plane(viewer, 2, True)


def axial_neurological(viewer: napari.viewer.Viewer) -> None:
    """Axial plane, anterior up, the patient's right on the screen's right (neurological)."""
    anatomical.set_radiological(False)
    anatomical.show_plane(viewer, 2, False)
