"""The training loop: §8 losses, §9 optimiser/schedule/pair directions, validation, checkpoints, export.

Steps are optimiser steps. (a)/(c) models take two steps per loaded pair (moving→fixed, then fixed→moving);
inverse-consistent (b) models take one step per pair with the symmetric loss, which counts as two directed
pairs. The learning-rate schedule runs on "epochs" of ``optim.pairs_per_epoch`` directed pairs and, as in the
authors' code, is updated after every step with the position *before* that step.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import checkpointing as ckpt
from . import distributed as dist_utils
from .config import RESUME_SAFE_KEYS, Config, config_diff, config_from_dict, save_config
from .precision import amp_dtype as _amp_dtype
from .data import (
    PairDataset,
    PairPlan,
    TrainingSet,
    VolumeLoader,
    discover,
    downsample_image,
    downsample_labels,
    make_loader,
)

__all__ = ["TrainResult", "StepPlan", "plan_steps", "train", "validate", "train_step", "LAST", "BEST"]

LAST = "last.pt"
BEST = "best"
LOG = "log.csv"
VAL_LOG = "val.csv"
LOG_FIELDS = [
    "step",
    "epoch",
    "loss",
    "sim",
    "reg",
    "dice_loss",
    "lr",
    "seconds",
    "data_seconds",
    "elapsed",
    "synthetic",
    "skipped",
]
VAL_FIELDS = ["step", "epoch", "dice", "ndv", "sdlogj", "folded_pct", "sim", "n_pairs", "seconds", "best"]


@dataclass
class StepPlan:
    """How a run's steps relate to pairs and epochs."""

    symmetric: bool
    bidir: bool
    steps_per_pair: int  # optimiser steps per loaded pair batch
    pairs_per_step: int  # directed pairs one step consumes (all ranks, whole batch)
    total_steps: int
    val_every: int  # steps; 0 = only the final validation

    def epoch(self, step: int, pairs_per_epoch: int) -> float:
        return step * self.pairs_per_step / pairs_per_epoch


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 also wrote everything under ``out_dir``)."""

    model: Any  # the trained network (unwrapped), weights as after the last step
    step: int
    total_steps: int
    out_dir: Path
    best: dict[str, Any] | None = None
    last_val: dict[str, Any] | None = None
    exported: tuple[Path, Path] | None = None
    interrupted: bool = False
    wall_time: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    time_limited: bool = False  # ended by optim.time_limit_s (cleanly: validated and exported)


# --------------------------------------------------------------------------------------------- planning
def plan_steps(cfg: Config, symmetric: bool, world: int = 1) -> StepPlan:
    """Steps per pair, directed pairs per step, total steps and the validation interval."""
    o = cfg.optim
    directions = o.directions
    if directions == "auto":
        directions = "single" if symmetric else "bidir"
    if directions not in ("bidir", "single"):
        raise UserError(f"optim.directions must be auto, bidir or single, not {o.directions!r}")
    bidir = directions == "bidir"
    per_step = (2 if symmetric else 1) * o.batch_size * world
    if cfg.steps is not None:
        total = int(cfg.steps)
    else:
        total = int(math.ceil(o.epochs * o.pairs_per_epoch / per_step))
    if total < 1:
        raise UserError(f"steps must be at least 1, got {total}")
    if cfg.val.every_steps is not None:
        val_every = max(0, int(cfg.val.every_steps))
    elif cfg.val.every_epochs > 0:
        val_every = max(1, int(round(cfg.val.every_epochs * o.pairs_per_epoch / per_step)))
    else:
        val_every = 0
    return StepPlan(symmetric, bidir, 2 if bidir else 1, per_step, total, val_every)


def _apply_warmup(optimizer: Any, cfg: Config, next_step: int) -> None:
    """Scale the learning rate of the coming step by ``min(1, (next_step + 1) / warmup_steps)``.

    The cosine schedule recomputes its value from the base rate at every step, so the factor never compounds;
    with the constant schedule the rate is set from ``optim.lr`` directly.
    """
    w = cfg.optim.warmup_steps
    if cfg.optim.schedule == "constant":
        for g in optimizer.param_groups:
            g["lr"] = cfg.optim.lr * (min(1.0, (next_step + 1) / w) if w > 0 else 1.0)
    elif w > 0 and next_step < w:
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * (next_step + 1) / w


#: steps measured (after the first, which warms up) before a time-boxed run plans its length
TIME_PLAN_STEPS = 3
#: fractions of the box at which the plan is made again from the steps since the last plan: the first steps are
#: slower than the rest, and a job that shared the cores for a while misleads one estimate (the last one at 3/4:
#: session 26's box planned at half time while a test run shared the cores and, once they were free again, ran
#: out of planned steps 11 minutes before its box ended)
REPLAN_AT = (0.25, 0.5, 0.75)
#: a new plan within this fraction of the old length keeps the old one (no needless bump of the schedule)
REPLAN_TOLERANCE = 0.02
#: the clock of the time box (a module attribute, so a test can drive it)
_clock = time.perf_counter


class _TimeBox:
    """``optim.time_limit_s``: when to stop, and (``optim.time_plan``) how many steps fit.

    The limit counts from the start of this call of :func:`train` (setup included; a resumed run gets a fresh
    box) and covers the steps and periodic validations; the final validation and export come after it (leave
    room for them). A step is the wall time between two :meth:`record` calls (data, step, logging). A step is
    not started when the mean step (+ the last periodic validation, when one falls due) would cross the limit.
    The plan is made after ``TIME_PLAN_STEPS`` timed steps, then again at each ``REPLAN_AT`` fraction of the
    limit from the steps timed since the previous plan; the step estimate is their mean.
    """

    def __init__(self, limit: float | None, t_start: float, plan_steps: bool) -> None:
        self.limit = float(limit) if limit else None
        self.t_start = self._last = t_start
        self.pending = bool(self.limit) and plan_steps
        self.replans = list(REPLAN_AT) if self.pending else []
        self.times: list[float] = []
        self.since = 1  # first step of the estimate window (step 0 carries the warm-up and predicts nothing)
        self.planned_estimate = 0.0  # the estimate the last plan used (until the new window has steps)
        self.val_seconds = 0.0

    def record(self, now: float) -> None:
        """A step ended at ``now`` (a validation in between is not part of it: call :meth:`skip_to` after one)."""
        self.times.append(now - self._last)
        self._last = now

    def skip_to(self, now: float) -> None:
        self._last = now

    def step_estimate(self) -> float:
        """Mean seconds of the steps since the last plan (of those after the first until one; 0 before any)."""
        timed = self.times[self.since:]
        return sum(timed) / len(timed) if timed else self.planned_estimate

    def plan_due(self, now: float) -> bool:
        """Once after TIME_PLAN_STEPS timed steps, then at each REPLAN_AT fraction of the limit once
        TIME_PLAN_STEPS more steps were timed."""
        if self.pending:
            return len(self.times) >= TIME_PLAN_STEPS + 1
        return bool(self.replans) and now - self.t_start >= self.replans[0] * self.limit and (
            len(self.times) - self.since >= TIME_PLAN_STEPS
        )

    def steps_that_fit(self, now: float, due: bool | None = None) -> int | None:
        """How many more steps fit in the limit when a plan is due (else None). ``due`` overrides
        :meth:`plan_due` (ranks of a distributed run agree on it first: their clocks differ a little)."""
        if not (self.plan_due(now) if due is None else due):
            return None
        if self.pending:
            self.pending = False
        elif self.replans:
            self.replans.pop(0)
        est = self.planned_estimate = self.step_estimate()
        self.since = len(self.times)
        left = self.limit - (now - self.t_start) - self.val_seconds
        return max(1, int(left / est)) if est > 0 else None

    def out_of_time(self, now: float, val_next: bool) -> bool:
        if not self.limit:
            return False
        need = self.step_estimate() + (self.val_seconds if val_next else 0.0)
        return now - self.t_start + need > self.limit


def _replan_schedule(scheduler: Any, optimizer: Any, cfg: Config, plan: StepPlan, step: int) -> None:
    """One cosine period from here to ``plan.total_steps`` (a time-boxed run that planned its length).

    ``CosineAnnealingWarmRestarts`` checks ``T_0`` only in its constructor; its arithmetic takes a float period.
    """
    if scheduler is None:
        return
    period = plan.epoch(plan.total_steps, cfg.optim.pairs_per_epoch)
    scheduler.T_0 = scheduler.T_i = period
    scheduler.step(plan.epoch(step - 1, cfg.optim.pairs_per_epoch))  # §9: the position before the last step
    _apply_warmup(optimizer, cfg, step)


def _validate_cfg(cfg: Config) -> None:
    if cfg.data.resolution not in ("full", "half"):
        raise UserError(f"data.resolution must be full or half, not {cfg.data.resolution!r}")
    if cfg.optim.schedule not in ("cosine_restarts", "constant"):
        raise UserError(f"optim.schedule must be cosine_restarts or constant, not {cfg.optim.schedule!r}")
    if cfg.loss.dice_pairs not in ("all", "synthetic"):
        raise UserError(f"loss.dice_pairs must be all or synthetic, not {cfg.loss.dice_pairs!r}")
    if cfg.loss.window < 3 or cfg.loss.window % 2 == 0:
        raise UserError(f"loss.window must be an odd number of voxels ≥ 3, not {cfg.loss.window}")
    if cfg.loss.full_resolution and cfg.data.resolution != "half":
        raise UserError("loss.full_resolution=true needs data.resolution=half (at full resolution the loss already is)")
    if cfg.loss.symmetric not in ("auto", "true", "false", "True", "False"):
        raise UserError(f"loss.symmetric must be auto, true or false, not {cfg.loss.symmetric!r}")
    if cfg.synth.contrast not in ("random", "t1", "mixed"):
        raise UserError(f"synth.contrast must be random, t1 or mixed, not {cfg.synth.contrast!r}")
    if cfg.val.metric not in ("auto", "dice", "sim"):
        raise UserError(f"val.metric must be auto, dice or sim, not {cfg.val.metric!r}")
    if cfg.optim.batch_size < 1:
        raise UserError("optim.batch_size must be at least 1")
    if len(cfg.data.grid_shape) != 3:
        raise UserError("data.grid_shape needs 3 sizes")
    if cfg.data.resolution == "half" and any(s % 2 for s in cfg.data.grid_shape):
        raise UserError(f"data.grid_shape {cfg.data.grid_shape} must be even for half resolution")
    if not 0.0 <= cfg.synth.prob <= 1.0:
        raise UserError("synth.prob must be in [0, 1]")
    if cfg.optim.time_limit_s is not None and cfg.optim.time_limit_s <= 0:
        raise UserError(f"optim.time_limit_s must be positive (seconds), not {cfg.optim.time_limit_s}")


# --------------------------------------------------------------------------------------------- one step
def _onehot(labels, k: int):
    import torch.nn.functional as F

    return F.one_hot(labels[:, 0].clamp(0, k - 1), k).permute(0, 4, 1, 2, 3).float()


def _dice_term(fixed_lab, moving_lab, disp):
    from ..core.losses import dice_loss
    from ..core.sample import warp

    k = int(max(int(fixed_lab.max()), int(moving_lab.max()))) + 1
    if k < 2:
        return disp.new_zeros(())
    warped = warp(_onehot(moving_lab, k), disp)
    return dice_loss(_onehot(fixed_lab, k)[:, 1:], warped[:, 1:])


def train_step(
    model: Any,
    optimizer: Any,
    moving: Any,
    fixed: Any,
    *,
    lam: float = 1.0,
    window: int = 9,
    symmetric: bool = False,
    amp_dtype: Any = None,
    scaler: Any = None,
    dice_weight: float = 0.0,
    moving_label: Any = None,
    fixed_label: Any = None,
    grad_clip: float | None = None,
    pool: int = 1,
) -> dict[str, float]:
    """One optimiser step on a batch: §8 loss (symmetric for IC models), optional Dice term. Returns the terms.

    ``pool`` > 1 (``loss.full_resolution``): ``moving``/``fixed`` (and labels) are on the full grid; the network
    sees them average-pooled by ``pool`` and its field is brought up to the full grid for the similarity, as
    ``register`` brings it up at inference; the diffusion and Dice terms stay on the network's grid.
    """
    import torch
    import torch.nn.functional as F

    from ..core.losses import registration_loss
    from ..core.sample import upsample_pooled_flow
    from ..models.output import RegistrationOutput

    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = moving.device.type
    net_moving, net_fixed = (moving, fixed) if pool == 1 else (F.avg_pool3d(moving, pool), F.avg_pool3d(fixed, pool))
    with torch.autocast(device_type=device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(net_moving, net_fixed)
    disp = out.disp.float()
    inverse = out.inverse.float() if (symmetric and out.inverse is not None) else None
    if symmetric and inverse is None:
        raise UserError("loss.symmetric needs an inverse-consistent model (one that returns the inverse field)")
    net_field = RegistrationOutput(disp, inverse) if inverse is not None else disp
    target = net_field
    if pool > 1:
        up = upsample_pooled_flow(disp, pool)
        target = RegistrationOutput(up, upsample_pooled_flow(inverse, pool)) if inverse is not None else up
        if moving_label is not None and fixed_label is not None:  # the Dice term stays on the network's grid
            moving_label, fixed_label = downsample_labels(moving_label, pool), downsample_labels(fixed_label, pool)
    loss, sim, reg = registration_loss(
        fixed, moving, target, lam, window=window, return_terms=True, reg_out=net_field
    )
    dl = torch.zeros((), device=moving.device)
    if dice_weight > 0 and moving_label is not None and fixed_label is not None:
        dl = _dice_term(fixed_label, moving_label, disp)
        if inverse is not None:
            dl = 0.5 * (dl + _dice_term(moving_label, fixed_label, inverse))
        loss = loss + dice_weight * dl
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}); lower the learning rate or disable amp")
    skipped = 0
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if not _grads_finite(model):
            # A finite loss with non-finite gradients: seen sporadically in oneDNN's bf16 weight gradients on
            # CPUs without AMX. Skip the update, as GradScaler does for fp16, instead of poisoning the weights
            # (with DDP the all-reduce spreads the NaN, so every rank skips together).
            optimizer.zero_grad(set_to_none=True)
            skipped = 1
        else:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
    return {
        "loss": float(loss.detach()),
        "sim": float(sim.detach()),
        "reg": float(reg.detach()),
        "dice_loss": float(dl.detach()),
        "skipped": skipped,
    }


def _grads_finite(model: Any) -> bool:
    import torch

    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


# --------------------------------------------------------------------------------------------- validation
def validate(model: Any, tset: TrainingSet, cfg: Config, device: Any, amp_dtype: Any = None) -> dict[str, Any] | None:
    """Mean Dice / NDV / SDlogJ / folded % / L_sim over the validation pairs (None when there are none).

    The network runs at the training resolution; with ``val.full_resolution`` its field is resized to the full
    grid (as ``unireg register`` does) and the metrics are computed on the full-resolution label maps. ``sim`` is
    the loss's similarity (its window; on the full grid with ``loss.full_resolution``).
    """
    import torch

    from ..core.losses import ncc_vfa
    from ..core.metrics import dice_mean, folded_percent, ndv, sdlogj, warp_labels_nearest
    from ..core.sample import resize_flow, upsample_pooled_flow, warp

    pairs = tset.val_pairs[: cfg.val.max_pairs] if cfg.val.max_pairs else tset.val_pairs
    if not pairs:
        return None
    factor = 2 if cfg.data.resolution == "half" else 1
    loader = VolumeLoader(cfg.data.grid_shape, 1, cache_size=0, cache_dir=None)
    rows = []
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for fe, me in pairs:
            fix_full = loader.get(fe.image, "image")
            mov_full = loader.get(me.image, "image")
            fix = torch.from_numpy(np.ascontiguousarray(downsample_image(fix_full, factor), dtype=np.float32))[
                None, None
            ]
            mov = torch.from_numpy(np.ascontiguousarray(downsample_image(mov_full, factor), dtype=np.float32))[
                None, None
            ]
            fix, mov = fix.to(device), mov.to(device)
            with torch.no_grad():
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = model(mov, fix)
                disp = out.disp.float()
                if cfg.loss.full_resolution:  # the similarity of the loss: on the full grid
                    f_t, m_t = (torch.from_numpy(np.ascontiguousarray(a))[None, None].to(device)
                                for a in (fix_full, mov_full))
                    sim = ncc_vfa(f_t, warp(m_t, upsample_pooled_flow(disp, factor)), cfg.loss.window)
                else:
                    sim = ncc_vfa(fix, warp(mov, disp), cfg.loss.window)
                row: dict[str, Any] = {"sim": float(sim)}
                if cfg.val.full_resolution and factor > 1:
                    disp = upsample_pooled_flow(disp, factor)
                    if tuple(disp.shape[2:]) != tuple(fix_full.shape):
                        disp = resize_flow(disp, fix_full.shape)
                    mask = fix_full > 0
                else:
                    mask = fix[0, 0].cpu().numpy() > 0
            u = disp[0].cpu().numpy()
            row["sdlogj"] = sdlogj(u)
            row["ndv"] = ndv(u, mask)
            row["folded_pct"] = folded_percent(u)
            if fe.label and me.label:
                fl = loader.get(fe.label, "label", ref_image=fe.image)
                ml = loader.get(me.label, "label", ref_image=me.image)
                if u.shape[1:] != fl.shape:  # metrics at the training resolution
                    fl, ml = downsample_labels(fl, factor), downsample_labels(ml, factor)
                row["dice"] = dice_mean(fl, warp_labels_nearest(ml, u))
            rows.append(row)
    finally:
        model.train(was_training)
    res: dict[str, Any] = {"n_pairs": len(rows), "seconds": time.perf_counter() - t0}
    for key in ("dice", "ndv", "sdlogj", "folded_pct", "sim"):
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]
        res[key] = float(np.mean(vals)) if vals else None
    return res


# --------------------------------------------------------------------------------------------- logging
class _Logs:
    """CSV logs, optional TensorBoard and the tqdm bar (rank 0 only)."""

    def __init__(self, out: Path, step: int, total: int, cfg: Config, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.log_path, self.val_path = out / LOG, out / VAL_LOG
        for path, fields in ((self.log_path, LOG_FIELDS), (self.val_path, VAL_FIELDS)):
            self._truncate(path, fields, step)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=step if step else None)
            except ImportError:  # optional dependency
                self.tb = None
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="train")

    @staticmethod
    def _truncate(path: Path, fields: list[str], step: int) -> None:
        """Keep rows up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        rows = []
        if path.is_file() and step > 0:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in fields} for r in rows)

    def _append(self, path: Path, fields: list[str], row: dict[str, Any]) -> None:
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields).writerow({k: _fmt(row.get(k)) for k in fields})

    def step(self, row: dict[str, Any], write: bool) -> None:
        if not self.enabled:
            return
        if write:
            self._append(self.log_path, LOG_FIELDS, row)
        if self.tb is not None:
            for k in ("loss", "sim", "reg", "lr"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)

    def val(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.val_path, VAL_FIELDS, row)
        if self.tb is not None:
            for k in ("dice", "ndv", "sdlogj", "sim"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"val/{k}", row[k], row["step"])
        msg = (
            "val step {step}: ".format(**row)
            + ", ".join(f"{k} {row[k]:.4f}" for k in ("dice", "sim", "ndv", "sdlogj") if row.get(k) is not None)
            + (" (best)" if row.get("best") else "")
        )
        self.write(msg)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


class _StopFlag:
    """First SIGINT/SIGTERM: finish the current step, save, stop. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------------- main entry
def _better(metric: str, new: float | None, old: float | None) -> bool:
    if new is None:
        return False
    if old is None:
        return True
    return new > old if metric == "dice" else new < old


def _resume_config(saved: dict[str, Any], cfg: Config, where: Path) -> Config:
    try:
        saved_cfg = config_from_dict(saved)
    except UserError as e:
        raise UserError(f"{where}: the saved config is not valid ({e})") from None
    diff = [
        k
        for k in config_diff(saved_cfg, cfg)
        if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE_KEYS)
    ]
    if diff:
        shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
        raise UserError(f"--resume: the config differs from the saved run in {shown}; resume without changing them")
    return cfg


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    command: str = "",
    model: Any = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` (or ``model``) and write the run folder ``out_dir``.

    Run folder: ``config.yaml`` (resolved config), ``log.csv``/``val.csv``, ``last.pt`` (resume state, every
    ``log.checkpoint_every`` steps and at the end), ``best.safetensors``/``.json`` (best validation),
    ``<export.name>.safetensors``/``.json`` (final weights + model card). With ``resume`` and a ``last.pt``,
    continues exactly where it stopped. ``on_step(step, terms)`` is called after every step; ``should_stop()``
    is polled after every step (True: save and stop, like SIGINT/SIGTERM).
    """
    _validate_cfg(cfg)
    dist = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, Path(out_dir), dist, resume, command, model, on_step, should_stop)
    finally:
        dist_utils.teardown(dist)


def _train(cfg, out, dist, resume, command, model, on_step, should_stop) -> TrainResult:  # noqa: C901
    import torch

    from ..models.checkpoint import save_weights

    t_start, t_box = time.perf_counter(), _clock()
    device = dist.device
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    state_path = out / LAST
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    state = None
    if state_path.exists():
        if not resume:
            raise UserError(f"{out} already holds a run ({LAST}); use --resume to continue it or another --out")
        state = ckpt.load_state(state_path)
        cfg = _resume_config(state["config"], cfg, state_path)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier(dist)

    # data first: a bad data set fails before any weights are built
    tset = discover(cfg.data, cfg.synth)
    factor = 2 if cfg.data.resolution == "half" else 1

    # model, same initial weights on every rank (DDP also broadcasts them)
    import random

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if model is None:
        from ..models.registry import build_model

        model = build_model(cfg.model, **cfg.model_config)
    model.to(device)
    is_ic = bool(getattr(model, "is_inverse_consistent", False))
    sym = cfg.loss.symmetric
    symmetric = is_ic if sym == "auto" else str(sym).lower() == "true"
    plan = plan_steps(cfg, symmetric, dist.world)

    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, amsgrad=cfg.optim.amsgrad, weight_decay=cfg.optim.weight_decay
    )
    scheduler = None
    if cfg.optim.schedule == "cosine_restarts":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=cfg.optim.T_0, T_mult=cfg.optim.T_mult, eta_min=cfg.optim.eta_min
        )
    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    step, best, history, elapsed0, init_info = 0, None, [], 0.0, None
    if state is not None:
        if state["model_name"] != cfg.model:
            raise UserError(f"{state_path} holds a '{state['model_name']}' run, not '{cfg.model}'")
        ckpt.load_model_state(model, state["model"], str(state_path))
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(
                f"{state_path}: optimiser state does not fit the model ({str(e).splitlines()[0]})"
            ) from None
        ckpt.set_rng_state(state["rng"])
        step = int(state["step"])
        best = state.get("best")
        history = list(state.get("history") or [])
        elapsed0 = float(state.get("elapsed", 0.0))
        init_info = state.get("init")
    else:
        if cfg.init_encoder:
            init_info = ckpt.init_from(model, cfg.init_encoder, decoder=cfg.init_decoder)
        _apply_warmup(optimizer, cfg, 0)

    if dist.is_main:
        save_config(
            cfg, out / "config.yaml", header=f"napari-unireg training run\ncommand: {command}" if command else ""
        )
    net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    pair_plan = PairPlan(
        len(tset.entries), tset.excluded, cfg.data.seed, cfg.synth.prob, len(tset.label_maps), cfg.synth.same_map_prob
    )
    # loss.full_resolution: pairs are read, painted and augmented on the full grid; train_step pools them
    loss_pool = factor if cfg.loss.full_resolution else 1
    data_factor = 1 if cfg.loss.full_resolution else factor
    vol_loader = VolumeLoader(cfg.data.grid_shape, data_factor, cfg.data.cache_size, cfg.data.cache_dir)
    want_labels = cfg.loss.dice_weight > 0
    dataset = PairDataset(tset, cfg, pair_plan, vol_loader, want_labels)
    start_batch, skip = divmod(step, plan.steps_per_pair)

    metric = cfg.val.metric
    if metric == "auto":
        metric = "dice" if any(f.label and m.label for f, m in tset.val_pairs) else "sim"

    logs = _Logs(out, step, plan.total_steps, cfg, dist.is_main)
    if dist.is_main and step == 0:
        d = tset.describe()
        logs.write(
            f"training {cfg.model} on {d['n_images']} images ({d['n_labelled']} labelled), "
            f"{len(tset.val_pairs)} validation pairs (excluded from training: {len(tset.excluded)} pairs), "
            f"{len(tset.label_maps)} synthesis label maps, {plan.total_steps} steps on {device}"
            + (f" x{dist.world}" if dist.enabled else "")
        )
        if init_info:
            logs.write(
                f"initialised from {init_info['source']}: {init_info['encoder_tensors']} encoder, "
                f"{init_info['decoder_tensors']} decoder tensors"
            )
    elif dist.is_main:
        logs.write(f"resuming at step {step}/{plan.total_steps}")

    def save(step_now: int) -> None:
        if not dist.is_main:
            return
        ckpt.save_state(
            state_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            step=step_now,
            best=best,
            history=history,
            elapsed=elapsed0 + time.perf_counter() - t_start,
            rng=ckpt.rng_state(),
            config=cfg.to_dict(),
            model_name=cfg.model,
            model_config=dict(getattr(model, "config", {}) or {}),
            init=init_info,
        )

    def run_validation(step_now: int) -> dict[str, Any] | None:
        nonlocal best
        res = None
        if dist.is_main:
            res = validate(model, tset, cfg, device, amp_dtype)
            if res is not None:
                tbox.val_seconds = float(res.get("seconds") or 0.0)
                score = res.get(metric)
                is_best = _better(metric, score, None if best is None else best.get(metric))
                row = {
                    "step": step_now,
                    "epoch": plan.epoch(step_now, cfg.optim.pairs_per_epoch),
                    **res,
                    "best": int(is_best),
                }
                history.append({k: row[k] for k in ("step", "dice", "ndv", "sdlogj", "folded_pct", "sim")})
                if is_best:
                    best = {**res, "step": step_now, "metric": metric}
                    save_weights(
                        model,
                        out / BEST,
                        {"name": cfg.model, "resolution": cfg.data.resolution, "metrics": best, "step": step_now},
                        dtype=torch.float32,
                    )
                logs.val(row)
        dist_utils.barrier(dist)
        return res

    last_val = None
    interrupted = time_up = False
    ppe = cfg.optim.pairs_per_epoch
    # a resumed run keeps the schedule its first call planned; the limit itself applies to every call
    tbox = _TimeBox(cfg.optim.time_limit_s, t_box, cfg.optim.time_plan and state is None)
    steps_cap = None  # --steps, kept when the first plan shortens the run (a later plan may lengthen it again)
    t_iter = time.perf_counter()
    try:
        with _StopFlag() as stop_flag:
            if step < plan.total_steps:
                loader = make_loader(dataset, start_batch, cfg.optim.batch_size, dist.rank, dist.world, cfg)
                for batch in loader:
                    data_s = time.perf_counter() - t_iter
                    mov = batch["moving"].to(device, non_blocking=True)
                    fix = batch["fixed"].to(device, non_blocking=True)
                    ml, fl = batch["moving_label"], batch["fixed_label"]
                    if ml is not None:
                        ml, fl = ml.to(device), fl.to(device)
                    directions = [(mov, fix, ml, fl)] + ([(fix, mov, fl, ml)] if plan.bidir else [])
                    stop_now = False
                    for m, f, lm, lf in directions[skip:]:
                        t0 = time.perf_counter()
                        lr = optimizer.param_groups[0]["lr"]
                        terms = train_step(
                            net,
                            optimizer,
                            m,
                            f,
                            lam=cfg.loss.lam,
                            window=cfg.loss.window,
                            symmetric=symmetric,
                            amp_dtype=amp_dtype,
                            scaler=scaler,
                            dice_weight=cfg.loss.dice_weight,
                            moving_label=lm,
                            fixed_label=lf,
                            grad_clip=cfg.optim.grad_clip,
                            pool=loss_pool,
                        )
                        if scheduler is not None:  # §9: after each step, with the position before it
                            scheduler.step(step * plan.pairs_per_step / ppe)
                        step += 1
                        _apply_warmup(optimizer, cfg, step)
                        row = {
                            "step": step,
                            "epoch": plan.epoch(step, ppe),
                            **terms,
                            "lr": lr,
                            "seconds": time.perf_counter() - t0 + data_s,
                            "data_seconds": data_s,
                            "elapsed": elapsed0 + time.perf_counter() - t_start,
                            "synthetic": int(any(batch["synthetic"])),
                        }
                        data_s = 0.0
                        logs.step(row, write=step % max(1, cfg.log.log_every) == 0)
                        if on_step is not None:
                            on_step(step, terms)
                        tbox.record(_clock())
                        due = dist_utils.any_flag(dist, tbox.plan_due(_clock()))
                        fit = dist_utils.min_int(dist, tbox.steps_that_fit(_clock(), due)) if due else None
                        first_plan = steps_cap is None
                        if first_plan and fit is not None:
                            steps_cap = plan.total_steps
                        new_total = None if fit is None else min(steps_cap, step + fit)
                        if new_total is not None and (
                            first_plan or abs(new_total - plan.total_steps) > REPLAN_TOLERANCE * plan.total_steps
                        ):
                            # the run's length is what fits, or --steps when fewer fit in the box; either way the
                            # schedule becomes one cosine period over it, so the run ends annealed (a later plan
                            # stretches or shrinks that period: the rate moves a little, the run still anneals)
                            plan.total_steps = new_total
                            _replan_schedule(scheduler, optimizer, cfg, plan, step)
                            if logs.bar is not None:
                                logs.bar.total = plan.total_steps
                            logs.write(
                                f"time limit {cfg.optim.time_limit_s:g} s: {'planned' if first_plan else 're-planned'}"
                                f" {plan.total_steps} steps at step {step} ({tbox.step_estimate():.2f} s/step"
                                f"{', the --steps cap' if new_total == steps_cap else ''}); one cosine period to "
                                f"optim.eta_min over them"
                            )
                        if step % max(1, cfg.log.checkpoint_every) == 0 and step < plan.total_steps:
                            save(step)
                        if plan.val_every and step % plan.val_every == 0 and step < plan.total_steps:
                            last_val = run_validation(step)
                            tbox.skip_to(_clock())
                        flag = stop_flag.flag or (should_stop is not None and should_stop())
                        val_next = bool(plan.val_every) and (step + 1) % plan.val_every == 0
                        time_flag = step < plan.total_steps and tbox.out_of_time(_clock(), val_next)
                        stop_any = dist_utils.any_flag(dist, flag)
                        if tbox.limit and not stop_any and dist_utils.any_flag(dist, time_flag):
                            time_up = True
                            plan.total_steps = step  # ends like a completed run: validate, export
                            logs.write(f"time limit {cfg.optim.time_limit_s:g} s reached at step {step}")
                        if stop_any or step >= plan.total_steps:
                            stop_now = True
                            break
                    skip = 0
                    t_iter = time.perf_counter()
                    if stop_now:
                        break
                del loader
            interrupted = step < plan.total_steps
            if interrupted:
                save(step)
                logs.write(f"stopped at step {step}/{plan.total_steps}; continue with --resume")
    finally:
        logs.close()

    exported = None
    if not interrupted:
        if not history or history[-1]["step"] != step:
            last_val = run_validation(step)
        save(step)
        if dist.is_main:
            exported = _export(
                model,
                cfg,
                out,
                tset,
                plan,
                step,
                best,
                last_val,
                history,
                command,
                dist,
                elapsed0 + time.perf_counter() - t_start,
                init_info,
            )
    dist_utils.barrier(dist)
    return TrainResult(
        model,
        step,
        plan.total_steps,
        out,
        best,
        last_val,
        exported,
        interrupted,
        elapsed0 + time.perf_counter() - t_start,
        history,
        time_limited=time_up,
    )


def _export(model, cfg, out, tset, plan, step, best, last_val, history, command, dist, wall, init_info):
    import torch

    from ..models.checkpoint import checkpoint_paths, save_weights
    from .checkpointing import load_model_state

    export_model, which = model, "last"
    best_w, _ = checkpoint_paths(out / BEST)
    if cfg.export.use_best and best is not None and best_w.is_file():
        from safetensors.torch import load_file

        export_model = copy.deepcopy(model)
        load_model_state(export_model, load_file(str(best_w)), str(best_w))
        which = "best"
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.export.dtype)
    if dtype is None:
        raise UserError(f"export.dtype must be float16, bfloat16 or float32, not {cfg.export.dtype!r}")
    from .. import __version__

    metrics = dict(best if which == "best" else (last_val or {}))
    train_shape = [s // (2 if cfg.data.resolution == "half" else 1) for s in cfg.data.grid_shape]
    card = {
        "name": cfg.model,
        "description": f"{cfg.model} trained with `unireg train` ({step} steps, {cfg.data.resolution} resolution)",
        "resolution": cfg.data.resolution,
        "grid_shape": list(cfg.data.grid_shape),
        "input_shape": train_shape,
        "metrics": metrics,
        "training": {
            "command": command,
            "config": cfg.to_dict(),
            "data": tset.describe(),
            "validation_pairs_policy": (
                "validation images dropped from training"
                if cfg.data.exclude_val_subjects
                else "validation pairs (fixed, moving) never sampled for training in either direction; their images "
                "are used in other pairs"
                if cfg.data.exclude_val_pairs
                else "validation pairs not excluded"
            ),
            "steps": step,
            "epochs": plan.epoch(step, cfg.optim.pairs_per_epoch),
            "directed_pairs": step * plan.pairs_per_step,
            "directions": "symmetric" if plan.symmetric else ("bidir" if plan.bidir else "single"),
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "amp": cfg.amp,
            "init": init_info,
            "hardware": dist_utils.hardware_info(dist),
            "wall_time_s": round(wall, 1),
            "exported": which,
            "best_step": (best or {}).get("step"),
            "val_history": history,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "napari_unireg": __version__,
        },
    }
    return save_weights(export_model, out / cfg.export.name, card, dtype=dtype)
