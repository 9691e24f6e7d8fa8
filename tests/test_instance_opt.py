"""Instance optimisation: the folding penalty keeps a weakly regularised refinement nearly fold-free."""

import numpy as np
import torch

from napari_unireg.core.instance_opt import instance_optimise
from napari_unireg.core.metrics import folded_fraction


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    return torch.from_numpy(gaussian_filter(rng.random(shape), 2.0).astype(np.float32))[None, None]


def _folding_field(shape):
    """A displacement with a sharp local shear bump: det(I + ∇u) < 0 in its centre."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    r2 = ((grid - centre) ** 2).sum(0)
    u = np.zeros((3, *shape), np.float32)
    u[0] = -4.0 * (grid[0] - centre[0]) * np.exp(-r2 / 18.0) / 3.0  # du0/dx0 ≈ -1.3 at the centre: folds
    return torch.from_numpy(u)[None]


def test_fold_penalty_reduces_folding():
    shape = (32, 32, 32)
    fixed, moving = _blobs(shape, 0), _blobs(shape, 1)
    init = _folding_field(shape)
    before = folded_fraction(init[0].numpy())
    assert before > 0
    kw = dict(init_disp=init, steps=30, factors=(1,), lam=0.1)
    plain = folded_fraction(instance_optimise(fixed, moving, fold_weight=0.0, **kw)[0].numpy())
    penalised = folded_fraction(instance_optimise(fixed, moving, fold_weight=100.0, **kw)[0].numpy())
    assert plain > 0.05  # λ=0.1 alone folds a lot on random texture
    assert penalised < 0.1 * plain


def test_refinement_runs_half_then_full_resolution_levels(monkeypatch):
    """``--io-steps N`` = N steps on the half-resolution grid, then ⌈N/6⌉ smaller ones on the model grid; progress
    covers both."""
    import napari_unireg.core.instance_opt as io

    assert io.refinement_levels(30) == ((2, 30, None, 9), (1, 5, io.FULL_LR, 9)) and io.refinement_levels(0) == ()
    seen = []
    real = io.optimise_level

    def spy(fixed, moving, init, steps, lam, lr, *a, **k):
        seen.append((tuple(fixed.shape[2:]), steps, lr))
        return real(fixed, moving, init, steps, lam, lr, *a, **k)

    monkeypatch.setattr(io, "optimise_level", spy)
    shape = (32, 40, 36)
    fixed, moving = _blobs(shape, 0), _blobs(shape, 1)
    done = []
    out = io.instance_optimise(fixed, moving, init_disp=torch.zeros(1, 3, *shape), steps=6, progress=done.append)
    assert seen == [((16, 20, 18), 6, 0.2), ((32, 40, 36), 1, io.FULL_LR)]
    assert out.shape == (1, 3, *shape) and torch.isfinite(out).all()
    assert done == sorted(done) and done[-1] == 1.0
    seen.clear()
    io.instance_optimise(fixed, moving, steps=2)  # the classical method from zero: 1/4 then 1/2 (too coarse dropped)
    assert seen == [((16, 20, 18), 2, 0.2)]
