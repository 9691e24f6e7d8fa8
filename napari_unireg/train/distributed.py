"""Process group set-up for ``torchrun`` (DistributedDataParallel), devices and hardware description.

``torchrun --nproc_per_node N -m napari_unireg.cli train ...`` (or ``python -m torch.distributed.run``) sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; we then join the default process group with ``nccl`` on CUDA and
``gloo`` on CPU. One GPU per process (``cuda:LOCAL_RANK``). Only rank 0 writes files or prints progress.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

__all__ = ["DistInfo", "setup", "teardown", "barrier", "any_flag", "min_int", "resolve_device", "hardware_info"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device
    backend: str | None = None
    owns_group: bool = False  # we initialised the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(pref: str, local_rank: int = 0):
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` → ``cuda:LOCAL_RANK``."""
    import torch

    pref = (pref or "auto").lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {pref!r} asked for, but CUDA is not available here; use --device cpu")
        dev = torch.device(pref)
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UserError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return torch.device("cuda", index)
    raise UserError(f"unknown device {pref!r}: use auto, cpu, cuda or cuda:N")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a single process."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = resolve_device(device_pref, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank, world, local, device, dist.get_backend(), owns_group=False)
    if world <= 1:
        return DistInfo(0, 1, 0, resolve_device(device_pref, 0), None)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # rank 0 validates while the others wait at a barrier: allow long full-resolution validations
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world, timeout=datetime.timedelta(hours=3)
    )
    return DistInfo(rank, world, local, device, backend, owns_group=True)


def teardown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def any_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (keeps ranks stopping at the same step)."""
    if not info.enabled:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def min_int(info: DistInfo, value: int | None) -> int | None:
    """The smallest ``value`` over the ranks (None stays None; all ranks reach this call at the same step)."""
    if not info.enabled or value is None:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform's guess elsewhere): recorded in cards and benchmark reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(info: DistInfo | None = None) -> dict[str, Any]:
    """CPU model, core/thread counts, GPU name(s), torch version: recorded in the model card."""
    import torch

    hw: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if info is not None:
        hw["device"] = str(info.device)
        hw["world_size"] = info.world
        hw["backend"] = info.backend
        if info.device is not None and info.device.type == "cuda":
            hw["gpu"] = torch.cuda.get_device_name(info.device)
            hw["cuda"] = torch.version.cuda
    return hw
