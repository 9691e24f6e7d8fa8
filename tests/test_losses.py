"""Training losses: NCC_vfa, diffusion, symmetric registration loss, soft Dice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import maximum_filter, minimum_filter, uniform_filter

from napari_unireg.core.losses import box_filter, diffusion, dice_loss, ncc_vfa, registration_loss
from napari_unireg.core.sample import warp

from conftest import smooth_blob_volume

EPS = float(np.finfo(np.float32).eps)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def test_box_filter_equals_dense_conv(rng):
    x = torch.from_numpy(rng.standard_normal((2, 3, 11, 10, 12))).double()
    dense = F.conv3d(x.reshape(6, 1, 11, 10, 12), torch.full((1, 1, 9, 9, 9), 1 / 729, dtype=torch.float64), padding=4)
    torch.testing.assert_close(box_filter(x, 9), dense.reshape(2, 3, 11, 10, 12), rtol=1e-12, atol=1e-12)


def test_ncc_matches_numpy_formula():
    a = smooth_blob_volume((20, 18, 16), seed=1)
    b = smooth_blob_volume((20, 18, 16), seed=2)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)

    def mean(x):  # 9³ box mean with zero padding, computed by scipy
        return uniform_filter(x, size=9, mode="constant", cval=0.0)

    mu_a, mu_b = mean(a64), mean(b64)
    var_a = mean(a64 * a64) - mu_a**2
    var_b = mean(b64 * b64) - mu_b**2
    cov = mean(a64 * b64) - mu_a * mu_b
    expected = 1 - np.mean(cov**2 / np.maximum(var_a * var_b, EPS))
    got = ncc_vfa(_t(a).double(), _t(b).double())
    assert got.item() == pytest.approx(expected, abs=1e-10)
    assert 0 < got.item() < 1


def test_ncc_self_equals_fraction_of_flat_voxels(rng):
    img = np.zeros((24, 22, 20), np.float32)
    img[6:14, 5:12, 4:16] = rng.uniform(1.0, 2.0, size=(8, 7, 12))  # high contrast: every non-flat window has
    img[16:20, 15:19, 2:5] = 1.5  # a local variance far above √ε; plus a constant patch (flat inside)
    # flat voxel = its zero-padded 9³ window holds a single value
    lo = minimum_filter(img, size=9, mode="constant", cval=0.0)
    hi = maximum_filter(img, size=9, mode="constant", cval=0.0)
    flat_fraction = float(np.mean(lo == hi))
    assert 0.05 < flat_fraction < 0.95
    assert ncc_vfa(_t(img), _t(img)).item() == pytest.approx(flat_fraction, abs=1e-5)


def test_ncc_lower_for_closer_image():
    vol = smooth_blob_volume((24, 24, 24), seed=3)
    fixed = _t(vol)
    near = _t(np.roll(vol, 1, axis=0))
    far = _t(np.roll(vol, 3, axis=0))
    l_same, l_near, l_far = (ncc_vfa(fixed, x).item() for x in (fixed, near, far))
    assert l_same < l_near < l_far


def test_diffusion_zero_and_linear_field():
    u = torch.zeros(1, 3, 6, 7, 8)
    assert diffusion(u).item() == 0.0
    a = 0.3
    u[:, 0] = a * torch.arange(6, dtype=torch.float32).view(6, 1, 1)  # forward difference a on channel 0, axis 0
    assert diffusion(u).item() == pytest.approx(a**2 / 3 / 3, rel=1e-6)
    assert diffusion(u + 5.0).item() == pytest.approx(diffusion(u).item(), rel=1e-6)  # translation is free


def test_registration_loss_prefers_the_correcting_displacement_and_backprops():
    vol = smooth_blob_volume((20, 20, 20), seed=4)
    fixed = _t(vol)
    moving = _t(np.roll(vol, -2, axis=1))  # moving(p) = fixed(p + 2 e1) -> u = -2 e1 aligns it
    zero = torch.zeros(1, 3, 20, 20, 20)
    good = zero.clone()
    good[:, 1] = -2.0
    assert registration_loss(fixed, moving, good).item() < registration_loss(fixed, moving, zero).item()
    # gradients flow to the displacement
    u = (0.1 * torch.randn(1, 3, 20, 20, 20)).requires_grad_(True)
    loss, sim, reg = registration_loss(fixed, moving, SimpleNamespace(disp=u, inverse=None), lam=0.5,
                                       return_terms=True)
    assert loss.item() == pytest.approx(sim.item() + 0.5 * reg.item(), rel=1e-6)
    loss.backward()
    assert u.grad is not None and torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


def test_symmetric_loss_for_inverse_consistent_models():
    fixed = _t(smooth_blob_volume((16, 16, 16), seed=5))
    moving = _t(smooth_blob_volume((16, 16, 16), seed=6))
    g = torch.Generator().manual_seed(0)  # not the global stream: the values must not depend on earlier tests
    u12 = (0.5 * torch.randn(1, 3, 16, 16, 16, generator=g)).requires_grad_(True)
    u21 = (0.5 * torch.randn(1, 3, 16, 16, 16, generator=g)).requires_grad_(True)
    out = SimpleNamespace(disp=u12, inverse=u21)
    loss = registration_loss(fixed, moving, out, lam=2.0)
    expected = 0.5 * (ncc_vfa(fixed, warp(moving, u12)) + ncc_vfa(moving, warp(fixed, u21))) + 0.5 * 2.0 * (
        diffusion(u12) + diffusion(u21)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(registration_loss(fixed, moving, u12, lam=2.0).item(), rel=1e-4)
    loss.backward()
    assert u12.grad.abs().sum() > 0 and u21.grad.abs().sum() > 0


def test_dice_loss():
    a = torch.zeros(1, 2, 4, 4, 4)
    a[:, 0, :2] = 1
    a[:, 1, 2:] = 1
    assert dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(a, a.flip(1)).item() == pytest.approx(1.0, abs=1e-6)


def test_fixed_ncc_reuses_its_moments_for_every_warped_image():
    """One FixedNCC, two moving images: each value equals the scipy formula; the gradient passes gradcheck."""
    from napari_unireg.core.losses import FixedNCC

    a = smooth_blob_volume((20, 18, 16), seed=3).astype(np.float64)

    def mean(x):
        return uniform_filter(x, size=9, mode="constant", cval=0.0)

    def expected(b):
        mu_a, mu_b = mean(a), mean(b)
        cov = mean(a * b) - mu_a * mu_b
        return 1 - np.mean(cov**2 / np.maximum((mean(a * a) - mu_a**2) * (mean(b * b) - mu_b**2), EPS))

    ncc = FixedNCC(_t(a).double())
    for seed in (4, 5):
        b = smooth_blob_volume((20, 18, 16), seed=seed).astype(np.float64)
        assert ncc(_t(b).double()).item() == pytest.approx(expected(b), abs=1e-10)
    small = _t(a[:10, :9, :8]).double()
    moving = _t(smooth_blob_volume((10, 9, 8), seed=6)).double().requires_grad_(True)
    assert torch.autograd.gradcheck(FixedNCC(small, window=3), (moving,))


def test_diffusion_gradient_equals_autograd_of_the_slice_formula(rng):
    u = torch.from_numpy(rng.standard_normal((2, 3, 7, 6, 5))).requires_grad_(True)

    def by_slices(x):  # the textbook form, differentiated by autograd
        d = [x.diff(dim=a) for a in (2, 3, 4)]
        return sum((di * di).mean() for di in d) / 3.0

    expected = by_slices(u)
    (g_expected,) = torch.autograd.grad(3.5 * expected, u)
    got = diffusion(u)
    (g_got,) = torch.autograd.grad(3.5 * got, u)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(diffusion, (u[:1, :, :4, :4, :3].detach().clone().requires_grad_(True),))


def _field_with_folds(shape, centres, seed):
    """A smooth field plus a local compression at each centre (J < 0 there, J ≈ 1 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    u = F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g, dtype=torch.float64) * 0.5, size=shape,
                      mode="trilinear", align_corners=True)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    for c in centres:
        r2 = sum((grid[i] - c[i]) ** 2 for i in range(3))
        u[0, 0] -= 2.0 * (grid[0] - c[0]) * torch.exp(-r2 / 8.0)  # compresses axis 0 by 3× at c: J < 0 there
    return u


def test_fold_penalty_equals_the_dense_expression_in_value_and_gradient():
    """Computed on boxes around the folded voxels only: same value as numpy's Jacobian, same gradient as autograd
    through the dense torch expression; two separate boxes, one touching the 2-voxel border."""
    from napari_unireg.core.losses import fold_penalty
    from napari_unireg.core.metrics import jacobian_determinant, jacobian_determinant_torch

    shape = (40, 22, 26)
    u = _field_with_folds(shape, [(8, 6, 7), (30, 15, 20), (3, 18, 3)], seed=1).requires_grad_(True)
    jac = jacobian_determinant(u.detach()[0].numpy())
    assert (jac < 0.05).sum() > 20  # the test field really folds
    expected_value = np.maximum(0.05 - jac, 0).mean()
    dense = F.relu(0.05 - jacobian_determinant_torch(u)).mean()
    (g_dense,) = torch.autograd.grad(7.0 * dense, u)
    got = fold_penalty(u, 0.05)
    (g_got,) = torch.autograd.grad(7.0 * got, u)
    assert got.item() == pytest.approx(expected_value, rel=1e-9)
    torch.testing.assert_close(g_got, g_dense, rtol=1e-10, atol=1e-12)
    assert g_got.abs().sum() > 0


def test_fold_penalty_of_a_regular_field_is_zero_with_zero_gradient():
    from napari_unireg.core.losses import fold_penalty

    u = (_field_with_folds((20, 18, 16), [], seed=2) * 0.1).requires_grad_(True)
    value = fold_penalty(u)
    assert value.item() == 0.0
    value.backward()  # still part of a graph that a loss can sum into
    assert u.grad is None or u.grad.abs().max() == 0
