"""`unireg demo` end to end, judged against the demo's known true field with numpy on the written files.

The demo pair is the MNI152 template and a copy pulled through a known smooth deformation and affine
(:mod:`napari_unireg.io.demo_data`); its true registration field is cached beside the pair. Nothing here reads the
numbers the command prints or its metrics.json: the displacement error comes from ``disp.nii.gz`` against the true
field, and the Dice gain from ``warped_seg.nii.gz`` / the moving labels against the fixed labels (nibabel reads).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_unireg.cli import main
from napari_unireg.io.demo import demo_files

pytestmark = pytest.mark.slow  # one full-size registration (~20-60 s on 2 cores)


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels (> 0) of ``a``."""
    scores = []
    for label in np.unique(a[a > 0]):
        x, y = a == label, b == label
        scores.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def _read(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out, demo_files()


def test_the_true_field_registers_the_demo_labels(demo_run):
    """Guard on the reference: pulling the moving labels through the true field gives back the fixed labels."""
    _, files = demo_run
    truth = np.load(files["true_disp"])
    fixed_seg, moving_seg = _read(files["fixed_seg"]), _read(files["moving_seg"])
    coords = np.indices(fixed_seg.shape, dtype=np.float32) + truth
    pulled = ndimage.map_coordinates(moving_seg, coords, order=0, mode="constant", cval=0)
    assert _mean_dice(fixed_seg, pulled) > 0.93 > _mean_dice(fixed_seg, moving_seg) + 0.05


def test_demo_displacement_error_against_the_true_field(demo_run):
    out, files = demo_run
    fixed = nib.load(files["fixed"])
    assert np.allclose(nib.load(str(out / "disp.nii.gz")).shape, (*fixed.shape, 3))
    assert np.allclose(np.abs(np.diag(fixed.affine)[:3]), 1.0)  # 1 mm, RAS-stored: voxel units are mm
    disp = np.moveaxis(_read(out / "disp.nii.gz").astype(np.float64), -1, 0)
    truth = np.load(files["true_disp"]).astype(np.float64)
    brain = _read(files["fixed"]) > 0
    err = np.linalg.norm(disp - truth, axis=0)[brain]
    before = np.linalg.norm(truth, axis=0)[brain]
    print(f"demo displacement error: {err.mean():.2f} mm mean, 95th percentile {np.percentile(err, 95):.2f} mm "
          f"(zero field: {before.mean():.2f} mm)")
    assert before.mean() > 3.0  # the demo really is deformed
    assert err.mean() < 1.5 and err.mean() < 0.3 * before.mean()
    assert np.percentile(err, 95) < 3.0


def test_demo_dice_gain_from_the_written_labels(demo_run):
    out, files = demo_run
    fixed_seg = _read(files["fixed_seg"])
    before = _mean_dice(fixed_seg, _read(files["moving_seg"]))  # the demo pair shares one grid
    after = _mean_dice(fixed_seg, _read(out / "warped_seg.nii.gz"))
    print(f"demo Dice {before:.3f} -> {after:.3f}")
    assert after > 0.87 and after > before + 0.05


def test_demo_writes_the_slice_figures(demo_run):
    out, _ = demo_run
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
