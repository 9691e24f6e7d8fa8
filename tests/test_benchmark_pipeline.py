"""benchmarks/pipeline.py: the per-stage measurement of the user path, the volume scaling, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import smooth_blob_volume

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import pipeline  # noqa: E402  (benchmarks/ on sys.path: an import error must fail, not skip)

# a stored LIA grid, 2 mm x 1 mm x 1.5 mm voxels: the magnification must work in any storage order
LIA = np.array([[-2.0, 0, 0, 30], [0, 0, 1.5, -20], [0, -1.0, 0, 25], [0, 0, 0, 1]])


def _save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _tiny_pair(tmp_path, shape=(32, 48, 32)):
    f = smooth_blob_volume(shape, seed=3)
    f[f < 0.35] = 0
    seg = (f > 0.55).astype(np.uint8)
    return {
        "fixed": _save(tmp_path / "f.nii.gz", f),
        "moving": _save(tmp_path / "m.nii.gz", np.roll(f, 2, axis=1)),
        "fixed_seg": _save(tmp_path / "fs.nii.gz", seg),
        "moving_seg": _save(tmp_path / "ms.nii.gz", np.roll(seg, 2, axis=1)),
    }


def test_scaled_shape_rounds_to_multiples_of_16():
    assert pipeline.scaled_shape(1.0) == (160, 224, 192)
    assert pipeline.scaled_shape(0.5) == (80, 112, 96)
    assert pipeline.scaled_shape(1.5) == (240, 336, 288)
    assert pipeline.scaled_shape(0.2) == (32, 48, 32)  # 32, 44.8, 38.4 → nearest multiples of 16
    assert pipeline.scaled_shape(0.01) == (16, 16, 16)  # never below one multiple
    assert pipeline.scaled_shape(0.75, multiple=8) == (120, 168, 144)
    with pytest.raises(ValueError, match="scale"):
        pipeline.scaled_shape(0)


def test_magnify_keeps_spacing_and_scales_about_the_common_centre(tmp_path):
    """A labelled block ends up at p + s·(w − p) in world coordinates, s³ times as many voxels, same spacing."""
    data = np.zeros((20, 16, 12), np.uint8)
    data[4:6, 10:12, 2:4] = 7
    src = _save(tmp_path / "lab.nii.gz", data, LIA)
    p = np.array([3.0, -1.0, 2.0])
    out = pipeline.magnify_nifti(src, tmp_path / "big.nii.gz", 2.0, p, label=True)
    img = nib.load(str(out))
    big = np.asanyarray(img.dataobj)
    assert big.shape == (40, 32, 24) and big.dtype == np.uint8
    np.testing.assert_allclose(np.abs(img.affine[:3, :3]), np.abs(LIA[:3, :3]))  # spacing and axes unchanged
    assert np.count_nonzero(big == 7) == 8 * np.count_nonzero(data == 7)

    def centroid_world(arr, aff):
        c = np.argwhere(arr == 7).mean(0)
        return aff[:3, :3] @ c + aff[:3, 3]

    w = centroid_world(data, LIA)
    np.testing.assert_allclose(centroid_world(big, img.affine), p + 2.0 * (w - p), atol=1e-6)


def test_prepare_inputs_at_1x_uses_the_files_and_otherwise_the_grid_shape(tmp_path):
    files = _tiny_pair(tmp_path, shape=(16, 24, 16))
    assert pipeline.prepare_inputs(files, 1.0, tmp_path / "s1") == files
    scaled = pipeline.prepare_inputs(dict(files, moving_seg=None), 2.0, tmp_path / "s2", grid_shape=(32, 48, 32))
    assert scaled["moving_seg"] is None
    for role in ("fixed", "moving", "fixed_seg"):
        assert nib.load(scaled[role]).shape == (32, 48, 32)
    assert np.asanyarray(nib.load(scaled["fixed_seg"]).dataobj).dtype == np.uint8


@pytest.mark.slow  # a child process with fresh imports and a registration (~13 s on 2 loaded cores)
def test_child_measures_every_stage_of_the_user_path(tmp_path):
    """In-process run on a 32×48×32 pair: an untrained variant (random heads), pre-alignment and refinement."""
    from napari_unireg.pipeline import register as engine

    loader = engine.load_model
    spec = {"model": "voxelmorph", "device": "cpu", "threads": 0, "scale": 0.2,
            "grid_shape": list(pipeline.scaled_shape(0.2)), "files": _tiny_pair(tmp_path), "prealign": "affine",
            "resolution": "half", "io_steps": 1, "head_std": 2e-3}
    row = pipeline.child(spec)
    assert engine.load_model is loader  # the wrapper is removed again
    assert row["stages"] == ["load", "prealign", "inference", "refinement", "metrics", "native", "write"]
    assert all(row["seconds"][s] > 0 for s in row["stages"])
    assert all(row["peak_rss_gb"][s] > 0 for s in row["stages"])
    assert row["total_seconds"] == pytest.approx(sum(row["seconds"].values()))
    assert 0 < row["load_files_seconds"] < row["seconds"]["load"]
    assert row["max_rss_gb"] >= row["peak_rss_sampled_gb"] > 0
    assert row["grid_shape"] == [32, 48, 32] and row["input_shape"] == [32, 48, 32]
    assert row["weights_trained"] is False and row["weights"] == "random (head σ=0.002)"
    assert {"prealign", "inference", "refinement", "metrics", "total"} <= set(row["engine_seconds"])
    assert row["dice"] is not None
    json.dumps(row)  # the subprocess hands it over as JSON


def _fake_row(**kw):
    stages = ["load", "prealign", "inference", "metrics", "native", "write"]
    row = {"model": "dp-vfa", "device": "cpu", "threads": 2, "scale": 0.5, "grid_shape": [80, 112, 96],
           "mvox": 0.86016, "stages": stages, "seconds": dict(zip(stages, [1.5, 2.0, 3.25, 0.5, 0.25, 1.0])),
           "total_seconds": 8.5, "total_cpu_seconds": 15.0, "import_seconds": 2.0, "load_avg_start": 3.0,
           "load_avg_end": 4.5, "weights": "trained", "weights_trained": True, "base_rss_gb": 0.4,
           "peak_rss_gb": dict(zip(stages, [0.8, 0.9, 1.25, 1.0, 1.1, 1.0])), "peak_rss_sampled_gb": 1.25,
           "max_rss_gb": 1.3}
    row.update(kw)
    return row


def test_markdown_has_one_row_per_configuration(tmp_path):
    report = {"machine": {"cpu": "Test CPU", "logical_cores": 2, "gpu": None, "versions": {"torch": "2.x"},
                          "load_avg_start": 3.0, "load_avg_end": 5.0},
              "settings": {"data": "the demo pair", "prealign": "affine", "resolution": "auto", "io_steps": 0},
              "rows": [_fake_row(),
                       _fake_row(model="dp-conv-mf", device="cuda", threads=1, weights="random (head σ=0.002)",
                                 weights_trained=False, peak_gpu_total_gb=2.5)],
              "failed": [{"model": "sitreg", "device": "cpu", "threads": 1, "scale": 1.5, "error": "MemoryError"}]}
    md = pipeline.format_markdown(report)
    assert "Test CPU, 2 logical cores, no GPU, torch 2.x; 1-min load average 3.0 at start, 5.0 at end" in md
    assert ("| model | device | thr | scale | grid | Mvox | load | prealign | inference | metrics | native | write "
            "| total | CPU s | import | load avg | weights |") in md
    ident = "| dp-vfa | cpu | 2 | 0.5× | 80×112×96 |"
    assert ident + " 0.86 | 1.50 | 2.00 | 3.25 | 0.50 | 0.25 | 1.00 | 8.50 | 15.0 " in md
    assert "| 3.0→4.5 | trained |" in md
    assert ident + " 0.40 | 0.80 | 0.90 | 1.25 | 1.00 | 1.10 | 1.00 | 1.25 | 1.30 | - |" in md
    assert "| 1.25 | 1.30 | 2.50 |" in md  # the CUDA row's peak GPU memory
    assert "| refinement |" not in md  # a stage nobody ran gets no column
    assert "Random weights (no bundled weights): dp-conv-mf" in md
    assert "FAILED sitreg cpu 1 threads 1.5×: MemoryError" in md
    js, mdp = pipeline.write_report(report, tmp_path / "sub" / "r.json")
    assert json.loads(js.read_text())["rows"][0]["model"] == "dp-vfa"
    assert mdp.read_text() == md
    assert sorted(p.name for p in js.parent.iterdir()) == ["r.json", "r.md"]  # no temporary file left
