"""Robustness of the networks to what other scanners and protocols do to an image, on the validation pairs.

Every validation pair is registered twice per model: as it is (``clean``) and with both images made harder
(``hard``): another contrast mapping (a gamma of 0.6 or 1.6), a smooth multiplicative bias field (±25 %), noise
(3 % of the bright end, inside the brain) and thick slices (2× along the inferior-superior axis, blurred and
interpolated back). The corruption of each image is fixed by its seed, the same for every model, so the models
see identical inputs. Scoring is the accuracy benchmark's (Dice over the labels, NDV, …) on the fixed grid.

    python benchmarks/robustness.py --data ../shared/data/dataset.json --models dp-vfa runs/x/dp-vfa.safetensors \
        dp-convic-c@half --threads 2 --out bench/robustness_val.json

``--contrast scale standardize`` runs every model once per way of preparing its input contrast (the engine's
``RegisterOptions.contrast``; rows of ``standardize`` are named ``MODEL +std``).
``--peers greedy`` also registers every clean and hard pair with Greedy (the accuracy benchmark's command, on the
images written to a temporary folder): whether a network loses more than the classical method on harder images.

The validation pairs are for measuring, never for choosing a training recipe by (the held-out brains the
project is judged on are another scanner and labelling protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import accuracy  # noqa: E402

GAMMAS = (0.6, 1.6)
BIAS = 0.25
NOISE = 0.03
SLICE_FACTOR = 2


def corrupt(data: np.ndarray, seed: int) -> np.ndarray:
    """A harder copy of a brain-extracted image (``X×Y×Z``, background 0, canonical RAS: axis 2 = I→S)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = np.asarray(data, dtype=np.float32)
    brain = x > 0
    hi = float(np.percentile(x[brain], 99.5))
    x = np.clip(x / hi, 0, 1) ** GAMMAS[seed % len(GAMMAS)]  # another contrast mapping
    coarse = rng.normal(0.0, 1.0, size=tuple(max(2, s // 40) for s in x.shape))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(x.shape, coarse.shape)], order=3)
    x = x * np.exp(BIAS * field / max(float(np.abs(field).max()), 1e-6))  # bias field
    x = x + brain * rng.normal(0.0, NOISE, size=x.shape).astype(np.float32)  # noise inside the brain
    thick = ndimage.uniform_filter1d(x, SLICE_FACTOR, axis=2)[:, :, ::SLICE_FACTOR]  # thick slices, then back
    x = ndimage.zoom(thick, (1, 1, x.shape[2] / thick.shape[2]), order=1)[:, :, : data.shape[2]]
    return np.where(brain, np.clip(x, 0, None), 0).astype(np.float32)


def harder(pair: dict, index: int) -> dict:
    out = dict(pair)
    out["fixed"] = pair["fixed"].with_data(corrupt(pair["fixed"].data, 2 * index), is_label=False)
    out["moving"] = pair["moving"].with_data(corrupt(pair["moving"].data, 2 * index + 1), is_label=False)
    return out


def with_files(pair: dict, folder: Path) -> dict:
    """``pair`` with its two images written as NIfTI (their canonical arrays and affines) for a file-based peer."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    out = dict(pair)
    for role in ("fixed", "moving"):
        path = folder / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(pair[role].data, np.float32), pair[role].affine), str(path))
        out[f"{role}_path"] = str(path)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/dataset.json")
    p.add_argument("--models", nargs="+", default=["dp-vfa"],
                   help="registry names or .safetensors checkpoints, each optionally @full or @half (the resolution "
                        "it runs at, its weights trained at it when bundled; default auto, as in accuracy.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--contrast", nargs="+", default=["scale"], choices=["scale", "standardize"],
                   help="the networks' input contrast, one row per model and mode")
    p.add_argument("--peers", nargs="*", default=[], choices=["greedy"], help="classical methods to run beside")
    p.add_argument("--out", default="bench/robustness_val.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    methods = [m | {"contrast": c, "name": m["name"] + (" +std" if c == "standardize" else "")}
               for m in accuracy.our_methods(args.models, [0]) for c in args.contrast]  # the network alone
    pairs, source = accuracy.resolve_pairs(args.data, None)
    pairs = pairs[: args.max_pairs] if args.max_pairs else pairs
    rows: dict[str, dict[str, list[dict]]] = {}
    t0 = time.time()
    work = tempfile.TemporaryDirectory(prefix="robustness-")
    for i, (f, m) in enumerate(pairs):
        clean = accuracy.load_pair(f, m)
        for variant, pair in (("clean", clean), ("hard", harder(clean, i))):
            if args.peers:  # Greedy reads files
                pair = with_files(pair, Path(work.name) / f"{clean['id']}_{variant}")
            runs = [(m["name"], accuracy.run_ours, (dict(m), pair, "cpu", "none")) for m in methods]
            runs += [(peer, accuracy.run_peer, (peer, pair, Path(work.name) / peer, args, None)) for peer in args.peers]
            for model, fn, fn_args in runs:
                disp, seconds, _ = fn(*fn_args)
                row = accuracy.score(disp, pair) | {"seconds": seconds, "pair": clean["id"]}
                rows.setdefault(model, {}).setdefault(variant, []).append(row)
                print(f"{clean['id']} {variant:5s} {model}: Dice {row['dice']:.4f} NDV {row['ndv']:.4f}", flush=True)
    summary = {
        model: {v: {k: float(np.mean([r[k] for r in rs])) for k in ("dice", "hd95", "sdlogj", "ndv")}
                for v, rs in by.items()}
        for model, by in rows.items()
    }
    report = {"source": source, "machine": accuracy.machine_line(accuracy.machine_info(args.threads, "cpu")),
              "corruption": {"gammas": GAMMAS, "bias": BIAS, "noise": NOISE, "slice_factor": SLICE_FACTOR},
              "minutes": (time.time() - t0) / 60, "summary": summary, "per_pair": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = ["| model | Dice clean | Dice hard | drop | NDV clean (%) | NDV hard (%) |", "|---|---|---|---|---|---|"]
    for model, s in summary.items():
        c, h = s["clean"], s["hard"]
        lines.append(f"| {model} | {c['dice']:.4f} | {h['dice']:.4f} | {c['dice'] - h['dice']:.4f} | "
                     f"{c['ndv']:.4f} | {h['ndv']:.4f} |")
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(f"# Robustness on the validation pairs\n\n{report['machine']}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
