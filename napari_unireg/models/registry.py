"""The registration networks by name: listing, building, loading pretrained weights.

Pretrained weights are bundled in the repository folder ``models/`` as ``<name>.safetensors`` + ``<name>.json``;
installed, that folder is the package ``napari_unireg._bundled_models`` (pyproject ``package-dir``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .catalog import _CLASSES, DP_MODELS, MODEL_NAMES, build_model, model_class  # noqa: F401  (the names users import)

__all__ = [
    "MODEL_NAMES", "DP_MODELS", "ModelInfo", "list_models", "build_model", "load_pretrained", "weights_dir", "bundled_card",
]

@dataclass
class ModelInfo:
    """One row of ``unireg models``."""

    name: str
    family: str
    description: str
    params_encoder: int
    params_decoder: int
    params_total: int
    weights: bool
    card: dict | None
    is_inverse_consistent: bool = False
    grid_multiple: int = 16


def weights_dir() -> Path:
    """Folder of the bundled weights: the ``napari_unireg._bundled_models`` package, else the repo's ``models/``."""
    env = os.environ.get("UNIREG_MODELS_DIR")
    if env:
        return Path(env)
    try:
        from importlib.resources import files

        res = files("napari_unireg._bundled_models")
        path = Path(str(res))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "models"


def bundled_card(name: str) -> dict | None:
    """The model card of a bundled network (None when its weights or card are missing or unreadable); cheap:
    reads one JSON file, builds nothing."""
    path = weights_dir() / f"{name}.json"
    if not (path.is_file() and (weights_dir() / f"{name}.safetensors").is_file()):
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def list_models() -> list[ModelInfo]:
    """The registered networks with parameter counts (built on the meta device: no memory) and weights status."""
    import torch

    rows = []
    for name in MODEL_NAMES:
        cls = model_class(name)
        card = bundled_card(name)
        config = (card or {}).get("config") or {}
        with torch.device("meta"):
            try:
                model = cls(**config)
            except TypeError:
                model = cls()
        enc, dec = model.parameter_split()
        rows.append(
            ModelInfo(
                name=name,
                family=cls.family,
                description=cls.description or (cls.__doc__ or "").strip().splitlines()[0],
                params_encoder=enc,
                params_decoder=dec,
                params_total=enc + dec,
                weights=card is not None,
                card=card,
                is_inverse_consistent=bool(cls.is_inverse_consistent),
                grid_multiple=int(model.grid_multiple),
            )
        )
    return rows


def load_pretrained(name_or_path: str | os.PathLike, device: str = "cpu"):
    """``(model, card)`` from a registered name (bundled weights) or a checkpoint path; model in eval mode."""
    from .checkpoint import checkpoint_paths, load_weights

    key = str(name_or_path)
    if key in _CLASSES:
        stem = weights_dir() / key
        weights, _ = checkpoint_paths(stem)
        if not weights.is_file():
            raise UserError(f"no pretrained weights for '{key}' (expected {weights}); train them with 'unireg train'")
        return load_weights(stem, expected_name=key, device=device)
    weights, card = checkpoint_paths(key)
    if not (weights.is_file() or card.is_file()):
        raise UserError(f"'{key}' is neither a known model ({', '.join(MODEL_NAMES)}) nor a checkpoint path")
    return load_weights(key, device=device)
