"""``unireg``: the argument parser and the dispatch of the sub-commands (each in its own module).

User errors (a folder that cannot take the results included) print one line and exit with status 2; SIGINT exits
130, SIGTERM 143, each after the same cleanup; nothing is written over an existing result unless ``--overwrite``.

Subcommands: ``register``, ``models``, ``demo``, ``figure``, ``train``. User errors print one line and exit with
status 2; nothing is written over an existing result unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError

def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="registry name (see `unireg models`), 'default' or 'classical'")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (with its .json card) instead of --model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--prealign", choices=["affine", "none"], default="affine", help="affine pre-alignment of moving")
    p.add_argument("--resolution", choices=["auto", "full", "half"], default="auto",
                   help="network input resolution: full (1 mm) or half (2 mm, 8x fewer voxels); a model bundled "
                        "with weights for both runs the ones trained at it. auto = such a model's 1 mm weights on a "
                        "GPU and its 2 mm weights on a CPU, any other model at the resolution it was trained at")
    p.add_argument("--skull-strip", choices=["auto", "on", "off"], default="auto",
                   help="brain extraction before registration (deepbet, extra [skullstrip]): auto = only images that "
                        "still have a skull (what was decided is printed), on = always, off = never")
    p.add_argument("--contrast", choices=["scale", "standardize"], default="scale",
                   help="network input: scale = each image to [0, 1] (what the networks were trained on); "
                        "standardize = also move its CSF/grey/white-matter means to the training images' (for "
                        "scans from another scanner or sequence: benchmarks/robustness.py)")
    p.add_argument("--io-steps", type=int, default=0,
                   help="instance-optimisation refinement after the network: N steps at half resolution, then N/6 "
                        "at full resolution (0 = none; try 30)")
    p.add_argument("--grid", type=int, nargs=3, default=(160, 224, 192), metavar=("X", "Y", "Z"),
                   help="model grid in 1 mm voxels, each ≥ 32 and a multiple of 8 "
                        "(default: the Learn2Reg box 160 224 192)")
    p.add_argument("--outputs", default=None, metavar="LIST",
                   help="comma-separated results to write (default all but disp_npz): "
                        "warped,disp,disp_itk,disp_npz,jacobian,warped_seg,brain_mask_fixed,warped_head,metrics "
                        "(disp_npz: disp.npz, the field as a float16 Learn2Reg submission file; warped_seg, "
                        "brain_mask_fixed, warped_head only when labels / brain extraction give them); run.json "
                        "always")
    p.add_argument("--out", default="unireg_out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unireg",
        description="Unsupervised deep-learning deformable registration of 3D brain MRI (napari-unireg).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"napari-unireg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("register", help="register a moving volume to a fixed volume (NIfTI)",
                       description="Register MOVING to FIXED and write warped.nii.gz, disp.nii.gz (Learn2Reg "
                       "convention on the fixed grid), disp_itk.nii.gz (ITK/ANTs, LPS mm), jacobian.nii.gz, "
                       "warped_seg.nii.gz (with --moving-seg), brain_mask_fixed.nii.gz and warped_head.nii.gz "
                       "(when a brain was extracted) and metrics.json.")
    p.add_argument("fixed", nargs="?", help="fixed image (.nii / .nii.gz)")
    p.add_argument("moving", nargs="?", help="moving image (.nii / .nii.gz)")
    from .batch import add_batch_arguments

    add_batch_arguments(p)
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

    for module in ("napari_unireg.viz.cli", "napari_unireg.train.cli"):  # an import error must surface, not
        __import__(module, fromlist=["add_parser"]).add_parser(sub)  # silently drop `figure`/`train`
    return parser


def _cmd_register(args) -> int:
    from .batch import cmd_batch, is_batch
    from .register import cmd_register

    if is_batch(args):
        return cmd_batch(args)
    if not (args.fixed and args.moving):
        raise UserError("give FIXED and MOVING, or --pairs FILE, or --fixed TEMPLATE --moving-dir DIR")

    return cmd_register(args)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_models(args) -> int:
    from ..models.registry import RESOLUTION_MM as MM
    from ..models.registry import list_models

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
                "resolution": (m.card or {}).get("resolution") if m.card else None,
                "weights_by_resolution": {res: _weights_summary(card) for res, card in m.cards.items()},
            }
            for m in infos
        ]
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<14} {'encoder':>10} {'decoder':>11} {'total':>11}  {'weights':<13}  description")
    for m in infos:
        enc = f"{m.params_encoder:,}" if m.params_encoder is not None else "-"
        weights = ", ".join(MM[res] for res in m.cards) if m.weights else "no"
        print(f"{m.name:<14} {enc:>10} {m.params_decoder:>11,} {m.params_total:>11,}  {weights:<13}  {m.description}")
    return 0


def _weights_summary(card: dict) -> dict:
    """One weight file's card in brief: its validation numbers, training steps and hash."""
    metrics = card.get("metrics") or {}
    training = card.get("training") or {}
    return {
        "val_dice": metrics.get("dice"),
        "val_ndv": metrics.get("ndv"),
        "seconds_per_pair": metrics.get("seconds"),
        "steps": training.get("total_steps", training.get("steps")),
        "sha256": card.get("sha256"),
        "description": card.get("description"),
    }


def main(argv: list[str] | None = None) -> int:
    import time

    from ..io.result_folder import WRITE_ERRNOS, exit_code, interrupt_signals

    t_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.t_start = t_start
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
