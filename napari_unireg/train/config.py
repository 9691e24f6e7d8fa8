"""Training configuration: nested dataclasses, defaults in ``default.yaml``, one YAML per run.

Every field can be overridden from the command line with ``--set section.key=value`` (the value is parsed
as a YAML scalar/list, so ``--set optim.lr=1e-4``, ``--set augment.enabled=true``,
``--set synth.label_maps=[/data/seg]`` all work). Unknown keys and wrong types raise :class:`UserError`.
No torch import here: ``unireg --help`` imports this module.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "Config",
    "DataConfig",
    "AugmentConfig",
    "SynthConfig",
    "LossConfig",
    "OptimConfig",
    "ValConfig",
    "LogConfig",
    "ExportConfig",
    "DEFAULT_YAML",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "save_config",
    "config_diff",
    "RESUME_SAFE_KEYS",
]

DEFAULT_YAML = Path(__file__).with_name("default.yaml")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    source: str = ""  # Learn2Reg dataset.json, or a folder of NIfTI images
    labels: str | None = None  # label folder matched by file name / subject id (folder sources only)
    val_pairs: str | None = "auto"  # auto | none | CSV (fixed,moving ids) | dataset.json with registration_val
    exclude_val_pairs: bool = True  # never train on a validation pair, in either direction
    exclude_val_subjects: bool = False  # stricter: drop every image of a validation pair from training
    resolution: str = "full"  # full (160×224×192) | half (avg-pool by 2: 80×112×96)
    grid_shape: list[int] = field(default_factory=lambda: [160, 224, 192])
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    prefetch_factor: int = 2
    cache_size: int = 4  # decoded volumes kept per process (LRU)
    cache_dir: str | None = None  # optional on-disk cache of preprocessed volumes (.npy, memory-mapped)
    seed: int = 0  # data/pair-sampling seed (§9: the same for every method)


@dataclass
class AugmentConfig:
    """Random augmentation of real pairs, each image independently (§9 uses none: off by default)."""

    enabled: bool = False
    affine_prob: float = 0.5
    rotate_deg: float = 8.0
    scale: float = 0.08  # log-uniform ±
    shear: float = 0.04
    translate_vox: float = 4.0  # in full-resolution voxels
    deform_prob: float = 0.5
    deform_vox: float = 3.0  # max amplitude of the smooth field, full-resolution voxels
    deform_spacing: int = 32  # control point spacing, full-resolution voxels
    bias_prob: float = 0.5
    bias_magnitude: float = 0.3  # std of the log bias field
    bias_spacing: int = 48
    gamma_prob: float = 0.5
    gamma_log_std: float = 0.25
    noise_prob: float = 0.3
    noise_std: float = 0.02
    keep_background: bool = True  # bias and noise only inside the brain (images are skull-stripped)


@dataclass
class SynthConfig:
    """SynthMorph-style pairs painted from label maps (off unless ``prob`` > 0)."""

    prob: float = 0.0  # fraction of training pairs that are synthetic
    label_maps: list[str] = field(default_factory=list)  # folders, glob patterns or files of label maps
    use_dataset_labels: bool = False  # also paint from the training label maps
    same_map_prob: float = 0.5  # both images from the same label map (else two different maps)
    contrast: str = "mixed"  # random | t1 (FreeSurfer codes) | mixed
    brain_only: bool = True  # paint 0 for background and extra-cerebral codes (>= 100, 24 excepted)
    deform_vox: float = 4.0  # smooth deformation of each label map, full-resolution voxels
    deform_spacing: int = 24
    affine_prob: float = 0.5
    rotate_deg: float = 6.0
    scale: float = 0.06
    std_max: float = 0.08  # within-label noise std (intensities in [0, 1])
    blur_max: float = 1.0  # Gaussian sigma, training-resolution voxels
    bias_magnitude: float = 0.3
    bias_spacing: int = 48
    gamma_log_std: float = 0.25
    noise_std: float = 0.02


@dataclass
class LossConfig:
    """§8: squared local NCC (9³) + λ diffusion; symmetric form for inverse-consistent models."""

    lam: float = 1.0
    dice_weight: float = 0.0  # optional Dice loss with labels (off by default, as in the paper)
    dice_pairs: str = "all"  # all (real labelled + synthetic pairs) | synthetic (SynthMorph-style: only painted pairs)
    symmetric: str = "auto"  # auto (inverse-consistent models) | true | false
    #: side of the NCC window in voxels of the training grid (odd): the paper's 9 is 9 mm at full resolution;
    #: at data.resolution=half, 5 covers about the same 9-10 mm (9 would be 18 mm); with full_resolution, voxels
    #: of the full grid
    window: int = 9
    #: with data.resolution=half: the network still sees (and predicts on) the 2 mm grid, but the similarity is
    #: taken on the full grid, its field brought up as at inference (upsample_pooled_flow), so the loss sees the
    #: detail that a 2 mm field can still align (the diffusion and Dice terms stay on the network's grid); the
    #: pairs are then read, painted and augmented at full resolution and pooled for the network
    full_resolution: bool = False


@dataclass
class OptimConfig:
    """§9: Adam (amsgrad), lr 1e-3, cosine annealing with warm restarts."""

    lr: float = 1e-3
    amsgrad: bool = True
    weight_decay: float = 0.0
    batch_size: int = 1
    schedule: str = "cosine_restarts"  # cosine_restarts | constant
    T_0: int = 100
    T_mult: int = 2
    eta_min: float = 1e-5
    epochs: int = 1500
    pairs_per_epoch: int = 100  # one "epoch" = this many directed pairs (§9)
    directions: str = "auto"  # auto | bidir (two steps per pair) | single
    grad_clip: float | None = None
    warmup_steps: int = 0  # linear learning-rate warm-up (0 = none, as the paper); helps short runs
    time_limit_s: float | None = None  # wall-clock box of one call: stop cleanly, validate, export (None = off)
    time_plan: bool = True  # with time_limit_s: run the steps that fit (≤ steps) as one cosine period


@dataclass
class ValConfig:
    """Validation on the held-out pairs."""

    every_epochs: float = 10.0  # 0 disables periodic validation
    every_steps: int | None = None  # overrides every_epochs when set (0 disables)
    max_pairs: int | None = None
    metric: str = "auto"  # auto (dice when labels exist, else sim) | dice | sim
    full_resolution: bool = True  # evaluate Dice/NDV/SDlogJ on the full-resolution labels


@dataclass
class LogConfig:
    """Progress, logs and checkpoints."""

    progress: bool = True  # tqdm bar with ETA
    tensorboard: bool = True  # used only when tensorboard is installed
    checkpoint_every: int = 100  # steps between resume checkpoints (last.pt)
    log_every: int = 1  # steps between CSV rows


@dataclass
class ExportConfig:
    """Final weights written through models.checkpoint.save_weights."""

    name: str = "final"
    dtype: str = "float16"  # float16 | bfloat16 | float32
    use_best: bool = True  # export the best validation checkpoint when there is one


@dataclass
class Config:
    """One training run. ``steps`` = optimiser steps (null: epochs × pairs_per_epoch / directed pairs per step)."""

    model: str = "dp-conv-c"
    model_config: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    seed: int = 0  # weight init and global RNGs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 | auto (per machine: train.precision)
    threads: int | None = None  # torch intra-op threads (null: torch default)
    init_encoder: str | None = None  # weights (.safetensors or registry name) to start the encoder from
    init_decoder: bool = True  # with init_encoder: also copy decoder tensors whose name and shape match
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Keys that may differ between a run and its ``--resume`` without changing the result it reproduces.
RESUME_SAFE_KEYS = (
    "steps",
    "device",
    "threads",
    "data.num_workers",
    "data.prefetch_factor",
    "data.cache_size",
    "data.cache_dir",
    "log.",
    "export.",
    "val.max_pairs",
    "optim.time_limit_s",
)


# --------------------------------------------------------------------------------------------- typing helpers
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a field annotation; raise UserError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config: {key} cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is Any:
        return value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a mapping, got {value!r}")
        return dict(value)
    if value is None:
        raise UserError(f"config: {key} cannot be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"config: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config: {key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"config: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config: {key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config: {key} must be a string, got {value!r}")
    return value


def _unknown(key: str, choices: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"config: unknown key {key!r}{hint}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in types_:
            raise _unknown(prefix + str(k), list(types_))
        kwargs[k] = _coerce(v, types_[k], prefix + k)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model_config":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------------- public API
def config_from_dict(data: dict[str, Any]) -> Config:
    """Defaults of ``default.yaml`` updated by ``data`` (nested mapping), type-checked."""
    # default.yaml mirrors the dataclass defaults (a test keeps them equal); tolerate its absence in a wheel
    defaults = _read_yaml(DEFAULT_YAML) if DEFAULT_YAML.is_file() else {}
    return _from_dict(Config, _merge(defaults, data))


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=1e-4'`` → ``('optim.lr', 0.0001)``; the value is read as YAML (lists, bools, null)."""
    import yaml

    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string: convert plain numbers ourselves
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (validated later against the dataclasses)."""
    out = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | list[tuple[str, Any]] | None = None) -> Config:
    """Defaults ← YAML file ``path`` ← ``overrides`` (``'key=value'`` strings or ``(key, value)`` pairs)."""
    data = _read_yaml(path) if path else {}
    pairs = [parse_override(o) if isinstance(o, str) else o for o in (overrides or [])]
    return config_from_dict(apply_overrides(data, pairs))


def save_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """Write the full resolved config as YAML (atomically)."""
    import os

    import yaml

    p = Path(path)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_config":
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
