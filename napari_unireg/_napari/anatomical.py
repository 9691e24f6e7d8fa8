"""Anatomical display of the main canvas: an upright plane (axial on open), the left-right convention a setting,
and the convention written on the canvas.

This plugin's layers live in RAS millimetres whatever the file's orientation (the reader puts the canonical RAS
array under the canonical affine), so world axis 0 runs left→right, 1 posterior→anterior, 2 inferior→superior:
the layout of a plane follows from the world axes alone. Only the view changes (``dims.order`` and the 2D camera
orientation): world coordinates, hence the status bar's millimetres, are untouched.

The convention is process-wide: radiological (the patient's right on the screen's left) unless the environment
variable ``UNIREG_CONVENTION=neurological`` says otherwise; Layers > Visualize and the linked views switch it.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

PLANE_NAMES = ("Sagittal", "Coronal", "Axial")
POSITIVE = ("R", "A", "S")  # direction in which world axis i increases (RAS)
NEGATIVE = ("L", "P", "I")
CONVENTION_ENV = "UNIREG_CONVENTION"
#: metadata key the reader and the sample data put on layers whose world is RAS mm (see convert.NIFTI_KEY)
RAS_WORLD_KEY = "nifti"

#: names of the RAS world axes on napari's sliders (millimetres, x to the right, y anterior, z superior)
AXIS_LABELS = ("x", "y", "z")
#: colour of the canvas label: the side labels' yellow of the linked views (no blue: tests tell it from anatomy)
LABEL_COLOR = (1.0, 0.83, 0.0, 1.0)

_SETTING: dict[str, bool] = {}


@dataclass(frozen=True)
class PlaneLayout:
    """How one plane is shown: napari ``dims.order``, ``camera.orientation2d`` and the four side labels."""

    axis: int
    order: tuple[int, int, int]
    orientation2d: tuple[str, str]
    top: str
    bottom: str
    left: str
    right: str

    @property
    def name(self) -> str:
        return PLANE_NAMES[self.axis]


def plane_layout(axis: int, radiological: bool = True) -> PlaneLayout:
    """Layout of the plane across world axis ``axis`` (0 sagittal, 1 coronal, 2 axial).

    Superior (sagittal, coronal) or anterior (axial) is up. The patient's right is on the screen's left in the
    radiological convention (the paper's figures), on the right in the neurological one. Sagittal views show
    anterior on the left in both.
    """
    vertical = 1 if axis == 2 else 2
    horizontal = 1 if axis == 0 else 0
    order = (axis, vertical, horizontal)
    # 'left' = the horizontal axis increases to the left of the screen
    h_dir = "left" if (horizontal == 1 or radiological) else "right"
    pos_h, neg_h = POSITIVE[horizontal], NEGATIVE[horizontal]
    left, right = (pos_h, neg_h) if h_dir == "left" else (neg_h, pos_h)
    return PlaneLayout(
        axis=axis,
        order=order,
        orientation2d=("up", h_dir),
        top=POSITIVE[vertical],
        bottom=NEGATIVE[vertical],
        left=left,
        right=right,
    )


def radiological() -> bool:
    """The left-right convention in force (the environment's default until a call to :func:`set_radiological`)."""
    if "radiological" not in _SETTING:
        _SETTING["radiological"] = os.environ.get(CONVENTION_ENV, "radiological").strip().lower() != "neurological"
    return _SETTING["radiological"]


def convention_name(radiological_: bool) -> str:
    return "radiological" if radiological_ else "neurological"


def camera_of(model: Any) -> Any:
    """napari 0.9 moved the camera to ``viewer.scene.camera`` (``viewer.camera`` is deprecated there)."""
    scene = getattr(model, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else model.camera


def describe_view(order: tuple[int, ...], orientation2d: tuple[str, str], ndisplay: int = 2) -> str:
    """What the screen shows, e.g. ``"Axial · radiological: R on the left, A up"`` (empty in 3D).

    ``order``: napari ``dims.order`` over the three RAS world axes; ``orientation2d``: the camera's
    ``(vertical, horizontal)`` directions of increasing displayed coordinates.
    """
    if ndisplay != 2 or len(order) < 3:
        return ""
    axis, vert, hor = (int(a) for a in order[-3:])
    vdir, hdir = (str(getattr(o, "value", o)) for o in orientation2d)
    top = POSITIVE[vert] if vdir == "up" else NEGATIVE[vert]
    left = POSITIVE[hor] if hdir == "left" else NEGATIVE[hor]
    text = f"{PLANE_NAMES[axis]}"
    if hor == 0:  # the screen's horizontal is left-right: say which convention this is
        text += f" · {convention_name(left == 'R')}"
    return f"{text}: {left} on the left, {top} up"


def has_ras_world(viewer: Any) -> bool:
    """Whether the viewer holds layers of this plugin (reader, sample data, results): its world is RAS mm."""
    return any(RAS_WORLD_KEY in (getattr(lay, "metadata", None) or {}) for lay in viewer.layers)


def text_overlay(viewer: Any) -> Any:
    """The canvas text overlay (``viewer.canvas.overlays.text`` since napari 0.9, ``viewer.text_overlay`` before)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "text"):
        return overlays.text
    return viewer.text_overlay


def update_label(viewer: Any, event: Any = None) -> str:
    """Write the current plane and convention on the canvas (top left); hidden when the world is not RAS."""
    overlay = text_overlay(viewer)
    text = ""
    if viewer.dims.ndim == 3 and has_ras_world(viewer):
        text = describe_view(tuple(viewer.dims.order), tuple(camera_of(viewer).orientation2d), viewer.dims.ndisplay)
    overlay.text = text
    overlay.color = LABEL_COLOR
    overlay.position = "top_left"  # napari's notifications pop up bottom right
    overlay.visible = bool(text)
    return text


def show_plane(viewer: Any, axis: int = 2, radiological_: bool | None = None) -> PlaneLayout:
    """Show the plane across world ``axis`` upright in the 2D canvas (axial: anterior up), framed."""
    lay = plane_layout(axis, radiological() if radiological_ is None else radiological_)
    viewer.dims.ndisplay = 2
    viewer.dims.order = lay.order
    if all(str(a).lstrip("-").isdigit() for a in viewer.dims.axis_labels):
        viewer.dims.axis_labels = AXIS_LABELS  # the slider says "z", not napari's "-1"
    camera_of(viewer).orientation2d = lay.orientation2d
    viewer.reset_view()
    _watch(viewer)
    update_label(viewer)
    return lay


def current_plane(viewer: Any) -> int | None:
    """The world axis across the main canvas when it shows one of the three upright planes, else None."""
    if viewer.dims.ndim != 3 or viewer.dims.ndisplay != 2:
        return None
    order = tuple(int(a) for a in viewer.dims.order)
    for axis in range(3):
        if order == plane_layout(axis).order:
            return axis
    return None


_VIEWERS: weakref.WeakSet = weakref.WeakSet()


def set_radiological(on: bool) -> None:
    """Switch the convention for every viewer; those showing an upright plane are re-oriented at once."""
    _SETTING["radiological"] = bool(on)
    for viewer in list(_VIEWERS):
        axis = current_plane(viewer)
        if axis is not None:
            camera_of(viewer).orientation2d = plane_layout(axis, bool(on)).orientation2d
        update_label(viewer)


def _watch(viewer: Any) -> None:
    """Keep the canvas label true when the user rolls the axes, flips the camera or goes 3D (once per viewer)."""
    if viewer in _VIEWERS:
        return
    _VIEWERS.add(viewer)
    ref = weakref.ref(viewer)

    def on_change(event: Any = None) -> None:
        v = ref()
        if v is not None:
            update_label(v)

    viewer.dims.events.order.connect(on_change)
    viewer.dims.events.ndisplay.connect(on_change)
    camera_of(viewer).events.orientation.connect(on_change)


def orient_when_opened(viewer: Any) -> None:
    """Show the axial plane once the first RAS-world layer arrives in ``viewer`` (installed once per viewer).

    The reader and the sample data call this before napari adds their layers. The view is set only for the first
    such layer, so a user's later choice of plane is kept when more files are opened.
    """
    if viewer is None or getattr(viewer, "_unireg_orient_hook", False):
        return
    viewer._unireg_orient_hook = True
    ref = weakref.ref(viewer)
    state = {"done": has_ras_world(viewer)}

    def on_inserted(event: Any) -> None:
        v = ref()
        layer = getattr(event, "value", None)
        if v is None or state["done"] or RAS_WORLD_KEY not in (getattr(layer, "metadata", None) or {}):
            return
        if v.dims.ndim == 3 and getattr(layer, "ndim", 0) == 3:
            state["done"] = True
            show_plane(v, 2)

    viewer.layers.events.inserted.connect(on_inserted)


def orient_current_viewer() -> None:
    """:func:`orient_when_opened` on napari's current viewer, if there is one (reader and sample data)."""
    try:
        from napari import current_viewer

        viewer = current_viewer()
    except Exception:  # no Qt application (e.g. the reader used from a script): nothing to orient
        return
    if viewer is not None:
        orient_when_opened(viewer)
