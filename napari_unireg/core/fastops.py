"""Faster drop-in versions of the hot spatial operations, identical in result to the reference ones.

* :func:`warp` / :func:`compose` equal :func:`napari_unireg.core.sample.warp` / ``compose`` but build the sampling
  grid in two passes from a cached normalised identity grid (the reference builds the identity grid, adds,
  scales, shifts, permutes and flips: six passes and five full-size allocations per call).
* :func:`window_dots` / :func:`local_correlation` equal :func:`napari_unireg.core.correlation.local_correlation`
  (bitwise) but work slab by slab along axis 0 so that the 27 products stay in cache: about 3× faster on CPU
  and no ``C×S`` temporary per offset. The slab loop runs on one intra-op thread (many small ops). With
  gradients they fall back to the plain (differentiable) form.

Candidates for moving into ``spatial.py`` / ``correlation.py``; ``tests/test_models.py`` checks the equality.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .correlation import OFFSETS

__all__ = ["warp", "compose", "window_dots", "local_correlation", "clear_cache", "full_precision", "geometry_mode"]

_GRID_CACHE: OrderedDict = OrderedDict()
_GRID_CACHE_SIZE = 3
_GRID_LOCK = threading.Lock()
_SLAB_BYTES = 1 << 20  # per-slab working set of one product (fits L2 with its two operands)


_HALF = (torch.float16, torch.bfloat16)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if it is float16/bfloat16 (what autocast makes of conv outputs), else unchanged."""
    return t.float() if t.dtype in _HALF else t


def geometry_mode(t: torch.Tensor):
    """Context for coordinate maths: autocast off on ``t``'s device (sampling positions need float32)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


@contextlib.contextmanager
def _single_thread():
    """Run many small ops on one intra-op thread: with 2+ threads each op pays an OpenMP barrier, and on a
    loaded machine a barrier waits for a descheduled thread (measured 3-10× slower than one thread)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def clear_cache() -> None:
    """Drop the cached identity grids (a full-resolution grid is 83 MB); the networks call it after each pass."""
    with _GRID_LOCK:
        _GRID_CACHE.clear()


def _base_grid(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Identity in grid_sample's normalised (x, y, z) = (axis2, axis1, axis0) order, ``1×D0×D1×D2×3``."""
    key = (shape, str(device), dtype, torch.is_inference_mode_enabled())  # inference tensors stay apart
    with _GRID_LOCK:
        grid = _GRID_CACHE.get(key)
        if grid is not None:
            _GRID_CACHE.move_to_end(key)
            return grid
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else
            torch.full((1,), -1.0, device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1).unsqueeze(0)
    with _GRID_LOCK:
        _GRID_CACHE[key] = grid
        while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
            _GRID_CACHE.popitem(last=False)
    return grid


def sampling_grid(disp: torch.Tensor) -> torch.Tensor:
    """``p + u(p)`` normalised for ``grid_sample(align_corners=True)``, ``B×D0×D1×D2×3`` in (x, y, z) order."""
    shape = tuple(int(s) for s in disp.shape[2:])
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape[::-1]], device=disp.device, dtype=disp.dtype)
    base = _base_grid(shape, disp.device, disp.dtype)
    return torch.addcmul(base, disp.flip(1).permute(0, 2, 3, 4, 1), scale)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Same as :func:`napari_unireg.core.sample.warp` (float images): ``out(p) = image(p + disp(p))``.

    Under autocast the sampling runs in float32 (half-precision inputs are promoted; the result is float32):
    a float16 grid would misplace samples by ~0.1 voxel on a 224-voxel axis.
    """
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"warp: image grid {tuple(image.shape[2:])} != displacement grid {tuple(disp.shape[2:])}")
    if image.shape[0] != disp.shape[0]:
        n = max(image.shape[0], disp.shape[0])
        image = image.expand(n, *image.shape[1:])
        disp = disp.expand(n, *disp.shape[1:])
    with geometry_mode(image):
        image, disp = full_precision(image), full_precision(disp)
        grid = sampling_grid(disp.to(image.dtype))
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``φ_a ∘ φ_b`` (apply ``b`` first): ``b + a(p + b(p))``; in place on the warp result without gradients."""
    out = warp(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return out + b
    return out.add_(b)  # out is float32 whenever b is half: add_ never narrows


def window_dots(query: torch.Tensor, keys_padded: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_k(p) = scale·Σ_c Q_c(p)·K_c(p + 1 + o_k)`` for the 27 offsets; ``keys_padded`` is 2 larger per axis."""
    b, c, d0, d1, d2 = query.shape
    if tuple(keys_padded.shape[2:]) != (d0 + 2, d1 + 2, d2 + 2):
        raise ValueError(
            f"window_dots: keys must be padded by 1, got {tuple(keys_padded.shape)} for {tuple(query.shape)}"
        )
    if torch.is_grad_enabled() and (query.requires_grad or keys_padded.requires_grad):
        windows = [keys_padded[:, :, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2]
                   for o0, o1, o2 in OFFSETS]
        return torch.stack([(query * w).sum(1) for w in windows], dim=1) * scale
    out = torch.empty((b, len(OFFSETS), d0, d1, d2), dtype=query.dtype, device=query.device)
    slab = max(1, min(d0, _SLAB_BYTES // max(1, b * c * d1 * d2 * query.element_size())))
    if query.device.type != "cpu":
        slab = d0  # no cache blocking on accelerators
    tmp = torch.empty((b, c, slab, d1, d2), dtype=query.dtype, device=query.device)
    with _single_thread() if query.device.type == "cpu" else contextlib.nullcontext():
        for z0 in range(0, d0, slab):
            z1 = min(d0, z0 + slab)
            q = query[:, :, z0:z1]
            t = tmp[:, :, : z1 - z0]
            for k, (o0, o1, o2) in enumerate(OFFSETS):
                window = keys_padded[:, :, 1 + o0 + z0 : 1 + o0 + z1, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2]
                torch.mul(q, window, out=t)
                torch.sum(t, dim=1, out=out[:, k, z0:z1])
    return out.mul_(scale)


def local_correlation(anchor: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Same as :func:`napari_unireg.core.correlation.local_correlation` (zero padding, ``1/√C``)."""
    if anchor.shape != shifted.shape:
        raise ValueError(f"local_correlation: shapes differ {tuple(anchor.shape)} vs {tuple(shifted.shape)}")
    return window_dots(anchor, F.pad(shifted, (1, 1, 1, 1, 1, 1)), 1.0 / math.sqrt(anchor.shape[1]))
