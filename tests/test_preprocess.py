"""core/intensity.py, core/resample.py, pipeline/model_grid.py: 1 mm resampling, intensity normalisation, crop/pad and the model grid <-> native mappings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import smooth_blob_volume
from napari_unireg.errors import UserError
from napari_unireg.io import load_volume, volume_from_array
from napari_unireg.core.intensity import MODEL_SHAPE, crop_or_pad, is_normalized, normalize_intensity, undo_crop_or_pad
from napari_unireg.core.resample import resample_affine
from napari_unireg.pipeline.model_grid import resample_to_spacing, to_model_grid


def _world(affine, idx):
    idx = np.asarray(idx, dtype=np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _linear_image(shape, affine, coef=(0.3, -0.2, 0.5), c0=50.0):
    """An image that is a linear function of world position (linear interpolation reproduces it exactly)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (c0 + _world(affine, idx) @ np.asarray(coef)).astype(np.float32)


def _brain(shape, centre, radii, value=1.0):
    """An ellipsoid 'brain' with some structure, 0 outside."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    r = (((idx - centre) / radii) ** 2).sum(-1)
    inside = r <= 1
    return np.where(inside, value * (0.5 + 0.5 * np.cos(3 * r) ** 2), 0).astype(np.float32)


# --------------------------------------------------------------------------------------------- resampling


def test_resample_to_spacing_linear_exact():
    affine = np.diag([2.0, 1.5, 0.8, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    data = _linear_image((10, 12, 30), affine)
    vol = volume_from_array(data, affine)
    res = resample_to_spacing(vol, (1, 1, 1))
    assert res.spacing == pytest.approx((1, 1, 1))
    assert res.shape == (19, 17, 24)  # floor((n − 1)·s) + 1: every new voxel inside the old field of view
    np.testing.assert_allclose(res.affine[:3, 3], affine[:3, 3])  # voxel 0 stays in place
    # Upsampled axes are exact; the downsampled one (0.8 → 1 mm) is smoothed, which keeps a linear image too.
    np.testing.assert_allclose(res.data, _linear_image(res.shape, res.affine), atol=1e-3)
    assert resample_to_spacing(res, 1.0) is res


def test_resample_labels_nearest():
    lab = np.zeros((8, 8, 8), np.int16)
    lab[2:6, 2:6, 2:6] = 5
    lab[4:6, 4:6, 4:6] = 9
    vol = volume_from_array(lab, np.diag([2.0, 2.0, 2.0, 1.0]), kind="label")
    res = resample_to_spacing(vol, (1, 1, 1))
    assert res.data.dtype == np.int16 and res.is_label
    assert set(np.unique(res.data)) == {0, 5, 9}
    assert res.data[8, 8, 8] == 9 and res.data[0, 0, 0] == 0


# --------------------------------------------------------------------------------------------- intensities


def test_normalize_intensity_protocol():
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20, 20), np.float32)
    img[5:15, 5:15, 5:15] = rng.uniform(100, 4000, (10, 10, 10))  # raw scanner range
    out = normalize_intensity(img)
    p = np.percentile(img[img > 0], 99.5)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    np.testing.assert_allclose(out[img > 0], np.minimum(img[img > 0] / p, 1), rtol=1e-5)
    assert np.all(out[img == 0] == 0)
    assert is_normalized(out) and not is_normalized(img)


def test_normalize_intensity_negative_values():
    img = np.full((20, 20, 20), -1024.0, np.float32)  # CT-like constant negative background
    img[5:15, 5:15, 5:15] = np.linspace(-900, 1000, 1000).reshape(10, 10, 10)
    out = normalize_intensity(img)
    assert out[0, 0, 0] == 0 and out[5, 5, 5] > 0 and out.max() == 1
    # Scattered negative values (ringing) are clipped, not shifted.
    ring = np.zeros((20, 20, 20), np.float32)
    ring[5:15, 5:15, 5:15] = 100
    ring[4, 5:15, 5:15] = -3
    out = normalize_intensity(ring)
    assert out[4, 6, 6] == 0 and out[6, 6, 6] == 1
    with pytest.raises(UserError, match="no foreground"):
        normalize_intensity(np.full((5, 5, 5), -2.0))
    mask = np.zeros((20, 20, 20), bool)
    mask[8:12, 8:12, 8:12] = True
    out = normalize_intensity(ring, mask=mask)
    assert out[6, 6, 6] == 0 and out[9, 9, 9] == 1


# --------------------------------------------------------------------------------------------- crop / pad


def test_crop_or_pad_keeps_off_centre_brain():
    arr = np.zeros((40, 30, 20), np.float32)
    arr[2:18, 5:25, 12:19] = 1.0  # brain near one edge
    out, rec = crop_or_pad(arr, (24, 24, 24))
    assert out.shape == (24, 24, 24)
    assert out.sum() == arr.sum()  # the whole brain is inside
    # Centred on the bounding box (x: 2..17 → centre 9.5; window of 24 starts at −2).
    assert rec.start[0] == -2
    back = undo_crop_or_pad(out, rec)
    np.testing.assert_array_equal(back, arr)


def test_crop_or_pad_identity_and_too_big():
    arr = np.zeros((10, 12, 14), np.float32)
    arr[1:4, 2:5, 9:13] = 2
    out, rec = crop_or_pad(arr, (10, 12, 14))
    assert rec.is_identity and out is arr
    big = np.ones((30, 10, 10), np.float32)
    with pytest.warns(UserWarning, match="larger than the model grid"):
        out, rec = crop_or_pad(big, (20, 10, 10))
    assert rec.start == (5, 0, 0)


# --------------------------------------------------------------------------------------------- model grid


def test_model_grid_identity_for_box_volume():
    data = np.zeros(MODEL_SHAPE, np.float32)
    data[30:130, 40:190, 30:160] = np.linspace(0.01, 1, 100, dtype=np.float32)[:, None, None]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-80, -129, -91]
    vol = volume_from_array(data, affine)
    out, mapping = to_model_grid(vol)
    assert mapping.is_identity
    assert out is vol.data  # no copy, no resampling, no renormalisation
    np.testing.assert_array_equal(mapping.model_affine, vol.affine)
    field = np.random.default_rng(0).normal(size=(3, *MODEL_SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(mapping.field_to_native(field), field)
    np.testing.assert_array_equal(mapping.image_to_native(out), out)


def _native_volume():
    """A LAS, anisotropic native volume with a brain-like blob, as the user would load it."""
    shape = (20, 28, 36)
    spacing = np.array([2.0, 1.5, 0.8])
    brain = _brain(shape, np.array(shape) / 2 + [1, -2, 3], np.array([7, 8, 13]), value=300.0)
    stored = brain[::-1].copy()
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [(shape[0] - 1) * spacing[0] + 5, -20, -12]
    return volume_from_array(stored, affine, name="native")


def test_to_model_grid_geometry():
    vol = _native_volume()
    assert vol.orientation == "LAS"
    shape = (32, 36, 24)
    out, m = to_model_grid(vol, shape=shape)
    assert out.shape == shape and out.max() == pytest.approx(1.0) and not m.is_identity
    # Model voxel q and native voxel p = model_to_native·q are the same world point.
    q = np.array([[0, 0, 0], [5, 7, 3], [31, 35, 23]], dtype=np.float64)
    p = q @ m.model_to_native[:3, :3].T + m.model_to_native[:3, 3]
    np.testing.assert_allclose(_world(m.model_affine, q), _world(vol.affine, p), atol=1e-9)
    np.testing.assert_allclose(m.native_to_model @ m.model_to_native, np.eye(4), atol=1e-12)
    assert np.allclose(np.sqrt((m.model_affine[:3, :3] ** 2).sum(0)), 1.0)
    # The brain fits in the model grid: nothing of the 1 mm resampled brain is cropped.
    assert np.count_nonzero(out) == np.count_nonzero(resample_to_spacing(vol, 1.0).data) > 0


def test_field_to_native_translation_and_linear_field():
    vol = _native_volume()
    spacing = np.asarray(vol.spacing)
    _, m = to_model_grid(vol, shape=(32, 36, 24))
    # A world translation t (mm) is t/1 mm model voxels and t/spacing native voxels.
    t = np.array([3.0, -2.0, 1.5])
    u = np.broadcast_to(t[:, None, None, None], (3, 32, 36, 24)).astype(np.float32)
    v = m.field_to_native(u)
    assert v.shape == (3, *vol.shape)
    np.testing.assert_allclose(v, np.broadcast_to((t / spacing)[:, None, None, None], v.shape), rtol=1e-6)
    # A linear field: v(p) = u(q(p)) / scale, and both describe the same world mapping.
    a = np.array([[0.05, -0.02, 0.01], [0.0, 0.03, -0.04], [0.02, 0.01, -0.05]])
    c = np.array([1.0, -0.5, 2.0])
    q = np.stack(np.meshgrid(*[np.arange(n) for n in (32, 36, 24)], indexing="ij"), 0).reshape(3, -1)
    u = (a @ q + c[:, None]).reshape(3, 32, 36, 24).astype(np.float32)
    v = m.field_to_native(u)
    p = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    qp = p @ m.native_to_model[:3, :3].T + m.native_to_model[:3, 3]
    inside = np.all((qp >= 0) & (qp <= np.array([31, 35, 23])), axis=1)
    assert inside.sum() > 1000
    vp = v.reshape(3, -1).T[inside]
    up = qp[inside] @ a.T + c
    np.testing.assert_allclose(vp, up / m.scale, atol=1e-4)
    np.testing.assert_allclose(
        _world(vol.affine, p[inside] + vp), _world(m.model_affine, qp[inside] + up), atol=1e-4
    )


def test_image_and_labels_round_trip():
    vol = _native_volume()
    out, m = to_model_grid(vol, shape=(32, 36, 24))
    back = m.image_to_native(out)
    assert back.shape == vol.shape
    norm = normalize_intensity(vol.data)
    # The brain is smooth: resampling there and back stays close.
    mask = norm > 0
    assert np.abs(back[mask] - norm[mask]).mean() < 0.05
    lab = (vol.data > 150).astype(np.uint8) * 4
    lab_model = m.to_model(lab)
    assert lab_model.dtype == np.uint8 and set(np.unique(lab_model)) <= {0, 4}
    lab_back = m.image_to_native(lab_model)
    assert lab_back.dtype == np.uint8
    assert (lab_back == lab).mean() > 0.97
    with pytest.raises(UserError):
        m.to_model(lab[1:])


def test_resample_to_model_with_world_transform():
    vol = _native_volume()
    out, m = to_model_grid(vol, shape=(32, 36, 24))
    # Identity transform reproduces to_model_grid's own sampling (before normalisation).
    direct = m.resample_to_model(vol, world_to_moving=np.eye(4))
    np.testing.assert_allclose(normalize_intensity(direct), out, atol=2e-3)
    # A moving copy shifted by 4 mm in world: pulling it through the translation gives back the fixed.
    shifted = vol.with_data(vol.data)
    shifted.affine = vol.affine.copy()
    shifted.affine[:3, 3] += [4.0, 0, 0]
    tr = np.eye(4)
    tr[0, 3] = 4.0
    np.testing.assert_allclose(m.resample_to_model(shifted, tr), direct, atol=1e-3)


def test_resample_affine_oblique_uses_scipy():
    rng = np.random.default_rng(0)
    arr = smooth_blob_volume((12, 12, 12))
    rot = np.eye(4)
    rot[:2, :2] = [[0, -1], [1, 0]]
    rot[0, 3] = 11  # a 90° rotation of the index grid
    out = resample_affine(arr, rot, (12, 12, 12), order=1)
    np.testing.assert_allclose(out, np.rot90(arr, k=-1, axes=(0, 1)), atol=1e-5)
    lab = rng.integers(0, 4, (12, 12, 12)).astype(np.uint8)
    out = resample_affine(lab, rot, (12, 12, 12), order=0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rot90(lab, k=-1, axes=(0, 1)))


def test_box_images_identity(shared_data):
    vol = load_volume(shared_data / "imagesTr" / "UNIREG_0001_0000.nii.gz")
    out, m = to_model_grid(vol)
    assert m.is_identity and out is vol.data


def test_native_brain_fits(shared_data):
    vol = load_volume(shared_data / "native" / "UNIREG_0003_brain.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "brain larger than the grid" warning
        out, m = to_model_grid(vol)
    assert out.shape == MODEL_SHAPE and out.max() == 1.0
    assert np.count_nonzero(out) == pytest.approx(np.count_nonzero(vol.data), rel=1e-6)
