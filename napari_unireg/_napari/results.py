"""Layer data tuples ``(data, kwargs, layer_type)`` for the result layers of a run (no napari import).

Names follow ``"<kind> [moving→fixed, model]"``; every layer carries ``metadata["unireg"] = {"run", "kind"}``
(plus the displacement field on the warped and magnitude layers, for the displacement writers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import layers as L
from .runs import META_KEY, Run

LayerTuple = tuple[Any, dict[str, Any], str]

#: Single colours of the label contours: fixed vs warped moving.
FIXED_CONTOUR_COLOR = "lime"
WARPED_CONTOUR_COLOR = "magenta"


def _meta(run: Run, kind: str, **more: Any) -> dict[str, Any]:
    return {META_KEY: {"run": run.id, "kind": kind, **more}}


def _disp_meta(run: Run) -> dict[str, Any]:
    """What the displacement writers need: the field on the fixed canonical grid and that grid's affine."""
    return {"disp": run.result.disp_native, "affine": run.affine, "model": run.model}


def _image(run: Run, kind: str, data: np.ndarray, **kw: Any) -> LayerTuple:
    meta = kw.pop("metadata", None) or _meta(run, kind)
    return data, {"name": run.layer_name(kind), "affine": run.affine, "metadata": meta, **kw}, "image"


#: Deformation grid of the first display: the paper's 8-voxel spacing, 1-voxel lines.
GRID_SPACING, GRID_WIDTH = 8, 1
#: Grid lines at 255 shown as this fraction of black (gray_r over 0..255/GRID_DARKNESS): dark enough to follow,
#: light enough to read the anatomy under them.
GRID_DARKNESS = 0.6
#: Opacity of the label outlines drawn over the anatomy.
CONTOUR_OPACITY = 0.8
#: Opacity of the Jacobian map: semi-transparent, so the anatomy shows through when it is switched on ...
JACOBIAN_OPACITY = 0.8
#: ... and its colours fade out towards J = 1 (alpha = JACOBIAN_FADE·|J − 1|/2 on the −1..3 range): unchanged
#: volume and the background stay uncoloured.
JACOBIAN_FADE = 3.0


def precompute(
    result: Any, fixed_seg: np.ndarray | None = None, grid_spacing: int = GRID_SPACING, grid_width: int = GRID_WIDTH
) -> dict[str, Any]:
    """The costly parts of the first display's layers, for the worker thread (seconds for a 1 mm brain): the
    three backward-warped grids, the folding mask, the warped image's display range and the label outlines.
    :func:`build` takes them from ``run.prebuilt`` (when the grid parameters match)."""
    out: dict[str, Any] = {
        "grid": {"spacing": grid_spacing, "width": grid_width,
                 "per_axis": L.warped_grids(result.disp_native, grid_spacing, grid_width)},
        "folding": L.folding_mask(result.jacobian),
        "warped_range": L.display_range(result.warped),
    }
    if fixed_seg is not None and result.warped_seg is not None:
        out["outlines"] = {"fixed": L.label_outlines(fixed_seg), "warped": L.label_outlines(result.warped_seg)}
    return out


def jacobian_colormap() -> dict[str, Any]:
    """napari colormap (a dict napari turns into a Colormap) of the Jacobian layer: bwr, transparent at J = 1."""
    controls, colors = L.jacobian_colormap_spec(fade=JACOBIAN_FADE)
    return {"name": "jacobian bwr", "colors": colors, "controls": controls}


def available_kinds(run: Run) -> list[str]:
    """Kinds this run can show (label layers need label maps)."""
    from .runs import KINDS

    has_seg = run.result.warped_seg is not None
    out = []
    for k in KINDS:
        if k == "warped labels" and not has_seg:
            continue
        if k == "contours" and not (has_seg and run.fixed_seg is not None):
            continue
        out.append(k)
    return out


def build(
    run: Run, kind: str, *, grid_spacing: int = GRID_SPACING, grid_width: int = GRID_WIDTH, tile: int = 16
) -> list[LayerTuple]:
    """The layer tuples of one result kind (``contours`` gives two: fixed and warped)."""
    res = run.result
    pre = run.prebuilt or {}
    if kind == "warped":
        lo, hi = pre.get("warped_range") or L.display_range(res.warped)
        meta = _meta(run, kind, displacement=_disp_meta(run))
        return [_image(run, kind, res.warped, colormap="gray", contrast_limits=(lo, hi), metadata=meta)]
    if kind == "warped labels":
        if res.warped_seg is None:
            return []
        return [
            (
                np.asarray(res.warped_seg),
                {"name": run.layer_name(kind), "affine": run.affine, "metadata": _meta(run, kind), "opacity": 0.5},
                "labels",
            )
        ]
    if kind == "brain mask":  # the fixed image's brain, when brain extraction ran on it (hidden at first)
        if res.brain_mask_fixed is None:
            return []
        return [
            (
                np.asarray(res.brain_mask_fixed),
                {"name": run.layer_name(kind), "affine": run.affine, "metadata": _meta(run, kind), "opacity": 0.4},
                "labels",
            )
        ]
    if kind == "difference":
        diff = L.difference(res.warped, run.fixed)
        return [_image(run, kind, diff, colormap="coolwarm", contrast_limits=L.DIFFERENCE_RANGE)]
    if kind == "grid":
        cached = pre.get("grid") or {}
        if (cached.get("spacing"), cached.get("width")) == (grid_spacing, grid_width):
            grids = cached["per_axis"]
        else:
            grids = L.warped_grids(res.disp_native, grid_spacing, grid_width)
        meta = _meta(run, kind, per_axis=grids, spacing=grid_spacing, width=grid_width)
        # the axial grid first; show.update_grids swaps in the one across the displayed slicing axis.
        # Dark lines over whatever is below (gray_r + minimum blending: 0 -> white, no change; 255 -> black): anatomy
        # stays readable, unlike white additive lines on a bright brain.
        return [
            _image(
                run, kind, grids[2], colormap="gray_r", contrast_limits=(0, 255 / GRID_DARKNESS), blending="minimum",
                metadata=meta,
            )
        ]
    if kind == "jacobian":
        jac = np.asarray(res.jacobian, dtype=np.float32)
        return [
            _image(
                run, kind, jac, colormap=jacobian_colormap(), contrast_limits=L.JACOBIAN_RANGE,
                opacity=JACOBIAN_OPACITY,
            )
        ]
    if kind == "folding":
        mask = pre["folding"] if "folding" in pre else L.folding_mask(res.jacobian)
        return [
            (
                mask,
                {
                    "name": run.layer_name("folding J≤0"),
                    "affine": run.affine,
                    "metadata": _meta(run, kind),
                    "colormap": {None: "yellow", 0: "transparent"},
                    "opacity": 0.9,
                },
                "labels",
            )
        ]
    if kind == "magnitude":
        mag = L.displacement_magnitude_mm(res.disp_native, run.affine)
        hi = float(np.percentile(mag[::4, ::4, ::4], 99.5)) or 1.0
        meta = _meta(run, kind, displacement=_disp_meta(run))
        return [
            _image(run, "|u| mm", mag, colormap="inferno", contrast_limits=(0.0, hi), metadata=meta)
        ]
    if kind == "contours":
        if res.warped_seg is None or run.fixed_seg is None:
            return []
        outlines = pre.get("outlines") or {
            "fixed": L.label_outlines(run.fixed_seg), "warped": L.label_outlines(res.warped_seg)
        }
        out = []
        # one outline volume per slicing axis, swapped like the grid's (show.update_grids); the axial one first
        for side, color in (("fixed", FIXED_CONTOUR_COLOR), ("warped", WARPED_CONTOUR_COLOR)):
            per_axis = outlines[side]
            kw = {
                "name": run.layer_name(f"contours {side}"),
                "affine": run.affine,
                "metadata": _meta(run, kind, side=side, per_axis=per_axis),
                "colormap": {None: color, 0: "transparent"},
                "opacity": CONTOUR_OPACITY,
            }
            out.append((per_axis[2], kw, "labels"))
        return out
    if kind == "checkerboard":
        cb = L.checkerboard(run.fixed, res.warped, tile)
        meta = _meta(run, kind, tile=tile)
        return [_image(run, kind, cb, colormap="gray", contrast_limits=(0.0, 1.0), metadata=meta)]
    if kind == "flicker":
        frames = [L.robust_normalize(run.fixed), L.robust_normalize(res.warped)]
        meta = _meta(run, kind, frames=frames, frame=0)
        return [_image(run, kind, frames[0], colormap="gray", contrast_limits=(0.0, 1.0), metadata=meta)]
    raise ValueError(f"unknown result kind {kind!r}")
