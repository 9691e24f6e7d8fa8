"""Plain data types of the registration pipeline (no torch import): options in, result out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import Cancelled  # noqa: F401  (re-exported with the types that use it)

#: ``progress(stage, fraction)``: stage is one of STAGES, fraction in [0, 1] within that stage.
ProgressCallback = Callable[[str, float], None]
#: Polled between steps; returning True cancels the run (raises :class:`Cancelled`).
StopCallback = Callable[[], bool]

STAGES = ("load", "skullstrip", "prealign", "inference", "refinement", "metrics", "write")
#: Share of a typical run's wall time per stage (progress bars): written once, here.
STAGE_WEIGHTS = {
    "load": 5, "skullstrip": 10, "prealign": 10, "inference": 35, "refinement": 25, "metrics": 15, "write": 10,
}


@dataclass
class RegisterOptions:
    """What to run. Defaults are what `unireg register` and the napari widget use."""

    model: str = "default"  # registry name, "default", "classical" (instance optimisation only) or a path
    checkpoint: str | None = None  # explicit .safetensors path (overrides model)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prealign: str = "affine"  # affine | none
    resolution: str = "auto"  # auto (the model card's), full, half
    io_steps: int = 0  # instance-optimisation refinement steps after the network
    io_lambda: float = 2.0  # diffusion weight of the refinement (and of the classical method)
    io_fold_weight: float = 100.0  # weight of the refinement's folding penalty mean(relu(0.05 - J))
    grid_shape: tuple[int, int, int] = (160, 224, 192)
    # fp16 autocast on CUDA (opt-in): on an H200 it moved dp-vfa's field by 0.063 voxel against the CPU's fp32
    # (bf16: 0.18-0.38 voxel on every variant; fp32: <= 0.014) and was not faster (bench/gpu_run_s19.md), so
    # the default stays fp32 on every device
    amp: bool = False
    seed: int = 0
    metrics: bool = True  # run the metrics stage (Dice/HD95/SDlogJ/NDV/folding)
    # brain extraction before registration (deepbet): auto (images that still have a skull), on, off.
    # The library's default is off (explicit); `unireg register` and the Register widget default to auto.
    skull_strip: str = "off"
    # the networks' input contrast: "scale" (each image to [0, 1], what they were trained on) or "standardize"
    # (its CSF/grey/white-matter means moved to the training images', core.intensity.standardize_contrast): for
    # images from another scanner or sequence; the refinement and the outputs keep the scaled images
    contrast: str = "scale"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class RegistrationResult:
    """Everything a front end shows or writes. Arrays are in the *fixed image's native grid* unless noted.

    * ``disp_model``: 3×X×Y×Z displacement on the model grid (canonical RAS, 1 mm), voxel units, pull
      convention; fixed→moving after pre-alignment is folded in (Learn2Reg convention on the model grid).
    * ``disp_native``: 3×X×Y×Z displacement on the fixed image's canonical grid (voxel units of that grid).
    * ``warped``: moving image resampled into the fixed canonical grid; ``warped_seg`` likewise (nearest).
    * ``jacobian``: central-difference Jacobian determinant on the canonical fixed grid (border = 1).
    * ``metrics``: the dict written to metrics.json.
    * ``brain_mask_fixed``: the fixed image's brain mask (uint8) when brain extraction ran on it.
    * ``warped_head``: the moving image *as given* (with its skull) pulled through the same field, when its
      brain was extracted for the registration (``warped`` is then the warped brain).
    """

    disp_model: np.ndarray
    disp_native: np.ndarray
    warped: np.ndarray
    jacobian: np.ndarray
    metrics: dict[str, Any]
    warped_seg: np.ndarray | None = None
    inverse_native: np.ndarray | None = None
    prealign_matrix: np.ndarray | None = None
    model_name: str = ""
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    weights_trained: bool = True
    brain_mask_fixed: np.ndarray | None = None
    warped_head: np.ndarray | None = None
