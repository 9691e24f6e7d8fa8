"""Cubic B-spline upsampling and FOV-aligned level geometry (ARCHITECTURE.md §1, §5)."""

from __future__ import annotations

import pytest
import torch

from napari_unireg.core.bspline import (
    UPPER_BOUNDS,
    bspline_upsample,
    bspline_weights,
    cubic_bspline,
    level_shape,
    max_control_point,
    sample_at_level,
)


def test_kernel_values():
    x = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(cubic_bspline(x), torch.tensor([4 / 6, 1 / 6, 1 / 6, 0.0, 23 / 48], dtype=torch.float64))
    # factor 1 is the [1, 4, 1]/6 smoothing kernel
    torch.testing.assert_close(bspline_weights(1)[0], torch.tensor([0, 1 / 6, 4 / 6, 1 / 6, 0], dtype=torch.float64))


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_partition_of_unity_and_shape(factor):
    assert torch.allclose(bspline_weights(factor).sum(1), torch.ones(factor, dtype=torch.float64))
    cp = torch.full((1, 3, 2, 3, 2), 0.7)
    out = bspline_upsample(cp, factor)
    assert out.shape == (1, 3, 2 * factor, 3 * factor, 2 * factor)
    torch.testing.assert_close(out, torch.full_like(out, 0.7))


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_linear_reproduction_fov_aligned(factor):
    """Control points c_i = i reproduce x = (p + 0.5)/f − 0.5 away from the border (no prefilter needed)."""
    n = 8
    i = torch.arange(n, dtype=torch.float64)
    cp = i.view(1, 1, n, 1, 1).expand(1, 1, n, 2, 2).contiguous()
    out = bspline_upsample(cp, factor)[0, 0, :, 0, 0]
    p = torch.arange(n * factor, dtype=torch.float64)
    x = (p + 0.5) / factor - 0.5
    inside = (x >= 2) & (x <= n - 3)
    torch.testing.assert_close(out[inside], x[inside])


def test_separable_matches_direct_sum():
    g = torch.Generator().manual_seed(0)
    cp = torch.randn(1, 1, 3, 4, 3, generator=g, dtype=torch.float64)
    f = 2
    out = bspline_upsample(cp, f)
    # direct evaluation with border-replicated coefficients at one voxel
    p = (3, 4, 1)
    xs = [(pi + 0.5) / f - 0.5 for pi in p]
    val = 0.0
    for a in range(-3, 7):
        for b in range(-3, 8):
            for c in range(-3, 7):
                w = cubic_bspline(torch.tensor([xs[0] - a, xs[1] - b, xs[2] - c], dtype=torch.float64)).prod()
                val += w * cp[0, 0, min(max(a, 0), 2), min(max(b, 0), 3), min(max(c, 0), 2)]
    torch.testing.assert_close(out[0, 0, p[0], p[1], p[2]], val)


def test_bounds_table():
    assert UPPER_BOUNDS[1] == 0.36
    caps = [max_control_point(2**lv) * 2**lv for lv in range(5)]
    torch.testing.assert_close(torch.tensor(caps), torch.tensor([0.356, 0.763, 1.576, 3.174, 6.364]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        max_control_point(32)


def test_sample_at_level_centres():
    shape = (16, 8, 24)  # multiples of 2^level, as in the networks
    u = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))[None]
    for level in (1, 2, 3):
        f = 2**level
        s = sample_at_level(u, level)
        assert s.shape[2:] == level_shape(shape, level)
        for axis in range(3):
            i = torch.arange(shape[axis] // f, dtype=torch.float64)
            centre = (i + 0.5) * f - 0.5
            index = [0, 0, 0]
            index[axis] = slice(None)
            got = s[0, axis][tuple(index)]
            torch.testing.assert_close(got, centre)
