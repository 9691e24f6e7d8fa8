"""The registration networks by name: listing, building, loading pretrained weights.

Pretrained weights are bundled in the repository folder ``models/`` as ``<name>.safetensors`` + ``<name>.json``;
installed, that folder is the package ``napari_unireg._bundled_models`` (pyproject ``package-dir``). The
environment variable ``UNIREG_MODELS_DIR`` points the registry at another folder of the same layout (tests, a
site-wide model store).

A model is *bundled* when either of its two files is present. A bundled model whose other file is missing, whose
card is unreadable or names another architecture is an installation fault: listing the models raises a one-line
:class:`UserError` naming the file, so the default choice and ``register`` never fall back to untrained weights.
"""

from __future__ import annotations

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
        if not Path(env).is_dir():
            raise UserError(f"UNIREG_MODELS_DIR={env} is not a folder; unset it to use the bundled models")
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
    """The card of bundled model ``name`` (reads one JSON file, builds nothing); None when it is not bundled
    (neither file present). A half-present or corrupt pair raises :class:`UserError`: it must never read as
    "no weights"."""
    from .checkpoint import checkpoint_paths, read_card

    weights, card_path = checkpoint_paths(weights_dir() / name)
    if not (weights.exists() or card_path.exists()):
        return None
    fix = "reinstall napari-unireg or set UNIREG_MODELS_DIR to a folder with intact models"
    if not weights.is_file():
        raise UserError(f"bundled model '{name}' is broken: weights file {weights} is missing ({fix})")
    try:
        card = read_card(card_path)
    except UserError as exc:
        raise UserError(f"bundled model '{name}' is broken: {exc} ({fix})") from None
    if card["architecture"] != name or not card.get("sha256"):
        what = "has no sha256" if card["architecture"] == name else f"describes '{card['architecture']}'"
        raise UserError(f"bundled model '{name}' is broken: its card {card_path} {what} ({fix})")
    return card


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
    from .checkpoint import checkpoint_paths, load_weights, refuse_pickle

    key = str(name_or_path)
    if key in _CLASSES:
        stem = weights_dir() / key
        if bundled_card(key) is None:  # raises when the bundled pair is broken
            weights, _ = checkpoint_paths(stem)
            raise UserError(f"no pretrained weights for '{key}' (expected {weights}); train them with 'unireg train'")
        return load_weights(stem, expected_name=key, device=device)
    refuse_pickle(key)
    weights, card = checkpoint_paths(key)
    if not (weights.is_file() or card.is_file()):
        raise UserError(f"'{key}' is neither a known model ({', '.join(MODEL_NAMES)}) nor a checkpoint path")
    return load_weights(key, device=device)
