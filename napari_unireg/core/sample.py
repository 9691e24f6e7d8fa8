"""Dense spatial transforms on voxel grids: the one place where the conventions live.

Conventions (every other module relies on them, ``tests/test_spatial.py`` checks them):

* Tensors are ``B×C×D0×D1×D2``; a displacement ``u`` is ``B×3×D0×D1×D2``.
* ``u`` is in **voxel units of its own grid**; channel ``c`` is the displacement along array axis ``c``
  (not world x, y, z order).
* **Pull direction**: ``warped(p) = moving(p + u(p))`` for every fixed-grid voxel ``p``. So ``φ = id + u`` maps
  fixed → moving coordinates.
* Sampling uses ``grid_sample`` with ``align_corners=True`` (voxel ``i`` of an axis of length ``N`` sits at
  normalised ``2i/(N−1) − 1``), ``padding_mode='border'`` for images and fields, nearest with zero padding for
  label maps (the Learn2Reg evaluation convention).
* ``compose(a, b) = b + warp(a, b)`` is ``φ_a ∘ φ_b``: ``b`` is applied first.

All functions are pure, differentiable (except ``warp_labels``), batched and device agnostic. The sampling grid is
built in two passes from a cached normalised identity grid (``tests/test_spatial.py`` checks every function
against plain references: ``scipy.ndimage.map_coordinates`` and a step-by-step grid construction).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "warp",
    "warp_labels",
    "compose",
    "upsample_flow",
    "resize_flow",
    "integrate_velocity",
    "upsample_pooled_flow",
    "sampling_grid",
    "clear_cache",
    "full_precision",
    "geometry_mode",
]


_GRID_CACHE: OrderedDict = OrderedDict()
_GRID_CACHE_SIZE = 3
_GRID_LOCK = threading.Lock()


_HALF = (torch.float16, torch.bfloat16)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if it is float16/bfloat16 (what autocast makes of conv outputs), else unchanged."""
    return t.float() if t.dtype in _HALF else t


def geometry_mode(t: torch.Tensor):
    """Context for coordinate maths: autocast off on ``t``'s device (sampling positions need float32)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


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
    if not image.is_floating_point():
        image = image.to(torch.float32)
    with geometry_mode(image):
        image, disp = full_precision(image), full_precision(disp)
        grid = sampling_grid(disp.to(image.dtype))
        return _grid_sample(image, grid, mode, padding_mode)


#: below this many sampling points (a 32³ grid) one call is cheaper than cutting: thread start-up dominates
_MIN_CUT_POINTS = 32768


def _cpu_chunks(image: torch.Tensor, grid: torch.Tensor) -> int:
    """How many batch items to cut one CPU sample into (1: leave it whole).

    PyTorch's 3-D ``grid_sample`` on the CPU runs its batch items in parallel and each item on one thread, so a
    single volume uses one core however many there are. Cut in two on two cores (``bench/sampling.md``), a 1 mm
    warp of a displacement with its backward pass takes 0.69 s instead of 1.08 s, of an image 0.44 s instead of 0.60.
    """
    n = grid[0, ..., 0].numel()
    if image.device.type != "cpu" or image.shape[0] != 1 or n < _MIN_CUT_POINTS:
        return 1
    k = min(torch.get_num_threads(), n)
    while k > 1 and n % k:
        k -= 1
    return k


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``grid_sample(align_corners=True)`` that uses every CPU thread for a single volume.

    Each output voxel depends only on its own grid point, so the ``1×D0×D1×D2×3`` grid is cut into ``k`` equal
    runs of points, each a batch item of a ``k×n/k×1×1×3`` grid sampling the same image (``expand``: no copy);
    the results are put back in order. Values and gradients are those of one call (``tests/test_spatial.py``).
    """
    k = _cpu_chunks(image, grid)
    if k == 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    out_shape = grid.shape[1:-1]
    points = grid.reshape(k, -1, 1, 1, 3)
    out = F.grid_sample(image.expand(k, *image.shape[1:]), points, mode=mode, padding_mode=padding_mode,
                        align_corners=True)  # k×C×(n/k)×1×1
    channels = image.shape[1]
    out = out.reshape(k, channels, -1).transpose(0, 1)  # C×k×(n/k): a view for C == 1, else one copy below
    return out.reshape(1, channels, *out_shape)


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of a grid, ``3×D0×D1×D2`` (``meshgrid(..., indexing='ij')``)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def warp_labels(labels: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (``B×1×S``), zero outside; returns the input dtype."""
    out = warp(labels.to(torch.float32), disp.to(torch.float32), mode="nearest", padding_mode="zeros")
    return out.round().to(labels.dtype)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``φ_a ∘ φ_b`` (apply ``b`` first): ``b + a(p + b(p))``; in place on the warp result
    without gradients."""
    out = warp(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return out + b
    return out.add_(b)  # out is float32 whenever b is half: add_ never narrows


def upsample_flow(u: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The authors' (a)/(c) pyramid upsampling: scale values by ``factor``, trilinear ``align_corners=True``.

    Note the quirk (ARCHITECTURE.md §1): the true grid ratio is ``(fN−1)/(N−1)``, values are scaled by ``f``.
    Kept to reproduce the paper's networks; use :func:`resize_flow` for exact geometry.
    """
    return F.interpolate(u * factor, scale_factor=factor, mode="trilinear", align_corners=True)


def resize_flow(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a displacement to another grid covering the same field of view (``align_corners=True``).

    Each channel is rescaled by ``(N_out − 1)/(N_in − 1)`` of its own axis so that voxel units stay right.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    ratios = [(o - 1) / max(i - 1, 1) for o, i in zip(shape, u.shape[2:])]
    scale = torch.tensor(ratios, device=u.device, dtype=u.dtype).view(1, 3, 1, 1, 1)
    return F.interpolate(u, size=shape, mode="trilinear", align_corners=True) * scale


def upsample_pooled_flow(u: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """A field predicted on an ``avg_pool3d(·, factor)`` grid → the full grid, with exact voxel geometry.

    Pooled voxel ``i`` is the mean of full voxels ``factor·i … factor·i + factor − 1``, so its centre sits at
    full coordinate ``factor·i + (factor − 1)/2``: trilinear ``align_corners=False`` resampling does exactly
    that mapping (border values beyond the outer centres) and the values scale by ``factor``.
    """
    if factor == 1:
        return u
    return F.interpolate(u, scale_factor=factor, mode="trilinear", align_corners=False) * factor


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field: ``exp(v)`` as a displacement."""
    u = v / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u
