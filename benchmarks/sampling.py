"""Trilinear warping on the CPU: one ``grid_sample`` call against the threaded one of ``core/sample.py``.

PyTorch's 3-D ``grid_sample`` on the CPU parallelises over batch items only, so a single volume runs on one core.
``napari_unireg.core.sample.warp`` cuts the sampling points of a single volume into one batch item per thread.
This script times both, side by side in one process (same tensors, best of ``--repeats``), for the
warps the product does: an image (1 channel) and a displacement (3 channels, as in ``compose``) on the half
(80×112×96) and the full (160×224×192) model grid, forward alone and forward + backward (the refinement's and
the training's case: gradients for the field).

    python benchmarks/sampling.py --threads 2 --out bench/sampling.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

SIZES = {"half": (80, 112, 96), "full": (160, 224, 192)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)

    import torch

    from napari_unireg.core import sample

    torch.set_num_threads(args.threads)
    one_call = lambda image, grid: 1  # noqa: E731  (the chunk count of a plain grid_sample call)
    threaded = sample._cpu_chunks
    rows = []
    for size in args.sizes:
        shape = SIZES[size]
        g = torch.Generator().manual_seed(0)
        for channels, what in ((1, "image"), (3, "field")):
            image = torch.rand(1, channels, *shape, generator=g)
            disp = (torch.randn(1, 3, *[s // 8 for s in shape], generator=g) * 3)
            disp = torch.nn.functional.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
            disp.requires_grad_(True)

            def forward():
                with torch.no_grad():
                    sample.warp(image, disp)

            def backward():
                sample.warp(image, disp).sum().backward()
                disp.grad = None

            times = {}
            for name, chooser in (("one call", one_call), ("threaded", threaded)):
                sample._cpu_chunks = chooser
                try:
                    times[name] = (_time(forward, args.repeats), _time(backward, args.repeats))
                finally:
                    sample._cpu_chunks = threaded
            (f1, b1), (f2, b2) = times["one call"], times["threaded"]
            rows.append(f"| {size} {'×'.join(map(str, shape))} | {what} ({channels} ch) | {f1:.3f} | {f2:.3f} | "
                        f"{f1 / f2:.2f}× | {b1:.3f} | {b2:.3f} | {b1 / b2:.2f}× |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        "# Trilinear warp on the CPU: one grid_sample call vs threaded (`benchmarks/sampling.py`)",
        "",
        f"* Machine: {_cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads, torch "
        f"{torch.__version__}; 1-min load average {load:.1f} at the end",
        f"* Seconds, best of {args.repeats}, both variants one after the other in one process on the same tensors.",
        "",
        "| grid | warped | forward: one call | threaded | gain | forward + backward: one call | threaded | gain |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
