"""Fault injection at the command line: every fault on the output side and every interruption ends in one line
on stderr, no traceback, exit 2 / 130 (SIGINT) / 143 (SIGTERM), and a result folder that is either the complete
old one (byte-identical, mtimes unchanged) or the complete new one, with no hidden leftovers after the next run.

`unireg` runs in subprocesses on 32³ volumes with an untrained VoxelMorph (one forward pass: the fastest real
network path). Signals land at a known stage through the test-only hook ``UNIREG_TEST_PAUSE_AT`` (see
napari_unireg/result_folder.py). Read-only and full filesystems are small tmpfs mounts (skipped where mounting
is not allowed, e.g. unprivileged containers); the same faults are also injected in-process by patching, which
runs everywhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import smooth_blob_volume

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)
FAST_RUN = ["--model", "voxelmorph", "--device", "cpu", "--prealign", "none", "--grid", "32", "32", "32", "--quiet"]
ALL_RESULTS = {"warped.nii.gz", "disp.nii.gz", "disp_itk.nii.gz", "jacobian.nii.gz", "metrics.json", "run.json"}


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _child_setup() -> None:
    os.umask(0o022)
    # A suite started in the background (`pytest ... &` in a script) inherits SIGINT ignored, and the CLI rightly
    # keeps an inherited SIG_IGN (as shells expect of background jobs); the child of these tests must not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def unireg(*args, pause: str | None = None, sig: int | None = None, timeout: float = 300):
    """Run ``unireg ARGS`` in a subprocess; with ``pause``/``sig``, deliver ``sig`` once it paused at that stage.

    Returns ``(exit code, stderr lines without the test hook's, stdout)``.
    """
    env = _env(UNIREG_TEST_PAUSE_AT=pause, UNIREG_TEST_PAUSE_S="120") if pause else _env()
    proc = subprocess.Popen([sys.executable, "-m", "napari_unireg.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_child_setup)
    early = []
    if pause:
        for line in proc.stderr:  # wait for the pause, then signal
            early.append(line)
            if line.startswith(f"unireg-test: paused at {pause}"):
                proc.send_signal(sig)
                break
        else:
            proc.wait()
            pytest.fail(f"never paused at {pause}: {''.join(early)}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    lines = [ln for ln in "".join(early + [err]).splitlines() if ln.strip() and not ln.startswith("unireg-test:")]
    return proc.returncode, lines, out


def one_line(lines: list[str], command: str = "register") -> str:
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(f"unireg {command}: ") and "Traceback" not in lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_complete_new(out: Path, with_labels: bool) -> None:
    expected = ALL_RESULTS | ({"warped_seg.nii.gz"} if with_labels else set())
    assert {p.name for p in out.iterdir()} == expected
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # ordinary modes, not tempfile's 0700/0600
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    for p in out.iterdir():  # every file readable by an independent reader
        if p.suffix == ".gz":
            assert np.isfinite(nib.load(p).get_fdata()).all()
    assert hidden(out) == [] and hidden(out.parent) == []


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("faults")
    fixed = smooth_blob_volume(SHAPE, seed=1)
    fixed[fixed < 0.35] = 0
    seg = (fixed > 0.55).astype(np.uint8)
    files = {"fixed": (fixed, d / "f.nii.gz"), "moving": (np.roll(fixed, 2, 0), d / "m.nii.gz"),
             "fseg": (seg, d / "fs.nii.gz"), "mseg": (np.roll(seg, 2, 0), d / "ms.nii.gz")}
    for arr, path in files.values():
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return {k: path for k, (_, path) in files.items()}


def register_args(data, out, labels=False):
    seg = ["--fixed-seg", data["fseg"], "--moving-seg", data["mseg"]] if labels else []
    return ["register", data["fixed"], data["moving"], *seg, *FAST_RUN, "--out", out]


@pytest.fixture(scope="module")
def old_result(data, tmp_path_factory) -> Path:
    """An earlier result folder: every result name (warped_seg.nii.gz included) with distinct bytes. The
    invariants compare bytes and mtimes only, so a real run is not needed here (the SIGKILL test makes one)."""
    out = tmp_path_factory.mktemp("old") / "out"
    out.mkdir()
    for i, name in enumerate(sorted(ALL_RESULTS | {"warped_seg.nii.gz"})):
        src = data["fseg"] if "seg" in name else data["fixed"]
        (out / name).write_bytes(src.read_bytes() + bytes([i]) if name.endswith(".gz") else b'{"old": %d}' % i)
    return out


@pytest.fixture
def old_copy(old_result, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(old_result, out, copy_function=shutil.copy2)  # copy2 keeps the mtimes
    return out




# ------------------------------------------------------------------------------------------------ refused up front
def test_out_under_a_regular_file(data, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, lines, _ = unireg(*register_args(data, tmp_path / "file" / "out"))
    assert rc == 2
    assert "file is a file, not a folder" in one_line(lines)
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_filesystem(data, tmpfs):
    ro = tmpfs("ro,size=64k")
    rc, lines, _ = unireg(*register_args(data, ro / "out"))
    assert rc == 2 and "read-only" in one_line(lines)


def test_read_only_folder_patched(data, tmp_path, monkeypatch, capsys):
    """The same refusal where no tmpfs can be mounted: the probe file cannot be created (EROFS)."""
    from napari_unireg.io import result_folder
    from napari_unireg.cli import main

    real_open = os.open

    def ro_open(path, flags, *a, **kw):
        if ".unireg-probe-" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(result_folder.os, "open", ro_open)
    assert main([str(a) for a in register_args(data, tmp_path / "out")]) == 2
    assert "read-only" in one_line(capsys.readouterr().err.splitlines())
    assert not (tmp_path / "out").exists()


def test_full_disk_is_refused_before_work(data, tmpfs):
    disk = tmpfs("size=64k")  # smaller than the fixed image file: the results cannot fit
    rc, lines, _ = unireg(*register_args(data, disk / "out"))
    assert rc == 2 and "not enough space" in one_line(lines)
    assert list(disk.iterdir()) == []


def test_existing_result_refused_without_overwrite(data, old_copy):
    before = snapshot(old_copy)
    rc, lines, _ = unireg(*register_args(data, old_copy))
    assert rc == 2 and "already holds results (warped.nii.gz" in one_line(lines)
    assert snapshot(old_copy) == before


# ------------------------------------------------------------------------------------------------ failing while writing
@pytest.mark.slow
def test_disk_full_while_writing(data, tmpfs):
    disk = tmpfs("size=160k")  # the fixed file (108 KB) fits, the results (~230 KB) do not
    rc, lines, _ = unireg(*register_args(data, disk / "out"))
    assert rc == 2 and "no space left on the device of" in one_line(lines)
    assert list(disk.iterdir()) == []  # no half-filled folder that would block a rerun


@pytest.mark.slow
def test_disk_full_while_writing_patched(data, old_copy, monkeypatch, capsys):
    """ENOSPC from the NIfTI writer after a part of the file is on disk, with an old result in place."""
    from napari_unireg.cli import main

    from napari_unireg.io import nifti

    real_save = nifti._save_nifti  # the one NIfTI writer (zlib or ISA-L gzip)
    calls = []

    def save_then_fail(img, filename):
        calls.append(filename)
        if len(calls) == 2:  # the first file completes, the second fails half-way
            Path(filename).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(img, filename)

    monkeypatch.setattr(nifti, "_save_nifti", save_then_fail)
    before = snapshot(old_copy)
    assert main([str(a) for a in register_args(data, old_copy)] + ["--overwrite"]) == 2
    assert "no space left on the device of" in one_line(capsys.readouterr().err.splitlines())
    assert len(calls) >= 2
    assert snapshot(old_copy) == before and hidden(old_copy.parent) == []


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize(
    "stage", ["load", *(pytest.param(s, marks=pytest.mark.slow) for s in ("registration", "write"))]
)
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_at_each_stage_keeps_the_old_result(data, old_copy, stage, sig, code, word):
    before = snapshot(old_copy)
    rc, lines, _ = unireg(*register_args(data, old_copy), "--overwrite", pause=stage, sig=sig)
    assert rc == code
    assert one_line(lines) == f"unireg register: {word}"
    assert snapshot(old_copy) == before  # byte-identical, mtimes unchanged
    assert hidden(old_copy.parent) == [] and hidden(old_copy) == []  # the hidden folder was removed


@pytest.mark.slow
def test_killed_run_leaves_old_result_and_next_run_cleans_up(data, old_copy):
    """SIGKILL (no cleanup possible) mid-write; the next run with --overwrite and without labels removes the
    leftover and the old run's warped_seg.nii.gz (issue 15, items 2 and 3)."""
    rc, lines, _ = unireg(*register_args(data, old_copy, labels=True), "--overwrite")  # a real run with labels
    assert rc == 0, lines
    assert_complete_new(old_copy, with_labels=True)
    before = snapshot(old_copy)
    rc, _, _ = unireg(*register_args(data, old_copy), "--overwrite", pause="write", sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert snapshot(old_copy) == before
    assert [n.split(".tmp-")[0] for n in hidden(old_copy.parent)] == [".out"]  # the killed run's hidden folder
    rc, lines, _ = unireg(*register_args(data, old_copy), "--overwrite")
    assert rc == 0, lines
    assert_complete_new(old_copy, with_labels=False)  # no stale warped_seg, no leftovers
    assert snapshot(old_copy)["warped.nii.gz"][1] != before["warped.nii.gz"][1]


def test_write_errors_outside_a_result_folder_are_one_line(monkeypatch, capsys, tmp_path):
    """The CLI's last net (train writes its run folder as it goes): an OSError of the write kind is one line."""
    from napari_unireg.cli import app as cli

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "log.csv"))

    monkeypatch.setattr(cli, "_cmd_models", full)
    assert cli.main(["models"]) == 2
    line = one_line(capsys.readouterr().err.splitlines(), "models")
    assert line.endswith(f"No space left on device: {tmp_path}/log.csv")


# ------------------------------------------------------------------------------------------------ figure and train
def test_figure_out_under_a_regular_file(data, old_result, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, lines, _ = unireg("figure", "--fixed", data["fixed"], "--moving", data["moving"],
                          "--disp", f"a={old_result / 'disp.nii.gz'}", "--out", tmp_path / "file" / "figs")
    assert rc == 2 and "file is a file, not a folder" in one_line(lines, "figure")


def test_train_out_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    rc, lines, _ = unireg("train", "--model", "voxelmorph", "--data", tmp_path, "--out", tmp_path / "file" / "run")
    assert rc == 2 and "file is a file, not a folder" in one_line(lines, "train")


@pytest.mark.slow  # imports torch and the training stack: ~8 s on a loaded 2-core machine
def test_failed_train_leaves_no_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, lines, _ = unireg("train", "--model", "voxelmorph", "--data", tmp_path / "empty", "--out", tmp_path / "run")
    assert rc == 2
    one_line(lines, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # matplotlib draws three panels
def test_figure_rerun_replaces_its_files_and_keeps_the_others(data, tmp_path):
    """`figure` collects many runs in one folder: a rerun with --overwrite replaces its own files through a hidden
    folder, leaves other figures alone and leaves nothing hidden behind."""
    disp = tmp_path / "zero.npy"
    np.save(disp, np.zeros((3, *SHAPE), np.float32))
    figs = tmp_path / "figs"
    args = ["figure", "--fixed", data["fixed"], "--moving", data["moving"], "--disp", f"zero={disp}",
            "--axis", "2", "--dpi", "20", "--out", figs]
    rc, lines, out = unireg(*args)
    assert rc == 0, lines
    (mine,) = [Path(p) for p in out.split()]
    assert mine.parent == figs and mine.read_bytes().startswith(b"\x89PNG")
    (figs / "other.png").write_bytes(b"another figure")
    before = snapshot(figs)
    rc, lines, _ = unireg(*args)
    assert rc == 2 and "already holds" in one_line(lines, "figure")
    assert snapshot(figs) == before
    rc, lines, _ = unireg(*args, "--overwrite")
    assert rc == 0, lines
    after = snapshot(figs)
    assert after.keys() == before.keys() and after["other.png"] == before["other.png"]
    assert after[mine.name][1] != before[mine.name][1]
    assert hidden(figs) == [] and hidden(tmp_path) == []
    assert {stat.S_IMODE(p.stat().st_mode) for p in figs.iterdir() if p.name != "other.png"} == {0o644}
