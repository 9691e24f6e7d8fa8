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
