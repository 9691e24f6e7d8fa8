"""The exported fields, checked with readers that are not the project's own.

`unireg register` writes ``warped.nii.gz`` by sampling the moving image once, and two fields that must describe
the same map:

* ``disp_itk.nii.gz`` (ITK/ANTs): SimpleITK's ``DisplacementFieldTransform`` + ``Resample`` of the moving file onto
  the fixed file's grid must reproduce ``warped.nii.gz``; SimpleITK reads both headers itself (LPS physical space).
* ``disp.nii.gz`` (Learn2Reg): voxel units of the fixed file's stored grid, pull, relative to the moving image placed
  on the fixed grid by world coordinates. ``scipy.ndimage.map_coordinates`` at ``p + u(p)``, carried to the moving
  file's voxels with the two nibabel affines, must reproduce ``warped.nii.gz`` too.

The synthetic pair is stored oblique and in LPS order (moving: another rotation and voxel size), so a swapped
axis, a sign or a missing affine shows up; the real pair (data) stores the fixed brain in LPS order too.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import smooth_blob_volume
from napari_unireg.cli import main

pytestmark = pytest.mark.slow  # one registration per module (~15 s on 2 loaded cores)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return r


def _oblique_lps(shape, spacing, rot: np.ndarray, centre_mm) -> np.ndarray:
    """Voxel → RAS mm: axes stored L, P, S (first two flipped), rotated by ``rot``, volume centre at ``centre_mm``."""
    lin = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(centre_mm) - lin @ ((np.asarray(shape) - 1) / 2)
    return aff


def _brain_like(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A blob image with a zero background (an ellipsoid "brain") and a 3-label map of it."""
    img = smooth_blob_volume(shape, seed=seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    img = np.where(inside, 0.2 + 0.8 * img, 0.0).astype(np.float32)
    seg = np.where(inside, 1 + (img > 0.5) + (img > 0.7), 0).astype(np.uint8)
    return img, seg


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _register(tmp: Path, fixed, moving, moving_seg, *extra) -> Path:
    out = tmp / "out"
    rc = main(["register", fixed, moving, "--moving-seg", moving_seg, "--device", "cpu", "--out", str(out),
               "--quiet", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> dict:
    """Oblique LPS-stored fixed (1.5 mm) and moving (1.2 × 1.4 × 1.6 mm, other rotation, shifted content)."""
    tmp = tmp_path_factory.mktemp("exports")
    f_img, _ = _brain_like((28, 30, 26), seed=1)
    fixed_aff = _oblique_lps(f_img.shape, (1.5, 1.5, 1.5), _rotation(2, 20) @ _rotation(0, 10), (0, 0, 0))
    # the moving content is the fixed one seen through another header: a rotated, shifted copy in world space
    m_shape, m_spacing = (36, 32, 28), (1.2, 1.4, 1.6)
    moving_aff = _oblique_lps(m_shape, m_spacing, _rotation(1, -15), (3.0, -2.0, 1.5))
    vox = np.linalg.inv(fixed_aff) @ _rotation4(2, 6) @ moving_aff
    grid = np.indices(m_shape).reshape(3, -1).astype(np.float64)
    pts = vox[:3, :3] @ grid + vox[:3, 3:4]
    m_img = ndimage.map_coordinates(f_img, pts, order=1, cval=0.0).reshape(m_shape).astype(np.float32)
    m_seg = np.where(m_img > 0, 1 + (m_img > 0.5) + (m_img > 0.7), 0).astype(np.uint8)
    paths = {
        "fixed": _save(tmp / "fixed.nii.gz", f_img, fixed_aff),
        "moving": _save(tmp / "moving.nii.gz", m_img, moving_aff),
        "moving_seg": _save(tmp / "moving_seg.nii.gz", m_seg, moving_aff),
    }
    out = _register(tmp, paths["fixed"], paths["moving"], paths["moving_seg"], "--grid", "48", "48", "48")
    return {**paths, "out": out}


def _rotation4(axis: int, degrees: float) -> np.ndarray:
    r = np.eye(4)
    r[:3, :3] = _rotation(axis, degrees)
    return r


def _inside(fixed_path: str, margin: int = 2) -> np.ndarray:
    """Voxels of the fixed image's object, away from its edge (where linear sampling meets the zero background)."""
    data = np.asanyarray(nib.load(fixed_path).dataobj)
    return ndimage.binary_erosion(data > 0, iterations=margin)


def _warp_with_l2r(run: dict, which: str = "moving", order: int = 1) -> np.ndarray:
    """scipy: sample the moving file at ``p + u(p)`` of the fixed stored grid (the Learn2Reg reading)."""
    fixed = nib.load(run["fixed"])
    moving = nib.load(run[which])
    u = np.asanyarray(nib.load(str(run["out"] / "disp.nii.gz")).dataobj).astype(np.float64)
    assert u.shape == (*fixed.shape, 3)
    pts = np.moveaxis(np.indices(fixed.shape).astype(np.float64), 0, -1) + u  # fixed stored voxels
    to_moving = np.linalg.inv(moving.affine) @ fixed.affine
    coords = pts @ to_moving[:3, :3].T + to_moving[:3, 3]
    data = np.asanyarray(moving.dataobj).astype(np.float64 if order else np.int32)
    return ndimage.map_coordinates(data, np.moveaxis(coords, -1, 0), order=order, mode="constant", cval=0.0,
                                   prefilter=False)


def _warp_with_sitk(run: dict) -> np.ndarray:
    """SimpleITK: the ITK field as a DisplacementFieldTransform, the moving file resampled onto the fixed file."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(run["fixed"], sitk.sitkFloat64)
    moving = sitk.ReadImage(run["moving"], sitk.sitkFloat64)
    field = sitk.ReadImage(str(run["out"] / "disp_itk.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetSize() == fixed.GetSize() and field.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-4)
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return np.transpose(sitk.GetArrayFromImage(warped), (2, 1, 0))  # ITK arrays are z, y, x


def _agree(reference: np.ndarray, ours: np.ndarray, inside: np.ndarray, max_err: float) -> None:
    a, b = reference[inside], ours[inside]
    corr = np.corrcoef(a, b)[0, 1]
    err = np.abs(a - b).max()
    assert corr > 0.99 and err < max_err, (corr, err)


def _warped(run: dict) -> np.ndarray:
    return np.asanyarray(nib.load(str(run["out"] / "warped.nii.gz")).dataobj).astype(np.float64)


def test_synthetic_run_moves_something(synthetic_run):
    """Guard: the field is far from zero (the checks below would be vacuous for an identity map)."""
    u = np.asanyarray(nib.load(str(synthetic_run["out"] / "disp.nii.gz")).dataobj)
    assert np.abs(u).mean() > 0.5  # voxels of 1.5 mm; the pre-alignment's rotation and shift included


def test_itk_field_with_simpleitk_reproduces_warped(synthetic_run):
    inside = _inside(synthetic_run["fixed"])
    _agree(_warp_with_sitk(synthetic_run), _warped(synthetic_run), inside, max_err=1e-3)


def test_l2r_field_with_scipy_reproduces_warped(synthetic_run):
    inside = _inside(synthetic_run["fixed"])
    _agree(_warp_with_l2r(synthetic_run), _warped(synthetic_run), inside, max_err=1e-3)


def test_l2r_field_with_scipy_reproduces_warped_labels(synthetic_run):
    ours = np.asanyarray(nib.load(str(synthetic_run["out"] / "warped_seg.nii.gz")).dataobj)
    ref = _warp_with_l2r(synthetic_run, "moving_seg", order=0)
    inside = _inside(synthetic_run["fixed"])
    assert (ours[inside] == ref[inside]).mean() > 0.995  # nearest neighbour: ties may round either way


@pytest.mark.data
def test_real_pair_exports_reproduce_warped(shared_data, tmp_path):
    """Validation pair 0001←0002, the fixed brain re-stored in LPS order, default model, affine pre-alignment."""
    img_dir, lab_dir = shared_data / "imagesTr", shared_data / "labelsTr"
    fixed = nib.load(str(img_dir / "UNIREG_0001_0000.nii.gz"))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(fixed.shape[:2]) - 1
    lps = _save(tmp_path / "fixed_lps.nii.gz", np.asanyarray(fixed.dataobj)[::-1, ::-1].astype(np.float32),
                fixed.affine @ flip)
    run = {"fixed": lps, "moving": str(img_dir / "UNIREG_0002_0000.nii.gz"),
           "moving_seg": str(lab_dir / "UNIREG_0002_0000.nii.gz")}
    run["out"] = _register(tmp_path, run["fixed"], run["moving"], run["moving_seg"])
    assert json.loads((run["out"] / "run.json").read_text())["prealign_matrix"] is not None
    inside = _inside(run["fixed"], margin=3)
    warped = _warped(run)
    scale = np.percentile(warped[inside], 99)
    _agree(_warp_with_sitk(run), warped, inside, max_err=0.01 * scale)
    _agree(_warp_with_l2r(run), warped, inside, max_err=0.01 * scale)
