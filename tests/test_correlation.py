"""Local correlation (ARCHITECTURE.md §4, §13.1, §14): channel order, norms, reverse remap."""

from __future__ import annotations

import math

import pytest
import torch

from napari_unireg.core.correlation import OFFSETS, local_correlation, reverse_correlation


def _naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct definition with explicit bounds checks (zero outside)."""
    bsz, c, d0, d1, d2 = a.shape
    out = torch.zeros(bsz, 27, d0, d1, d2, dtype=a.dtype)
    for k, (o0, o1, o2) in enumerate(OFFSETS):
        for i in range(d0):
            for j in range(d1):
                for l in range(d2):
                    q = (i + o0, j + o1, l + o2)
                    if 0 <= q[0] < d0 and 0 <= q[1] < d1 and 0 <= q[2] < d2:
                        out[:, k, i, j, l] = (a[:, :, i, j, l] * b[:, :, q[0], q[1], q[2]]).sum(1) / math.sqrt(c)
    return out


def test_channel_order_is_axis0_slowest():
    assert OFFSETS[0] == (-1, -1, -1) and OFFSETS[13] == (0, 0, 0) and OFFSETS[26] == (1, 1, 1)
    for k, (o0, o1, o2) in enumerate(OFFSETS):
        assert k == 9 * (o0 + 1) + 3 * (o1 + 1) + (o2 + 1)


def test_matches_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 4, 5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 4, 5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(local_correlation(a, b), _naive(a, b))


def test_centre_channel_is_norm_squared():
    a = torch.randn(1, 16, 6, 7, 5)
    c = local_correlation(a, a)
    torch.testing.assert_close(c[:, 13], (a**2).sum(1) / 4.0)


@pytest.mark.parametrize("shape", [(1, 8, 5, 6, 7), (2, 3, 3, 3, 3)])
def test_reverse_remap_identity_exact(shape):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(*shape, generator=g)
    b = torch.randn(*shape, generator=g)
    forward = local_correlation(a, b)
    direct = local_correlation(b, a)
    remapped = reverse_correlation(forward)
    # mathematically exact (zero padding); numerically equal up to the summation order of the channel sum
    torch.testing.assert_close(remapped, direct, rtol=0, atol=1e-6)
    # the zero-filled border of each shifted channel is where the direct product is out of range too
    assert torch.equal(remapped == 0, direct == 0)


def test_reverse_is_involution_inside():
    c = local_correlation(torch.randn(1, 4, 6, 6, 6), torch.randn(1, 4, 6, 6, 6))
    back = reverse_correlation(reverse_correlation(c))
    # the zero border of the shifted channels is lost twice, the interior comes back
    torch.testing.assert_close(back[..., 1:-1, 1:-1, 1:-1], c[..., 1:-1, 1:-1, 1:-1])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        local_correlation(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 5))


def _plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition as 27 products of padded slices, differentiated by autograd (the reference gradient)."""
    d0, d1, d2 = a.shape[2:]
    bp = torch.nn.functional.pad(b, (1, 1, 1, 1, 1, 1))
    return torch.stack([(a * bp[:, :, 1 + o0 : 1 + o0 + d0, 1 + o1 : 1 + o1 + d1, 1 + o2 : 1 + o2 + d2]).sum(1)
                        for o0, o1, o2 in OFFSETS], 1) / math.sqrt(a.shape[1])


def test_hand_written_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(local_correlation, (a, b))
    weights = torch.arange(27.0, dtype=torch.float64)[:, None, None, None]  # a distinct weight per channel
    assert torch.autograd.gradcheck(lambda c: reverse_correlation(c) * weights,
                                    (local_correlation(a, b).detach().requires_grad_(),))


@pytest.mark.parametrize("which", ["both", "anchor", "shifted"])
def test_gradient_equals_autograd_of_the_definition(which):
    """Large enough for several cache slabs along axis 0; a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(3)
    a0, b0 = torch.randn(1, 8, 40, 48, 40, generator=g), torch.randn(1, 8, 40, 48, 40, generator=g)
    upstream = torch.randn(1, 27, 40, 48, 40, generator=g)
    grads = []
    for fn in (local_correlation, _plain):
        a, b = a0.clone().requires_grad_(which != "shifted"), b0.clone().requires_grad_(which != "anchor")
        fn(a, b).backward(upstream)
        grads.append((a.grad, b.grad))
    for mine, ref in zip(*grads):
        assert (mine is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_mixed_precision_promotes_and_returns_each_input_dtype():
    """bf16 anchor (a conv output under autocast) with a float32 shifted map (a warp): the product is float32, as
    the plain definition's, and each gradient comes back in its input's dtype, close to a float64 reference."""
    g = torch.Generator().manual_seed(4)
    a64, b64 = torch.randn(1, 4, 9, 8, 7, generator=g, dtype=torch.float64), torch.randn(1, 4, 9, 8, 7, generator=g,
                                                                                           dtype=torch.float64)
    a, b = a64.bfloat16().requires_grad_(), b64.float().requires_grad_()
    out = local_correlation(a, b)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    _plain(ar, br).square().sum().backward()
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    torch.testing.assert_close(a.grad.double(), ar.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-5, atol=1e-5)


def test_reverse_gradient_equals_autograd_of_the_slices():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 27, 5, 6, 4, generator=g, requires_grad=True)
    upstream = torch.randn(2, 27, 5, 6, 4, generator=g)
    reverse_correlation(c).backward(upstream)
    ref = c.detach().clone().requires_grad_()
    padded = torch.nn.functional.pad(ref, (1, 1, 1, 1, 1, 1))
    torch.stack([padded[:, 26 - k, 1 + o0 : 6 + o0, 1 + o1 : 7 + o1, 1 + o2 : 5 + o2]
                 for k, (o0, o1, o2) in enumerate(OFFSETS)], 1).backward(upstream)
    assert torch.equal(c.grad, ref.grad)


def test_row_ranges_on_threads_change_nothing():
    """The CPU cuts the rows into one range per intra-op thread: forward and both gradients are bit-identical
    with 1 and 3 threads, and the threads honour the caller's inference mode (outputs are inference tensors)."""
    g = torch.Generator().manual_seed(6)
    a0, b0 = torch.randn(1, 8, 45, 48, 40, generator=g), torch.randn(1, 8, 45, 48, 40, generator=g)
    upstream = torch.randn(1, 27, 45, 48, 40, generator=g)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
            out = local_correlation(a, b)
            out.backward(upstream)
            with torch.inference_mode():
                inferred = local_correlation(a0, b0)
            assert torch.get_num_threads() == n  # restored after the threaded ranges
            results.append((out.detach(), a.grad, b.grad, inferred))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)
    assert results[1][3].is_inference() and torch.equal(results[1][3], results[1][0])
