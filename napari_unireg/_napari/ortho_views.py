"""Linked sagittal / coronal / axial views of the same point, on napari's public API.

Three extra ``ViewerModel`` + ``QtViewer`` pairs live in one dock widget. Each holds *mirror* layers of the main
viewer's 3D image and labels layers (same data arrays, no copy; display properties kept in sync), shows the
plane across its own world axis with ``dims.order`` permuted and the camera flipped so that anatomy is upright,
draws a crosshair at the shared point and labels its four sides with R/L, A/P, S/I.

Since this plugin's layers live in RAS millimetres (the reader puts the canonical RAS array under the canonical
affine), world axis 0 runs left→right, 1 posterior→anterior, 2 inferior→superior for RAS, LPS or any other file
orientation alike: the side labels come from the world axes, not from the file.

Clicking in a view (without dragging) moves the shared point there; every view's slider moves it along its
own axis; with *follow mouse* the views follow the cursor of the main viewer (and of each other).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from . import anatomical
from .anatomical import (  # noqa: F401  (re-exported: the layouts used to live here)
    NEGATIVE,
    PLANE_NAMES,
    POSITIVE,
    PlaneLayout,
    camera_of,
    plane_layout,
)

CROSSHAIR_COLOR = "#ffd400"
#: layer property names kept in sync from a main layer to its mirrors
COMMON_PROPS = ("visible", "opacity", "blending", "name", "affine", "scale", "translate", "rotate", "shear")
IMAGE_PROPS = ("colormap", "contrast_limits", "gamma", "interpolation2d")
LABELS_PROPS = ("colormap", "contour", "show_selected_label", "selected_label")


def _mirrorable(layer: Any) -> bool:
    from napari.layers import Image, Labels

    if isinstance(layer, Image):
        return layer.ndim == 3 and not layer.rgb
    return isinstance(layer, Labels) and layer.ndim == 3


def _mirror_data(layer: Any, axis: int) -> Any:
    """Data of the mirror in the view across ``axis``: the layer's own array, except for deformation grids,
    which hold one grid per slicing axis (``metadata['unireg']['per_axis']``)."""
    meta = (layer.metadata or {}).get("unireg") or {}
    per_axis = meta.get("per_axis")
    if per_axis is not None and len(per_axis) == 3:
        return per_axis[axis]
    return layer.data


def _make_mirror(layer: Any, axis: int) -> Any:
    """A layer of the same type sharing the data array (no copy) and the display state."""
    import napari.layers

    data, state, ltype = layer.as_layer_data_tuple()
    state = dict(state)
    state.pop("experimental_clipping_planes", None)
    cls = {"image": napari.layers.Image, "labels": napari.layers.Labels}[ltype]
    return cls(_mirror_data(layer, axis), **state)


class OrthoView(QWidget):
    """One plane: a ViewerModel + QtViewer with a title and the four anatomical side labels."""

    def __init__(self, axis: int, radiological: bool = True, parent: QWidget | None = None) -> None:
        from napari.components import ViewerModel
        from napari.qt import QtViewer

        super().__init__(parent)
        self.axis = axis
        self.model = ViewerModel(title=PLANE_NAMES[axis])
        self.qt_viewer = QtViewer(self.model)
        self.qt_viewer.setAcceptDrops(False)
        # no slider per view: Ctrl+scroll steps through slices, a click moves the shared point (more canvas room)
        self.qt_viewer.dims.hide()
        self.qt_viewer.setToolTip(
            "click: move the point here · Ctrl+scroll: next/previous slice · scroll: zoom · drag: pan"
        )
        self.mirrors: dict[int, Any] = {}  # id(main layer) -> mirror layer
        self.crosshair = None
        #: refit the slice to the canvas on resize until the user zooms or pans this view
        self.auto_fit = True
        self.model.mouse_wheel_callbacks.append(self._on_wheel)
        self._fit_timer = QTimer(self)
        self._fit_timer.setSingleShot(True)
        self._fit_timer.setInterval(30)
        self._fit_timer.timeout.connect(self._fit_if_alive)
        self.qt_viewer.canvas.native.installEventFilter(self)

        self.title = QLabel(PLANE_NAMES[axis])
        self.title.setStyleSheet("font-weight: bold;")
        self.position = QLabel("")
        self.position.setToolTip("Position of this plane along its axis (RAS mm)")
        self.side = {k: QLabel("") for k in ("top", "bottom", "left", "right")}
        for lab in self.side.values():
            lab.setAlignment(Qt.AlignmentFlag.AlignCenter)
            lab.setStyleSheet("font-weight: bold; color: #ffd400;")
        self.side["left"].setFixedWidth(16)
        self.side["right"].setFixedWidth(16)

        grid = QGridLayout(self)
        grid.setContentsMargins(2, 2, 2, 2)
        grid.setSpacing(1)
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addStretch(1)
        head.addWidget(self.position)
        grid.addLayout(head, 0, 0, 1, 3)
        grid.addWidget(self.side["top"], 1, 1)
        grid.addWidget(self.side["left"], 2, 0)
        grid.addWidget(self.qt_viewer, 2, 1)
        grid.addWidget(self.side["right"], 2, 2)
        grid.addWidget(self.side["bottom"], 3, 1)
        grid.setRowStretch(2, 1)
        grid.setColumnStretch(1, 1)
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.apply_layout(radiological)

    def apply_layout(self, radiological: bool = True) -> PlaneLayout:
        lay = plane_layout(self.axis, radiological)
        if self.model.dims.ndim == 3:
            self.model.dims.order = lay.order
        camera_of(self.model).orientation2d = lay.orientation2d
        for k in self.side:
            self.side[k].setText(getattr(lay, k))
        self.layout_spec = lay
        return lay

    def _on_wheel(self, model: Any, event: Any) -> None:
        if "Control" not in event.modifiers:
            self.auto_fit = False  # the user zoomed: keep their zoom on resize

    def fit(self) -> None:
        """Frame the data in this view."""
        self.model.reset_view()

    def eventFilter(self, obj: Any, ev: Any) -> bool:  # noqa: N802 (Qt name)
        # the canvas got a new size: refit once napari has taken the size in (debounced)
        if ev.type() == QEvent.Type.Resize and self.auto_fit:
            self._fit_timer.start()
        return False

    def _fit_if_alive(self) -> None:
        if self.qt_viewer is not None and self.auto_fit:
            with contextlib.suppress(RuntimeError):
                self.fit()

    def show_position(self, value: float) -> None:
        axis_name = "xyz"[self.axis]
        self.position.setText(f"{axis_name} = {value:+.1f} mm")

    def side_labels(self) -> dict[str, str]:
        """The four side labels as shown (for tests and scripts)."""
        return {k: lab.text() for k, lab in self.side.items()}

    def close_viewer(self) -> None:
        """Close the canvas and hand the QtViewer back to Python so it is freed now, not at Qt's deferred
        deletion (napari's test fixture fails on any QtViewer left alive after the viewer closes)."""
        qt_viewer, self.qt_viewer = self.qt_viewer, None
        self._fit_timer.stop()
        with contextlib.suppress(Exception):
            qt_viewer.canvas.native.removeEventFilter(self)
        with contextlib.suppress(Exception):
            self.model.layers.clear()
        if qt_viewer is not None:
            with contextlib.suppress(Exception):
                qt_viewer.close()
            with contextlib.suppress(Exception):
                qt_viewer.setParent(None)


_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer -> weakref to its linked views


def get_linked_views(viewer: Any) -> OrthoViewsWidget | None:
    """The linked-views widget open on ``viewer`` (the newest), if any."""
    ref = _OPEN.get(viewer)
    w = ref() if ref is not None else None
    try:
        if w is not None:
            w.objectName()  # raises once Qt has deleted the widget
    except RuntimeError:
        return None
    return w


class OrthoViewsWidget(QWidget):
    """Dock widget with three linked planes (sagittal, coronal, axial) following the main viewer's point."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._connections: list[tuple[Any, Callable]] = []
        self._layer_connections: dict[int, list[tuple[Any, Callable]]] = {}
        self._syncing = False
        self._closed = False
        self._watched: list = []
        self.follow_mouse = False
        self.radiological = anatomical.radiological()  # the plugin-wide setting (Layers > Visualize)

        # controls
        self.chk_cross = QCheckBox("crosshair")
        self.chk_cross.setChecked(True)
        self.chk_cross.setToolTip("Show the shared point in every view")
        self.chk_follow = QCheckBox("follow mouse")
        self.chk_follow.setToolTip("The views follow the cursor of the main viewer (and of each other)")
        self.cmb_conv = QComboBox()
        self.cmb_conv.addItems(["radiological (R on left)", "neurological (R on right)"])
        self.cmb_conv.setToolTip("Left-right convention of the coronal and axial views and of the main canvas")
        self.cmb_conv.setCurrentIndex(0 if self.radiological else 1)
        self.btn_reset = QPushButton("reset")
        self.btn_reset.setToolTip("Frame the data in every view")
        self.cmb_layout = QComboBox()
        self.cmb_layout.addItems(["grid", "column", "row"])
        self.cmb_layout.setToolTip("Arrangement of the three planes")
        self.cmb_main = QComboBox()
        self.cmb_main.addItems(["main view: as is", "main view: sagittal", "main view: coronal", "main view: axial"])
        self.cmb_main.setToolTip("Show this plane, upright and labelled the same way, in the main viewer")

        self.views = [OrthoView(a, self.radiological) for a in range(3)]
        self.lbl_point = QLabel("")
        self.lbl_point.setToolTip("The shared point, RAS millimetres")
        self.lbl_point.setWordWrap(True)
        # controls fill the fourth cell of the 2×2 grid: the three planes get the room
        self.controls = QWidget()
        ctl = QVBoxLayout(self.controls)
        ctl.setContentsMargins(4, 4, 4, 4)
        row = QHBoxLayout()
        row.addWidget(self.cmb_layout)
        row.addWidget(self.btn_reset)
        ctl.addLayout(row)
        for w in (self.chk_cross, self.chk_follow, self.cmb_conv, self.cmb_main, self.lbl_point):
            ctl.addWidget(w)
        ctl.addStretch(1)
        self.grid = QGridLayout()
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(4)
        self.arrangement = ""
        self.set_orientation("grid")

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(self.grid, 1)

        self.chk_cross.toggled.connect(self._update_crosshairs)
        self.chk_follow.toggled.connect(self._set_follow)
        self.cmb_conv.currentIndexChanged.connect(lambda i: self.set_radiological(i == 0))
        self.btn_reset.clicked.connect(self.reset_views)
        self.cmb_layout.currentTextChanged.connect(self.set_orientation)
        self.cmb_main.currentIndexChanged.connect(self._orient_main)

        # mirrors of the current layers, then follow the main viewer
        for layer in self.viewer.layers:
            self._add_layer(layer)
        self._connect(self.viewer.layers.events.inserted, self._on_inserted)
        self._connect(self.viewer.layers.events.removed, self._on_removed)
        self._connect(self.viewer.layers.events.moved, self._on_moved)
        self._connect(self.viewer.dims.events.point, self._on_main_point)
        for v in self.views:
            self._connect(v.model.dims.events.point, self._view_point_handler(v))
            v.model.mouse_drag_callbacks.append(self._click_handler(v))
            v.model.mouse_move_callbacks.append(self._move_handler(v))
            camera_of(v.model).events.zoom.connect(self._on_zoom_handler(v))
        self.viewer.mouse_move_callbacks.append(self._on_main_mouse_move)
        self.destroyed.connect(self._on_destroyed_static(self._connections, self._layer_connections, self.viewer))
        _OPEN[self.viewer] = weakref.ref(self)
        self._apply_layouts()
        self._on_main_point()
        self.reset_views()
        if self.viewer.dims.ndim == 3 and tuple(self.viewer.dims.order) == (0, 1, 2):
            self.cmb_main.setCurrentIndex(3)  # upright axial in the main viewer too (napari's default is not)

    # ------------------------------------------------------------------ connections
    def _connect(self, emitter: Any, handler: Callable, bucket: list | None = None) -> None:
        emitter.connect(handler)
        (self._connections if bucket is None else bucket).append((emitter, handler))

    @staticmethod
    def _on_destroyed_static(conns: list, layer_conns: dict, viewer: Any) -> Callable:
        # no reference to self: the callback must not keep the widget alive
        def _cleanup(*_):
            for emitter, handler in conns:
                with contextlib.suppress(Exception):
                    emitter.disconnect(handler)
            for lst in layer_conns.values():
                for emitter, handler in lst:
                    with contextlib.suppress(Exception):
                        emitter.disconnect(handler)
            conns.clear()
            layer_conns.clear()

        return _cleanup

    def cleanup(self) -> None:
        """Disconnect from the main viewer and close the three canvases (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._on_destroyed_static(self._connections, self._layer_connections, self.viewer)()
        with contextlib.suppress(ValueError):
            self.viewer.mouse_move_callbacks.remove(self._on_main_mouse_move)
        for v in self.views:
            v.close_viewer()
        self._unwatch()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.cleanup()
        super().closeEvent(event)

    # The viewer's closing must close our canvases too (viewer.close() closes its top-level window; Qt's deferred
    # deletion of the dock may never run in scripts and tests). We watch every ancestor: a parent change up the
    # chain re-targets the watch, a Close of the top-level window cleans up.
    def event(self, ev: Any) -> bool:
        if ev.type() == QEvent.Type.ParentChange and not self._closed:
            if self.parentWidget() is None and self._watched:
                self.cleanup()  # taken out of its dock (viewer.window.remove_dock_widget): we are done
            else:
                self._rewatch()
        return super().event(ev)

    def _unwatch(self) -> None:
        for w in self._watched:
            with contextlib.suppress(RuntimeError):
                w.removeEventFilter(self)
        self._watched = []

    def _rewatch(self) -> None:
        self._unwatch()
        p = self.parentWidget()
        while p is not None:
            p.installEventFilter(self)
            self._watched.append(p)
            p = p.parentWidget()

    def eventFilter(self, obj: Any, ev: Any) -> bool:  # noqa: N802 (Qt name)
        if self._watched and obj in self._watched:
            if ev.type() == QEvent.Type.ParentChange:
                self._rewatch()
            elif ev.type() == QEvent.Type.Close and obj is self._watched[-1]:
                self.cleanup()
        return False

    # ------------------------------------------------------------------ layers
    def _on_inserted(self, event: Any) -> None:
        self._add_layer(event.value)
        self._reorder()

    def _on_removed(self, event: Any) -> None:
        self._remove_layer(event.value)

    def _on_moved(self, event: Any = None) -> None:
        self._reorder()

    def _add_layer(self, layer: Any) -> None:
        if not _mirrorable(layer) or id(layer) in self._layer_connections:
            return
        first = not any(v.mirrors for v in self.views)
        for v in self.views:
            mirror = _make_mirror(layer, v.axis)
            v.mirrors[id(layer)] = mirror
            v.model.layers.append(mirror)
        bucket: list = []
        self._layer_connections[id(layer)] = bucket
        props = COMMON_PROPS + (IMAGE_PROPS if layer._type_string == "image" else LABELS_PROPS)
        for prop in props:
            emitter = getattr(layer.events, prop, None)
            if emitter is not None:
                self._connect(emitter, self._prop_handler(layer, prop), bucket)
        self._connect(layer.events.data, self._data_handler(layer), bucket)
        for name in ("paint", "labels_update"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                self._connect(emitter, self._refresh_handler(layer), bucket)
        self._apply_layouts()
        self._update_crosshairs()
        self._reorder()
        if first:
            self.reset_views()

    def _remove_layer(self, layer: Any) -> None:
        for emitter, handler in self._layer_connections.pop(id(layer), []):
            with contextlib.suppress(Exception):
                emitter.disconnect(handler)
        for v in self.views:
            mirror = v.mirrors.pop(id(layer), None)
            if mirror is not None and mirror in v.model.layers:
                v.model.layers.remove(mirror)

    def _reorder(self) -> None:
        for v in self.views:
            wanted = [v.mirrors[id(lay)] for lay in self.viewer.layers if id(lay) in v.mirrors]
            if v.crosshair is not None and v.crosshair in v.model.layers:
                wanted.append(v.crosshair)
            for target, layer in enumerate(wanted):
                cur = v.model.layers.index(layer)
                if cur != target:
                    v.model.layers.move(cur, target)

    def _prop_handler(self, layer: Any, prop: str) -> Callable:
        def handler(event: Any = None) -> None:
            value = getattr(layer, prop)
            for v in self.views:
                mirror = v.mirrors.get(id(layer))
                if mirror is None:
                    continue
                with contextlib.suppress(Exception):  # e.g. a colormap not valid on the mirror yet
                    if prop in ("affine",):
                        mirror.affine = layer.affine.affine_matrix
                    else:
                        setattr(mirror, prop, value)

        return handler

    def _data_handler(self, layer: Any) -> Callable:
        def handler(event: Any = None) -> None:
            for v in self.views:
                mirror = v.mirrors.get(id(layer))
                if mirror is not None:
                    mirror.data = _mirror_data(layer, v.axis)

        return handler

    def _refresh_handler(self, layer: Any) -> Callable:
        def handler(event: Any = None) -> None:
            for v in self.views:
                mirror = v.mirrors.get(id(layer))
                if mirror is not None:
                    mirror.refresh()

        return handler

    # ------------------------------------------------------------------ point
    @property
    def point(self) -> tuple[float, float, float]:
        """The shared point (RAS mm)."""
        return tuple(float(x) for x in self.viewer.dims.point[-3:])

    def set_point(self, world: Any) -> None:
        """Move the shared point (main viewer and every view) to ``world`` (3 values, RAS mm)."""
        world = [float(x) for x in world][-3:]
        pt = list(self.viewer.dims.point)
        if len(pt) < 3:
            return
        pt[-3:] = world
        self.viewer.dims.point = tuple(pt)
        self._on_main_point()

    def _on_main_point(self, event: Any = None) -> None:
        pt = self.point if len(self.viewer.dims.point) >= 3 else None
        if pt is None:
            return
        self._show_point(pt, self.views)
        self.lbl_point.setText("point (RAS mm): " + ", ".join(f"{x:.1f}" for x in pt))

    def _show_point(self, pt: tuple[float, ...], views: list[OrthoView]) -> None:
        self._syncing = True
        try:
            for v in views:
                if v.model.dims.ndim != 3:
                    continue
                if tuple(v.model.dims.point) != tuple(pt):
                    v.model.dims.point = tuple(pt)
                v.show_position(float(v.model.dims.point[v.axis]))
                self._place_crosshair(v, pt)
        finally:
            self._syncing = False

    def _view_point_handler(self, view: OrthoView) -> Callable:
        def handler(event: Any = None) -> None:
            if self._syncing or view.model.dims.ndim != 3:
                return
            # the view's own slider moved: move the shared point along that view's axis
            pt = list(self.point)
            pt[view.axis] = float(view.model.dims.point[view.axis])
            self.set_point(pt)

        return handler

    def _click_handler(self, view: OrthoView) -> Callable:
        def on_drag(model: Any, event: Any):
            if event.button != 1:
                return
            moved = False
            yield
            while event.type == "mouse_move":
                moved = True
                yield
            if moved:
                view.auto_fit = False  # the user panned this view
            elif len(event.position) >= 3:
                self.set_point(event.position[-3:])

        return on_drag

    def _move_handler(self, view: OrthoView) -> Callable:
        def on_move(model: Any, event: Any) -> None:
            if self.follow_mouse and len(event.position) >= 3:
                self._show_point(tuple(float(x) for x in event.position[-3:]), [v for v in self.views if v is not view])

        return on_move

    def _on_main_mouse_move(self, viewer: Any, event: Any) -> None:
        if self.follow_mouse and len(event.position) >= 3:
            self.follow(event.position)

    def follow(self, world: Any) -> None:
        """Show ``world`` (RAS mm) in the views without moving the main viewer's point (follow-mouse mode)."""
        self._show_point(tuple(float(x) for x in list(world)[-3:]), self.views)

    def _set_follow(self, on: bool) -> None:
        self.follow_mouse = bool(on)
        if not on:
            self._on_main_point()

    # ------------------------------------------------------------------ crosshair
    def _place_crosshair(self, view: OrthoView, pt: tuple[float, ...]) -> None:
        if not self.chk_cross.isChecked() or not view.mirrors:
            if view.crosshair is not None:
                view.crosshair.visible = False
            return
        ext = np.asarray(view.model.layers.extent.world, dtype=float)[:, -3:]
        lay = view.layout_spec
        _, vert, hor = lay.order
        a = np.array(pt, dtype=float)
        line_v = np.stack([a, a])
        line_v[0, vert], line_v[1, vert] = ext[0, vert], ext[1, vert]
        line_h = np.stack([a, a])
        line_h[0, hor], line_h[1, hor] = ext[0, hor], ext[1, hor]
        width = self._crosshair_width(view)
        if view.crosshair is None or view.crosshair not in view.model.layers:
            from napari.layers import Shapes

            view.crosshair = Shapes(
                [line_v, line_h],
                shape_type="line",
                edge_color=CROSSHAIR_COLOR,
                edge_width=width,
                name="crosshair",
                opacity=0.8,
            )
            view.model.layers.append(view.crosshair)
        else:
            view.crosshair.data = [line_v, line_h]
            view.crosshair.edge_width = width
            view.crosshair.edge_color = CROSSHAIR_COLOR
            view.crosshair.visible = True

    @staticmethod
    def _crosshair_width(view: OrthoView) -> float:
        """About 1.5 screen pixels in world units (edge widths of shapes are in world units)."""
        zoom = float(camera_of(view.model).zoom) or 1.0
        return 1.5 / zoom

    def _on_zoom_handler(self, view: OrthoView) -> Callable:
        def handler(event: Any = None) -> None:
            if view.crosshair is not None and view.crosshair in view.model.layers:
                view.crosshair.edge_width = self._crosshair_width(view)

        return handler

    def _update_crosshairs(self, *_: Any) -> None:
        pt = self.point if len(self.viewer.dims.point) >= 3 else None
        if pt is not None:
            for v in self.views:
                self._place_crosshair(v, pt)

    # ------------------------------------------------------------------ layout
    def set_radiological(self, on: bool) -> None:
        """Switch the left-right convention here, in the main canvas and for every viewer (one setting)."""
        self.radiological = bool(on)
        self._apply_layouts()
        anatomical.set_radiological(self.radiological)
        if self.cmb_main.currentIndex() > 0:
            self._orient_main(self.cmb_main.currentIndex())

    def _apply_layouts(self) -> None:
        for v in self.views:
            v.apply_layout(self.radiological)

    def reset_views(self) -> None:
        """Frame the data in every view (and refit on resize again)."""
        for v in self.views:
            v.auto_fit = True
            v.fit()

    def _orient_main(self, index: int) -> None:
        if index <= 0 or self.viewer.dims.ndim != 3:
            return
        anatomical.show_plane(self.viewer, index - 1, self.radiological)

    def set_orientation(self, orientation: str) -> None:
        """Arrange the planes: 'grid' (2×2 with the controls in the fourth cell, the default), 'column' (stacked,
        for a narrow dock) or 'row' (side by side, for a bottom dock)."""
        if orientation not in ("grid", "column", "row"):
            raise ValueError(f"orientation must be grid, column or row, not {orientation!r}")
        for w in (*self.views, self.controls):
            self.grid.removeWidget(w)
        for i in range(4):
            self.grid.setRowStretch(i, 0)
            self.grid.setColumnStretch(i, 0)
        if orientation == "grid":
            cells = [(0, 0), (0, 1), (1, 0)]
            self.grid.addWidget(self.controls, 1, 1)
        elif orientation == "column":
            cells = [(0, 0), (1, 0), (2, 0)]
            self.grid.addWidget(self.controls, 3, 0)
        else:
            cells = [(0, 0), (0, 1), (0, 2)]
            self.grid.addWidget(self.controls, 0, 3)
        for v, (r, c) in zip(self.views, cells):
            self.grid.addWidget(v, r, c)
            self.grid.setRowStretch(r, 1)
            self.grid.setColumnStretch(c, 1)
        self.arrangement = orientation

    def snapshot(self, path: str | None = None) -> Any:
        """The three planes side by side as one QImage (controls left out); written to ``path`` when given."""
        from qtpy.QtGui import QImage, QPainter

        grabs = [v.grab().toImage() for v in self.views]
        w = sum(g.width() for g in grabs)
        h = max(g.height() for g in grabs)
        img = QImage(w, h, QImage.Format.Format_RGB32)
        img.fill(0)
        painter = QPainter(img)
        x = 0
        for g in grabs:
            painter.drawImage(x, 0, g)
            x += g.width()
        painter.end()
        if path:
            img.save(str(path))
        return img
