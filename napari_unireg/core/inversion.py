"""Inverse of a displacement field by an Anderson-accelerated fixed point, with an implicit backward.

For a displacement ``a`` (``B×3×S``, voxels, pull convention) the inverse ``v`` solves the fixed point
``v(p) = −a(p + v(p))`` (so that ``φ_a ∘ φ_v = id``), with ``a`` sampled trilinearly with border
extrapolation (:func:`napari_unireg.core.sample.warp`). ARCHITECTURE.md §5:

* forward: Anderson acceleration (memory 4, β = 1, ridge 1e-4 on the Gram matrix), initial guess ``−a``, stop when
  ``max|v_new − v_old| < tol`` (1e-2 voxel) over the whole batch, between 2 and 50 iterations;
* backward (implicit differentiation): solve ``w = (∂F/∂v)ᵀ w + ∂L/∂v`` with the same solver, stop when the
  relative L2 change is below 1e-2 (ε = 1e-5), 2..50 iterations; the gradient reaches ``a`` through one
  application of ``F``: ``∂L/∂a = (∂F/∂a)ᵀ w``.

The solver keeps only the last ``memory`` values of ``F(x)`` and of the residual ``F(x) − x`` (with β = 1 the
iterates themselves are not needed) and updates the Gram matrix one row per iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sample import warp

__all__ = ["AndersonOptions", "anderson_solve", "invert_displacement", "inversion_residual"]


@dataclass(frozen=True)
class AndersonOptions:
    """Settings of one Anderson solve. ``stop`` is ``'max_abs'`` (forward) or ``'rel_l2'`` (backward)."""

    memory: int = 4
    beta: float = 1.0
    ridge: float = 1e-4
    tol: float = 1e-2
    min_iter: int = 2
    max_iter: int = 50
    stop: str = "max_abs"
    eps: float = 1e-5


def _change(new: torch.Tensor, old: torch.Tensor, opts: AndersonOptions) -> float:
    if opts.stop == "max_abs":
        return float((new - old).abs().max())
    return float(torch.linalg.vector_norm(new - old) / (torch.linalg.vector_norm(new) + opts.eps))


def anderson_solve(
    fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, opts: AndersonOptions = AndersonOptions()
) -> tuple[torch.Tensor, int]:
    """Fixed point ``x = fn(x)`` from ``x0`` (first dim = batch, mixing coefficients per sample).

    Returns ``(x, iterations)``; ``iterations`` counts evaluations of ``fn`` after the first.
    """
    bsz = x0.shape[0]
    m = max(int(opts.memory), 1)
    shape = x0.shape
    fx = fn(x0)
    x = x0
    # ring buffers of F(x_i) and residuals g_i = F(x_i) − x_i, flattened per sample
    fbuf = torch.empty((bsz, m, x0[0].numel()), dtype=x0.dtype, device=x0.device)
    gbuf = torch.empty_like(fbuf)
    gram = torch.zeros((bsz, m, m), dtype=torch.float64, device=x0.device)
    it = 0
    for k in range(int(opts.max_iter)):
        slot = k % m
        fbuf[:, slot] = fx.reshape(bsz, -1)
        torch.sub(fbuf[:, slot], x.reshape(bsz, -1), out=gbuf[:, slot])
        n = min(k + 1, m)
        # new row of the Gram matrix of residuals (float64: the ridge is tiny)
        row = torch.einsum("bn,bjn->bj", gbuf[:, slot], gbuf[:, :n]).to(torch.float64)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        if n == 1:
            x_new = fx.reshape(bsz, -1) if opts.beta == 1.0 else None
            if x_new is None:
                x_new = fx.reshape(bsz, -1) - (1 - opts.beta) * gbuf[:, 0]
        else:
            # minimise ||Σ α_i g_i||² + ridge·||α||² subject to Σ α_i = 1 (bordered linear system)
            h = torch.zeros((bsz, n + 1, n + 1), dtype=torch.float64, device=x0.device)
            h[:, 0, 1:] = 1
            h[:, 1:, 0] = 1
            h[:, 1:, 1:] = gram[:, :n, :n] + opts.ridge * torch.eye(n, dtype=torch.float64, device=x0.device)
            rhs = torch.zeros((bsz, n + 1, 1), dtype=torch.float64, device=x0.device)
            rhs[:, 0] = 1
            alpha = torch.linalg.solve(h, rhs)[:, 1:, 0].to(x0.dtype)  # bsz × n
            x_new = torch.einsum("bj,bjn->bn", alpha, fbuf[:, :n])
            if opts.beta != 1.0:  # x_i = F_i − g_i
                x_new = x_new - (1 - opts.beta) * torch.einsum("bj,bjn->bn", alpha, gbuf[:, :n])
        x_new = x_new.reshape(shape)
        change = _change(x_new, x, opts)
        x = x_new
        it = k + 1
        if it >= opts.min_iter and change < opts.tol:
            break
        fx = fn(x)
    return x, it


def _fixed_point_map(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ −a(p + v(p))``; ``−a`` is formed once, not negated at every iteration."""
    neg = -a
    return lambda v: warp(neg, v)


class _InvertDisplacement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, fwd: AndersonOptions, bwd: AndersonOptions) -> torch.Tensor:
        with torch.no_grad():
            v, _ = anderson_solve(_fixed_point_map(a), -a, fwd)
        ctx.save_for_backward(a, v)
        ctx.bwd = bwd
        return v

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor):
        a, v = ctx.saved_tensors
        grad_v = grad_v.to(v.dtype)
        with torch.enable_grad(), torch.autocast(device_type=a.device.type, enabled=False):
            a_ = a.detach().requires_grad_(True)
            v_ = v.detach().requires_grad_(True)
            fv = -warp(a_, v_)

            def adjoint(w: torch.Tensor) -> torch.Tensor:
                (jt_w,) = torch.autograd.grad(fv, v_, w, retain_graph=True)
                return jt_w + grad_v

            w, _ = anderson_solve(adjoint, grad_v, ctx.bwd)
            (grad_a,) = torch.autograd.grad(fv, a_, w)
        return grad_a, None, None


def invert_displacement(
    a: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-2,
    *,
    min_iter: int = 2,
    memory: int = 4,
    ridge: float = 1e-4,
    beta: float = 1.0,
    backward_tol: float = 1e-2,
    backward_max_iter: int = 50,
) -> torch.Tensor:
    """Displacement ``v`` with ``v(p) = −a(p + v(p))``: the inverse of ``φ_a = id + a`` (``B×3×S`` voxels).

    Differentiable w.r.t. ``a`` by implicit differentiation (the solver's iterations are not recorded).
    """
    if a.dim() != 5 or a.shape[1] != 3:
        raise ValueError(f"invert_displacement: expected B×3×D0×D1×D2, got {tuple(a.shape)}")
    fwd = AndersonOptions(memory, beta, ridge, tol, min_iter, max_iter, "max_abs")
    bwd = AndersonOptions(memory, beta, ridge, backward_tol, min_iter, backward_max_iter, "rel_l2")
    with torch.autocast(device_type=a.device.type, enabled=False):  # the solver needs float32 (or float64)
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        if not (torch.is_grad_enabled() and a.requires_grad):
            with torch.no_grad():
                return anderson_solve(_fixed_point_map(a), -a, fwd)[0]
        return _InvertDisplacement.apply(a, fwd, bwd)


def inversion_residual(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``|v(p) + a(p + v(p))|`` per voxel (``B×S``): how far ``φ_a ∘ φ_v`` is from the identity."""
    return torch.linalg.vector_norm(v + warp(a, v), dim=1)
