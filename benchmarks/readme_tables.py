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

ROOT = Path(__file__).resolve().parents[1]
PEER_LABELS = {
    "greedy": "Greedy (NCC 2×2×2, 100×50×10)",
    "ants": "ANTs SyN (antspyx defaults)",
}


def _card(model: str) -> dict[str, Any]:
    path = ROOT / "models" / f"{model}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _steps(model: str) -> str:
    t = _card(model).get("training", {})
    n = t.get("total_steps") or t.get("steps")
    return f"{n} CPU steps" if n else "untrained"


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
    bold = f"**{model}** (default)" if model == default_model else model
    if io:
        return f"{bold} + {io} refinement steps"
    return f"{bold}, network alone ({_steps(model)})"


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


def target_checks(report: dict[str, Any]) -> str:
    """The issue's CPU targets, each with the numbers it was judged on."""
    summ, methods = report["summary"], report["methods"]
    greedy, ants = summ.get("greedy"), summ.get("ants")
    if not greedy:
        return "Greedy was not run: no targets can be checked."
    nets = [n for n in summ if methods.get(n, {}).get("kind") == "ours" and not methods[n].get("io_steps")]
    refined = [n for n in summ if methods.get(n, {}).get("kind") == "ours" and methods[n].get("io_steps")]
    g_d, g_n, g_s = greedy["dice"]["mean"], greedy["ndv"]["mean"], greedy["seconds"]["mean"]
    best = max(nets, key=lambda n: summ[n]["dice"]["mean"]) if nets else None
    lines = []
    if best:
        d, nd, sec = summ[best]["dice"]["mean"], summ[best]["ndv"]["mean"], summ[best]["seconds"]["mean"]
        ok = lambda c: "met" if c else "**not met**"  # noqa: E731
        lines.append(f"* Best variant alone ({best}): ×{g_s / sec:.1f} Greedy's speed (target ≥ ×10: "
                     f"{ok(g_s / sec >= 10)}); Dice {d:.3f} vs Greedy {g_d:.3f} (target ≥: {ok(d >= g_d)}); "
                     f"NDV {nd:.4f} % vs Greedy {g_n:.4f} % (target below: {ok(nd < g_n)}"
                     + ("; Greedy's NDV is exactly 0, so no method can be below it" if g_n == 0 else "") + ").")
        fast = [n for n in nets if g_s / summ[n]["seconds"]["mean"] >= 10]
        if fast:
            fb = max(fast, key=lambda n: summ[n]["dice"]["mean"])
            lines.append(f"* Most accurate variant at ≥ ×10 Greedy's speed: {fb}, Dice "
                         f"{summ[fb]['dice']['mean']:.3f} (Greedy − {g_d - summ[fb]['dice']['mean']:.3f}).")
    if ants and refined:
        a_d = ants["dice"]["mean"]
        above = [n for n in refined if summ[n]["dice"]["mean"] > a_d]
        lines.append(f"* With refinement, Dice above ANTs SyN ({a_d:.3f}): {len(above)} of {len(refined)} "
                     f"({'met' if len(above) == len(refined) else '**not met** for all'}; lowest "
                     f"{min(summ[n]['dice']['mean'] for n in refined):.3f}).")
    lines.append("* H100 (< 0.1 s per pair for every DP variant): not measured, no GPU was lent.")
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
    args = ap.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        table, targets = results_table(report), target_checks(report)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.report} is not a complete accuracy report ({exc})", file=sys.stderr)
        return 2
    if args.update:
        path = Path(args.update)
        text = _replace(_replace(path.read_text(), "results", table), "targets", targets)
        path.write_text(text)
    print(table + "\n\n" + targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
