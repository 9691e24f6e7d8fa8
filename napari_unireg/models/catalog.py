"""The networks by name: which class builds which registry name (no weights, no files)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError

__all__ = ["MODEL_NAMES", "DP_MODELS", "model_class", "build_model"]

# name -> (module, class); order is the paper's table, then the baselines
_CLASSES: dict[str, tuple[str, str]] = {
    "dp-conv-mf": ("dp_conv", "DPConvMF"),
    "dp-conv-mfc": ("dp_conv", "DPConvMFC"),
    "dp-conv-c": ("dp_conv", "DPConvC"),
    "dp-convic-mf": ("dp_convic", "DPConvICMF"),
    "dp-convic-c": ("dp_convic", "DPConvICC"),
    "dp-vfa": ("dp_vfa", "DPVFA"),
    "voxelmorph": ("voxelmorph", "VoxelMorph"),
    "vfa": ("vfa", "VFA"),
    "sitreg": ("sitreg", "SITReg"),
    "transmorph": ("transmorph", "TransMorph"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_CLASSES)
DP_MODELS: tuple[str, ...] = MODEL_NAMES[:6]


def model_class(name: str):
    """The class registered under ``name``; :class:`UserError` listing the known names otherwise."""
    if name not in _CLASSES:
        raise UserError(f"unknown model '{name}' (known: {', '.join(MODEL_NAMES)})")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def build_model(name: str, **config: Any):
    """A freshly initialised network (``eval()`` not applied). ``config`` overrides constructor defaults."""
    cls = model_class(name)
    try:
        return cls(**config)
    except TypeError as exc:
        raise UserError(f"bad configuration for model '{name}': {exc}") from None
