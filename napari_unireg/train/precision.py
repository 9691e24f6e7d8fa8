"""Which floating-point precision training runs in on this machine (``amp: auto``).

bf16 autocast pays off on a CPU only where the hardware computes bf16 dot products natively: AMX (Intel
Sapphire Rapids and later) or AVX-512-BF16 (Intel Cooper Lake, AMD Zen 4 and later). Elsewhere oneDNN emulates
bf16 and a step is slower than in fp32, so ``auto`` trains in fp32 there. Measured with the step profile of
``benchmarks/training.py`` on an AMD EPYC with AVX-512-BF16 (no AMX): a dp-vfa step at half resolution took
2.4× less time in bf16 than in fp32 (bench/training_cpu.md). On such CPUs oneDNN's bf16 weight gradients
sporadically come back NaN; the trainer skips those steps (``skipped`` in log.csv). On CUDA ``auto`` picks
bf16 where the GPU supports it (Ampere and later), else fp32; fp16 (with a GradScaler) only when asked for.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["cpu_bf16_support", "auto_amp", "amp_dtype"]

_OFF = ("none", "fp32", "false", "off")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def classify_bf16(flags: set[str]) -> str:
    """``'amx'`` | ``'avx512_bf16'`` | ``'none'`` from CPU feature flags (as /proc/cpuinfo names them)."""
    if "amx_bf16" in flags and "amx_tile" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "none"


@lru_cache(maxsize=1)
def cpu_bf16_support() -> str:
    """What this CPU offers for bf16: ``'amx'``, ``'avx512_bf16'`` or ``'none'`` (emulated).

    Reads /proc/cpuinfo (Linux); elsewhere asks torch's CPU feature probes (private, so guarded).
    """
    flags = _cpuinfo_flags()
    if flags:
        return classify_bf16(flags)
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            return "amx"
        if torch.cpu._is_avx512_bf16_supported():
            return "avx512_bf16"
    except (ImportError, AttributeError, RuntimeError):
        pass
    return "none"


def auto_amp(device_type: str, cuda_bf16: bool | None = None, cpu_support: str | None = None) -> str:
    """The precision ``amp: auto`` trains in: ``'bf16'`` or ``'none'`` (fp32).

    CPU: bf16 with AMX or AVX-512-BF16, else fp32. CUDA: bf16 when the GPU supports it (``cuda_bf16``; probed
    when None), else fp32.
    """
    if device_type == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return "bf16" if cuda_bf16 else "none"
    support = cpu_support if cpu_support is not None else cpu_bf16_support()
    return "bf16" if (device_type == "cpu" and support in ("amx", "avx512_bf16")) else "none"


def amp_dtype(amp: str | None, device: Any):
    """``torch`` dtype of autocast for the ``amp`` setting on ``device`` (None: fp32, no autocast)."""
    import torch

    amp = (amp or "none").lower()
    if amp == "auto":
        amp = auto_amp(device.type)
    if amp in _OFF:
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("amp fp16 needs CUDA; use --amp bf16 on CPU")
        return torch.float16
    raise UserError(f"amp must be none, bf16, fp16 or auto, not {amp!r}")
