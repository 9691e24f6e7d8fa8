"""io.py: canonical loading, checks on bad input, writing back in the user's orientation, displacement files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import smooth_blob_volume
from napari_unireg.errors import UserError
from napari_unireg.io import (
    disp_to_original_orientation,
    labels_names,
    load_disp_itk,
    load_disp_l2r,
    load_volume,
    looks_like_labels,
    save_disp_itk,
    save_disp_l2r,
    save_volume,
    to_original_orientation,
    volume_from_array,
)

RAS_AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def _image(shape=(12, 14, 10)):
    return smooth_blob_volume(shape, seed=1) * 100 + 1.0  # no zeros: every voxel is "brain"


def _flip(data, affine, axes):
    """The same world content stored with the given array axes reversed (and the matching affine)."""
    flip = np.eye(4)
    for ax in axes:
        flip[ax, ax] = -1
        flip[ax, 3] = data.shape[ax] - 1
    return np.flip(data, axis=axes).copy(), affine @ flip


def _save(path, data, affine, **header):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def _labels(shape=(12, 14, 10)):
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:9, 2:8] = 3
    lab[6:10, 3:9, 2:8] = 7
    lab[4:8, 9:12, 4:6] = 12
    return lab


# --------------------------------------------------------------------------------------------- orientation


def test_las_ras_lps_trio_loads_to_same_canonical(tmp_path):
    data = _image()
    las = _flip(data, RAS_AFFINE, (0,))
    lps = _flip(data, RAS_AFFINE, (0, 1))
    vols = [
        load_volume(_save(tmp_path / "ras.nii.gz", data, RAS_AFFINE)),
        load_volume(_save(tmp_path / "las.nii.gz", *las)),
        load_volume(_save(tmp_path / "lps.nii", *lps)),
    ]
    assert [v.orientation for v in vols] == ["RAS", "LAS", "LPS"]
    for v in vols:
        np.testing.assert_array_equal(v.data, data)
        np.testing.assert_allclose(v.affine, RAS_AFFINE, atol=1e-5)
        assert v.spacing == pytest.approx((1.5, 2.0, 2.5))
        assert not v.is_label and v.data.dtype == np.float32
    assert vols[1].name == "las" and vols[2].name == "lps"


def test_permuted_axes_load_canonical(tmp_path):
    data = _image()
    # Stored as L-I-A (FreeSurfer conformed): stored axes (x flipped, z flipped, y).
    stored = np.flip(np.transpose(data, (0, 2, 1)), axis=(0, 1)).copy()
    n0, n2 = data.shape[0], data.shape[2]
    vox_to_ras = np.array([[-1, 0, 0, n0 - 1], [0, 0, 1, 0], [0, -1, 0, n2 - 1], [0, 0, 0, 1.0]])
    affine = RAS_AFFINE @ vox_to_ras
    vol = load_volume(_save(tmp_path / "lia.nii.gz", stored, affine))
    assert vol.orientation == "LIA"
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, RAS_AFFINE, atol=1e-5)
    np.testing.assert_array_equal(to_original_orientation(vol.data, vol), stored)


def test_save_round_trip_keeps_orientation_and_header(tmp_path):
    data = _image()
    stored, affine = _flip(data, RAS_AFFINE, (0, 1))
    src = _save(tmp_path / "in.nii.gz", stored, affine, descrip=b"my scan")
    vol = load_volume(src)
    out = save_volume(vol.data * 2, vol, tmp_path / "out.nii.gz")
    img = nib.load(str(out))
    ref = nib.load(str(src))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.get_fdata(), stored * 2, rtol=1e-6)
    np.testing.assert_allclose(img.get_qform(), ref.get_qform())
    np.testing.assert_allclose(img.get_sform(), ref.get_sform())
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"my scan"
    assert img.get_data_dtype() == np.float32
    # Reloading gives the same canonical array.
    np.testing.assert_allclose(load_volume(out).data, data * 2, rtol=1e-6)


def test_save_labels_dtype_and_scaling_reset(tmp_path):
    data = (_image() * 10).astype(np.int16)
    img = nib.Nifti1Image(data, RAS_AFFINE)
    img.header.set_slope_inter(0.5, 0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol = load_volume(tmp_path / "scaled.nii.gz", kind="image")
    np.testing.assert_allclose(vol.data, data * 0.5)
    out = save_volume(_labels(vol.shape), vol, tmp_path / "seg.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), _labels(vol.shape))


def test_save_refuses_overwrite_and_is_atomic(tmp_path):
    vol = volume_from_array(_image(), RAS_AFFINE)
    path = save_volume(vol.data, vol, tmp_path / "a.nii.gz")
    with pytest.raises(UserError, match="already exists"):
        save_volume(vol.data, vol, path)
    save_volume(vol.data + 1, vol, path, overwrite=True)
    assert np.allclose(load_volume(path).data, vol.data + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]  # no temporary file left
    with pytest.raises(UserError, match="must end with"):
        save_volume(vol.data, vol, tmp_path / "a.png")
    with pytest.raises(UserError, match="does not match"):
        save_volume(vol.data[1:], vol, tmp_path / "b.nii.gz")


def test_disp_to_original_orientation_matches_world():
    data = _image()
    stored, affine = _flip(data, RAS_AFFINE, (0, 2))
    vol = volume_from_array(stored, affine)
    t_world = np.array([3.0, -2.0, 5.0])
    u_canon = (np.linalg.inv(vol.affine[:3, :3]) @ t_world)[:, None, None, None] * np.ones((3, *vol.shape))
    u_orig = disp_to_original_orientation(u_canon.astype(np.float32), vol)
    expected = np.linalg.inv(affine[:3, :3]) @ t_world
    assert u_orig.shape == (3, *stored.shape)
    np.testing.assert_allclose(u_orig[:, 0, 0, 0], expected, atol=1e-6)
    # A spatially varying component lands on the right voxels too.
    field = np.zeros((3, *vol.shape), np.float32)
    field[0, 1, 2, 3] = 1.0
    out = disp_to_original_orientation(field, vol)
    idx = np.round(np.linalg.inv(affine) @ vol.affine @ [1, 2, 3, 1])[:3].astype(int)
    assert out[0][tuple(idx)] == -1.0  # axis 0 is flipped in the stored order
    assert np.count_nonzero(out) == 1


# --------------------------------------------------------------------------------------------- bad input


def test_missing_and_not_nifti(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a NIfTI"):
        load_volume(tmp_path / "notes.txt")
    (tmp_path / "fake.nii.gz").write_text("hello")
    with pytest.raises(UserError, match="NIfTI"):
        load_volume(tmp_path / "fake.nii.gz")
    (tmp_path / "fake.nii").write_text("hello" * 100)
    with pytest.raises(UserError, match="NIfTI"):
        load_volume(tmp_path / "fake.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, suffix):
    data = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    path = _save(tmp_path / f"full{suffix}", data, RAS_AFFINE)
    raw = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as info:
        load_volume(cut)
    assert "\n" not in str(info.value)


def test_dimensionality(tmp_path):
    with pytest.raises(UserError, match="2D"):
        load_volume(_save(tmp_path / "2d.nii.gz", np.ones((10, 10), np.float32), np.eye(4)))
    with pytest.raises(UserError, match="4D"):
        load_volume(_save(tmp_path / "4d.nii.gz", np.random.rand(6, 6, 6, 3).astype(np.float32), np.eye(4)))
    vol = load_volume(_save(tmp_path / "4d1.nii.gz", _image()[..., None], RAS_AFFINE))
    assert vol.shape == _image().shape
    with pytest.raises(UserError, match="empty or flat"):
        volume_from_array(np.ones((5, 1, 5)) * np.arange(5)[:, None, None])


def test_empty_constant_nan(tmp_path):
    with pytest.raises(UserError, match="empty"):
        load_volume(_save(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4)))
    with pytest.raises(UserError, match="constant"):
        load_volume(_save(tmp_path / "const.nii.gz", np.full((8, 8, 8), 3.0, np.float32), np.eye(4)))
    bad = _image()
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    with pytest.raises(UserError, match="3 NaN and 1 infinite"):
        load_volume(_save(tmp_path / "nan.nii.gz", bad, RAS_AFFINE))


def test_label_image_confusion(tmp_path):
    lab_path = _save(tmp_path / "seg.nii.gz", _labels(), RAS_AFFINE)
    img_path = _save(tmp_path / "img.nii.gz", _image(), RAS_AFFINE)
    seg = load_volume(lab_path)
    assert seg.is_label and seg.data.dtype == np.uint8
    np.testing.assert_array_equal(np.unique(seg.data), [0, 3, 7, 12])
    assert not load_volume(img_path).is_label
    with pytest.raises(UserError, match="looks like a label map"):
        load_volume(lab_path, kind="image")
    with pytest.raises(UserError, match="non-integer"):
        load_volume(img_path, kind="label")
    # A float label map (integer values) is a label map; it is returned with an integer dtype.
    fl = load_volume(_save(tmp_path / "segf.nii.gz", _labels().astype(np.float32), RAS_AFFINE), kind="label")
    assert fl.is_label and fl.data.dtype.kind in "iu"


def test_looks_like_labels_uint8_image():
    # An 8-bit brain image has few integer values (like FreeSurfer's brainmask.mgz) but is not piecewise constant.
    img = np.round(_image((20, 20, 20)) * 2).astype(np.uint8)
    assert len(np.unique(img)) < 256
    assert not looks_like_labels(img)
    assert looks_like_labels(_labels())
    assert looks_like_labels(_labels() > 0)


def test_volume_from_array_rejects_bad_affine():
    with pytest.raises(UserError, match="degenerate"):
        volume_from_array(_image(), np.diag([1.0, 0.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------- displacements


def test_l2r_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    disp = rng.normal(size=(3, 6, 7, 5)).astype(np.float32)
    path = save_disp_l2r(disp, tmp_path / "disp_0001_0002.nii.gz")
    img = nib.load(str(path))
    assert img.shape == (6, 7, 5, 3) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, np.eye(4))
    np.testing.assert_array_equal(load_disp_l2r(path), disp)
    np.testing.assert_array_equal(load_disp_l2r(save_disp_l2r(disp, tmp_path / "d.npz")), disp)
    # Channel-first files (the OASIS demo layout) are accepted too.
    nib.save(nib.Nifti1Image(disp, np.eye(4)), str(tmp_path / "cf.nii.gz"))
    np.testing.assert_array_equal(load_disp_l2r(tmp_path / "cf.nii.gz"), disp)
    np.savez(tmp_path / "other.npz", arr_0=np.moveaxis(disp, 0, -1))
    np.testing.assert_array_equal(load_disp_l2r(tmp_path / "other.npz"), disp)
    with pytest.raises(UserError, match="already exists"):
        save_disp_l2r(disp, path)
    nib.save(nib.Nifti1Image(disp[:2], np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(UserError, match="displacement"):
        load_disp_l2r(tmp_path / "bad.nii.gz")


@pytest.mark.parametrize("axes", [(0, 1), (0,)], ids=["LPS", "LAS"])
def test_itk_translation_analytic(tmp_path, axes):
    """A world translation t (RAS mm) is stored as (−t_x, −t_y, t_z) (LPS) and read back in voxel units."""
    shape = (6, 7, 5)
    _, affine = _flip(np.zeros(shape), RAS_AFFINE, axes)
    t_ras = np.array([3.0, -2.0, 5.0])
    spacing = np.array([1.5, 2.0, 2.5])
    signs = np.array([-1.0 if a in axes else 1.0 for a in range(3)])
    u_vox = t_ras / (spacing * signs)  # voxel units of this grid
    disp = np.broadcast_to(u_vox[:, None, None, None], (3, *shape)).astype(np.float32)
    path = save_disp_itk(disp, affine, tmp_path / "warp.nii.gz")
    img = nib.load(str(path))
    assert img.shape == (*shape, 1, 3)
    assert int(img.header["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR
    assert nib.aff2axcodes(img.affine) == ("L", "P" if 1 in axes else "A", "S")
    np.testing.assert_allclose(img.get_fdata()[2, 3, 1, 0], [-3.0, 2.0, 5.0], atol=1e-5)
    back, back_affine = load_disp_itk(path)
    np.testing.assert_allclose(back, disp, atol=1e-5)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    # A file written by another tool with X×Y×Z×3 layout reads the same.
    nib.save(nib.Nifti1Image(img.get_fdata()[:, :, :, 0, :].astype(np.float32), affine), str(tmp_path / "w3.nii.gz"))
    np.testing.assert_allclose(load_disp_itk(tmp_path / "w3.nii.gz")[0], disp, atol=1e-5)


def test_itk_round_trip_oblique(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[1.2 * c, -s, 0, 4.0], [1.2 * s, c, 0, -7.0], [0, 0, -0.9, 12.0], [0, 0, 0, 1]])
    disp = np.random.default_rng(1).normal(size=(3, 5, 6, 4)).astype(np.float32)
    back, aff = load_disp_itk(save_disp_itk(disp, affine, tmp_path / "w.nii.gz"))
    np.testing.assert_allclose(back, disp, atol=1e-5)
    np.testing.assert_allclose(aff, affine, atol=1e-5)


# --------------------------------------------------------------------------------------------- label names


def test_labels_names(tmp_path):
    assert labels_names({"1": "a", 2: "b", "x": "skip"}) == {1: "a", 2: "b"}
    assert labels_names({"labels": {"0": {"0": "background", "3": "c"}}}) == {0: "background", 3: "c"}
    (tmp_path / "t.json").write_text(json.dumps({"labels": {"2": "x", "10": "y"}, "other": 1}))
    assert labels_names(tmp_path / "t.json") == {2: "x", 10: "y"}
    (tmp_path / "lut.txt").write_text("# comment\n0 Unknown 0 0 0 0\n17 Left-Hippocampus 220 216 20 0\n")
    assert labels_names(tmp_path / "lut.txt") == {0: "Unknown", 17: "Left-Hippocampus"}
    with pytest.raises(UserError):
        labels_names(tmp_path / "missing.json")


def test_labels_names_shared(shared_data):
    table = labels_names(shared_data / "label_table.json")
    assert len(table) == 35 and table[13] == "Brain-Stem"
    ds = labels_names(shared_data / "dataset.json")
    assert ds[0] == "background" and ds[30] == table[30]


def test_load_shared_native(shared_data):
    vol = load_volume(shared_data / "native" / "UNIREG_0001_brain.nii.gz")
    assert vol.orientation == "LIA" and not vol.is_label
    assert np.allclose(vol.affine[:3, :3], np.eye(3))
    seg = load_volume(shared_data / "native" / "UNIREG_0001_aseg.nii.gz")
    assert seg.is_label and seg.shape == vol.shape
