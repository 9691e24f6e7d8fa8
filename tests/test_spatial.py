"""The conventions of spatial.py: axis order, voxel units, pull direction, composition order."""

import numpy as np
import pytest
import torch

from napari_unireg.core.sample import (
    compose,
    identity_grid,
    integrate_velocity,
    resize_flow,
    upsample_flow,
    warp,
    warp_labels,
)

SHAPE = (12, 14, 10)


def _ramp(shape=SHAPE):
    g = identity_grid(shape)
    return (g[0] * 100 + g[1] * 10 + g[2]).reshape(1, 1, *shape)


def _constant_field(vec, shape=SHAPE):
    return torch.tensor(vec, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def test_identity_grid_is_ij_voxel_coordinates():
    g = identity_grid(SHAPE)
    assert g.shape == (3, *SHAPE)
    assert g[0, 3, 4, 5] == 3 and g[1, 3, 4, 5] == 4 and g[2, 3, 4, 5] == 5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_pull_convention_channel_is_array_axis(axis):
    vec = [0.0, 0.0, 0.0]
    vec[axis] = 1.0
    out = warp(_ramp(), _constant_field(vec))
    # warped(p) = image(p + u): a +1 shift along axis c reads the next voxel along c.
    expected = _ramp()[0, 0].roll(-1, dims=axis)
    inner = [slice(0, n - 1) for n in SHAPE]
    assert torch.allclose(out[0, 0][tuple(inner)], expected[tuple(inner)], atol=1e-3)


def test_warp_border_padding_and_fractional_shift():
    out = warp(_ramp(), _constant_field([0.5, 0.0, 0.0]))
    assert torch.allclose(out[0, 0, 2], (_ramp()[0, 0, 2] + _ramp()[0, 0, 3]) / 2, atol=1e-3)
    # Border: sampling past the last voxel repeats it.
    out = warp(_ramp(), _constant_field([5.0, 0.0, 0.0]))
    assert torch.allclose(out[0, 0, -1], _ramp()[0, 0, -1], atol=1e-3)


def test_warp_labels_is_nearest_with_zero_outside():
    labels = torch.zeros(1, 1, *SHAPE, dtype=torch.uint8)
    labels[0, 0, 4:8, 4:8, 4:8] = 7
    out = warp_labels(labels, _constant_field([0.6, 0.0, 0.0]))
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) == {0, 7}
    assert out[0, 0, 3, 5, 5] == 7 and out[0, 0, 7, 5, 5] == 0  # 3.6 -> 4 (in), 7.6 -> 8 (out)
    out = warp_labels(labels, _constant_field([100.0, 0.0, 0.0]))
    assert out.max() == 0


def _affine_field(matrix, shift, shape=SHAPE):
    g = identity_grid(shape)
    mapped = torch.einsum("ij,j...->i...", torch.tensor(matrix, dtype=torch.float32), g)
    return (mapped + torch.tensor(shift).view(3, 1, 1, 1) - g).unsqueeze(0)


def test_compose_matches_closed_form_for_affine_maps():
    a_m, a_t = [[1.0, 0.05, 0], [0, 0.97, 0], [0.02, 0, 1.0]], [0.3, -0.2, 0.1]
    b_m, b_t = [[1.02, 0, 0], [0, 1.0, -0.03], [0, 0, 0.98]], [0.2, 0.1, -0.1]
    a, b = _affine_field(a_m, a_t), _affine_field(b_m, b_t)
    # φ_a ∘ φ_b (x) = A (B x + tb) + ta
    am, bm = np.array(a_m), np.array(b_m)
    expected = _affine_field((am @ bm).tolist(), (am @ np.array(b_t) + np.array(a_t)).tolist())
    got = compose(a, b)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert torch.allclose(got[inner], expected[inner], atol=1e-4)


def test_warp_then_inverse_is_identity_for_integrated_fields():
    shape = (24, 26, 22)
    g = identity_grid(shape)
    v = torch.stack([1.5 * torch.sin(2 * torch.pi * g[(c + 1) % 3] / shape[(c + 1) % 3]) for c in range(3)])[None]
    u, u_inv = integrate_velocity(v), integrate_velocity(-v)
    residual = compose(u, u_inv)  # φ_u ∘ φ_u⁻¹ = id
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert u.abs().max() > 1.0
    assert residual[inner].abs().max() < 0.05 * u.abs().max()


def test_resize_flow_keeps_voxel_units():
    u = _affine_field([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], [1.5, -1.0, 0.5], shape=(9, 11, 7))
    big = resize_flow(u, (17, 21, 13))
    ratios = torch.tensor([16 / 8, 20 / 10, 12 / 6]).view(1, 3, 1, 1, 1)
    assert torch.allclose(big, torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1, 1) * ratios, atol=1e-5)
    assert resize_flow(u, (9, 11, 7)) is u


def test_upsample_flow_reproduces_the_authors_quirk():
    u = torch.ones(1, 3, 4, 4, 4)
    up = upsample_flow(u)
    assert up.shape == (1, 3, 8, 8, 8)
    assert torch.allclose(up, torch.full_like(up, 2.0))  # scaled by exactly 2, not (2N-1)/(N-1)


def test_warp_is_differentiable_and_broadcasts_batch():
    img = _ramp().repeat(2, 1, 1, 1, 1)
    u = torch.zeros(1, 3, *SHAPE, requires_grad=True)
    out = warp(img, u)
    assert out.shape == (2, 1, *SHAPE)
    out.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_warp_rejects_grid_mismatch():
    with pytest.raises(ValueError, match="grid"):
        warp(_ramp(), torch.zeros(1, 3, 4, 4, 4))


def test_upsample_pooled_flow_matches_pooled_geometry():
    from napari_unireg.core.sample import upsample_pooled_flow

    # A linear field on the full grid, pooled by 2, then brought back: exact away from the outer half voxel.
    shape = (16, 12, 10)
    g = identity_grid(shape)
    u = torch.stack([0.1 * g[0] + 1.0, -0.05 * g[1], 0.02 * g[2] + 0.5])[None]
    pooled = torch.nn.functional.avg_pool3d(u, 2) / 2  # half-grid voxel units
    back = upsample_pooled_flow(pooled, 2)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert back.shape == u.shape
    assert torch.allclose(back[inner], u[inner], atol=1e-5)
