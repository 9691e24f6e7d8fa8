"""prealign.py: affine pre-alignment recovers known transforms and matches the reference affines on real brains."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from napari_unireg.errors import UserError
from napari_unireg.io import load_volume, volume_from_array
from napari_unireg.core.prealign import AffineResult, affine_prealign, mask_overlap
from napari_unireg.core.resample import resample_affine
from napari_unireg.pipeline.model_grid import resample_to_spacing


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(a)
    r[i, j], r[j, i] = -np.sin(a), np.sin(a)
    return r


def _phantom(shape=(44, 52, 44), spacing=2.0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like asymmetric phantom (ellipsoid, 'ventricles', texture) at ``spacing`` mm, centred at 0."""
    from scipy.ndimage import gaussian_filter

    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    x = idx @ affine[:3, :3].T + affine[:3, 3]
    head = (((x - [0, 0, 0]) / [34, 42, 32]) ** 2).sum(-1) <= 1
    vent = (((x - [-6, 6, 6]) / [5, 14, 6]) ** 2).sum(-1) <= 1
    vent2 = (((x - [8, 2, 8]) / [4, 10, 5]) ** 2).sum(-1) <= 1
    deep = (((x - [0, -20, -14]) / [14, 10, 10]) ** 2).sum(-1) <= 1
    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.random(shape), 2.0)
    img = np.where(head, 0.6 + 2 * (texture - texture.mean()), 0)
    img = np.where(vent | vent2, 0.15, img)
    img = np.where(deep & head, 0.9, img)
    return gaussian_filter(img, 0.7).astype(np.float32) * head, affine


def _mean_distance(m1, m2, points):
    return float(np.linalg.norm(points @ (m1[:3, :3] - m2[:3, :3]).T + (m1[:3, 3] - m2[:3, 3]), axis=1).mean())


def _brain_points(data, affine, step=5):
    idx = np.argwhere(data > 0)[::step].astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_recovers_known_affine():
    fixed, fa = _phantom()
    true = _rotation(0, 8) @ _rotation(2, -5) @ np.diag([1.05, 0.97, 1.0, 1.0])
    true[:3, 3] = [6.0, -4.0, 3.0]
    # The moving image lives on another grid (2.4 mm, shifted); moving(y) = fixed(true⁻¹·y).
    ma = np.diag([2.4, 2.4, 2.4, 1.0])
    ma[:3, 3] = [-50, -60, -45]
    mshape = (42, 50, 40)
    moving = resample_affine(fixed, np.linalg.inv(fa) @ np.linalg.inv(true) @ ma, mshape, order=1)
    res = affine_prealign(fixed, moving, fa, ma)
    assert isinstance(res, AffineResult)
    err = _mean_distance(res.matrix, true, _brain_points(fixed, fa))
    assert err < 1.0, f"mean error {err:.2f} mm"
    assert res.ncc > 0.9 and res.overlap > 0.9
    # Resampling the moving image through the result brings it back onto the fixed one.
    warped = res.resample(moving)
    assert warped.shape == fixed.shape
    inside = fixed > 0.05
    assert np.corrcoef(warped[inside], fixed[inside])[0, 1] > 0.9
    np.testing.assert_allclose(res.voxel_matrix(), np.linalg.inv(ma) @ res.matrix @ fa)


def test_identity_and_labels():
    fixed, fa = _phantom((24, 28, 24), 4.0)
    res = affine_prealign(fixed, fixed, fa, fa, levels=(8.0, 4.0), iterations=(40, 20))
    assert _mean_distance(res.matrix, np.eye(4), _brain_points(fixed, fa)) < 0.5
    labels = (fixed > 0.5).astype(np.uint8) * 3
    exact = AffineResult(np.eye(4), fixed.shape, fa, fixed.shape, fa)
    out = exact.resample_labels(labels)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_no_overlap_is_a_user_error():
    fixed, fa = _phantom((24, 28, 24), 4.0)
    far = fa.copy()
    far[:3, 3] += [500.0, 0, 0]  # the scanners' coordinates put the brains half a metre apart
    with pytest.raises(UserError, match="no overlap"):
        affine_prealign(fixed, fixed, fa, far, init="none", levels=(8.0,), iterations=(20,))
    with pytest.raises(UserError, match="moving image"):
        affine_prealign(fixed, np.zeros_like(fixed), fa, fa)


def test_mask_overlap():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[:5] = True
    b[3:6] = True
    assert mask_overlap(a, b) == pytest.approx(2 / 3)
    assert mask_overlap(a, np.zeros_like(a)) == 0.0


# --------------------------------------------------------------------------------------------- real brains


def _reference(shared_data, fixed_id, moving_id) -> np.ndarray:
    """Fixed native world → moving native world through the template: M_moving · M_fixed⁻¹."""

    def t2n(i):
        with open(shared_data / "native" / f"UNIREG_{i}_affine.json") as f:
            return np.asarray(json.load(f)["template_to_native_ras"])

    return t2n(moving_id) @ np.linalg.inv(t2n(fixed_id))


@pytest.mark.data
@pytest.mark.slow
def test_native_pair_matches_reference(shared_data):
    fixed = load_volume(shared_data / "native" / "UNIREG_0003_brain.nii.gz")
    moving = load_volume(shared_data / "native" / "UNIREG_0001_brain.nii.gz")
    t0 = time.perf_counter()
    res = affine_prealign(fixed.data, moving.data, fixed.affine, moving.affine)
    seconds = time.perf_counter() - t0
    err = _mean_distance(res.matrix, _reference(shared_data, "0003", "0001"), _brain_points(fixed.data, fixed.affine))
    print(f"\nprealign 0001 -> 0003: mean distance to the reference composition {err:.2f} mm, "
          f"NCC {res.ncc:.3f}, overlap {res.overlap:.2f}, {seconds:.1f} s")
    assert err < 3.0


@pytest.mark.data
@pytest.mark.slow
def test_native_pair_other_orientation_and_voxel_size(shared_data):
    """The fixed brain stored LPS with 1.2×1.5×0.9 mm voxels: same world answer."""
    fixed = load_volume(shared_data / "native" / "UNIREG_0003_brain.nii.gz")
    moving = load_volume(shared_data / "native" / "UNIREG_0001_brain.nii.gz")
    aniso = resample_to_spacing(fixed, (1.2, 1.5, 0.9))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(aniso.shape[:2]) - 1
    lps = volume_from_array(aniso.data[::-1, ::-1].copy(), aniso.affine @ flip, kind="image")
    assert lps.orientation == "LPS"
    res = affine_prealign(lps.data, moving.data, lps.affine, moving.affine)
    err = _mean_distance(res.matrix, _reference(shared_data, "0003", "0001"), _brain_points(fixed.data, fixed.affine))
    print(f"\nprealign 0001 -> 0003 (LPS, 1.2×1.5×0.9 mm): mean distance {err:.2f} mm")
    assert err < 3.0
    labels = load_volume(shared_data / "native" / "UNIREG_0001_aseg.nii.gz")
    warped = res.resample_labels(labels.data)
    assert warped.shape == lps.shape and warped.dtype == labels.data.dtype
    assert set(np.unique(warped)) <= set(np.unique(labels.data))


def test_compose_with_displacement():
    fa = np.diag([2.0, 1.5, 1.0, 1.0])
    fa[:3, 3] = [-10, 4, 7]
    shape = (6, 7, 5)
    matrix = _rotation(2, 10)
    matrix[:3, 3] = [3.0, -1.0, 2.0]
    res = AffineResult(matrix, shape, fa, shape, np.eye(4))
    u = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    w = res.compose(u)
    p = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(np.float64)
    target = np.einsum("ij,j...->i...", matrix[:3, :3], np.einsum("ij,j...->i...", fa[:3, :3], p + u)
                       + fa[:3, 3, None, None, None]) + matrix[:3, 3, None, None, None]
    got = np.einsum("ij,j...->i...", fa[:3, :3], p + w) + fa[:3, 3, None, None, None]
    np.testing.assert_allclose(got, target, atol=1e-4)
    # Without a displacement: the affine alone; the identity gives zeros.
    expected = (np.linalg.inv(fa) @ matrix @ fa @ [1, 2, 3, 1])[:3] - [1, 2, 3]
    np.testing.assert_allclose(res.compose()[:, 1, 2, 3], expected, atol=1e-5)
    assert np.abs(AffineResult(np.eye(4), shape, fa, shape, fa).compose()).max() < 1e-6
