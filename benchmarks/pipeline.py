"""Cost of the whole user path, stage by stage: load, pre-align, infer, refine, metrics, write.

What `unireg register` does, timed and memory-profiled per stage: read the NIfTI files (``io.load_volume``),
``engine.register_volumes`` (model, model grid, affine pre-alignment, network, optional refinement, metrics,
fixed-grid outputs) and ``engine.write_result`` into a temporary folder. Every (model, device, threads, scale)
runs in a fresh subprocess, so peaks do not mix, with ``OMP/MKL/OPENBLAS_NUM_THREADS`` and torch's intra-op
threads set to ``--threads``.

    python benchmarks/pipeline.py                    # dp-vfa, 1 and 2 threads, 0.5/1/1.5×, CPU (+ CUDA)
    python benchmarks/pipeline.py --models dp-vfa classical --threads 2 --scales 1 --out bench/pipeline.json
    python benchmarks/pipeline.py --device cuda --scales 1 1.5 --io-steps 50

Stages (wall seconds, CPU seconds and peak memory each; boundaries are the engine's ``progress`` calls):

* ``load``: read fixed, moving and both label maps; build the model and load its weights; fixed → model grid.
* ``prealign``: affine pre-alignment and the moving image/labels onto the model grid (absent with
  ``--prealign none``, where that resampling falls into ``load``).
* ``inference``: the network (or the classical method) on the model grid; ``refinement``: ``--io-steps``.
* ``metrics``: Dice/HD95/SDlogJ/NDV/folding on the model grid; ``native``: the fixed-grid outputs (moving image
  and labels sampled once, Jacobian); ``write``: ``write_result`` (four NIfTI files, metrics.json, run.json).

Peak memory: a thread samples the resident set size (``/proc/self/statm``) every 20 ms and at every stage
boundary; the kernel's high-water mark (``ru_maxrss``, which also sees spikes between samples) is the overall
column. On CUDA ``torch.cuda.max_memory_allocated`` is reset at every boundary. The import of torch and the
package is reported apart (``import s``); the run is cold, as for a CLI user (first-call overheads included).

Volume size: ``--scales`` magnifies the input about the fixed image's centre by the factor per axis while the
voxel spacing stays (1 mm for the demo pair), and the model grid ``grid_shape`` is 160×224×192 times the factor,
rounded to a multiple of 16 per axis: a 0.5× run has 1/8 and a 1.5× run 3.375 times the voxels of a 1× run at
every stage, with the same anatomy filling the same fraction of the field of view. The default input is the demo
pair of ``unireg demo`` (MNI152 template and a deformed copy with labels, 1 mm, 160×224×192); at 1× its files
are used as they are. ``--data FIXED MOVING [FIXED_SEG MOVING_SEG]`` takes a real pair instead.

A variant without bundled weights runs with random weights (labelled so); as in ``inference.py`` its flow heads
are drawn with ``--head-std`` so that the fields are several voxels large, like trained ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BASE_SHAPE = (160, 224, 192)
#: Reported stages, in order (the engine's STAGES with ``native`` between metrics and write).
STAGE_ORDER = ("load", "prealign", "inference", "refinement", "metrics", "native", "write")
ROLES = ("fixed", "moving", "fixed_seg", "moving_seg")
GB = 2**30


# --------------------------------------------------------------------------------------------- sizes and data
def scaled_shape(scale: float, base=BASE_SHAPE, multiple: int = 16) -> tuple[int, int, int]:
    """``base`` times ``scale`` per axis, rounded half up to a multiple of ``multiple`` (at least one multiple)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return tuple(max(multiple, int(math.floor(scale * n / multiple + 0.5)) * multiple) for n in base)


def magnify_nifti(src, dst, scale: float, centre_world, shape=None, label: bool = False) -> Path:
    """Write ``src`` magnified by ``scale`` about the world point ``centre_world``, voxel spacing unchanged.

    The output has ``shape`` voxels (default ``round(scale × input shape)``); voxel ``j`` samples input voxel
    ``c_in + (j − c_out) / scale`` (``c`` = the grid centres), linear for images, nearest for labels, and the
    affine places the magnified anatomy about ``centre_world`` (the same point for fixed and moving keeps their
    relative position).
    """
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{src}: a 3D volume is needed, got shape {data.shape}")
    n = np.array(data.shape, dtype=np.float64)
    shape = tuple(int(s) for s in (shape or [max(1, math.floor(scale * k + 0.5)) for k in data.shape]))
    c_in, c_out = (n - 1) / 2, (np.array(shape) - 1) / 2
    if not label:
        data = data.astype(np.float32, copy=False)
    out = ndimage.affine_transform(data, np.full(3, 1.0 / scale), offset=c_in - c_out / scale, output_shape=shape,
                                   order=0 if label else 1, mode="constant", cval=0, prefilter=False)
    a = img.affine.astype(np.float64)
    lin, t = a[:3, :3], a[:3, 3]
    new = a.copy()
    new[:3, 3] = (1 - scale) * np.asarray(centre_world, dtype=np.float64) + scale * (t + lin @ c_in) - lin @ c_out
    res = nib.Nifti1Image(out, new)
    res.header.set_xyzt_units("mm")
    res.set_qform(new, code=1)
    res.set_sform(new, code=1)
    dst = Path(dst)
    nib.save(res, str(dst))
    return dst


def prepare_inputs(files: dict[str, str | None], scale: float, out_dir, grid_shape=None) -> dict[str, str | None]:
    """The pair at ``scale``: the files themselves at 1× (when no other shape is asked for), else magnified copies.

    ``grid_shape``: the exact output shape (the demo pair, whose box is the model grid); ``None``: round(scale × n).
    """
    import nibabel as nib
    import numpy as np

    fixed = nib.load(str(files["fixed"]))
    if scale == 1 and (grid_shape is None or tuple(grid_shape) == tuple(fixed.shape[:3])):
        return dict(files)
    centre = fixed.affine @ np.append((np.array(fixed.shape[:3]) - 1) / 2, 1.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str | None] = {}
    for role in ROLES:
        src = files.get(role)
        if not src:
            out[role] = None
            continue
        dst = out_dir / f"{role}_x{scale:g}.nii.gz"
        out[role] = str(magnify_nifti(src, dst, scale, centre[:3], shape=grid_shape, label=role.endswith("seg")))
    return out


def source_files(data: list[str] | None) -> tuple[dict[str, str | None], str, bool]:
    """(files by role, description, is_demo): ``--data`` paths or the cached demo pair of ``unireg demo``."""
    if data:
        if len(data) not in (2, 4):
            raise SystemExit("--data takes FIXED MOVING [FIXED_SEG MOVING_SEG]")
        for p in data:
            if not Path(p).is_file():
                raise SystemExit(f"--data: {p} does not exist")
        files = dict(zip(ROLES, [*data, None, None][:4]))
        return files, "the pair " + ", ".join(Path(p).name for p in data), False
    from napari_unireg.io.demo import demo_files

    f = demo_files()
    return ({r: f[r] for r in ROLES}, "the demo pair of `unireg demo` (MNI152 template + deformed copy, labels, "
            "1 mm, 160×224×192)", True)


# --------------------------------------------------------------------------------------------- measurement
def _rss_reader():
    """A function returning the resident set size in bytes (``/proc``, else psutil), or None if neither works."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        with open("/proc/self/statm") as fh:
            fh.read()

        def rss() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page

        return rss
    except OSError:
        pass
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        return None


def max_rss_bytes() -> int:
    """The kernel's RSS high-water mark of this process (Linux: kB; macOS: bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class StageMonitor:
    """Wall time, CPU time, sampled peak RSS and (CUDA) peak allocated memory per stage.

    ``enter(stage)`` closes the current stage and opens ``stage`` (a stage entered twice accumulates);
    a daemon thread samples the RSS every ``interval`` seconds into the current stage; ``stop()`` closes the last.
    """

    def __init__(self, interval: float = 0.02, cuda: bool = False):
        self.interval = interval
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_gpu: dict[str, int] = {}
        self.samples = 0
        self.current: str | None = None
        self._rss = _rss_reader()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t = self._c = 0.0

    def _sample(self) -> None:
        if self._rss is None or self.current is None:
            return
        value = self._rss()
        with self._lock:
            if self.current is not None:
                self.peak_rss[self.current] = max(self.peak_rss.get(self.current, 0), value)
                self.samples += 1

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()

    def start(self, stage: str) -> None:
        self._thread.start()
        self.enter(stage)

    def enter(self, stage: str | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # CUDA work is asynchronous: charge it to the stage that queued it
        now, cpu = time.perf_counter(), time.process_time()
        self._sample()  # the boundary belongs to both stages: short stages get at least two samples
        with self._lock:
            prev, self.current = self.current, stage
        if prev is not None:
            self.seconds[prev] = self.seconds.get(prev, 0.0) + now - self._t
            self.cpu_seconds[prev] = self.cpu_seconds.get(prev, 0.0) + cpu - self._c
            if self.cuda:
                import torch

                self.peak_gpu[prev] = max(self.peak_gpu.get(prev, 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._t, self._c = now, cpu

    def stop(self) -> None:
        self.enter(None)
        self._done.set()
        self._thread.join(timeout=1.0)


def _randomise_heads(model, head_std: float) -> bool:
    import torch

    heads = [m for m in model.modules() if type(m).__name__ == "FlowHead"]
    torch.manual_seed(0)
    with torch.no_grad():
        for h in heads:
            h.weight.normal_(0, head_std)
    return bool(heads)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run of the user path in this process; ``spec`` as built by :func:`_spec`.

    ``threads`` 0 leaves torch's threads alone (in-process use). Returns the row of the report.
    """
    t_import = time.perf_counter()
    import torch

    from napari_unireg import pipeline as engine
    from napari_unireg.io import load_volume
    from napari_unireg.pipeline import RegisterOptions
    from napari_unireg.pipeline import register as register_module
    from napari_unireg.pipeline.models import clear_model_cache

    import_seconds = time.perf_counter() - t_import
    threads = int(spec.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = spec["device"]
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA asked for but not available")
    options = RegisterOptions(model=spec["model"], device=device, prealign=spec["prealign"],
                              resolution=spec["resolution"], io_steps=int(spec["io_steps"]),
                              grid_shape=tuple(int(v) for v in spec["grid_shape"]))
    files = spec["files"]
    head_std = float(spec.get("head_std", 2e-3))
    weights = {"label": "trained"}
    original = register_module.load_model

    def load_model(model, checkpoint, dev, resolution="auto"):  # the pipeline's loader + inference.py's heads
        loaded = original(model, checkpoint, dev, resolution)
        if loaded.net is not None and not loaded.trained:
            weights["label"] = "random init"
            if head_std > 0 and _randomise_heads(loaded.net, head_std):
                weights["label"] = f"random (head σ={head_std:g})"
        return loaded

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = (_rss_reader() or (lambda: 0))()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mon = StageMonitor(interval=float(spec.get("interval", 0.02)), cuda=cuda)

    def progress(stage: str, fraction: float) -> None:
        if stage != mon.current and mon.current != "native":
            mon.enter(stage)
        if stage == "metrics" and fraction >= 1.0:
            mon.enter("native")  # the engine's last step (fixed-grid outputs) has no stage of its own

    out_dir = Path(tempfile.mkdtemp(prefix="unireg_pipeline_"))
    clear_model_cache()  # a cold run, as for a CLI user
    register_module.load_model = load_model
    try:
        mon.start("load")
        fixed = load_volume(files["fixed"], kind="image")
        moving = load_volume(files["moving"], kind="image")
        fixed_seg = load_volume(files["fixed_seg"], kind="label") if files.get("fixed_seg") else None
        moving_seg = load_volume(files["moving_seg"], kind="label") if files.get("moving_seg") else None
        load_files_seconds = time.perf_counter() - mon._t
        result = engine.register_volumes(fixed, moving, fixed_seg, moving_seg, options=options, progress=progress)
        mon.enter("write")
        engine.write_result(result, fixed, out_dir / "result", options=options, moving=moving)
        mon.stop()
    finally:
        register_module.load_model = original
        clear_model_cache()  # randomised heads must not outlive this run
        shutil.rmtree(out_dir, ignore_errors=True)
    stages = [s for s in STAGE_ORDER if s in mon.seconds]
    metrics = result.metrics
    row: dict[str, Any] = {
        "model": result.model_name or spec["model"],
        "requested_model": spec["model"],
        "device": str(result.device),
        "threads": torch.get_num_threads(),
        "scale": spec["scale"],
        "grid_shape": list(options.grid_shape),
        "input_shape": list(fixed.shape),
        "input_spacing": [round(float(v), 4) for v in fixed.spacing],
        "mvox": math.prod(options.grid_shape) / 1e6,
        "prealign": options.prealign,
        "resolution": options.resolution,
        "io_steps": options.io_steps,
        "weights_trained": bool(result.weights_trained),
        "weights": weights["label"],
        "stages": stages,
        "seconds": {s: mon.seconds[s] for s in stages},
        "cpu_seconds": {s: mon.cpu_seconds[s] for s in stages},
        "total_seconds": sum(mon.seconds[s] for s in stages),
        "total_cpu_seconds": sum(mon.cpu_seconds[s] for s in stages),
        "load_files_seconds": load_files_seconds,
        "import_seconds": import_seconds,
        "engine_seconds": dict(result.seconds),
        "peak_rss_gb": {s: mon.peak_rss.get(s, 0) / GB for s in stages},
        "peak_rss_sampled_gb": max(mon.peak_rss.values(), default=0) / GB,
        # the kernel's counter can lag the sampled value by a few pages: report the larger one
        "max_rss_gb": max(max_rss_bytes(), max(mon.peak_rss.values(), default=0)) / GB,
        "base_rss_gb": base_rss / GB,
        "rss_samples": mon.samples,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "dice_before": metrics.get("dice_before"),
        "dice": metrics.get("dice"),
        "folded_pct": metrics.get("folded_pct"),
    }
    if cuda:
        row["peak_gpu_gb"] = {s: mon.peak_gpu.get(s, 0) / GB for s in stages}
        row["peak_gpu_total_gb"] = max(mon.peak_gpu.values(), default=0) / GB
    return row


# --------------------------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, GPU, versions, load average (this process, at the start of the sweep)."""
    import numpy as np
    import torch

    from napari_unireg import __version__

    from napari_unireg.train.distributed import cpu_model

    cpu = cpu_model()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "napari_unireg": __version__},
        "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: machine line, seconds per stage, peak memory per stage."""
    m = report.get("machine", {})
    line = f"{m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical cores"
    line += f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    if m.get("versions"):
        line += ", torch " + str(m["versions"].get("torch"))
    if m.get("load_avg_start") is not None:
        line += f"; 1-min load average {m['load_avg_start']:.1f} at start"
        if m.get("load_avg_end") is not None:
            line += f", {m['load_avg_end']:.1f} at end"
    s = report.get("settings", {})
    rows = report.get("rows", [])
    stages = [st for st in STAGE_ORDER if any(st in r["seconds"] for r in rows)]
    out = [f"**Machine**: {line}.", ""]
    if s:
        out += [f"**Input**: {s.get('data', '?')}; pre-alignment {s.get('prealign')}, resolution "
                f"{s.get('resolution')}, refinement steps {s.get('io_steps')}. Scale = input and model grid "
                "per axis relative to 160×224×192 at the same voxel spacing.", ""]
    key = ["model", "device", "thr", "scale", "grid"]
    head = key + ["Mvox"] + stages + ["total", "CPU s", "import", "load avg", "weights"]
    out += ["Wall seconds per stage (CPU s: process CPU time of all stages; import: torch + package, not in total)",
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ident(r):
        return [r["model"], r["device"], str(r["threads"]), f"{r['scale']:g}×", "×".join(map(str, r["grid_shape"]))]

    for r in rows:
        cells = ident(r) + [f"{r['mvox']:.2f}"] + [_f(r["seconds"].get(st)) for st in stages]
        cells += [_f(r["total_seconds"]), _f(r["total_cpu_seconds"], ".1f"), _f(r.get("import_seconds"), ".1f"),
                  f"{_f(r.get('load_avg_start'), '.1f')}→{_f(r.get('load_avg_end'), '.1f')}", r["weights"]]
        out.append("| " + " | ".join(cells) + " |")
    head = key + ["base"] + stages + ["peak", "max RSS", "GPU"]
    out += ["", "Peak resident memory per stage, GB (sampled every 20 ms and at each boundary; base: after imports; "
            "max RSS: the kernel's high-water mark; GPU: peak CUDA memory allocated)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ident(r) + [_f(r.get("base_rss_gb"))] + [_f(r["peak_rss_gb"].get(st)) for st in stages]
        cells += [_f(r["peak_rss_sampled_gb"]), _f(r["max_rss_gb"]), _f(r.get("peak_gpu_total_gb"))]
        out.append("| " + " | ".join(cells) + " |")
    untrained = sorted({r["model"] for r in rows if not r.get("weights_trained", True)})
    if untrained:
        out += ["", f"Random weights (no bundled weights): {', '.join(untrained)}; their timings are those of the "
                "architecture, not of a trained model's fields."]
    for f in report.get("failed", []):
        out += ["", f"FAILED {f['model']} {f['device']} {f['threads']} threads {f['scale']:g}×: {f['error']}"]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], out) -> tuple[Path, Path]:
    """``out`` (JSON, NaN → null) and the Markdown beside it, each atomically (tmp + ``os.replace``)."""
    from napari_unireg.pipeline import json_ready

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    for path, text in ((out, json.dumps(json_ready(report), indent=1)), (md, format_markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out, md


# --------------------------------------------------------------------------------------------- driver
def _spec(args, model: str, device: str, threads: int, scale: float, files: dict) -> dict[str, Any]:
    return {"model": model, "device": device, "threads": threads, "scale": scale,
            "grid_shape": list(scaled_shape(scale)), "files": files, "prealign": args.prealign,
            "resolution": args.resolution, "io_steps": args.io_steps, "head_std": args.head_std}


def run_child_process(spec: dict[str, Any]) -> dict[str, Any]:
    """``child(spec)`` in a fresh Python process with the thread environment set; raises RuntimeError on failure."""
    env = dict(os.environ)
    if spec["threads"] > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(spec["threads"])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dp-vfa"],
                   help="registry names, 'default', 'classical' or checkpoint paths (default: dp-vfa)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op threads, one run each")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all: CPU, then CUDA if present")
    p.add_argument("--scales", nargs="+", type=float, default=[0.5, 1.0, 1.5],
                   help="input and model grid per axis relative to 160×224×192 (grid rounded to multiples of 16)")
    p.add_argument("--resolution", choices=["auto", "full", "half"], default="auto")
    p.add_argument("--io-steps", type=int, default=0, help="instance-optimisation refinement steps")
    p.add_argument("--prealign", choices=["affine", "none"], default="affine")
    p.add_argument("--data", nargs="+", metavar="FILE", default=None,
                   help="FIXED MOVING [FIXED_SEG MOVING_SEG] (default: the demo pair)")
    p.add_argument("--head-std", type=float, default=2e-3, help="flow-head weight σ of variants without weights")
    p.add_argument("--out", default=None, help="JSON report (the Markdown goes beside it, .md)")
    p.add_argument("--compare", default=None, metavar="OLD_TREE",
                   help="side by side: the whole `unireg register` command of OLD_TREE (e.g. a git worktree of the "
                        "last release) and of this tree, each in a fresh process, per stage")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- side by side
def run_cli(tree: Path, files: dict[str, str | None], out: Path, prealign: str, threads: int,
            extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``python -m napari_unireg.cli register`` of ``tree`` in a fresh process: wall seconds (process start
    included), peak RSS (the child's ``ru_maxrss``) and the engine's own stage seconds from metrics.json."""
    env = dict(os.environ, PYTHONPATH=str(tree), **{k: str(threads) for k in
                                                    ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cmd = [sys.executable, "-m", "napari_unireg.cli", "register", files["fixed"], files["moving"],
           "--prealign", prealign, "--out", str(out), "--overwrite", "--quiet", *extra]
    for role in ("fixed_seg", "moving_seg"):
        if files.get(role):
            cmd += [f"--{role.replace('_', '-')}", files[role]]
    t = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], env=env, cwd=str(tree),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}: {stderr.strip().splitlines()[-2:]}")
    rss_kb = [int(line.split()[1]) for line in stderr.splitlines() if line.startswith("MAXRSS_KB")]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "max_rss_gb": (rss_kb[-1] * 1024 / GB) if rss_kb else float("nan"),
            "seconds": metrics.get("seconds", {}),
            "summary": stdout.strip().splitlines()[0] if stdout.strip() else ""}


def max_disp_difference(a: Path, b: Path) -> float:
    """max |a − b| over two Learn2Reg displacement files (voxels)."""
    import nibabel as nib
    import numpy as np

    x = np.asarray(nib.load(str(a)).dataobj, dtype=np.float64)
    y = np.asarray(nib.load(str(b)).dataobj, dtype=np.float64)
    return float(np.abs(x - y).max())


def compare(old_tree: Path, new_tree: Path, files: dict[str, str | None], threads: int) -> str:
    """Old and new ``unireg register`` side by side (``--prealign none`` and ``affine``); a Markdown table."""
    work = Path(tempfile.mkdtemp(prefix="unireg_compare_"))
    rows = []
    try:
        for prealign in ("none", "affine"):
            res = {}
            for label, tree in (("old", old_tree), ("new", new_tree)):
                res[label] = run_cli(tree, files, work / f"{label}-{prealign}", prealign, threads)
                print(f"  {label} --prealign {prealign}: {res[label]['wall']:.1f} s wall, "
                      f"{res[label]['max_rss_gb']:.2f} GB peak", flush=True)
            diff = max_disp_difference(work / f"old-{prealign}" / "disp.nii.gz",
                                       work / f"new-{prealign}" / "disp.nii.gz")
            rows.append((prealign, res, diff))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"`unireg register` old ({old_tree}) vs new ({new_tree}), {threads} threads, load average {load:.1f}", ""]
    for prealign, res, diff in rows:
        keys = list(dict.fromkeys([*res["old"]["seconds"], *res["new"]["seconds"]]))
        lines += [f"--prealign {prealign}: max |disp old − disp new| = {diff:.2e} voxel", "",
                  "| seconds | old | new |", "|---|---:|---:|"]
        for k in keys:
            o, n = res["old"]["seconds"].get(k), res["new"]["seconds"].get(k)
            lines.append(f"| {k} | {_f(o)} | {_f(n)} |")
        for label, key in (("outside the engine (start, read, write)", None), ("whole command (wall)", "wall")):
            o = res["old"]["wall"] - (0 if key else res["old"]["seconds"].get("total", 0))
            n = res["new"]["wall"] - (0 if key else res["new"]["seconds"].get("total", 0))
            lines.append(f"| {label} | {o:.2f} | {n:.2f} |")
        lines.append(f"| peak RSS GB | {res['old']['max_rss_gb']:.2f} | {res['new']['max_rss_gb']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.compare is not None:
        files, description, _ = source_files(args.data)
        print(f"# {description}", flush=True)
        print(compare(Path(args.compare).resolve(), Path(__file__).resolve().parents[1], files, args.threads[0]))
        return 0
    import torch

    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            raise SystemExit("--device cuda: CUDA is not available here")
    files, description, is_demo = source_files(args.data)
    report: dict[str, Any] = {
        "complete": False,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "settings": {"data": description, "files": files, "prealign": args.prealign, "resolution": args.resolution,
                     "io_steps": args.io_steps, "head_std": args.head_std, "scales": args.scales,
                     "threads": args.threads, "devices": devices, "models": args.models},
        "rows": [],
        "failed": [],
    }
    work = Path(tempfile.mkdtemp(prefix="unireg_pipeline_data_"))
    try:
        for scale in args.scales:
            grid = scaled_shape(scale)
            t = time.perf_counter()
            scaled = prepare_inputs(files, scale, work / f"x{scale:g}", grid_shape=grid if is_demo else None)
            print(f"# scale {scale:g}×: grid {grid}, inputs ready in {time.perf_counter() - t:.1f} s", flush=True)
            for device in devices:
                for model in args.models:
                    for threads in args.threads:
                        spec = _spec(args, model, device, threads, scale, scaled)
                        try:
                            row = run_child_process(spec)
                        except RuntimeError as exc:
                            report["failed"].append({"model": model, "device": device, "threads": threads,
                                                     "scale": scale, "error": str(exc)})
                            print(f"  {model} {device} {threads} thr: FAILED {exc}", flush=True)
                            continue
                        report["rows"].append(row)
                        print(f"  {row['model']} {device} {row['threads']} thr: {row['total_seconds']:.1f} s, "
                              f"peak RSS {row['max_rss_gb']:.2f} GB, weights {row['weights']}", flush=True)
                        if args.out:
                            write_report(report, args.out)  # partial results survive an interrupted sweep
            shutil.rmtree(work / f"x{scale:g}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report["complete"] = True
    print()
    print(format_markdown(report))
    if args.out:
        js, md = write_report(report, args.out)
        print(f"report: {js} and {md}")
    return 1 if report["failed"] and not report["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
