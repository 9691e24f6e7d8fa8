"""napari reader / writers / sample data / manifest, without a viewer (no display needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_unireg._napari import reader, writer  # noqa: E402
from napari_unireg._napari.convert import NIFTI_KEY, attributes_affine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 14, 10)
SPACING = (1.0, 1.5, 2.0)


def _ras_array() -> np.ndarray:
    """An image whose value encodes its RAS voxel index: v = 10000*i + 100*j + k (+1 so it is not label-like)."""
    i, j, k = np.indices(SHAPE)
    return (10000.0 * i + 100.0 * j + k + 0.5).astype(np.float32)


def _write_oriented(tmp: Path, codes: str, labels: bool = False) -> tuple[Path, np.ndarray]:
    """The same RAS volume stored in orientation ``codes`` (e.g. 'LAS', 'LPS'): data flipped and affine adjusted."""
    ras = _ras_array()
    if labels:
        ras = (np.indices(SHAPE)[0] // 4 + 1).astype(np.int16)  # three slabs along R
    A = np.diag([*SPACING, 1.0])
    A[:3, 3] = (-5.0, 7.0, -3.0)
    data, aff = ras, A.copy()
    for ax, code in enumerate(codes):
        if code in "LPI":  # stored axis runs the other way
            data = np.flip(data, axis=ax)
            flip = np.eye(4)
            flip[ax, ax] = -1
            flip[ax, 3] = SHAPE[ax] - 1
            aff = aff @ flip
    path = tmp / f"vol_{codes}{'_lab' if labels else ''}.nii.gz"
    img = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=1)
    img.header["descrip"] = b"unireg test"
    nib.save(img, str(path))
    assert "".join(nib.aff2axcodes(aff)) == codes
    return path, A


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS"])
def test_reader_world_coordinates_are_ras_mm(tmp_path, codes):
    path, ras_affine = _write_oriented(tmp_path, codes)
    fn = reader.napari_get_reader(str(path))
    assert fn is not None
    [(data, kwargs, ltype)] = fn(str(path))
    assert ltype == "image"
    # the layer holds the canonical RAS array under the canonical affine: same numbers whatever the file order
    np.testing.assert_array_equal(data, _ras_array())
    np.testing.assert_allclose(kwargs["affine"], ras_affine, atol=1e-6)
    spacing = np.sqrt((np.asarray(kwargs["affine"])[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(spacing, SPACING)
    meta = kwargs["metadata"][NIFTI_KEY]
    assert meta["orientation"] == codes
    assert bytes(meta["header"]["descrip"]).startswith(b"unireg test")


def test_reader_labels_and_names(tmp_path):
    path, _ = _write_oriented(tmp_path, "LPS", labels=True)
    (tmp_path / "label_table.json").write_text('{"labels": {"1": "first", "2": "second", "3": "third"}}')
    [(data, kwargs, ltype)] = reader.read_nifti(str(path))
    assert ltype == "labels"
    assert np.issubdtype(data.dtype, np.integer)
    # canonical order: label grows along R (axis 0) even though the file stores it flipped
    assert data[0, 0, 0] == 1 and data[-1, 0, 0] == 3
    assert kwargs["metadata"]["label_names"][2] == "second"


def test_reader_rejects_other_files(tmp_path):
    assert reader.napari_get_reader(str(tmp_path / "x.tif")) is None
    assert reader.napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.png")]) is None
    assert reader.napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]) is not None


@pytest.mark.parametrize("codes", ["LAS", "LPS"])
def test_writer_restores_file_orientation_and_header(tmp_path, codes):
    path, _ = _write_oriented(tmp_path, codes)
    [(data, kwargs, _)] = reader.read_nifti(str(path))
    out = tmp_path / "out.nii.gz"
    state = {"metadata": kwargs["metadata"], "affine": kwargs["affine"], "name": "x"}
    [written] = writer.write_image(str(out), data * 2.0, state)
    orig, new = nib.load(str(path)), nib.load(written)
    np.testing.assert_allclose(new.affine, orig.affine, atol=1e-6)
    np.testing.assert_allclose(new.get_fdata(), orig.get_fdata() * 2.0, rtol=1e-6)
    assert "".join(nib.aff2axcodes(new.affine)) == codes
    assert bytes(new.header["descrip"]).startswith(b"unireg test")


def test_writer_plain_layer_uses_world_matrix(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4) % 3
    state = {"scale": (2.0, 3.0, 4.0), "translate": (1.0, 2.0, 3.0), "metadata": {}}
    [written] = writer.write_labels(str(tmp_path / "lab"), data, state)
    img = nib.load(written)
    assert written.endswith(".nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, attributes_affine(state, 3))
    np.testing.assert_allclose(np.diag(img.affine)[:3], (2.0, 3.0, 4.0))


def test_displacement_writers(tmp_path):
    from napari_unireg.io import load_disp_itk, load_disp_l2r

    rng = np.random.default_rng(0)
    disp = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    A = np.diag([*SPACING, 1.0])
    attrs = {"metadata": {"unireg": {"run": 1, "kind": "warped", "displacement": {"disp": disp, "affine": A}}}}
    [p1] = writer.write_disp_l2r(str(tmp_path / "d_l2r.nii.gz"), None, attrs)
    np.testing.assert_allclose(load_disp_l2r(p1), disp, atol=1e-6)
    [p2] = writer.write_disp_itk(str(tmp_path / "d_itk.nii.gz"), None, attrs)
    back, aff = load_disp_itk(p2)
    np.testing.assert_allclose(back, disp, atol=1e-5)
    np.testing.assert_allclose(aff, A)
    img = nib.load(p2)
    assert img.shape == (*SHAPE, 1, 3)
    # component 0 in LPS mm = -(spacing_0 * u_0)
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0, 0], -SPACING[0] * disp[0], rtol=1e-5, atol=1e-5)
    from napari_unireg.errors import UserError

    with pytest.raises(UserError, match="no displacement"):
        writer.write_disp_l2r(str(tmp_path / "x.nii.gz"), None, {"metadata": {}})


def test_manifest_is_valid_and_importable():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(ROOT / "napari.yaml")
    assert (ROOT / "napari_unireg" / "napari.yaml").resolve() == (ROOT / "napari.yaml").resolve()
    pm.validate_imports()
    widgets = {w.display_name for w in pm.contributions.widgets}
    assert {"Register", "Inspect result", "Metrics", "Linked views", "Export figure"} <= widgets
    assert pm.contributions.readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    assert {w.display_name for w in pm.contributions.writers} >= {"NIfTI image", "NIfTI labels"}


@pytest.mark.slow
def test_sample_data_demo_pair():
    from napari_unireg._napari.sample_data import demo_pair

    out = demo_pair()
    kinds = [t for _, _, t in out]
    assert kinds == ["image", "image", "labels", "labels"]
    fixed = out[0]
    assert fixed[0].shape == (160, 224, 192)
    assert out[2][1]["metadata"]["label_names"]
    assert NIFTI_KEY in fixed[1]["metadata"]
