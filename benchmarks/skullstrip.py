"""Skull-on registration with and without built-in brain extraction, against a known deformation.

The pair: the ICBM 2009c head with skull (``templates/icbm2009c_sym_t1.nii.gz`` of the development data) and a
copy deformed by a known smooth random field ``u`` (pull, voxel units): fixed(p) = head(p + u(p)), moving = head,
so a perfect registration returns ``u`` itself. The template's own brain mask and CerebrA labels are deformed
the same way (nearest) for the truth on the fixed grid. Three registrations with the engine (``--prealign``,
default ``none``):

* ``stripped``: the template's own brain-extracted image (``icbm2009c_sym_t1bet``), deformed likewise: the
  reference (what a user with skull-stripped inputs gets);
* ``auto``: the raw heads through :func:`napari_unireg.pipeline.skullstrip.skull_strip_stage` (``auto`` finds the skull
  on both and runs deepbet);
* ``off``: the raw heads as they are.

Printed: deepbet's brain-mask Dice against the template's own mask (fixed and moving), the mean and 95th
percentile displacement error inside the true fixed brain (mm), the mean CerebrA Dice after registration, and
seconds. Target (issue 14): ``auto`` within 0.02 Dice / 0.3 mm of ``stripped``; ``off`` visibly worse.

    python benchmarks/skullstrip.py                      # 1 thread, CPU, default model
    python benchmarks/skullstrip.py --threads 2 --magnitude 3 --json bench/skullstrip.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def smooth_field(shape, magnitude: float, sigma: float, seed: int):
    """A smooth random pull field ``3×shape`` (voxels): Gaussian-filtered noise scaled so its RMS is ``magnitude``."""
    import numpy as np
    from scipy.ndimage import gaussian_filter, zoom

    rng = np.random.default_rng(seed)
    coarse = tuple(max(4, int(round(n / 4))) for n in shape)  # filter at 1/4 resolution: seconds, not minutes
    u = np.stack([gaussian_filter(rng.standard_normal(coarse), sigma / 4, mode="wrap") for _ in range(3)])
    u = np.stack([zoom(c, [n / m for n, m in zip(shape, coarse)], order=1) for c in u])
    u *= magnitude / np.sqrt((u**2).sum(axis=0).mean())
    return u.astype(np.float32)


def pull(data, u, order: int):
    import numpy as np
    from scipy.ndimage import map_coordinates

    coords = np.indices(data.shape, dtype=np.float64) + u
    src = data.astype(np.float32) if order == 1 else data
    return map_coordinates(src, coords, order=order, mode="nearest", prefilter=False).astype(data.dtype)


def dice(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--magnitude", type=float, default=3.0, help="RMS of the known field in mm (default 3)")
    ap.add_argument("--sigma", type=float, default=12.0, help="smoothness of the known field in mm (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prealign", default="none", choices=["none", "affine"])
    ap.add_argument("--runs", nargs="+", default=["stripped", "auto", "off"], choices=["stripped", "auto", "off"])
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from napari_unireg.core.metrics import dice_mean
    from napari_unireg.pipeline import RegisterOptions, register_volumes
    from napari_unireg.io import load_volume
    from napari_unireg.pipeline.skullstrip import skull_strip_stage

    tdir = DATA / "templates"
    if not (tdir / "icbm2009c_sym_t1.nii.gz").is_file():
        print(f"no ICBM 2009c head under {tdir}", file=sys.stderr)
        return 2
    head = load_volume(tdir / "icbm2009c_sym_t1.nii.gz", kind="image")
    bet = load_volume(tdir / "icbm2009c_sym_t1bet.nii.gz", kind="image")
    mask = load_volume(tdir / "icbm2009c_sym_mask.nii.gz", kind="label")
    labels = load_volume(tdir / "icbm2009c_sym_CerebrA_labels.nii.gz", kind="label")
    u = smooth_field(head.shape, args.magnitude, args.sigma, args.seed)
    fixed_head = head.with_data(pull(head.data, u, 1), name="deformed head")
    fixed_bet = bet.with_data(pull(bet.data, u, 1), name="deformed brain")
    fixed_mask = pull(mask.data, u, 0) > 0
    fixed_labels = labels.with_data(pull(labels.data, u, 0))
    brain_u = np.sqrt((u**2).sum(axis=0))[fixed_mask]
    print(f"known field: RMS {args.magnitude} mm, sigma {args.sigma} mm; inside the brain mean {brain_u.mean():.2f} mm,"
          f" max {brain_u.max():.2f} mm; CerebrA Dice before registration "
          f"{dice_mean(fixed_labels.data, labels.data):.3f}")

    options = RegisterOptions(model=args.model, device=args.device, prealign=args.prealign)
    rows = []
    for run in args.runs:
        t0 = time.perf_counter()
        extra = {}
        if run == "stripped":
            f, m = fixed_bet, bet
        elif run == "off":
            f, m = fixed_head, head
        else:
            res = skull_strip_stage(fixed_head, head, "auto", args.device)
            f, m = res.fixed, res.moving
            extra = {
                "strip_s": time.perf_counter() - t0,
                "mask_dice_fixed": dice(res.fixed_mask.data, fixed_mask) if res.fixed_mask is not None else None,
                "mask_dice_moving": dice(res.moving_mask.data, mask.data) if res.moving_mask is not None else None,
                "messages": res.messages,
            }
            for msg in res.messages:
                print("  " + msg)
        result = register_volumes(f, m, fixed_labels, labels, options=options)
        err = np.sqrt(((result.disp_native - u) ** 2).sum(axis=0))[fixed_mask]
        rows.append({
            "run": run,
            "epe_mean_mm": float(err.mean()),
            "epe_p95_mm": float(np.percentile(err, 95)),
            "cerebra_dice": dice_mean(fixed_labels.data, result.warped_seg),
            "seconds": time.perf_counter() - t0,
            "model": result.model_name,
            **extra,
        })

    print()
    print(f"{'run':<9} {'mask Dice fixed':>15} {'mask Dice moving':>16} {'EPE mean mm':>11} {'EPE p95 mm':>10} "
          f"{'CerebrA Dice':>12} {'strip s':>7} {'total s':>7}")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"{r['run']:<9} {fmt(r.get('mask_dice_fixed'), '.3f'):>15} {fmt(r.get('mask_dice_moving'), '.3f'):>16} "
              f"{r['epe_mean_mm']:>11.2f} {r['epe_p95_mm']:>10.2f} {r['cerebra_dice']:>12.3f} "
              f"{fmt(r.get('strip_s'), '.1f'):>7} {r['seconds']:>7.1f}")
    by = {r["run"]: r for r in rows}
    if "stripped" in by and "auto" in by:
        dd = by["stripped"]["cerebra_dice"] - by["auto"]["cerebra_dice"]
        de = by["auto"]["epe_mean_mm"] - by["stripped"]["epe_mean_mm"]
        ok = dd <= 0.02 and de <= 0.3
        print(f"\nauto vs stripped: Dice {-dd:+.3f}, EPE {de:+.2f} mm -> target (≤ 0.02 Dice, ≤ 0.3 mm) "
              f"{'met' if ok else 'NOT met'}")
    if "stripped" in by and "off" in by:
        print(f"off vs stripped: Dice {by['off']['cerebra_dice'] - by['stripped']['cerebra_dice']:+.3f}, "
              f"EPE {by['off']['epe_mean_mm'] - by['stripped']['epe_mean_mm']:+.2f} mm")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
