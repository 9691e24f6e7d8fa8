"""Which device a run uses: ``auto`` → CUDA when present, else the CPU."""

from __future__ import annotations

from ..errors import UserError

__all__ = ["available_devices", "resolve_device"]


def available_devices() -> list[tuple[str, str]]:
    """What can run here: ``[(id, label)]``, CUDA devices by name first, then the CPU."""
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i}", f"CUDA {i}: {torch.cuda.get_device_name(i)}"))
    n = torch.get_num_threads()
    out.append(("cpu", f"CPU ({n} thread{'s' if n != 1 else ''})"))
    return out


def resolve_device(name: str):
    """``auto`` → CUDA when present, else CPU. A CUDA request without CUDA is a :class:`UserError`."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
