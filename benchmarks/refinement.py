"""Refinement settings chosen on training pairs, never on the validation pairs.

The refinement (``--io-steps``, :mod:`napari_unireg.core.instance_opt`) has two weights, the diffusion weight
λ (``io_lambda``) and the folding penalty (``io_fold_weight``), and a plan of levels: Adam steps on grids pooled by
a factor (``2:30,1:5`` = 30 steps at half resolution, then 5 on the model grid). This script takes labelled pairs of
the data set that are **not** validation pairs (both images have label maps; the pair, in either direction, is not
in ``registration_val``), pre-aligns them (affine) and runs the network once per pair, then refines its field with
every (plan, λ, fold weight) given and prints mean Dice, NDV, SDlogJ and the refinement's seconds per setting: the
numbers the defaults are chosen by.

    python benchmarks/refinement.py --data ../shared/data/dataset.json --pairs 6 --plans 2:50 2:30 2:30,1:5 2:30,1:5:0.05

``--old-tree DIR`` (a git worktree of an earlier release, e.g. ``git worktree add /tmp/old-main <commit>``) also
refines the same network fields with that checkout's ``instance_optimise`` in a subprocess, one setting after the
other in the same run, and adds its seconds and the largest difference between the two fields (voxels): the
before/after of a speed change on the same machine and load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: run by the old checkout's interpreter: refine every saved case with one setting, save the fields and seconds
_OLD_TREE_SCRIPT = """
import json, sys, time, torch
from napari_unireg.core.instance_opt import Level, instance_optimise
torch.set_num_threads(int(sys.argv[3]))
cases = torch.load(sys.argv[1], weights_only=True)
setting = json.loads(sys.argv[2])
levels = [Level(*lv[: len(Level._fields)]) for lv in setting["levels"]]  # an older Level may lack window
fields, secs = [], []
for fixed, moving, disp in zip(cases["fixed"], cases["moving"], cases["disp"]):
    t = time.perf_counter()
    fields.append(instance_optimise(fixed, moving, init_disp=disp, levels=levels, lam=setting["lam"],
                                    fold_weight=setting["fold"]))
    secs.append(time.perf_counter() - t)
torch.save({"disp": fields, "secs": secs}, sys.argv[1] + ".out")
"""


def _old_tree_refine(tree: Path, cases_file: str, levels, lam: float, fold: float, threads: int):
    """The old checkout's refinement of the saved cases: (fields, seconds per case)."""
    import torch

    setting = json.dumps({"levels": [list(lv) for lv in levels], "lam": lam, "fold": fold})
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-c", _OLD_TREE_SCRIPT, cases_file, setting, str(threads)], env=env,
                   check=True, cwd=str(tree))
    out = torch.load(cases_file + ".out", weights_only=True)
    return out["disp"], out["secs"]


def training_pairs(dataset: Path, n: int) -> list[tuple[Path, Path, Path, Path]]:
    """``n`` (fixed, moving) pairs of labelled training images that are not validation pairs (in either direction),
    no image in two pairs where the data allow it, in the data set's order: (fixed, moving, fixed_seg, moving_seg)."""
    d = json.loads(dataset.read_text())
    root = dataset.parent
    val = {frozenset((p["fixed"], p["moving"])) for p in d.get("registration_val", [])}
    labelled = [e for e in d["training"] if e.get("label")]
    candidates = [(a, b) for a, b in itertools.combinations(labelled, 2)
                  if frozenset((a["image"], b["image"])) not in val]
    used: set[str] = set()
    chosen = []
    for a, b in candidates:  # disjoint pairs first, then any
        if len(chosen) < n and not {a["image"], b["image"]} & used:
            chosen.append((a, b))
            used |= {a["image"], b["image"]}
    chosen += [c for c in candidates if c not in chosen][: max(0, n - len(chosen))]
    return [tuple(root / x for x in (a["image"], b["image"], a["label"], b["label"])) for a, b in chosen]


def _plan(text: str) -> tuple:
    """``"2:30,1:5:0.05:7"`` → ``(Level(2, 30), Level(1, 5, 0.05, 7))``: factor:steps[:lr[:window]] per level, coarse
    first (an empty or ``-`` lr: the call's)."""
    from napari_unireg.core.instance_opt import Level

    def level(spec: str):
        factor, steps, *rest = spec.split(":")
        lr = float(rest[0]) if rest and rest[0] not in ("", "-") else None
        return Level(int(factor), int(steps), lr, *(int(w) for w in rest[1:2]))

    return tuple(level(x) for x in text.split(","))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Learn2Reg dataset.json")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--model", default="default")
    ap.add_argument("--plans", nargs="+", default=["2:30,1:5"], help="levels factor:steps[:lr[:window]],... (coarse first)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[2.0])
    ap.add_argument("--fold", type=float, nargs="+", default=[100.0], help="folding-penalty weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-tree", type=Path, help="also time this checkout's refinement on the same fields")
    args = ap.parse_args(argv)

    import torch

    from napari_unireg.core.instance_opt import instance_optimise
    from napari_unireg.core.metrics import dice_mean, ndv, sdlogj, warp_labels_nearest
    from napari_unireg.io import load_volume
    from napari_unireg.pipeline import RegisterOptions, stages
    from napari_unireg.pipeline.models import load_model

    torch.set_num_threads(args.threads)
    if args.old_tree and not (args.old_tree / "napari_unireg" / "core" / "instance_opt.py").is_file():
        # PYTHONPATH to a folder without the package would silently time this checkout as the "old" one
        print(f"error: --old-tree {args.old_tree} is not a napari-unireg checkout", file=sys.stderr)
        return 2
    pairs = training_pairs(Path(args.data).resolve(), args.pairs)
    if not pairs:
        print("error: no labelled non-validation pair in the data set", file=sys.stderr)
        return 2
    options = RegisterOptions(model=args.model, device="cpu", prealign="affine")
    model = load_model(options.model, None, torch.device("cpu"))
    cases = []  # (grid, fixed_t, moving_t, network field) per pair
    for pair in pairs:
        f, m, fs, ms = (load_volume(str(p), kind=k) for p, k in zip(pair, ("image", "image", "label", "label")))
        inputs = stages.Inputs(f, m, fs, ms)
        grid = stages.model_grid(inputs, stages.prealign(inputs, options.prealign, lambda _: None),
                                 options.grid_shape)
        fixed_t, moving_t = stages.tensors(grid, "cpu")
        field = stages.predict(model, fixed_t, moving_t, resolution=model.resolution(options.resolution),
                               amp=options.amp, io_lambda=options.io_lambda, io_fold_weight=options.io_fold_weight,
                               report=lambda _: None)
        cases.append((grid, fixed_t, moving_t, field.disp))
    print(f"# {len(pairs)} training pairs, {model.name}, affine pre-alignment: "
          + ", ".join(f"{p[1].name.split('.')[0]}→{p[0].name.split('.')[0]}" for p in pairs))
    old = ""
    if args.old_tree:
        old = f" {args.old_tree} s / pair | max field difference (voxels) |"
        tmp = tempfile.TemporaryDirectory()
        cases_file = os.path.join(tmp.name, "cases.pt")
        torch.save({k: [c[i] for c in cases] for k, i in (("fixed", 1), ("moving", 2), ("disp", 3))}, cases_file)
    print(f"| plan | λ | fold weight | Dice | NDV (%) | SDlogJ | refinement s / pair |{old}\n"
          f"|---|---|---|---|---|---|---|{'---|---|' if old else ''}")
    rows = [("network alone", None, None)] + list(itertools.product(args.plans, args.lambdas, args.fold))
    for plan, lam, fold in rows:
        dice, folds, logj, secs = [], [], [], []
        results = []
        for grid, fixed_t, moving_t, disp in cases:
            t = time.perf_counter()
            if lam is not None:
                disp = instance_optimise(fixed_t, moving_t, init_disp=disp, levels=_plan(plan), lam=lam,
                                         fold_weight=fold)
            secs.append(time.perf_counter() - t)
            results.append(disp)
            u = disp[0].numpy()
            dice.append(dice_mean(grid.fixed_seg, warp_labels_nearest(grid.moving_seg, u)))
            folds.append(ndv(u))
            logj.append(sdlogj(u))
        n = len(dice)
        extra = ""
        if old:
            extra = " – | – |"
            if lam is not None:
                old_fields, old_secs = _old_tree_refine(args.old_tree, cases_file, _plan(plan), lam, fold, args.threads)
                diff = max(float((a - b).abs().max()) for a, b in zip(results, old_fields))
                extra = f" {sum(old_secs) / n:.1f} | {diff:.2g} |"
        print(f"| {plan} | {'–' if lam is None else f'{lam:g}'} | {'–' if fold is None else f'{fold:g}'} | "
              f"{sum(dice) / n:.4f} | {sum(folds) / n:.4f} | {sum(logj) / n:.3f} | {sum(secs) / n:.1f} |{extra}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
