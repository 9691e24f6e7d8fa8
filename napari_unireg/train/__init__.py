"""Training module (``unireg train``): data, pair sampling, augmentation, synthesis, the §8-§9 loop.

Library use::

    from napari_unireg.train import load_config, train
    cfg = load_config("my.yaml", ["data.source=/data/dataset.json", "steps=1000"])
    result = train(cfg, "runs/x")            # result.model, result.best, result.exported

Only :mod:`.config` is imported eagerly (no torch): ``unireg --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

from .config import Config, load_config

__all__ = ["Config", "load_config", "train", "validate", "TrainResult"]


def __getattr__(name: str) -> Any:  # lazy: the loop imports torch
    if name in ("train", "validate", "TrainResult", "train_step", "plan_steps"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
