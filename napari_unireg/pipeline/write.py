"""The write stage: the result folder (NIfTI images in the fixed file's own voxel order and header, the
Learn2Reg and ITK displacement files, metrics.json, run.json) and the provenance of a run.

Formats (documented in the README): images float32 (labels in the moving label map's dtype); ``disp.nii.gz`` and
``disp_itk.nii.gz`` stay float32 because NIfTI-1 has no float16 data type, ``disp.npz`` (asked for by name) is the
Learn2Reg submission format, float16; gzip at level 1 (nibabel's default,
the fastest zlib level), by ISA-L when the optional ``isal`` package is installed (~15× faster, same format).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .types import RegisterOptions, RegistrationResult

__all__ = ["DEFAULT_OUTPUTS", "OUTPUTS", "RESULT_FILES", "check_outputs", "write_result", "provenance", "json_ready"]

#: What ``--outputs`` can name, and the file each is written to (``run.json`` is always written).
RESULT_FILES = {
    "warped": "warped.nii.gz",
    "disp": "disp.nii.gz",
    "disp_itk": "disp_itk.nii.gz",
    "disp_npz": "disp.npz",
    "jacobian": "jacobian.nii.gz",
    "warped_seg": "warped_seg.nii.gz",
    "brain_mask_fixed": "brain_mask_fixed.nii.gz",
    "warped_head": "warped_head.nii.gz",
    "metrics": "metrics.json",
    "run": "run.json",
}
OUTPUTS = tuple(k for k in RESULT_FILES if k != "run")
#: What is written when ``--outputs`` is not given: everything but the float16 submission copy of the field.
DEFAULT_OUTPUTS = tuple(k for k in OUTPUTS if k != "disp_npz")


def check_outputs(outputs) -> tuple[str, ...]:
    """The validated output names (:data:`DEFAULT_OUTPUTS` for None); :class:`UserError` for unknown ones."""
    if outputs is None:
        return DEFAULT_OUTPUTS
    if isinstance(outputs, str):
        outputs = [o for o in outputs.replace(" ", "").split(",") if o]
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise UserError(f"unknown output {', '.join(unknown) or '(none given)'}: choose from {','.join(OUTPUTS)}")
    return tuple(o for o in OUTPUTS if o in outputs)


def provenance(options: RegisterOptions, result: RegistrationResult, fixed=None, moving=None) -> dict[str, Any]:
    """What reproduces a run: options, model, versions, machine (saved as run.json)."""
    import torch

    from .. import __version__

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
    moving=None, outputs=None,
) -> dict[str, Path]:
    """Write the results into ``out`` (created): images in the fixed file's own voxel order and header.

    ``outputs`` (default: :data:`DEFAULT_OUTPUTS`) names what to write; ``warped_seg`` only exists with a moving
    label map. Returns ``{output: path}``.
    """
    import json
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from ..io import disp_to_original_orientation, save_disp_itk, save_disp_l2r, save_disp_submission, save_volume

    from ..io.result_folder import result_folder, test_pause

    wanted = check_outputs(outputs)
    out = Path(out)
    names = [RESULT_FILES[k] for k in wanted if getattr(result, k, True) is not None]
    names.append(RESULT_FILES["run"])
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:  # refuse before writing anything, so a refused run leaves the folder as it was
        raise UserError(f"output files already exist in {out}: {', '.join(clash)}; "
                        "use --overwrite or another output folder")
    fields = {"disp", "disp_itk", "disp_npz"}
    disp_orig = disp_to_original_orientation(result.disp_native, fixed) if fields & set(wanted) else None
    # Everything goes into a hidden sibling folder that replaces `out` whole at the end: `out` is always either
    # the old complete result or the new one, and no file of an earlier run (e.g. warped_seg) survives --overwrite.
    with result_folder(out, overwrite=overwrite, result_names=RESULT_FILES.values()) as tmp:
        jobs = {
            "warped": lambda: save_volume(result.warped, fixed, tmp / "warped.nii.gz", dtype=np.float32),
            "jacobian": lambda: save_volume(result.jacobian.astype(np.float32, copy=False), fixed, tmp / "jacobian.nii.gz"),
            "disp": lambda: save_disp_l2r(disp_orig, tmp / "disp.nii.gz"),
            "disp_itk": lambda: save_disp_itk(disp_orig, fixed.original_affine, tmp / "disp_itk.nii.gz"),
            "disp_npz": lambda: save_disp_submission(disp_orig, tmp / "disp.npz"),
        }
        for key in ("warped_seg", "brain_mask_fixed", "warped_head"):  # only where the run produced them
            array = getattr(result, key)
            if array is not None:
                jobs[key] = partial(save_volume, array, fixed, tmp / RESULT_FILES[key])
        jobs = {k: job for k, job in jobs.items() if k in wanted}
        # gzip compression dominates and zlib releases the GIL: the files compress in parallel threads
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(jobs), _thread_budget())))
        try:
            futures = {key: pool.submit(job) for key, job in jobs.items()}
            written = {key: out / fut.result().name for key, fut in futures.items()}
        finally:  # on Ctrl-C/SIGTERM or a failed file the files not yet started are not written at all
            pool.shutdown(wait=True, cancel_futures=True)
        test_pause("write")  # test-only hook (UNIREG_TEST_PAUSE_AT=write): a signal lands mid-write
        texts = [("run.json", provenance(options or RegisterOptions(), result, fixed, moving))]
        if "metrics" in wanted:
            texts.insert(0, ("metrics.json", result.metrics))
        for name, payload in texts:
            (tmp / name).write_text(json.dumps(json_ready(payload), indent=1))
            written[name.split(".")[0]] = out / name
    return written
