"""Hover read-out: displacement vector (mm) and Jacobian determinant under the cursor.

:func:`readout` is pure (world point in, numbers out); :class:`HoverReadout` wires it to a viewer: on every
mouse move it finds the run under the cursor (the selected layer's run, else the newest run) and appends
``u=(…) mm |u|=… J=…`` to napari's status bar text (and hands the text to listeners, e.g. the Inspect widget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import weakref

import numpy as np

SEPARATOR = "  ‖  "


@dataclass
class Readout:
    voxel: tuple[int, int, int]
    u_mm: tuple[float, float, float]
    magnitude: float
    jacobian: float

    def text(self) -> str:
        ux, uy, uz = self.u_mm
        return f"u=({ux:+.2f}, {uy:+.2f}, {uz:+.2f}) mm |u|={self.magnitude:.2f} mm J={self.jacobian:.3f}"


def readout(
    world: Sequence[float], disp: np.ndarray, affine: np.ndarray, jacobian: np.ndarray | None = None
) -> Readout | None:
    """Values at the voxel nearest to ``world`` (RAS mm) of a ``3×X×Y×Z`` voxel-unit displacement on the grid
    of ``affine``; ``None`` outside the grid. The vector is in world mm (R, A, S for a canonical affine)."""
    w = np.asarray(world, dtype=np.float64)[-3:]
    A = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.solve(A, np.append(w, 1.0))[:3]
    idx = np.rint(vox).astype(int)
    shape = disp.shape[1:]
    if np.any(idx < 0) or np.any(idx >= np.asarray(shape)):
        return None
    u_vox = np.asarray(disp[(slice(None), *idx)], dtype=np.float64)
    u_mm = A[:3, :3] @ u_vox
    jac = float(jacobian[tuple(idx)]) if jacobian is not None else float("nan")
    return Readout(tuple(int(i) for i in idx), tuple(float(v) for v in u_mm), float(np.linalg.norm(u_mm)), jac)


def append_to_status(status: Any, text: str) -> Any:
    """napari's status is a str or a dict (``coordinates`` holds the value text); add ``text`` once."""
    if isinstance(status, dict):
        st = dict(status)
        coords = str(st.get("coordinates", ""))
        if text not in coords:
            st["coordinates"] = coords + SEPARATOR + text
        return st
    s = "" if status is None else str(status)
    return s if text in s else s + SEPARATOR + text


class HoverReadout:
    """Connects the read-out to a viewer (one per viewer; see :func:`install`)."""

    def __init__(self, viewer: Any) -> None:
        from .runs import get_store, run_of_layer

        self._viewer = weakref.ref(viewer)  # the viewer holds us through its callbacks: no cycle through the dict
        self._store = get_store(viewer)
        self._run_of_layer = run_of_layer
        self.text = ""
        self.listeners: list[Callable[[str], None]] = []
        self.enabled = True
        viewer.mouse_move_callbacks.append(self._on_move)
        viewer.events.status.connect(self._on_status)

    @property
    def viewer(self) -> Any:
        return self._viewer()

    def current_run(self):
        active = self.viewer.layers.selection.active
        if active is not None:
            run, _ = self._run_of_layer(self.viewer, active)
            if run is not None:
                return run
        runs = self._store.runs
        return runs[-1] if runs else None

    def update(self, world: Sequence[float]) -> str:
        """Recompute the text for a world point (called on mouse move; public for tests and scripts)."""
        run = self.current_run() if self.enabled else None
        text = ""
        if run is not None:
            r = readout(world, run.result.disp_native, run.affine, run.result.jacobian)
            if r is not None:
                text = r.text()
        self.text = text
        for fn in list(self.listeners):
            fn(text)
        if text:
            self._on_status()
        return text

    def _on_move(self, viewer: Any, event: Any) -> None:
        pos = getattr(event, "position", None)
        if pos is None or len(pos) < 3:
            return
        self.update(pos)

    def _on_status(self, event: Any = None) -> None:
        if not self.text:
            return
        new = append_to_status(self.viewer.status, self.text)
        if new != self.viewer.status:
            self.viewer.status = new


_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install(viewer: Any) -> HoverReadout:
    """The hover read-out of ``viewer``, installed once."""
    hr = _INSTALLED.get(viewer)
    if hr is None:
        hr = HoverReadout(viewer)
        _INSTALLED[viewer] = hr
    return hr
