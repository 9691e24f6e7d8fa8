"""The registration engine: the whole user path behind the CLI and the napari widgets.

``register_volumes`` takes canonical :class:`~napari_unireg.io.Volume` objects (fixed, moving, optional label
maps), puts both images on the model grid of the fixed image (1 mm RAS, 160×224×192 by default; the moving image
is pulled through the affine pre-alignment), runs a network (or the classical instance optimisation), optionally
refines, computes the metrics on the model grid (the Learn2Reg evaluation convention) and maps every result back
to the fixed image's native canonical grid, sampling the original moving image once.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .engine_types import Cancelled, ProgressCallback, RegisterOptions, RegistrationResult, StopCallback
from .errors import UserError

__all__ = [
    "available_devices",
    "resolve_device",
    "default_model_name",
    "options_from_args",
    "register_volumes",
    "write_result",
    "Cancelled",
    "RegisterOptions",
    "RegistrationResult",
]

CLASSICAL = "classical"
#: Adam steps per level of the classical method (levels 1/4 and 1/2 resolution).
CLASSICAL_STEPS = 60


def available_devices() -> list[tuple[str, str]]:
    """What can run here: ``[(id, label)]``, CUDA devices by name first, then the CPU."""
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i}", f"CUDA {i}: {torch.cuda.get_device_name(i)}"))
    out.append(("cpu", f"CPU ({torch.get_num_threads()} threads)"))
    return out


def resolve_device(name: str):
    """``auto`` → CUDA when present, else CPU. A CUDA request without CUDA is a :class:`UserError`."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")


def default_model_name() -> str:
    """The bundled model with the best validation Dice in its card; the classical method when none is bundled."""
    from .models.registry import list_models

    best, best_dice = CLASSICAL, -1.0
    for info in list_models():
        if not info.weights or not info.card:
            continue
        dice = (info.card.get("metrics") or {}).get("dice")
        if dice is None:
            dice = 0.0
        if info.card.get("default"):
            return info.name
        if dice > best_dice:
            best, best_dice = info.name, dice
    return best


def options_from_args(args) -> RegisterOptions:
    """RegisterOptions from the CLI's parsed arguments."""
    return RegisterOptions(
        model=getattr(args, "model", "default"),
        checkpoint=getattr(args, "checkpoint", None),
        device=getattr(args, "device", "auto"),
        prealign=getattr(args, "prealign", "affine"),
        resolution=getattr(args, "resolution", "auto"),
        io_steps=int(getattr(args, "io_steps", 0) or 0),
        grid_shape=tuple(int(v) for v in getattr(args, "grid", (160, 224, 192))),
    )


# ----------------------------------------------------------------------------------------------------- checks


def _check_inputs(fixed, moving, fixed_seg, moving_seg) -> None:
    for vol, role in ((fixed, "fixed image"), (moving, "moving image")):
        if vol is None:
            raise UserError(f"no {role} given")
        if vol.is_label:
            raise UserError(f"the {role} ({vol.name}) is a label map; give an intensity image")
    for seg, img, role in ((fixed_seg, fixed, "fixed"), (moving_seg, moving, "moving")):
        if seg is None:
            continue
        if not seg.is_label:
            raise UserError(f"the {role} label map ({seg.name}) is an intensity image, not labels")
        if seg.shape != img.shape or not np.allclose(seg.affine, img.affine, atol=1e-3):
            raise UserError(
                f"the {role} label map {seg.name} {seg.shape} is not on the grid of the {role} image "
                f"{img.name} {img.shape}"
            )


def _check_options(options: RegisterOptions) -> None:
    if options.prealign not in ("affine", "none"):
        raise UserError(f"unknown pre-alignment {options.prealign!r}: use affine or none")
    if options.resolution not in ("auto", "full", "half"):
        raise UserError(f"unknown resolution {options.resolution!r}: use auto, full or half")
    if options.io_steps < 0:
        raise UserError("refinement steps must be >= 0")


# ----------------------------------------------------------------------------------------------------- models


def load_registration_model(options: RegisterOptions, device) -> tuple[Any, dict, bool]:
    """(model or None for classical, card, weights_trained)."""
    name = options.checkpoint or options.model or "default"
    if name == "default" and not options.checkpoint:
        name = default_model_name()
    if name == CLASSICAL:
        return None, {"name": CLASSICAL, "resolution": "half"}, True
    from .models.registry import build_model, list_models, load_pretrained

    known = {m.name: m for m in list_models()}
    if options.checkpoint is None and name in known and not known[name].weights:
        model = build_model(name)
        model.to(device).eval()
        return model, {"name": name, "resolution": "full"}, False
    if options.checkpoint is None and name not in known and not Path(name).exists():
        raise UserError(f"unknown model {name!r}; `unireg models` lists them (or give --checkpoint PATH)")
    model, card = load_pretrained(name, device=str(device))
    model.eval()
    return model, card, True


def _predict(model, fixed_t, moving_t, resolution: str, device, amp: bool):
    """Network displacement on the model grid (``1×3×S``) and the inverse for IC models, at the chosen resolution."""
    import torch
    import torch.nn.functional as F

    from .spatial import resize_flow, upsample_pooled_flow

    shape = tuple(fixed_t.shape[2:])
    f, m = fixed_t, moving_t
    if resolution == "half":
        f, m = F.avg_pool3d(f, 2, ceil_mode=True), F.avg_pool3d(m, 2, ceil_mode=True)
    multiple = getattr(model, "grid_multiple", 16)
    pads = [(-s) % multiple for s in f.shape[2:]]
    if any(pads):  # pad to the network's multiple, crop the field afterwards
        pad = [0, pads[2], 0, pads[1], 0, pads[0]]
        f, m = F.pad(f, pad), F.pad(m, pad)
    use_amp = amp and device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        out = model(m, f)
    crop = (slice(None), slice(None)) + tuple(slice(0, s - p) for s, p in zip(f.shape[2:], pads))
    disp = out.disp.float()[crop]
    inverse = out.inverse.float()[crop] if out.inverse is not None else None
    factor = 2 if resolution == "half" else 1

    def to_full(u):
        u = upsample_pooled_flow(u, factor)
        return resize_flow(u, shape) if tuple(u.shape[2:]) != shape else u  # odd sizes: ceil-pooled grid

    return to_full(disp), None if inverse is None else to_full(inverse)


# ----------------------------------------------------------------------------------------------------- main path


def register_volumes(
    fixed,
    moving,
    fixed_seg=None,
    moving_seg=None,
    *,
    options: RegisterOptions | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (canonical Volumes); see the module docstring for the path.

    ``progress(stage, fraction)`` reports the stages of :data:`~napari_unireg.engine_types.STAGES`;
    ``should_stop()`` is polled between steps and raises :class:`Cancelled` when it returns True.
    """
    import torch

    from .instance_opt import instance_optimise
    from .metrics import evaluate_registration, jacobian_determinant
    from .preprocess import is_normalized, normalize_intensity, to_model_grid
    options = options or RegisterOptions()
    _check_options(options)
    _check_inputs(fixed, moving, fixed_seg, moving_seg)

    def report(stage: str, fraction: float) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled()
        if progress is not None:
            progress(stage, float(fraction))

    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    device = resolve_device(options.device)
    report("load", 0.0)
    model, card, trained = load_registration_model(options, device)
    model_name = card.get("name") or (options.checkpoint and Path(options.checkpoint).stem) or options.model

    # -- model grid and pre-alignment
    t = time.perf_counter()
    fixed_m, mapping = to_model_grid(fixed, options.grid_shape)
    report("load", 1.0)
    matrix = None
    if options.prealign == "affine":
        from .prealign import affine_prealign

        report("prealign", 0.0)
        try:
            result = affine_prealign(fixed.data, moving.data, fixed.affine, moving.affine, should_stop=should_stop,
                                     progress=lambda _stage, f: report("prealign", f))
        except InterruptedError:
            raise Cancelled() from None
        matrix = np.asarray(result.matrix, dtype=np.float64)
    moving_m = mapping.resample_to_model(moving, matrix)
    if not is_normalized(moving_m):
        moving_m = normalize_intensity(moving_m)
    if np.count_nonzero(moving_m > 0) < 0.001 * moving_m.size:
        raise UserError("fixed and moving images do not overlap after pre-alignment")
    fixed_seg_m = mapping.to_model(fixed_seg.data, order=0) if fixed_seg is not None else None
    moving_seg_m = mapping.resample_to_model(moving_seg, matrix) if moving_seg is not None else None
    seconds["prealign"] = time.perf_counter() - t
    if matrix is not None:
        report("prealign", 1.0)

    # -- network (or classical) displacement on the model grid
    t = time.perf_counter()
    fixed_t = torch.from_numpy(np.ascontiguousarray(fixed_m, dtype=np.float32))[None, None].to(device)
    moving_t = torch.from_numpy(np.ascontiguousarray(moving_m, dtype=np.float32))[None, None].to(device)
    inverse = None
    report("inference", 0.0)
    if model is None:
        disp = instance_optimise(
            fixed_t,
            moving_t,
            steps=CLASSICAL_STEPS,
            lam=options.io_lambda,
            fold_weight=options.io_fold_weight,
            progress=lambda f: report("inference", f),
            should_stop=should_stop,
        )
    else:
        resolution = options.resolution if options.resolution != "auto" else card.get("resolution", "full")
        disp, inverse = _predict(model, fixed_t, moving_t, resolution, device, options.amp)
    seconds["inference"] = time.perf_counter() - t
    report("inference", 1.0)

    if options.io_steps > 0:
        t = time.perf_counter()
        report("refinement", 0.0)
        disp = instance_optimise(
            fixed_t,
            moving_t,
            init_disp=disp,
            steps=options.io_steps,
            lam=options.io_lambda,
            fold_weight=options.io_fold_weight,
            progress=lambda f: report("refinement", f),
            should_stop=should_stop,
        )
        inverse = None  # the refinement breaks exact inverse consistency: do not report a stale inverse
        seconds["refinement"] = time.perf_counter() - t
        report("refinement", 1.0)

    with torch.inference_mode():
        disp_model = disp[0].float().cpu().numpy()
        inverse_model = inverse[0].float().cpu().numpy() if inverse is not None else None
    seconds["registration"] = time.perf_counter() - t_start

    # -- metrics on the model grid (1 mm, Learn2Reg convention)
    t = time.perf_counter()
    report("metrics", 0.0)
    both = fixed_seg_m is not None and moving_seg_m is not None  # moving labels alone are warped, not scored
    metrics = evaluate_registration(
        disp_model, fixed_seg_m if both else None, moving_seg_m if both else None, fixed_image=fixed_m
    )
    if inverse_model is not None:
        from .metrics import inverse_consistency_error

        metrics["inverse_consistency"] = inverse_consistency_error(disp_model, inverse_model)
    seconds["metrics"] = time.perf_counter() - t
    report("metrics", 1.0)

    # -- back to the native fixed grid: sample the original moving image once
    disp_native, warped, warped_seg = _to_native(disp_model, mapping, matrix, fixed, moving, moving_seg)
    jac = jacobian_determinant(disp_native)
    seconds["total"] = time.perf_counter() - t_start
    metrics.update(
        model=model_name,
        device=str(device),
        weights_trained=bool(trained),
        seconds=dict(seconds),
        prealign=options.prealign,
        io_steps=options.io_steps,
    )
    return RegistrationResult(
        disp_model=disp_model,
        disp_native=disp_native,
        warped=warped,
        jacobian=jac,
        metrics=metrics,
        warped_seg=warped_seg,
        inverse_native=None if inverse_model is None else mapping.field_to_native(inverse_model),
        prealign_matrix=matrix,
        model_name=model_name,
        device=str(device),
        seconds=seconds,
        weights_trained=bool(trained),
    )


def _to_native(disp_model, mapping, matrix, fixed, moving, moving_seg):
    """Fixed-grid outputs: the Learn2Reg field w.r.t. the moving image placed on the fixed grid by world
    coordinates (pre-alignment folded in), and the moving image/labels sampled once from their own grid."""
    from scipy.ndimage import map_coordinates

    from .spatial import identity_grid

    v = mapping.field_to_native(disp_model)  # native voxels, without the pre-alignment
    grid = identity_grid(fixed.shape).numpy()
    pts = grid + v  # native fixed voxel coordinates in the "pre-aligned" space
    a = fixed.affine
    w = np.eye(4) if matrix is None else matrix
    to_fixed_vox = np.linalg.inv(a) @ w @ a  # pre-aligned fixed voxel -> fixed voxel of the moving world point
    lin, off = to_fixed_vox[:3, :3], to_fixed_vox[:3, 3]
    fixed_coords = np.einsum("ij,j...->i...", lin, pts) + off[:, None, None, None]
    disp_native = (fixed_coords - grid).astype(np.float32)

    def sample(vol, order):
        to_vox = np.linalg.inv(vol.affine) @ a  # fixed voxel -> this volume's voxel
        coords = np.einsum("ij,j...->i...", to_vox[:3, :3], fixed_coords) + to_vox[:3, 3][:, None, None, None]
        data = vol.data if order == 1 else vol.data.astype(np.float32)
        out = map_coordinates(data, coords, order=order, mode="constant", cval=0.0, prefilter=False)
        return out.astype(vol.data.dtype) if order == 0 else out.astype(np.float32)

    warped = sample(moving, 1)
    warped_seg = sample(moving_seg, 0) if moving_seg is not None else None
    return disp_native, warped, warped_seg


def provenance(options: RegisterOptions, result: RegistrationResult, fixed=None, moving=None) -> dict[str, Any]:
    """What reproduces a run: options, model, versions, machine (saved as run.json)."""
    import torch

    from . import __version__

    return {
        "napari_unireg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "options": options.to_dict(),
        "model": result.model_name,
        "device": result.device,
        "fixed": str(getattr(fixed, "path", "") or ""),
        "moving": str(getattr(moving, "path", "") or ""),
        "prealign_matrix": None if result.prealign_matrix is None else np.asarray(result.prealign_matrix).tolist(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def json_ready(obj):
    """A metrics/provenance structure as plain JSON: string keys, Python scalars, NaN/inf as null."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _thread_budget() -> int:
    """The user's thread setting (torch's, set by ``--threads``) when torch is loaded, else the core count."""
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else (os.cpu_count() or 1)


def write_result(
    result: RegistrationResult, fixed, out, *, overwrite: bool = False, options: RegisterOptions | None = None,
    moving=None,
) -> dict[str, Path]:
    """Write the results into ``out`` (created) as one unit (:mod:`~napari_unireg.result_folder`): images in the
    fixed file's own voxel order and header. An OSError while writing is a one-line UserError."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from .cli import RESULT_FILES
    from .io import disp_to_original_orientation, save_disp_itk, save_disp_l2r, save_volume
    from .result_folder import result_folder, test_pause

    out = Path(out)
    names = ["warped.nii.gz", "jacobian.nii.gz", "disp.nii.gz", "disp_itk.nii.gz", "metrics.json", "run.json"]
    if result.warped_seg is not None:
        names.append("warped_seg.nii.gz")
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:  # refuse before writing anything, so a refused run leaves the folder as it was
        raise UserError(f"output files already exist in {out}: {', '.join(clash)}; "
                        "use --overwrite or another output folder")
    disp_orig = disp_to_original_orientation(result.disp_native, fixed)
    # Everything goes into a hidden sibling folder that replaces `out` whole at the end: `out` is always either
    # the old complete result or the new one, and no file of an earlier run (e.g. warped_seg) survives --overwrite.
    with result_folder(out, overwrite=overwrite, result_names=RESULT_FILES) as tmp:
        jobs = {
            "warped": lambda: save_volume(result.warped, fixed, tmp / "warped.nii.gz", dtype=np.float32),
            "jacobian": lambda: save_volume(result.jacobian.astype(np.float32), fixed, tmp / "jacobian.nii.gz"),
            "disp": lambda: save_disp_l2r(disp_orig, tmp / "disp.nii.gz"),
            "disp_itk": lambda: save_disp_itk(disp_orig, fixed.original_affine, tmp / "disp_itk.nii.gz"),
        }
        if result.warped_seg is not None:
            jobs["warped_seg"] = lambda: save_volume(result.warped_seg, fixed, tmp / "warped_seg.nii.gz")
        # gzip compression dominates and zlib releases the GIL: the files compress in parallel threads
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(jobs), _thread_budget())))
        try:
            futures = {key: pool.submit(job) for key, job in jobs.items()}
            written = {key: out / fut.result().name for key, fut in futures.items()}
        finally:  # on Ctrl-C/SIGTERM or a failed file the files not yet started are not written at all
            pool.shutdown(wait=True, cancel_futures=True)
        test_pause("write")  # test-only hook (UNIREG_TEST_PAUSE_AT=write): a signal lands mid-write
        for name, payload in (
            ("metrics.json", result.metrics),
            ("run.json", provenance(options or RegisterOptions(), result, fixed, moving)),
        ):
            (tmp / name).write_text(json.dumps(json_ready(payload), indent=1))
            written[name.split(".")[0]] = out / name
    return written
