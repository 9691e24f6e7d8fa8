"""The engine's contract with its front ends: stages, cancel, labels, orientation of the written results."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import smooth_blob_volume

from napari_unireg.pipeline import Cancelled, RegisterOptions, register_volumes, write_result
from napari_unireg.errors import UserError
from napari_unireg.io import load_volume, volume_from_array

SHAPE = (40, 44, 36)
OPTIONS = dict(model="classical", prealign="none", grid_shape=(32, 48, 32))


def _pair():
    fixed = smooth_blob_volume(SHAPE, seed=3)
    fixed[fixed < 0.35] = 0
    moving = np.roll(fixed, 2, axis=1)
    seg = (fixed > 0.55).astype(np.uint8)
    return (
        volume_from_array(fixed, np.eye(4), kind="image", name="fixed"),
        volume_from_array(moving, np.eye(4), kind="image", name="moving"),
        volume_from_array(seg, np.eye(4), kind="label", name="fseg"),
        volume_from_array(np.roll(seg, 2, axis=1), np.eye(4), kind="label", name="mseg"),
    )


def test_stages_in_order_and_moving_labels_alone_are_warped():
    fixed, moving, _fseg, mseg = _pair()
    stages = []
    res = register_volumes(fixed, moving, None, mseg, options=RegisterOptions(**OPTIONS),
                           progress=lambda s, f: stages.append(s) if not stages or stages[-1] != s else None)
    assert stages == ["load", "inference", "metrics"]  # no pre-alignment or refinement asked for
    assert res.warped_seg is not None and res.warped_seg.dtype == mseg.data.dtype
    assert "dice" not in res.metrics and "sdlogj" in res.metrics
    assert res.disp_native.shape == (3, *SHAPE) and res.jacobian.shape == SHAPE


def test_cancel_stops_the_run():
    fixed, moving, _, _ = _pair()
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        register_volumes(fixed, moving, options=RegisterOptions(**OPTIONS), should_stop=should_stop)


def test_label_map_as_fixed_image_is_refused():
    fixed, moving, fseg, _ = _pair()
    with pytest.raises(UserError, match="label map"):
        register_volumes(fseg, moving, options=RegisterOptions(**OPTIONS))
    with pytest.raises(UserError, match="not on the grid"):
        small = volume_from_array(fseg.data[:-2], np.eye(4), kind="label")
        register_volumes(fixed, moving, small, None, options=RegisterOptions(**OPTIONS))


def test_results_are_written_in_the_fixed_files_orientation(tmp_path):
    fixed, moving, _, _ = _pair()
    # Store the fixed image as LPS: flip axes 0 and 1 of the array and of the affine.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    path = tmp_path / "fixed_lps.nii.gz"
    nib.save(nib.Nifti1Image(fixed.data[::-1, ::-1].copy(), lps), str(path))
    fixed_lps = load_volume(path, kind="image")
    assert np.array_equal(fixed_lps.data, fixed.data)
    res = register_volumes(fixed_lps, moving, options=RegisterOptions(**OPTIONS))
    write_result(res, fixed_lps, tmp_path / "out")
    warped = nib.load(tmp_path / "out" / "warped.nii.gz")
    assert np.allclose(warped.affine, lps)
    assert np.allclose(warped.get_fdata()[::-1, ::-1], res.warped, atol=1e-5)
    disp = nib.load(tmp_path / "out" / "disp.nii.gz").get_fdata()
    # Canonical axis 1 (P→A) is stored flipped: its component changes sign, the array is mirrored.
    assert np.allclose(disp[::-1, ::-1, :, 1], -res.disp_native[1], atol=1e-5)
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "jacobian.nii.gz").unlink()  # one file missing: the others still block the write
    with pytest.raises(UserError, match="already exist.*warped.nii.gz"):
        write_result(res, fixed_lps, tmp_path / "out")
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()}
    assert after == {k: v for k, v in before.items() if k != "jacobian.nii.gz"}  # nothing written or touched
