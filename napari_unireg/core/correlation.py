"""Local 3×3×3 feature correlation (cost volume) used by the -C and -MFC decoders.

``corr(A, B)_k(p) = Σ_c A_c(p) · B_c(p + o_k) / √C`` for the 27 offsets ``o_k ∈ {−1, 0, 1}³`` with channel
``k = 9·(o0+1) + 3·(o1+1) + (o2+1)`` (axis-0 offset slowest). ``A`` is the anchor (fixed features), ``B`` is
shifted (warped moving features) and zero-padded. Because the padding is zero,
``corr(B, A)_k(p) = corr(A, B)_{26−k}(p + o_k)`` exactly: :func:`reverse_correlation` builds the reverse
direction from the forward one with 27 shifted copies instead of a second 27·C product (ARCHITECTURE.md §13).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["OFFSETS", "local_correlation", "reverse_correlation"]

#: The 27 offsets in channel order.
OFFSETS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((-1, 0, 1), repeat=3))


def local_correlation(anchor: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """27-channel local correlation ``corr(anchor, shifted)`` (``B×C×S`` each → ``B×27×S``)."""
    if anchor.shape != shifted.shape:
        raise ValueError(f"local_correlation: shapes differ {tuple(anchor.shape)} vs {tuple(shifted.shape)}")
    d0, d1, d2 = anchor.shape[2:]
    scale = 1.0 / math.sqrt(anchor.shape[1])
    padded = F.pad(shifted, (1, 1, 1, 1, 1, 1))
    out = []
    for o0, o1, o2 in OFFSETS:
        window = padded[:, :, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2]
        out.append((anchor * window).sum(1))
    return torch.stack(out, dim=1) * scale


def reverse_correlation(corr: torch.Tensor) -> torch.Tensor:
    """``corr(B, A)`` from ``corr(A, B)`` by shifting channel ``26−k`` by ``o_k`` with zero fill."""
    d0, d1, d2 = corr.shape[2:]
    padded = F.pad(corr, (1, 1, 1, 1, 1, 1))
    out = []
    for k, (o0, o1, o2) in enumerate(OFFSETS):
        out.append(padded[:, 26 - k, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2])
    return torch.stack(out, dim=1)
