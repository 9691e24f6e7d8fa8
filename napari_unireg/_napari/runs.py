"""Registration runs held in a viewer, shared by the Register, Inspect, Metrics and Export widgets.

A :class:`Run` is one finished ``register_volumes`` call plus what the front end needs to show it (layer names,
the fixed grid's affine, label names). Runs live in a :class:`RunStore` attached to the viewer (one store per
viewer, weakly referenced), so the widgets see the same runs whatever order they were opened in.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psygnal import Signal

from napari_unireg.pipeline import RegisterOptions, RegistrationResult

#: Result layer kinds, in the order the Inspect widget lists them.
KINDS = (
    "warped",
    "warped labels",
    "difference",
    "grid",
    "jacobian",
    "folding",
    "magnitude",
    "contours",
    "checkerboard",
    "flicker",
    "brain mask",
)
#: Kinds the Register widget adds when a run finishes, bottom to top (the others are one click away in Inspect):
#: the four overlays the product promises (warped image, deformation grid, Jacobian with folding marked, label
#: contours) plus the warped label map the contours and metrics come from ...
DEFAULT_KINDS = ("warped", "warped labels", "jacobian", "folding", "grid", "contours", "brain mask")
#: ... of which these start visible: the warped image with thin grid lines and 1-pixel label outlines over it
#: (anatomy stays readable), folded voxels marked; the Jacobian colour map (semi-transparent) and the filled
#: warped labels are an eye-click or an Inspect tick away.
DEFAULT_VISIBLE = ("warped", "folding", "grid", "contours")
#: Of those, the ones added in the first event-loop turn (the overlays the user looks at first); the others follow
#: in the next turn and are sorted into DEFAULT_KINDS' order, so the GUI thread never stalls for all of them.
FIRST_KINDS = ("warped", "jacobian", "folding", "grid")

#: metadata key on every layer this plugin creates for a run: {"run": id, "kind": kind, ...}
META_KEY = "unireg"


@dataclass
class Run:
    """One registration held in the viewer. ``fixed`` / ``fixed_seg`` are the canonical fixed arrays (shared
    with the user's layers, never modified)."""

    id: int
    fixed_name: str
    moving_name: str
    model: str
    result: RegistrationResult
    affine: np.ndarray  # fixed canonical voxel -> RAS mm: the affine of every result layer
    fixed: np.ndarray
    options: RegisterOptions = field(default_factory=RegisterOptions)
    fixed_seg: np.ndarray | None = None
    moving: np.ndarray | None = None  # canonical moving image (the engine's private copy), for figures
    moving_affine: np.ndarray | None = None
    moving_seg: np.ndarray | None = None
    moving_seg_name: str | None = None
    fixed_seg_name: str | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    nifti: dict[str, Any] | None = None  # the fixed file's geometry and header, for writing result layers
    suffix: str = ""
    #: layer data computed in the worker thread (results.precompute), used instead of recomputing in the GUI
    prebuilt: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """``moving→fixed, model`` (plus ``#n`` when the same pair and model ran before)."""
        return f"{self.moving_name}→{self.fixed_name}, {self.model}{self.suffix}"

    @property
    def short(self) -> str:
        """Column header of the metrics table."""
        return f"{self.model}{self.suffix}"

    def layer_name(self, kind: str) -> str:
        """``warped [moving→fixed, dp-conv-c]``: every layer of a run carries its tag, so runs group by name."""
        return f"{kind} [{self.tag}]"

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0)))

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.metrics or {}


class RunStore:
    """The runs of one viewer. Signals: ``added(run)``, ``removed(run)``, ``changed(run)`` (its result was
    completed, e.g. the metrics arrived after the layers)."""

    added = Signal(object)
    removed = Signal(object)
    changed = Signal(object)

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._next_id = 1

    def add(
        self,
        *,
        fixed_name: str,
        moving_name: str,
        model: str,
        result: RegistrationResult,
        affine: np.ndarray,
        fixed: np.ndarray,
        **extra: Any,
    ) -> Run:
        """Register a finished run; a repeat of the same pair and model gets a ``#n`` suffix."""
        same = [r for r in self.runs if (r.fixed_name, r.moving_name, r.model) == (fixed_name, moving_name, model)]
        suffix = f" #{len(same) + 1}" if same else ""
        run = Run(
            id=self._next_id,
            fixed_name=fixed_name,
            moving_name=moving_name,
            model=model,
            result=result,
            affine=np.asarray(affine, dtype=np.float64),
            fixed=fixed,
            suffix=suffix,
            **extra,
        )
        self._next_id += 1
        self.runs.append(run)
        self.added.emit(run)
        return run

    def update(self, run: Run, result: RegistrationResult) -> None:
        """Replace ``run``'s result by its completed version (same fields, the metrics added)."""
        run.result = result
        self.changed.emit(run)

    def remove(self, run: Run) -> None:
        if run in self.runs:
            self.runs.remove(run)
            self.removed.emit(run)

    def get(self, run_id: int) -> Run | None:
        return next((r for r in self.runs if r.id == run_id), None)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(list(self.runs))


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_store(viewer: Any) -> RunStore:
    """The run store of ``viewer`` (created on first use)."""
    store = _STORES.get(viewer)
    if store is None:
        store = RunStore()
        _STORES[viewer] = store
    return store


def run_of_layer(viewer: Any, layer: Any) -> tuple[Run | None, str | None]:
    """(run, kind) of a layer this plugin made, else (None, None)."""
    meta = getattr(layer, "metadata", {}).get(META_KEY) or {}
    run_id = meta.get("run")
    if run_id is None:
        return None, None
    return get_store(viewer).get(run_id), meta.get("kind")
