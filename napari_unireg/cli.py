"""``unireg``: the command line front end of the engine.

Subcommands: ``register``, ``models``, ``demo``, ``figure``, ``train``. User errors (a folder that cannot take the
results included) print one line and exit with status 2; SIGINT exits 130, SIGTERM 143, each after the same
cleanup; nothing is written over an existing result unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

#: Files `register` writes; an output folder holding any of them is refused without --overwrite.
RESULT_FILES = (
    "warped.nii.gz",
    "disp.nii.gz",
    "disp_itk.nii.gz",
    "warped_seg.nii.gz",
    "jacobian.nii.gz",
    "metrics.json",
    "run.json",
)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="registry name (see `unireg models`), 'default' or 'classical'")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (with its .json card) instead of --model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--prealign", choices=["affine", "none"], default="affine", help="affine pre-alignment of moving")
    p.add_argument("--resolution", choices=["auto", "full", "half"], default="auto",
                   help="network input resolution; auto = the resolution the model was trained at")
    p.add_argument("--io-steps", type=int, default=0, help="instance-optimisation refinement steps after the network")
    p.add_argument("--grid", type=int, nargs=3, default=(160, 224, 192), metavar=("X", "Y", "Z"),
                   help="model grid in 1 mm voxels (default: the Learn2Reg box 160 224 192)")
    p.add_argument("--out", default="unireg_out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unireg",
        description="Unsupervised deep-learning deformable registration of 3D brain MRI (napari-unireg).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"napari-unireg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("register", help="register a moving volume to a fixed volume (NIfTI)",
                       description="Register MOVING to FIXED and write warped.nii.gz, disp.nii.gz (Learn2Reg "
                       "convention on the fixed grid), disp_itk.nii.gz (ITK/ANTs, LPS mm), jacobian.nii.gz, "
                       "warped_seg.nii.gz (with --moving-seg) and metrics.json.")
    p.add_argument("fixed", help="fixed image (.nii / .nii.gz)")
    p.add_argument("moving", help="moving image (.nii / .nii.gz)")
    p.add_argument("--fixed-seg", default=None, help="label map of the fixed image (for Dice/HD95)")
    p.add_argument("--moving-seg", default=None, help="label map of the moving image (warped with nearest neighbour)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("models", help="list the registered models, their parameter counts and bundled weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="register the embedded demo pair (offline) and write results and slice PNGs",
                       description="Builds the demo pair from the MNI152 template shipped with nilearn (moving = "
                       "template through a known smooth deformation and affine, with intensity changes), registers "
                       "it and writes the register outputs plus PNG slices of the three axes.")
    _add_run_options(p)
    p.set_defaults(func=_cmd_demo, out="unireg_demo")

    for name, module in (("figure", "napari_unireg.viz.cli"), ("train", "napari_unireg.train.cli")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:  # a front end under construction must not break the others
            continue
        mod.add_parser(sub)
    return parser


def _check_out_dir(out: Path, overwrite: bool, names=RESULT_FILES, like: str | None = None) -> None:
    """Before any work: a folder that cannot take the results (file in the way, read-only, full, held results)
    is refused in one line; leftovers of killed runs are cleaned. ``like``: the fixed image, whose size on disk
    is a lower bound of the space the results need."""
    from .result_folder import check_output_dir

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
    stage_weights = {"load": 5, "prealign": 10, "inference": 35, "refinement": 25, "metrics": 15, "write": 10}
    order = list(stage_weights)

    def progress(stage: str, fraction: float) -> None:
        done = sum(stage_weights[s] for s in order[: order.index(stage)]) if stage in order else 0
        bar.set_description_str(stage)
        bar.n = min(100, done + stage_weights.get(stage, 0) * fraction)
        bar.refresh()

    return progress, bar.close


def _with_test_pause(progress):
    """Test-only hook: UNIREG_TEST_PAUSE_AT=registration pauses at the start of the network/optimisation stage."""
    from .result_folder import test_pause

    def wrapped(stage: str, fraction: float) -> None:
        if stage == "inference" and fraction == 0.0:
            test_pause("registration")
        if progress is not None:
            progress(stage, fraction)

    return wrapped


def run_and_write(fixed, moving, fixed_seg, moving_seg, args):
    """Register with the CLI's options and write the results into ``args.out``; returns the RegistrationResult."""
    from .engine import options_from_args, register_volumes, write_result

    out = Path(args.out)
    options = options_from_args(args)
    progress, close = _progress_printer(args.quiet)
    progress = _with_test_pause(progress)
    try:
        result = register_volumes(fixed, moving, fixed_seg, moving_seg, options=options, progress=progress)
    finally:
        close()
    write_result(result, fixed, out, overwrite=args.overwrite, options=options, moving=moving)
    return result


def _summary(metrics: dict) -> str:
    parts = [f"model {metrics.get('model')} on {metrics.get('device')}"]
    if not metrics.get("weights_trained", True):
        parts.append("UNTRAINED weights")
    if metrics.get("dice_before") is not None:
        parts.append(f"Dice {metrics['dice_before']:.3f} -> {metrics['dice']:.3f}")
    if metrics.get("hd95") is not None:
        parts.append(f"HD95 {metrics['hd95']:.2f} mm")
    parts.append(f"SDlogJ {metrics['sdlogj']:.3f}")
    parts.append(f"NDV {metrics['ndv']:.4f} %")
    parts.append(f"folded {metrics['folded_pct']:.4f} %")
    parts.append(f"{metrics['seconds']['total']:.1f} s")
    return ", ".join(parts)


def _cmd_register(args) -> int:
    from .io import load_volume

    from .result_folder import test_pause

    _check_out_dir(Path(args.out), args.overwrite, like=args.fixed)
    test_pause("load")  # test-only hook (UNIREG_TEST_PAUSE_AT=load)
    fixed = load_volume(args.fixed, kind="image")
    moving = load_volume(args.moving, kind="image")
    fixed_seg = load_volume(args.fixed_seg, kind="label") if args.fixed_seg else None
    moving_seg = load_volume(args.moving_seg, kind="label") if args.moving_seg else None
    print(_summary(run_and_write(fixed, moving, fixed_seg, moving_seg, args).metrics))
    print(f"results in {Path(args.out).resolve()}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_models(args) -> int:
    from .models.registry import list_models

    infos = list_models()
    if args.json:
        rows = [
            {
                "name": m.name,
                "family": m.family,
                "params_encoder": m.params_encoder,
                "params_decoder": m.params_decoder,
                "params_total": m.params_total,
                "weights": m.weights,
                "description": m.description,
                "val_dice": (m.card or {}).get("metrics", {}).get("dice") if m.card else None,
            }
            for m in infos
        ]
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<14} {'encoder':>10} {'decoder':>11} {'total':>11}  weights  description")
    for m in infos:
        enc = f"{m.params_encoder:,}" if m.params_encoder is not None else "-"
        print(f"{m.name:<14} {enc:>10} {m.params_decoder:>11,} {m.params_total:>11,}  "
              f"{'yes' if m.weights else 'no':<7}  {m.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .result_folder import WRITE_ERRNOS, exit_code, interrupt_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with interrupt_signals():  # SIGTERM raises like SIGINT: the result folder's cleanup runs for both
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"unireg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        code = exit_code(exc)
        print(f"unireg {args.command}: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr)
        return code
    except OSError as exc:  # a write outside a result folder (train's run folder): one line, not a traceback
        if exc.errno not in WRITE_ERRNOS:
            raise
        print(f"unireg {args.command}: error: {exc.strerror}: {exc.filename or getattr(args, 'out', '')}",
              file=sys.stderr)
        return 2
    except MemoryError:
        print(f"unireg {args.command}: error: out of memory; try --resolution half or --device cpu", file=sys.stderr)
        return 3
    except RuntimeError as exc:  # torch reports CUDA out-of-memory as RuntimeError subclasses
        if "out of memory" in str(exc).lower():
            print(f"unireg {args.command}: error: out of GPU memory; try --resolution half or --device cpu",
                  file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
