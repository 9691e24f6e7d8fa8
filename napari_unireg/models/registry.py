"""The registration networks by name: listing, building, loading pretrained weights.

Pretrained weights are bundled in the repository folder ``models/`` as ``<name>.safetensors`` + ``<name>.json``;
installed, that folder is the package ``napari_unireg._bundled_models`` (pyproject ``package-dir``). The
environment variable ``UNIREG_MODELS_DIR`` points the registry at another folder of the same layout (tests, a
site-wide model store).

A network trained at one resolution loses Dice when it runs at the other (features see anatomy at twice or half
the scale), so a model may bundle one weight file per resolution: ``<name>`` is its main pair, trained at the
resolution its card names, and ``<name>.full`` / ``<name>.half`` (same layout) hold weights trained at that
resolution when it differs. :func:`bundled_weights` lists them; which one a run uses is
:func:`napari_unireg.pipeline.models.weights_choice`'s decision.

A model is *bundled* when either file of its main pair is present. A bundled pair whose other file is missing, whose
card is unreadable, names another architecture or another resolution than its file name is an installation fault:
listing the models raises a one-line :class:`UserError` naming the file, so the default choice and ``register``
never fall back to untrained weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .catalog import _CLASSES, DP_MODELS, MODEL_NAMES, build_model, model_class  # noqa: F401  (the names users import)

__all__ = [
    "MODEL_NAMES", "DP_MODELS", "RESOLUTIONS", "RESOLUTION_MM", "ModelInfo", "list_models", "build_model",
    "load_pretrained", "weights_dir", "bundled_card", "bundled_weights",
]

#: the network input resolutions: 1 mm (the model grid) and 2 mm (half of it), as listings write them
RESOLUTION_MM = {"full": "1 mm", "half": "2 mm"}
RESOLUTIONS = tuple(RESOLUTION_MM)

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
    #: resolution → card of every bundled weight file (the main pair's included); empty when untrained
    cards: dict[str, dict] = field(default_factory=dict)


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


def _read_bundled(stem: Path, name: str, resolution: str | None) -> dict | None:
    """The card of the bundled pair ``stem`` (None when neither file is present); :class:`UserError` when the pair
    is half-present or its card does not describe ``name`` (at ``resolution``, when given)."""
    from .checkpoint import checkpoint_paths, read_card

    weights, card_path = checkpoint_paths(stem)
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
    if resolution is not None and card.get("resolution", "full") != resolution:
        raise UserError(f"bundled model '{name}' is broken: {card_path.name} holds weights trained at "
                        f"{card.get('resolution', 'full')} resolution, not {resolution} ({fix})")
    return card


def bundled_card(name: str) -> dict | None:
    """The card of bundled model ``name``'s main pair (reads one JSON file, builds nothing); None when it is not
    bundled (neither file present). A half-present or corrupt pair raises :class:`UserError`: it must never read
    as "no weights"."""
    return _read_bundled(weights_dir() / name, name, None)


def bundled_weights(name: str) -> dict[str, tuple[Path, dict]]:
    """``{resolution: (stem, card)}`` for every bundled weight file of ``name`` (empty when it is not bundled):
    the main pair under the resolution its card names, then ``<name>.full`` / ``<name>.half`` where present."""
    main = bundled_card(name)
    if main is None:
        return {}
    folder = weights_dir()
    out = {str(main.get("resolution", "full")): (folder / name, main)}
    for resolution in RESOLUTIONS:
        card = _read_bundled(folder / f"{name}.{resolution}", name, resolution)
        if card is not None and resolution not in out:
            out[resolution] = (folder / f"{name}.{resolution}", card)
    return out


def list_models() -> list[ModelInfo]:
    """The registered networks with parameter counts (built on the meta device: no memory) and weights status."""
    import torch

    rows = []
    for name in MODEL_NAMES:
        cls = model_class(name)
        files = bundled_weights(name)
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
                cards={resolution: c for resolution, (_stem, c) in files.items()},
            )
        )
    return rows


def load_pretrained(name_or_path: str | os.PathLike, device: str = "cpu", resolution: str | None = None):
    """``(model, card)`` from a registered name (its bundled weights trained at ``resolution``, default the main
    pair) or a checkpoint path; model in eval mode."""
    from .checkpoint import checkpoint_paths, load_weights, refuse_pickle

    key = str(name_or_path)
    if key in _CLASSES:
        files = bundled_weights(key)  # raises when a bundled pair is broken
        if not files:
            weights, _ = checkpoint_paths(weights_dir() / key)
            raise UserError(f"no pretrained weights for '{key}' (expected {weights}); train them with 'unireg train'")
        if resolution is None:
            resolution = str(bundled_card(key).get("resolution", "full"))
        if resolution not in files:
            raise UserError(f"'{key}' has no weights trained at {resolution} resolution (bundled: "
                            f"{', '.join(files)})")
        return load_weights(files[resolution][0], expected_name=key, device=device)
    refuse_pickle(key)
    weights, card = checkpoint_paths(key)
    if not (weights.is_file() or card.is_file()):
        raise UserError(f"'{key}' is neither a known model ({', '.join(MODEL_NAMES)}) nor a checkpoint path")
    return load_weights(key, device=device)
