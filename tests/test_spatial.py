"""The conventions of core/sample.py, core/resample.py and core/grid.py: axis order, voxel units, pull direction,
composition order; every fast function against a plain reference (scipy, nibabel) on random fields and affines."""

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


# ---- the fast functions against plain references on random fields -------------------------------------------
def _random_field(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *shape, generator=g, dtype=torch.float64).float() * scale


def test_warp_equals_map_coordinates_with_border_clamping():
    from scipy.ndimage import map_coordinates

    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 2, *SHAPE, generator=g)
    disp = _random_field(SHAPE, 3.0, 4)  # reaches well past the borders
    coords = np.indices(SHAPE, dtype=np.float64) + disp[0].double().numpy()
    ref = np.stack([map_coordinates(img[0, c].double().numpy(), coords, order=1, mode="nearest") for c in range(2)])
    np.testing.assert_allclose(warp(img, disp)[0].numpy(), ref, rtol=0, atol=1e-4)


def test_warp_labels_equals_map_coordinates_nearest_inside():
    from scipy.ndimage import map_coordinates

    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 9, (1, 1, *SHAPE), generator=g, dtype=torch.int32)
    disp = _random_field(SHAPE, 2.0, 6)
    coords = np.indices(SHAPE, dtype=np.float64) + disp[0].double().numpy()
    ref = map_coordinates(labels[0, 0].numpy(), coords, order=0, mode="constant", cval=0)
    out = warp_labels(labels, disp)[0, 0].numpy()
    inside = np.all([(coords[a] >= 0) & (coords[a] <= n - 1) for a, n in enumerate(SHAPE)], axis=0)
    np.testing.assert_array_equal(out[inside], ref[inside])
    far = np.any([(coords[a] < -0.6) | (coords[a] > n - 0.4) for a, n in enumerate(SHAPE)], axis=0)
    assert far.any() and np.all(out[far] == 0)  # zero outside


def test_compose_equals_reference_composition():
    from scipy.ndimage import map_coordinates

    a, b = _random_field(SHAPE, 1.5, 7), _random_field(SHAPE, 1.5, 8)
    pts = np.indices(SHAPE, dtype=np.float64) + b[0].double().numpy()
    ref = b[0].double().numpy() + np.stack(
        [map_coordinates(a[0, c].double().numpy(), pts, order=1, mode="nearest") for c in range(3)]
    )
    np.testing.assert_allclose(compose(a, b)[0].numpy(), ref, rtol=0, atol=1e-4)


def test_warp_under_autocast_samples_in_float32():
    img = torch.randn(1, 1, *SHAPE)
    disp = _random_field(SHAPE, 2.0, 9)
    ref = warp(img, disp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(img.bfloat16(), disp.bfloat16())
    assert out.dtype == torch.float32
    # only the bfloat16 rounding of the inputs remains, not a bfloat16 sampling grid
    assert float((out - warp(img.bfloat16().float(), disp.bfloat16().float())).abs().max()) < 1e-5
    assert float((out - ref).abs().max()) < 0.2


def test_resample_affine_equals_scipy_affine_transform():
    from scipy.ndimage import affine_transform

    from napari_unireg.core.resample import resample_affine

    rng = np.random.default_rng(0)
    img = rng.normal(size=SHAPE).astype(np.float32)
    labels = rng.integers(0, 7, SHAPE).astype(np.uint8)
    diagonal = np.diag([0.8, 1.3, 0.9, 1.0])
    diagonal[:3, 3] = [0.7, -1.2, 0.4]
    oblique = diagonal.copy()
    oblique[:3, :3] += rng.normal(scale=0.1, size=(3, 3))
    # threads: the oblique path is cut into slabs along axis 0 (one per thread), which must join seamlessly
    for m, threads in ((diagonal, 2), (oblique, 1), (oblique, 2), (oblique, 3)):
        out_shape = (11, 9, 13)
        ref = affine_transform(img.astype(np.float64), m, output_shape=out_shape, order=1, mode="constant", cval=0)
        np.testing.assert_allclose(resample_affine(img, m, out_shape, order=1, threads=threads), ref, rtol=0,
                                   atol=1e-4)
        lab = resample_affine(labels, m, out_shape, order=0, threads=threads)
        assert lab.dtype == np.uint8
        ref = affine_transform(labels, m, output_shape=out_shape, order=0, mode="constant", cval=0)
        assert np.mean(lab == ref) > 0.99  # ties at exactly .5 may round either way


def test_grid_voxel_maps_equal_nibabel_composition():
    from nibabel.affines import apply_affine, from_matvec

    from napari_unireg.core.grid import Grid, apply_affine_field, voxel_map

    rng = np.random.default_rng(1)
    a = from_matvec(rng.normal(size=(3, 3)) + 2 * np.eye(3), rng.normal(size=3) * 10)
    b = from_matvec(np.diag([0.7, 1.2, 2.0]), [-30.0, 5.0, 12.0])
    world = from_matvec(np.eye(3) + rng.normal(scale=0.05, size=(3, 3)), rng.normal(size=3))
    pts = rng.normal(size=(20, 3)) * 20
    expected = apply_affine(np.linalg.inv(b), apply_affine(world, apply_affine(a, pts)))
    np.testing.assert_allclose(apply_affine(voxel_map(a, b, world), pts), expected, atol=1e-9)
    field = pts.T.reshape(3, 4, 5, 1)
    np.testing.assert_allclose(apply_affine_field(Grid((4, 5, 1), a).voxel_map(Grid((2, 2, 2), b), world), field),
                               expected.T.reshape(3, 4, 5, 1), atol=1e-9)
    grid = Grid((10, 20, 30), a)
    half = grid.with_spacing(grid.spacing * 2)
    assert half.shape == (5, 10, 15)
    np.testing.assert_allclose(half.world([[1, 1, 1]]), grid.world([[2, 2, 2]]), atol=1e-9)  # voxel 0 kept
    np.testing.assert_allclose(grid.window((2, -1, 3), (4, 4, 4)).world([[0, 0, 0]]), grid.world([[2, -1, 3]]))


def test_sample_points_nearest_equals_map_coordinates_with_ties_and_borders():
    from scipy.ndimage import map_coordinates

    from napari_unireg.core.resample import sample_points

    rng = np.random.default_rng(2)
    lab = rng.integers(0, 40, (9, 11, 7)).astype(np.int16)
    coords = np.indices(lab.shape).astype(np.float64) + rng.normal(scale=3, size=(3, *lab.shape))
    coords[:, ::2] = np.round(coords[:, ::2] * 2) / 2  # exact .5 ties
    coords[0, 0, 0, :5] = [-1e-12, 0.0, 8.0, 8.0 + 1e-12, -0.0]  # on and just past the borders
    for fill in (0, 7):
        out = sample_points(lab, coords, order=0, outside="fill", fill=fill)
        ref = map_coordinates(lab, coords, order=0, mode="constant", cval=fill)
        assert out.dtype == lab.dtype
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_cpu_warp_equals_one_grid_sample_call_in_values_and_gradients(threads):
    """A single volume is cut into ``threads`` runs of points (PyTorch samples one batch item per thread): the
    values match scipy and the gradients (image and field, two channels) match one plain grid_sample call."""
    import torch.nn.functional as F
    from scipy.ndimage import map_coordinates

    from napari_unireg.core.sample import _cpu_chunks, sampling_grid

    shape = (30, 36, 33)  # 35,640 points: divisible by 2 and 3, above the size where cutting starts
    g = torch.Generator().manual_seed(11)
    img = torch.randn(1, 2, *shape, generator=g).requires_grad_(True)
    disp = _random_field(shape, 3.0, 12).requires_grad_(True)
    weights = torch.randn(1, 2, *shape, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _cpu_chunks(img, sampling_grid(disp.detach())) == threads
        out = warp(img, disp)
        img_grad, disp_grad = torch.autograd.grad((out * weights).sum(), (img, disp))
    finally:
        torch.set_num_threads(before)
    coords = np.indices(shape, dtype=np.float64) + disp[0].detach().double().numpy()
    ref = np.stack([map_coordinates(img[0, c].detach().double().numpy(), coords, order=1, mode="nearest")
                    for c in range(2)])
    np.testing.assert_allclose(out[0].detach().numpy(), ref, rtol=0, atol=1e-4)
    plain = F.grid_sample(img, sampling_grid(disp), padding_mode="border", align_corners=True)
    ref_img_grad, ref_disp_grad = torch.autograd.grad((plain * weights).sum(), (img, disp))
    torch.testing.assert_close(img_grad, ref_img_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disp_grad, ref_disp_grad, rtol=1e-5, atol=1e-5)
