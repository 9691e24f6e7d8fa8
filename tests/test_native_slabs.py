"""The native-grid stage streams the fixed grid in slabs along axis 0: every voxel must come out exactly as when the
whole grid is computed at once (the slab size is a memory knob, never a numerical one)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from napari_unireg.core.resample import sample_separable
from napari_unireg.io import volume_from_array
from napari_unireg.pipeline import stages


def _inputs():
    rng = np.random.default_rng(3)
    fixed_aff = np.diag([0.7, 0.7, 0.7, 1.0])  # not 1 mm: the model grid is resampled (non-identity mapping)
    fixed_aff[:3, 3] = (-9.0, -8.0, -7.0)
    img = gaussian_filter(rng.random((30, 26, 22)), 2).astype(np.float32)
    fixed = volume_from_array(img, fixed_aff, kind="image", name="fixed")
    mov_aff = np.eye(4)
    mov_aff[:3, 3] = (-10.0, -9.0, -8.0)
    moving = volume_from_array(gaussian_filter(rng.random((21, 19, 17)), 2).astype(np.float32), mov_aff,
                               kind="image", name="moving")
    seg = volume_from_array(rng.integers(0, 5, (21, 19, 17)).astype(np.int16), mov_aff, kind="label", name="seg")
    return stages.Inputs(fixed, moving, None, seg)


def test_native_grid_in_slabs_equals_one_pass(monkeypatch):
    inputs = _inputs()
    c, s = np.cos(0.1), np.sin(0.1)
    matrix = np.array([[c, -s, 0, 0.5], [s, c, 0, -0.3], [0, 0, 1, 0.2], [0, 0, 0, 1.0]])
    grid = stages.model_grid(inputs, matrix, (16, 16, 16))
    assert not grid.mapping.is_identity
    rng = np.random.default_rng(4)
    disp = np.stack([gaussian_filter(rng.standard_normal((16, 16, 16)), 2) * 3 for _ in range(3)]).astype(np.float32)

    monkeypatch.setattr(stages, "NATIVE_SLAB_VOXELS", 10**9)
    whole = stages.native_grid(grid, disp, None, inputs)
    monkeypatch.setattr(stages, "NATIVE_SLAB_VOXELS", 26 * 22 * 4)  # slabs of 4 rows, the last one shorter
    assert len(stages.native_slabs(inputs.fixed.shape)) == 8
    slabbed = stages.native_grid(grid, disp, None, inputs)
    for name in ("disp", "warped", "warped_seg", "jacobian"):
        a, b = getattr(whole, name), getattr(slabbed, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert slabbed.warped_seg.dtype == np.int16
    # the slabbed field is the mapping's own field (pre-alignment identity): rows of field_to_native, bitwise
    v = grid.mapping.field_to_native(disp)
    rows = np.concatenate([stages._field_rows(grid.mapping, disp, r) for r in stages.native_slabs(v.shape[1:])], 1)
    assert np.array_equal(v, rows)


def test_sample_separable_rows_are_rows_of_the_whole_output():
    rng = np.random.default_rng(5)
    a = rng.random((12, 9, 7)).astype(np.float32)
    scale, offset, shape = (0.6, 1.3, 1.0), (0.4, -1.0, 0.0), (19, 8, 7)
    whole = sample_separable(a, scale, offset, shape, order=1, outside="border")
    for rows in ((0, 5), (5, 6), (6, 19)):
        part = sample_separable(a, scale, offset, shape, order=1, outside="border", rows=rows)
        assert np.array_equal(part, whole[rows[0]:rows[1]])


def test_memory_estimate_is_stated_and_refused_when_too_large():
    import pytest

    from napari_unireg.errors import UserError

    small, big = (160, 224, 192), (320, 448, 384)
    assert stages.estimate_peak_bytes(big) > 4 * stages.estimate_peak_bytes(small) / 2  # grows with the voxels
    line = stages.check_memory(small, available=64 * 2**30)
    assert "GB needed" in line and "160×224×192" in line
    with pytest.raises(UserError, match="not enough memory.*320×448×384"):
        stages.check_memory(big, available=1 * 2**30)
    # the kernel's own figure is read (Linux): a positive number of bytes
    have = stages.available_memory_bytes()
    assert have is None or have > 0


def test_memory_estimate_counts_the_network_at_the_resolution_its_card_says(tmp_path):
    """A 1 mm dp-vfa needs ~2.3 GB more than the image terms (peak RSS 3.4 GB measured in session 19, against 1.2 GB
    for the image terms); the refusal then offers the 2 mm network. The resolution comes from the card alone."""
    import json

    import pytest

    from napari_unireg.errors import UserError
    from napari_unireg.models.registry import bundled_card
    from napari_unireg.pipeline.models import network_plan

    shape = (160, 224, 192)
    bare = stages.estimate_peak_bytes(shape)
    full = stages.estimate_peak_bytes(shape, network=("dp-vfa", "full"))
    assert full - bare > 2 * 2**30 and stages.estimate_peak_bytes(shape, network=("dp-vfa", "half")) == bare
    # an unmeasured pair takes the largest value of its resolution: an upper estimate
    assert stages.network_extra_bytes(("dp-conv-c", "full")) == int(max(
        v for (_, r), v in stages.NETWORK_EXTRA_BYTES.items() if r == "full"))
    with pytest.raises(UserError, match=r"not enough memory.*--resolution half"):
        stages.check_memory(shape, available=(bare + full) // 2, network=("dp-vfa", "full"))
    assert "GB needed" in stages.check_memory(shape, available=(bare + full) // 2, network=("dp-vfa", "half"))

    card = bundled_card("dp-conv-c")
    if card is not None:  # one bundled weight file: auto is its card's resolution, an explicit one wins
        assert network_plan("dp-conv-c", None, "auto") == ("dp-conv-c", card["resolution"])
    assert network_plan("dp-conv-c", None, "full") == ("dp-conv-c", "full")
    assert network_plan("dp-vfa", None, "half") == ("dp-vfa", "half")
    assert network_plan("classical", None, "auto") is None
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"")
    (tmp_path / "mine.json").write_text(json.dumps({"name": "dp-convic-c", "resolution": "full"}))
    assert network_plan("default", str(ckpt), "auto") == ("dp-convic-c", "full")
