"""Weights on disk: ``<stem>.safetensors`` (tensors only, never pickled) + ``<stem>.json`` (model card).

The card records ``architecture`` (registry name), ``config`` (constructor arguments), ``sha256`` of the
weights file and whatever the trainer adds (data, epochs, metrics...). Loading checks the hash, the
architecture name and every tensor name and shape, and refuses a mismatch with a one-line :class:`UserError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

__all__ = ["save_weights", "load_weights", "read_card", "checkpoint_paths", "sha256_file"]

WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_pickle(path: str | os.PathLike) -> None:
    """:class:`UserError` when ``path`` is an existing file that is not a safetensors checkpoint or its card:
    pickled PyTorch files are never loaded."""
    given = Path(path)
    if given.is_file() and given.suffix not in (".safetensors", ".json"):
        raise UserError(f"{given.name} is not a .safetensors checkpoint: pickled PyTorch files (.pt/.pth/.ckpt) are "
                        "refused because loading one can run arbitrary code; save the state dict with safetensors")


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, card)`` paths from a stem or from either file's path."""
    p = Path(path)
    if p.suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX):
        p = p.with_suffix("")
    return p.with_name(p.name + WEIGHTS_SUFFIX), p.with_name(p.name + CARD_SUFFIX)


def _atomic_write(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then ``os.replace`` (no half-written checkpoint)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..io.result_folder import ordinary_file_mode

    tmp = str(target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        write(tmp)
        os.chmod(tmp, ordinary_file_mode())  # safetensors writes 0600 (through mkstemp): give 0644 like the rest
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(
    model: nn.Module, path: str | os.PathLike, card: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16
) -> tuple[Path, Path]:
    """Save ``model``'s state dict as safetensors (floating tensors cast to ``dtype``) and its JSON card.

    ``path`` is the stem (a ``.safetensors``/``.json`` suffix is ignored). The card gets ``architecture``,
    ``config``, ``dtype``, ``params`` and ``sha256`` filled in. Returns the two paths.
    """
    from safetensors.torch import save_file

    weights_path, card_path = checkpoint_paths(path)
    state = {}
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        state[key] = t.contiguous()
    name = getattr(model, "name", type(model).__name__)
    _atomic_write(weights_path, lambda tmp: save_file(state, tmp, metadata={"architecture": str(name)}))
    full_card = dict(card or {})
    full_card.update(
        {
            "architecture": str(name),
            "config": getattr(model, "config", {}),
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "native",
            "params": int(sum(p.numel() for p in model.parameters())),
            "weights_file": weights_path.name,
            "sha256": sha256_file(weights_path),
        }
    )

    def write_card(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(full_card, fh, indent=2, sort_keys=False)
            fh.write("\n")

    _atomic_write(card_path, write_card)
    return weights_path, card_path


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON model card next to a checkpoint; :class:`UserError` if missing or unreadable."""
    _, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        raise UserError(f"model card not found: {card_path}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model card {card_path} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(card, dict) or "architecture" not in card:
        raise UserError(f"model card {card_path} has no 'architecture' entry")
    return card


def load_weights(
    path: str | os.PathLike, expected_name: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network named in the card and load its weights (float32, eval mode). Returns ``(model, card)``.

    Never unpickles. Refuses, with a one-line :class:`UserError`: a missing or corrupt file, a hash that does not
    match the card, an architecture other than ``expected_name``, missing/unexpected tensors or wrong shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .catalog import build_model

    weights_path, _ = checkpoint_paths(path)
    card = read_card(path)
    arch = str(card["architecture"])
    if expected_name is not None and arch != expected_name:
        raise UserError(f"checkpoint {weights_path.name} is a '{arch}' network, expected '{expected_name}'")
    if not weights_path.is_file():
        raise UserError(f"weights file not found: {weights_path}")
    digest = card.get("sha256")
    if digest and sha256_file(weights_path) != digest:
        raise UserError(f"weights file {weights_path.name} is corrupt (sha256 differs from its model card)")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"weights file {weights_path.name} is corrupt or not safetensors ({exc})") from None
    config = card.get("config") or {}
    if not isinstance(config, dict):
        raise UserError(f"model card of {weights_path.name}: 'config' must be an object")
    model = build_model(arch, **config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        extra = len(missing) + len(unexpected) - 1
        raise UserError(
            f"checkpoint {weights_path.name} does not fit '{arch}': {what}" + (f" (+{extra} more)" if extra else "")
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise UserError(
                f"checkpoint {weights_path.name} does not fit '{arch}': tensor '{key}' has shape "
                f"{tuple(state[key].shape)}, the network expects {tuple(ref.shape)}"
            )
        if ref.is_floating_point():
            state[key] = state[key].to(ref.dtype)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, card
