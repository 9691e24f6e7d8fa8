"""Cubic B-spline control-point upsampling with field-of-view aligned level grids (ARCHITECTURE.md §1, §5, §13.5).

Level ``l`` has grid spacing ``f = 2^l`` full-resolution voxels, and its voxel ``i`` sits at full-resolution
coordinate ``(i + 0.5)·f − 0.5`` (edges of the field of view aligned, the ``align_corners=False`` convention).
A full-resolution voxel ``p`` therefore sits at level coordinate ``x = (p + 0.5)/f − 0.5``.

The spline is evaluated without prefiltering (control points are coefficients, not samples) and with border
extrapolation of the control-point grid. Evaluation is separable: along each axis, output voxel ``f·i + r`` is
``Σ_{d=−2..2} c[i+d]·β3(t_r − d)`` with ``t_r = (r + 0.5)/f − 0.5`` — a 5-tap ``conv1d`` with ``f`` output
channels followed by interleaving (the polyphase form of the transposed convolution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "UPPER_BOUNDS",
    "max_control_point",
    "cubic_bspline",
    "bspline_weights",
    "bspline_upsample",
    "level_shape",
    "sample_at_level",
]

#: Upper bound of control-point displacements (in control-point spacings) that keeps a cubic B-spline
#: deformation invertible, per upsampling factor (SITReg's table).
UPPER_BOUNDS: dict[int, float] = {1: 0.36, 2: 0.38545, 4: 0.39803, 8: 0.40073, 16: 0.40175}


def max_control_point(factor: int, safety: float = 0.99) -> float:
    """``0.99·UB(factor)``: the tanh bound of the control points at a level with spacing ``factor``."""
    if factor not in UPPER_BOUNDS:
        raise ValueError(f"no invertibility bound for upsampling factor {factor} (have {sorted(UPPER_BOUNDS)})")
    return safety * UPPER_BOUNDS[factor]


def cubic_bspline(x: torch.Tensor) -> torch.Tensor:
    """The centred cubic B-spline ``β3`` (support ``(−2, 2)``, ``β3(0) = 2/3``, ``β3(±1) = 1/6``)."""
    ax = x.abs()
    inner = 2.0 / 3.0 - ax**2 + 0.5 * ax**3
    outer = (2.0 - ax) ** 3 / 6.0
    return torch.where(ax < 1, inner, torch.where(ax < 2, outer, torch.zeros_like(ax)))


def bspline_weights(factor: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``W[r, d+2] = β3(t_r − d)``: polyphase weights, ``factor × 5``; each row sums to 1."""
    r = torch.arange(factor, dtype=torch.float64)
    t = (r + 0.5) / factor - 0.5
    d = torch.arange(-2, 3, dtype=torch.float64)
    return cubic_bspline(t[:, None] - d[None, :]).to(dtype=dtype, device=device)


def _upsample_last_axis(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spline-evaluate along the last axis: ``…×N`` control points → ``…×(f·N)`` samples."""
    lead, n = x.shape[:-1], x.shape[-1]
    f = weights.shape[0]
    flat = F.pad(x.reshape(-1, 1, n), (2, 2), mode="replicate")  # border extrapolation of the coefficients
    out = F.conv1d(flat, weights.unsqueeze(1))  # (M, f, N): out[:, r, i] = Σ_d W[r, d] c[i + d]
    return out.transpose(1, 2).reshape(*lead, n * f)


def bspline_upsample(cp: torch.Tensor, factor: int) -> torch.Tensor:
    """Evaluate a cubic B-spline with control points ``cp`` (``B×C×n0×n1×n2``) at every voxel of the grid that
    is ``factor`` times finer (``B×C×(f·n0)×(f·n1)×(f·n2)``), FOV-aligned. Values keep their units."""
    if cp.dim() != 5:
        raise ValueError(f"bspline_upsample: expected B×C×D0×D1×D2, got {tuple(cp.shape)}")
    with torch.autocast(device_type=cp.device.type, enabled=False):  # displacements stay float32
        out = cp.float() if cp.dtype in (torch.float16, torch.bfloat16) else cp
        w = bspline_weights(int(factor), dtype=out.dtype, device=cp.device)
        for axis in (4, 3, 2):
            out = _upsample_last_axis(out.movedim(axis, -1), w).movedim(-1, axis)
        return out.contiguous()


def level_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """Grid size of pyramid level ``level`` (spacing ``2^level``) for a full-resolution ``shape``."""
    f = 2**level
    return tuple(int(s) // f for s in shape)


def sample_at_level(u: torch.Tensor, level: int) -> torch.Tensor:
    """Evaluate a full-resolution field at the level-``level`` voxel centres ``(i + 0.5)·2^l − 0.5``.

    Trilinear interpolation (``align_corners=False`` is exactly this geometry); values keep their units.
    """
    if level == 0:
        return u
    with torch.autocast(device_type=u.device.type, enabled=False):
        return F.interpolate(u, size=level_shape(u.shape[2:], level), mode="trilinear", align_corners=False)
