"""``unireg register --pairs FILE`` / ``--fixed TEMPLATE --moving-dir DIR``: a cohort in one process (or one per
rank under ``torchrun``); the work is :func:`napari_unireg.pipeline.batch.run_batch`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError

EPILOG = (
    "Cohorts: --pairs FILE (a CSV fixed,moving[,fixed_seg,moving_seg] with paths relative to its folder, header "
    "optional, or a Learn2Reg dataset.json) or --fixed TEMPLATE --moving-dir DIR register every pair with the model "
    "loaded once and write OUT/<fixed-id>__<moving-id>/ per pair (each folder appears whole) and OUT/summary.csv "
    "(metrics, seconds, status per pair). A rerun skips finished pairs. Exit status: 0 all pairs done, 1 some "
    "failed (their error is in summary.csv), 2 bad list or option (nothing run). Under `torchrun --nproc_per_node "
    "N -m napari_unireg.cli register --pairs FILE` each process takes every N-th pair on its own GPU (or the CPU) "
    "and rank 0 writes the merged summary.csv."
)


def add_batch_arguments(p) -> None:
    """The cohort options of ``register`` (the parser lines live here, beside their use)."""
    g = p.add_argument_group("cohorts (instead of FIXED MOVING)")
    g.add_argument("--pairs", default=None, metavar="FILE",
                   help="CSV fixed,moving[,fixed_seg,moving_seg] (paths relative to the CSV) or a Learn2Reg "
                        "dataset.json")
    g.add_argument("--split", choices=["val", "test", "all"], default="all",
                   help="with a dataset.json: registration_val, registration_test or both (default)")
    g.add_argument("--fixed", dest="template", default=None, metavar="TEMPLATE",
                   help="one fixed image for every image of --moving-dir (--fixed-seg: its label map)")
    g.add_argument("--moving-dir", default=None, metavar="DIR", help="folder of moving images (with --fixed)")
    g.add_argument("--moving-seg-dir", default=None, metavar="DIR",
                   help="label maps of the moving images, same file names (with --moving-dir)")
    p.epilog = EPILOG


def is_batch(args) -> bool:
    return bool(getattr(args, "pairs", None) or getattr(args, "template", None) or getattr(args, "moving_dir", None))


def _pairs(args):
    from ..pipeline.batch import pairs_from_folder, read_pairs

    if args.fixed or args.moving:
        raise UserError("give either FIXED MOVING or a cohort (--pairs / --fixed --moving-dir), not both")
    if args.pairs:
        if args.template or args.moving_dir:
            raise UserError("give either --pairs FILE or --fixed TEMPLATE --moving-dir DIR, not both")
        if args.fixed_seg or args.moving_seg or args.moving_seg_dir:
            raise UserError("with --pairs the label maps are columns of the list (fixed_seg, moving_seg)")
        return read_pairs(args.pairs, args.split)
    if not (args.template and args.moving_dir):
        raise UserError("--fixed TEMPLATE and --moving-dir DIR go together")
    if args.moving_seg:
        raise UserError("with --moving-dir give the label maps as --moving-seg-dir DIR")
    return pairs_from_folder(args.template, args.moving_dir, args.fixed_seg, args.moving_seg_dir)


class _Progress:
    """A tqdm bar with ETA over the pairs on a terminal; one line per pair otherwise (logs); nothing when quiet."""

    def __init__(self, total: int, quiet: bool, prefix: str):
        self.total, self.quiet, self.prefix = total, quiet, prefix
        self.t0 = time.perf_counter()
        self.bar = None
        if not quiet and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="pair", desc=prefix.strip() or "pairs",
                            dynamic_ncols=True)

    def __call__(self, row: dict, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{row['pair']} {row['status']}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (total - done)
        err = f": {row['error']}" if row.get("error") else ""
        print(f"{self.prefix}[{done}/{total}] {row['pair']} {row['status']} {row['seconds']:.1f} s, "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}{err}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_batch(args) -> int:
    """Check everything, run the cohort, print one line; exit 0 (all done), 1 (some pairs failed)."""
    from ..pipeline.batch import Ranks, check_pairs, run_batch
    from ..pipeline.write import check_outputs
    from .register import options_from_args

    ranks = Ranks.from_env()
    outputs = check_outputs(getattr(args, "outputs", None))
    args.outputs = outputs if getattr(args, "outputs", None) is not None else None
    options = options_from_args(args)
    from ..pipeline import validate_options

    validate_options(options)  # every option before the list is read
    pairs = _pairs(args)
    check_pairs(pairs)
    out = Path(args.out)
    mine = sum(1 for i in range(len(pairs)) if i % ranks.world == ranks.rank)
    prefix = f"rank {ranks.rank}: " if ranks.world > 1 else ""
    done_before = sum(1 for i, p in enumerate(pairs) if i % ranks.world == ranks.rank and
                      (out / p.id / "run.json").is_file()) if not args.overwrite else 0
    if not args.quiet:
        print(f"{prefix}{mine} pairs ({done_before} already done) -> {out.resolve()}", file=sys.stderr, flush=True)
    progress = _Progress(mine - done_before, args.quiet, prefix)
    try:
        report = run_batch(pairs, out, options, outputs=args.outputs, overwrite=args.overwrite, ranks=ranks,
                           on_pair=progress)
    finally:
        progress.close()
    print(f"{prefix}{report.ran} registered, {report.skipped} skipped (done before), {report.failed} failed; "
              f"{report.seconds:.1f} s; summary in {report.summary.resolve()}")
    return 1 if report.failed else 0
