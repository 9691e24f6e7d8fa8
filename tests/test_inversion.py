"""Anderson fixed-point inversion of displacements with implicit backward (ARCHITECTURE.md §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_unireg.core.inversion import AndersonOptions, anderson_solve, invert_displacement, inversion_residual
from napari_unireg.core.sample import compose


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI box is shared: one intra-op thread is much faster for these tiny tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_field(shape, amplitude, seed=0, dtype=torch.float32, batch=1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, *[max(s // 6, 2) for s in shape], generator=g, dtype=torch.float64)
    u = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return (amplitude * u / u.abs().max()).to(dtype)


def test_anderson_scalar_fixed_point():
    x, it = anderson_solve(lambda t: (7 / t + t) / 2, torch.full((3, 4), 5.0, dtype=torch.float64),
                           AndersonOptions(tol=1e-12, max_iter=100))
    torch.testing.assert_close(x, torch.full_like(x, 7**0.5))
    assert 2 <= it < 100


def test_inverse_of_smooth_field():
    a = smooth_field((16, 20, 12), 2.0, batch=2)
    v = invert_displacement(a)
    assert v.shape == a.shape
    # φ_a ∘ φ_v ≈ id: the fixed-point residual is within the stop tolerance
    assert float(inversion_residual(a, v).max()) < 2e-2
    # the inverse also works on the other side (φ_v ∘ φ_a ≈ id) up to interpolation error
    assert float(compose(v, a)[..., 2:-2, 2:-2, 2:-2].abs().max()) < 0.1
    tight = invert_displacement(a, tol=1e-6, max_iter=200)
    assert float(inversion_residual(a, tight).max()) < 1e-4


def test_zero_and_translation():
    assert torch.equal(invert_displacement(torch.zeros(1, 3, 4, 4, 4)), torch.zeros(1, 3, 4, 4, 4))
    a = torch.zeros(1, 3, 8, 8, 8)
    a[:, 1] = 0.5
    v = invert_displacement(a)
    torch.testing.assert_close(v[:, 1], torch.full_like(v[:, 1], -0.5))


def test_gradcheck_implicit_backward():
    a = smooth_field((4, 5, 3), 0.4, seed=3, dtype=torch.float64).requires_grad_(True)

    def fn(x):
        return invert_displacement(x, tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=300)

    assert torch.autograd.gradcheck(fn, (a,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_backward_default_tolerance_close_to_unrolled():
    a0 = smooth_field((8, 8, 8), 1.0, seed=5, dtype=torch.float64)
    w = torch.randn(a0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = a0.clone().requires_grad_(True)
    (invert_displacement(a) * w).sum().backward()
    # reference: differentiate through many plain fixed-point iterations
    b = a0.clone().requires_grad_(True)
    v = -b
    for _ in range(60):
        v = -compose(b, v) + v  # v ← −b(p + v)
    (v * w).sum().backward()
    rel = (a.grad - b.grad).norm() / b.grad.norm()
    assert float(rel) < 5e-2
