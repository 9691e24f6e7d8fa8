"""Local 3×3×3 feature correlation (cost volume) of the -C and -MFC decoders and of DP-VFA's attention logits.

``corr(A, B)_k(p) = Σ_c A_c(p) · B_c(p + o_k) / √C`` for the 27 offsets ``o_k ∈ {−1, 0, 1}³`` with channel
``k = 9·(o0+1) + 3·(o1+1) + (o2+1)`` (axis-0 offset slowest). ``A`` is the anchor (fixed features), ``B`` is
shifted (warped moving features) and zero-padded. Because the padding is zero,
``corr(B, A)_k(p) = corr(A, B)_{26−k}(p + o_k)`` exactly: :func:`reverse_correlation` builds the reverse
direction from the forward one with 27 shifted copies instead of a second 27·C product (ARCHITECTURE.md §13).

Both carry hand-written backward passes: autograd of 27 sliced products or copies allocates and sums one
zero-padded gradient per offset, which made the correlation the costliest part of a -C training step on a CPU.
"""

from __future__ import annotations

import concurrent.futures
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


def _slab_rows(d0: int, row_bytes: int) -> int:
    """Rows of axis 0 per slab so that one slab of a product stays within ``_SLAB_BYTES``."""
    return max(1, min(d0, _SLAB_BYTES // max(1, row_bytes)))


def _window(o: tuple[int, int, int], z0: int, z1: int, d1: int, d2: int) -> tuple[slice, ...]:
    """Index of the padded keys seen by rows ``z0:z1`` of the query at offset ``o``."""
    o0, o1, o2 = o
    return (slice(None), slice(None), slice(1 + o0 + z0, 1 + o0 + z1), slice(1 + o1, 1 + o1 + d1),
            slice(1 + o2, 1 + o2 + d2))


def _check_padded(query: torch.Tensor, keys_padded: torch.Tensor) -> None:
    d0, d1, d2 = query.shape[2:]
    if tuple(keys_padded.shape[2:]) != (d0 + 2, d1 + 2, d2 + 2):
        raise ValueError(
            f"window_dots: keys must be padded by 1, got {tuple(keys_padded.shape)} for {tuple(query.shape)}"
        )


def _row_threads(d0: int, row_bytes: int) -> int:
    """Threads for ``d0`` rows on a CPU: one per intra-op thread, each with at least one slab of work."""
    return max(1, min(torch.get_num_threads(), d0, d0 * row_bytes // _SLAB_BYTES))


def _in_row_chunks(fn, d0: int, row_bytes: int, device: torch.device) -> None:
    """``fn(z0, z1)`` over contiguous row ranges that cover ``0:d0``, each range run on one intra-op thread.

    On a CPU with ``n`` intra-op threads the rows are cut into ``n`` ranges (at least a slab each: a thread
    costs more than a small product), each run in its own Python thread with one intra-op thread (the ops
    release the GIL): the many small slab ops then run in parallel without an OpenMP barrier each. ``fn`` must
    write only rows ``z0:z1`` of its outputs.
    """
    n = _row_threads(d0, row_bytes) if device.type == "cpu" else 1
    if n == 1:
        with _single_thread() if device.type == "cpu" else contextlib.nullcontext():
            fn(0, d0)
        return
    bounds = [d0 * i // n for i in range(n + 1)]
    grad_mode, inference_mode = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(i: int) -> None:
        torch.set_num_threads(1)  # this thread's own setting; the caller's is restored by _single_thread
        # grad and inference mode are per thread: the workers take the caller's (writes into inference tensors)
        with torch.inference_mode(inference_mode), torch.set_grad_enabled(grad_mode):
            fn(bounds[i], bounds[i + 1])

    with _single_thread(), concurrent.futures.ThreadPoolExecutor(n) as pool:
        for future in [pool.submit(work, i) for i in range(n)]:
            future.result()


def _window_dots_slabs(query: torch.Tensor, keys_padded: torch.Tensor, scale: float) -> torch.Tensor:
    """The 27 products slab by slab along axis 0 (no graph), in the promoted dtype of the two inputs."""
    b, c, d0, d1, d2 = query.shape
    dtype = torch.promote_types(query.dtype, keys_padded.dtype)
    out = torch.empty((b, len(OFFSETS), d0, d1, d2), dtype=dtype, device=query.device)
    slab = _slab_rows(d0, b * c * d1 * d2 * out.element_size()) if query.device.type == "cpu" else d0

    def rows(z0: int, z1: int) -> None:
        tmp = torch.empty((b, c, min(slab, z1 - z0), d1, d2), dtype=dtype, device=query.device)
        for s0 in range(z0, z1, slab):
            s1 = min(z1, s0 + slab)
            t = tmp[:, :, : s1 - s0]
            for k, o in enumerate(OFFSETS):
                torch.mul(query[:, :, s0:s1], keys_padded[_window(o, s0, s1, d1, d2)], out=t)
                torch.sum(t, dim=1, out=out[:, k, s0:s1])

    _in_row_chunks(rows, d0, b * c * d1 * d2 * out.element_size(), query.device)
    return out.mul_(scale)


class _WindowDots(torch.autograd.Function):
    """:func:`window_dots` with a hand-written backward, slab by slab like the forward.

    Autograd of 27 sliced products allocates a zero-padded key gradient per offset and sums 27 of them; here
    ``dQ(p) = s·Σ_k g_k(p)·K(p + 1 + o_k)`` and ``dK(x) = s·Σ_k g_k(x − 1 − o_k)·Q(x − 1 − o_k)`` are gathered
    in place, each over its own rows (so row ranges can run in parallel), float32 for reduced-precision inputs
    (27 terms per voxel), always in offset order (the result does not depend on the slabs or the threads).
    Measured 5-10× faster per level than autograd on a CPU.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, keys_padded: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(query, keys_padded)
        ctx.scale = scale
        return _window_dots_slabs(query, keys_padded, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, keys_padded = ctx.saved_tensors
        b, c, d0, d1, d2 = query.shape
        acc = torch.promote_types(torch.promote_types(query.dtype, keys_padded.dtype), torch.float32)
        grad = grad.to(acc) * ctx.scale
        slab = _slab_rows(d0, b * c * d1 * d2 * grad.element_size()) if query.device.type == "cpu" else d0 + 2
        d_query = d_keys = None
        if ctx.needs_input_grad[0]:
            d_query = torch.zeros(query.shape, dtype=acc, device=query.device)

            def query_rows(z0: int, z1: int) -> None:
                for s0 in range(z0, z1, slab):
                    s1 = min(z1, s0 + slab)
                    for k, o in enumerate(OFFSETS):
                        window = keys_padded[_window(o, s0, s1, d1, d2)]
                        d_query[:, :, s0:s1].addcmul_(grad[:, k : k + 1, s0:s1], window)

            _in_row_chunks(query_rows, d0, b * c * d1 * d2 * grad.element_size(), query.device)
            d_query = d_query.to(query.dtype)
        if ctx.needs_input_grad[1]:
            d_keys = torch.zeros(keys_padded.shape, dtype=acc, device=query.device)

            def key_rows(r0: int, r1: int) -> None:  # padded rows r0:r1 take query rows r − 1 − o0
                for s0 in range(r0, r1, slab):
                    s1 = min(r1, s0 + slab)
                    for k, o in enumerate(OFFSETS):
                        z0, z1 = max(0, s0 - 1 - o[0]), min(d0, s1 - 1 - o[0])
                        if z0 < z1:
                            d_keys[_window(o, z0, z1, d1, d2)].addcmul_(grad[:, k : k + 1, z0:z1], query[:, :, z0:z1])

            _in_row_chunks(key_rows, d0 + 2, b * c * d1 * d2 * grad.element_size(), query.device)
            d_keys = d_keys.to(keys_padded.dtype)
        return d_query, d_keys, None


def window_dots(query: torch.Tensor, keys_padded: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_k(p) = scale·Σ_c Q_c(p)·K_c(p + 1 + o_k)`` for the 27 offsets; ``keys_padded`` is 2 larger per axis.

    ``B×C×S`` and ``B×C×(S+2)`` → ``B×27×S`` in the promoted dtype of the two. The products run slab by slab
    along axis 0 so that they stay in cache (about 3× faster on a CPU than 27 full-size products, no ``C×S``
    temporary per offset); with gradients the backward is the hand-written one of :class:`_WindowDots`.
    """
    _check_padded(query, keys_padded)
    if torch.is_grad_enabled() and (query.requires_grad or keys_padded.requires_grad):
        return _WindowDots.apply(query, keys_padded, scale)
    return _window_dots_slabs(query, keys_padded, scale)


def local_correlation(anchor: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """27-channel local correlation ``corr(anchor, shifted)`` (``B×C×S`` each → ``B×27×S``), zero padding."""
    if anchor.shape != shifted.shape:
        raise ValueError(f"local_correlation: shapes differ {tuple(anchor.shape)} vs {tuple(shifted.shape)}")
    return window_dots(anchor, F.pad(shifted, (1, 1, 1, 1, 1, 1)), 1.0 / math.sqrt(anchor.shape[1]))


def _shift_channels(corr: torch.Tensor) -> torch.Tensor:
    """Channel ``26−k`` shifted by ``o_k`` into channel ``k``, zero fill (one stacked copy)."""
    d0, d1, d2 = corr.shape[2:]
    padded = F.pad(corr, (1, 1, 1, 1, 1, 1))
    return torch.stack([padded[:, 26 - k, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2]
                        for k, (o0, o1, o2) in enumerate(OFFSETS)], dim=1)


class _ReverseCorrelation(torch.autograd.Function):
    """The remap is its own adjoint: ``out_k(p) = c_{26−k}(p + o_k)`` gives ``dc_j(x) = g_{26−j}(x + o_j)``
    (``o_{26−k} = −o_k``), the same remap of the gradient; autograd of 27 slices would allocate a zero-padded
    ``B×27×S`` gradient per channel."""

    @staticmethod
    def forward(ctx, corr: torch.Tensor) -> torch.Tensor:
        return _shift_channels(corr)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _shift_channels(grad)


def reverse_correlation(corr: torch.Tensor) -> torch.Tensor:
    """``corr(B, A)`` from ``corr(A, B)`` by shifting channel ``26−k`` by ``o_k`` with zero fill."""
    if torch.is_grad_enabled() and corr.requires_grad:
        return _ReverseCorrelation.apply(corr)
    return _shift_channels(corr)
