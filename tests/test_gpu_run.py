"""benchmarks/gpu_run.py and benchmarks/pack_data.py: the GPU window's script proven on the CPU (dry run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_unireg.train.precision import cpu_bf16_support

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_packed_data_reads_back_like_the_nifti_source(tmp_path):
    import gpu_run
    from pack_data import pack

    from napari_unireg.train.config import load_config
    from napari_unireg.train.data import discover

    src = gpu_run.tiny_dataset(tmp_path / "src", n=3, grid=(16, 16, 16))
    res = pack(src, tmp_path / "packed", tmp_path / "src" / "synthseg_labels", grid=(16, 16, 16), preset=1,
               log=lambda m: None)
    assert (res["images"], res["labels"], res["synth_maps"]) == (3, 3, 3)
    meta = json.loads((tmp_path / "packed" / "dataset.json").read_text())
    img = nib.load(tmp_path / "src" / "imagesTr" / "DRY_0002_0000.nii.gz").get_fdata()
    lab = np.asarray(nib.load(tmp_path / "src" / "labelsTr" / "DRY_0002_0000.nii.gz").dataobj)
    seg = np.asarray(nib.load(tmp_path / "src" / "synthseg_labels" / "seg_1.nii.gz").dataobj)
    from napari_unireg.train.data import read_packed

    packed = tmp_path / "packed"
    np.testing.assert_allclose(read_packed(packed / meta["training"][1]["image"], "image"), img, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(read_packed(packed / meta["training"][1]["label"], "label"), lab)
    np.testing.assert_array_equal(read_packed(packed / "synth" / "seg_1.npz.xz", "label"), seg)  # codes kept
    # the trainer finds the same images, labels, validation pair and synthesis maps in the packed set
    cfg = load_config(None, [("data.source", str(packed / "dataset.json")), ("data.grid_shape", [16, 16, 16]),
                             ("synth.prob", 0.5), ("synth.label_maps", [str(packed / "synth")])])
    tset = discover(cfg.data, cfg.synth)
    assert len(tset.entries) == 3 and len(tset.val_pairs) == 1 and len(tset.label_maps) == 3
    assert [e.id for e in tset.entries] == ["0001", "0002", "0003"]


@pytest.mark.slow
def test_gpu_run_dry_run_writes_report_weights_and_logs(tmp_path):
    import gpu_run

    from napari_unireg.models.checkpoint import load_weights

    out = tmp_path / "out"
    assert gpu_run.main(["--dry-run", "--out", str(out), "--budget-s", "60", "--set", "loss.window=3"]) == 0
    report = json.loads((out / "report.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    checks = report["stages"]["check"]["models"]
    assert set(checks) == set(gpu_run.DP) and all(r["fp32_max_diff_vox"] == 0.0 for r in checks.values())
    timed = report["stages"]["inference"]["models"].values()
    assert all(r["fp32_s"] > 0 for r in timed)
    bf16 = [r for r in checks.values() if "bf16_max_diff_vox" in r]
    assert all(0 <= r["bf16_max_diff_vox"] < r["field_max_vox"] for r in bf16)
    if cpu_bf16_support() == "none":  # emulated bf16: checked on the first variant only, timed on none
        assert bf16 == [checks[gpu_run.DP[0]]]
        assert all(r["bf16_skipped"] == gpu_run.EMULATED["bf16"] for r in checks.values() if r not in bf16)
        assert all("bf16_s" not in r and "bf16_skipped" in r for r in timed)
    else:
        assert len(bf16) == len(checks) and all(r["bf16_s"] > 0 for r in timed)
    assert all(r["total_s"] > 0 for r in report["stages"]["train_step"].values())
    prof = report["stages"]["profile"]  # where an inverse-consistent forward pass spends its time
    assert prof["model"] == "dp-convic-c" and prof["top"] and prof["total_ms"] >= prof["top"][0]["self_ms"] > 0
    assert any(o["op"] == "aten::grid_sampler_3d" and o["calls"] > 1 for o in prof["top"])
    vfa = report["stages"]["train"]["dp-vfa"]
    assert vfa["steps"] >= 1 and {"dp-vfa.safetensors", "dp-vfa.json", "dp-vfa-log.csv"} <= set(files)
    model, card = load_weights(out / "dp-vfa", expected_name="dp-vfa")
    assert card["training"]["steps"] == vfa["steps"] and card["training"]["init"]["encoder_tensors"] > 0
    # the card's command reruns the stage: the call itself, with the time limit and data seed it chose
    cmd = card["training"]["command"]
    assert cmd.startswith(f"python benchmarks/gpu_run.py --dry-run --out {out} --budget-s 60 --set loss.window=3  "
                          "# its training of dp-vfa")
    assert f"data.seed={card['training']['config']['data']['seed']}" in cmd
    assert card["training"]["config"]["loss"]["window"] == 3  # the --set override reached the training


@pytest.mark.parametrize("bad", ["loss.nonexistent=1", "loss.window=abc", "no-equals-sign"])
def test_gpu_run_rejects_a_bad_override_before_any_work(tmp_path, capsys, bad):
    import gpu_run

    out = tmp_path / "out"
    assert gpu_run.main(["--dry-run", "--out", str(out), "--set", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set") and len(err.splitlines()) == 1
    assert not out.exists()  # nothing was started: no output folder, no report
