"""``unireg train``: the command line of the training module.

Config precedence: ``default.yaml`` ← ``--config FILE`` ← the flags below ← ``--set key=value`` (dotted keys,
values read as YAML: ``--set optim.lr=1e-4 --set augment.enabled=true --set synth.label_maps=[/data/seg]``).
With ``--resume`` the run folder's saved ``config.yaml`` replaces the defaults and ``--config``; only keys that
do not change the result (steps, device, workers, logging, export) may then differ.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m napari_unireg.train --data ... --out ...``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..errors import UserError

__all__ = ["add_parser", "run", "main"]

_EPILOG = """\
examples:
  unireg train --model dp-conv-c --data /data/OASIS/dataset.json --out runs/conv-c
  unireg train --config my.yaml --data /data/imagesTr --set data.labels=/data/labelsTr --out runs/x
  unireg train --out runs/x --resume                      # continue a stopped run exactly
  unireg train --model dp-vfa --data ds.json --out runs/vfa --resolution half --amp bf16 --steps 3000
  unireg train ... --set synth.prob=0.5 --set synth.label_maps=[/data/synthseg_labels]
  torchrun --nproc_per_node=4 -m napari_unireg.train --data ds.json --out runs/ddp --device cuda

every field of napari_unireg/train/default.yaml can be set with --set section.key=value;
--print-config shows the resolved config without training.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``unireg`` sub-command parser."""
    p = subparsers.add_parser(
        "train",
        help="train a registration network (unsupervised, §8-§9 recipe; CPU, GPU or torchrun)",
        description="Train a registration network on a Learn2Reg dataset.json or a folder of NIfTI images. "
        "Writes config.yaml, log.csv, val.csv, last.pt (resume state), best.safetensors and the final weights "
        "with their model card into --out.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (any subset of default.yaml)")
    p.add_argument("--model", default=None, help="registry name, e.g. dp-conv-c, dp-convic-c, dp-vfa")
    p.add_argument("--data", default=None, help="Learn2Reg dataset.json or a folder of NIfTI images")
    p.add_argument("--labels", default=None, help="label folder matched by file name (with a folder --data)")
    p.add_argument("--val-pairs", default=None, help="auto | none | CSV of fixed,moving ids | dataset.json")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: epochs x pairs/epoch)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="wall-clock box (s): stop cleanly, validate and export in time (optim.time_limit_s)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default=None, choices=["none", "bf16", "fp16", "auto"],
                   help="mixed precision (auto: bf16 on CPUs with AMX/AVX-512-BF16 and bf16 GPUs, else fp32)")
    p.add_argument("--resolution", default=None, choices=["full", "half"], help="training resolution")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (0 = none)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=None, help="weight-initialisation seed")
    p.add_argument("--init-encoder", default=None, help="start from another model's encoder (.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _flag_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    pairs = [
        ("model", args.model),
        ("data.labels", args.labels),
        ("data.val_pairs", args.val_pairs),
        ("steps", args.steps),
        ("optim.time_limit_s", args.time_limit_s),
        ("device", args.device),
        ("amp", args.amp),
        ("data.resolution", args.resolution),
        ("data.num_workers", args.workers),
        ("threads", args.threads),
        ("seed", args.seed),
        ("init_encoder", args.init_encoder),
    ]
    out = [(k, v) for k, v in pairs if v is not None]
    if args.data is not None:
        out.append(("data.source", str(Path(args.data).expanduser().resolve())))
    if args.quiet:
        out.append(("log.progress", False))
    return out


def resolve_config(args: argparse.Namespace):
    """The run's :class:`~napari_unireg.train.config.Config` from the parsed arguments."""
    import yaml

    from .config import apply_overrides, config_from_dict, load_config, parse_override

    overrides = _flag_overrides(args) + [parse_override(s) for s in args.set]
    saved = Path(args.out) / "config.yaml"
    if args.resume and not (Path(args.out) / "last.pt").is_file():  # before any data is looked for
        raise UserError(f"nothing to resume in {args.out} (no last.pt of an earlier run); start without --resume")
    if args.resume and saved.is_file() and (Path(args.out) / "last.pt").is_file():
        try:
            base = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{saved} is not valid YAML ({str(e).splitlines()[0]})") from None
        if args.config:
            from .config import _read_yaml

            base = apply_overrides(base, list(_flatten_items(_read_yaml(args.config))))
        return config_from_dict(apply_overrides(base, overrides))
    return load_config(args.config, overrides)


def _flatten_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_config":
            yield from _flatten_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def run(args: argparse.Namespace) -> int:
    """Run ``unireg train``; returns the exit status (0 done, 130 stopped early and resumable)."""
    import yaml

    cfg = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
        return 0
    from .loop import train

    from ..io.result_folder import check_output_dir

    command = getattr(args, "command_line", None) or shlex.join(["unireg", *sys.argv[1:]])
    check_output_dir(args.out, overwrite=True, expected_names=())  # file in the way, read-only: before any work
    created = not Path(args.out).exists() and int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(cfg, args.out, resume=args.resume, command=command)
    except BaseException:  # a run that failed before writing anything leaves no empty --out folder behind
        if created and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()
        raise
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"stopped at step {result.step}/{result.total_steps}; continue with: unireg train --out {args.out} --resume"
        )
        return 130
    if result.exported:
        print(f"weights: {result.exported[0]}  (card {result.exported[1].name})")
    if result.best:
        shown = ", ".join(
            f"{k} {result.best[k]:.4f}" for k in ("dice", "sim", "ndv", "sdlogj") if result.best.get(k) is not None
        )
        print(f"best validation at step {result.best['step']}: {shown}")
    print(f"{result.step} steps in {result.wall_time / 60:.1f} min; run folder {Path(args.out).resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m napari_unireg.train``, handy under ``torchrun``)."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_unireg.train", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "napari_unireg.train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except UserError as exc:
        print(f"unireg train: error: {exc}", file=sys.stderr)
        return 2
