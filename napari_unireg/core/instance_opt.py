"""Instance optimisation of a displacement field (NCC + diffusion + folding penalty), a classical method of our own.

Used two ways: on its own as the ``classical`` model (coarse-to-fine from zero), and after a network as an
optional refinement (``--io-steps N``) that starts from the network's field. Each level optimises a residual on
a grid pooled by its factor (1 = the model grid); the residual is added to the full-resolution field, so what the
network (or a coarser level) found is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import Cancelled
from .sample import resize_flow, upsample_pooled_flow, warp

#: Defaults checked on training pairs, never on the validation pairs (``benchmarks/refinement.py``,
#: ``bench/refinement_train.md``: 3 labelled non-validation pairs, dp-vfa + 50 steps): λ=1 / λ=2 without the folding
#: term give Dice 0.7552 / 0.7536 with NDV 0.54 / 0.31 %; with it 0.7557 / 0.7518 with NDV 0.083 / 0.037 %. λ=2 with
#: the term keeps the Dice within 0.004 of the best at the lowest NDV (the field's regularity is what a user trusts).
LAMBDA = 2.0
FOLD_WEIGHT = 100.0
#: A refinement of N steps is N steps on the half-resolution grid (the smooth correction, where the half-resolution
#: networks err most), then N / FULL_STEP_RATIO steps on the model grid itself (detail at the label boundaries that
#: a 2 mm grid cannot hold; one such step costs ~8 half-resolution ones), with Adam steps of FULL_LR voxel: at the
#: half-resolution level's 0.2 the per-voxel updates oscillate into checkerboard folds (NDV ×9). Chosen on labelled
#: training pairs, never the validation pairs (``bench/refinement_train.md``): the half-resolution level stops gaining
#: after ~30 steps; 5 full-resolution steps then add ~+0.006 Dice, the next 5 only ~+0.002.
FULL_STEP_RATIO = 6
FULL_LR = 0.05
#: NCC window (voxels of the level's grid); the losses' default
WINDOW = 9
#: The classical method from zero: ``steps`` on each of these down-sampling factors, coarse first.
CLASSICAL_FACTORS = (4, 2)


class Level(NamedTuple):
    """One level of the optimisation: ``steps`` Adam steps on the grid pooled by ``factor`` (1 = the model grid),
    of ``lr`` voxels of that grid (None: the call's ``lr``), with a ``window³``-voxel NCC window of that grid."""

    factor: int
    steps: int
    lr: float | None = None
    window: int = WINDOW


def refinement_levels(steps: int) -> tuple[Level, ...]:
    """The levels of a refinement of ``steps``: ``steps`` at half resolution, ⌈steps / FULL_STEP_RATIO⌉ at full."""
    if steps <= 0:
        return ()
    return Level(2, steps), Level(1, math.ceil(steps / FULL_STEP_RATIO), FULL_LR)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool3d(x, factor, stride=factor, ceil_mode=True)


def _field_down(u: torch.Tensor, factor: int) -> torch.Tensor:
    """A full-grid field on the pooled grid (same pooled-centre geometry as the images), pooled voxel units."""
    return _pool(u, factor) / factor


def _field_up(u: torch.Tensor, factor: int, shape) -> torch.Tensor:
    """A pooled-grid field back on the full grid (exact centre geometry; resized when pooling rounded up)."""
    u = upsample_pooled_flow(u, factor)
    return u if tuple(u.shape[2:]) == tuple(shape) else resize_flow(u, shape)


def optimise_level(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init: torch.Tensor,
    steps: int,
    lam: float = LAMBDA,
    lr: float = 0.2,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    fold_weight: float = FOLD_WEIGHT,
    window: int = WINDOW,
) -> torch.Tensor:
    """Adam on a displacement residual at the grid of ``fixed``; returns ``init + residual`` (same grid).

    The loss is ``NCC + lam·diffusion + fold_weight·mean(relu(0.05 − J))``: the folding term only acts where the
    Jacobian determinant approaches zero, so it leaves the similarity/smoothness balance alone elsewhere.
    """
    from .losses import FixedNCC, diffusion, fold_penalty

    init = init.detach()
    similarity = FixedNCC(fixed, window)
    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise Cancelled()
        u = init + delta
        loss = similarity(warp(moving, u)) + lam * diffusion(u)
        if fold_weight > 0:
            loss = loss + fold_weight * fold_penalty(u, 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress((step + 1) / steps)
    return (init + delta).detach()


def instance_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init_disp: torch.Tensor | None = None,
    steps: int = 100,
    factors: Sequence[int] | None = None,
    lam: float = LAMBDA,
    lr: float = 0.2,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    fold_weight: float = FOLD_WEIGHT,
    levels: Sequence[Level | tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Register ``moving`` to ``fixed`` (``1×1×S``) by optimising a displacement (``1×3×S``, voxel units, pull).

    ``levels`` are :class:`Level` s (or ``(factor, steps)`` pairs), coarse first. Without them: ``steps`` on each of
    ``factors`` (default :data:`CLASSICAL_FACTORS`), or, refining ``init_disp`` without ``factors``,
    :func:`refinement_levels` of ``steps``. ``progress`` gets the fraction of the work done (levels weighted by
    cost).
    """
    shape = tuple(fixed.shape[2:])
    if levels is None:
        if factors is None and init_disp is not None:
            levels = refinement_levels(steps)
        else:
            levels = [Level(f, steps) for f in (factors or CLASSICAL_FACTORS)]
    levels = [Level(*level) for level in levels]
    # The 9³ similarity window needs a few windows per axis: drop levels that would be too coarse.
    levels = [lv for lv in levels if min(shape) // lv.factor >= 16 and lv.steps > 0] or [Level(1, steps)]
    full = init_disp if init_disp is not None else torch.zeros(1, 3, *shape, device=fixed.device, dtype=fixed.dtype)
    costs = [lv.steps / lv.factor**3 for lv in levels]  # a step's cost is about proportional to the level's voxels
    done = 0.0
    correction = None  # on the full grid
    for (factor, n, level_lr, window), cost in zip(levels, costs):
        f_l, m_l = _pool(fixed, factor), _pool(moving, factor)
        base = _field_down(full, factor)
        start = base if correction is None else base + _field_down(correction, factor)

        def level_progress(frac: float, before: float = done, cost: float = cost) -> None:
            if progress is not None:
                progress((before + frac * cost) / sum(costs))

        with torch.enable_grad():
            result = optimise_level(f_l, m_l, start, n, lam, lr if level_lr is None else level_lr, level_progress,
                                    should_stop, fold_weight, window)
        correction = _field_up(result - base, factor, shape)
        done += cost
    return full + correction
