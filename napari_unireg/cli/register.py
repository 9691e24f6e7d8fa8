"""``unireg register``: read the images, register, write the result folder, print a one-line summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError

def options_from_args(args):
    """RegisterOptions from the parsed arguments of ``register``/``demo``."""
    from ..pipeline import RegisterOptions

    outputs = getattr(args, "outputs", None)
    return RegisterOptions(
        model=getattr(args, "model", "default"),
        checkpoint=getattr(args, "checkpoint", None),
        device=getattr(args, "device", "auto"),
        prealign=getattr(args, "prealign", "affine"),
        resolution=getattr(args, "resolution", "auto"),
        io_steps=int(getattr(args, "io_steps", 0) or 0),
        grid_shape=tuple(int(v) for v in getattr(args, "grid", (160, 224, 192))),
        metrics=outputs is None or "metrics" in outputs,
        skull_strip=getattr(args, "skull_strip", "auto"),
        contrast=getattr(args, "contrast", "scale"),
    )


def check_out_dir(out: Path, overwrite: bool, names=None, like: str | None = None) -> None:
    """Before any work: a folder that cannot take the results (a file in the way, read-only, full, holding
    results without ``overwrite``) is refused in one line; leftovers of killed runs are cleaned. ``like``: the
    fixed image, whose size on disk is a lower bound of the space the results need."""
    from ..io.result_folder import check_output_dir
    from ..pipeline.write import RESULT_FILES

    names = RESULT_FILES.values() if names is None else names
    need = Path(like).stat().st_size if like and Path(like).is_file() else 0
    check_output_dir(out, overwrite=overwrite, expected_names=names, need_bytes=need)


def _progress_printer(quiet: bool):
    if quiet:
        return None, lambda: None
    if not sys.stderr.isatty():
        # logs and pipes get one line per stage, not a carriage-return bar redrawn hundreds of times
        seen: list[str] = []

        def stage_lines(stage: str, fraction: float) -> None:
            if not seen or seen[-1] != stage:
                seen.append(stage)
                print(f"{stage} ...", file=sys.stderr, flush=True)

        return stage_lines, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=100, file=sys.stderr, bar_format="{desc:<12} {percentage:3.0f}%|{bar}| {elapsed}", leave=False)
    from ..pipeline.types import STAGE_WEIGHTS as stage_weights

    order = list(stage_weights)

    def progress(stage: str, fraction: float) -> None:
        done = sum(stage_weights[s] for s in order[: order.index(stage)]) if stage in order else 0
        bar.set_description_str(stage)
        bar.n = min(100, done + stage_weights.get(stage, 0) * fraction)
        bar.refresh()

    return progress, bar.close


def _with_test_pause(progress):
    """Test-only hook: UNIREG_TEST_PAUSE_AT=registration pauses at the start of the network/optimisation stage."""
    from ..io.result_folder import test_pause

    def wrapped(stage: str, fraction: float) -> None:
        if stage == "inference" and fraction == 0.0:
            test_pause("registration")
        if progress is not None:
            progress(stage, fraction)

    return wrapped


def run_and_write(fixed, moving, fixed_seg, moving_seg, args):
    """Register with the CLI's options and write the results into ``args.out``; returns the RegistrationResult."""
    from ..pipeline import register_volumes, write_result

    out = Path(args.out)
    options = options_from_args(args)
    progress, close = _progress_printer(args.quiet)
    progress = _with_test_pause(progress)
    try:
        result = register_volumes(fixed, moving, fixed_seg, moving_seg, options=options, progress=progress)
    finally:
        close()
    write_result(result, fixed, out, overwrite=args.overwrite, options=options, moving=moving,
                 outputs=getattr(args, "outputs", None))
    return result


def summary(metrics: dict, wall: float | None = None) -> str:
    """The one-line result: model, Dice/HD95 when labels were given, regularity, seconds (wall when known)."""
    from ..models.registry import RESOLUTION_MM

    at = RESOLUTION_MM.get(metrics.get("resolution"))  # which resolution the network ran at (none: classical)
    parts = [f"model {metrics.get('model')}{f' at {at}' if at else ''} on {metrics.get('device')}"]
    if not metrics.get("weights_trained", True):
        parts.append("UNTRAINED weights")
    if metrics.get("dice_before") is not None:
        parts.append(f"Dice {metrics['dice_before']:.3f} -> {metrics['dice']:.3f}")
    if metrics.get("hd95") is not None:
        parts.append(f"HD95 {metrics['hd95']:.2f} mm")
    if metrics.get("sdlogj") is not None:
        parts.append(f"SDlogJ {metrics['sdlogj']:.3f}")
        parts.append(f"NDV {metrics['ndv']:.4f} %")
        parts.append(f"folded {metrics['folded_pct']:.4f} %")
    if wall is not None:
        parts.append(f"{wall:.1f} s wall")
    else:
        parts.append(f"{metrics['seconds']['total']:.1f} s")
    return ", ".join(parts)


def parse_outputs(text: str | None):
    """``--outputs warped,disp,...`` → a tuple of output names (None = the defaults)."""
    from ..pipeline.write import check_outputs

    return None if text is None else check_outputs(text)


def _say_memory(args) -> None:
    """State the memory this run needs (UserError when the machine cannot hold it), from the file headers."""
    import nibabel as nib

    from ..pipeline.models import network_plan
    from ..pipeline.stages import check_memory

    try:
        shapes = [nib.load(str(p)).shape[:3] for p in (args.fixed, args.moving)]
    except Exception:  # noqa: BLE001  (an unreadable file gets its own clear message from load_volume next)
        return
    from ..pipeline.device import resolve_device

    opts = options_from_args(args)
    device = resolve_device(opts.device)
    # on a GPU the network's activations are in device memory, not in this process's RSS
    on_gpu = device.type != "cpu"
    line = check_memory(*shapes, network=None if on_gpu else network_plan(opts.model, opts.checkpoint,
                                                                          opts.resolution, device))
    if not args.quiet:
        print(line, file=sys.stderr)


def cmd_register(args) -> int:
    from ..io import load_volume
    from ..io.result_folder import test_pause
    from ..pipeline import validate_options

    args.outputs = parse_outputs(getattr(args, "outputs", None))
    validate_options(options_from_args(args))  # every option before any file is read
    check_out_dir(Path(args.out), args.overwrite, like=args.fixed)
    _say_memory(args)  # from the headers alone: refuse before reading voxels or loading the network
    test_pause("load")  # test-only hook (UNIREG_TEST_PAUSE_AT=load)
    fixed = load_volume(args.fixed, kind="image")
    moving = load_volume(args.moving, kind="image")
    fixed_seg = load_volume(args.fixed_seg, kind="label") if args.fixed_seg else None
    moving_seg = load_volume(args.moving_seg, kind="label") if args.moving_seg else None
    if fixed_seg is not None and moving_seg is None:
        print("note: --fixed-seg is ignored without --moving-seg (no Dice/HD95 to compute)", file=sys.stderr)
    result = run_and_write(fixed, moving, fixed_seg, moving_seg, args)
    for line in result.metrics.get("skull_strip", []):
        print(f"brain extraction: {line}", file=sys.stderr)
    print(summary(result.metrics, wall=time.perf_counter() - getattr(args, "t_start", time.perf_counter())))
    print(f"results in {Path(args.out).resolve()}")
    return 0
