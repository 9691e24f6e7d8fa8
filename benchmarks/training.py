"""Training speed and memory of the registration networks: optimiser steps per second and peak memory.

Each measurement runs in a fresh subprocess (so peak memories do not mix): the network is built
(``models.registry.build_model``), one warm-up step is taken, then ``--steps`` timed steps of
``napari_unireg.train.loop.train_step`` (the §8 loss, symmetric for the inverse-consistent models; Adam with
AMSGrad as ``unireg train``) on a synthetic pair of the chosen size: half (80×112×96) and full (160×224×192),
on the CPU with ``--threads`` threads and on CUDA when present (``--device cuda``/``auto``).

    python benchmarks/training.py                                   # six DP variants, half + full, CPU (slow!)
    python benchmarks/training.py --models dp-conv-c dp-vfa --sizes half --steps 2 --threads 2
    python benchmarks/training.py --device cuda --steps 10 --out bench/training_cuda.json
    python benchmarks/training.py --models dp-conv-c vxm-package   # + the VoxelMorph package's network

Reports seconds per step, steps per second, peak resident memory of the process (CPU) and peak allocated GPU
memory (CUDA), as Markdown (stdout) and JSON (``--out``), with the machine named. Full-resolution training on
a CPU takes minutes per step and tens of GB: on a small machine start with ``--sizes half --steps 1``.

``--profile`` adds the step profile (issue 12): per model and precision (``--amp fp32 bf16``), the seconds of
the forward pass (under autocast), the loss (warp + NCC + diffusion, forward only), the backward pass (network
and loss), the optimiser step and, with ``--data DATASET.json``, one training item of the data path (the
campaign recipe: half resolution, 30 % synthesised pairs, augmentation; a DataLoader worker computes it, on
the same cores). Plain ``perf_counter`` timers, synchronised on CUDA. ``--old-tree DIR`` also times the step
of another checkout (e.g. ``git worktree add /tmp/old-train main``) in the same run, for before/after.

    python benchmarks/training.py --profile --models dp-vfa dp-convic-c --sizes half --amp fp32 bf16 \
        --steps 2 --threads 2 --data ../shared/data/dataset.json --out bench/training_cpu.json

``--recipe-compare OLD_TREE --data DATASET.json`` runs the real thing twice, one after the other on the same
machine: ``unireg train`` of this checkout and of ``OLD_TREE`` (a git worktree of the release before), each in a
fresh process with the campaign recipe (half resolution, ``amp auto``, 30 % synthesised pairs, augmentation, one
DataLoader worker, from the bundled weights, the same seed, no validation) for ``--steps`` steps, and prints wall
seconds per step (median of ``log.csv`` after two warm-up steps), the data loader's wait per step and the CPU
seconds of the whole process tree. Both draw the same pairs and augmentations, so a step buys the same Dice in
both: the ratio of steps per CPU-hour is the ratio of Dice per CPU-hour.

    python benchmarks/training.py --recipe-compare /tmp/old-main --data ../shared/data/dataset.json \
        --models dp-vfa dp-conv-mf --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"full": (160, 224, 192), "half": (80, 112, 96)}
DP = ["dp-conv-mf", "dp-conv-mfc", "dp-conv-c", "dp-convic-mf", "dp-convic-c", "dp-vfa"]
VXM_PACKAGE = "vxm-package"  # the VoxelMorph package's VxmPairwise with its own losses (peers.py)


def _pair(shape, device):
    """A smooth synthetic pair (two different random volumes, blurred by trilinear upsampling)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 1, *[max(s // 8, 2) for s in shape], generator=g)
    vols = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return vols[:1].to(device), vols[1:].to(device)


def _our_step(model):
    """A step function ``step(moving, fixed)`` for one of our networks: train_step when available, else the same
    loss built from ``losses.registration_loss`` + Adam (train_step's contract)."""
    import torch

    symmetric = bool(getattr(model, "is_inverse_consistent", False))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    try:
        from napari_unireg.train.loop import train_step
    except ImportError:  # the training module is not there: same loss by hand
        train_step = None

    def step(moving, fixed):
        if train_step is not None:
            return train_step(model, opt, moving, fixed, lam=1.0, symmetric=symmetric)
        from napari_unireg.core.losses import registration_loss

        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(moving, fixed)
        loss = registration_loss(fixed, moving, out if symmetric else out.disp, 1.0)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return step


def _vxm_step(device):
    """The VoxelMorph package's network and loss (as peers.train_voxelmorph trains it)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    with peers._quiet_imports():
        import neurite as ne
    model = peers.build_voxelmorph().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=peers.VXM_DEFAULTS["lr"])
    ncc = ne.nn.modules.NCC(window_size=peers.VXM_DEFAULTS["window"])
    grad = ne.nn.modules.SpatialGradient(penalty="l2")

    def step(moving, fixed):
        model.train()
        opt.zero_grad(set_to_none=True)
        _, warped = model(moving, fixed, return_warped_source=True)
        loss = -ncc(fixed, warped).mean() + peers.VXM_DEFAULTS["lam"] * grad(model.velocity)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return model, step, 2 ** len(peers.VXM_DEFAULTS["nb_features"])


def child(name: str, shape: tuple[int, int, int], device: str, threads: int, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == VXM_PACKAGE:
        model, step, multiple = _vxm_step(device)
        n_params = sum(p.numel() for p in model.parameters())
    else:
        from napari_unireg.models.registry import build_model

        model = build_model(name).to(device)
        step = _our_step(model)
        multiple = int(getattr(model, "grid_multiple", 16))
        n_params = sum(p.numel() for p in model.parameters())
    padded = tuple(s + (-s) % multiple for s in shape)  # as the engine pads to the network's multiple
    moving, fixed = _pair(shape, device)
    if padded != tuple(shape):
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        moving, fixed = F.pad(moving, pad), F.pad(fixed, pad)
    step(moving, fixed)  # warm-up: allocator, kernel selection, lazy imports
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        terms = step(moving, fixed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    mean = sum(times) / len(times)
    res = {
        "model": name,
        "shape": list(padded),
        "device": device,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "seconds_per_step": mean,
        "seconds_min": min(times),
        "steps_per_second": 1.0 / mean if mean > 0 else None,
        "cpu_seconds_per_step": sum(cpu) / len(cpu),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_avg": os.getloadavg()[0],
        "params": n_params,
        "loss": terms.get("loss"),
    }
    if device.startswith("cuda"):
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name(0)
    return res


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_child(name: str, shape: tuple[int, int, int], device: str, threads: int, steps: int, amp: str) -> dict:
    """Seconds per phase of one training step (mean over ``steps`` after one warm-up step), in this process.

    The phases are those of ``train.loop.train_step``: forward under autocast, loss in fp32 (its backward is
    part of "backward"), backward, optimiser step (Adam, AMSGrad).
    """
    import torch
    import torch.nn.functional as F

    from napari_unireg.core.losses import registration_loss
    from napari_unireg.models.output import RegistrationOutput
    from napari_unireg.models.registry import build_model

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name).to(device)
    model.train()
    symmetric = bool(getattr(model, "is_inverse_consistent", False))
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, amsgrad=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    multiple = int(getattr(model, "grid_multiple", 16))
    padded = tuple(s + (-s) % multiple for s in shape)
    moving, fixed = _pair(shape, device)
    if padded != tuple(shape):
        pad = [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]
        moving, fixed = F.pad(moving, pad), F.pad(fixed, pad)
    phases = {"forward": [], "loss": [], "backward": [], "optimizer": [], "total": []}
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(moving, fixed)
        _sync(device)
        t1 = time.perf_counter()
        disp = out.disp.float()
        target = RegistrationOutput(disp, out.inverse.float()) if symmetric else disp
        loss = registration_loss(fixed, moving, target, 1.0)
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        _sync(device)
        t4 = time.perf_counter()
        if i > 0:  # the first step warms up the allocator and kernel choice
            for k, a, b in (("forward", t0, t1), ("loss", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4),
                            ("total", t0, t4)):
                phases[k].append(b - a)
    res = {"model": name, "shape": list(padded), "device": device, "amp": amp, "threads": torch.get_num_threads(),
           "steps": steps, "load_avg": os.getloadavg()[0], "loss": float(loss.detach()),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    res.update({f"{k}_s": sum(v) / len(v) for k, v in phases.items()})
    return res


def data_child(dataset: str, threads: int, items: int) -> dict:
    """Seconds per training item of the data path (campaign recipe at half resolution), in this process."""
    import torch

    from napari_unireg.train.config import config_from_dict
    from napari_unireg.train.data import PairDataset, PairPlan, VolumeLoader, discover

    if threads > 0:
        torch.set_num_threads(threads)
    root = Path(dataset).resolve().parent
    maps = root / "synthseg_labels"
    cfg = config_from_dict({
        "data": {"source": str(dataset), "resolution": "half"},
        "augment": {"enabled": True},
        "synth": {"prob": 0.3, "label_maps": [str(maps)] if maps.is_dir() else []},
    })
    tset = discover(cfg.data, cfg.synth)
    plan = PairPlan(len(tset.entries), tset.excluded, 3, cfg.synth.prob, len(tset.label_maps), cfg.synth.same_map_prob)
    ds = PairDataset(tset, cfg, plan, VolumeLoader(cfg.data.grid_shape, 2, cfg.data.cache_size, None), False)
    times, kinds = [], []
    for i in range(items):
        t0 = time.perf_counter()
        item = ds[i]
        times.append(time.perf_counter() - t0)
        kinds.append("synth" if item["synthetic"] else "real")
    return {"items": items, "data_s": sum(times) / len(times), "times": times, "kinds": kinds}


def format_profile(rows: list[dict], data: dict | None) -> str:
    """Markdown table of the step profiles."""
    lines = ["## Step profile", "",
             "| model | grid | device | amp | thr | forward | loss | backward | optimiser | step total | data item |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dcol = f"{data['data_s']:.2f}" if data and "data_s" in data else "–"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | – | {r['device']} | {r.get('amp', '')} | – | FAILED: {r['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['model']}{r.get('tag', '')} | {'×'.join(map(str, r['shape']))} | {r['device']} | "
                     f"{r['amp']} | {r['threads']} | {r['forward_s']:.2f} | {r['loss_s']:.2f} | "
                     f"{r['backward_s']:.2f} | {r['optimizer_s']:.3f} | {r['total_s']:.2f} | {dcol} |")
    lines += ["", "Seconds, mean over the timed steps after one warm-up step (batch 1). *loss* is the forward of the "
              "§8 loss (warp, NCC, diffusion) in fp32; its backward is inside *backward*. *data item*: one "
              "training pair of the campaign recipe (half resolution, 30 % synthesised, augmentation), computed "
              "by a DataLoader worker on the same cores (not in *step total*)."]
    if data and "kinds" in data:
        lines.append("Data items: " + ", ".join(f"{k} {s:.2f} s" for k, s in zip(data["kinds"], data["times"])) + ".")
    return "\n".join(lines) + "\n"


def _run_child(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_markdown(rows: list[dict], machine: dict) -> str:
    """Markdown table of the measurements with the machine line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine_line

    lines = ["# Training speed and memory", "", f"* Machine: {machine_line(machine)}", "",
             "| model | grid | device | thr | s/step | steps/s | peak RSS GB | peak GPU GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['device']} | – | FAILED: {r['error']} | | | |")
            continue
        gpu = f"{r['peak_gpu_gb']:.2f}" if r.get("peak_gpu_gb") is not None else "–"
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['shape']))} | {r['device']} | {r['threads']} | "
                     f"{r['seconds_per_step']:.2f} | {r['steps_per_second']:.3f} | {r['peak_rss_gb']:.2f} | {gpu} |")
    lines += ["", "Mean over the timed steps after one warm-up step; batch 1, fp32, Adam (AMSGrad); "
              "peak RSS = the whole measuring process."]
    return "\n".join(lines) + "\n"


def recipe_run(tree: Path, model: str, dataset: str, steps: int, threads: int, work: Path) -> dict:
    """One ``unireg train`` of ``tree`` with the campaign recipe: per-step seconds from its log, process CPU."""
    import csv
    import statistics

    out = work / f"{tree.name}-{model}"
    dataset = str(Path(dataset).resolve())
    maps = Path(dataset).parent / "synthseg_labels"
    cmd = [sys.executable, "-m", "napari_unireg.train", "--model", model, "--data", dataset, "--out", str(out),
           "--resolution", "half", "--amp", "auto", "--threads", str(threads), "--workers", "1",
           "--steps", str(steps), "--init-encoder", str(tree / "models" / f"{model}.safetensors"),
           "--set", "synth.prob=0.3", "--set", f"synth.label_maps=[{maps}]", "--set", "augment.enabled=true",
           "--set", "data.seed=11", "--set", "val.every_steps=0", "--set", "val.max_pairs=1",
           "--set", "val.full_resolution=false", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return {"tree": str(tree), "model": model, "error": proc.stderr.strip().splitlines()[-1:]}
    with open(out / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    secs = [float(r["seconds"]) for r in rows[2:]]
    data = [float(r["data_seconds"]) for r in rows[2:]]
    return {"tree": str(tree), "model": model, "steps": len(rows), "wall_s": wall,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "s_per_step": statistics.median(secs), "data_wait_s": statistics.median(data),
            "last_loss": float(rows[-1]["loss"])}


def recipe_compare(old_tree: Path, models: list[str], dataset: str, steps: int, threads: int) -> str:
    """Old and new ``unireg train`` side by side, one model after the other; a Markdown table."""
    import shutil
    import tempfile

    new_tree = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="unireg_train_compare_"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine_info, machine_line

    lines = [f"`unireg train`, campaign recipe, {steps} steps, {threads} threads, "
             f"{machine_line(machine_info(threads, 'cpu'))}", "",
             "| model | checkout | s / step (median) | data wait / step | CPU s (process tree) | steps / CPU-hour | "
             "last loss |", "|---|---|---|---|---|---|---|"]
    try:
        for model in models:
            for label, tree in (("old", old_tree), ("new", new_tree)):
                r = recipe_run(tree, model, dataset, steps, threads, work)
                if "error" in r:
                    lines.append(f"| {model} | {label} | FAILED: {r['error']} | | | | |")
                    continue
                print(f"  {model} {label}: {r['s_per_step']:.2f} s/step, {r['cpu_s']:.0f} CPU s", flush=True)
                lines.append(f"| {model} | {label} ({tree}) | {r['s_per_step']:.2f} | {r['data_wait_s']:.2f} | "
                             f"{r['cpu_s']:.0f} | {3600 * r['steps'] / r['cpu_s']:.0f} | {r['last_loss']:.4f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} at end. CPU s include start-up and export.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DP, help=f"registry names, or {VXM_PACKAGE}")
    p.add_argument("--sizes", nargs="+", default=["half", "full"], choices=sorted(SIZES))
    p.add_argument("--shape", nargs=3, type=int, default=None, help="a custom grid instead of --sizes (smoke runs)")
    p.add_argument("--device", nargs="+", default=["cpu"], help="cpu, cuda, auto (cuda when present); several ok")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement before it is abandoned")
    p.add_argument("--out", default=None, help="JSON report (the Markdown is printed)")
    p.add_argument("--profile", action="store_true", help="time the phases of a step (see above)")
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                   help="precisions of --profile")
    p.add_argument("--data", default=None, help="dataset.json: --profile also times the data path")
    p.add_argument("--data-items", type=int, default=6, help="training items the data timing averages")
    p.add_argument("--old-tree", default=None, help="another checkout whose train step --profile also times")
    p.add_argument("--recipe-compare", default=None, metavar="OLD_TREE",
                   help="time `unireg train` (campaign recipe) of this checkout and OLD_TREE, side by side")
    p.add_argument("--profile-child", nargs=4, metavar=("MODEL", "SHAPE", "DEVICE", "AMP"), help=argparse.SUPPRESS)
    p.add_argument("--data-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, metavar=("MODEL", "SHAPE", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.recipe_compare is not None:
        if not args.data:
            p.error("--recipe-compare needs --data DATASET.json")
        print(recipe_compare(Path(args.recipe_compare).resolve(), args.models, args.data, args.steps, args.threads))
        return 0
    if args.profile_child:
        name, shape, device, amp = args.profile_child
        shape = tuple(int(s) for s in shape.split("x"))
        print(json.dumps(profile_child(name, shape, device, args.threads, args.steps, amp)))
        return 0
    if args.data_child:
        print(json.dumps(data_child(args.data_child, args.threads, args.data_items)))
        return 0
    if args.child:
        name, shape, device = args.child
        print(json.dumps(child(name, tuple(int(s) for s in shape.split("x")), device, args.threads, args.steps)))
        return 0
    import torch

    devices = []
    for d in args.device:
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda") and not torch.cuda.is_available():
            print(f"# skipping {d}: CUDA is not available here", file=sys.stderr)
            continue
        if d not in devices:
            devices.append(d)
    sizes = {"custom": tuple(args.shape)} if args.shape else {s: SIZES[s] for s in args.sizes}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine_info

    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads, devices[-1] if devices else "cpu")
    if args.profile:
        return _profile_main(args, devices, sizes, machine)
    rows = []
    for device in devices:
        for size, shape in sizes.items():
            for name in args.models:
                cmd = [sys.executable, __file__, "--child", name, "x".join(map(str, shape)), device,
                       "--threads", str(args.threads), "--steps", str(args.steps)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    rows.append({"model": name, "size": size, "device": device, "error": f"timeout {args.timeout}s"})
                    continue
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"model": name, "size": size, "device": device, "error": err})
                    print(f"# {name} {size} {device}: FAILED {err}", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["size"] = size
                rows.append(r)
                print(f"# {name} {size} {device}: {r['seconds_per_step']:.2f} s/step, "
                      f"peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    machine["load_avg_end"] = os.getloadavg()[0]
    md = format_markdown(rows, machine)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(md)
    return 0


def _profile_main(args, devices, sizes, machine) -> int:
    """The step profile (+ the data path, + the same step from ``--old-tree``): Markdown and JSON."""
    trees = [("", str(Path(__file__).resolve().parent.parent))]
    if args.old_tree:
        trees.append((" (old)", str(Path(args.old_tree).resolve())))
    rows = []
    for device in devices:
        for size, shape in sizes.items():
            for name in args.models:
                for amp in args.amp:
                    for tag, root in trees:
                        # the old tree runs this script's profile code against its own package
                        env = {**os.environ, "PYTHONPATH": root}
                        cmd = [sys.executable, __file__, "--profile-child", name, "x".join(map(str, shape)), device,
                               amp, "--threads", str(args.threads), "--steps", str(args.steps)]
                        r = _run_child(cmd, args.timeout, env)
                        r.update({"model": name, "size": size, "device": device, "amp": amp, "tag": tag,
                                  "tree": root})
                        rows.append(r)
                        msg = r.get("error") or f"{r['total_s']:.2f} s/step"
                        print(f"# {name}{tag} {size} {device} {amp}: {msg}", file=sys.stderr, flush=True)
    data = None
    if args.data:
        cmd = [sys.executable, __file__, "--data-child", args.data, "--threads", str(args.threads),
               "--data-items", str(args.data_items)]
        data = _run_child(cmd, args.timeout)
    machine["load_avg_end"] = os.getloadavg()[0]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine_line

    md = "# Training step profile\n\n" + f"* Machine: {machine_line(machine)}\n\n" + format_profile(rows, data)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(out.read_text()) if out.is_file() else {}
        old.update({"profile": {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows,
                                "data": data}})
        out.write_text(json.dumps(old, indent=1))
        md_path = out.with_suffix(".md")
        prev = md_path.read_text() if md_path.is_file() else ""
        if "# Training step profile" in prev:  # replace the previous profile, keep the speed table
            prev = prev[: prev.index("# Training step profile")].rstrip() + "\n"
        md_path.write_text((prev + "\n" if prev else "") + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
