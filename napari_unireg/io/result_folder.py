"""The result folder as one unit: checked before any work, written whole or not at all, safe against signals.

A run writes into a hidden sibling folder ``.<name>.tmp-<pid>`` next to ``<out>``; on success that folder takes
the place of ``<out>`` in one atomic ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel or the
filesystem lacks it), so ``<out>`` is at every moment either the old complete result or the new complete one.
A rerun with ``overwrite`` therefore keeps no file of the old run (e.g. a ``warped_seg.nii.gz`` the new run does
not write). On any exception, KeyboardInterrupt and SIGTERM included, the hidden folder is removed and ``<out>``
is untouched; an ``OSError`` while writing (disk full, read-only, permission, ...) becomes a one-line
:class:`~napari_unireg.errors.UserError`. Hidden leftovers of runs killed outright (SIGKILL, power loss) are
removed by the next run's :func:`check_output_dir`.

Folders that hold more than one run's results (the user's own files next to them, a figure folder, ``--out .``)
are never swapped as a whole: the new files are still written into a hidden folder first (inside ``<out>``),
then renamed in one by one with the signals held back, and with ``whole=True`` the stale result files of the
old run are removed; nothing else in the folder is touched.

Files get the modes ordinary files get (0644 and 0755 under the usual umask): no ``tempfile.mkstemp`` (0600).

Test-only hook: ``UNIREG_TEST_PAUSE_AT=<stage>`` makes :func:`test_pause` print ``unireg-test: paused at
<stage>`` on stderr and sleep ``UNIREG_TEST_PAUSE_S`` seconds (default 60) so that tests can deliver a signal at a
known stage. It is read only by the fault-injection tests; users never need it.

Pure standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError

__all__ = [
    "Terminated",
    "WRITE_ERRNOS",
    "check_output_dir",
    "result_folder",
    "os_error_message",
    "ordinary_file_mode",
    "interrupt_signals",
    "exit_code",
    "test_pause",
]

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
#: per-file temporaries of the writers in io.py (``.<name>.<8 hex>.tmp<suffix>``) and older versions
#: (``.<name>.tmp<pid>``), left inside a folder by runs killed while writing
_FILE_TMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:[0-9a-f]{8}\.tmp.*|tmp\d+)$")
_INNER = ".unireg-tmp-"  # hidden folder inside <out> (merge mode)


#: errno values that mean "this location cannot take the files" (mapped to one line by :func:`os_error_message`)
WRITE_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG) if e is not None
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt so that the same cleanup runs."""

    signum = signal.SIGTERM


# ------------------------------------------------------------------------------------------------ messages
def os_error_message(exc: OSError, folder: str | os.PathLike) -> str:
    """One line naming ``folder`` and why writing there failed (disk full, read-only, permission, ...)."""
    folder = str(folder)
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"no space left on the device of {folder} (disk full or quota exceeded); free space or use another --out"
    if code == errno.EROFS:
        return f"cannot write in {folder}: the filesystem is read-only; use another --out"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write in {folder}: permission denied; use another --out"
    if code == errno.ENOTDIR:
        where = exc.filename or folder
        return f"cannot write in {folder}: a part of {where} is a file, not a folder"
    if code == errno.ENAMETOOLONG:
        return f"cannot write in {folder}: the path is too long"
    reason = exc.strerror or exc.__class__.__name__
    return f"cannot write in {folder}: {reason}"


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def ordinary_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 minus the umask (0o644 usually).

    For files a library creates 0600 (``tempfile.mkstemp``; safetensors 0.8 writes its files 0600)."""
    try:  # Linux reports the umask without changing it (os.umask would race with other threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# ------------------------------------------------------------------------------------------------ stale leftovers
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # a folder named after this very process is a leftover of an earlier one (pid reuse)
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never judge other pids
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(out: str | os.PathLike, result_names: Iterable[str] = ()) -> list[Path]:
    """Remove the hidden leftovers of killed runs for ``out``; returns what was removed.

    ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings of a dead process: a ``.old-`` folder is the previous
    complete result of a run killed between its two renames, so it is put back when ``out`` is missing. Inside
    ``out``: ``.unireg-tmp-<pid>`` folders of dead processes and the per-file ``.<result>.*.tmp*`` files.
    """
    out = Path(out)
    removed: list[Path] = []
    parent = out.parent
    if parent.is_dir():
        try:
            entries = list(parent.iterdir())
        except OSError:
            entries = []
        stale = []
        for p in entries:
            m = _TMP_RE.match(p.name)
            if m and m["name"] == out.name and not _pid_alive(int(m["pid"])):
                stale.append((m["kind"], p))
        for kind, p in sorted(stale, key=lambda kp: kp[0] != "old"):  # restore an old result first
            if kind == "old" and not out.exists():
                with contextlib.suppress(OSError):
                    os.rename(p, out)
                    continue
            _remove(p)
            removed.append(p)
    if out.is_dir():
        names = set(result_names)
        try:
            entries = list(out.iterdir())
        except OSError:
            entries = []
        for p in entries:
            if p.name.startswith(_INNER) and p.name[len(_INNER):].isdigit():
                if not _pid_alive(int(p.name[len(_INNER):])):
                    _remove(p)
                    removed.append(p)
                continue
            m = _FILE_TMP_RE.match(p.name)
            if m and m["name"] in names and p.is_file():
                _remove(p)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------ the check
def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def _probe(folder: Path, what: Path) -> None:
    """Create and remove an empty file in ``folder``; an OSError becomes a UserError naming ``what``."""
    probe = folder / f".unireg-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(os_error_message(exc, what)) from None


def _foreign(out: Path, result_names: Iterable[str]) -> list[str]:
    """Entries of ``out`` that are neither results nor leftovers of ours (the user's files)."""
    names = set(result_names)
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError:
        return []
    return [n for n in entries if n not in names and not n.startswith(_INNER) and not _FILE_TMP_RE.match(n)]


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    expected_names: Iterable[str],
    need_bytes: int = 0,
) -> None:
    """Refuse, before any work, an output folder the run could not fill; clean leftovers of killed runs.

    Raises :class:`UserError` (one line) when: a part of ``out`` is a regular file; ``out`` already holds any of
    ``expected_names`` and not ``overwrite`` (the line lists them); the folder (or, when it does not exist yet,
    its nearest existing parent) is not writable (read-only filesystem, permission) — probed by creating and
    removing an empty file; fewer than ``need_bytes`` bytes are free there. Creates nothing that stays.
    """
    out = Path(out)
    names = tuple(expected_names)
    base = _nearest_existing(out)
    if not base.is_dir():
        if base == out:
            raise UserError(f"--out {out} exists and is not a folder")
        raise UserError(f"cannot create the folder {out}: {base} is a file, not a folder")
    clean_stale(out, names)
    if out.is_dir():
        existing = [n for n in names if os.path.lexists(out / n)]
        if existing and not overwrite:
            raise UserError(f"{out} already holds results ({', '.join(existing)}); use --overwrite or another --out")
        _probe(out, out)  # (the swap also needs the parent writable; result_folder merges where it is not)
    else:
        _probe(base, out)
    free = _free_bytes(base)
    if need_bytes and free is not None and free < need_bytes:
        raise UserError(f"not enough space for the results in {out}: {_human(free)} free, at least "
                        f"{_human(need_bytes)} needed; free space or use another --out")


def _swappable(out: Path, names: Iterable[str]) -> bool:
    """Whether ``out`` (an existing folder) is one run's result that can be replaced as a whole."""
    return (
        not os.path.ismount(out)
        and not out.is_symlink()
        and os.access(out.parent, os.W_OK)  # e.g. a user's folder in a root-owned parent: merged instead
        and out.resolve() != Path.cwd()
        and not _foreign(out, names)
    )


# ------------------------------------------------------------------------------------------------ signals
@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are delivered when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])  # the restored handler decides (KeyboardInterrupt / Terminated)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def interrupt_signals() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread, like SIGINT
    does, so ``finally``/``except`` cleanup runs for both. SIGINT keeps Python's handler (or the SIG_IGN a shell
    gives background jobs). Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def exit_code(exc: BaseException) -> int:
    """Shell convention 128 + signal number: 143 for :class:`Terminated` (SIGTERM), 130 for SIGINT."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def test_pause(stage: str) -> None:
    """Test-only: sleep at ``stage`` when ``UNIREG_TEST_PAUSE_AT`` names it (see the module docstring)."""
    if os.environ.get("UNIREG_TEST_PAUSE_AT") != stage:
        return
    print(f"unireg-test: paused at {stage}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("UNIREG_TEST_PAUSE_S", "60")))


# ------------------------------------------------------------------------------------------------ the unit
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 (glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _commit_swap(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    with contextlib.suppress(OSError):  # keep the folder's own mode (e.g. group-writable) as the old one had it
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
    if _exchange(tmp, out):  # tmp now holds the old result
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")  # a killed run leaves it; clean_stale restores it
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _commit_merge(tmp: Path, out: Path, stale: Iterable[str]) -> None:
    new = {p.name for p in tmp.iterdir()}
    for name in stale:
        if name not in new and os.path.lexists(out / name):
            _remove(out / name)
    for name in sorted(new):
        dest = out / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def result_folder(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    result_names: Iterable[str] = (),
    whole: bool = True,
) -> Iterator[Path]:
    """``with result_folder(out, overwrite=...) as tmp:`` write every file into ``tmp``; see the module docstring.

    ``result_names``: the files a run of this kind may write (the refusal without ``overwrite`` and the stale
    files removed with it). ``whole=True``: on success ``out`` holds exactly this run's files (plus the user's own
    files when the folder holds some); ``whole=False`` (a folder collecting many runs, e.g. figures): the files
    written replace same-named ones, all others stay. Raises :class:`UserError` for a refused or failed write;
    any exception leaves ``out`` as it was and removes ``tmp``.
    """
    out = Path(out)
    names = tuple(result_names)
    check_output_dir(out, overwrite=overwrite, expected_names=names)
    swap = not out.exists() or (whole and _swappable(out, names))  # a new folder appears whole in any case
    made = [p for p in (out.parent, *out.parent.parents) if not os.path.lexists(p)]  # deepest first
    committed = False
    try:
        if swap:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f"{_INNER}{os.getpid()}"
        if os.path.lexists(tmp):
            _remove(tmp)
        os.mkdir(tmp, 0o777)  # umask applies, like any folder: 0755 usually
    except OSError as exc:
        raise UserError(os_error_message(exc, out)) from None
    try:
        try:
            yield tmp
            with _signals_held():
                if swap:
                    _commit_swap(tmp, out)
                else:
                    _commit_merge(tmp, out, names if whole else ())
            committed = True
        except OSError as exc:
            raise UserError(os_error_message(exc, out)) from None
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made if not committed else ():  # a failed run leaves no empty parent folders either
            try:
                os.rmdir(p)
            except OSError:
                break
