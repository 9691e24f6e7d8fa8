"""Render the README's accuracy table and target checks from one ``accuracy.py`` report.

    python benchmarks/readme_tables.py bench/accuracy_val.json            # print the Markdown
    python benchmarks/readme_tables.py bench/accuracy_val.json --update README.md

``--update`` replaces the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` (the table) and
between ``<!-- targets:start -->`` and ``<!-- targets:end -->`` (the target checks), so the README's numbers
are the report's numbers. Training steps per variant come from the bundled model cards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from napari_unireg.models.registry import RESOLUTION_MM as MM

ROOT = Path(__file__).resolve().parents[1]
PEER_LABELS = {
    "greedy": "Greedy (NCC 2×2×2, 100×50×10)",
    "ants": "ANTs SyN (antspyx defaults)",
}




def _card(model: str, weights_resolution: str | None = None) -> dict[str, Any]:
    """The bundled card of ``model``'s weights trained at ``weights_resolution`` (default: its main pair)."""
    path = ROOT / "models" / f"{model}.json"
    main = json.loads(path.read_text()) if path.is_file() else {}
    if weights_resolution and main.get("resolution", "full") != weights_resolution:
        path = ROOT / "models" / f"{model}.{weights_resolution}.json"  # the registry's per-resolution weights
        return json.loads(path.read_text()) if path.is_file() else {}
    return main


def _auto_on_cpu(model: str) -> str | None:
    """The weights (by training resolution) ``--resolution auto`` runs on a CPU; None for an unbundled model."""
    from napari_unireg.pipeline.models import weights_choice

    main = _card(model)
    if not main:
        return None
    trained = {main.get("resolution", "full"): main}
    trained.update({r: r for r in MM if (ROOT / "models" / f"{model}.{r}.json").is_file()})
    return weights_choice(trained, main.get("resolution", "full"), "auto", "cpu")


def _at(meta: dict[str, Any]) -> str:
    """`` at 2 mm`` (`` at 2 mm, 1 mm weights`` when they were trained at the other) for a row run at an asked
    resolution (``NAME@half``); empty for ``auto`` rows of a report that did not record it."""
    run, weights = meta.get("resolution"), meta.get("weights_resolution")
    if run not in MM:
        return ""
    return f" at {MM[run]}" + (f", {MM[weights]} weights" if weights in MM and weights != run else "")


def _steps(model: str, weights_resolution: str | None = None) -> str:
    """How many training steps the card records, and on what (a stage's ``hardware.device``)."""
    t = _card(model, weights_resolution).get("training", {})
    n = t.get("total_steps") or t.get("steps")
    if not n:
        return "untrained"
    stages = t.get("stages") or [t]
    gpu = sum(int(s.get("steps", 0)) for s in stages if str(s.get("hardware", {}).get("device", "")).startswith("cuda"))
    return f"{n:,} steps: {n - gpu:,} CPU + {gpu:,} GPU" if gpu else f"{n:,} CPU steps"


def _label(name: str, report: dict[str, Any], default_model: str) -> str:
    meta = report["methods"].get(name, {})
    if name.startswith("identity"):
        return "zero displacement (affine only)"
    if meta.get("kind") == "peer":
        if name == "voxelmorph":
            card = report.get("voxelmorph_card") or {}
            steps = card.get("steps")
            return f"VoxelMorph package ({steps} CPU steps)" if steps else "VoxelMorph package"
        return PEER_LABELS.get(name, name)
    model, io = meta.get("model", name), int(meta.get("io_steps", 0))
    bold = (f"**{model}** (default)" if model == default_model else model) + _at(meta)
    levels = meta.get("io_levels")
    if io and levels:  # e.g. [[2, 30, null, 9], [1, 5, 0.05, 9]]: (factor, steps, lr, window) pooled by 2, then 1
        grid = {1: "full", 2: "half"}
        steps = " + ".join(f"{lv[1]} {grid.get(lv[0], f'1/{lv[0]}')}-resolution" for lv in levels)
        return f"{bold} + refinement ({steps} steps)"
    if io:
        return f"{bold} + {io} refinement steps"
    return f"{bold}, network alone ({_steps(model, meta.get('weights_resolution'))})"


def _ratio(report: dict[str, Any], name: str, peer: str) -> str:
    """``peer``'s mean seconds over ``name``'s, both from the same run."""
    if name == peer:
        return "1"
    s, p = report["summary"].get(name), report["summary"].get(peer)
    if not s or not p or not s["seconds"]["mean"]:
        return "–"
    return f"×{p['seconds']['mean'] / s['seconds']['mean']:.1f}"


def results_table(report: dict[str, Any], default_model: str = "dp-vfa") -> str:
    """Markdown table: one row per method in the report's order."""
    rows = ["| method | Dice | HD95 (mm) | SDlogJ | NDV (%) | s / pair | Greedy s / ours |",
            "|---|---|---|---|---|---|---|"]
    order = list(report["order"])
    ours_net = [n for n in order if report["methods"].get(n, {}).get("kind") == "ours"
                and not report["methods"][n].get("io_steps")]
    ours_io = [n for n in order if report["methods"].get(n, {}).get("kind") == "ours"
               and report["methods"][n].get("io_steps")]
    rest = [n for n in order if n not in ours_net and n not in ours_io]
    ident = [n for n in rest if n.startswith("identity")]
    peers = [n for n in rest if n not in ident]
    for name in ident + ours_net + ours_io + peers:
        s = report["summary"].get(name)
        if not s:
            continue
        ratio = "–" if name.startswith("identity") else _ratio(report, name, "greedy")
        rows.append(
            f"| {_label(name, report, default_model)} | {s['dice']['mean']:.3f} ± {s['dice']['std']:.3f} | "
            f"{s['hd95']['mean']:.2f} | {s['sdlogj']['mean']:.3f} | {s['ndv']['mean']:.4f} | "
            f"{s['seconds']['mean']:.1f} | {ratio} |"
        )
    return "\n".join(rows)


def machine_line(report: dict[str, Any]) -> str:
    """Where and when the run was measured (the timings hold for that machine only), from the report itself."""
    m = report.get("machine", {})
    gpu = m.get("gpu") or "no GPU"
    load = ""
    if m.get("load_avg_start") is not None and m.get("load_avg_end") is not None:
        load = f"; 1-min load average {m['load_avg_start']:.1f} at the start, {m['load_avg_end']:.1f} at the end"
    date = f" ({report['date'][:10]})" if report.get("date") else ""
    return (f"Measured on {m.get('cpu', 'an unnamed CPU')}, {m.get('logical_cores', '?')} logical cores, "
            f"{m.get('threads', '?')} threads, {gpu}{load}{date}.")


#: The targets of issue 12 (network alone and with refinement), on the validation pairs, against Greedy.
DEFAULT_NDV_MAX = 0.05  # % of the brain, the default model alone
BEST_IC = "dp-convic-c"  # the paper's best variant
BEST_IC_DICE, BEST_IC_NDV_MAX = 0.715, 0.01
EVERY_DP_DICE = 0.70
SPEEDUP = 10.0  # the default model alone, × Greedy's speed
REFINED_MARGIN = 0.02  # Dice above Greedy's with refinement, still faster than Greedy


GPU_SECONDS = 0.1  # per pair, every DP variant at full resolution


def gpu_check(gpu: dict[str, Any] | None, source: str = "") -> str:
    """The GPU inference target judged on a ``benchmarks/gpu_run.py`` report (fp32: the precision ``register``
    uses on CUDA), or why it could not be."""
    rows = ((gpu or {}).get("stages", {}).get("inference") or {}).get("models") or {}
    timed = {n: r["fp32_s"] for n, r in rows.items() if isinstance(r.get("fp32_s"), (int, float))}
    head = f"* GPU (< {GPU_SECONDS} s per pair for every DP variant, full resolution)"
    if not timed or (gpu or {}).get("dry_run"):
        return f"{head}: not measured, no GPU was lent."
    slow = sorted((n for n in timed if timed[n] >= GPU_SECONDS), key=timed.get)
    where = gpu.get("machine", {}).get("gpu", "a GPU")
    verdict = "met" if not slow else "**not met**: " + ", ".join(f"{n} {timed[n]:.2f} s" for n in slow)
    ref = f"; `{source}`" if source else ""
    return (f"{head}: {len(timed) - len(slow)} of {len(timed)} on an {where} in fp32, "
            f"{min(timed.values()):.3f}–{max(timed.values()):.3f} s ({verdict}{ref}).")


def target_checks(report: dict[str, Any], default_model: str = "dp-vfa", gpu: dict[str, Any] | None = None,
                  gpu_source: str = "") -> str:
    """The issue's targets, each with the numbers it was judged on and, when missed, the gap (the GPU one from a
    ``benchmarks/gpu_run.py`` report, when given)."""
    summ, methods = report["summary"], report["methods"]
    greedy = summ.get("greedy")
    if not greedy:
        return "Greedy was not run: no targets can be checked."
    nets = [n for n in summ if methods.get(n, {}).get("kind") == "ours" and not methods[n].get("io_steps")]
    refined = [n for n in summ if methods.get(n, {}).get("kind") == "ours" and methods[n].get("io_steps")]
    g_d, g_s = greedy["dice"]["mean"], greedy["seconds"]["mean"]

    def ok(met: bool, gap: str = "") -> str:
        return "met" if met else f"**not met**{' by ' + gap if gap else ''}"

    def dice(n: str) -> float:
        return summ[n]["dice"]["mean"]

    lines = []
    auto_cpu = _auto_on_cpu(default_model)
    for n in nets:  # one line per resolution the default model was run at (its weight files, when it has two)
        if methods[n].get("model", n) != default_model:
            continue
        d, nd, sec = dice(n), summ[n]["ndv"]["mean"], summ[n]["seconds"]["mean"]
        which = _at(methods[n]).strip()
        if which and methods[n].get("weights_resolution") == auto_cpu:
            which += ": what `auto` runs on a CPU"
        elif which and methods[n].get("resolution") == methods[n].get("weights_resolution") == "full":
            which += ": `--resolution full`, and `auto` on a GPU"
        lines.append(f"* Default model alone ({default_model}{', ' + which if which else ''}): Dice {d:.3f} vs Greedy "
                     f"{g_d:.3f} (target ≥: {ok(d >= g_d, f'{g_d - d:.3f}')}); NDV {nd:.4f} % (target < "
                     f"{DEFAULT_NDV_MAX} %: {ok(nd < DEFAULT_NDV_MAX)}); ×{g_s / sec:.1f} Greedy's speed (target ≥ "
                     f"×{SPEEDUP:.0f}: {ok(g_s / sec >= SPEEDUP)}).")
    ic = [n for n in nets if methods[n].get("model", n) == BEST_IC]
    if ic:
        row = ic[0]
        d, nd = dice(row), summ[row]["ndv"]["mean"]
        lines.append(f"* {BEST_IC}{_at(methods[row])} alone: Dice {d:.3f} (target ≥ {BEST_IC_DICE}: "
                     f"{ok(d >= BEST_IC_DICE, f'{BEST_IC_DICE - d:.3f}')}); NDV {nd:.4f} % (target < "
                     f"{BEST_IC_NDV_MAX} %: {ok(nd < BEST_IC_NDV_MAX)}).")
    if nets:
        low = [n for n in nets if dice(n) < EVERY_DP_DICE]
        worst = min(nets, key=dice)
        lines.append(f"* Every DP variant alone ≥ {EVERY_DP_DICE:.2f}: {len(nets) - len(low)} of {len(nets)} ("
                     f"{ok(not low)}; lowest {worst} {dice(worst):.3f}).")
    if refined:
        best = max(refined, key=dice)
        sec = summ[best]["seconds"]["mean"]
        want = g_d + REFINED_MARGIN
        lines.append(f"* With refinement, Dice ≥ Greedy + {REFINED_MARGIN} ({want:.3f}) and faster than Greedy: "
                     f"best {best} {dice(best):.3f} in {sec:.1f} s vs Greedy's {g_s:.1f} s ("
                     f"{ok(dice(best) >= want and sec < g_s, f'{want - dice(best):.3f} Dice' if dice(best) < want else 'speed')}).")
    lines.append(gpu_check(gpu, gpu_source))
    return "\n".join(lines)


def _replace(text: str, tag: str, body: str) -> str:
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"error: the README has no {start} … {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="JSON written by benchmarks/accuracy.py")
    ap.add_argument("--update", default=None, help="README to rewrite between the markers")
    ap.add_argument("--gpu-report", default=None, help="report.json of benchmarks/gpu_run.py (the GPU target)")
    args = ap.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        gpu = json.loads(Path(args.gpu_report).read_text()) if args.gpu_report else None
        table = results_table(report) + "\n\n" + machine_line(report)
        targets = target_checks(report, gpu=gpu, gpu_source=args.gpu_report or "")
    except (OSError, ValueError, KeyError) as exc:
        which = f"{args.report} or {args.gpu_report}" if args.gpu_report else args.report
        print(f"error: {which} is not a complete report ({exc})", file=sys.stderr)
        return 2
    if args.update:
        path = Path(args.update)
        text = _replace(_replace(path.read_text(), "results", table), "targets", targets)
        path.write_text(text)
    print(table + "\n\n" + targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
