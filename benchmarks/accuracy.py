"""Accuracy, speed and smoothness of our variants side by side with Greedy, ANTs SyN and VoxelMorph.

Registers the validation pairs of a Learn2Reg data set (``registration_val`` of ``dataset.json``, else
``pairs_val.csv`` beside it, or ``--pairs FILE``) with

* every variant with bundled weights (``unireg models``) and ``classical``, each with every ``--io-steps`` value
  (0 = the network alone; ``classical`` runs once, it is itself an instance optimisation);
* the peers that are installed: Greedy (``picsl-greedy``, the command of ``baselines_val.json``), ANTs SyN
  (``antspyx``) and the VoxelMorph package (``voxelmorph``, with ``--voxelmorph-weights`` from
  ``python benchmarks/peers.py train-voxelmorph``). A missing peer is skipped and the report says why.

Every method is scored the same way: from its displacement on the fixed image's canonical grid (voxel units,
pull; the Learn2Reg convention) with :func:`napari_unireg.core.metrics.evaluate_registration`: Dice and HD95 over
the labels, SDlogJ, NDV (mask = fixed image > 0), % of voxels with J ≤ 0; plus seconds per pair (the
registration call only: for ours ``register_volumes``'s model loading + resampling + network + refinement, for a
peer its registration call, measured in the same process, one after the other). Peer fields (ITK, LPS mm) are
converted and checked on every pair: our warp of the moving image must reproduce the peer's own resliced image
(correlation ≥ 0.99, else the run stops).

    python benchmarks/accuracy.py --data ../shared/data/dataset.json --threads 2 --out bench/accuracy.json
    python benchmarks/accuracy.py --max-pairs 1 --models classical --peers greedy --out bench/smoke.json

Writes ``--out`` (JSON: machine, versions, per pair and per method, summary, ratios) and the Markdown report
beside it (``.md``), and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: import peers.py

import peers  # noqa: E402

#: Metrics of the report, in order: (key, header, format, better).
METRICS = [
    ("dice", "Dice", "{:.4f}", "higher"),
    ("hd95", "HD95 (mm)", "{:.2f}", "lower"),
    ("sdlogj", "SDlogJ", "{:.4f}", "lower"),
    ("ndv", "NDV (%)", "{:.4f}", "lower"),
    ("folded_pct", "J≤0 (%)", "{:.4f}", "lower"),
    ("seconds", "s / pair", "{:.1f}", "lower"),
]
CLASSICAL = "classical"
IDENTITY = "identity (affine only)"


# --------------------------------------------------------------------------------------------- machine
def machine_info(threads: int, device: str) -> dict[str, Any]:
    """CPU model, logical cores, threads used, GPU (when used), load average, versions."""
    import torch

    from napari_unireg.train.distributed import cpu_model

    cpu = cpu_model()
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    from napari_unireg import __version__

    info["versions"]["napari_unireg"] = __version__
    for name in peers.PEERS:
        v = peers.peer_version(name)
        if v:
            info["versions"][peers.DISTRIBUTIONS[name]] = v
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine, for the Markdown report."""
    text = f"{m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} threads"
    text += f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU used"
    if m.get("load_avg_start") is not None:
        text += f"; 1-min load average {m['load_avg_start']:.1f} at start"
        if m.get("load_avg_end") is not None:
            text += f", {m['load_avg_end']:.1f} at end"
    return text


# --------------------------------------------------------------------------------------------- data
def resolve_pairs(data: str, pairs: str | None) -> tuple[list[tuple[Any, Any]], str]:
    """Validation pairs ``[(fixed Entry, moving Entry)]`` as ``unireg train`` resolves them, and the source."""
    from napari_unireg.errors import UserError
    from napari_unireg.train.data import discover

    src = Path(data).expanduser()
    if src.is_dir() and (src / "dataset.json").is_file():
        src = src / "dataset.json"
    cfg = SimpleNamespace(source=str(src), labels=None, val_pairs=pairs or "auto", exclude_val_pairs=True,
                          exclude_val_subjects=False)
    tset = discover(cfg, None)
    if not tset.val_pairs:
        raise UserError(f"{src}: no validation pairs (registration_val, pairs_val.csv or --pairs FILE)")
    return tset.val_pairs, str(src)


def load_pair(fixed_entry, moving_entry) -> dict[str, Any]:
    """Canonical fixed/moving images and (when both exist) label maps; they must share one grid."""
    from napari_unireg.errors import UserError
    from napari_unireg.io import load_volume

    fixed, moving = load_volume(fixed_entry.image, "image"), load_volume(moving_entry.image, "image")
    if fixed.shape != moving.shape or not np.allclose(fixed.affine, moving.affine, atol=1e-3):
        raise UserError(f"pair {fixed_entry.id}-{moving_entry.id}: the images are not on one grid "
                        "(the benchmark expects Learn2Reg data, pre-aligned on one grid)")
    fseg = mseg = None
    if fixed_entry.label and moving_entry.label:
        fseg, mseg = load_volume(fixed_entry.label, "label"), load_volume(moving_entry.label, "label")
    return {"fixed": fixed, "moving": moving, "fixed_seg": fseg, "moving_seg": mseg,
            "fixed_path": fixed_entry.image, "moving_path": moving_entry.image,
            "id": f"{fixed_entry.id}_{moving_entry.id}"}


def score(disp: np.ndarray, pair: dict[str, Any]) -> dict[str, Any]:
    """The report's metrics for one displacement (``3×X×Y×Z`` on the fixed canonical grid)."""
    from napari_unireg.core.metrics import evaluate_registration

    fseg, mseg = pair["fixed_seg"], pair["moving_seg"]
    m = evaluate_registration(disp, None if fseg is None else fseg.data, None if mseg is None else mseg.data,
                              fixed_image=pair["fixed"].data)
    keep = ("dice", "hd95", "sdlogj", "ndv", "folded_pct", "hd95_undefined_labels", "dice_before")
    return {k: m[k] for k in keep if k in m}


# --------------------------------------------------------------------------------------------- methods
#: what a registration's metrics say about the weights that ran (``napari_unireg.pipeline.register``)
WEIGHT_FACTS = ("resolution", "weights_resolution", "weights_sha256")


def our_methods(models: list[str] | None, io_steps: list[int]) -> list[dict[str, Any]]:
    """``[{'name', 'model', 'resolution', 'io_steps', 'trained'}]``: bundled variants (or ``models``) × io_steps,
    + classical. ``NAME@full`` / ``NAME@half`` runs a model at that resolution (its weights trained at it, when it
    bundles them: ``--models dp-vfa@full dp-vfa@half`` compares a model's two weight files); plain ``NAME`` runs
    at ``auto``, what ``unireg register`` does on this device."""
    from napari_unireg.core.instance_opt import refinement_levels
    from napari_unireg.models.registry import RESOLUTIONS, list_models

    infos = {m.name: m for m in list_models()}
    names = models if models is not None else [m.name for m in infos.values() if m.weights] + [CLASSICAL]
    out = []
    for spec in names:
        name, _, resolution = spec.partition("@")
        resolution = resolution or "auto"
        if name != CLASSICAL and name not in infos and not Path(name).exists():
            from napari_unireg.errors import UserError

            raise UserError(f"unknown model {name!r}; `unireg models` lists them")
        if resolution not in ("auto", *RESOLUTIONS):
            raise SystemExit(f"error: {spec}: the resolution after @ is one of {', '.join(RESOLUTIONS)}")
        trained = name == CLASSICAL or Path(name).exists() or infos[name].weights
        for io in ([0] if name == CLASSICAL else io_steps):
            label = spec if io == 0 else f"{spec} + IO {io}"
            if not trained:
                label += " (untrained)"
            out.append({"name": label, "model": name, "resolution": resolution, "io_steps": int(io),
                        "trained": bool(trained), "kind": "ours",
                        "io_levels": [list(level) for level in refinement_levels(int(io))]})
    return out


def run_ours(method: dict[str, Any], pair: dict[str, Any], device: str,
             prealign: str) -> tuple[np.ndarray, float, dict]:
    """``(disp on the fixed canonical grid, seconds, engine seconds)`` for one of our methods; ``method`` gets
    the engine's facts of which weights ran at what resolution (:data:`WEIGHT_FACTS`)."""
    from napari_unireg.pipeline import RegisterOptions, register_volumes

    model = method["model"]
    opts = RegisterOptions(model=model if not Path(model).exists() else "default",
                           checkpoint=model if Path(model).exists() else None,
                           device=device, prealign=prealign, io_steps=method["io_steps"],
                           resolution=method.get("resolution", "auto"), contrast=method.get("contrast", "scale"))
    res = register_volumes(pair["fixed"], pair["moving"], options=opts)
    # the report names the weights that ran (a model may bundle one file per resolution)
    method.update({k: res.metrics[k] for k in WEIGHT_FACTS if k in res.metrics})
    return res.disp_native, float(res.seconds["registration"]), dict(res.seconds)


def run_peer(name: str, pair: dict[str, Any], work: Path, args, vxm) -> tuple[np.ndarray, float, dict]:
    """``(disp, seconds, info)`` for a peer, after checking the field conversion on this pair."""
    if name == "greedy":
        r = peers.run_greedy(pair["fixed_path"], pair["moving_path"], pair["fixed"], work, args.threads)
        check = peers.verify_conversion(r.disp, pair["moving"].data, r.resliced, name="greedy")
    elif name == "ants":
        r = peers.run_ants(pair["fixed_path"], pair["moving_path"], pair["fixed"], work, args.threads,
                           transform=args.ants_transform)
        check = peers.verify_conversion(r.disp, pair["moving"].data, r.resliced, name="ants")
    elif name == "voxelmorph":
        model, card = vxm
        r = peers.run_voxelmorph(model, card, pair["fixed"], pair["moving"], device=args.device_resolved)
        check = peers.verify_conversion(r.extra["net_disp"], r.extra["net_moving"], r.resliced, name="voxelmorph")
    else:  # pragma: no cover - names are checked in main
        raise ValueError(name)
    return r.disp, r.seconds, {"command": r.command, "conversion_check": check}


# --------------------------------------------------------------------------------------------- summary
def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, int | float) and math.isfinite(v)]


def summarize(per_pair: dict[str, dict[str, dict[str, Any]]], order: list[str]) -> dict[str, dict[str, Any]]:
    """``{method: {metric: {'mean', 'std', 'n'}}}`` over the pairs (population std, NaNs skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for method in order:
        rows = [per_pair[p][method] for p in per_pair if method in per_pair[p]]
        out[method] = {}
        for key, *_ in METRICS:
            vals = _finite(r.get(key) for r in rows)
            out[method][key] = ({"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
                                if vals else {"mean": None, "std": None, "n": 0})
    return out


def speed_ratios(per_pair: dict[str, dict[str, dict[str, Any]]], ours: list[str], peer_names: list[str]) -> dict:
    """``{our method: {peer: {'ours_s', 'peer_s', 'ratio'}}}``: mean seconds over the pairs both ran (same run),
    ratio = peer / ours (> 1: ours is faster)."""
    out: dict[str, dict[str, Any]] = {}
    for m in ours:
        out[m] = {}
        for p in peer_names:
            pairs = [k for k in per_pair if m in per_pair[k] and p in per_pair[k]]
            if not pairs:
                continue
            t_ours = float(np.mean([per_pair[k][m]["seconds"] for k in pairs]))
            t_peer = float(np.mean([per_pair[k][p]["seconds"] for k in pairs]))
            out[m][p] = {"ours_s": t_ours, "peer_s": t_peer, "ratio": t_peer / t_ours if t_ours > 0 else None,
                         "n_pairs": len(pairs)}
    return out


def _cell(stat: dict[str, Any] | None, fmt: str) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def format_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: machine, methods × metrics (mean ± std), same-run speed ratios, skipped peers,
    conversion checks."""
    lines = ["# Registration benchmark: accuracy, smoothness and speed", ""]
    lines.append(f"* Machine: {machine_line(report['machine'])}")
    lines.append(f"* Data: {report['data']} — {report['n_pairs']} pair(s): {', '.join(report['pairs'])}")
    lines.append(f"* Date: {report.get('date', '')}; pre-alignment of our methods: {report.get('prealign', 'none')}")
    lines.append("")
    head = "| method | " + " | ".join(h for _, h, _, _ in METRICS) + " |"
    lines += [head, "|" + "---|" * (len(METRICS) + 1)]
    for method in report["order"]:
        s = report["summary"].get(method, {})
        lines.append(f"| {method} | " + " | ".join(_cell(s.get(k), f) for k, _, f, _ in METRICS) + " |")
    lines.append("")
    lines.append("Mean ± std over the pairs. Dice/HD95 over the labels present; SDlogJ = std log(J+3) (Learn2Reg); "
                 "NDV = non-diffeomorphic volume (% of the fixed brain); J≤0 = % of voxels with a central-difference "
                 "Jacobian ≤ 0; seconds = the registration call only.")
    ratios = report.get("speed_ratios") or {}
    peer_cols = sorted({p for r in ratios.values() for p in r})
    if peer_cols:
        lines += ["", "## Speed, measured in the same run", "",
                  "| our method | our s/pair | " + " | ".join(f"{p} s/pair | {p} / ours" for p in peer_cols) + " |",
                  "|" + "---|" * (2 + 2 * len(peer_cols))]
        for m, row in ratios.items():
            if not row:
                continue
            ours_s = next(iter(row.values()))["ours_s"]
            cells = []
            for p in peer_cols:
                r = row.get(p)
                ratio = f"×{r['ratio']:.1f}" if r and r["ratio"] else "–"
                cells += [f"{r['peer_s']:.1f}", ratio] if r else ["–", "–"]
            lines.append(f"| {m} | {ours_s:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("A ratio above 1 means our method is that many times faster than the peer on this machine.")
    checks = report.get("conversion_checks") or {}
    if checks:
        lines += ["", "## Peer field conversion check", "",
                  "Our warp of the moving image with the converted peer field vs the peer's own resliced image, "
                  f"where both sample inside the moving image (required: correlation ≥ {peers.MIN_CORRELATION}, "
                  f"residual mean|ours − peer| / mean|moving − peer| ≤ {peers.MAX_RESIDUAL}):", ""]
        for p, vals in checks.items():
            cs = [v["corr"] for v in vals]
            rs = [v.get("residual", float("nan")) for v in vals]
            md = max(v["max_abs_diff"] for v in vals)
            lines.append(f"* {p}: correlation min {min(cs):.6f}, residual max {max(rs):.2e}, "
                         f"max |difference| {md:.2e} over {len(cs)} pair(s)")
    skipped = report.get("skipped") or {}
    if skipped:
        lines += ["", "## Skipped", ""] + [f"* {k}: {v}" for k, v in skipped.items()]
    commands = report.get("commands") or {}
    if commands:
        lines += ["", "## Peer commands", ""] + [f"* {k}: `{v}`" for k, v in commands.items()]
    return "\n".join(lines) + "\n"


def _json_ready(obj):
    from napari_unireg.pipeline import json_ready

    return json_ready(obj)


def write_report(report: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out`` (JSON, NaN → null) and the Markdown beside it (same stem, ``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    for path, text in ((out, json.dumps(_json_ready(report), indent=1)), (md, format_markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # readers never see a half-written report
    return out, md


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "dataset.json"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data), help="Learn2Reg dataset.json (or its folder)")
    p.add_argument("--pairs", default=None, help="pairs file (CSV fixed,moving ids or paths); default: the data set's")
    p.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs (smoke runs)")
    p.add_argument("--models", nargs="+", default=None,
                   help="our methods (registry names, 'classical' or checkpoint paths); default: bundled + classical")
    p.add_argument("--io-steps", nargs="+", type=int, default=[0, 30], help="refinement steps to run (0 = none)")
    p.add_argument("--peers", nargs="*", default=list(peers.PEERS), help="peers to run (default: all installed)")
    p.add_argument("--voxelmorph-weights", default=None, help="folder written by peers.py train-voxelmorph")
    p.add_argument("--ants-transform", default="SyN", help="ANTsPy type_of_transform (default SyN)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (torch, Greedy, ANTs)")
    p.add_argument("--device", default="cpu", help="device of our methods and VoxelMorph: cpu | cuda | auto")
    p.add_argument("--prealign", default="none", choices=["none", "affine"],
                   help="our pre-alignment (Learn2Reg data are already affinely aligned: none, like the peers)")
    p.add_argument("--out", default="benchmark_accuracy.json", help="JSON report; the Markdown goes beside it")
    p.add_argument("--workdir", default=None, help="keep the peers' files here (default: a temporary folder)")
    return p.parse_args(argv)


def run(args) -> dict[str, Any]:
    """The whole benchmark; returns the report (also written to ``args.out``)."""
    import torch

    from napari_unireg.pipeline import resolve_device
    from napari_unireg.errors import UserError

    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    args.device_resolved = str(resolve_device(args.device))
    pairs, source = resolve_pairs(args.data, args.pairs)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    methods = our_methods(args.models, sorted(set(args.io_steps)))

    skipped: dict[str, str] = {}
    peer_names: list[str] = []
    vxm = None
    for name in args.peers:
        if name not in peers.PEERS:
            raise UserError(f"unknown peer {name!r} (known: {', '.join(peers.PEERS)})")
        ok, text = peers.peer_available(name)
        if not ok:
            skipped[name] = text
            continue
        if name == "voxelmorph":
            if not args.voxelmorph_weights:
                skipped[name] = ("no --voxelmorph-weights (train them first: python benchmarks/peers.py "
                                 "train-voxelmorph --data DATASET.json --out runs/vxm)")
                continue
            vxm = peers.load_voxelmorph(args.voxelmorph_weights, device=args.device_resolved)
        peer_names.append(name)
    for name, why in skipped.items():
        print(f"# skipping {name}: {why}", file=sys.stderr)

    machine = machine_info(args.threads, args.device_resolved)
    order = [IDENTITY] + [m["name"] for m in methods] + peer_names
    per_pair: dict[str, dict[str, dict[str, Any]]] = {}
    checks: dict[str, list[dict[str, float]]] = {}
    commands: dict[str, str] = {}
    engine_seconds: dict[str, dict[str, Any]] = {}
    def make_report(complete: bool) -> dict[str, Any]:
        machine["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        ours = [m["name"] for m in methods]
        return {
            "complete": complete,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "machine": machine,
            "data": source,
            "n_pairs": len(per_pair),
            "pairs": list(per_pair),
            "prealign": args.prealign,
            "order": order,
            "methods": {**{m["name"]: {k: m[k] for k in ("model", "io_steps", "io_levels", "trained", "kind",
                                                          *WEIGHT_FACTS) if k in m}
                           for m in methods},
                        **{p: {"kind": "peer", "version": peers.peer_version(p)} for p in peer_names}},
            "summary": summarize(per_pair, order),
            "speed_ratios": speed_ratios(per_pair, ours, peer_names),
            "per_pair": per_pair,
            "engine_seconds": engine_seconds,
            "conversion_checks": checks,
            "commands": commands,
            "voxelmorph_card": vxm[1] if vxm is not None else None,
            "skipped": skipped,
        }

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="unireg_bench_"))
    try:
        for fe, me in pairs:
            pair = load_pair(fe, me)
            pid = pair["id"]
            per_pair[pid] = {}
            zero = np.zeros((3, *pair["fixed"].shape), dtype=np.float32)
            per_pair[pid][IDENTITY] = {**score(zero, pair), "seconds": 0.0}
            for m in methods:
                disp, seconds, eng = run_ours(m, pair, args.device, args.prealign)
                per_pair[pid][m["name"]] = {**score(disp, pair), "seconds": seconds}
                engine_seconds.setdefault(m["name"], {})[pid] = eng
                _progress(pid, m["name"], per_pair[pid][m["name"]])
            for name in peer_names:
                disp, seconds, info = run_peer(name, pair, tmp / pid / name, args, vxm)
                per_pair[pid][name] = {**score(disp, pair), "seconds": seconds,
                                       "conversion_corr": info["conversion_check"]["corr"]}
                checks.setdefault(name, []).append({"pair": pid, **info["conversion_check"]})
                commands[name] = info["command"]
                _progress(pid, name, per_pair[pid][name])
            if getattr(args, "out", None):  # a killed run keeps the pairs done so far
                write_report(make_report(complete=False), args.out)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return make_report(complete=True)


def _progress(pid: str, method: str, row: dict[str, Any]) -> None:
    dice = row.get("dice")
    d = f"Dice {dice:.4f}, " if dice is not None else ""
    extra = f", conversion corr {row['conversion_corr']:.5f}" if "conversion_corr" in row else ""
    print(f"# {pid} {method}: {d}SDlogJ {row['sdlogj']:.4f}, NDV {row['ndv']:.4f}, {row['seconds']:.1f} s{extra}",
          file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from napari_unireg.errors import UserError

    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    js, md = write_report(report, args.out)
    print(format_markdown(report))
    print(f"# written {js} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
