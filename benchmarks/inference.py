"""Inference speed and memory of the registration networks.

Prints, per model, the seconds per registration of one pair at full (160×224×192) and half (80×112×96) size,
the process CPU time, the peak resident memory (each measurement runs in a fresh subprocess, so peaks do not
mix) and the 1-minute load average (wall times are only comparable on an otherwise idle machine; the CPU time
of a 1-thread run is the robust measure of work). CPU with the stated thread count, then CUDA (peak GPU memory)
when available.

    python benchmarks/inference.py                                  # the six DP variants, half + full, CPU
    python benchmarks/inference.py --models dp-vfa dp-convic-c --sizes half --threads 2
    python benchmarks/inference.py --device cuda --sizes full

Untrained networks start near the identity, which makes the inverse-consistent models unrealistically fast (the
fixed-point inversions stop after 2 iterations). Unless bundled weights exist, the flow heads are therefore
randomised (``--head-std``, default 2e-3) so that the fields are several voxels large, like trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {"full": (160, 224, 192), "half": (80, 112, 96)}
DP = ["dp-conv-mf", "dp-conv-mfc", "dp-conv-c", "dp-convic-mf", "dp-convic-c", "dp-vfa"]


def _pair(shape, device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 1, *[max(s // 8, 2) for s in shape], generator=g)
    vols = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return vols[:1].to(device), vols[1:].to(device)


def _model(name: str, head_std: float, device: str):
    import torch

    from napari_unireg.models.registry import build_model, load_pretrained

    try:
        model, _ = load_pretrained(name, device=device)
        return model, "pretrained"
    except Exception:  # noqa: BLE001 - no bundled weights: random weights
        pass
    torch.manual_seed(0)
    model = build_model(name)
    heads = [m for m in model.modules() if type(m).__name__ == "FlowHead"]
    with torch.no_grad():
        for h in heads:
            h.weight.normal_(0, head_std)
    return model.to(device).eval(), f"random (head σ={head_std:g})" if heads else "random init"


def child(name: str, size: str, device: str, threads: int, repeats: int, head_std: float) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model, weights = _model(name, head_std, device)
    moving, fixed = _pair(SIZES[size], device)
    small = tuple(model.grid_multiple * 2 for _ in range(3))
    with torch.inference_mode():
        model(*_pair(small, device))  # warm-up: kernel selection, lazy imports
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(moving, fixed)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        disp_max = float(out.disp.abs().max())
    res = {
        "model": name,
        "size": size,
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": min(times),
        "cpu_seconds": min(cpu),
        "load_avg": os.getloadavg()[0],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "max_disp_vox": disp_max,
        "weights": weights,
    }
    if device == "cuda":
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DP)
    p.add_argument("--sizes", nargs="+", default=["half", "full"], choices=sorted(SIZES))
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="all: CPU, then CUDA if available")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--head-std", type=float, default=2e-3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.models[0], args.sizes[0], args.device, args.threads, args.repeats, args.head_std)))
        return
    devices = [args.device] if args.device != "all" else ["cpu"]
    if args.device == "all":
        import torch

        devices += ["cuda"] if torch.cuda.is_available() else []
    threads = args.threads or "torch default"
    for device in devices:
        print(f"# {device}: cpu cores visible {os.cpu_count()}, intra-op threads requested: {threads}")
        print(f"{'model':<14} {'size':<5} {'thr':>3} {'s/pair':>8} {'cpu s':>7} {'peak RSS GB':>11} "
              f"{'peak GPU GB':>11} {'load':>5}  weights")
        for size in args.sizes:
            for name in args.models:
                _run_one(name, size, device, args)


def _run_one(name: str, size: str, device: str, args) -> None:
    cmd = [sys.executable, __file__, "--child", "--models", name, "--sizes", size, "--device", device,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--head-std", str(args.head_std)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name:<14} {size:<5} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
        return
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
    print(f"{name:<14} {size:<5} {r['threads']:>3} {r['seconds']:>8.2f} {r['cpu_seconds']:>7.1f} "
          f"{r['peak_rss_gb']:>11.2f} {gpu:>11} {r['load_avg']:>5.1f}  {r['weights']}, "
          f"max|u| {r['max_disp_vox']:.1f} vox", flush=True)


if __name__ == "__main__":
    main()
