"""Resume checkpoints (``last.pt``) and encoder initialisation.

A resume checkpoint holds only tensors and primitive containers (dicts, lists, numbers, strings): model and
optimiser state dicts, the scheduler/scaler state, the step counter, the best validation score, the resolved
config and the RNG states of torch, numpy and Python (numpy's converted to a tensor + numbers). It is written
atomically (temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``: loading never
executes pickled code.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = [
    "FORMAT",
    "rng_state",
    "set_rng_state",
    "atomic_torch_save",
    "save_state",
    "load_state",
    "init_from",
]

FORMAT = "napari-unireg-train-state/1"


# --------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), numpy (legacy global) and Python's ``random`` as safe containers."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(py[0]), "internal": [int(v) for v in py[1]], "gauss_next": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import torch

    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------- save / load
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_state(path: str | Path, **state: Any) -> None:
    """Write a resume checkpoint (``state`` must hold tensors and primitive containers only)."""
    atomic_torch_save({"format": FORMAT, **state}, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a resume checkpoint with ``weights_only=True``; a one-line :class:`UserError` if corrupt or foreign."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a napari-unireg training state ({msg[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a napari-unireg training state (format {FORMAT})")
    for key in ("model", "optimizer", "step", "config", "model_name"):
        if key not in state:
            raise UserError(f"checkpoint {path} is incomplete (no {key!r})")
    return state


def load_model_state(model: Any, state: dict[str, Any], where: str) -> None:
    """``model.load_state_dict`` with a one-line :class:`UserError` naming the first mismatching tensor."""
    expected = model.state_dict()
    got = state
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise UserError(
            f"{where} does not fit the model: {what} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise UserError(
                f"{where} does not fit the model: {k!r} has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}"
            )
    model.load_state_dict({k: got[k].to(v.dtype) for k, v in expected.items()})


# --------------------------------------------------------------------------------------------- init from another model
def _source_file(source: str) -> Path:
    """The ``.safetensors`` file that ``source`` names (the file, its stem or its ``.json`` card); may not exist."""
    p = Path(source).expanduser()
    if p.suffix == ".safetensors":
        return p
    if p.suffix == ".json":
        return p.with_suffix(".safetensors")
    return p.with_name(p.name + ".safetensors")


def _source_state(source: str) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file (its stem or its ``.json`` card also accepted) or of a registry model."""
    p = Path(source).expanduser()
    cand = _source_file(source)
    if cand.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(cand), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--init-encoder: {cand} is corrupt or not a safetensors file ({e})") from None
    if p.exists():
        raise UserError(f"--init-encoder: {p} is not a .safetensors weights file")
    from ..models.registry import MODEL_NAMES, load_pretrained

    if str(source) not in MODEL_NAMES:
        raise UserError(f"--init-encoder: {source} is neither a weights file nor a registered model")
    model, _ = load_pretrained(source)
    return model.state_dict()


def init_from(model: Any, source: str, decoder: bool = True) -> dict[str, Any]:
    """Copy the encoder tensors (``encoder.*``) of another trained model into ``model``, plus every other tensor
    whose name and shape match when ``decoder``. Returns counts for the log/model card.

    Raises :class:`UserError` when not a single encoder tensor fits (wrong file, different encoder).
    """
    import torch

    src = _source_state(source)
    target = model.state_dict()
    enc_keys = [k for k in target if k.startswith("encoder.")]
    copied_enc, copied_dec, skipped = [], [], []
    new = {}
    for k, v in target.items():
        s = src.get(k)
        if s is None or tuple(s.shape) != tuple(v.shape):
            if k in enc_keys or (decoder and s is not None):
                skipped.append(k)
            continue
        if k in enc_keys:
            copied_enc.append(k)
        elif decoder:
            copied_dec.append(k)
        else:
            continue
        new[k] = s.to(v.dtype)
    if not enc_keys:
        raise UserError(f"--init-encoder: model {getattr(model, 'name', '?')} has no 'encoder' submodule")
    if len(copied_enc) != len(enc_keys):
        bad = next(k for k in enc_keys if k not in copied_enc)
        raise UserError(
            f"--init-encoder: {source} does not hold a compatible encoder "
            f"({len(copied_enc)}/{len(enc_keys)} tensors fit; first mismatch {bad!r})"
        )
    with torch.no_grad():
        model.load_state_dict({**target, **new})
    info: dict[str, Any] = {"source": str(source)}
    if _source_file(source).is_file():  # which weights exactly: a card's stages are chained by this hash
        info["sha256"] = hashlib.sha256(_source_file(source).read_bytes()).hexdigest()
    return {
        **info,
        "encoder_tensors": len(copied_enc),
        "decoder_tensors": len(copied_dec),
        "skipped": len(skipped),
    }
