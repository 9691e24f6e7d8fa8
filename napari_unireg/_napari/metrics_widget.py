"""Metrics dock widget: summary and per-label tables of the runs in the viewer, runs as columns.

Summary rows: mean Dice before/after, HD95 (mm), SDlogJ, NDV (%), folded (%), time, device, model, weights.
Per-label rows: Dice before and after for every label (names when the label map carried them). Copy (tab-separated,
pastes into spreadsheets) and Save CSV. The tables are built by pure functions (:func:`summary_table`,
:func:`label_table`) so scripts and tests can use them without Qt.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .runs import Run, get_store

Table = tuple[list[str], list[list[str]]]

SUMMARY_ROWS = (
    ("pair", None),
    ("model", None),
    ("Dice before (mean)", "dice_before"),
    ("Dice after (mean)", "dice"),
    ("HD95 after (mm)", "hd95"),
    ("SDlogJ", "sdlogj"),
    ("NDV (%)", "ndv"),
    ("folded J≤0 (%)", "folded_pct"),
    ("inverse consistency (vox)", None),
    ("time (s)", None),
    ("device", None),
    ("weights", None),
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def _per_label(metrics: dict[str, Any], key: str) -> dict[int, float]:
    d = metrics.get(key) or {}
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = float(v) if v is not None else float("nan")
        except (TypeError, ValueError):
            continue
    return out


def _summary_value(run: Run, row: str, key: str | None) -> str:
    m = run.metrics
    if key is not None:
        return _fmt(m.get(key))
    if row == "pair":
        return f"{run.moving_name}→{run.fixed_name}"
    if row == "model":
        return run.model + run.suffix
    if row == "time (s)":
        secs = (run.result.seconds or {}).get("total") or (m.get("seconds") or {}).get("total")
        return _fmt(secs, 1)
    if row == "device":
        return str(run.result.device or m.get("device", ""))
    if row == "weights":
        if not run.result.weights_trained:
            return "UNTRAINED"
        from napari_unireg.models.registry import RESOLUTION_MM as MM

        trained, ran = MM.get(m.get("weights_resolution")), MM.get(m.get("resolution"))  # none for classical
        if trained is None:
            return "trained"
        return f"trained at {trained}" + (f", run at {ran}" if ran and ran != trained else "")
    if row == "inverse consistency (vox)":
        ic = m.get("inverse_consistency")
        return _fmt(ic.get("mean")) if isinstance(ic, dict) else ""
    return ""


def summary_table(runs: Sequence[Run]) -> Table:
    """Header ``["metric", run1, run2, …]`` and one row per summary metric."""
    header = ["metric"] + [r.short for r in runs]
    rows = [[name] + [_summary_value(r, name, key) for r in runs] for name, key in SUMMARY_ROWS]
    return header, rows


def label_table(runs: Sequence[Run]) -> Table:
    """Per-label Dice: ``label``, ``name``, ``before`` (one column per distinct pair), then ``after`` per run."""
    runs = [r for r in runs if r.metrics.get("dice_per_label")]
    if not runs:
        return ["label", "name"], []
    pairs: dict[tuple, Run] = {}
    for r in runs:
        pairs.setdefault((r.fixed_name, r.moving_name, r.fixed_seg_name, r.moving_seg_name), r)
    labels: set[int] = set()
    names: dict[int, str] = {}
    for r in runs:
        labels |= set(_per_label(r.metrics, "dice_per_label"))
        names.update({int(k): v for k, v in (r.label_names or {}).items()})
    multi_pair = len(pairs) > 1
    header = ["label", "name"]
    header += [f"before [{p.moving_name}→{p.fixed_name}]" if multi_pair else "before" for p in pairs.values()]
    header += [f"after {r.short}" + (f" [{r.moving_name}→{r.fixed_name}]" if multi_pair else "") for r in runs]
    before = [_per_label(p.metrics, "dice_before_per_label") for p in pairs.values()]
    after = [_per_label(r.metrics, "dice_per_label") for r in runs]
    rows = []
    for lab in sorted(labels):
        row = [str(lab), names.get(lab, "")]
        row += [_fmt(b.get(lab)) for b in before]
        row += [_fmt(a.get(lab)) for a in after]
        rows.append(row)
    return header, rows


def to_text(tables: Sequence[Table], sep: str = "\t") -> str:
    """Tables as delimited text (blank line between tables)."""
    blocks = []
    for header, rows in tables:
        blocks.append("\n".join(sep.join(cells) for cells in [header, *rows]))
    return "\n\n".join(blocks) + "\n"


def write_csv(path: str, tables: Sequence[Table]) -> str:
    """Write the tables to one CSV file (blank row between tables); returns the path."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        for i, (header, rows) in enumerate(tables):
            if i:
                w.writerow([])
            w.writerow(header)
            w.writerows(rows)
    return path


class MetricsWidget(QWidget):
    """Tables of the runs held in the viewer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store = get_store(napari_viewer)
        self.chk_all = QCheckBox("all runs as columns")
        self.chk_all.setChecked(True)
        self.chk_all.setToolTip("Off: only the newest run (or the run of the selected layer)")
        self.btn_copy = QPushButton("copy")
        self.btn_copy.setToolTip("Copy both tables, tab-separated (pastes into spreadsheets)")
        self.btn_csv = QPushButton("save CSV…")
        self.summary = QTableWidget()
        self.labels = QTableWidget()
        for t in (self.summary, self.labels):
            t.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
            t.verticalHeader().setVisible(False)
            t.verticalHeader().setDefaultSectionSize(22)
        top = QHBoxLayout()
        top.addWidget(self.chk_all)
        top.addStretch(1)
        top.addWidget(self.btn_copy)
        top.addWidget(self.btn_csv)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.summary, 2)
        lay.addWidget(QLabel("Dice per label"))
        lay.addWidget(self.labels, 3)
        self.setMinimumHeight(320)
        self.chk_all.toggled.connect(self.refresh)
        self.btn_copy.clicked.connect(self.copy)
        self.btn_csv.clicked.connect(self._save_dialog)
        self.store.added.connect(self.refresh)
        self.store.removed.connect(self.refresh)
        self.store.changed.connect(self.refresh)
        self.refresh()

    def runs(self) -> list[Run]:
        runs = list(self.store)
        if self.chk_all.isChecked() or not runs:
            return runs
        from .runs import run_of_layer

        active = self.viewer.layers.selection.active
        run, _ = run_of_layer(self.viewer, active) if active is not None else (None, None)
        return [run or runs[-1]]

    def tables(self) -> list[Table]:
        runs = self.runs()
        return [summary_table(runs), label_table(runs)]

    def refresh(self, *_: Any) -> None:
        summary, labels = self.tables()
        _fill(self.summary, summary)
        _fill(self.labels, labels)

    def copy(self) -> str:
        text = to_text(self.tables())
        QApplication.clipboard().setText(text)
        return text

    def save_csv(self, path: str) -> str:
        return write_csv(path, self.tables())

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save metrics", "unireg_metrics.csv", "CSV (*.csv)")
        if path:
            if not path.lower().endswith(".csv"):
                path += ".csv"
            self.save_csv(path)


def _fill(table: QTableWidget, data: Table) -> None:
    header, rows = data
    table.clear()
    table.setColumnCount(len(header))
    table.setRowCount(len(rows))
    table.setHorizontalHeaderLabels(header)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            table.setItem(i, j, QTableWidgetItem(cell))
    table.resizeColumnsToContents()
