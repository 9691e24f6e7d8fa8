"""Cohorts: many (fixed, moving) pairs in one process, one result folder per pair, a summary CSV, resumable.

The pair list comes from a CSV (``fixed,moving[,fixed_seg,moving_seg]``, header optional, paths relative to the
CSV's folder), a Learn2Reg ``dataset.json`` (its ``registration_val``/``registration_test`` lists) or one template
against a folder of moving images. :func:`check_pairs` reads every header before any registration, so a bad list
fails at once (:class:`UserError`, one line).

:func:`run_batch` loads the network once (the cache of :func:`~.models.load_model`), reads the next pair in a
background thread while the current one runs, and writes each pair into ``OUT/<fixed-id>__<moving-id>/`` through
:func:`~.write.write_result` (a hidden sibling folder swapped in whole: a killed run leaves no half-written pair,
and the next run removes the hidden leftovers). A pair whose folder holds ``run.json`` is done: a rerun skips it.
A pair that fails (an unreadable image, ...) gets a row with status ``failed`` and its one-line error; the others
go on. ``OUT/summary.csv`` (one row per pair: :data:`COLUMNS`) is rewritten atomically after every pair.

Several processes (``torchrun --nproc_per_node N``; ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment,
no process group): rank ``k`` takes the pairs ``i`` with ``i % WORLD_SIZE == k`` on ``cuda:LOCAL_RANK`` (or the
CPU), writes ``summary.rank<k>.csv`` and, when finished, the marker ``.done.rank<k>``; rank 0 then waits for every
other rank's marker of the same launch and writes the merged ``summary.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .types import RegisterOptions

__all__ = [
    "COLUMNS",
    "Pair",
    "Ranks",
    "BatchReport",
    "pairs_from_csv",
    "pairs_from_dataset_json",
    "pairs_from_folder",
    "read_pairs",
    "check_pairs",
    "run_batch",
    "read_summary",
]

#: The columns of summary.csv, in order (metrics empty when not computed).
COLUMNS = ("pair", "fixed", "moving", "status", "error", "dice_before", "dice", "hd95", "sdlogj", "ndv",
           "folded_pct", "seconds")
METRIC_KEYS = ("dice_before", "dice", "hd95", "sdlogj", "ndv", "folded_pct")
SUMMARY = "summary.csv"
_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
_L2R_NAME = re.compile(r"^.+?_(\d+)_(\d{4})$")  # Learn2Reg: <TASK>_<subject>_<modality>


# --------------------------------------------------------------------------------------------- the pair list
@dataclass(frozen=True)
class Pair:
    """One registration of the cohort: absolute paths, the folder name ``id`` and where it was listed."""

    fixed: str
    moving: str
    fixed_seg: str | None = None
    moving_seg: str | None = None
    id: str = ""
    where: str = ""  # e.g. "pairs.csv line 4", for messages


def file_id(path: str | os.PathLike) -> str:
    """``UNIREG_0001_0000.nii.gz`` → ``'0001'`` (Learn2Reg naming), else the file name without its suffix."""
    name = Path(path).name
    for s in _SUFFIXES:
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    m = _L2R_NAME.match(name)
    return m.group(1) if m else name


def _pair(fixed, moving, fixed_seg, moving_seg, where) -> Pair:
    return Pair(str(fixed), str(moving), fixed_seg and str(fixed_seg), moving_seg and str(moving_seg),
                f"{file_id(fixed)}__{file_id(moving)}", where)


def pairs_from_csv(path: str | os.PathLike) -> list[Pair]:
    """``fixed,moving[,fixed_seg,moving_seg]`` per line (comma or tab; a header naming the columns optional);
    relative paths are taken from the CSV's folder; empty label cells mean none."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the pair list {path}: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise UserError(f"{path.name} lists no pairs")
    delimiter = "\t" if "\t" in lines[0][1] else ","
    columns = ["fixed", "moving", "fixed_seg", "moving_seg"]
    first = [c.strip().lower() for c in next(csv.reader([lines[0][1]], delimiter=delimiter))]
    if first and first[0] in ("fixed", "fixed_image"):
        named = [c.replace("_image", "") for c in first]  # fixed_image,moving_image also name the columns
        unknown = [c for c in named if c not in columns]
        if unknown or "moving" not in named:
            raise UserError(f"{path.name} line {lines[0][0]}: header columns must be {','.join(columns)}, got "
                            f"{','.join(first)}")
        columns = named
        lines = lines[1:]
    root = path.parent
    pairs = []
    for n, line in lines:
        cells = [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]
        where = f"{path.name} line {n}"
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise UserError(f"{where}: expected fixed,moving[,fixed_seg,moving_seg], got {line.strip()!r}")
        if len(cells) > len(columns):
            raise UserError(f"{where}: {len(cells)} columns, at most {len(columns)} ({','.join(columns)})")
        row = dict(zip(columns, cells, strict=False))
        p = {k: (str((root / Path(row[k]).expanduser()).resolve()) if row.get(k) else None) for k in columns}
        pairs.append(_pair(p["fixed"], p["moving"], p.get("fixed_seg"), p.get("moving_seg"), where))
    if not pairs:
        raise UserError(f"{path.name} lists no pairs")
    return pairs


def _label_guess(image: Path) -> Path | None:
    """Learn2Reg layout: ``imagesXx/NAME`` → ``labelsXx/NAME`` when that file exists."""
    if image.parent.name.startswith("images"):
        cand = image.parent.parent / ("labels" + image.parent.name[len("images"):]) / image.name
        if cand.is_file():
            return cand
    return None


def pairs_from_dataset_json(path: str | os.PathLike, split: str = "all") -> list[Pair]:
    """The pairs of a Learn2Reg ``dataset.json``: ``registration_val`` (split ``val``), ``registration_test``
    (``test``) or both (``all``, duplicates once). Paths relative to the file's folder; label maps from the
    ``training``/``test`` items' ``label`` or, failing that, ``labelsXx/`` beside ``imagesXx/``."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path.name}: expected a Learn2Reg dataset.json (a JSON object)")
    root = path.parent
    labels: dict[Path, Path] = {}
    for key in ("training", "test", "validation"):
        for item in meta.get(key) or []:
            if isinstance(item, dict) and item.get("image") and item.get("label"):
                labels[(root / item["image"]).resolve()] = (root / item["label"]).resolve()
    keys = {"val": ["registration_val"], "test": ["registration_test"],
            "all": ["registration_val", "registration_test"]}[split]
    pairs, seen = [], set()
    for key in keys:
        items = meta.get(key) or []
        if not isinstance(items, list):
            raise UserError(f"{path.name}: '{key}' must be a list of {{fixed, moving}}")
        for k, item in enumerate(items):
            where = f"{path.name} {key}[{k}]"
            if not isinstance(item, dict) or not item.get("fixed") or not item.get("moving"):
                raise UserError(f"{where}: expected {{\"fixed\": ..., \"moving\": ...}}, got {item!r}")
            f, m = (root / item["fixed"]).resolve(), (root / item["moving"]).resolve()
            if (f, m) in seen:
                continue
            seen.add((f, m))
            fs, ms = labels.get(f) or _label_guess(f), labels.get(m) or _label_guess(m)
            pairs.append(_pair(f, m, fs if fs and ms else None, ms if fs and ms else None, where))
    if not pairs:
        raise UserError(f"{path.name} has no pairs in {' or '.join(keys)}")
    return pairs


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(_SUFFIXES))


def pairs_from_folder(template: str | os.PathLike, moving_dir: str | os.PathLike, template_seg=None,
                      moving_seg_dir=None) -> list[Pair]:
    """One fixed ``template`` against every image of ``moving_dir`` (sorted by name). With ``moving_seg_dir``
    every moving image needs a label map of the same file name there (and ``template_seg`` for the template)."""
    folder = Path(moving_dir)
    if not folder.is_dir():
        raise UserError(f"--moving-dir {folder}: not a folder")
    template = Path(template).resolve()
    movings = [p for p in _images(folder) if p.resolve() != template]
    if not movings:
        raise UserError(f"--moving-dir {folder} holds no NIfTI images (.nii, .nii.gz, .mgz)")
    segs = Path(moving_seg_dir) if moving_seg_dir else None
    if segs is not None and not segs.is_dir():
        raise UserError(f"--moving-seg-dir {segs}: not a folder")
    if segs is not None and not template_seg:
        raise UserError("--moving-seg-dir needs --fixed-seg (the template's label map) for Dice/HD95")
    return [_pair(template, p.resolve(), template_seg and Path(template_seg).resolve(),
                  segs and (segs / p.name).resolve(), f"{folder.name}/{p.name}") for p in movings]


def read_pairs(path: str | os.PathLike, split: str = "all") -> list[Pair]:
    """A CSV or a Learn2Reg dataset.json (by suffix, or by a leading ``{``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pair list not found: {path}")
    if path.suffix.lower() == ".json":
        return pairs_from_dataset_json(path, split)
    return pairs_from_csv(path)


def _header_problem(path: str) -> str | None:
    """Why ``path`` cannot be a 3D volume, from its header alone (fast: no voxel data is read)."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        return f"file not found: {path}"
    if not p.is_file():
        return f"not a file: {path}"
    if not p.name.lower().endswith(_SUFFIXES):
        return f"not a NIfTI file (.nii, .nii.gz, .mgz): {path}"
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as exc:  # noqa: BLE001 (nibabel raises many kinds for a bad header)
        return f"unreadable header of {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        return f"{path} is not a 3D volume (shape {tuple(shape)})"
    return None


def check_pairs(pairs: Sequence[Pair]) -> None:
    """Every listed file exists and has a readable 3D header; folder names are unique. :class:`UserError` (one
    line: the first problem and how many there are) otherwise. Reads headers only."""
    if not pairs:
        raise UserError("the pair list is empty")
    problems: list[str] = []
    checked: dict[str, str | None] = {}
    for pair in pairs:
        for role in ("fixed", "moving", "fixed_seg", "moving_seg"):
            f = getattr(pair, role)
            if f is None:
                continue
            if f not in checked:
                checked[f] = _header_problem(f)
            if checked[f]:
                problems.append(f"{pair.where}: {role}: {checked[f]}")
        if (pair.fixed_seg is None) != (pair.moving_seg is None):
            problems.append(f"{pair.where}: give both label maps (fixed_seg and moving_seg) or neither")
    seen: dict[str, str] = {}
    for pair in pairs:
        if pair.id in seen:
            problems.append(f"{pair.where}: the result folder {pair.id} is also that of {seen[pair.id]} "
                            "(same file names twice)")
        seen.setdefault(pair.id, pair.where)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"bad pair list: {problems[0]}{more}")


# --------------------------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class Ranks:
    """This process's share of a static split: ``rank`` of ``world``, its GPU index, and a token that is the same
    for every rank of one launch (so that rank 0 never takes a marker of an earlier launch for a new one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    token: str = ""

    @classmethod
    def from_env(cls, env=None) -> Ranks:
        """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them (one process when absent). The launch
        token: ``UNIREG_BATCH_RUN_ID``, else torchrun's ``TORCHELASTIC_RUN_ID`` (set by a rendezvous), else the
        parent's pid (the torchrun agent: shared by the ranks of one node)."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", 1))
            rank = int(env.get("RANK", 0))
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"RANK {rank} is not within WORLD_SIZE {world}")
        token = env.get("UNIREG_BATCH_RUN_ID") or ""
        run_id = env.get("TORCHELASTIC_RUN_ID", "")
        if not token:
            token = run_id if run_id and run_id != "none" else f"ppid{os.getppid()}"
        return cls(rank, world, local, token)

    def device(self, asked: str) -> str:
        """The device option of this rank: ``auto``/``cuda`` → ``cuda:LOCAL_RANK`` when CUDA is there and more
        than one process runs, else unchanged (``auto`` stays the CPU without CUDA)."""
        if self.world == 1 or asked not in ("auto", "cuda"):
            return asked
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return asked


# --------------------------------------------------------------------------------------------- summary files
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ""
    return str(v)


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Rewrite ``path`` whole: a temporary sibling renamed over it (a reader sees the old or the new file)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def read_summary(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a summary CSV as dicts of strings ([] when absent or unreadable)."""
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _done(folder: Path) -> bool:
    return (folder / "run.json").is_file()


def _previous_row(out: Path, pair: Pair, old: dict[str, dict]) -> dict:
    """The row of a pair finished by an earlier run: its earlier summary row, else its metrics.json."""
    if pair.id in old and old[pair.id].get("status") == "ok":
        return {**old[pair.id], "fixed": pair.fixed, "moving": pair.moving}
    row = {"pair": pair.id, "fixed": pair.fixed, "moving": pair.moving, "status": "ok"}
    try:
        m = json.loads((out / pair.id / "metrics.json").read_text())
        row.update({k: m.get(k) for k in METRIC_KEYS})
        row["seconds"] = (m.get("seconds") or {}).get("total")
    except (OSError, ValueError):
        pass
    return row


def _options_clash(folder: Path, options: RegisterOptions) -> str | None:
    """The first option (other than the device) in which the finished result in ``folder`` differs."""
    try:
        done = (json.loads((folder / "run.json").read_text()) or {}).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return None
    now = json.loads(json.dumps(options.to_dict()))  # tuples as lists, like run.json holds them
    for k, v in now.items():
        if k != "device" and k in done and done[k] != v:
            return f"{k}: {done[k]!r} there, {v!r} now"
    return None


# --------------------------------------------------------------------------------------------- the run
@dataclass
class BatchReport:
    """What a run did: every row of this process's pairs (in list order), counts, wall seconds."""

    rows: list[dict] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    summary: Path | None = None


def _load_pair(pair: Pair):
    from ..io import load_volume

    fixed = load_volume(pair.fixed, kind="image")
    moving = load_volume(pair.moving, kind="image")
    fseg = load_volume(pair.fixed_seg, kind="label") if pair.fixed_seg else None
    mseg = load_volume(pair.moving_seg, kind="label") if pair.moving_seg else None
    return fixed, moving, fseg, mseg


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _sweep_leftovers(out: Path, names) -> None:
    """Remove the hidden folders of pairs whose writer was killed (dead pid; live ones are left alone)."""
    from ..io.result_folder import clean_stale

    pattern = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\d+$")
    try:
        hidden = {m["name"] for p in out.iterdir() if (m := pattern.match(p.name)) and p.is_dir()}
    except OSError:
        return
    for name in sorted(hidden):
        clean_stale(out / name, names)
    for p in out.glob(".summary*.csv.*.tmp"):
        if p.name.split(".")[-2].isdigit() and not _alive(int(p.name.split(".")[-2])):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return pid != os.getpid()


def run_batch(
    pairs: Sequence[Pair],
    out: str | os.PathLike,
    options: RegisterOptions,
    *,
    outputs=None,
    overwrite: bool = False,
    ranks: Ranks | None = None,
    on_pair: Callable[[dict, int, int], None] | None = None,
    merge_timeout: float | None = None,
) -> BatchReport:
    """Register this rank's share of ``pairs`` into ``out``; see the module docstring.

    Checks the options, the pair list (headers) and ``out`` before any registration (:class:`UserError`). A pair
    whose folder is complete is skipped (``overwrite``: every pair is run again, each folder replaced whole);
    finished folders made with other options are refused without ``overwrite``. ``on_pair(row, done, total)`` is
    called after each pair of this rank (progress). Rank 0 of several waits up to ``merge_timeout`` seconds
    (default: 3× its own run, at least 10 minutes) for the other ranks before writing the merged summary.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..io.result_folder import check_output_dir
    from .models import load_model
    from .register import register_volumes, validate_options
    from .write import RESULT_FILES, check_outputs, write_result

    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    wanted = check_outputs(outputs)
    options = validate_options(RegisterOptions(**{**options.to_dict(), "device": ranks.device(options.device),
                                                  "metrics": options.metrics and "metrics" in wanted}))
    check_pairs(pairs)
    out = Path(out)
    check_output_dir(out, overwrite=True, expected_names=(SUMMARY,))
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(RESULT_FILES.values())
    if ranks.rank == 0:
        _sweep_leftovers(out, names)
    mine = [(i, p) for i, p in enumerate(pairs) if i % ranks.world == ranks.rank]
    if not overwrite:
        for _, p in mine:
            clash = _done(out / p.id) and _options_clash(out / p.id, options)
            if clash:
                raise UserError(f"{out / p.id} holds a result made with other options ({clash}); use --overwrite "
                                "or another --out")
    old = {r.get("pair"): r for f in [out / SUMMARY, *sorted(out.glob("summary.rank*.csv"))] for r in read_summary(f)}
    marker = out / f".done.rank{ranks.rank}"
    marker.unlink(missing_ok=True)
    own = out / (SUMMARY if ranks.world == 1 else f"summary.rank{ranks.rank}.csv")

    from .device import resolve_device

    load_model(options.model, options.checkpoint, resolve_device(options.device), options.resolution)  # once

    report = BatchReport()
    rows: dict[int, dict] = {}
    todo = []
    for i, p in mine:
        if not overwrite and _done(out / p.id):
            rows[i] = _previous_row(out, p, old)
            report.skipped += 1
        else:
            todo.append((i, p))
    for i, p in mine:  # rows not run yet keep their earlier status until this run reaches them
        rows.setdefault(i, {**old.get(p.id, {}), "pair": p.id, "fixed": p.fixed, "moving": p.moving,
                            "status": "pending", "error": ""})

    def flush() -> None:
        _write_csv(own, [rows[i] for i, _ in mine])

    flush()
    def write(result, fixed, moving, folder: Path) -> float:
        t = time.perf_counter()
        write_result(result, fixed, folder, overwrite=True, options=options, moving=moving, outputs=wanted)
        return time.perf_counter() - t

    def finish(k: int, i: int, row: dict, writing) -> None:
        """Complete pair ``k``'s row (waiting for its folder to be written), save the summary, report."""
        if writing is not None:
            try:
                row["seconds"] += writing.result()
                row.update(status="ok", error="")
            except Exception as exc:  # noqa: BLE001
                row.update({key: None for key in METRIC_KEYS}, status="failed", error=_one_line(exc))
        row["seconds"] = round(row["seconds"], 3)
        rows[i] = row
        flush()
        if on_pair is not None:
            on_pair(row, k + 1, len(todo))

    # Three overlapping streams: the next pair is read, the current one registered, the previous one written
    # (gzip and the file system release the GIL). One worker each keeps the order and bounds the memory.
    with ThreadPoolExecutor(1, thread_name_prefix="unireg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="unireg-write") as writer:
        nxt = reader.submit(_load_pair, todo[0][1]) if todo else None
        writing_prev = None
        for k, (i, pair) in enumerate(todo):
            current = nxt
            nxt = reader.submit(_load_pair, todo[k + 1][1]) if k + 1 < len(todo) else None
            row = {"pair": pair.id, "fixed": pair.fixed, "moving": pair.moving}
            t = time.perf_counter()
            writing = None
            try:
                fixed, moving, fseg, mseg = current.result()
                result = register_volumes(fixed, moving, fseg, mseg, options=options)
                writing = writer.submit(write, result, fixed, moving, out / pair.id)
                row.update({key: result.metrics.get(key) for key in METRIC_KEYS})
            except Exception as exc:  # noqa: BLE001 (one bad pair must not end the cohort; KeyboardInterrupt does)
                row.update(status="failed", error=_one_line(exc))
            finally:
                current = result = None
            row["seconds"] = time.perf_counter() - t  # + its write time, added by finish()
            if writing_prev is not None:
                finish(*writing_prev)
            writing_prev = (k, i, row, writing)
        if writing_prev is not None:
            finish(*writing_prev)
    report.ran = sum(rows[i].get("status") == "ok" for i, _ in todo)
    report.rows = [rows[i] for i, _ in mine]
    report.failed = sum(r.get("status") != "ok" for r in report.rows)
    report.summary = own
    if ranks.world > 1:
        marker.write_text(json.dumps({"token": ranks.token, "rank": ranks.rank}))
        if ranks.rank == 0:
            elapsed = time.perf_counter() - t0
            report.summary, missing = _merge(out, pairs, ranks, merge_timeout or max(600.0, 3 * elapsed))
            merged = read_summary(report.summary)
            report.failed = sum(r.get("status") != "ok" for r in merged) + missing
    report.seconds = time.perf_counter() - t0
    return report


def _merge(out: Path, pairs: Sequence[Pair], ranks: Ranks, timeout: float) -> tuple[Path, int]:
    """Rank 0: wait for every rank's marker of this launch, then write summary.csv in list order. Returns the
    path and the number of ranks that did not report within ``timeout`` (their pairs keep their last rows)."""
    deadline = time.monotonic() + timeout
    waiting = set(range(1, ranks.world))
    while waiting and time.monotonic() < deadline:
        for k in sorted(waiting):
            try:
                if json.loads((out / f".done.rank{k}").read_text()).get("token") == ranks.token:
                    waiting.discard(k)
            except (OSError, ValueError, AttributeError):
                pass
        if waiting:
            time.sleep(0.5)
    if waiting:
        print(f"unireg register: ranks {sorted(waiting)} did not finish within {timeout:.0f} s; summary.csv holds "
              "their last rows", file=sys.stderr)
    rows = {}
    for k in range(ranks.world):
        for r in read_summary(out / f"summary.rank{k}.csv"):
            rows[r.get("pair")] = r
    merged = [rows.get(p.id) or {"pair": p.id, "fixed": p.fixed, "moving": p.moving, "status": "missing"}
              for p in pairs]
    _write_csv(out / SUMMARY, merged)
    return out / SUMMARY, len(waiting)
