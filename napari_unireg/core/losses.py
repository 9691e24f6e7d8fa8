"""Training losses (ARCHITECTURE.md §8): squared local NCC (VFA version), diffusion regulariser, symmetric form.

Tensors are ``B×C×D0×D1×D2``; displacements ``B×3×S`` in voxel units, pull convention (``core/sample.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .sample import warp

__all__ = ["box_filter", "ncc_vfa", "FixedNCC", "diffusion", "fold_penalty", "registration_loss", "dice_loss"]

_EPS32 = float(torch.finfo(torch.float32).eps)  # ≈ 1.19e-7, the authors' ε


def box_filter(x: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Local mean over a ``window³`` box with zero padding (``window // 2``), as 3 separable 1-D averages.

    Equal to a 3-D conv with weights ``1/window³`` and zero padding: the padding of each 1-D pass reads only
    zeros that the full 3-D box would also read. ``avg_pool3d`` (padding counted, i.e. zeros) is used rather
    than ``conv3d`` because it is 3-6× faster on CPU for these thin kernels. ``x``: ``B×C×S``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"box_filter: window must be a positive odd integer, got {window}")
    r = window // 2
    y = F.avg_pool3d(x, (window, 1, 1), stride=1, padding=(r, 0, 0), count_include_pad=True)
    y = F.avg_pool3d(y, (1, window, 1), stride=1, padding=(0, r, 0), count_include_pad=True)
    return F.avg_pool3d(y, (1, 1, window), stride=1, padding=(0, 0, r), count_include_pad=True)


def ncc_vfa(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = _EPS32) -> torch.Tensor:
    """Squared local normalised cross-correlation loss: ``1 − mean(σ_IJ² / max(σ_I²·σ_J², ε))``.

    Local moments from a ``window³`` box filter (weights ``1/window³``, zero padding). Flat windows (variance
    below √ε) give cc ≈ 0, so ``ncc_vfa(I, I)`` equals the fraction of flat voxels. Returns a scalar.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"ncc_vfa: shapes differ {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    return FixedNCC(fixed, window, eps)(warped)


class FixedNCC:
    """:func:`ncc_vfa` against one fixed image, its local moments computed once: ``FixedNCC(I)(J) == ncc_vfa(I, J)``.

    An optimisation that warps only the moving image (instance optimisation) keeps one and box-filters three moment
    maps of the warped image per step instead of five (−24 % of the similarity's time on a 1 mm field).
    """

    def __init__(self, fixed: torch.Tensor, window: int = 9, eps: float = _EPS32):
        self.fixed, self.window, self.eps = fixed, window, eps
        c = fixed.shape[1]
        mu_i, e_ii = torch.split(box_filter(torch.cat([fixed, fixed * fixed], dim=1), window), c, dim=1)
        self.mu_i, self.var_i = mu_i, e_ii - mu_i * mu_i

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        if warped.shape != self.fixed.shape:
            raise ValueError(f"FixedNCC: shapes differ {tuple(self.fixed.shape)} vs {tuple(warped.shape)}")
        j = warped
        mu_j, e_jj, e_ij = torch.split(box_filter(torch.cat([j, j * j, self.fixed * j], dim=1), self.window),
                                       j.shape[1], dim=1)
        var_j = e_jj - mu_j * mu_j
        cov = e_ij - self.mu_i * mu_j
        return 1.0 - (cov * cov / torch.clamp(self.var_i * var_j, min=self.eps)).mean()


class _Diffusion(torch.autograd.Function):
    """The diffusion value with its gradient written out: ``∂/∂u_k`` of ``Σ d_i²`` (``d_i = u_{i+1} − u_i``) is
    ``2(d_{k−1} − d_k)``. Autograd through the slices allocates and scatters full-size zeros per axis; this is 2.4×
    faster on a full-resolution field (a refinement step on the model grid) and equal to it to float rounding."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        total = u.new_zeros(())
        for axis in (2, 3, 4):
            d = torch.diff(u, dim=axis)
            total = total + d.square().sum() / d.numel()
        return total / 3.0

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        grad = torch.zeros_like(u)
        for axis in (2, 3, 4):
            d = torch.diff(u, dim=axis)
            d = d * (grad_out * (2.0 / 3.0) / d.numel())
            n = u.shape[axis]
            grad.narrow(axis, 1, n - 1).add_(d)
            grad.narrow(axis, 0, n - 1).sub_(d)
        return grad


def diffusion(u: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference along each spatial axis, averaged over the 3 axes."""
    return _Diffusion.apply(u)


def fold_penalty(u: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """``mean(relu(threshold − J))`` of a ``1×3×S`` displacement, ``J`` its central-difference Jacobian determinant
    (:func:`~napari_unireg.core.metrics.jacobian_determinant_torch`: 1 on the 2-voxel border), differentiable in ``u``.

    Only voxels with ``J < threshold`` contribute, and a well-behaved field has few: ``J`` is computed once without
    a graph, and autograd runs only on the boxes around those voxels (each box of whole axis-0 rows, cropped on the
    other axes, with the 2-voxel halo ``J`` reads). Value and gradient equal the dense expression
    (``tests/test_losses.py``); a 1 mm refinement step saves the graph of nine full-size derivative maps.
    """
    from .metrics import jacobian_determinant_torch

    if threshold >= 1.0:  # the border (J = 1) would count too: the dense expression
        return F.relu(threshold - jacobian_determinant_torch(u)).mean()
    if u.shape[0] != 1:
        return torch.stack([fold_penalty(ui[None], threshold) for ui in u]).mean()
    with torch.no_grad():
        below = jacobian_determinant_torch(u)[0] < threshold  # D0×D1×D2; False on the border (J = 1 there)
    rows = torch.nonzero(below.flatten(1).any(dim=1)).flatten().tolist()
    total = u.new_zeros(())
    if not rows:  # zero, with a zero gradient: a leaf, so that backward() through it still works
        return total.requires_grad_(u.requires_grad)
    runs, start = [], rows[0]
    for prev, row in zip(rows, rows[1:] + [None]):
        if row is None or row > prev + 4:  # a gap wider than two halos: a new box
            runs.append((start, prev))
            start = row
    for a, b in runs:
        hit = below[a : b + 1]
        ys = torch.nonzero(hit.any(dim=(0, 2))).flatten()
        xs = torch.nonzero(hit.any(dim=(0, 1))).flatten()
        (y0, y1), (x0, x1) = (int(ys[0]), int(ys[-1])), (int(xs[0]), int(xs[-1]))
        box = u[:, :, a - 2 : b + 3, y0 - 2 : y1 + 3, x0 - 2 : x1 + 3]
        jac = jacobian_determinant_torch(box)[:, 2:-2, 2:-2, 2:-2]  # = J of the rows a..b, y0..y1, x0..x1
        total = total + F.relu(threshold - jac).sum()
    return total / below.numel()


def _disp_and_inverse(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(disp, inverse)`` from a RegistrationOutput-like object or a bare displacement tensor."""
    if isinstance(out, torch.Tensor):
        return out, None
    return out.disp, getattr(out, "inverse", None)


def registration_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    out: Any,
    lam: float = 1.0,
    window: int = 9,
    return_terms: bool = False,
    reg_out: Any = None,
):
    """Training loss of one pair.

    * ``out.inverse is None`` ((a), (c)): ``L = NCC(F, M∘φ12) + λ·diffusion(u12)``.
    * otherwise ((b), inverse consistent): ``L = ½[NCC(F, M∘φ12) + NCC(M, F∘φ21)] + ½λ[diffusion(u12) +
      diffusion(u21)]``, with ``u21 = out.inverse`` warping the fixed image onto the moving grid.

    ``out`` is a ``RegistrationOutput`` (``.disp``, ``.inverse``) or a bare displacement on the images' grid.
    ``reg_out`` (same form, default ``out``) is the field the diffusion term is taken on: a network's own coarse
    field when ``out`` is that field brought up to the finer grid the similarity is computed on, so λ keeps its
    meaning on the network's grid. Returns the scalar loss, or ``(loss, sim, reg)`` when ``return_terms``
    (``sim``/``reg`` already averaged over directions).
    """
    u12, u21 = _disp_and_inverse(out)
    r12, r21 = _disp_and_inverse(out if reg_out is None else reg_out)
    sim = ncc_vfa(fixed, warp(moving, u12), window)
    reg = diffusion(r12)
    if u21 is not None:
        sim = 0.5 * (sim + ncc_vfa(moving, warp(fixed, u21), window))
        reg = 0.5 * (reg + diffusion(r21))
    loss = sim + lam * reg
    return (loss, sim, reg) if return_terms else loss


def dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss ``1 − mean_c 2Σ(a·b)/(Σa + Σb + eps)`` over the channels of ``B×C×S`` one-hot maps.

    (Optional auxiliary loss γ of the authors' code; unused in the paper's recipe.)
    """
    if fixed_onehot.shape != warped_onehot.shape:
        raise ValueError(f"dice_loss: shapes differ {tuple(fixed_onehot.shape)} vs {tuple(warped_onehot.shape)}")
    dims = tuple(range(2, fixed_onehot.ndim))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    denom = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    return 1.0 - (2.0 * inter / (denom + eps)).mean()
