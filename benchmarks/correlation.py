"""The 27-offset local correlation on the CPU: autograd of the definition against ``core/correlation.py``.

``corr_k(p) = Σ_c A_c(p)·B_c(p + o_k)/√C`` feeds the -C and -MFC decoders, and DP-VFA's attention logits are the
same products. Written as 27 products of padded slices, autograd's backward allocates and sums one zero-padded
gradient per offset. ``napari_unireg.core.correlation`` computes the products slab by slab (cache-sized), with
a hand-written backward, and cuts the rows into one range per thread. This script times, side by side in one
process (same tensors, best of ``--repeats``):

* ``autograd``: the definition (``torch.stack`` of 27 ``(A·B_shifted).sum(1)``), differentiated by autograd;
  the form the training used before session 8 (its forward equals the product's inference path);
* ``slabs, 1 thread``: ``local_correlation`` with its rows on one thread;
* ``slabs, threaded``: ``local_correlation`` as shipped (one row range per intra-op thread);

on the encoder levels of the half-resolution training grid (80×112×96: level 0 has 16 channels at full size)
and level 0 of the full inference grid, forward (no graph) and forward + backward, float32 and a bfloat16
anchor with a float32 shifted map (a -C decoder under bf16 autocast: conv features against warped features).

    python benchmarks/correlation.py --threads 2 --out bench/correlation.md
"""

from __future__ import annotations

import argparse
import math
import os

from sampling import _cpu_name, _time

CHANNELS = (16, 32, 32, 64, 64)  # napari_unireg.models.encoder.ENC_CHANNELS, fine → coarse
CASES = [("half", 80, 112, 96)]  # the training grid; every level
FULL_LEVEL0 = (160, 224, 192)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from napari_unireg.core import correlation
    from napari_unireg.models.encoder import ENC_CHANNELS

    assert tuple(ENC_CHANNELS) == CHANNELS, "update CHANNELS to the encoder's"
    torch.set_num_threads(args.threads)

    def definition(a, b):
        d0, d1, d2 = a.shape[2:]
        bp = F.pad(b, (1, 1, 1, 1, 1, 1))
        return torch.stack([(a * bp[:, :, 1 + o0: 1 + o0 + d0, 1 + o1: 1 + o1 + d1, 1 + o2: 1 + o2 + d2]).sum(1)
                            for o0, o1, o2 in correlation.OFFSETS], 1) / math.sqrt(a.shape[1])

    shipped_threads = correlation._row_threads
    one_thread = lambda d0, row_bytes: 1  # noqa: E731
    methods = (("autograd", definition, None), ("slabs, 1 thread", correlation.local_correlation, one_thread),
               ("slabs, threaded", correlation.local_correlation, shipped_threads))
    levels = [(f"half, level {i}", (80 >> i, 112 >> i, 96 >> i), c) for i, c in enumerate(CHANNELS)]
    levels.append(("full, level 0", FULL_LEVEL0, CHANNELS[0]))
    rows, totals = [], {name: [0.0, 0.0] for name, _, _ in methods}
    for label, shape, channels in levels:
        for dtype_label, anchor_dtype in (("fp32", torch.float32), ("bf16 × fp32", torch.bfloat16)):
            g = torch.Generator().manual_seed(0)
            a0 = torch.randn(1, channels, *shape, generator=g).to(anchor_dtype)
            b0 = torch.randn(1, channels, *shape, generator=g)
            upstream = torch.randn(1, 27, *shape, generator=g)
            times = {}
            for name, fn, threads in methods:
                correlation._row_threads = threads or shipped_threads
                try:
                    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()

                    def forward():
                        with torch.no_grad():
                            fn(a0, b0)

                    def backward():
                        fn(a, b).backward(upstream)
                        a.grad = b.grad = None

                    skip_full_backward = label.startswith("full")  # inference only: no training at 1 mm on a CPU
                    times[name] = (_time(forward, args.repeats),
                                   None if skip_full_backward else _time(backward, args.repeats))
                finally:
                    correlation._row_threads = shipped_threads
                if label.startswith("half") and dtype_label != "fp32":
                    totals[name][0] += times[name][0]
                    totals[name][1] += times[name][1]
            rows.append((label, channels, dtype_label, times))
            print(label, dtype_label, {k: tuple(round(x, 3) if x else x for x in v) for k, v in times.items()},
                  flush=True)

    names = [name for name, _, _ in methods]
    lines = [
        "# Local correlation on the CPU: autograd of the definition vs the slab kernel",
        "",
        f"* Machine: {_cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads; "
        f"best of {args.repeats}; `python benchmarks/correlation.py --threads {args.threads}`",
        "",
        "| level | C | dtype | " + " | ".join(f"{n}: fwd / fwd+bwd (s)" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    fmt = lambda t: "–" if t is None else f"{t:.3f}"  # noqa: E731
    for label, channels, dtype_label, times in rows:
        cells = [f"{fmt(times[n][0])} / {fmt(times[n][1])}" for n in names]
        lines.append(f"| {label} | {channels} | {dtype_label} | " + " | ".join(cells) + " |")
    cells = [f"{totals[n][0]:.3f} / {totals[n][1]:.3f}" for n in names]
    lines.append("| **all half levels** | | bf16 × fp32 | " + " | ".join(f"**{c}**" for c in cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
