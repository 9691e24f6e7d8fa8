"""Refinement settings chosen on training pairs, never on the validation pairs.

The refinement (``--io-steps``, :mod:`napari_unireg.core.instance_opt`) has two weights: the diffusion weight
λ (``io_lambda``) and the folding penalty (``io_fold_weight``). This script registers labelled pairs of the
data set that are **not** validation pairs (both images have label maps; the pair, in either direction, is not in
``registration_val``) with the network and ``--io-steps`` refinement steps for every (λ, fold weight) given, and
prints mean Dice, NDV and seconds per setting: the numbers the defaults are chosen by.

    python benchmarks/refinement.py --data ../shared/data/dataset.json --pairs 3 --lambdas 1 2 4 --fold 0 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Learn2Reg dataset.json")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--model", default="default")
    ap.add_argument("--io-steps", type=int, default=50)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--fold", type=float, nargs="+", default=[0.0, 100.0], help="folding-penalty weights")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from napari_unireg.io import load_volume
    from napari_unireg.pipeline import RegisterOptions, register_volumes

    torch.set_num_threads(args.threads)
    pairs = training_pairs(Path(args.data).resolve(), args.pairs)
    if not pairs:
        print("error: no labelled non-validation pair in the data set", file=sys.stderr)
        return 2
    loaded = [[load_volume(str(p), kind=k) for p, k in zip(pair, ("image", "image", "label", "label"))]
              for pair in pairs]
    print(f"# {len(pairs)} training pairs: " + ", ".join(f"{p[1].name.split('.')[0]}→{p[0].name.split('.')[0]}"
                                                      for p in pairs))
    print("| λ | fold weight | Dice | NDV (%) | SDlogJ | s / pair |\n|---|---|---|---|---|---|")
    for lam, fold in itertools.product(args.lambdas, args.fold):
        dice, ndv, sdlogj, secs = [], [], [], []
        for fixed, moving, fseg, mseg in loaded:
            opts = RegisterOptions(model=args.model, device="cpu", prealign="none", io_steps=args.io_steps,
                                   io_lambda=lam, io_fold_weight=fold)
            t = time.perf_counter()
            m = register_volumes(fixed, moving, fseg, mseg, options=opts).metrics
            secs.append(time.perf_counter() - t)
            dice.append(m["dice"])
            ndv.append(m["ndv"])
            sdlogj.append(m["sdlogj"])
        n = len(dice)
        print(f"| {lam:g} | {fold:g} | {sum(dice) / n:.4f} | {sum(ndv) / n:.4f} | {sum(sdlogj) / n:.3f} | "
              f"{sum(secs) / n:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
