"""Brain extraction: the already-extracted detector, the stage's decisions and masks, the error cases, deepbet.

Synthetic phantoms are tiny grids with large voxels (6 mm) so that they have real-world sizes in ml and mm: a
brain ellipsoid inside a dark skull and a bright scalp, with noise around the head. deepbet is replaced by the
phantom's true brain where running it would be slow; one data-marked test runs it on the ICBM 2009c head.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_unireg.pipeline import skullstrip
from napari_unireg.errors import UserError
from napari_unireg.io import volume_from_array
from napari_unireg.pipeline.skullstrip import (
    MISSING_MESSAGE,
    apply_skull_strip,
    extract_brain,
    looks_brain_extracted,
    skull_strip_stage,
    warp_with_field,
)

VOXEL_MM = 6.0
SHAPE = (32, 40, 36)  # 192×240×216 mm


def _ellipsoid(semi_axes_mm, shape=SHAPE, voxel=VOXEL_MM) -> np.ndarray:
    c = (np.array(shape) - 1) / 2
    g = np.indices(shape, dtype=np.float64)
    r2 = sum(((g[i] - c[i]) * voxel / semi_axes_mm[i]) ** 2 for i in range(3))
    return r2 <= 1.0


BRAIN = _ellipsoid((70, 85, 60))  # ~1.5 l
SKULL = _ellipsoid((80, 97, 75))
SCALP = _ellipsoid((90, 110, 95))  # ~3.9 l
AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])


def _tissue(seed=0) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (0.6 + 0.3 * r.random(SHAPE)).astype(np.float32)


def phantom_head(noise: bool = True, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Brain (0.6-0.9) in a dark skull (0.05) in a bright scalp (0.8), noise (|N(0, 0.02)|) or zeros around.

    ``scale`` shrinks the skull and scalp (not the brain) about the centre."""
    r = np.random.default_rng(seed + 1)
    x = np.abs(r.normal(0, 0.02, SHAPE)).astype(np.float32) if noise else np.zeros(SHAPE, np.float32)
    x[SCALP if scale == 1 else _ellipsoid(scale * np.array([90, 110, 95]))] = 0.8
    x[SKULL if scale == 1 else _ellipsoid(scale * np.array([80, 97, 75]))] = 0.05
    x[BRAIN] = _tissue(seed)[BRAIN]
    return x


def phantom_brain(seed: int = 0) -> np.ndarray:
    return np.where(BRAIN, _tissue(seed), 0).astype(np.float32)


def vol(data, name="img"):
    return volume_from_array(data, AFFINE, kind="image", name=name)


@pytest.fixture
def fake_deepbet(monkeypatch):
    """deepbet replaced by a function returning ``masks[name]`` or the phantom's brain; records its calls."""
    calls = []
    state = {"mask": None}

    def run(data, affine, device):
        calls.append((data.shape, str(device)))
        return BRAIN.copy() if state["mask"] is None else state["mask"].copy()

    monkeypatch.setattr(skullstrip, "_run_deepbet", run)
    state["calls"] = calls
    return state


# --------------------------------------------------------------------------------------------- detector


def test_detector_on_synthetic_heads_and_brains():
    done, reason = looks_brain_extracted(phantom_head(noise=True), AFFINE)
    assert not done and "head-sized" in reason
    done, reason = looks_brain_extracted(phantom_head(noise=False), AFFINE)  # zeroed background, head-sized
    assert not done and "head-sized" in reason
    done, reason = looks_brain_extracted(phantom_head(noise=True, scale=0.9), AFFINE)  # a small head (2.9 l)
    assert not done and "surroundings" in reason
    done, reason = looks_brain_extracted(phantom_brain(), AFFINE)
    assert done and "brain-sized" in reason
    noisy_brain = phantom_brain() + np.abs(np.random.default_rng(3).normal(0, 0.03, SHAPE)).astype(np.float32)
    done, reason = looks_brain_extracted(noisy_brain, AFFINE)
    assert not done and "surroundings" in reason
    done, reason = looks_brain_extracted(np.random.default_rng(4).random(SHAPE) + 0.5, AFFINE)
    assert not done and "no background" in reason


def test_detector_sees_skull_left_around_a_brain():
    # A bad extraction: brain on a zero background, but a detached rim of scalp 12-18 mm outside it.
    rim = _ellipsoid((88, 103, 78)) & ~_ellipsoid((82, 97, 72))
    x = phantom_brain()
    x[rim] = 0.8
    done, reason = looks_brain_extracted(x, AFFINE)
    assert not done and "surroundings" in reason


def test_detector_uses_millimetres_not_voxels():
    # The same brain array with 2 mm voxels is a 1/27 as large object: still brain-sized (not a head) ...
    assert looks_brain_extracted(phantom_brain(), np.diag([2.0, 2.0, 2.0, 1]))[0]
    # ... and the zero-background head with 9 mm voxels is far above the brain limit.
    done, reason = looks_brain_extracted(phantom_head(noise=False), np.diag([9.0, 9.0, 9.0, 1]))
    assert not done and "head-sized" in reason


@pytest.mark.data
@pytest.mark.slow
def test_detector_on_real_files(shared_data):
    from scipy import ndimage

    from napari_unireg.io import load_volume

    t = shared_data / "templates"
    head = load_volume(t / "icbm2009c_sym_t1.nii.gz", kind="image")
    done, reason = looks_brain_extracted(head.data, head.affine)
    assert not done, reason
    # The same head with its background zeroed (values under 5 % of the maximum): still a head, by its size.
    zeroed = np.where(head.data > 0.05 * head.data.max(), head.data, 0)
    done, reason = looks_brain_extracted(zeroed, head.affine)
    assert not done and "head-sized" in reason
    raw = np.round(head.data * 40).astype(np.int16) - 1024  # scanner-like int16 with an offset
    assert not looks_brain_extracted(raw, head.affine)[0]
    bet = load_volume(t / "icbm2009c_sym_t1bet.nii.gz", kind="image")
    # A brain resampled with cubic splines (ANTs/FSL style) rings around its edge: still brain-extracted.
    ringing = ndimage.shift(bet.data, (0.4, 0.3, 0.6), order=3)
    assert ringing.min() < 0 and np.count_nonzero(ringing == 0) < 0.2 * ringing.size  # really no exact zeros
    done, reason = looks_brain_extracted(ringing, bet.affine)
    assert done, reason
    stripped = [t / "icbm2009c_sym_t1bet.nii.gz", t / "mni152_2009a_sym_brain_box.nii.gz"]
    stripped += sorted((shared_data / "native").glob("*_brain.nii.gz"))[:3]  # FreeSurfer brainmask, LIA, uint8
    stripped += sorted((shared_data / "imagesTr").glob("*.nii.gz"))  # MNI-scaled brains up to 2.45 l
    for path in stripped:
        v = load_volume(path, kind="image")
        done, reason = looks_brain_extracted(v.data, v.affine)
        assert done, f"{path.name}: {reason}"


# --------------------------------------------------------------------------------------------- intensities


def test_apply_skull_strip_scales_raw_int16_inside_the_mask():
    r = np.random.default_rng(0)
    raw = np.full(SHAPE, -1024, np.int16)  # scanner background offset
    raw[SCALP] = 3000  # bright fat: outside the mask, must not set the scale
    raw[BRAIN] = r.integers(400, 1200, size=int(BRAIN.sum()))
    idx = np.argwhere(BRAIN)[:3]
    raw[tuple(idx.T)] = 30000  # a few bright outliers inside the brain
    out = apply_skull_strip(raw, BRAIN.astype(np.uint8))
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert np.all(out[~BRAIN] == 0)
    p = np.percentile(raw[BRAIN].astype(np.float64), 99.5)  # independent: the protocol's scale, brain only
    np.testing.assert_allclose(out[BRAIN], np.clip(raw[BRAIN], 0, p) / p, rtol=1e-5)
    assert out.max() == pytest.approx(1.0) and out[tuple(idx.T)].tolist() == [1.0, 1.0, 1.0]


def test_apply_skull_strip_rejects_bad_masks():
    with pytest.raises(UserError, match="empty"):
        apply_skull_strip(phantom_head(), np.zeros(SHAPE, np.uint8))
    with pytest.raises(UserError, match="does not match"):
        apply_skull_strip(phantom_head(), np.ones((4, 4, 4), np.uint8))


# --------------------------------------------------------------------------------------------- stage


def test_stage_auto_extracts_the_head_and_keeps_the_brain(fake_deepbet):
    head_data, brain_data = phantom_head(), phantom_brain(seed=5)
    fixed, moving = vol(head_data, "head"), vol(brain_data, "brain")
    res = skull_strip_stage(fixed, moving, "auto", "cpu")
    import re

    assert res.messages[0].startswith("fixed: skull found (foreground of ") and "head-sized" in res.messages[0]
    head_ml = float(re.search(r"foreground of (\d+) ml", res.messages[0]).group(1))
    assert head_ml == pytest.approx(4 / 3 * np.pi * 90 * 110 * 95 / 1000, rel=0.03)  # the scalp ellipsoid
    assert res.messages[0].endswith(f"→ brain extracted ({BRAIN.sum() * VOXEL_MM**3 / 1000:.0f} ml)")
    assert res.messages[1].startswith("moving: already brain-extracted (brain-sized")
    assert len(fake_deepbet["calls"]) == 1  # deepbet ran on the head only
    assert res.fixed_mask.is_label and res.fixed_mask.data.dtype == np.uint8
    np.testing.assert_array_equal(res.fixed_mask.data, BRAIN)
    np.testing.assert_array_equal(res.fixed_mask.affine, fixed.affine)
    assert np.all(res.fixed.data[~BRAIN] == 0) and res.fixed.data.max() == pytest.approx(1.0)
    # scaled brain: the head's brain voxels divided by their own 99.5th percentile (scalp excluded)
    p = np.percentile(head_data[BRAIN], 99.5)
    np.testing.assert_allclose(res.fixed.data[BRAIN], np.minimum(head_data[BRAIN], p) / p, rtol=1e-5)
    assert res.moving is moving and res.moving_mask is None
    np.testing.assert_array_equal(fixed.data, head_data)  # inputs untouched
    fixed_out, moving_out, fixed_mask, moving_mask, messages = res  # also a plain 5-tuple
    assert fixed_out is res.fixed and messages is res.messages


def test_stage_off_changes_nothing(fake_deepbet):
    fixed, moving = vol(phantom_head()), vol(phantom_head(seed=2))
    res = skull_strip_stage(fixed, moving, "off")
    assert res.fixed is fixed and res.moving is moving and res.fixed_mask is None and res.moving_mask is None
    assert res.messages == ["fixed: skull stripping off", "moving: skull stripping off"]
    assert fake_deepbet["calls"] == []


def test_stage_on_forced_on_a_stripped_image_works_and_says_so(fake_deepbet):
    fixed, moving = vol(phantom_brain()), vol(phantom_head(seed=1))
    res = skull_strip_stage(fixed, moving, "on")
    assert "already brain-extracted" in res.messages[0] and "extracted again as asked" in res.messages[0]
    assert "100 % of the foreground" in res.messages[0]  # the fake mask is the whole brain
    assert res.messages[1].startswith("moving: skull found")
    np.testing.assert_array_equal(res.fixed_mask.data, BRAIN)
    np.testing.assert_array_equal(res.moving_mask.data, BRAIN)


def test_stage_rejects_unknown_mode():
    with pytest.raises(UserError, match="auto, on, off"):
        skull_strip_stage(vol(phantom_head()), vol(phantom_brain()), "yes")


# --------------------------------------------------------------------------------------------- errors


def test_no_brain_found_names_the_image(fake_deepbet):
    small = np.zeros(SHAPE, bool)
    small[14:17, 18:21, 16:19] = True  # 27 voxels × 216 mm³ = 5.8 ml
    fake_deepbet["mask"] = small
    with pytest.raises(UserError, match=r"fixed image 'head': no brain found .*6 ml") as exc:
        skull_strip_stage(vol(phantom_head(), "head"), vol(phantom_brain()), "auto")
    assert "\n" not in str(exc.value)


def test_mask_covering_the_whole_head_is_refused(fake_deepbet):
    from scipy import ndimage

    fake_deepbet["mask"] = ndimage.binary_dilation(SCALP, iterations=1)  # the head and then some
    with pytest.raises(UserError, match=r"moving image 'scan': brain extraction failed .* ml: it covers the head"):
        skull_strip_stage(vol(phantom_brain()), vol(phantom_head(), "scan"), "auto")
    # Under the absolute limit but nearly all of a (smaller) head: the coverage rule.
    fake_deepbet["mask"] = _ellipsoid((80, 97, 83))  # 2.7 l: 94 % of a 2.9 l head
    with pytest.raises(UserError, match=r"small head: brain extraction failed \(the mask covers 9\d % of the head"):
        extract_brain(phantom_head(scale=0.9), AFFINE, name="small head")


def test_missing_deepbet_is_one_clear_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepbet", None)  # import deepbet -> ImportError
    skullstrip._extractor.cache_clear()
    try:
        with pytest.raises(UserError) as exc:
            extract_brain(phantom_head(), AFFINE, name="fixed image 'head'")
        assert str(exc.value) == f"fixed image 'head': {MISSING_MESSAGE}"
    finally:
        skullstrip._extractor.cache_clear()


def test_unavailable_cuda_is_a_user_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="not available"):
        extract_brain(phantom_head(), AFFINE, device="cuda")


# --------------------------------------------------------------------------------------------- full head


def test_warp_with_field_pulls_through_world_coordinates():
    # Moving on its own grid, shifted by 2 voxels along x in the world; field = +1 voxel along y everywhere.
    fixed = vol(phantom_head())
    shifted = AFFINE.copy()
    shifted[0, 3] = 2 * VOXEL_MM
    moving = volume_from_array(phantom_brain(), shifted, kind="image")
    d = np.zeros((3, *SHAPE), np.float32)
    d[1] = 1.0
    out = warp_with_field(moving, fixed, d)
    # fixed voxel (i, j, k) + (0, 1, 0) -> world x = 6i -> moving voxel (i - 2, j + 1, k)
    np.testing.assert_allclose(out[2:, :-1, :], moving.data[:-2, 1:, :], atol=1e-6)
    assert np.all(out[:2] == 0) and np.all(out[:, -1] == 0)


@pytest.mark.slow
def test_warp_with_field_reproduces_the_engines_warped_image():
    """The full head pulled through a run's ``disp_native`` (pre-alignment folded in) lands like the brain did."""
    from napari_unireg.pipeline import RegisterOptions, register_volumes

    from scipy import ndimage

    one_mm = np.eye(4)  # the engine works at 1 mm: keep the phantom's voxels small so the run stays tiny
    fixed = volume_from_array(phantom_brain(), one_mm, kind="image", name="fixed")
    shifted = one_mm.copy()
    shifted[:3, 3] = [1.5, -2.0, 1.0]  # the moving image on its own grid, offset in the world
    moving_head = volume_from_array(phantom_head(seed=2), shifted, kind="image", name="head")
    moving = moving_head.with_data(np.where(BRAIN, moving_head.data, 0))
    res = register_volumes(fixed, moving, options=RegisterOptions(model="classical", prealign="affine",
                                                                   grid_shape=(32, 48, 48), device="cpu"))
    np.testing.assert_allclose(warp_with_field(moving, fixed, res.disp_native), res.warped, atol=1e-5)
    head = warp_with_field(moving_head, fixed, res.disp_native)
    # Where all 8 interpolation corners are brain (moving brain eroded by one voxel, pulled nearest), the head
    # and the brain give the same values; elsewhere the head brings its skull and scalp along.
    core = moving.with_data(ndimage.binary_erosion(BRAIN, np.ones((3, 3, 3))).astype(np.uint8), is_label=True)
    inside = warp_with_field(core, fixed, res.disp_native, order=0) > 0
    assert inside.sum() > 1000
    np.testing.assert_allclose(head[inside], res.warped[inside], atol=1e-5)
    inside = res.warped > 0
    assert head[~inside].max() > 0.5  # ... and the scalp around it


# --------------------------------------------------------------------------------------------- real deepbet


@pytest.mark.slow
def test_deepbet_on_a_volume_without_a_head_says_no_brain():
    pytest.importorskip("deepbet")
    cube = np.pad(np.ones((4, 4, 4), np.float32), 30)  # a 12 mm cube in a 200 mm field of view
    with pytest.raises(UserError, match=r"^cube: no brain found \(deepbet"):
        extract_brain(cube, np.diag([3.0, 3.0, 3.0, 1.0]), name="cube")


@pytest.mark.data
@pytest.mark.slow
def test_deepbet_on_the_icbm_head_matches_the_template_mask(shared_data):
    pytest.importorskip("deepbet")
    import torch

    from napari_unireg.io import load_volume

    torch.set_num_threads(1)
    t = shared_data / "templates"
    head = load_volume(t / "icbm2009c_sym_t1.nii.gz", kind="image")
    ref = load_volume(t / "icbm2009c_sym_mask.nii.gz", kind="label").data > 0
    mask = extract_brain(head.data, head.affine, device="cpu", name="icbm head")
    assert mask.dtype == np.uint8 and mask.shape == head.shape
    m = mask > 0
    dice = 2 * np.count_nonzero(m & ref) / (np.count_nonzero(m) + np.count_nonzero(ref))
    assert dice >= 0.9, dice


# ------------------------------------------------------------------------------------ the CLI on a raw head
@pytest.mark.slow
def test_register_a_raw_head_to_a_brain_extracts_only_the_head(shared_data, tmp_path, capsys):
    """`unireg register` with the default --skull-strip auto: the ICBM head (with skull) onto a brain-extracted
    subject. auto must extract the moving head only, say so, register the brains and also write the full head
    through the same field; read back with nibabel."""
    import nibabel as nib

    from napari_unireg.cli import main

    pytest.importorskip("deepbet")
    head = shared_data / "templates" / "icbm2009c_sym_t1.nii.gz"
    brain = shared_data / "native" / "UNIREG_0001_brain.nii.gz"
    out = tmp_path / "out"
    rc = main(["register", str(brain), str(head), "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "fixed: already brain-extracted" in err and "moving: skull found" in err, err
    assert not (out / "brain_mask_fixed.nii.gz").exists()  # nothing was extracted from the fixed brain
    warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    warped_head = np.asarray(nib.load(out / "warped_head.nii.gz").dataobj)
    fixed = np.asarray(nib.load(brain).dataobj)
    assert warped.shape == warped_head.shape == fixed.shape
    outside = fixed == 0  # outside the fixed brain: the head keeps its scalp, the extracted brain is (nearly) empty
    assert np.count_nonzero(warped_head[outside] > 0.05 * warped_head.max()) > 5 * np.count_nonzero(
        warped[outside] > 0.05 * warped.max())
    inside = ~outside
    assert np.corrcoef(warped[inside], fixed[inside])[0, 1] > 0.6  # the brains were registered onto each other
