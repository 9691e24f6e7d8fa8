"""Evaluation metrics: cross-checks against the DEV baselines and against independent brute-force computations."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from napari_unireg.core import metrics as M
from napari_unireg.errors import UserError


# --------------------------------------------------------------------------------------------------------------
# helpers written independently of the implementation
# --------------------------------------------------------------------------------------------------------------
def _identity(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _random_labels(rng, shape=(14, 12, 10), n=5):
    from scipy.ndimage import zoom

    coarse = rng.integers(0, n + 1, size=tuple(max(s // 3, 2) for s in shape))
    return zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=0).astype(np.int32)


def _surface_points_bruteforce(mask):
    """Voxels of ``mask`` with a 6-neighbour outside the mask or outside the array."""
    pts = []
    for p in zip(*np.nonzero(mask)):
        for ax, step in itertools.product(range(3), (-1, 1)):
            q = list(p)
            q[ax] += step
            if q[ax] < 0 or q[ax] >= mask.shape[ax] or not mask[tuple(q)]:
                pts.append(p)
                break
    return np.array(pts, dtype=np.float64)


def _hd95_bruteforce(a, b, spacing):
    sa = _surface_points_bruteforce(a) * np.asarray(spacing)
    sb = _surface_points_bruteforce(b) * np.asarray(spacing)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _ndv_tetrahedra(u):
    """Mean negative volume of the two 5-tetrahedra decompositions of every grid cube, % of (N−2)³ voxels."""
    shape = u.shape[1:]
    t = _identity(shape) + u
    corners = list(itertools.product((0, 1), repeat=3))
    even = [c for c in corners if sum(c) % 2 == 0]
    odd = [c for c in corners if sum(c) % 2 == 1]

    def vert(c):
        return t[:, c[0] : shape[0] - 1 + c[0], c[1] : shape[1] - 1 + c[1], c[2] : shape[2] - 1 + c[2]]

    def neighbours(c):
        return [tuple(c[i] ^ (i == k) for i in range(3)) for k in range(3)]

    tets = []
    for own, other in ((even, odd), (odd, even)):
        tets += [[c, *neighbours(c)] for c in own]  # 4 corner tetrahedra of one decomposition
        tets.append(other)  # and its central tetrahedron

    total = 0.0
    for tet in tets:
        v0, v1, v2, v3 = (np.moveaxis(vert(c), 0, -1) for c in tet)
        vol = np.einsum("...i,...i->...", np.cross(v1 - v0, v2 - v0), v3 - v0) / 6.0
        ref = np.dot(np.cross(np.subtract(tet[1], tet[0]), np.subtract(tet[2], tet[0])), np.subtract(tet[3], tet[0]))
        vol = vol * np.sign(ref)  # orientation of the reference tetrahedron is positive
        total += np.maximum(-vol, 0.0).sum()
    n_vox = np.prod([s - 2 for s in shape])
    return total / 2.0 / n_vox * 100.0


def _smooth_field(rng, shape, amp, sigma=1.5, border=3):
    from scipy.ndimage import gaussian_filter

    u = np.stack([gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
    u *= amp / np.abs(u).max()
    u[:, :border] = 0
    u[:, -border:] = 0
    u[:, :, :border] = 0
    u[:, :, -border:] = 0
    u[:, :, :, :border] = 0
    u[:, :, :, -border:] = 0
    return u


# --------------------------------------------------------------------------------------------------------------
# DEV baselines (zero displacement = 'affine' row of baselines_val.json)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_displacement_matches_dev_baselines(shared_data):
    import nibabel as nib

    base = json.loads((shared_data / "baselines_val.json").read_text())["affine"]["per_pair"]
    pairs = list(csv.DictReader((shared_data / "pairs_val.csv").open()))
    # 0001–0002: all 35 labels defined; 0003–0007: label 18 absent from 0007 (Dice 0, HD95 undefined)
    chosen = [p for p in pairs if (p["fixed"], p["moving"]) in {("0001", "0002"), ("0003", "0007")}]
    assert len(chosen) == 2

    def load(kind, sid):
        return np.asarray(nib.load(shared_data / kind / f"UNIREG_{sid}_0000.nii.gz").dataobj)

    for p in chosen:
        ref = base[f"{p['fixed']}_{p['moving']}"]
        fl, ml, img = load("labelsTr", p["fixed"]), load("labelsTr", p["moving"]), load("imagesTr", p["fixed"])
        zero = np.zeros((3, *fl.shape), dtype=np.float32)
        res = M.evaluate_registration(zero, fl, ml, fixed_image=img, labels=range(1, 36))
        ref_dice = {int(k): v for k, v in ref["dice_per_label"].items()}
        ref_hd = {int(k): v for k, v in ref["hd95_per_label"].items() if v is not None}
        assert set(res["dice_per_label"]) == set(ref_dice)
        assert set(res["hd95_per_label"]) == set(ref_hd)
        for k, v in ref_dice.items():
            assert res["dice_per_label"][k] == pytest.approx(v, abs=1e-4), (p, k)
        for k, v in ref_hd.items():
            assert res["hd95_per_label"][k] == pytest.approx(v, abs=1e-3), (p, k)
        assert res["dice"] == pytest.approx(ref["dice"], abs=1e-9)
        assert res["dice_before"] == pytest.approx(ref["dice"], abs=1e-9)
        assert res["hd95"] == pytest.approx(ref["hd95"], abs=1e-9)
        assert res["hd95_undefined_labels"] == ref["hd95_undefined_labels"]
        assert res["sdlogj"] == pytest.approx(ref["sdlogj"], abs=1e-12)
        assert res["ndv"] == 0.0 and res["folded_pct"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# label warping, Dice, HD95
# --------------------------------------------------------------------------------------------------------------
def test_warp_labels_nearest_integer_shift_and_zero_fill(rng):
    lab = _random_labels(rng)
    u = np.zeros((3, *lab.shape))
    u[1] = 2.0  # warped(p) = lab(p + 2 e1)
    out = M.warp_labels_nearest(lab, u)
    expected = np.zeros_like(lab)
    expected[:, :-2] = lab[:, 2:]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == lab.dtype
    # torch inputs with a batch axis and a channel-last displacement give the same answer
    out_t = M.warp_labels_nearest(torch.from_numpy(lab), torch.from_numpy(u)[None])
    np.testing.assert_array_equal(out_t, expected)
    np.testing.assert_array_equal(M.warp_labels_nearest(lab, np.moveaxis(u, 0, -1)), expected)


def test_dice_matches_set_computation(rng):
    a, b = _random_labels(rng), _random_labels(rng)
    d = M.dice_per_label(a, b)
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    assert sorted(d) == labels
    for lab in labels:
        sa = {tuple(p) for p in np.argwhere(a == lab)}
        sb = {tuple(p) for p in np.argwhere(b == lab)}
        assert d[lab] == pytest.approx(2 * len(sa & sb) / (len(sa) + len(sb)), abs=1e-12)
    assert M.dice_mean(a, b) == pytest.approx(np.mean(list(d.values())))


def test_dice_skip_and_one_sided_rules():
    f = np.zeros((6, 6, 6), np.uint8)
    w = np.zeros_like(f)
    f[1:3, 1:3, 1:3] = 1
    w[1:3, 1:3, 1:3] = 1
    f[4, 4, 4] = 2  # only in the fixed map -> 0
    d = M.dice_per_label(f, w, labels=[1, 2, 3])  # 3 absent from both -> skipped
    assert d == {1: 1.0, 2: 0.0}
    # a label of the moving map that the warp pushed out of the grid still counts (0) when `moving` is given
    m = np.zeros_like(f)
    m[0, 0, 0] = 4
    assert M.dice_per_label(f, w, labels=[1, 4], moving=m) == {1: 1.0, 4: 0.0}
    assert M.dice_per_label(f, w, labels=[1, 4]) == {1: 1.0}


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.0, 0.5)])
def test_hd95_matches_bruteforce(rng, spacing):
    a, b = _random_labels(rng, (16, 14, 12), n=4), _random_labels(rng, (16, 14, 12), n=4)
    a[:, :, 0] = 1  # label 1 touches the array border: border voxels must count as surface
    h = M.hd95_per_label(a, b, spacing=spacing)
    labels = sorted((set(np.unique(a)) & set(np.unique(b))) - {0})
    assert sorted(h) == labels
    for lab in labels:
        assert h[lab] == pytest.approx(_hd95_bruteforce(a == lab, b == lab, spacing), abs=1e-9), lab


def test_hd95_known_shift_and_undefined_label():
    f = np.zeros((20, 20, 20), np.uint8)
    f[5:12, 5:12, 5:12] = 1
    f[15, 15, 15] = 2  # absent from the warped map -> undefined, skipped
    w = np.zeros_like(f)
    w[8:15, 5:12, 5:12] = 1  # the cube moved by 3 voxels along axis 0
    h = M.hd95_per_label(f, w)
    assert list(h) == [1]
    assert h[1] == pytest.approx(3.0)
    assert M.hd95_per_label(f, w, spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(6.0)
    assert M.hd95_per_label(f, f)[1] == 0.0


# --------------------------------------------------------------------------------------------------------------
# Jacobian, SDlogJ, folding
# --------------------------------------------------------------------------------------------------------------
def test_jacobian_of_affine_field_is_det_a():
    shape = (9, 10, 8)
    a = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]])
    x = _identity(shape)
    u = np.einsum("ij,j...->i...", a - np.eye(3), x) + np.array([0.3, -1.0, 2.0])[:, None, None, None]
    jac = M.jacobian_determinant(u)
    assert jac.shape == shape
    np.testing.assert_allclose(jac[2:-2, 2:-2, 2:-2], np.linalg.det(a), rtol=1e-12)
    # the 2-voxel border is neutral
    border = np.ones(shape, bool)
    border[2:-2, 2:-2, 2:-2] = False
    assert np.all(jac[border] == 1.0)
    assert M.sdlogj(u) == pytest.approx(0.0, abs=1e-12)
    assert M.folded_fraction(u) == 0.0


def test_folded_fraction_and_sdlogj_of_reflection():
    shape = (8, 8, 8)
    u = np.zeros((3, *shape))
    u[0] = -2.0 * _identity(shape)[0]  # x -> -x: J = -1 everywhere
    assert M.folded_fraction(u) == 1.0
    assert M.folded_percent(u) == 100.0
    # log(clip(J + 3)) is constant, hence SDlogJ 0; a half-folded field has a positive SDlogJ
    assert M.sdlogj(u) == pytest.approx(0.0, abs=1e-12)
    u[:, :4] = 0
    assert 0 < M.folded_fraction(u) < 1
    assert M.sdlogj(u) > 0.1


def test_jacobian_torch_equals_numpy(rng):
    u = rng.standard_normal((2, 3, 7, 9, 8))
    jt = M.jacobian_determinant_torch(torch.from_numpy(u))
    for b in range(2):
        np.testing.assert_allclose(jt[b].numpy(), M.jacobian_determinant(u[b]), rtol=1e-12, atol=1e-12)
        # the rows shared among threads give the same values (slabs join without seams)
        np.testing.assert_allclose(jt[b].numpy(), M.jacobian_determinant(u[b], threads=2), rtol=1e-12, atol=1e-12)
    # differentiable
    ut = torch.from_numpy(u[:1]).requires_grad_(True)
    M.jacobian_determinant_torch(ut).sum().backward()
    assert ut.grad is not None and torch.isfinite(ut.grad).all() and ut.grad.abs().sum() > 0


def test_sdlogj_definition_on_random_field(rng):
    u = rng.standard_normal((3, 8, 9, 10)) * 0.2
    # independent Jacobian from numpy.gradient (central differences in the interior)
    grads = np.stack([np.stack(np.gradient(u[c]), 0) for c in range(3)])  # [c, axis, ...]
    jm = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
    det = np.linalg.det(jm)[2:-2, 2:-2, 2:-2]
    assert M.sdlogj(u) == pytest.approx(np.log(np.clip(det + 3, 1e-9, 1e9)).std(), rel=1e-10)


# --------------------------------------------------------------------------------------------------------------
# NDV
# --------------------------------------------------------------------------------------------------------------
def test_ndv_identity_and_affine_are_zero():
    shape = (7, 8, 9)
    dets = M.digital_jacobian_determinants(np.zeros((3, *shape)))
    assert len(dets) == 10
    for name, j in dets.items():
        assert j.shape == (5, 6, 7)
        np.testing.assert_allclose(j, 2.0 if name.startswith("*") else 1.0)
    assert M.ndv(np.zeros((3, *shape))) == 0.0
    a = np.array([[0.8, 0.1, 0.0], [0.0, 1.3, 0.2], [0.1, 0.0, 0.9]])
    u = np.einsum("ij,j...->i...", a - np.eye(3), _identity(shape))
    assert M.ndv(u) == 0.0


def test_ndv_single_voxel_fold_matches_tetrahedra():
    u = np.zeros((3, 10, 10, 10))
    u[0, 5, 5, 5] = 1.6  # pushes one voxel past its neighbour along axis 0
    got = M.ndv(u)
    assert got > 0
    assert got == pytest.approx(_ndv_tetrahedra(u), rel=1e-10)


def test_ndv_random_folding_field_matches_tetrahedra(rng):
    u = _smooth_field(rng, (14, 13, 12), amp=5.0)
    assert M.folded_fraction(u) > 0  # the field does fold
    got = M.ndv(u)
    assert got > 0
    assert got == pytest.approx(_ndv_tetrahedra(u), rel=1e-10)
    # the same through the 10 determinants returned separately
    total = sum(np.maximum(-j, 0).sum() for j in M.digital_jacobian_determinants(u).values())
    assert got == pytest.approx(total / 12 / u[0, 1:-1, 1:-1, 1:-1].size * 100, rel=1e-12)


def test_ndv_mask_is_fixed_image_positive():
    u = np.zeros((3, 10, 10, 10))
    u[0, 5, 5, 5] = 1.6
    img = np.zeros((10, 10, 10), np.float32)
    img[:, :, :2] = 0.7  # the fold is outside the brain
    assert M.ndv(u, img) == 0.0
    img[3:8, 3:8, 3:8] = 0.5  # 125 voxels of brain around the fold
    n_fold = M.ndv(u) * 8**3  # NDV × mask size does not depend on the mask when it covers the fold
    assert M.ndv(u, img) == pytest.approx(n_fold / np.count_nonzero(img[1:-1, 1:-1, 1:-1] > 0))


# --------------------------------------------------------------------------------------------------------------
# TRE, inverse consistency
# --------------------------------------------------------------------------------------------------------------
def test_tre_known_offset():
    f = np.zeros((12, 12, 12), np.uint8)
    w = np.zeros_like(f)
    f[2:4, 2:4, 2:4] = 1
    f[7, 7, 7] = 2
    w[3:5, 2:4, 4:6] = 1  # centroid moved by (1, 0, 2)
    w[7, 7, 8] = 2  # moved by (0, 0, 1)
    w[1, 1, 1] = 3  # not in the fixed map: ignored
    assert M.tre(f, w) == pytest.approx((np.sqrt(5) + 1) / 2)
    assert M.tre(f, w, spacing=(1, 1, 2)) == pytest.approx((np.sqrt(17) + 2) / 2)
    assert np.isnan(M.tre(f, np.zeros_like(f)))


def test_inverse_consistency_error():
    shape = (12, 11, 10)
    x = _identity(shape)
    t = np.array([0.7, -0.3, 1.2])[:, None, None, None]
    zero = np.zeros((3, *shape))
    r = M.inverse_consistency_error(zero + t, zero - t)
    assert r["mean"] == pytest.approx(0, abs=1e-12) and r["p99"] == pytest.approx(0, abs=1e-12)
    # linear scaling about the centre and its exact inverse (linear interpolation is exact for linear fields)
    c = (np.array(shape)[:, None, None, None] - 1) / 2
    u12 = 0.1 * (x - c)
    u21 = (1 / 1.1 - 1) * (x - c)
    r = M.inverse_consistency_error(u12, u21)
    assert r["mean"] < 1e-10
    # a constant 0.25-voxel inconsistency is measured as such
    r = M.inverse_consistency_error(zero + t, zero - t + np.array([0.0, 0.25, 0.0])[:, None, None, None])
    assert r["mean"] == pytest.approx(0.25) and r["p99"] == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------------------------
# evaluate_registration
# --------------------------------------------------------------------------------------------------------------
def test_evaluate_registration_keys_and_recovery(rng):
    fixed = _random_labels(rng, (16, 14, 12), n=4)
    moving = np.zeros_like(fixed)
    moving[:, 2:] = fixed[:, :-2]  # moving(p) = fixed(p - 2 e1): u = +2 e1 recovers the fixed map inside
    u = np.zeros((3, *fixed.shape), np.float32)
    u[1] = 2.0
    img = (fixed > 0).astype(np.float32)
    res = M.evaluate_registration(torch.from_numpy(u), fixed, moving, fixed_image=img)
    for key in ("dice", "dice_per_label", "dice_before", "dice_before_per_label", "hd95", "hd95_per_label",
                "hd95_undefined_labels", "sdlogj", "ndv", "folded_pct"):
        assert key in res
    assert res["dice"] > res["dice_before"]
    assert res["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    assert res["ndv"] == 0.0 and res["folded_pct"] == 0.0
    json.dumps(res)  # the CLI writes it as metrics.json
    only_jac = M.evaluate_registration(u)
    assert set(only_jac) == {"sdlogj", "ndv", "folded_pct"}


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError):
        M.jacobian_determinant(np.zeros((2, 5, 5, 5)))
    with pytest.raises(UserError):
        M.dice_per_label(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int))
    with pytest.raises(UserError):
        M.evaluate_registration(np.zeros((3, 6, 6, 6)), fixed_labels=np.zeros((6, 6, 6), int))
    with pytest.raises(UserError):
        M.evaluate_registration(np.zeros((3, 6, 6, 6)), np.zeros((6, 6, 5), int), np.zeros((6, 6, 5), int))


def test_ndv_over_several_slabs_and_sub_slabs_matches_tetrahedra(rng):
    # 37 rows: three slabs of the streamed sum, the last one partial, each computed in 2-row sub-slabs
    u = _smooth_field(rng, (37, 12, 11), amp=8.0, sigma=1.0)
    assert M.ndv(u) > 0  # the field does fold
    assert M.ndv(u) == pytest.approx(_ndv_tetrahedra(u), rel=1e-10)


def test_jacobian_in_float32_is_the_rounded_float64_one(rng):
    u = _smooth_field(rng, (23, 9, 8), amp=3.0).astype(np.float32)
    j64 = M.jacobian_determinant(u)
    j32 = M.jacobian_determinant(u, dtype=np.float32)
    assert j32.dtype == np.float32 and np.array_equal(j32, j64.astype(np.float32))
    # and the float64 one is computed from the float32 field exactly as from its float64 copy
    assert np.array_equal(j64, M.jacobian_determinant(u.astype(np.float64)))


def test_surface_and_dilation_match_scipy_morphology():
    """HD95's slice-written surface (mask minus its 6-connected erosion, border voxels on the surface) and 6-cross
    dilation are scipy's binary_erosion / binary_dilation, masks touching the array border included."""
    from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure

    cross = generate_binary_structure(3, 1)
    rng = np.random.default_rng(7)
    for _ in range(5):
        mask = _random_labels(rng, shape=(9, 11, 8), n=2) == 1
        mask[0, :3, :3] = True  # on the border
        assert np.array_equal(M._surface(mask), mask & ~binary_erosion(mask, cross, border_value=0))
        assert np.array_equal(M._dilate6(mask), binary_dilation(mask, cross))


def test_warp_labels_nearest_is_map_coordinates_with_ties_and_outside():
    """Nearest-neighbour label warp = scipy map_coordinates(order=0, mode='constant'), including exact .5 ties,
    positions just outside the grid and a grid thicker than one slab."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(3)
    lab = _random_labels(rng, shape=(13, 9, 7), n=6).astype(np.int16)
    for u in (rng.normal(0, 2, (3, 13, 9, 7)), np.round(rng.normal(0, 2, (3, 13, 9, 7)) * 2) / 2):
        u[:, :, 0] = -0.5  # ties at the lower edge: floor(-0.5 + 0.5) = 0, but x < 0 is outside
        u = u.astype(np.float32)  # fields are float32
        ref = map_coordinates(lab, _identity(lab.shape) + u.astype(np.float64), order=0, mode="constant", cval=0)
        assert np.array_equal(M.warp_labels_nearest(lab, u), ref)
