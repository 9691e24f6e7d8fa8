"""Everything a lent GPU is for, in one call that stops itself in time (issue 12, "Ready for a GPU").

    python benchmarks/pack_data.py --data ../shared/data/dataset.json --out .carry/data      # here, once
    python benchmarks/gpu_run.py --data .carry/data --out $OUT --budget-s 540                # on the GPU machine
    python benchmarks/gpu_run.py --dry-run --out /tmp/dry                                    # CI: CPU, tiny, < 1 min

The lent machine's image has torch but not nibabel: carry its wheel (``pip download --no-deps nibabel -d .whl``,
3.3 MB; the tracked tree, ``.whl`` and the pack must stay under 64 MiB) and the pack, and start the call with
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site``
(session 19's call: ``models/training/README.md``, "On a lent GPU"). To bring a model home, copy its three files
into a run folder of its own and bundle it: ``benchmarks/bundle_stage.py runs/dp-vfa-gpu19 --what "..."``.

1. **check**: every DP variant (bundled weights) on the first validation pair at ``--check-grid`` (half by
   default, so the CPU reference stays cheap): the device's field in fp32, bf16 and fp16 autocast against the
   CPU fp32 field, max |difference| in voxels (the issue's bar for a ``register`` default: 0.05 voxel; fp16
   only on CUDA: on a CPU it is emulated and takes minutes);
2. **timing**: inference of every DP variant on the device at full resolution (fp32 and bf16 autocast; the issue's
   target is < 0.1 s per pair), one training step (phases, as ``benchmarks/training.py --profile``) of
   dp-vfa and dp-convic-c, and the operators of one dp-convic-c forward pass (``torch.profiler``);
3. **training**: dp-vfa, then dp-convic-c if at least ``--min-train-s`` remain (``--train`` names one or two
   others), at full resolution from the bundled weights (warm restart), with synthesis (40 %, a Dice term on the
   painted pairs) and augmentation, through ``napari_unireg.train`` with ``optim.time_limit_s`` so each run
   stops, validates and exports in time; ``--train-resolution half`` continues the 2 mm file instead, and
   ``--set KEY=VALUE`` changes that recipe as ``unireg train --set`` does (dp-vfa's 2 mm line trains with
   ``--set loss.window=5`` since session 23);
4. **output** (flat, ≤ 8 files, each ≤ 16 MiB): ``report.json``, and per trained model
   ``<model>.safetensors``, ``<model>.json`` (the card) and ``<model>-log.csv``.

``--dry-run`` runs the same code on the CPU with a tiny grid (32³) and a few seconds per stage; without
``--data`` it first writes and packs a tiny synthetic data set, so it needs nothing but the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DP = ["dp-conv-mf", "dp-conv-mfc", "dp-conv-c", "dp-convic-mf", "dp-convic-c", "dp-vfa"]
TRAIN = ["dp-vfa", "dp-convic-c"]
DRY_GRID = (32, 32, 32)


class Clock:
    """Seconds left of the call's budget."""

    def __init__(self, budget: float) -> None:
        self.t0, self.budget = time.perf_counter(), float(budget)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def tiny_dataset(root: Path, n: int = 4, grid=DRY_GRID) -> Path:
    """A Learn2Reg folder of ``n`` smooth synthetic brains with 3-label maps on ``grid`` (the dry run's data)."""
    import nibabel as nib
    import numpy as np

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "synthseg_labels").mkdir(exist_ok=True)
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in grid], indexing="ij"))
    items = []
    for i in range(n):
        rng = np.random.default_rng(i)
        c = rng.uniform(-0.15, 0.15, size=(3, 1, 1, 1))
        r = np.sqrt(((zz - c) ** 2 / rng.uniform(0.5, 0.8, size=(3, 1, 1, 1)) ** 2).sum(0))
        lab = np.where(r < 0.5, 2, np.where(r < 0.9, 1, 0)).astype(np.uint8)
        img = np.where(lab == 2, 0.97, np.where(lab == 1, 0.45, 0.0)).astype(np.float32)
        # already in [0, 1] with a bright top, as the trainer normalises: it reads these values unchanged
        img = np.clip(img + rng.normal(0, 0.01, grid).astype(np.float32) * (lab > 0), 0, 1)
        name = f"DRY_{i + 1:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / name)
        nib.save(nib.Nifti1Image((lab * 2).astype(np.int16), np.eye(4)), root / "synthseg_labels" / f"seg_{i}.nii.gz")
        items.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "DRY", "training": items, "registration_val": [{"fixed": items[0]["image"],
                                                                      "moving": items[1]["image"]}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "dataset.json"


def _val_pair(data: Path, grid, factor: int, device):
    """The first validation pair of the packed data set at 1/``factor`` resolution, as ``1×1×S`` tensors."""
    import numpy as np
    import torch

    from napari_unireg.train.data import _from_dataset_json, downsample_image, load_model_grid

    entries, val = _from_dataset_json(data / "dataset.json")
    fixed, moving = val[0] if val else (entries[0].image, entries[1].image)
    out = []
    for p in (moving, fixed):
        a = downsample_image(load_model_grid(p, "image", grid), factor) if factor > 1 else load_model_grid(p, "image",
                                                                                                          grid)
        out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device))
    return out


def _autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


#: On a CPU without bf16 instructions (AVX2 only: ``precision.cpu_bf16_support() == "none"``) oneDNN emulates bf16
#: convolutions: a 32³ dp-conv-mf forward pass took 41 s in bf16 against 0.29 s in fp32 on an AMD EPYC (session 13),
#: and the dry run spent ~15 minutes there. Such a CPU checks bf16 on one variant (the code path is the same for
#: all) and times none; fp16 convolutions are emulated on every CPU.
EMULATED = {"fp16": "CPU (fp16 convolutions are emulated: minutes)",
            "bf16": "CPU without bf16 instructions (bf16 convolutions are emulated: minutes)"}


def _emulated(prec: str, device) -> str | None:
    """Why ``prec`` is not run on ``device`` (its convolutions would be emulated), or None."""
    if device.type == "cuda" or prec == "fp32":
        return None
    if prec == "bf16":
        from napari_unireg.train.precision import cpu_bf16_support

        return EMULATED["bf16"] if cpu_bf16_support() == "none" else None
    return EMULATED[prec]


def check_fields(data: Path, grid, factor: int, device, clock: Clock, log) -> dict:
    """Max |field(device, precision) − field(CPU, fp32)| in voxels for each DP variant (bundled weights)."""
    import torch

    from napari_unireg.models.registry import load_pretrained

    cpu = torch.device("cpu")
    mov_c, fix_c = _val_pair(data, grid, factor, cpu)
    mov, fix = mov_c.to(device), fix_c.to(device)
    res = {"grid": list(mov_c.shape[2:]), "pair": "first validation pair", "models": {}}
    for i, name in enumerate(DP):
        row: dict = {}
        try:
            model, _ = load_pretrained(name, "cpu")
            with torch.inference_mode():
                ref = model(mov_c, fix_c).disp.float()
            row["field_max_vox"] = float(ref.abs().max())
            model.to(device)
            for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
                skip = _emulated(prec, device)
                if skip and not (prec == "bf16" and i == 0):  # emulated bf16 still runs once: the path is tested
                    row[f"{prec}_skipped"] = skip
                    continue
                try:
                    with torch.inference_mode(), _autocast(device, dtype):
                        out = model(mov, fix).disp.float()
                    _sync(device)
                    row[f"{prec}_max_diff_vox"] = float((out.cpu() - ref).abs().max())
                except Exception as e:  # a precision the device cannot do: record it, go on
                    row[f"{prec}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        res["models"][name] = row
        log(f"check {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()) + f" [{clock.elapsed():.0f} s]")
    return res


def time_inference(grid, device, clock: Clock, repeats: int, log) -> dict:
    """Seconds per forward pass of each DP variant at ``grid`` on ``device`` (fp32 and bf16 autocast)."""
    import torch

    from napari_unireg.models.registry import load_pretrained

    sys.path.insert(0, str(HERE))
    from training import _pair

    mov, fix = _pair(tuple(grid), device)
    res = {"grid": list(grid), "repeats": repeats, "models": {}}
    for name in DP:
        row: dict = {}
        try:
            model, _ = load_pretrained(name, str(device))
            for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                skip = _emulated(prec, device)
                if skip:  # the time of an emulated precision says nothing
                    row[f"{prec}_skipped"] = skip
                    continue
                with torch.inference_mode(), _autocast(device, dtype):
                    model(mov, fix)  # warm-up (kernel choice)
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        model(mov, fix)
                    _sync(device)
                row[f"{prec}_s"] = (time.perf_counter() - t0) / repeats
            if device.type == "cuda":
                row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            del model
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        res["models"][name] = row
        log(f"inference {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()) + f" [{clock.elapsed():.0f} s]")
    return res


def profile_forward(name: str, data: Path, grid, device, log, top: int = 12) -> dict:
    """The operators that take the time of one fp32 forward pass of ``name`` on the first validation pair at
    ``grid`` (``torch.profiler``, after a warm-up): where the inverse-consistent variants' 0.4–0.5 s on the H200
    goes (session 19) — the calls of ``grid_sampler_3d`` count the fixed-point iterations of the inversions."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_unireg.models.registry import load_pretrained

    model, _ = load_pretrained(name, str(device))
    mov, fix = _val_pair(data, grid, 1, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.inference_mode():
        model(mov, fix)
        _sync(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            model(mov, fix)
            _sync(device)
        wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) / 1e3
    ops = [{"op": e.key, "calls": int(e.count), "self_ms": getattr(e, key, 0.0) / 1e3} for e in events[:top]]
    log(f"profile {name}: {wall:.3f} s under the profiler, {total:.1f} ms of {key}; top: "
        + ", ".join(f"{o['op']} {o['self_ms']:.1f} ms/{o['calls']}" for o in ops[:4]))
    return {"model": name, "grid": list(mov.shape[2:]), "wall_s": wall, "time_key": key, "total_ms": total,
            "top": ops}


def time_train_steps(grid, device, amp: str, steps: int, clock: Clock, log) -> dict:
    """Phases of one training step (benchmarks/training.py's profile) of the trained models at ``grid``."""
    sys.path.insert(0, str(HERE))
    from training import profile_child

    res = {}
    for name in TRAIN:
        try:
            r = profile_child(name, tuple(grid), str(device), 0, steps, amp)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        res[name] = r
        log(f"train step {name} ({amp}): " + (r.get("error") or f"{r['total_s']:.3f} s (forward {r['forward_s']:.3f}, "
                                                 f"backward {r['backward_s']:.3f})") + f" [{clock.elapsed():.0f} s]")
    return res


def train_model(name: str, data: Path, grid, device, time_limit: float, work: Path, out: Path, dry: bool,
                log, call: str = "python benchmarks/gpu_run.py", resolution: str = "full",
                extra: tuple[tuple[str, object], ...] = ()) -> dict:
    """Train ``name`` from its bundled weights for ``time_limit`` s; copy weights, card and log into ``out``.

    ``extra`` are the call's ``--set`` overrides, applied after this function's recipe (the line's own recipe,
    e.g. ``loss.window=5`` for dp-vfa's 2 mm line, ``models/training/README.md``).

    ``call`` is the command line of this script: the card's stage command, with the time limit and data seed it
    chose, so that ``benchmarks/bundle_stage.py`` records how the stage can be run again."""
    from napari_unireg.models.registry import bundled_weights, weights_dir
    from napari_unireg.train.config import load_config
    from napari_unireg.train.loop import train

    # continue the bundled weights trained at this resolution (a model may bundle one file per resolution)
    files = bundled_weights(name)
    start = files[resolution][0] if resolution in files else weights_dir() / name
    synth = data / "synth"
    run = work / name
    seed = int(time.time()) % 100000  # a new stretch of pairs for every lent window
    overrides = [
        ("model", name),
        ("data.source", str(data / "dataset.json")),
        ("data.grid_shape", list(grid)),
        ("data.resolution", resolution),  # the card's resolution: what `register` runs the network at
        ("data.num_workers", 0 if dry else max(1, min(8, (os.cpu_count() or 2) - 2))),
        ("data.seed", seed),
        ("device", "cpu" if dry else str(device)),
        ("amp", "auto"),
        ("init_encoder", f"{start}.safetensors"),
        ("synth.prob", 0.4),
        ("synth.label_maps", [str(synth)] if synth.is_dir() and any(synth.iterdir()) else []),
        # session 15's recipe: a Dice term on the painted pairs only (the real label maps stay out of the loss)
        ("loss.dice_weight", 1.0),
        ("loss.dice_pairs", "synthetic"),
        ("augment.enabled", True),
        ("optim.lr", 3e-4),
        ("optim.warmup_steps", 2 if dry else 20),
        ("optim.eta_min", 1e-5),
        ("optim.time_limit_s", float(time_limit)),
        ("optim.time_plan", True),
        ("val.every_steps", 0),  # one validation at the end (full resolution, all pairs)
        ("log.checkpoint_every", 10**9),
        ("log.progress", False),
        ("log.tensorboard", False),
        ("export.name", name),
        ("steps", 100000),
    ]
    if dry:
        overrides += [("threads", 1)]
    cfg = load_config(None, overrides + list(extra))
    # what reproduces this stage: the call itself and the settings it chose (the full config is in the card)
    cmd = (f"{call}  # its training of {name}: "
           f"optim.time_limit_s={time_limit:.1f}, data.seed={seed}")
    t0 = time.perf_counter()
    res = train(cfg, run, command=cmd)
    summary = {
        "steps": res.step,
        "time_limited": res.time_limited,
        "wall_s": time.perf_counter() - t0,
        "seconds_per_step": None,
        "val": res.last_val or res.best,
        "files": [],
    }
    log_csv = run / "log.csv"
    if log_csv.is_file():
        import csv

        with open(log_csv, newline="") as fh:
            secs = [float(r["seconds"]) for r in csv.DictReader(fh) if r.get("seconds")]
        if len(secs) > 1:
            summary["seconds_per_step"] = sum(secs[1:]) / len(secs[1:])
        shutil.copy(log_csv, out / f"{name}-log.csv")
        summary["files"].append(f"{name}-log.csv")
    if res.exported:
        for p in res.exported:
            shutil.copy(p, out / p.name)
            summary["files"].append(p.name)
    log(f"trained {name}: {res.step} steps, {summary['wall_s']:.0f} s, val {summary['val']}")
    return summary


def machine(device) -> dict:
    import torch

    from napari_unireg.train.precision import auto_amp, cpu_bf16_support

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpu_bf16": cpu_bf16_support(), "device": str(device), "amp_auto": auto_amp(device.type)}
    if device.type == "cuda":
        info.update({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                     "bf16_supported": bool(torch.cuda.is_bf16_supported())})
    return info


def main(argv=None) -> int:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="packed data folder (benchmarks/pack_data.py); dry run: optional")
    p.add_argument("--out", required=True, help="output folder (report.json, weights, cards, logs)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole call (540; dry 60)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny grid, seconds per stage (CI)")
    p.add_argument("--check-grid", choices=["half", "full"], default="half", help="grid of the CPU/device check")
    p.add_argument("--min-train-s", type=float, default=None, help="least time worth a training run (120; dry 5)")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="kept free after each run's steps for its validation, export and copying (40; dry 5)")
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "timing", "train"], help="stages to skip")
    p.add_argument("--train-resolution", choices=["full", "half"], default="full",
                   help="grid the models train (and will run) at: full = 1 mm, half = 2 mm (CPU-fast)")
    p.add_argument("--train", nargs="+", default=TRAIN, choices=DP, metavar="MODEL",
                   help=f"models to train, in turn, from their bundled weights (default: {' '.join(TRAIN)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training config override after the script's recipe (as `unireg train --set`)")
    args = p.parse_args(argv)
    call = "python benchmarks/gpu_run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if len(args.train) > 2 or len(set(args.train)) < len(args.train):
        # a lent GPU returns at most 8 files: report.json, 3 per trained model and the call's own log
        p.error("--train takes one or two different models (3 files each come back, 8 files at most)")
    from napari_unireg.errors import UserError
    from napari_unireg.train.config import load_config, parse_override

    try:  # a bad key or value must fail here, not after the window's check and timing stages
        extra = tuple(parse_override(text) for text in args.set)
        load_config(None, list(extra))
    except UserError as e:
        print(f"error: --set: {e}", file=sys.stderr)
        return 2
    dry = args.dry_run
    clock = Clock(args.budget_s if args.budget_s is not None else (60 if dry else 540))
    min_train = args.min_train_s if args.min_train_s is not None else (5 if dry else 120)
    reserve = args.reserve_s if args.reserve_s is not None else (5 if dry else 40)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(f"[gpu_run {clock.elapsed():5.0f} s] {msg}", flush=True)

    import torch

    if dry:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        print("error: CUDA is not available here (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_run_"))
    report: dict = {"dry_run": dry, "budget_s": clock.budget, "machine": machine(device), "stages": {}}
    try:
        if args.data:
            data = Path(args.data)
        elif dry:
            sys.path.insert(0, str(HERE))
            from pack_data import pack

            data = work / "packed"
            pack(tiny_dataset(work / "tiny"), data, work / "tiny" / "synthseg_labels", grid=DRY_GRID, preset=1,
                 log=lambda m: None)
        else:
            print("error: --data (a folder written by benchmarks/pack_data.py) is required", file=sys.stderr)
            return 2
        meta_path = data / "dataset.json"
        if not meta_path.is_file():
            raise UserError(f"{data} holds no dataset.json (write it with benchmarks/pack_data.py)")
        grid = tuple(json.loads(meta_path.read_text()).get("packed", {}).get("grid_shape") or (160, 224, 192))
        report["grid"] = list(grid)
        log(f"device {device}, grid {grid}, budget {clock.budget:.0f} s, amp auto = {report['machine']['amp_auto']}")
        amp = "bf16" if report["machine"]["amp_auto"] == "bf16" else "fp32"
        stages = report["stages"]
        if "check" not in args.skip:
            factor = 2 if (args.check_grid == "half" and not dry) else 1
            stages["check"] = check_fields(data, grid, factor, device, clock, log)
        if "timing" not in args.skip:
            stages["inference"] = time_inference(grid, device, clock, 2 if dry else 5, log)
            stages["train_step"] = time_train_steps(grid, device, amp, 1 if dry else 2, clock, log)
            try:
                stages["profile"] = profile_forward("dp-convic-c", data, grid, device, log)
            except Exception as e:  # a profiler that fails here must not cost the window its training
                stages["profile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "train" not in args.skip:
            stages["train"] = {}
            for i, name in enumerate(args.train):
                left = clock.left() - reserve
                if dry and i == 0:
                    left = max(left, min_train)  # CI proves the training stage even on a slow, shared runner
                if left < min_train:
                    log(f"skipping the training of {name}: {left:.0f} s left (< {min_train:.0f} s)")
                    break
                # the first model gets all the time unless the second would still get its minimum
                share = left if i == len(args.train) - 1 else max(min_train, left - max(min_train, 0.35 * left))
                stages["train"][name] = train_model(name, data, grid, device, share, work, out, dry, log, call,
                                                     args.train_resolution, extra)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except UserError as e:
        report["error"] = str(e)
        log(f"error: {e}")
    finally:
        report["wall_s"] = clock.elapsed()
        report["log"] = lines
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {clock.elapsed():.0f} s; wrote {sorted(p.name for p in out.iterdir())}")
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
