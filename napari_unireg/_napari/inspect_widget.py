"""Inspect dock widget: the result layers of a run, each one a checkbox away, plus the hover read-out.

Kinds: warped moving image, warped labels, difference to fixed, deformation grid (spacing and line width
adjustable; one backward-warped grid per slicing axis, like the paper's figure), Jacobian determinant (blue-white-
red centred at J = 1, contrast −1..3), folded voxels (J ≤ 0) as a labels layer, displacement magnitude (mm), fixed
vs warped label contours, checkerboard (tile adjustable) and flicker (fixed and warped alternating).
Layers are named ``"<kind> [moving→fixed, model]"``; several runs stay side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import show
from .runs import KINDS, META_KEY, Run, get_store

KIND_LABELS = {
    "warped": "warped moving",
    "warped labels": "warped labels",
    "difference": "difference to fixed",
    "grid": "deformation grid",
    "jacobian": "Jacobian determinant",
    "folding": "folded voxels (J ≤ 0)",
    "magnitude": "displacement |u| (mm)",
    "contours": "label contours",
    "checkerboard": "checkerboard",
    "flicker": "flicker",
    "brain mask": "brain mask (fixed)",
}
KIND_TIPS = {
    "warped": "The moving image resampled onto the fixed grid",
    "warped labels": "The moving label map warped with nearest neighbour",
    "difference": "warped − fixed after normalising both to [0, 1] (blue: fixed brighter, red: warped brighter)",
    "grid": "A regular grid warped backward with the displacement, in the plane you are looking at (dark lines "
    "drawn over the layers below; set its blending to 'translucent' to see the grid alone)",
    "jacobian": "det(I + ∇u): 1 = volume kept (uncoloured), < 1 shrink (blue), > 1 growth (red), ≤ 0 folding",
    "folding": "Voxels where the transform folds (J ≤ 0)",
    "magnitude": "Length of the displacement in millimetres",
    "contours": "Fixed label outlines (green) over warped moving label outlines (magenta)",
    "checkerboard": "Tiles alternating between the fixed and the warped image",
    "flicker": "One layer alternating between the fixed and the warped image",
    "brain mask": "The fixed image's brain as found by brain extraction (only when it ran on the fixed image)",
}


def jacobian_summary(jac: np.ndarray) -> str:
    """min / max / % folded of a Jacobian map (the 2-voxel border, set to 1, is ignored)."""
    inner = jac[2:-2, 2:-2, 2:-2] if min(jac.shape) > 4 else jac
    folded = 100.0 * float(np.count_nonzero(inner <= 0)) / max(inner.size, 1)
    return f"J min {float(inner.min()):.3f}  max {float(inner.max()):.3f}  folded {folded:.3f} %"


class InspectWidget(QWidget):
    """Per-run result layers with toggles and parameters."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store = get_store(napari_viewer)
        self._updating = False

        self.cmb_run = QComboBox()
        self.cmb_run.setToolTip("Which registration run the toggles act on")
        self.btn_remove = QPushButton("remove run")
        self.btn_remove.setToolTip("Remove this run's layers and forget the run")
        self.checks: dict[str, QCheckBox] = {}
        box = QGroupBox("result layers")
        grid = QGridLayout(box)
        for i, kind in enumerate(KINDS):
            chk = QCheckBox(KIND_LABELS[kind])
            chk.setToolTip(KIND_TIPS[kind])
            chk.toggled.connect(lambda on, k=kind: self._on_toggle(k, on))
            self.checks[kind] = chk
            grid.addWidget(chk, i // 2, i % 2)

        self.spin_grid = QSpinBox()
        self.spin_grid.setRange(3, 64)
        self.spin_grid.setValue(8)
        self.spin_grid.setSuffix(" vox")
        self.spin_grid.setToolTip("Grid spacing (voxels of the fixed grid); the paper uses 8")
        self.spin_width = QSpinBox()
        self.spin_width.setRange(1, 8)
        self.spin_width.setValue(1)
        self.spin_width.setSuffix(" vox")
        self.spin_width.setToolTip("Grid line width")
        self.spin_tile = QSpinBox()
        self.spin_tile.setRange(2, 128)
        self.spin_tile.setValue(16)
        self.spin_tile.setSuffix(" vox")
        self.spin_tile.setToolTip("Checkerboard tile size")
        self.spin_flicker = QSpinBox()
        self.spin_flicker.setRange(100, 5000)
        self.spin_flicker.setSingleStep(100)
        self.spin_flicker.setValue(600)
        self.spin_flicker.setSuffix(" ms")
        self.spin_flicker.setToolTip("Flicker period")
        params = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.spin_grid)
        row.addWidget(QLabel("width"))
        row.addWidget(self.spin_width)
        params.addRow("grid spacing", row)
        params.addRow("checker tile", self.spin_tile)
        params.addRow("flicker", self.spin_flicker)

        self.lbl_jac = QLabel("")
        self.lbl_flicker = QLabel("")
        self.lbl_hover = QLabel("")
        self.lbl_hover.setToolTip("Displacement (R, A, S mm) and Jacobian under the cursor")
        self.lbl_hover.setWordWrap(True)

        top = QHBoxLayout()
        top.addWidget(QLabel("run"))
        top.addWidget(self.cmb_run, 1)
        top.addWidget(self.btn_remove)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(box)
        lay.addLayout(params)
        lay.addWidget(self.lbl_jac)
        lay.addWidget(self.lbl_flicker)
        lay.addWidget(QLabel("under the cursor:"))
        lay.addWidget(self.lbl_hover)
        # no vertical stretch: the dock takes what the form needs and leaves the rest to the linked views
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)

        self.timer = QTimer(self)
        self.timer.timeout.connect(self._flicker_step)

        self.cmb_run.currentIndexChanged.connect(self._on_run_changed)
        self.btn_remove.clicked.connect(self.remove_current_run)
        self.spin_grid.valueChanged.connect(self._on_grid_params)
        self.spin_width.valueChanged.connect(self._on_grid_params)
        self.spin_tile.valueChanged.connect(self._on_tile)
        self.spin_flicker.valueChanged.connect(lambda ms: self.timer.setInterval(int(ms)))
        self.store.added.connect(self._on_run_added)
        self.store.removed.connect(self._on_run_removed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)

        from .status import install

        self.hover = install(napari_viewer)
        self.hover.listeners.append(self._on_hover)
        self.destroyed.connect(
            _make_cleanup(self.store, self.hover, self._on_hover, self._on_run_added, self._on_run_removed)
        )
        self._fill_runs()

    # ------------------------------------------------------------------ runs
    def _fill_runs(self, select: Run | None = None) -> None:
        self._updating = True
        current = select or self.current_run()
        self.cmb_run.clear()
        for run in self.store:
            self.cmb_run.addItem(run.tag, run.id)
        if current is not None:
            idx = self.cmb_run.findData(current.id)
            self.cmb_run.setCurrentIndex(idx if idx >= 0 else self.cmb_run.count() - 1)
        else:
            self.cmb_run.setCurrentIndex(self.cmb_run.count() - 1)
        self._updating = False
        self._on_run_changed()

    def current_run(self) -> Run | None:
        run_id = self.cmb_run.currentData()
        return None if run_id is None else self.store.get(run_id)

    def select_run(self, run: Run) -> None:
        idx = self.cmb_run.findData(run.id)
        if idx >= 0:
            self.cmb_run.setCurrentIndex(idx)

    def _on_run_added(self, run: Run) -> None:
        self._fill_runs(select=run)

    def _on_run_removed(self, run: Run) -> None:
        self._fill_runs()

    def remove_current_run(self) -> None:
        run = self.current_run()
        if run is None:
            return
        for layer in show.layers_of(self.viewer, run):
            self.viewer.layers.remove(layer)
        self.store.remove(run)

    def _on_run_changed(self, *_: Any) -> None:
        if self._updating:
            return
        run = self.current_run()
        self._sync_checks()
        self.lbl_jac.setText(jacobian_summary(np.asarray(run.result.jacobian)) if run is not None else "no run yet")

    def _on_layers_changed(self, event: Any = None) -> None:
        self._sync_checks()

    def _sync_checks(self) -> None:
        run = self.current_run()
        from .results import available_kinds

        kinds = available_kinds(run) if run is not None else []
        self._updating = True
        try:
            for kind, chk in self.checks.items():
                chk.setEnabled(kind in kinds)
                on = run is not None and any(lay.visible for lay in show.layers_of(self.viewer, run, kind))
                chk.setChecked(on)
        finally:
            self._updating = False
        if not self.checks["flicker"].isChecked():
            self.timer.stop()
            self.lbl_flicker.setText("")

    # ------------------------------------------------------------------ toggles
    def params(self) -> dict[str, int]:
        return {
            "grid_spacing": int(self.spin_grid.value()),
            "grid_width": int(min(self.spin_width.value(), self.spin_grid.value() - 1)),
            "tile": int(self.spin_tile.value()),
        }

    def show_kind(self, kind: str, visible: bool = True) -> list[Any]:
        """Show or hide one result kind of the current run (what ticking its box does); returns its layers."""
        self.checks[kind].setChecked(visible)
        run = self.current_run()
        return [] if run is None else show.layers_of(self.viewer, run, kind)

    def _on_toggle(self, kind: str, on: bool) -> None:
        if self._updating:
            return
        run = self.current_run()
        if run is None:
            return
        show.set_visible(self.viewer, run, kind, on, **self.params())
        if kind == "flicker":
            if on:
                self.timer.start(int(self.spin_flicker.value()))
            else:
                self.timer.stop()

    def _on_grid_params(self, *_: Any) -> None:
        run = self.current_run()
        if run is not None and show.layers_of(self.viewer, run, "grid"):
            visible = self.checks["grid"].isChecked()
            show.add_kind(self.viewer, run, "grid", **self.params())
            for layer in show.layers_of(self.viewer, run, "grid"):
                layer.visible = visible

    def _on_tile(self, *_: Any) -> None:
        run = self.current_run()
        if run is not None and show.layers_of(self.viewer, run, "checkerboard"):
            visible = self.checks["checkerboard"].isChecked()
            show.add_kind(self.viewer, run, "checkerboard", **self.params())
            for layer in show.layers_of(self.viewer, run, "checkerboard"):
                layer.visible = visible

    def _flicker_step(self) -> None:
        run = self.current_run()
        if run is None:
            return
        for layer in show.layers_of(self.viewer, run, "flicker"):
            meta = layer.metadata[META_KEY]
            meta["frame"] = 1 - int(meta.get("frame", 0))
            layer.data = meta["frames"][meta["frame"]]
        self.lbl_flicker.setText("flicker: showing " + ("fixed" if self._frame(run) == 0 else "warped"))

    def _frame(self, run: Run) -> int:
        layers = show.layers_of(self.viewer, run, "flicker")
        return int(layers[0].metadata[META_KEY].get("frame", 0)) if layers else 0

    # ------------------------------------------------------------------ hover
    def _on_hover(self, text: str) -> None:
        self.lbl_hover.setText(text)


def _make_cleanup(store: Any, hover: Any, on_hover: Any, on_added: Any, on_removed: Any) -> Any:
    """Disconnect from the shared store and read-out when the widget goes (no reference to the widget)."""

    def cleanup(*_: Any) -> None:
        for sig, fn in ((store.added, on_added), (store.removed, on_removed)):
            try:
                sig.disconnect(fn)
            except Exception:
                pass
        if on_hover in hover.listeners:
            hover.listeners.remove(on_hover)

    return cleanup
