"""Export dock widget: the paper's comparison figure at the current point, a snapshot of the linked views and the
displacement field of a run (Learn2Reg or ITK/ANTs).

The figure (:func:`napari_unireg.viz.comparison_figure`) gets one column per run held in the viewer on the same
pair, for the sagittal, coronal and axial slice through the viewer's current point (one file per axis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .runs import Run, get_store


def current_voxel(point: Any, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Voxel of the fixed grid nearest to a world point (clipped into the grid)."""
    w = np.asarray(point, dtype=np.float64)[-3:]
    vox = np.linalg.solve(np.asarray(affine, dtype=np.float64), np.append(w, 1.0))[:3]
    return tuple(int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(vox, shape))


def runs_on_pair(runs: list[Run], run: Run) -> list[Run]:
    """The runs on the same fixed/moving pair as ``run`` (columns of one figure)."""
    return [r for r in runs if (r.fixed_name, r.moving_name) == (run.fixed_name, run.moving_name)]


def write_comparison_figures(
    runs: list[Run],
    point: Any,
    out_dir: str | Path,
    formats: tuple[str, ...] = ("png",),
    dpi: int = 150,
    axes: tuple[int, ...] = (0, 1, 2),
    overwrite: bool = True,
) -> list[Path]:
    """The comparison figure for every axis through ``point`` (RAS mm); returns the written files."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from napari_unireg.errors import UserError
    from napari_unireg.viz import comparison_figure, save_figure

    from .layers import resample_to_grid

    if not runs:
        raise UserError("no registration run to draw: run one in the Register widget first")
    ref = runs[0]
    shape = tuple(int(s) for s in ref.fixed.shape)
    if ref.moving is None:
        raise UserError("this run does not hold its moving image")
    moving = resample_to_grid(ref.moving, ref.moving_affine, shape, ref.affine)
    moving_seg = None
    if ref.moving_seg is not None:
        moving_seg = resample_to_grid(ref.moving_seg, ref.moving_affine, shape, ref.affine, labels=True)
    methods = {r.short: r.result.disp_native for r in runs}
    vox = current_voxel(point, ref.affine, shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    import matplotlib.pyplot as plt

    for axis in axes:
        fig = comparison_figure(
            ref.fixed,
            moving,
            methods,
            fixed_seg=ref.fixed_seg if moving_seg is not None else None,
            moving_seg=moving_seg if ref.fixed_seg is not None else None,
            axis=axis,
            slice_index=vox[axis],
            spacing=ref.spacing,
            fixed_id=_safe(ref.fixed_name),
            moving_id=_safe(ref.moving_name),
        )
        try:
            written += save_figure(fig, out_dir, formats=formats, dpi=dpi, overwrite=overwrite)
        finally:
            plt.close(fig)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "x"


class ExportWidget(QWidget):
    """Figure, snapshot and displacement export for the runs in the viewer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store = get_store(napari_viewer)
        self.cmb_run = QComboBox()
        self.ed_dir = QLineEdit(str(Path.home() / "unireg_figures"))
        self.btn_dir = QPushButton("…")
        self.cmb_fmt = QComboBox()
        self.cmb_fmt.addItems(["png", "pdf", "svg", "png+pdf"])
        self.spin_dpi = QSpinBox()
        self.spin_dpi.setRange(50, 600)
        self.spin_dpi.setValue(150)
        self.btn_fig = QPushButton("comparison figure (3 axes, current point)")
        self.btn_fig.setToolTip("One column per run on this pair: deformed, difference, labels, grid, Jacobian rows")
        self.btn_snap = QPushButton("snapshot of the linked views")
        self.btn_l2r = QPushButton("displacement: Learn2Reg…")
        self.btn_l2r.setToolTip("X×Y×Z×3 float32, voxel units, pull, on the fixed canonical (RAS) grid")
        self.btn_itk = QPushButton("displacement: ITK/ANTs…")
        self.btn_itk.setToolTip("X×Y×Z×1×3 vector NIfTI, LPS mm, fixed grid affine (antsApplyTransforms, greedy)")
        self.btn_run = QPushButton("all results of the run (like `unireg register`)…")
        self.btn_run.setToolTip(
            "warped, warped labels, Jacobian (in the fixed file's orientation and header), displacement "
            "(Learn2Reg + ITK), metrics.json and run.json (options, model, versions) into a folder"
        )
        self.lbl = QLabel("")
        self.lbl.setWordWrap(True)

        form = QFormLayout()
        form.addRow("run", self.cmb_run)
        row = QHBoxLayout()
        row.addWidget(self.ed_dir, 1)
        row.addWidget(self.btn_dir)
        form.addRow("folder", row)
        row2 = QHBoxLayout()
        row2.addWidget(self.cmb_fmt)
        row2.addWidget(QLabel("dpi"))
        row2.addWidget(self.spin_dpi)
        form.addRow("format", row2)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.btn_fig)
        lay.addWidget(self.btn_snap)
        disp = QHBoxLayout()
        disp.addWidget(self.btn_l2r)
        disp.addWidget(self.btn_itk)
        lay.addLayout(disp)
        lay.addWidget(self.btn_run)
        lay.addWidget(self.lbl)
        lay.addStretch(1)

        self.btn_dir.clicked.connect(self._pick_dir)
        self.btn_fig.clicked.connect(self._do_figures)
        self.btn_snap.clicked.connect(self._do_snapshot)
        self.btn_l2r.clicked.connect(lambda: self._do_disp("l2r"))
        self.btn_itk.clicked.connect(lambda: self._do_disp("itk"))
        self.btn_run.clicked.connect(self._do_run_folder)
        self.store.added.connect(self._fill)
        self.store.removed.connect(self._fill)
        self._fill()

    def _fill(self, *_: Any) -> None:
        self.cmb_run.clear()
        for run in self.store:
            self.cmb_run.addItem(run.tag, run.id)
        self.cmb_run.setCurrentIndex(self.cmb_run.count() - 1)

    def current_run(self) -> Run | None:
        rid = self.cmb_run.currentData()
        return None if rid is None else self.store.get(rid)

    def formats(self) -> tuple[str, ...]:
        return tuple(self.cmb_fmt.currentText().split("+"))

    def _pick_dir(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Output folder", self.ed_dir.text())
        if d:
            self.ed_dir.setText(d)

    def _report(self, what: str, paths: list[Path]) -> None:
        self.lbl.setText(f"{what}:\n" + "\n".join(str(p) for p in paths))

    def _error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        self.lbl.setText(str(exc))
        show_error(f"UniReg export: {exc}")

    # ------------------------------------------------------------------ actions (public for scripts/tests)
    def export_figures(self, out_dir: str | None = None) -> list[Path]:
        run = self.current_run()
        from napari_unireg.errors import UserError

        if run is None:
            raise UserError("no registration run yet: run one in the Register widget first")
        runs = runs_on_pair(list(self.store), run)
        paths = write_comparison_figures(
            runs, self.viewer.dims.point, out_dir or self.ed_dir.text(), self.formats(), int(self.spin_dpi.value())
        )
        self._report("figures", paths)
        return paths

    def export_snapshot(self, path: str | None = None) -> Path:
        """PNG of the main canvas next to the three linked views (opens them when needed)."""
        from qtpy.QtGui import QImage, QPainter

        from .ortho_views import OrthoViewsWidget, get_linked_views

        views = get_linked_views(self.viewer)
        if views is None:
            views = OrthoViewsWidget(self.viewer)
            self.viewer.window.add_dock_widget(views, name="Linked views", area="right")
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()
        side = views.snapshot()
        main = self.viewer.screenshot(canvas_only=True, flash=False)
        h, w = main.shape[:2]
        main_img = QImage(np.ascontiguousarray(main[..., :3]).data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
        out = QImage(w + side.width(), max(h, side.height()), QImage.Format.Format_RGB888)
        out.fill(0)
        painter = QPainter(out)
        painter.drawImage(0, 0, main_img)
        painter.drawImage(w, 0, side)
        painter.end()
        path = Path(path or Path(self.ed_dir.text()) / "unireg_linked_views.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(str(path))
        self._report("snapshot", [path])
        return path

    def export_displacement(self, path: str, convention: str = "l2r") -> Path:
        from napari_unireg.errors import UserError
        from napari_unireg.io import save_disp_itk, save_disp_l2r

        run = self.current_run()
        if run is None:
            raise UserError("no registration run yet")
        if convention == "itk":
            out = save_disp_itk(run.result.disp_native, run.affine, path, overwrite=True)
        else:
            out = save_disp_l2r(run.result.disp_native, path, overwrite=True)
        self._report(f"displacement ({convention})", [out])
        return Path(out)

    def export_run(self, out_dir: str) -> dict[str, Path]:
        """Write the run's results like the CLI does (``engine.write_result``); returns the written paths."""
        from napari_unireg.pipeline import write_result
        from napari_unireg.errors import UserError
        from napari_unireg.io import Volume

        from .convert import like_from_meta

        run = self.current_run()
        if run is None:
            raise UserError("no registration run yet")
        fixed = like_from_meta(run.nifti, run.fixed) if run.nifti else Volume(data=run.fixed, affine=run.affine)
        written = write_result(run.result, fixed, out_dir, overwrite=True, options=run.options)
        self._report("run results", list(written.values()))
        return written

    def _do_run_folder(self) -> None:
        run = self.current_run()
        if run is None:
            self._error(ValueError("no registration run yet"))
            return
        default = Path(self.ed_dir.text()) / _safe(run.tag)
        d = QFileDialog.getExistingDirectory(self, "Folder for the run's results", str(default.parent))
        if d:
            try:
                self.export_run(str(Path(d) / _safe(run.tag)))
            except Exception as exc:
                self._error(exc)

    def _do_figures(self) -> None:
        try:
            self.export_figures()
        except Exception as exc:
            self._error(exc)

    def _do_snapshot(self) -> None:
        try:
            self.export_snapshot()
        except Exception as exc:
            self._error(exc)

    def _do_disp(self, convention: str) -> None:
        run = self.current_run()
        if run is None:
            self._error(ValueError("no registration run yet"))
            return
        default = Path(self.ed_dir.text()) / f"disp_{_safe(run.tag)}{'_itk' if convention == 'itk' else ''}.nii.gz"
        path, _ = QFileDialog.getSaveFileName(self, "Save displacement", str(default), "NIfTI (*.nii.gz *.nii)")
        if path:
            try:
                self.export_displacement(path, convention)
            except Exception as exc:
                self._error(exc)
