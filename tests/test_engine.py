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


def test_grid_adapter_pads_pools_and_crops_with_exact_geometry():
    """A network that predicts a constant shift c on whatever grid it gets: at half resolution the field is 2c on
    the input grid (pooled voxels are twice as large), whatever padding the network's multiple needs."""
    import torch

    from napari_unireg.models.adapter import GridAdapter
    from napari_unireg.models.output import RegistrationOutput

    seen = []

    class Shift(torch.nn.Module):
        grid_multiple = 16

        def forward(self, moving, fixed):
            seen.append(tuple(fixed.shape[2:]))
            disp = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, *fixed.shape[2:])
            return RegistrationOutput(disp=disp.clone(), inverse=-disp.clone())

    x = torch.rand(1, 1, 36, 40, 34)
    for resolution, factor in (("full", 1), ("half", 2)):
        disp, inverse = GridAdapter(Shift(), resolution)(x, x)
        assert seen[-1] == (48, 48, 48) if factor == 1 else seen[-1] == (32, 32, 32)
        assert disp.shape == inverse.shape == (1, 3, 36, 40, 34)
        expected = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1) * factor
        torch.testing.assert_close(disp, expected.expand_as(disp), rtol=0, atol=1e-5)
        torch.testing.assert_close(inverse, -expected.expand_as(disp), rtol=0, atol=1e-5)


def test_a_model_is_loaded_once_per_device_and_again_when_its_file_changes(tmp_path):
    import os

    from napari_unireg.models.catalog import build_model
    from napari_unireg.models.checkpoint import save_weights
    from napari_unireg.pipeline.models import clear_model_cache, load_model

    clear_model_cache()
    net = build_model("voxelmorph", enc_features=(4, 4, 4, 4), dec_features=(4, 4, 4, 4, 4, 4, 4))
    path = tmp_path / "tiny.safetensors"
    save_weights(net, path, card={"resolution": "full"})
    first = load_model("default", str(path), "cpu")
    assert load_model("default", str(path), "cpu") is first  # cached: same object, no second load
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    assert load_model("default", str(path), "cpu") is not first
    clear_model_cache()


def test_the_pipeline_adds_nothing_to_a_zero_field(monkeypatch):
    """Self-registration through every stage with a network that predicts 0 (issue 15 #8): anisotropic voxels
    (model grid resampling), half resolution (pooling, padding), normalisation, back to the native grid: the
    written field must be 0 and the warped image the moving image, so any field a real network gives on a pair
    of identical images is the network's own."""
    import torch

    from napari_unireg.models.output import RegistrationOutput
    from napari_unireg.pipeline import register as reg
    from napari_unireg.pipeline.models import LoadedModel

    class Zero(torch.nn.Module):
        grid_multiple = 16

        def forward(self, moving, fixed):
            return RegistrationOutput(disp=torch.zeros(1, 3, *fixed.shape[2:]))

    monkeypatch.setattr(reg, "load_model", lambda *a: LoadedModel("zero", Zero(), {"resolution": "half"}, True))
    data = smooth_blob_volume((30, 26, 28), seed=5)
    data[data < 0.3] = 0
    vol = volume_from_array(data * 1000, np.diag([1.5, 1.7, 1.2, 1.0]), kind="image", name="self")
    res = register_volumes(vol, vol, options=RegisterOptions(prealign="none", grid_shape=(48, 48, 48)))
    assert np.abs(res.disp_native).max() == 0 and np.abs(res.disp_model).max() == 0
    np.testing.assert_allclose(res.warped, vol.data, rtol=1e-6, atol=1e-3)
    assert res.metrics["sdlogj"] == 0 and res.metrics["ndv"] == 0


def test_on_fields_gets_the_layers_before_the_scores():
    """A front end gets the fields before the metrics; the returned result holds the same arrays plus the scores."""
    fixed, moving, fseg, mseg = _pair()
    early = []
    res = register_volumes(fixed, moving, fseg, mseg, options=RegisterOptions(**OPTIONS), on_fields=early.append)
    assert len(early) == 1 and "dice" not in early[0].metrics and early[0].metrics["model"] == "classical"
    np.testing.assert_array_equal(early[0].disp_native, res.disp_native)
    assert early[0].warped is res.warped and "dice" in res.metrics and "shown" in res.metrics["seconds"]


def test_prealign_is_remembered_for_the_same_pair_only(monkeypatch):
    import napari_unireg.core.prealign as prealign_mod
    from napari_unireg.pipeline import stages

    fixed, moving, _, _ = _pair()
    calls = []
    real = prealign_mod.affine_prealign

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(prealign_mod, "affine_prealign", counting)
    monkeypatch.setattr(stages, "_PREALIGN_MEMO", type(stages._PREALIGN_MEMO)())
    inputs = stages.Inputs(fixed, moving, None, None)
    first = stages.prealign(inputs, "affine", lambda f: None)
    again = stages.prealign(inputs, "affine", lambda f: None)
    assert len(calls) == 1 and np.array_equal(first, again) and again is not first
    changed = volume_from_array(moving.data.copy(), np.eye(4), kind="image", name="moving")
    changed.data[5, 5, 5] += 0.5  # one voxel differs: a new search
    stages.prealign(stages.Inputs(fixed, changed, None, None), "affine", lambda f: None)
    assert len(calls) == 2


def test_warm_up_leaves_the_network_loaded():
    from napari_unireg.pipeline import warm_up
    from napari_unireg.pipeline.models import _CACHE, clear_model_cache, load_model

    clear_model_cache()
    warm_up(RegisterOptions(model="dp-vfa", device="cpu", grid_shape=(32, 32, 32), prealign="none"))
    assert len(_CACHE) == 1
    cached = next(iter(_CACHE.values()))
    assert load_model("dp-vfa", None, "cpu") is cached


def test_warm_up_with_the_pair_leaves_its_prealignment_for_the_run(monkeypatch):
    """warm_up(options, fixed, moving) finds the pair's pre-alignment ahead; the Run that follows does not search
    again and gets the same field as a cold run."""
    import napari_unireg.core.prealign as prealign_mod
    from napari_unireg.pipeline import stages, warm_up

    fixed, moving, _, _ = _pair()
    calls = []
    real = prealign_mod.affine_prealign
    monkeypatch.setattr(prealign_mod, "affine_prealign", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(stages, "_PREALIGN_MEMO", type(stages._PREALIGN_MEMO)())
    options = RegisterOptions(**{**OPTIONS, "prealign": "affine"})
    warm_up(options, fixed, moving)
    assert len(calls) == 1
    warm = register_volumes(fixed, moving, options=options)
    assert len(calls) == 1  # remembered
    monkeypatch.setattr(stages, "_PREALIGN_MEMO", type(stages._PREALIGN_MEMO)())
    cold = register_volumes(fixed, moving, options=options)
    assert len(calls) == 2
    np.testing.assert_array_equal(warm.prealign_matrix, cold.prealign_matrix)
    np.testing.assert_allclose(warm.disp_native, cold.disp_native, atol=1e-5)
