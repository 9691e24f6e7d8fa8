"""Register dock widget: pick the pair (and optional label maps), a model and a device, run in a worker thread.

Thin over :func:`napari_unireg.pipeline.register_volumes`: the widget turns layers into Volumes, runs the engine in
a napari worker thread (the GUI stays responsive), reports the engine's stages in the widget and in napari's
activity dock, cancels through ``should_stop`` and adds the result layers of the finished run. User layers are
never modified: the engine gets copies of their arrays.

The four layer pickers are magicgui ComboBoxes whose choices follow the viewer's layers (added, removed, renamed,
reordered). Their first guesses come from :mod:`.pairing` (fixed/moving never the same layer, label maps follow
their image); Run stays disabled, with the reason shown under it, while the inputs cannot be registered.

Scripts and tests: :meth:`RegisterWidget.run` does what the Run button does and returns the worker;
``widget.busy`` tells whether a run is in flight and the ``finished`` signal carries ``(status, payload)``
(``"ok"`` + the :class:`~napari_unireg._napari.runs.Run`, ``"cancelled"``, ``"error"`` + message).
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any

from psygnal import Signal
from qtpy.QtCore import QObject, QTimer
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_unireg.pipeline import STAGE_WEIGHTS, STAGES, RegisterOptions

log = logging.getLogger(__name__)

NONE = "(none)"
#: how long the settings must stay put before the model is warmed (a burst of picker changes warms once)
WARM_DELAY_MS = 400
#: the longest the engine waits for the GUI thread to show the layers before it computes the metrics
SHOW_TIMEOUT_S = 10.0
#: result kinds of a run that can be registered again (the other result layers are maps, not anatomy)
REUSABLE_KINDS = ("warped", "warped labels")
ROLES = ("fixed", "moving")
STAGE_TEXT = {
    "load": "loading the model and the images",
    "skullstrip": "brain extraction",
    "prealign": "affine pre-alignment",
    "inference": "deformable registration",
    "refinement": "instance-optimisation refinement",
    "metrics": "metrics",
    "write": "preparing the overlays",
}


def overall_fraction(stage: str, fraction: float, refinement: bool) -> float:
    """Progress of the whole run in [0, 1] from the engine's ``(stage, fraction within the stage)``."""
    # the engine's stage weights; the widget writes no files, and refinement counts only when asked for
    weights = {s: w for s, w in STAGE_WEIGHTS.items() if s != "write" and (refinement or s != "refinement")}
    total = float(sum(weights.values())) or 1.0
    done = 0.0
    for s in STAGES:
        if s == stage:
            return min(1.0, (done + weights.get(s, 0) * max(0.0, min(1.0, fraction))) / total)
        done += weights.get(s, 0)
    return 0.0


def model_tooltip(info: Any) -> str:
    """A model card as a tooltip: what it is, what it was trained on, its validation scores."""
    lines = [f"<b>{info.name}</b> ({info.family})", str(info.description or "")]
    try:
        lines.append(f"parameters: {int(info.params_total):,}")
    except (TypeError, ValueError):
        pass
    card = info.card or {}
    if not info.weights:
        lines.append("<i>no trained weights bundled: runs with random weights (for testing only)</i>")
    trained = card.get("trained_on") or card.get("training_data") or (card.get("training") or {}).get("data")
    if trained:
        lines.append(f"trained on: {trained}")
    metrics = card.get("metrics") or card.get("validation") or {}
    if isinstance(metrics, dict) and metrics:
        parts = []
        for key, label in (("dice", "Dice"), ("hd95", "HD95"), ("sdlogj", "SDlogJ"), ("ndv", "NDV %")):
            if metrics.get(key) is not None:
                try:
                    parts.append(f"{label} {float(metrics[key]):.3f}")
                except (TypeError, ValueError):
                    parts.append(f"{label} {metrics[key]}")
        if parts:
            lines.append("validation: " + ", ".join(parts))
    from napari_unireg.models.registry import RESOLUTION_MM as MM

    cards = getattr(info, "cards", None) or {}
    if len(cards) > 1:  # one weight file per resolution
        lines.append("weights: " + ", ".join(
            f"{MM.get(res, res)} (Dice {float(c['metrics']['dice']):.3f})" if (c.get("metrics") or {}).get("dice")
            is not None else MM.get(res, res) for res, c in cards.items()))
    elif card.get("resolution"):
        lines.append(f"resolution: {card['resolution']}")
    return "<br>".join(x for x in lines if x)


def list_model_choices() -> list[tuple[str, str, str]]:
    """``(label, value, tooltip)`` for the model picker: default, the registry's models, classical."""
    out: list[tuple[str, str, str]] = []
    try:
        from napari_unireg.pipeline import default_model_name

        default = default_model_name()
    except Exception:  # registry not importable (e.g. a model module missing): still offer classical
        default = "classical"
    out.append((f"default ({default})", "default", "The bundled model with the best validation Dice"))
    try:
        from napari_unireg.models.registry import list_models

        infos = list_models()
    except Exception as exc:
        log.warning("model registry unavailable: %s", exc)
        infos = []
    for info in sorted(infos, key=lambda m: (not m.weights, m.name)):
        label = info.name if info.weights else f"{info.name} (untrained)"
        out.append((label, info.name, model_tooltip(info)))
    out.append(
        (
            "classical (instance optimisation)",
            "classical",
            "No network: NCC + diffusion optimisation of the displacement, coarse to fine (slower, no training)",
        )
    )
    return out


def list_devices() -> list[tuple[str, str]]:
    """``(id, label)`` of what can really run here (engine.available_devices), CPU as the fallback."""
    try:
        from napari_unireg.pipeline import available_devices

        return list(available_devices())
    except Exception as exc:
        log.warning("device list unavailable: %s", exc)
        return [("cpu", "CPU")]


class _Relay(QObject):
    """Carries progress and the early result from the worker thread to the GUI thread (queued signals)."""

    progress = QtSignal(str, float)
    #: the fields on the fixed grid, before the metrics: (result, fixed, fixed_seg, moving, moving_seg, prebuilt,
    #: shown) where ``shown`` is a threading.Event the GUI sets once the layers are in the viewer
    fields = QtSignal(object)


class RegisterWidget(QWidget):
    """Dock widget running ``register_volumes`` on two layers of the viewer."""

    #: emitted in the GUI thread when a run ends: (status, payload)
    finished = Signal(str, object)

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.last_run = None
        #: extra RegisterOptions fields for scripts and tests (e.g. {"grid_shape": (32, 32, 32)})
        self.extra_options: dict[str, Any] = {}
        self._stop = threading.Event()
        self._pbar = None
        self._pbar_n = 0
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._relay.fields.connect(self._on_fields)
        #: the run whose layers are shown while its metrics are being computed
        self._pending_run = None
        #: the model is loaded and run once in the background as soon as Run could be pressed (see _warm)
        self._warm_thread: threading.Thread | None = None
        self._warmed_key: tuple | None = None
        self._warm_timer = QTimer(self)
        self._warm_timer.setSingleShot(True)
        self._warm_timer.setInterval(WARM_DELAY_MS)
        self._warm_timer.timeout.connect(self._warm)

        from magicgui.widgets import ComboBox

        #: the image layer the user or a guess put in each picker (magicgui shows its first choice otherwise)
        self._picked: dict[str, Any] = {r: None for r in ROLES}
        #: role -> magicgui ComboBox of image layers / of label layers (with "(none)")
        self.image_pickers = {r: ComboBox(choices=self._image_choices) for r in ROLES}
        self.label_pickers = {r: ComboBox(choices=self._label_choices, nullable=True) for r in ROLES}
        for picker in self.label_pickers.values():
            picker.null_string = NONE  # magicgui's "-----" would not say what it means
            picker.reset_choices()
        self.image_pickers["fixed"].tooltip = "The reference: results live on its grid"
        self.image_pickers["moving"].tooltip = "The image that is deformed onto the fixed one"
        self.label_pickers["fixed"].tooltip = "Optional label map on the fixed image's grid (for Dice / HD95)"
        self.label_pickers["moving"].tooltip = "Optional label map on the moving image's grid (warped with it)"
        self._syncing = False
        #: a label picker the user set by hand is not re-guessed when layers come and go (until its image changes)
        self._labels_by_hand = {r: False for r in ROLES}
        for role in ROLES:
            self.image_pickers[role].changed.connect(lambda _v, r=role: self._on_image_picked(r))
            self.label_pickers[role].changed.connect(lambda _v, r=role: self._on_labels_picked(r))

        self.cmb_model = QComboBox()
        self.cmb_device = QComboBox()
        self.chk_prealign = QCheckBox("affine pre-alignment")
        self.chk_prealign.setChecked(True)
        self.chk_prealign.setToolTip("Align the moving image affinely first (needed unless both are in MNI space)")
        self.chk_skullstrip = QCheckBox("brain extraction (auto)")
        self.chk_skullstrip.setChecked(True)
        self.chk_skullstrip.setToolTip("Extract the brain (deepbet) of an image that still has its skull before "
                                       "registering; already brain-extracted images are left as they are")
        self.chk_contrast = QCheckBox("standardise contrast (other scanners)")
        self.chk_contrast.setToolTip("Move each image's CSF, grey and white-matter intensities to those of the "
                                     "networks' training images before the network sees it: for scans from "
                                     "another scanner or sequence (shown and written images are unchanged)")
        self.cmb_resolution = QComboBox()
        self.cmb_resolution.addItems(["auto", "full", "half"])
        self.cmb_resolution.setToolTip("full: the network at 1 mm; half: at 2 mm, 8x fewer voxels: several times "
                                       "faster on a CPU and less memory, a coarser field. A model with weights for "
                                       "both runs the ones trained at it. auto: such a model's 1 mm weights on a "
                                       "GPU, its 2 mm weights on a CPU; any other model at the resolution it was "
                                       "trained at")
        self.spin_steps = QSpinBox()
        self.spin_steps.setRange(0, 5000)
        self.spin_steps.setSingleStep(10)
        self.spin_steps.setToolTip("Instance-optimisation steps after the network (0 = none): N at half resolution, "
                                   "then N/6 at full resolution; 30 is a good start")
        self.btn_run = QPushButton("Run")
        self.btn_cancel = QPushButton("Cancel")
        self.btn_cancel.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.lbl_status = QLabel("")
        self.lbl_status.setWordWrap(True)
        #: why Run is disabled (empty when it is not)
        self.lbl_reason = QLabel("")
        self.lbl_reason.setWordWrap(True)
        self.lbl_reason.setStyleSheet("color: #ffb347; font-size: 11px;")

        form = QFormLayout()
        form.addRow("fixed image", self.image_pickers["fixed"].native)
        form.addRow("moving image", self.image_pickers["moving"].native)
        form.addRow("fixed labels", self.label_pickers["fixed"].native)
        form.addRow("moving labels", self.label_pickers["moving"].native)
        form.addRow("model", self.cmb_model)
        form.addRow("device", self.cmb_device)
        form.addRow("", self.chk_prealign)
        form.addRow("", self.chk_skullstrip)
        form.addRow("", self.chk_contrast)
        form.addRow("resolution", self.cmb_resolution)
        form.addRow("refinement steps", self.spin_steps)
        buttons = QHBoxLayout()
        buttons.addWidget(self.btn_run)
        buttons.addWidget(self.btn_cancel)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.lbl_reason)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.lbl_status)
        # no vertical stretch: the dock takes what the form needs and leaves the rest to the linked views
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)

        self.populate_models()
        self.populate_devices()
        self.refresh_pickers()
        self.btn_run.clicked.connect(self.run)
        self.btn_cancel.clicked.connect(self.cancel)
        for combo in (self.cmb_model, self.cmb_device, self.cmb_resolution):
            combo.currentIndexChanged.connect(lambda _i: self._update_run_state())
        events = napari_viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered, events.renamed):
            ev.connect(self.refresh_pickers)

    # ------------------------------------------------------------------ pickers
    def populate_models(self) -> None:
        self.cmb_model.clear()
        for i, (label, value, tip) in enumerate(list_model_choices()):
            self.cmb_model.addItem(label, value)
            self.cmb_model.setItemData(i, tip, role=3)  # Qt.ToolTipRole
        self.cmb_model.setToolTip("Hover an entry for its model card")

    def populate_devices(self) -> None:
        self.cmb_device.clear()
        for dev_id, label in list_devices():
            self.cmb_device.addItem(label, dev_id)

    def set_model(self, value: str) -> None:
        idx = self.cmb_model.findData(value)
        if idx < 0:
            raise ValueError(f"model {value!r} is not in the list")
        self.cmb_model.setCurrentIndex(idx)

    # layers on offer: 3D grey-level images / label maps; of the result layers only the warped ones
    def _offered(self, kind: str) -> list[Any]:
        from .runs import META_KEY

        out = []
        for lay in self.viewer.layers:
            if lay._type_string != kind or getattr(lay, "ndim", 0) != 3 or getattr(lay, "rgb", False):
                continue
            result_kind = ((lay.metadata or {}).get(META_KEY) or {}).get("kind")
            if result_kind is None or result_kind in REUSABLE_KINDS:
                out.append(lay)
        return out

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lay.name, lay) for lay in self._offered("image")]

    def _label_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lay.name, lay) for lay in self._offered("labels")]  # + "(none)": the pickers are nullable

    def inputs(self) -> tuple[Any, Any, Any, Any]:
        """(fixed, moving, fixed labels, moving labels) layers as picked (None where nothing is)."""
        return (
            self.image_pickers["fixed"].value,
            self.image_pickers["moving"].value,
            self.label_pickers["fixed"].value,
            self.label_pickers["moving"].value,
        )

    def set_inputs(self, fixed: Any, moving: Any, fixed_labels: Any = None, moving_labels: Any = None) -> None:
        """Pick the layers (objects or names; None for no label map) as the user would in the pickers."""

        def find(x: Any, picker: Any) -> Any:
            if x is None or not isinstance(x, str):
                return x
            match = [c for c in picker.choices if c is not None and c.name == x]
            if not match:
                raise ValueError(f"no layer {x!r} to pick")
            return match[0]

        self._syncing = True
        try:
            for role, value in (("fixed", fixed), ("moving", moving)):
                self.image_pickers[role].value = self._picked[role] = find(value, self.image_pickers[role])
            for role, value in (("fixed", fixed_labels), ("moving", moving_labels)):
                self.label_pickers[role].value = find(value, self.label_pickers[role])
                self._labels_by_hand[role] = True
        finally:
            self._syncing = False
        self._update_run_state()

    def refresh_pickers(self, event: Any = None) -> None:
        """Follow the viewer's layers: new choices, picks kept where their layer still exists, guesses for the
        rest (connected to the layer list's inserted/removed/reordered/renamed events)."""
        self._syncing = True
        try:
            for role, picker in self.image_pickers.items():
                before = self._picked[role]
                picker.reset_choices()
                # magicgui matches by text: a renamed layer would lose its place; keep the layer object instead
                if before is not None and any(c is before for c in picker.choices):
                    picker.value = before
                else:  # nothing picked yet, or the layer went (magicgui fell back to its first choice)
                    self._picked[role] = None
            for picker in self.label_pickers.values():
                before = picker.value
                picker.reset_choices()
                if before is not None and any(c is before for c in picker.choices):
                    picker.value = before
            self._guess()
        finally:
            self._syncing = False
        self._update_run_state()

    def _guess(self) -> None:
        """Fill the image pickers that hold nothing sensible (see :mod:`.pairing`, user layers only), then the
        label pickers that are empty and were not set by hand."""
        from . import pairing
        from .runs import META_KEY

        images = [lay for lay in self._offered("image") if META_KEY not in (lay.metadata or {})]
        ids = [id(x) for x in images]
        cur = dict(self._picked)
        if cur["fixed"] is None or cur["moving"] is None or cur["fixed"] is cur["moving"]:
            keep = {r: ids.index(id(cur[r])) if cur[r] is not None and id(cur[r]) in ids else None for r in ROLES}
            f, m = pairing.choose_pair([x.name for x in images], keep["fixed"], keep["moving"])
            for role, i in (("fixed", f), ("moving", m)):
                if i is not None and images[i] is not cur[role]:
                    self.image_pickers[role].value = self._picked[role] = images[i]
                    self._labels_by_hand[role] = False
                    self._follow_labels(role)
        for role in ROLES:
            if not self._labels_by_hand[role] and self.label_pickers[role].value is None:
                self._follow_labels(role)

    def _follow_labels(self, role: str) -> None:
        """Put the label map named like the ``role`` image on its grid into its picker (or none)."""
        from . import pairing
        from .runs import META_KEY

        image = self.image_pickers[role].value
        picker = self.label_pickers[role]
        if image is None:
            picker.value = None
            return
        cands = [
            lay
            for lay in self._offered("labels")
            if META_KEY not in (lay.metadata or {}) and grid_problem(lay, image) is None
        ]
        i = pairing.labels_for(image.name, [x.name for x in cands])
        picker.value = cands[i] if i is not None else None

    def _on_image_picked(self, role: str) -> None:
        if self._syncing:
            return
        self._picked[role] = self.image_pickers[role].value
        self._syncing = True
        try:
            self._labels_by_hand[role] = False
            self._follow_labels(role)  # the label map follows its image
        finally:
            self._syncing = False
        self._update_run_state()

    def _on_labels_picked(self, role: str) -> None:
        if not self._syncing:
            self._labels_by_hand[role] = True
        self._update_run_state()

    def problem(self) -> str:
        """Why the picked inputs cannot be registered ("" when they can)."""
        fixed, moving, fseg, mseg = self.inputs()
        if len(self._offered("image")) < 2:
            return "Open two 3D images (File > Open, or File > Open Sample > napari-unireg)."
        if fixed is None or moving is None:
            return "Pick a fixed and a moving image layer."
        if fixed is moving:
            return "The fixed and the moving image are the same layer."
        for role, seg, image in (("fixed", fseg, fixed), ("moving", mseg, moving)):
            if seg is not None:
                why = grid_problem(seg, image)
                if why:
                    return f"The {role} labels {seg.name!r} {why} of the {role} image {image.name!r}."
        return ""

    def _update_run_state(self) -> None:
        if not hasattr(self, "lbl_reason"):  # a picker signal while the widget is still being built
            return
        why = "" if self.busy else self.problem()
        self.lbl_reason.setText(why)
        self.lbl_reason.setVisible(bool(why))
        self.btn_run.setEnabled(not self.busy and not why)
        self.btn_run.setToolTip(why or "Register the moving image onto the fixed one")
        if not why and not self.busy:
            self._warm_timer.start()  # (re)starts the delay

    # ------------------------------------------------------------------ warm-up
    def _warm_key(self, options: RegisterOptions, layers: tuple) -> tuple:
        return (options.model, options.checkpoint, options.device, options.resolution, tuple(options.grid_shape),
                options.amp, options.prealign, options.skull_strip, *(id(lay.data) for lay in layers))

    def _warm(self) -> None:
        """Load the chosen network and run it once on an empty pair, and find the picked pair's affine
        pre-alignment, in a thread while the user is still looking at the inputs: the first Run then starts warm
        (:func:`napari_unireg.pipeline.warm_up`)."""
        if self.busy or (self._warm_thread is not None and self._warm_thread.is_alive()):
            return
        fixed, moving, _fseg, _mseg = self.inputs()
        try:
            options = self.options()
        except Exception:  # a setting the engine will refuse with a message when Run is pressed
            return
        if fixed is None or moving is None or fixed is moving:
            return
        key = self._warm_key(options, (fixed, moving))
        if key == self._warmed_key:
            return
        self._warmed_key = key
        pair = [self._snapshot(lay) for lay in (fixed, moving)]  # taken here, in the GUI thread

        def warm() -> None:
            from napari_unireg.pipeline import warm_up

            try:
                warm_up(options, *(_volume(s) for s in pair))  # the same copies a Run makes: the same digest
            except Exception as exc:  # Run reports the problem; a warm-up never does
                log.debug("warm-up of %s skipped: %s", options.model, exc)

        self._warm_thread = threading.Thread(target=warm, name="unireg-warm-up", daemon=True)
        self._warm_thread.start()

    def options(self) -> RegisterOptions:
        """The RegisterOptions the current settings describe."""
        return RegisterOptions(
            model=self.cmb_model.currentData() or "default",
            device=self.cmb_device.currentData() or "auto",
            prealign="affine" if self.chk_prealign.isChecked() else "none",
            skull_strip="auto" if self.chk_skullstrip.isChecked() else "off",
            contrast="standardize" if self.chk_contrast.isChecked() else "scale",
            resolution=self.cmb_resolution.currentText(),
            io_steps=int(self.spin_steps.value()),
            **self.extra_options,
        )

    # ------------------------------------------------------------------ run
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def run(self) -> Any:
        """Start a registration (what the Run button does); returns the worker, or None when refused."""
        from napari.utils.notifications import show_error, show_warning

        if self.busy:
            show_warning("A registration is already running: wait for it or cancel it first.")
            return None
        fixed, moving, fseg, mseg = self.inputs()
        problem = self.problem()
        if problem:
            show_error(problem)
            self._set_status(problem, error=True)
            return None
        options = self.options()
        inputs = [self._snapshot(lay) for lay in (fixed, moving, fseg, mseg)]
        self._stop.clear()
        self._pbar_n = 0
        self._refinement = options.io_steps > 0
        self._names = tuple(None if lay is None else lay.name for lay in (fixed, moving, fseg, mseg))
        self._label_names = dict(
            ((fseg.metadata if fseg is not None else {}) or {}).get("label_names")
            or ((mseg.metadata if mseg is not None else {}) or {}).get("label_names")
            or {}
        )
        self._start_progress()
        self.btn_run.setEnabled(False)
        self.btn_cancel.setEnabled(True)
        self._set_status(f"running {options.model} on {moving.name} → {fixed.name} …")

        from napari.qt.threading import create_worker

        relay = self._relay
        stop = self._stop
        self._warm_timer.stop()
        self._pending_run = None
        worker = create_worker(
            _register_job, inputs, options, relay.progress.emit, stop.is_set, relay.fields.emit, self._warm_thread,
            _start_thread=False,
        )
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    @staticmethod
    def _snapshot(layer: Any) -> Any:
        """What the worker needs from a layer, taken in the GUI thread: (data, affine, nifti meta, name, kind)."""
        if layer is None:
            return None
        from .convert import NIFTI_KEY, layer_affine

        kind = "label" if layer._type_string == "labels" else "image"
        return (layer.data, layer_affine(layer), (layer.metadata or {}).get(NIFTI_KEY), layer.name, kind)

    def cancel(self) -> None:
        """Ask the running registration to stop (the engine checks between steps)."""
        if self.busy:
            self._stop.set()
            self.btn_cancel.setEnabled(False)
            self._set_status("cancelling …")

    def _start_progress(self) -> None:
        from napari.utils import progress

        self._close_progress()
        self.progress_bar.setValue(0)
        self._pbar = progress(total=1000, desc="UniReg")

    def _close_progress(self) -> None:
        if self._pbar is not None:
            try:
                self._pbar.close()
            except Exception:
                pass
            self._pbar = None

    def _on_progress(self, stage: str, fraction: float) -> None:
        if not self.busy:  # a late message after the run ended
            return
        value = int(round(1000 * overall_fraction(stage, fraction, self._refinement)))
        self.progress_bar.setValue(value)
        text = STAGE_TEXT.get(stage, stage)
        if not self._stop.is_set():
            self._set_status(f"{text} … {int(round(100 * fraction))}%")
        pbar = self._pbar
        if pbar is not None:
            # napari's progress may process events while updating: the run can finish (and close the bar) inside
            pbar.set_description(f"UniReg: {text}")
            if value > self._pbar_n and self._pbar is pbar:
                pbar.update(value - self._pbar_n)
                self._pbar_n = value

    def _set_status(self, text: str, error: bool = False) -> None:
        self.lbl_status.setStyleSheet("color: #ff6b6b;" if error else "")
        self.lbl_status.setText(text)

    def _on_fields(self, payload: tuple) -> None:
        """The fields are on the fixed grid: show the layers now; the metrics follow (``_on_returned``)."""
        shown = payload[-1]
        try:
            if not self.busy:
                return
            self._pending_run = self._add_run(payload[:-1])
        except Exception:  # the viewer may have been closed meanwhile; _on_returned tries once more
            log.exception("could not show the result")
            self._pending_run = None
            return
        finally:
            shown.set()
        self._set_status(f"{self._pending_run.tag}: layers shown; computing the metrics …")

    def _on_returned(self, outcome: tuple[str, Any]) -> None:
        from napari.utils.notifications import show_error, show_info

        status, payload = outcome
        run, self._pending_run = self._pending_run, None
        if status == "ok":
            try:
                if run is None:
                    run = self._add_run(payload)
                else:
                    from .runs import get_store

                    get_store(self.viewer).update(run, payload[0])  # the metrics, into the run already shown
            except Exception as exc:  # the viewer may have been closed meanwhile
                log.exception("could not show the result")
                status, payload = "error", f"could not show the result: {exc}"
            else:
                payload = run
                secs = (run.result.seconds or {}).get("total")
                dice = run.metrics.get("dice")
                msg = f"done: {run.tag}" + (f" in {secs:.1f} s" if secs else "")
                if dice is not None:
                    # the engine's "before" is measured after the affine pre-alignment when there is one: say so
                    before = "affine" if run.options.prealign == "affine" else "before"
                    msg += f", Dice {before} {run.metrics.get('dice_before', float('nan')):.3f} → {dice:.3f}"
                if not run.result.weights_trained:
                    msg += " (untrained weights!)"
                self._set_status(msg)
                show_info(f"UniReg {msg}")
        if status == "cancelled":
            self._set_status("cancelled" + (" (the layers are shown, without metrics)" if run is not None else ""))
            show_info("UniReg: registration cancelled")
        elif status == "error":
            self._set_status(str(payload), error=True)
            show_error(f"UniReg: {payload}")
        self._outcome = (status, payload)

    def _on_finished(self) -> None:
        self._close_progress()
        self.btn_cancel.setEnabled(False)
        self.worker = None
        self._update_run_state()
        status, payload = getattr(self, "_outcome", ("error", "the worker ended without a result"))
        self._outcome = None
        self.progress_bar.setValue(1000 if status == "ok" else 0)
        self.finished.emit(status, payload)

    def _add_run(self, payload: tuple) -> Any:
        from . import show
        from .convert import nifti_meta
        from .runs import DEFAULT_KINDS, DEFAULT_VISIBLE, FIRST_KINDS, get_store

        result, fixed_vol, fixed_seg_vol, moving_vol, moving_seg_vol = payload[:5]
        prebuilt = payload[5] if len(payload) > 5 else {}
        fixed_name, moving_name, fseg_name, mseg_name = self._names
        store = get_store(self.viewer)
        run = store.add(
            fixed_name=fixed_name,
            moving_name=moving_name,
            model=result.model_name or "model",
            result=result,
            affine=fixed_vol.affine,
            fixed=fixed_vol.data,
            options=self.options(),
            fixed_seg=None if fixed_seg_vol is None else fixed_seg_vol.data,
            moving=moving_vol.data,
            moving_affine=moving_vol.affine,
            moving_seg=None if moving_seg_vol is None else moving_seg_vol.data,
            fixed_seg_name=fseg_name,
            moving_seg_name=mseg_name,
            label_names=self._label_names,
            nifti=nifti_meta(fixed_vol),
            prebuilt=prebuilt,
        )
        for kind in FIRST_KINDS:
            show.add_kind(self.viewer, run, kind, visible=kind in DEFAULT_VISIBLE)
        self.viewer.layers.selection.active = show.layers_of(self.viewer, run, "warped")[0]
        from .status import install

        install(self.viewer)  # hover read-out of u and J in the status bar
        self.last_run = run

        def rest() -> None:
            if run not in store.runs:  # removed meanwhile
                return
            for kind in DEFAULT_KINDS:
                if kind not in FIRST_KINDS:
                    show.add_kind(self.viewer, run, kind, visible=kind in DEFAULT_VISIBLE)
            show.order_kinds(self.viewer, run, DEFAULT_KINDS)

        QTimer.singleShot(0, rest)  # the next event-loop turn: the first layers are drawn before these are built
        return run


def grid_problem(labels: Any, image: Any) -> str | None:
    """Why a labels layer is not on an image layer's voxel grid (shape and data→world matrix), or None."""
    import numpy as np

    from .convert import layer_affine

    if tuple(labels.data.shape) != tuple(image.data.shape):
        return f"(shape {tuple(labels.data.shape)}) are not on the grid (shape {tuple(image.data.shape)})"
    if not np.allclose(layer_affine(labels), layer_affine(image), atol=1e-4):
        return "have another voxel-to-world matrix than the grid"
    return None


def _volume(snapshot: Any) -> Any:
    """A canonical Volume from a layer snapshot (a private copy: the user's layer is never touched)."""
    import numpy as np

    from napari_unireg.io import volume_from_array

    if snapshot is None:
        return None
    data, affine, nifti, name, kind = snapshot
    arr = np.array(np.asarray(data), copy=True)
    vol = volume_from_array(arr, affine, kind=kind, name=name)
    if nifti is not None and tuple(nifti.get("shape", ())) == vol.shape:
        vol.header = nifti.get("header")
        vol.original_affine = np.asarray(nifti["original_affine"], dtype=np.float64)
        vol.original_shape = tuple(nifti["original_shape"])
        vol.ornt = np.asarray(nifti["ornt"])
    return vol


def _register_job(inputs: list, options: RegisterOptions, progress: Any, should_stop: Any,
                  show_fields: Any = None, warming: threading.Thread | None = None) -> tuple[str, Any]:
    """Runs in the worker thread. Never raises: napari would show a traceback dialog; returns (status, payload).

    ``show_fields(payload)`` gets the layers' data as soon as the fields are on the fixed grid (before the
    metrics); ``warming``: the warm-up thread, waited for so that the two do not share the cores."""
    from napari_unireg.pipeline import Cancelled
    from napari_unireg.errors import UserError

    try:
        progress("load", 0.0)
        while warming is not None and warming.is_alive():
            warming.join(timeout=0.2)
            if should_stop():
                raise Cancelled()
        fixed, moving, fseg, mseg = (_volume(s) for s in inputs)
        from napari_unireg.pipeline import register_volumes

        from .results import precompute

        prebuilt: dict = {}

        def fields(early) -> None:
            # the overlays' costly parts here, not in the GUI thread: the layers then appear at once
            prebuilt.update(precompute(early, None if fseg is None else fseg.data))
            if show_fields is not None:
                shown = threading.Event()
                show_fields((early, fixed, fseg, moving, mseg, prebuilt, shown))
                # the metrics wait until the GUI thread has added the layers: computed meanwhile they would
                # compete with it for the cores and the GIL and the layers would come ~1 s later
                shown.wait(timeout=SHOW_TIMEOUT_S)

        result = register_volumes(
            fixed, moving, fseg, mseg, options=options, progress=progress, should_stop=should_stop, on_fields=fields
        )
        return "ok", (result, fixed, fseg, moving, mseg, prebuilt)
    except Cancelled:
        return "cancelled", None
    except UserError as exc:
        return "error", str(exc)
    except MemoryError:
        return "error", "out of memory: try resolution 'half' or another device"
    except Exception as exc:  # keep the viewer alive; the traceback goes to the log, the message to the user
        log.error("registration failed:\n%s", traceback.format_exc())
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "out of memory" in msg.lower():
            return "error", "out of memory on the device: try resolution 'half' or the CPU"
        return "error", f"registration failed ({type(exc).__name__}: {msg})"
