"""The demo pair's files: built once from the MNI152 template (nilearn) and kept in a cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["demo_cache_dir", "demo_files", "demo_volumes"]


def demo_cache_dir() -> Path:
    """Where the generated demo NIfTI files are kept between runs (built once, a few seconds)."""
    base = os.environ.get("UNIREG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "napari-unireg")
    return Path(base) / "demo-v1"


def demo_files(seed: int = 0) -> dict[str, str]:
    """Paths of the demo NIfTI files (fixed, moving, fixed_seg, moving_seg, true_disp), building them if needed."""
    from .demo_data import make_demo_pair, write_demo_pair

    folder = demo_cache_dir() / f"seed{seed}"
    names = {r: folder / f"demo_{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    truth = folder / "demo_true_disp.npy"
    if not all(p.exists() for p in names.values()) or not truth.exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        write_demo_pair(tmp, seed)
        np.save(tmp / truth.name, make_demo_pair(seed).true_disp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    out = {k: str(v) for k, v in names.items()}
    out["true_disp"] = str(truth)
    return out


def demo_volumes(seed: int = 0):
    """(fixed, moving, fixed_seg, moving_seg) Volumes of the demo pair."""
    from .nifti import load_volume

    f = demo_files(seed)
    return (
        load_volume(f["fixed"], kind="image"),
        load_volume(f["moving"], kind="image"),
        load_volume(f["fixed_seg"], kind="label"),
        load_volume(f["moving_seg"], kind="label"),
    )
