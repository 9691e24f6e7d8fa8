"""``register_volumes``: one registration as a short composition of the stages in :mod:`.stages`.

It takes canonical :class:`~napari_unireg.io.Volume` objects (fixed, moving, optional label maps), puts both
images on the model grid of the fixed image (1 mm RAS, 160×224×192 by default; the moving image is pulled
through the affine pre-alignment), runs a network (or the classical instance optimisation), optionally refines,
maps every result back to the fixed image's native canonical grid, sampling the original moving image once, and
then computes the metrics on the model grid (the Learn2Reg evaluation convention), so that a front end can show
the fields first (``on_fields``). :func:`validate_options` checks every option before anything is loaded;
:func:`warm_up` loads and runs a network ahead of the first registration.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..core.intensity import MODEL_SHAPE
from ..errors import Cancelled, UserError
from . import stages
from .device import available_devices, resolve_device
from .models import CLASSICAL, default_model_name, load_model
from .types import ProgressCallback, RegisterOptions, RegistrationResult, StopCallback
from .write import json_ready, provenance, write_result

__all__ = [
    "available_devices",
    "resolve_device",
    "default_model_name",
    "validate_options",
    "register_volumes",
    "warm_up",
    "write_result",
    "provenance",
    "json_ready",
    "Cancelled",
    "CLASSICAL",
    "RegisterOptions",
    "RegistrationResult",
]

#: The model grid's sizes must be multiples of this: the 1/2 and 1/4 levels (half-resolution networks, the
#: classical method's pyramid) then pool without partial voxels. A network's own multiple (16 or 32) is reached
#: by padding inside :class:`~napari_unireg.models.adapter.GridAdapter`.
GRID_MULTIPLE = 8
GRID_MIN = 32


def validate_options(options: RegisterOptions) -> RegisterOptions:
    """Check every option before any image or network is loaded; :class:`UserError` naming the first bad one.

    Model name or checkpoint file, device (a CUDA request without CUDA), pre-alignment, resolution, refinement
    steps, model grid (three sizes, each ≥ 32 and a multiple of 8). Returns ``options`` unchanged.
    """
    from .models import check_model, model_key

    if options.prealign not in ("affine", "none"):
        raise UserError(f"unknown pre-alignment {options.prealign!r}: use affine or none")
    if options.resolution not in ("auto", "full", "half"):
        raise UserError(f"unknown resolution {options.resolution!r}: use auto, full or half")
    if int(options.io_steps) < 0:
        raise UserError(f"refinement steps must be >= 0, got {options.io_steps}")
    grid = tuple(options.grid_shape)
    if len(grid) != 3 or any(int(s) != s or s < GRID_MIN or s % GRID_MULTIPLE for s in grid):
        raise UserError(f"model grid {grid}: give three sizes, each at least {GRID_MIN} and a multiple of "
                        f"{GRID_MULTIPLE} (default {' '.join(map(str, MODEL_SHAPE))})")
    from .skullstrip import SKULL_STRIP_MODES

    if options.skull_strip not in SKULL_STRIP_MODES:
        raise UserError(f"unknown skull stripping {options.skull_strip!r}: use {', '.join(SKULL_STRIP_MODES)}")
    if options.skull_strip == "on":  # auto finds out per image after loading; "on" can fail before any work
        import importlib.util

        from .skullstrip import MISSING_MESSAGE

        if importlib.util.find_spec("deepbet") is None:
            raise UserError(MISSING_MESSAGE)
    if options.contrast not in stages.CONTRAST_MODES:
        raise UserError(f"unknown contrast {options.contrast!r}: use {' or '.join(stages.CONTRAST_MODES)}")
    if options.checkpoint is not None and not options.checkpoint:
        raise UserError("--checkpoint needs a file name")
    check_model(model_key(options.model, options.checkpoint))
    resolve_device(options.device)
    return options


def register_volumes(
    fixed,
    moving,
    fixed_seg=None,
    moving_seg=None,
    *,
    options: RegisterOptions | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    on_fields: Callable[[RegistrationResult], None] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (canonical Volumes); see the module docstring for the path.

    ``progress(stage, fraction)`` reports the stages of :data:`~napari_unireg.pipeline.types.STAGES`;
    ``should_stop()`` is polled between steps and raises :class:`Cancelled` when it returns True.
    ``on_fields(result)``, when given, receives the result as soon as the fields are on the fixed grid, before
    the metrics are computed (its ``metrics`` holds the run's facts, no scores yet): a viewer shows the layers
    while the metrics run. The returned result is a new object with the scores.
    """
    options = validate_options(options or RegisterOptions())
    given = stages.Inputs(fixed, moving, fixed_seg, moving_seg)
    stages.check_inputs(given)
    if options.prealign == "none":
        stages.check_overlap(given)

    def reporter(stage: str):
        def report(fraction: float) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled()
            if progress is not None:
                progress(stage, float(fraction))

        return report

    seconds: dict[str, float] = {}
    t_start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - t
        t = now

    device = resolve_device(options.device)
    reporter("load")(0.0)
    model = load_model(options.model, options.checkpoint, device, options.resolution)
    lap("model")
    stripped = None
    if options.skull_strip != "off":
        from .skullstrip import skull_strip_stage

        report = reporter("skullstrip")
        report(0.0)
        stripped = skull_strip_stage(fixed, moving, options.skull_strip, device)
        report(1.0)
        lap("skullstrip")
    inputs = given if stripped is None else stages.Inputs(stripped.fixed, stripped.moving, fixed_seg, moving_seg)
    report = reporter("prealign")
    if options.prealign != "none":
        report(0.0)
    matrix = stages.prealign(inputs, options.prealign, report, should_stop)
    lap("prealign")
    on_grid = stages.model_grid(inputs, matrix, options.grid_shape)
    reporter("load")(1.0)
    if matrix is not None:
        report(1.0)
    lap("model_grid")

    fixed_t, moving_t = stages.tensors(on_grid, device)
    report = reporter("inference")
    report(0.0)
    run_resolution = model.resolution(options.resolution)
    # the classical method's NCC needs no contrast matching (and the refinement keeps the scaled images too)
    contrast = options.contrast if model.net is not None else "scale"
    net_fixed, net_moving = stages.network_inputs(fixed_t, moving_t, contrast)
    field = stages.predict(model, net_fixed, net_moving, resolution=run_resolution, amp=options.amp,
                           io_lambda=options.io_lambda, io_fold_weight=options.io_fold_weight, report=report,
                           should_stop=should_stop)
    report(1.0)
    lap("inference")
    if options.io_steps > 0:
        report = reporter("refinement")
        report(0.0)
        field = stages.refine(field, fixed_t, moving_t, steps=options.io_steps, io_lambda=options.io_lambda,
                              io_fold_weight=options.io_fold_weight, report=report, should_stop=should_stop)
        report(1.0)
        lap("refinement")
    del fixed_t, moving_t, net_fixed, net_moving
    disp_model, inverse_model = field.numpy()
    del field
    seconds["registration"] = time.perf_counter() - t_start

    native = stages.native_grid(on_grid, disp_model, inverse_model, inputs)
    warped_head = None
    if stripped is not None and stripped.moving is not moving:  # the head as given, through the same field
        from .skullstrip import warp_with_field

        warped_head = warp_with_field(moving, fixed, native.disp)
    lap("native")
    facts = dict(model=model.name, device=str(device), weights_trained=bool(model.trained), prealign=options.prealign,
                 io_steps=options.io_steps)
    if model.net is not None:  # which weight file ran, and at what resolution (a model may bundle one per resolution)
        facts.update(resolution=run_resolution, weights_resolution=str(model.card.get("resolution", "full")),
                     weights_sha256=model.card.get("sha256"), contrast=options.contrast)
    if stripped is not None:
        facts["skull_strip"] = list(stripped.messages)

    def result(metrics: dict) -> RegistrationResult:
        return RegistrationResult(
            disp_model=disp_model,
            disp_native=native.disp,
            warped=native.warped,
            jacobian=native.jacobian,
            metrics=metrics,
            warped_seg=native.warped_seg,
            inverse_native=native.inverse,
            prealign_matrix=matrix,
            model_name=model.name,
            device=str(device),
            seconds=dict(seconds),
            weights_trained=bool(model.trained),
            brain_mask_fixed=None if stripped is None or stripped.fixed_mask is None else stripped.fixed_mask.data,
            warped_head=warped_head,
        )

    if on_fields is not None:
        on_fields(result({**facts, "seconds": dict(seconds)}))
        lap("shown")  # the front end's time (not the metrics')
    scores: dict = {}
    if options.metrics:
        report = reporter("metrics")
        report(0.0)
        scores = stages.metrics(on_grid, disp_model, inverse_model)
        report(1.0)
        lap("metrics")
    seconds["total"] = time.perf_counter() - t_start
    return result({**scores, **facts, "seconds": dict(seconds)})


def warm_up(options: RegisterOptions | None = None, fixed=None, moving=None) -> None:
    """Load the network of ``options`` and run it once on an empty pair of the model grid's shape; with ``fixed``
    and ``moving`` (canonical Volumes) also find their affine pre-alignment.

    The next registration then pays neither the loading nor the first call's set-up of every convolution shape
    (oneDNN's kernel choice on CPU, cuDNN's on CUDA), nor, for that pair, the pre-alignment search (remembered by
    :func:`.stages.prealign`; skipped when brain extraction would change the images first). For a front end to
    call while the user is still choosing (the napari widget does it in a thread).
    """
    import torch

    options = validate_options(options or RegisterOptions())
    device = resolve_device(options.device)
    model = load_model(options.model, options.checkpoint, device, options.resolution)
    if model.net is not None:
        empty = torch.zeros((1, 1, *options.grid_shape), dtype=torch.float32, device=device)
        stages.predict(model, empty, empty, resolution=model.resolution(options.resolution), amp=options.amp,
                       io_lambda=options.io_lambda, io_fold_weight=options.io_fold_weight, report=lambda _f: None)
    if fixed is None or moving is None or options.prealign == "none":
        return
    from .skullstrip import needs_extraction

    if options.skull_strip != "off" and (needs_extraction(fixed, options.skull_strip)
                                         or needs_extraction(moving, options.skull_strip)):
        return
    pair = stages.Inputs(fixed, moving, None, None)
    stages.check_inputs(pair)
    stages.prealign(pair, options.prealign, lambda _f: None)
