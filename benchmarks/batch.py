"""Cohort throughput: pairs per minute of ``unireg register --pairs`` on N copies of the demo pair.

The demo pair (``unireg demo``'s MNI152 template and its deformed copy, 160×224×192 at 1 mm) is copied N times
under distinct names into a temporary folder, listed in a CSV and registered by one ``unireg register --pairs``
process (a fresh one, as a user runs it) with ``OMP_NUM_THREADS=--threads``, the default model, affine
pre-alignment, no brain extraction and ``--outputs warped,disp`` (no metrics). Reported:

* ``whole call``: N / the process's wall time (Python, torch and the model start-up included);
* ``steady``: (N - 1) / the time between the first and the last pair folder appearing (the rate a long cohort
  approaches);
* the CPU seconds of the process per pair, and the rate that bounds on an idle machine (cores × 60 / CPU s);
* the per-pair seconds of summary.csv (registration + writing; reading overlaps the previous pair), and the
  1-minute load average before and after (the machine may be shared).

    python benchmarks/batch.py                       # N=10, 2 threads
    python benchmarks/batch.py --n 20 --threads 1 --model classical
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_cohort(folder: Path, n: int) -> Path:
    """N copies of the demo pair (fixed_k, moving_k) and pairs.csv listing them. Each moving copy differs from the
    others in one background corner voxel, so that no pair is a repeat of another (the engine remembers the
    pre-alignment of a pair it has seen)."""
    import nibabel as nib
    import numpy as np

    from napari_unireg.io.demo import demo_files

    demo = demo_files()
    moving = nib.load(demo["moving"])
    data = np.asarray(moving.dataobj)
    rows = ["fixed,moving"]
    for k in range(n):
        shutil.copyfile(demo["fixed"], folder / f"fixed_{k:03d}.nii.gz")
        marked = data.copy()
        marked[0, 0, 0] = marked[0, 0, 0] + k
        nib.save(nib.Nifti1Image(marked, moving.affine, moving.header), folder / f"moving_{k:03d}.nii.gz")
        rows.append(f"fixed_{k:03d}.nii.gz,moving_{k:03d}.nii.gz")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="number of pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prealign", default="affine", choices=["affine", "none"])
    ap.add_argument("--outputs", default="warped,disp")
    ap.add_argument("--keep", default=None, help="keep the cohort and results in this folder")
    args = ap.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="unireg-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pairs = make_cohort(work, args.n)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "napari_unireg.cli", "register", "--pairs", str(pairs), "--out", str(out),
               "--model", args.model, "--prealign", args.prealign, "--skull-strip", "off", "--outputs", args.outputs,
               "--quiet"]
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        with open(out / "summary.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        seconds = [float(r["seconds"]) for r in rows]
        stamps = sorted((out / r["pair"] / "run.json").stat().st_mtime for r in rows)
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60 if len(stamps) > 1 else float("nan")
        print(f"{args.n} demo pairs (160x224x192), model {args.model}, --prealign {args.prealign}, "
              f"--outputs {args.outputs}, {args.threads} threads, {os.cpu_count()} logical cores")
        print(f"whole call: {wall:.1f} s wall = {args.n / wall * 60:.1f} pairs/min (start-up included)")
        print(f"steady:     {steady:.1f} pairs/min (first to last pair folder)")
        print(f"per pair:   median {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, "
              f"max {max(seconds):.2f} s (registration + write)")
        bound = 60 * (os.cpu_count() or 1) / (cpu / args.n)
        print(f"CPU time:   {cpu:.1f} s = {cpu / args.n:.1f} CPU s per pair (start-up included); an idle machine "
              f"with {os.cpu_count()} cores could do at most {bound:.1f} pairs/min")
        print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
        print(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
