"""Cohorts: ``unireg register --pairs`` (CSV, Learn2Reg dataset.json, template + folder), summary.csv, resume after
a kill, failing pairs, bad lists, and the static split under torchrun. Tiny 32³ volumes, the bundled dp-vfa (fast and
deterministic) on a 32³ model grid."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_unireg.cli import main

from conftest import smooth_blob_volume

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--model", "dp-vfa", "--grid", "32", "32", "32", "--prealign", "none", "--skull-strip", "off"]
N_IMAGES = 6


def _save(path: Path, data) -> str:
    affine = np.eye(4)
    affine[:3, 3] = -16.0
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _make_images(folder: Path, n: int = N_IMAGES) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "seg").mkdir(exist_ok=True)
    for k in range(n):
        v = smooth_blob_volume((32, 32, 32), seed=k)
        v[v < 0.3] = 0
        seg = (v > 0.55).astype(np.uint8) + (v > 0.7).astype(np.uint8)
        _save(folder / "img" / f"s{k:02d}.nii.gz", v)
        _save(folder / "seg" / f"s{k:02d}.nii.gz", seg)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(N_IMAGES) for j in range(N_IMAGES) if i != j][:n]


def _write_csv(folder: Path, n: int, header: bool = True, name: str = "pairs.csv") -> Path:
    rows = ["fixed,moving,fixed_seg,moving_seg"] if header else []
    rows += [f"img/s{i:02d}.nii.gz,img/s{j:02d}.nii.gz,seg/s{i:02d}.nii.gz,seg/s{j:02d}.nii.gz" for i, j in _pairs(n)]
    path = folder / name
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def cohort(tmp_path):
    _make_images(tmp_path)
    return tmp_path


def _summary(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UNIREG_TEST_PAUSE_AT", None)
    return env


# --------------------------------------------------------------------------------------------- the lists
def test_csv_list_paths_relative_to_its_folder_header_optional(cohort):
    from napari_unireg.pipeline.batch import read_pairs

    with_header = read_pairs(_write_csv(cohort, 3))
    without = read_pairs(_write_csv(cohort, 3, header=False, name="plain.csv"))
    assert [replace(p, where="") for p in with_header] == [replace(p, where="") for p in without]
    assert with_header[0].where == "pairs.csv line 2" and without[0].where == "plain.csv line 1"
    assert [p.id for p in with_header] == ["s00__s01", "s00__s02", "s00__s03"]
    assert with_header[0].fixed == str((cohort / "img" / "s00.nii.gz").resolve())
    assert with_header[2].moving_seg == str((cohort / "seg" / "s03.nii.gz").resolve())


def test_csv_header_names_the_columns(cohort):
    from napari_unireg.pipeline.batch import read_pairs

    path = cohort / "named.csv"
    path.write_text("fixed_image,moving_image\nimg/s01.nii.gz,img/s00.nii.gz\n")
    assert read_pairs(path)[0].id == "s01__s00"
    path.write_text("fixed,moving,extra\na.nii.gz,b.nii.gz,c\n")
    with pytest.raises(Exception, match="header columns"):
        read_pairs(path)


def test_ranks_from_torchrun_environment():
    from napari_unireg.errors import UserError
    from napari_unireg.pipeline.batch import Ranks

    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job7"})
    assert (r.rank, r.world, r.local_rank, r.token) == (3, 4, 1, "job7")
    assert Ranks.from_env({}).world == 1 and Ranks.from_env({}).device("cpu") == "cpu"
    assert Ranks.from_env({"RANK": "0", "WORLD_SIZE": "2"}).token == f"ppid{os.getppid()}"  # static launch
    with pytest.raises(UserError, match="WORLD_SIZE"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_dataset_json_pair_lists_and_label_maps(tmp_path):
    """A Learn2Reg layout: ids are the subject numbers, label maps from 'training' or labelsXx/ beside imagesXx/."""
    from napari_unireg.pipeline.batch import read_pairs

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / sub).mkdir()
    for k in (1, 2, 3):
        for sub in ("imagesTr", "labelsTr"):
            (tmp_path / sub / f"TASK_{k:04d}_0000.nii.gz").write_bytes(b"")
    (tmp_path / "imagesTs" / "TASK_0010_0000.nii.gz").write_bytes(b"")
    def image(k, sub="imagesTr"):
        return f"./{sub}/TASK_{k:04d}_0000.nii.gz"

    meta = {
        "training": [{"image": image(k), "label": image(k, "labelsTr")} for k in (1, 2)],
        "registration_val": [{"fixed": image(1), "moving": image(2)}, {"fixed": image(3), "moving": image(1)}],
        "registration_test": [{"fixed": image(10, "imagesTs"), "moving": image(1)}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    every = read_pairs(tmp_path / "dataset.json")
    assert [p.id for p in every] == ["0001__0002", "0003__0001", "0010__0001"]
    assert every[0].moving_seg == str((tmp_path / "labelsTr" / "TASK_0002_0000.nii.gz").resolve())
    assert every[1].fixed_seg == str((tmp_path / "labelsTr" / "TASK_0003_0000.nii.gz").resolve())  # labelsTr guess
    assert every[2].fixed_seg is None and every[2].moving_seg is None  # no label map for the test image: none
    assert [p.id for p in read_pairs(tmp_path / "dataset.json", "test")] == ["0010__0001"]
    assert len(read_pairs(tmp_path / "dataset.json", "val")) == 2


def test_template_against_a_folder(cohort):
    from napari_unireg.pipeline.batch import pairs_from_folder

    pairs = pairs_from_folder(cohort / "img" / "s00.nii.gz", cohort / "img", cohort / "seg" / "s00.nii.gz",
                              cohort / "seg")
    assert [p.id for p in pairs] == [f"s00__s{k:02d}" for k in range(1, N_IMAGES)]  # the template itself left out
    assert all(Path(p.moving_seg).parent == (cohort / "seg").resolve() for p in pairs)


@pytest.mark.parametrize("problem, message", [
    ("missing", "pairs.csv line 4: moving: file not found"),
    ("not_nifti", "not a NIfTI file"),
    ("header", "unreadable header"),
    ("4d", "not a 3D volume"),
])
def test_bad_list_exits_2_before_any_work(cohort, capsys, problem, message):
    path = _write_csv(cohort, 5)
    lines = path.read_text().splitlines()
    bad = {"missing": "img/nope.nii.gz", "not_nifti": "pairs.csv", "header": "img/junk.nii", "4d": "img/four.nii.gz"}
    (cohort / "img" / "junk.nii").write_bytes(b"not a nifti header at all" * 20)
    _save(cohort / "img" / "four.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    cells = lines[3].split(",")
    cells[1] = bad[problem]
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    out = cohort / "out"
    rc = main(["register", "--pairs", str(path), "--out", str(out), "--quiet", *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing registered, nothing written


def test_bad_option_and_mixed_modes_exit_2(cohort, capsys):
    path = _write_csv(cohort, 2)
    assert main(["register", "--pairs", str(path), "--grid", "30", "32", "32", "--out", str(cohort / "o")]) == 2
    assert main(["register", "a.nii", "b.nii", "--pairs", str(path), "--out", str(cohort / "o")]) == 2
    assert main(["register", "--out", str(cohort / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "model grid" in err[0] and "not both" in err[1] and "--pairs" in err[2]
    assert not (cohort / "o").exists()


# --------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_fifteen_pairs_summary_equals_single_registrations(cohort, capsys):
    out = cohort / "out"
    rc = main(["register", "--pairs", str(_write_csv(cohort, 15)), "--out", str(out), "--quiet", *RUN])
    assert rc == 0, capsys.readouterr().err
    rows = _summary(out / "summary.csv")
    assert [r["pair"] for r in rows] == [f"s{i:02d}__s{j:02d}" for i, j in _pairs(15)]
    assert all(r["status"] == "ok" and (out / r["pair"] / "run.json").is_file() for r in rows)
    assert sorted(p.name for p in out.iterdir()) == sorted([r["pair"] for r in rows] + ["summary.csv"])

    i, j = _pairs(15)[7]
    single = cohort / "single"
    rc = main(["register", str(cohort / "img" / f"s{i:02d}.nii.gz"), str(cohort / "img" / f"s{j:02d}.nii.gz"),
               "--fixed-seg", str(cohort / "seg" / f"s{i:02d}.nii.gz"),
               "--moving-seg", str(cohort / "seg" / f"s{j:02d}.nii.gz"), "--out", str(single), "--quiet", *RUN])
    assert rc == 0
    row = rows[7]
    metrics = json.loads((single / "metrics.json").read_text())
    for key in ("dice_before", "dice", "hd95", "sdlogj", "ndv", "folded_pct"):
        assert float(row[key]) == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key
    batch_dir = out / row["pair"]
    for name in ("disp.nii.gz", "warped.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz"):
        np.testing.assert_allclose(nib.load(batch_dir / name).get_fdata(), nib.load(single / name).get_fdata(),
                                   atol=1e-6, err_msg=name)
    assert json.loads((batch_dir / "run.json").read_text())["moving"] == str(cohort / "img" / f"s{j:02d}.nii.gz")


@pytest.mark.slow
def test_outputs_without_metrics_and_a_failing_pair(cohort, capsys):
    path = _write_csv(cohort, 3)
    raw = (cohort / "img" / "s02.nii.gz").read_bytes()  # pair 2's moving image: header intact, data truncated
    (cohort / "img" / "s02.nii.gz").write_bytes(raw[: len(raw) // 3])
    out = cohort / "out"
    rc = main(["register", "--pairs", str(path), "--out", str(out), "--outputs", "warped,disp", *RUN])
    captured = capsys.readouterr()
    assert rc == 1
    rows = _summary(out / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "s02.nii" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[0]["dice"] == "" and float(rows[0]["seconds"]) > 0  # metrics off
    assert sorted(p.name for p in (out / "s00__s01").iterdir()) == ["disp.nii.gz", "run.json", "warped.nii.gz"]
    assert not (out / "s00__s02").exists()
    assert "[2/3] s00__s02 failed" in captured.err  # one line per pair without a terminal
    # a rerun retries only the failed pair (still failing) and keeps the others
    rc = main(["register", "--pairs", str(path), "--out", str(out), "--outputs", "warped,disp", "--quiet", *RUN])
    assert rc == 1 and "1 failed" in capsys.readouterr().out
    assert [r["status"] for r in _summary(out / "summary.csv")] == ["ok", "failed", "ok"]


@pytest.mark.slow
def test_resume_after_sigkill_recomputes_nothing_finished(cohort):
    """Killed while writing the 4th pair (its files in the hidden folder): the rerun removes the leftover, skips
    the finished pairs (their files untouched) and completes all 15."""
    path = _write_csv(cohort, 15)
    out = cohort / "out"
    cmd = [sys.executable, "-m", "napari_unireg.cli", "register", "--pairs", str(path), "--out", str(out), *RUN]
    env = dict(_env(), UNIREG_TEST_PAUSE_AT="write", UNIREG_TEST_PAUSE_S="0.2")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    pauses = 0
    try:
        for line in proc.stderr:
            pauses += "unireg-test: paused at write" in line
            if pauses == 4:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert pauses == 4
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert hidden, "the 4th pair's hidden folder should be left by the kill"
    finished = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 3 <= len(finished) < 15 and all((p / "run.json").is_file() for p in finished)  # no half-written pair
    stamps = {p.name: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in finished}

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(finished)} already done)" in rerun.stderr
    rows = _summary(out / "summary.csv")
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    assert all((out / r["pair"] / "run.json").is_file() for r in rows)
    assert {p.name: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in finished} == stamps
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # leftovers cleaned


@pytest.mark.slow
def test_torchrun_two_cpu_processes_split_and_merge(cohort):
    pytest.importorskip("torch.distributed.run")
    path = _write_csv(cohort, 5)
    out = cohort / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_unireg.cli", "register", "--pairs", str(path), "--out", str(out), "--device", "cpu", *RUN]
    proc = subprocess.run(cmd, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"s{i:02d}__s{j:02d}" for i, j in _pairs(5)]
    for k in (0, 1):
        assert [r["pair"] for r in _summary(out / f"summary.rank{k}.csv")] == names[k::2]
        assert f"rank {k}: " in proc.stderr
    rows = _summary(out / "summary.csv")
    assert [r["pair"] for r in rows] == names and all(r["status"] == "ok" for r in rows)
    for n in names:  # every pair written once, by the rank that owns it
        assert json.loads((out / n / "run.json").read_text())["device"] == "cpu"
