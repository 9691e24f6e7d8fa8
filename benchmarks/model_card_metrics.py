"""Measure a bundled model on the validation pairs and write the numbers into its model card.

    python benchmarks/model_card_metrics.py dp-vfa --data ../shared/data --io-steps 0 50

For each ``--io-steps`` value it runs ``register_volumes`` (the path of ``unireg register``, pre-alignment off:
the development data are already affinely aligned) on every pair of ``pairs_val.csv`` and records mean ± std of
Dice, HD95, SDlogJ, NDV, folded % and seconds. The card gets ``metrics`` (the network alone, io-steps 0),
``metrics_refined`` (the largest io-steps value), the per-pair numbers, the machine, and the zero-displacement
and Greedy rows of ``baselines_val.json`` for comparison. The card's weights are not touched.

    python benchmarks/model_card_metrics.py dp-vfa --from-report bench/accuracy_val.json

takes the numbers from a run of ``benchmarks/accuracy.py`` instead of measuring again (the same engine call and
the same scoring), so the cards and the README's benchmark table come from one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

KEYS = ("dice", "hd95", "sdlogj", "ndv", "folded_pct")


def _summary(rows: list[dict], keys=KEYS + ("seconds",)) -> dict:
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        out[k] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))} if len(vals) else None
    return out


def evaluate(model: str, data: Path, io_steps: int, device: str = "cpu", resolution: str = "auto") -> dict:
    import torch

    from napari_unireg.pipeline import RegisterOptions, register_volumes
    from napari_unireg.io import load_volume

    pairs = list(csv.DictReader(open(data / "pairs_val.csv")))
    rows = []
    for p in pairs:
        f, m = p["fixed"], p["moving"]
        vols = [load_volume(data / d / f"UNIREG_{i}_0000.nii.gz", kind=k)
                for d, i, k in (("imagesTr", f, "image"), ("imagesTr", m, "image"),
                                ("labelsTr", f, "label"), ("labelsTr", m, "label"))]
        opts = RegisterOptions(model=model, device=device, prealign="none", io_steps=io_steps, resolution=resolution)
        t = time.perf_counter()
        res = register_volumes(*vols, options=opts)
        row = {k: res.metrics.get(k) for k in KEYS}
        row.update(pair=f"{f}_{m}", seconds=res.metrics["seconds"]["registration"], wall=time.perf_counter() - t,
                   dice_before=res.metrics.get("dice_before"))
        print(f"{model} io{io_steps} {f}<-{m}: " + ", ".join(f"{k} {row[k]:.4f}" for k in KEYS)
              + f", {row['seconds']:.1f} s", flush=True)
        rows.append(row)
    return {"io_steps": io_steps, "summary": _summary(rows), "per_pair": rows,
            "threads": torch.get_num_threads(), "device": device}


def runs_from_report(report_path: Path, model: str, resolution: str | None = None) -> list[dict]:
    """``evaluate``-shaped runs of ``model`` (every io-steps value it ran) from an accuracy.py JSON report; with
    ``resolution``, only the rows of its weights trained at that resolution run at it (a model may bundle one
    weight file per resolution; reports older than that record neither and match)."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read the accuracy report {report_path}: {exc}") from None
    if not report.get("complete", True):
        raise SystemExit(f"{report_path} is a partial report (the run did not finish)")
    runs = []
    for name, info in report["methods"].items():
        if info.get("kind") != "ours" or info.get("model") != model:
            continue
        if resolution is not None and (info.get("weights_resolution", resolution) != resolution
                                       or info.get("resolution", resolution) != resolution):
            continue
        rows = [dict(report["per_pair"][pid][name], pair=pid) for pid in report["pairs"] if name in report["per_pair"][pid]]
        runs.append({"io_steps": int(info["io_steps"]), "summary": _summary(rows), "per_pair": rows,
                     "threads": report["machine"].get("threads"), "device": report["machine"].get("device", "cpu"),
                     "source": f"{report_path} ({report.get('date', '')})"})
    if not runs:
        raise SystemExit(f"{model} is not in {report_path}")
    return sorted(runs, key=lambda r: r["io_steps"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a bundled model (its main weights) or NAME.full / NAME.half (its weights "
                                   "trained at that resolution)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--io-steps", type=int, nargs="+", default=[0, 50])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--from-report", default=None, help="take the numbers from a benchmarks/accuracy.py JSON")
    ap.add_argument("--models-dir", default=str(Path(__file__).resolve().parents[1] / "models"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    card_path = Path(args.models_dir) / f"{args.model}.json"
    card = json.loads(card_path.read_text())
    name = card.get("architecture") or args.model
    if args.from_report:
        runs = runs_from_report(Path(args.from_report), name, card.get("resolution", "full"))
        command = f"python benchmarks/model_card_metrics.py {args.model} --from-report {args.from_report}"
    else:
        runs = [evaluate(name, data, n, args.device, card.get("resolution", "full")) for n in sorted(set(args.io_steps))]
        command = (f"python benchmarks/model_card_metrics.py {args.model} --data {args.data} "
                   f"--io-steps {' '.join(map(str, args.io_steps))}")
    base = json.loads((data / "baselines_val.json").read_text())

    def flat(summary):
        return {k: (v["mean"] if isinstance(v, dict) else v) for k, v in summary.items()}

    card["metrics"] = flat(runs[0]["summary"])
    card["metrics_std"] = {k: (v["std"] if isinstance(v, dict) else None) for k, v in runs[0]["summary"].items()}
    if len(runs) > 1:
        card["metrics_refined"] = dict(flat(runs[-1]["summary"]), io_steps=runs[-1]["io_steps"])
    else:  # an earlier refined row was measured on other weights or another run: never keep it beside these
        card.pop("metrics_refined", None)
    card["evaluation"] = {
        "pairs": "pairs_val.csv of the development data (6 pairs, 35 labels, 1 mm box), never trained on",
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{runs[0]['threads']} threads, {args.device}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "baselines": {
            name: {k: base[name]["mean"][kk]["mean"] for k, kk in
                   (("dice", "dice"), ("hd95", "hd95"), ("sdlogj", "sdlogj"), ("ndv", "ndv"),
                    ("seconds", "seconds"))}
            for name in ("affine", "greedy") if name in base
        },
    }
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=1))
    os.replace(tmp, card_path)
    print(json.dumps({"metrics": card["metrics"], "metrics_refined": card.get("metrics_refined")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
