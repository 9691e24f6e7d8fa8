"""Local 3×3×3 feature correlation (cost volume) used by the -C and -MFC decoders.

``corr(A, B)_k(p) = Σ_c A_c(p) · B_c(p + o_k) / √C`` for the 27 offsets ``o_k ∈ {−1, 0, 1}³`` with channel
``k = 9·(o0+1) + 3·(o1+1) + (o2+1)`` (axis-0 offset slowest). ``A`` is the anchor (fixed features), ``B`` is
shifted (warped moving features) and zero-padded. Because the padding is zero,
``corr(B, A)_k(p) = corr(A, B)_{26−k}(p + o_k)`` exactly: :func:`reverse_correlation` builds the reverse
direction from the forward one with 27 shifted copies instead of a second 27·C product (ARCHITECTURE.md §13).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["OFFSETS", "window_dots", "local_correlation", "reverse_correlation"]

#: The 27 offsets in channel order.
OFFSETS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((-1, 0, 1), repeat=3))
_SLAB_BYTES = 1 << 20  # per-slab working set of one product (fits L2 with its two operands)


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
    """27-channel local correlation ``corr(anchor, shifted)`` (``B×C×S`` each → ``B×27×S``), zero padding.

    Without gradients the products run slab by slab along axis 0 so that they stay in cache (about 3× faster
    on a CPU than 27 full-size products, no ``C×S`` temporary per offset); with gradients the plain form.
    """
    if anchor.shape != shifted.shape:
        raise ValueError(f"local_correlation: shapes differ {tuple(anchor.shape)} vs {tuple(shifted.shape)}")
    return window_dots(anchor, F.pad(shifted, (1, 1, 1, 1, 1, 1)), 1.0 / math.sqrt(anchor.shape[1]))


def reverse_correlation(corr: torch.Tensor) -> torch.Tensor:
    """``corr(B, A)`` from ``corr(A, B)`` by shifting channel ``26−k`` by ``o_k`` with zero fill."""
    d0, d1, d2 = corr.shape[2:]
    padded = F.pad(corr, (1, 1, 1, 1, 1, 1))
    out = []
    for k, (o0, o1, o2) in enumerate(OFFSETS):
        out.append(padded[:, 26 - k, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2])
    return torch.stack(out, dim=1)
