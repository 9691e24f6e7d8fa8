"""``unireg demo``: register the embedded demo pair end to end, offline, and write results and slice PNGs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import UserError


def write_slice_pngs(fixed, moving, result, fixed_seg, moving_seg, out: Path, overwrite: bool = False) -> list[Path]:
    """The paper-style panel (deformed, difference, labels, grid, Jacobian) for the three axes, one PNG each."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from ..viz import comparison_figure, default_slice_index, save_figure

    paths = []
    for axis in (0, 1, 2):
        index = default_slice_index(fixed.shape, axis, fixed.spacing)
        fig = comparison_figure(
            fixed.data,
            moving,
            {result.model_name: result.disp_native},
            fixed_seg=None if fixed_seg is None else fixed_seg.data,
            moving_seg=moving_seg,
            axis=axis,
            slice_index=index,
            spacing=fixed.spacing,
            fixed_id="demo-fixed",
            moving_id="demo-moving",
        )
        paths.extend(save_figure(fig, out, "demo-fixed", "demo-moving", axis, index, fixed.shape[axis],
                                 formats=("png",), dpi=80, overwrite=overwrite))
    return paths


def run_demo(args) -> int:
    """The `unireg demo` command: builds/loads the pair, registers, writes outputs and PNGs, prints a summary."""
    from ..io.demo import demo_files, demo_volumes
    from ..pipeline import validate_options
    from .register import check_out_dir, options_from_args, parse_outputs, run_and_write, summary

    out = Path(args.out)
    args.outputs = parse_outputs(getattr(args, "outputs", None))
    validate_options(options_from_args(args))
    check_out_dir(out, args.overwrite)
    print("demo pair: MNI152 2009a template (nilearn) vs. the same brain through a known smooth deformation")
    fixed, moving, fixed_seg, moving_seg = demo_volumes()
    result = run_and_write(fixed, moving, fixed_seg, moving_seg, args)
    # The moving image on the fixed grid before registration (world identity) is what the panels compare with.
    moving_on_fixed = moving.data  # same box: the demo pair shares the grid
    moving_seg_on_fixed = moving_seg.data
    try:
        pngs = write_slice_pngs(fixed, moving_on_fixed, result, fixed_seg, moving_seg_on_fixed, out, args.overwrite)
    except ImportError as exc:  # figures need matplotlib only; report instead of failing the registration
        pngs = []
        print(f"(slice PNGs skipped: {exc})")
    truth = np.load(demo_files()["true_disp"])
    err = np.linalg.norm(result.disp_native - truth, axis=0)[fixed.data > 0]
    zero = np.linalg.norm(truth, axis=0)[fixed.data > 0]
    m = result.metrics
    print(summary(m, wall=time.perf_counter() - getattr(args, "t_start", time.perf_counter())))
    print(f"displacement error vs. the known deformation: {err.mean():.2f} mm mean (before: {zero.mean():.2f} mm)")
    print(f"results in {out.resolve()} ({len(pngs)} PNG figures)")
    if m.get("dice") is not None and m["dice"] <= m["dice_before"]:
        raise UserError(f"registration did not improve Dice ({m['dice_before']:.3f} -> {m['dice']:.3f})")
    return 0
