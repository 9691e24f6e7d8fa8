"""Which network a run uses, and loading it once: a small cache keyed by (model, weight file, device).

The napari widgets and a batch of pairs pay the loading (and the build of the network) once; a checkpoint file
that changes on disk (size or modification time) is loaded again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["CLASSICAL", "LoadedModel", "default_model_name", "model_key", "weights_choice", "load_model",
           "clear_model_cache"]

#: The instance-optimisation method (no network).
CLASSICAL = "classical"
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2
_LOCK = threading.Lock()
#: held while a network loads: a second caller (a Run started while the widget warms the model) waits for it and
#: then finds it in the cache instead of loading it twice
_LOADING = threading.Lock()


@dataclass(frozen=True)
class LoadedModel:
    """A network ready to run (``net`` None for the classical method) and its card."""

    name: str
    net: Any
    card: dict
    trained: bool

    def resolution(self, asked: str) -> str:
        """``auto`` → the resolution the network was trained at (its card's), else ``asked``."""
        return asked if asked != "auto" else str(self.card.get("resolution", "full"))


def default_model_name() -> str:
    """The bundled model marked default in its card, else the best validation Dice; the classical method when
    none is bundled. Reads the cards only (builds no network)."""
    from ..models.catalog import MODEL_NAMES
    from ..models.registry import bundled_card

    best, best_dice = CLASSICAL, -1.0
    for name in MODEL_NAMES:
        card = bundled_card(name)
        if not card:
            continue
        if card.get("default"):
            return name
        dice = (card.get("metrics") or {}).get("dice")
        dice = 0.0 if dice is None else float(dice)
        if dice > best_dice:
            best, best_dice = name, dice
    return best


def model_key(model: str, checkpoint: str | None) -> str:
    """The registry name or checkpoint path a (model, checkpoint) option pair means; ``default`` resolved."""
    key = checkpoint or model or "default"
    if key == "default" and not checkpoint:
        key = default_model_name()
    return str(key)


def _on_gpu(device) -> bool:
    return str(device).split(":")[0] not in ("cpu", "auto")


def weights_choice(trained: dict[str, Any], main: str, asked: str, device) -> str:
    """Which of a model's bundled weight files (keyed by the resolution they were trained at, ``main`` the main
    pair's) a run at resolution ``asked`` on ``device`` uses.

    An explicit ``full``/``half`` takes the weights trained at it when bundled, else the main pair (which then runs
    at the asked resolution, at some loss of Dice). ``auto``, when the model has both: the 1 mm weights on a GPU (a
    pass there costs ~0.05 s) and the 2 mm weights on a CPU (8× fewer voxels: dp-vfa ~1–2 s instead of ~15 s on
    two cores, README's Results); else the main pair.
    """
    if asked in trained:
        return asked
    if asked == "auto" and len(trained) > 1:
        return "full" if _on_gpu(device) else "half"
    return main


def _bundled_choice(name: str, asked: str, device) -> tuple[str, Any, dict] | None:
    """``(resolution key, stem, card)`` of the bundled weights a run uses; None when ``name`` has none."""
    from ..models.registry import bundled_card, bundled_weights

    files = bundled_weights(name)
    if not files:
        return None
    main = str(bundled_card(name).get("resolution", "full"))
    key = weights_choice(files, main, asked, device)
    return (key, *files[key])


def network_plan(model: str, checkpoint: str | None, resolution: str, device="cpu") -> tuple[str, str] | None:
    """``(model name, resolution it will run at)`` from the cards alone (no network is built), for the memory
    estimate before a run; None for the classical method or a checkpoint without a readable card."""
    import json

    from ..models.catalog import MODEL_NAMES
    from ..models.checkpoint import checkpoint_paths

    key = model_key(model, checkpoint)
    if key == CLASSICAL:
        return None
    if key in MODEL_NAMES:
        chosen = _bundled_choice(key, resolution, device)
        card = chosen[2] if chosen else {}
    else:
        try:
            card = json.loads(checkpoint_paths(key)[1].read_text())
        except (OSError, ValueError):
            return None
    name = str(card.get("name") or key)
    return name, resolution if resolution != "auto" else str(card.get("resolution", "full"))


def check_model(key: str) -> None:
    """:class:`UserError` unless ``key`` is the classical method, a registry name or an existing checkpoint."""
    from ..models.catalog import MODEL_NAMES

    if key == CLASSICAL or key in MODEL_NAMES:
        return
    from ..models.checkpoint import checkpoint_paths, refuse_pickle

    refuse_pickle(key)
    weights, card = checkpoint_paths(key)
    if not (weights.is_file() or card.is_file()):
        raise UserError(f"unknown model {key!r}: neither a known model ({', '.join(MODEL_NAMES)}, {CLASSICAL}) "
                        "nor a checkpoint file; `unireg models` lists them (or give --checkpoint PATH)")


def _file_stamp(stem) -> tuple:
    from ..models.checkpoint import checkpoint_paths

    paths = checkpoint_paths(stem)
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (str(p),) for p in paths)


def _load(key: str, weights: str | None, device) -> LoadedModel:
    from ..models.catalog import MODEL_NAMES, build_model
    from ..models.registry import load_pretrained

    if key in MODEL_NAMES and weights is None:
        net = build_model(key)  # no bundled weights: random weights, reported as untrained
        net.to(device).eval()
        return LoadedModel(key, net, {"name": key, "resolution": "full"}, False)
    net, card = load_pretrained(key, device=str(device), resolution=weights)
    net.eval()
    name = card.get("name") or (Path(key).stem if key not in MODEL_NAMES else key)
    return LoadedModel(str(name), net, card, True)


def load_model(model: str, checkpoint: str | None, device, resolution: str = "auto") -> LoadedModel:
    """The network for the options (cached), ``LoadedModel(net=None)`` for the classical method. For a bundled
    model, ``resolution`` and ``device`` choose among its weight files (:func:`weights_choice`)."""
    from ..models.catalog import MODEL_NAMES

    key = model_key(model, checkpoint)
    if key == CLASSICAL:
        return LoadedModel(CLASSICAL, None, {"name": CLASSICAL, "resolution": "half"}, True)
    check_model(key)
    weights, stem = None, key
    if key in MODEL_NAMES:
        from ..models.registry import weights_dir

        chosen = _bundled_choice(key, resolution, device)
        weights, stem, _card = chosen if chosen is not None else (None, weights_dir() / key, None)
    cache_key = (key, weights, str(device), _file_stamp(stem))
    with _LOADING:
        with _LOCK:
            hit = _CACHE.get(cache_key)
            if hit is not None:
                _CACHE.move_to_end(cache_key)
                return hit
        loaded = _load(key, weights, device)
        with _LOCK:
            for old in [k for k in _CACHE if k[:3] == cache_key[:3]]:
                del _CACHE[old]  # the same model from an older file
            _CACHE[cache_key] = loaded
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    """Forget the loaded networks (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()


