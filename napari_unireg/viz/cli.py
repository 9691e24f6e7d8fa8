"""``unireg figure``: the paper's comparison figure from NIfTI files and displacement files or model names.

Imports nothing heavy at module level (``unireg --help`` imports this module to build its parser).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import UserError

ROW_CHOICES = ("deformed", "difference", "labels", "grid", "jacobian")
FORMAT_CHOICES = ("png", "svg", "pdf")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``figure`` subcommand to ``unireg``'s subparsers."""
    p = subparsers.add_parser(
        "figure",
        help="publication figure comparing registration methods on one slice per axis (PNG/SVG/PDF)",
        description="Draws the comparison figure of the paper's demo: columns Fixed, Moving and one per method; "
        "rows deformed image, difference to fixed, deformed labels, backward deformation grid and Jacobian "
        "determinant. Files are named f{fixed}_m{moving}_axis{a}_slc{s:03d}of{N}.{ext} (s 1-based). "
        "Displacements are Learn2Reg fields on the fixed grid (voxel units, pull), as `unireg register` writes.",
    )
    p.add_argument("--fixed", required=True, help="fixed image (.nii / .nii.gz)")
    p.add_argument("--moving", required=True, help="moving image (.nii / .nii.gz)")
    p.add_argument("--fixed-seg", default=None, help="label map of the fixed image")
    p.add_argument("--moving-seg", default=None, help="label map of the moving image (needed for the labels row)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--models", default=None, metavar="A,B,...",
                     help="register with these models (comma separated names of `unireg models`, or 'classical')")
    src.add_argument("--disp", action="append", default=None, metavar="NAME=FILE",
                     help="a method's displacement file (Learn2Reg .nii.gz/.npz/.npy); repeat for each method")
    p.add_argument("--axis", type=int, nargs="+", choices=(0, 1, 2), default=[0, 1, 2],
                   help="slicing axes (0 sagittal, 1 coronal, 2 axial for RAS volumes; default all three)")
    p.add_argument("--slice", type=int, nargs="+", default=None, metavar="S",
                   help="slice number, 1-based as in the file name and title (one for all axes or one per --axis; "
                   "default: the paper's, N//2 (axes 1, 2) and N//2 - 10 mm (axis 0))")
    p.add_argument("--rows", nargs="+", choices=ROW_CHOICES, default=None,
                   help="rows to draw, in order (default all; labels only with --moving-seg)")
    p.add_argument("--format", nargs="+", choices=FORMAT_CHOICES, default=["png"], dest="formats",
                   help="output formats (default png)")
    p.add_argument("--dpi", type=float, default=300, help="resolution of raster output (default 300)")
    p.add_argument("--out", default="unireg_figures", help="output folder (default unireg_figures)")
    p.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    p.add_argument("--fixed-id", default=None, help="name of the fixed image in titles/files (default from its file)")
    p.add_argument("--moving-id", default=None, help="name of the moving image (default from its file)")
    p.add_argument("--neurological", action="store_true",
                   help="do not mirror left-right (default: the paper's radiological view)")
    p.add_argument("--scale-bar", type=float, default=None, metavar="MM", help="add a scale bar of MM millimetres")
    p.add_argument("--device", default="auto", help="device for --models (auto, cpu, cuda, cuda:N)")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------ helpers
def subject_id(path: str | Path) -> str:
    """Short id of a file for titles/names: its first 4-digit group (``UNIREG_0001_0000`` → ``0001``), else stem."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = re.search(r"(?<!\d)(\d{4})(?!\d)", name)
    return m.group(1) if m else name


def parse_disp_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``["NAME=FILE", ...]`` → ``[(name, file), ...]`` (unique names, existing files)."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, file = spec.partition("=")
        name, file = name.strip(), file.strip()
        if not sep or not name or not file:
            raise UserError(f"--disp expects NAME=FILE, got {spec!r}")
        if any(n == name for n, _ in out):
            raise UserError(f"--disp name {name!r} given twice")
        if not Path(file).exists():
            raise UserError(f"--disp {name}: file not found: {file}")
        out.append((name, file))
    return out


def disp_to_canonical(disp, like):
    """Inverse of :func:`napari_unireg.io.disp_to_original_orientation`: a voxel-unit field stored in the fixed
    file's voxel order → the canonical RAS grid of ``like`` (spatial axes and components)."""
    import numpy as np
    from nibabel.orientations import apply_orientation

    disp = np.asarray(disp)
    p = np.round(np.linalg.inv(like.original_affine) @ like.affine)[:3, :3]  # canonical index → stored index
    if np.allclose(p, np.eye(3)):
        return disp
    moved = apply_orientation(np.moveaxis(disp, 0, -1), like.ornt)  # as load_volume reorders the data
    comps = np.einsum("ji,j...->i...", p, np.moveaxis(moved, -1, 0))  # p is a signed permutation: inverse = p.T
    return np.ascontiguousarray(comps, dtype=disp.dtype)


def on_fixed_grid(vol, fixed, order: int):
    """``vol``'s data on ``fixed``'s canonical grid, matched by world coordinates (as the engine's fields expect)."""
    import numpy as np

    from ..core.resample import resample_affine

    if vol.grid.same_as(fixed.grid):
        return vol.data
    return resample_affine(vol.data, fixed.grid.voxel_map(vol.grid), fixed.shape, order=order, fill=0)


def _slices_for(args, shapes_axes) -> list[int | None]:
    """0-based slice per requested axis (None = default), from --slice (1-based)."""
    if args.slice is None:
        return [None] * len(shapes_axes)
    if len(args.slice) not in (1, len(shapes_axes)):
        raise UserError(f"--slice takes one value or one per --axis ({len(shapes_axes)}), got {len(args.slice)}")
    values = args.slice * len(shapes_axes) if len(args.slice) == 1 else args.slice
    out = []
    for s, (n, axis) in zip(values, shapes_axes):
        if not 1 <= s <= n:
            raise UserError(f"--slice {s} is outside axis {axis} (1..{n})")
        out.append(s - 1)
    return out


def _register_models(names, fixed, moving, fixed_seg, moving_seg, device: str) -> dict:
    from ..pipeline import register_volumes
    from ..pipeline import RegisterOptions

    disps = {}
    for name in names:
        print(f"registering with {name} ...", file=sys.stderr)
        result = register_volumes(fixed, moving, fixed_seg, moving_seg,
                                  options=RegisterOptions(model=name, device=device))
        label = result.model_name or name
        if label in disps or label in ("Fixed", "Moving"):
            label = name
        disps[label] = result.disp_native
    return disps


# ------------------------------------------------------------------------------------------------ command
def run(args) -> int:
    """Entry point of ``unireg figure``; returns the exit status (0). Bad input raises UserError."""
    from ..io import load_disp_l2r, load_volume
    from . import panels as P
    from .grid import comparison_figure, figure_paths, save_figure

    axes = list(dict.fromkeys(args.axis))
    specs = parse_disp_specs(args.disp) if args.disp else None
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models is not None and not models:
        raise UserError("--models needs at least one model name")
    if args.dpi <= 0:
        raise UserError("--dpi must be positive")
    from ..io.result_folder import check_output_dir, result_folder

    check_output_dir(args.out, overwrite=True, expected_names=())  # writable? (existing figures: refused below)

    fixed = load_volume(args.fixed, kind="image")
    moving = load_volume(args.moving, kind="image")
    fixed_seg = load_volume(args.fixed_seg, kind="label") if args.fixed_seg else None
    moving_seg = load_volume(args.moving_seg, kind="label") if args.moving_seg else None
    if fixed_seg is not None and fixed_seg.shape != fixed.shape:
        raise UserError(f"--fixed-seg grid {fixed_seg.shape} differs from the fixed image grid {fixed.shape}")
    fixed_id = args.fixed_id or subject_id(args.fixed)
    moving_id = args.moving_id or subject_id(args.moving)
    if args.rows and "labels" in args.rows and moving_seg is None:
        raise UserError("the labels row needs --moving-seg")

    # Refuse early (before any registration) when a target file exists.
    shape, spacing = fixed.shape, fixed.spacing
    slices = _slices_for(args, [(shape[a], a) for a in axes])
    slices = [P.default_slice_index(shape, a, spacing) if s is None else s for s, a in zip(slices, axes)]
    targets = [figure_paths(args.out, fixed_id, moving_id, a, s, shape[a], args.formats) for a, s in zip(axes, slices)]
    existing = [p.name for paths in targets for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{args.out} already holds {', '.join(existing)}; use --overwrite or another --out")

    if specs is not None:
        methods = {}
        for name, file in specs:
            disp = load_disp_l2r(file)
            # The file is in the fixed file's stored voxel order (what `unireg register` writes).
            if tuple(disp.shape[1:]) != tuple(fixed.original_shape[:3]):
                raise UserError(f"--disp {name}: grid {tuple(disp.shape[1:])} differs from the fixed image grid "
                                f"{tuple(fixed.original_shape[:3])}")
            methods[name] = disp_to_canonical(disp, fixed)
    else:
        methods = _register_models(models, fixed, moving, fixed_seg, moving_seg, args.device)

    moving_data = on_fixed_grid(moving, fixed, order=1)
    moving_seg_data = on_fixed_grid(moving_seg, fixed, order=0) if moving_seg is not None else None
    written = []
    names = [p.name for paths in targets for p in paths]
    # figures go into a hidden folder first and are moved in together: an interrupted or failed run adds nothing
    with result_folder(args.out, overwrite=args.overwrite, result_names=names, whole=False) as tmp:
        for axis, index in zip(axes, slices):
            fig = comparison_figure(
                fixed.data, moving_data, methods,
                fixed_seg=fixed_seg.data if fixed_seg is not None else None, moving_seg=moving_seg_data,
                axis=axis, slice_index=index, rows=args.rows, spacing=spacing,
                fixed_id=fixed_id, moving_id=moving_id,
                convention="neurological" if args.neurological else "radiological",
                scale_bar_mm=args.scale_bar,
            )
            written += [Path(args.out) / p.name for p in save_figure(fig, tmp, formats=args.formats, dpi=args.dpi)]
            del fig
    for p in written:
        print(p)
    return 0
