"""The result folder as one unit (napari_unireg.io.result_folder): old/new invariants, stale leftovers, modes,
errors mapped to one line, signals. Real read-only and full filesystems are tmpfs mounts (skipped where
``mount`` is not allowed); the same errors are also injected by patching, which works everywhere."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from napari_unireg.io import result_folder as rf
from napari_unireg.errors import UserError
from napari_unireg.io.result_folder import (
    Terminated,
    check_output_dir,
    exit_code,
    interrupt_signals,
    result_folder,
)

NAMES = ("warped.nii.gz", "disp.nii.gz", "warped_seg.nii.gz", "metrics.json")


@pytest.fixture(autouse=True)
def _umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of ``folder`` (recursively, hidden ones too) with its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def old_result(tmp_path: Path) -> Path:
    out = tmp_path / "res"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"old warped")
    (out / "warped_seg.nii.gz").write_bytes(b"old labels")
    (out / "metrics.json").write_text("{}")
    return out


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# ------------------------------------------------------------------------------------------------ invariants
def test_new_folder_appears_whole_with_ordinary_modes(tmp_path):
    out = tmp_path / "a" / "b" / "res"
    with result_folder(out, result_names=NAMES) as tmp:
        assert not out.exists()  # nothing under the final name while writing
        assert tmp.parent == out.parent and tmp.name.startswith(".")
        (tmp / "warped.nii.gz").write_bytes(b"new")
        (tmp / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "warped.nii.gz"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert hidden_siblings(out) == []


def test_overwrite_replaces_the_whole_folder_and_drops_stale_files(tmp_path):
    out = old_result(tmp_path)
    os.chmod(out, 0o775)  # the folder's own mode survives the swap
    with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
        (tmp / "warped.nii.gz").write_bytes(b"new warped")
        (tmp / "metrics.json").write_text('{"new": 1}')
    assert snapshot(out).keys() == {"warped.nii.gz", "metrics.json"}  # the old warped_seg is gone
    assert (out / "warped.nii.gz").read_bytes() == b"new warped"
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert hidden_siblings(out) == []


def test_overwrite_without_atomic_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(rf, "_exchange", lambda a, b: False)
    out = old_result(tmp_path)
    with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
        (tmp / "disp.nii.gz").write_bytes(b"new disp")
    assert snapshot(out).keys() == {"disp.nii.gz"}
    assert hidden_siblings(out) == []


def test_existing_results_are_refused_without_overwrite(tmp_path):
    out = old_result(tmp_path)
    before = snapshot(out)
    with pytest.raises(UserError, match=r"already holds results \(warped.nii.gz, warped_seg.nii.gz, metrics.json\)"):
        with result_folder(out, result_names=NAMES):
            pytest.fail("the body must not run")
    assert snapshot(out) == before and hidden_siblings(out) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), Terminated()])
def test_any_exception_leaves_the_old_result_untouched(tmp_path, exc):
    out = old_result(tmp_path)
    before = snapshot(out)
    with pytest.raises(type(exc)):
        with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
            (tmp / "warped.nii.gz").write_bytes(b"half")
            raise exc
    assert snapshot(out) == before
    assert hidden_siblings(out) == []


def test_a_failed_first_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "parents" / "out"
    with pytest.raises(KeyboardInterrupt):
        with result_folder(out, result_names=NAMES) as tmp:
            (tmp / "warped.nii.gz").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, message",
    [
        (errno.ENOSPC, "no space left on the device of"),
        (errno.EROFS, "the filesystem is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.ENOTDIR, "is a file, not a folder"),
    ],
)
def test_os_errors_while_writing_become_one_line(tmp_path, code, message):
    out = old_result(tmp_path)
    before = snapshot(out)

    def writer(path):  # a writer that fails like the OS would, after writing a part
        path.write_bytes(b"part")
        raise OSError(code, os.strerror(code), str(path))

    with pytest.raises(UserError, match=message) as info:
        with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
            writer(tmp / "warped.nii.gz")
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert snapshot(out) == before and hidden_siblings(out) == []


def test_a_signal_during_the_commit_is_delivered_after_it(tmp_path, monkeypatch):
    out = old_result(tmp_path)
    real = rf._commit_swap

    def commit_with_ctrl_c(tmp, dest):
        os.kill(os.getpid(), signal.SIGINT)  # arrives between the renames
        real(tmp, dest)

    monkeypatch.setattr(rf, "_commit_swap", commit_with_ctrl_c)
    # Python's own handler, even when the suite was started in the background with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
                (tmp / "warped.nii.gz").write_bytes(b"new")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert snapshot(out).keys() == {"warped.nii.gz"}  # the commit finished: the new complete result
    assert hidden_siblings(out) == []


# ------------------------------------------------------------------------------------------------ shared folders
def test_folder_with_user_files_is_merged_not_swapped(tmp_path):
    out = old_result(tmp_path)
    (out / "notes.txt").write_text("mine")
    with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
        assert tmp.parent == out
        (tmp / "warped.nii.gz").write_bytes(b"new")
    assert snapshot(out).keys() == {"notes.txt", "warped.nii.gz"}  # user file kept, stale labels removed
    assert (out / "notes.txt").read_text() == "mine"


def test_whole_false_replaces_only_the_files_written(tmp_path):
    out = old_result(tmp_path)
    with result_folder(out, overwrite=True, result_names=("warped.nii.gz",), whole=False) as tmp:
        (tmp / "warped.nii.gz").write_bytes(b"new")
    assert snapshot(out).keys() == {"warped.nii.gz", "warped_seg.nii.gz", "metrics.json"}
    assert (out / "warped.nii.gz").read_bytes() == b"new"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------------ stale leftovers
def test_stale_leftovers_of_killed_runs_are_cleaned(tmp_path):
    out = old_result(tmp_path)
    pid = dead_pid()
    (tmp_path / f".res.tmp-{pid}").mkdir()
    (tmp_path / f".res.tmp-{pid}" / "warped.nii.gz").write_bytes(b"half")
    (out / ".warped.nii.gz.0123abcd.tmp.nii.gz").write_bytes(b"")  # per-file temporaries of older versions
    (out / ".metrics.json.tmp4242").write_bytes(b"")
    (out / f".unireg-tmp-{pid}").mkdir()
    live = tmp_path / f".res.tmp-{os.getppid()}"  # a run in progress elsewhere is left alone
    live.mkdir()
    check_output_dir(out, overwrite=True, expected_names=NAMES)
    assert hidden_siblings(out) == [live.name]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "warped.nii.gz", "warped_seg.nii.gz"]


def test_a_run_killed_between_the_renames_gets_its_old_result_back(tmp_path):
    out = old_result(tmp_path)
    before = snapshot(out)
    pid = dead_pid()
    out.rename(tmp_path / f".res.old-{pid}")
    (tmp_path / f".res.tmp-{pid}").mkdir()
    check_output_dir(out, overwrite=True, expected_names=NAMES)
    assert snapshot(out) == before and hidden_siblings(out) == []


# ------------------------------------------------------------------------------------------------ the check
def test_a_regular_file_in_the_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "sub" / "out", overwrite=False, expected_names=NAMES)
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", overwrite=False, expected_names=NAMES)


@pytest.mark.parametrize("code, message", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_unwritable_folder_is_refused_by_the_probe(tmp_path, monkeypatch, code, message):
    real_open = os.open

    def failing_open(path, flags, *a, **kw):
        if ".unireg-probe-" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(rf.os, "open", failing_open)
    with pytest.raises(UserError, match=message):
        check_output_dir(tmp_path / "new", overwrite=False, expected_names=NAMES)
    assert not (tmp_path / "new").exists()


def test_too_little_free_space_is_refused_before_work(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UserError, match="not enough space"):
        check_output_dir(tmp_path / "out", overwrite=False, expected_names=NAMES, need_bytes=free + 10**9)




def test_real_read_only_filesystem(tmpfs):
    ro = tmpfs("ro,size=64k")
    with pytest.raises(UserError, match="read-only"):
        check_output_dir(ro / "out", overwrite=False, expected_names=NAMES)


def test_real_full_disk_leaves_the_old_result_and_no_leftovers(tmpfs):
    disk = tmpfs("size=64k")
    out = disk / "res"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"old")
    before = snapshot(out)
    with pytest.raises(UserError, match="no space left on the device of"):
        with result_folder(out, overwrite=True, result_names=NAMES) as tmp:
            (tmp / "warped.nii.gz").write_bytes(os.urandom(256 * 1024))
    assert snapshot(out) == before
    assert sorted(p.name for p in disk.iterdir()) == ["res"]  # the half-written hidden folder is gone


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_raises_terminated_like_sigint_and_maps_to_143():
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with interrupt_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert isinstance(info.value, KeyboardInterrupt)
    assert exit_code(info.value) == 143 and exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is old


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_files_get_ordinary_modes(tmp_path):
    import torch

    from napari_unireg.models.checkpoint import save_weights

    weights, card = save_weights(torch.nn.Linear(2, 2), tmp_path / "final")
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE(card.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
