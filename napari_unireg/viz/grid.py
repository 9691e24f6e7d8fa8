"""The comparison figure of the paper's demo (ARCHITECTURE.md §12) for any number of methods, and its files.

Layout: columns Fixed, Moving, one per method, then a narrow column (width ratio 0.15) holding the row titles
rotated 270°. Rows (any subset, in any order): ``deformed``, ``difference`` (starts under Moving), ``labels``,
``grid`` and ``jacobian`` (methods only). Shared colour bars sit in the empty Fixed cell of the difference row
and the empty Moving cell of the Jacobian row. Every data cell is ``cell_width`` (3 in) wide and as tall as the
slice's physical aspect asks; ``wspace=0.1``, ``hspace=0.05``, margins left/bottom 0.05, right/top 0.90,
suptitle at y = 0.95; fonts 24 (titles), 21 (ticks), 30 (suptitle).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


from ..errors import UserError
from . import panels as P

__all__ = [
    "ROWS",
    "ROW_TITLES",
    "FORMATS",
    "FigureStyle",
    "comparison_figure",
    "figure_filename",
    "save_figure",
    "get_panel",
]

ROWS = ("deformed", "difference", "labels", "grid", "jacobian")
ROW_TITLES = {
    "deformed": "Deformed",
    "difference": "Difference",
    "labels": "Deformed\nLabels (Slice)",
    "grid": "Deformation\nGrid (backward)",
    "jacobian": "Deformation\nJdet",
}
FORMATS = ("png", "svg", "pdf")


@dataclass
class FigureStyle:
    """Every size, colour map and range of the figure (defaults: the paper's, ARCHITECTURE.md §12)."""

    # layout (inches, figure fractions)
    cell_width: float = 3.0
    title_column_ratio: float = 0.15
    wspace: float = 0.1
    hspace: float = 0.05
    left: float = 0.05
    bottom: float = 0.05
    right: float = 0.90
    top: float = 0.90
    suptitle_y: float = 0.95
    # fonts (points)
    title_fontsize: float = 24
    tick_fontsize: float = 21
    suptitle_fontsize: float = 30
    colorbar_label_fontsize: float = 21
    # rows
    image_cmap: str = "gray"
    image_vmin: float = 0.0
    image_vmax: float = 0.75
    diff_cmap: str = "coolwarm"
    diff_vmin: float = -0.1
    diff_vmax: float = 0.1
    diff_ticks: tuple[float, ...] = (-0.1, -0.05, 0.0, 0.05, 0.1)
    diff_label: str = "Difference"
    label_cmap: Any = None  # None: ITK-SNAP-like table (with label_norm None)
    label_norm: Any = None
    max_label: int | None = None  # None: max(35, largest label present)
    grid_cmap: str = "gray"
    grid_vmin: float = 0.0
    grid_vmax: float = 1.0
    grid_step: int = 8
    jac_cmap: str = "bwr"
    jac_vmin: float = -1.0
    jac_vmax: float = 3.0
    jac_ticks: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0, 3.0)
    jac_label: str = "Jacobian\ndeterminant"
    fold_contour_color: str | None = "black"
    fold_contour_linewidth: float = 0.7
    # colour bars: fraction of the host cell's width, at its right edge, ticks and label on the left
    colorbar_width: float = 0.125
    # orientation, optional scale bar on the first Fixed image
    convention: str = "radiological"
    scale_bar_mm: float | None = None
    scale_bar_color: str = "white"
    row_titles: Mapping[str, str] = field(default_factory=lambda: dict(ROW_TITLES))

    def updated(self, **kw) -> FigureStyle:
        """A copy with some fields replaced (unknown names raise a UserError)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise UserError(f"unknown figure style option(s): {', '.join(unknown)}")
        return replace(self, **kw)


def _resolve_rows(rows: Sequence[str] | None, have_labels: bool) -> list[str]:
    if rows is None:
        return [r for r in ROWS if r != "labels" or have_labels]
    if isinstance(rows, str):
        rows = [rows]
    out = []
    for r in rows:
        if r not in ROWS:
            raise UserError(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
        if r == "labels" and not have_labels:
            raise UserError("the labels row needs moving_seg (the moving label map)")
        if r not in out:
            out.append(r)
    if not out:
        raise UserError("no rows to draw")
    return out


def _figure_size(n_data_cols: int, n_rows: int, cell_h: float, st: FigureStyle) -> tuple[float, float]:
    """Figure inches such that GridSpec makes every data column ``cell_width`` wide and rows ``cell_h`` tall.

    GridSpec: average cell = span / (n + space·(n − 1)); a column gets ``average · n · ratio / Σ ratios``.
    """
    ncols = n_data_cols + 1
    ratio_sum = n_data_cols + st.title_column_ratio
    width = st.cell_width * ratio_sum * (ncols + st.wspace * (ncols - 1)) / (ncols * (st.right - st.left))
    height = cell_h * (n_rows + st.hspace * (n_rows - 1)) / (st.top - st.bottom)
    return width, height


def _add_colorbar(fig, host, mappable, ticks, label, st: FigureStyle) -> None:
    from .colors import tick_labels

    cax = host.inset_axes([1.0 - st.colorbar_width, 0.0, st.colorbar_width, 1.0], label="<colorbar>")
    cb = fig.colorbar(mappable, cax=cax, ticks=list(ticks))
    cb.ax.yaxis.set_ticks_position("left")
    cb.ax.yaxis.set_label_position("left")
    cb.ax.set_yticklabels(tick_labels(ticks))
    cb.ax.tick_params(labelsize=st.tick_fontsize)
    cb.set_label(label, fontsize=st.colorbar_label_fontsize)


def comparison_figure(
    fixed: Any,
    moving: Any,
    methods: Mapping[str, Any],
    fixed_seg: Any = None,
    moving_seg: Any = None,
    axis: int = 2,
    slice_index: int | None = None,
    rows: Sequence[str] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | bool | None = None,
    *,
    fixed_id: str = "fixed",
    moving_id: str = "moving",
    normalize: str = "auto",
    style: FigureStyle | None = None,
    **style_kw,
):
    """The paper's comparison figure for one slice: a :class:`matplotlib.figure.Figure` (not registered with pyplot).

    ``fixed``/``moving``: ``D0×D1×D2`` images on one grid (intensities for a gray 0..0.75 display, see
    :func:`panels.normalize_intensity` for ``normalize``). ``methods``: column name → displacement ``3×D0×D1×D2``
    (voxel units, pull, fixed→moving; numpy or torch). ``slice_index``: 0-based, default the paper's
    (:func:`panels.default_slice_index`). ``rows``: subset/order of ``ROWS``; default all, without ``labels``
    when ``moving_seg`` is missing. ``spacing``: voxel size (mm) for the physical aspect ratio. ``title``:
    None → ``"Fixed: F, Moving: M, Axis: a, Slice: s/N"`` (s 1-based), a string, or False for none.
    ``style``/``**style_kw``: any :class:`FigureStyle` field (colour maps, ranges, sizes, fonts, convention,
    ``scale_bar_mm``).

    Orientation: the paper's (transpose, mirror left-right, ``origin='lower'``), which for RAS arrays is the
    radiological convention (patient's right on the image's left; sagittal: anterior on the left);
    ``convention='neurological'`` skips the mirror. See :mod:`napari_unireg.viz.panels`.

    The returned figure carries ``fig.unireg_panels`` (``(row, column title) → Axes`` of the drawn panels) and
    ``fig.unireg_info`` (axis, slice_index, n, fixed_id, moving_id, rows, columns) for :func:`save_figure`.
    """
    from matplotlib.figure import Figure

    st = (style or FigureStyle()).updated(**style_kw)
    axis = P._check_axis(axis)
    fix = P.normalize_intensity(P.as_volume(fixed, "fixed"), normalize)
    mov = P.normalize_intensity(P.as_volume(moving, "moving"), normalize)
    if fix.shape != mov.shape:
        raise UserError(f"fixed {fix.shape} and moving {mov.shape} must share a grid (resample first)")
    shape = fix.shape
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UserError(f"spacing must be three positive numbers, got {spacing}")
    if not methods:
        raise UserError("give at least one method (name → displacement)")
    names = [str(k) for k in methods]
    if len(set(names)) != len(names) or {"Fixed", "Moving"} & set(names):
        raise UserError("method names must be unique and differ from 'Fixed' and 'Moving'")
    disps = {str(k): P.as_disp(v, shape, f"displacement of {k!r}") for k, v in methods.items()}
    fseg = P.as_volume(fixed_seg, "fixed_seg") if fixed_seg is not None else None
    mseg = P.as_volume(moving_seg, "moving_seg") if moving_seg is not None else None
    for seg, what in ((fseg, "fixed_seg"), (mseg, "moving_seg")):
        if seg is not None and seg.shape != shape:
            raise UserError(f"{what} grid {seg.shape} differs from the image grid {shape}")
    row_list = _resolve_rows(rows, mseg is not None)
    index = P._check_index(shape, axis, slice_index, spacing)
    n = shape[axis]

    columns = ["Fixed", "Moving", *names]
    n_data = len(columns)
    cell_h = st.cell_width * P.panel_aspect(shape, spacing, axis)
    fig = Figure(figsize=_figure_size(n_data, len(row_list), cell_h, st))
    gs = fig.add_gridspec(
        len(row_list), n_data + 1,
        width_ratios=[1.0] * n_data + [st.title_column_ratio],
        left=st.left, right=st.right, bottom=st.bottom, top=st.top, wspace=st.wspace, hspace=st.hspace,
    )
    view = dict(axis=axis, index=index, spacing=spacing, convention=st.convention)
    max_label = st.max_label
    if max_label is None and mseg is not None:
        max_label = max(35, int(mseg.max()), int(fseg.max()) if fseg is not None else 0)
    lab_kw = dict(max_label=max_label, cmap=st.label_cmap, norm=st.label_norm)
    img_kw = dict(cmap=st.image_cmap, vmin=st.image_vmin, vmax=st.image_vmax)
    diff_kw = dict(cmap=st.diff_cmap, vmin=st.diff_vmin, vmax=st.diff_vmax)
    grid_kw = dict(cmap=st.grid_cmap, vmin=st.grid_vmin, vmax=st.grid_vmax, step=st.grid_step)
    jac_kw = dict(cmap=st.jac_cmap, vmin=st.jac_vmin, vmax=st.jac_vmax, contour_color=st.fold_contour_color,
                  contour_linewidth=st.fold_contour_linewidth)

    panels: dict[tuple[str, str], Any] = {}
    for r, row in enumerate(row_list):
        cells = [fig.add_subplot(gs[r, c]) for c in range(n_data)]
        for ax in cells:
            ax.set_axis_off()
        for c, (col, ax) in enumerate(zip(columns, cells)):
            disp = disps.get(col)
            drawn = True
            if row == "deformed":
                if c == 0:
                    P.draw_deformed(ax, fix, None, **view, **img_kw)
                else:
                    P.draw_deformed(ax, mov, disp, **view, **img_kw)
            elif row == "difference":
                if c == 0:
                    drawn = False
                else:
                    P.draw_difference(ax, fix, mov, disp, **view, **diff_kw)
            elif row == "labels":
                if c == 0:
                    drawn = fseg is not None
                    if drawn:
                        P.draw_labels(ax, fseg, None, **view, **lab_kw)
                else:
                    P.draw_labels(ax, mseg, disp, **view, **lab_kw)
            elif row == "grid":
                drawn = disp is not None
                if drawn:
                    P.draw_grid(ax, disp, **view, **grid_kw)
            elif row == "jacobian":
                drawn = disp is not None
                if drawn:
                    P.draw_jacobian(ax, disp, **view, **jac_kw)
            if drawn:
                panels[(row, col)] = ax
        if r == 0:
            for col, ax in zip(columns, cells):
                ax.set_title(col, fontsize=st.title_fontsize)
        if row == "difference":
            _add_colorbar(fig, cells[0], cells[1].images[0], st.diff_ticks, st.diff_label, st)
        if row == "jacobian":
            _add_colorbar(fig, cells[1], cells[2].images[0], st.jac_ticks, st.jac_label, st)
        tax = fig.add_subplot(gs[r, n_data])
        tax.set_axis_off()
        tax.text(0.0, 0.5, st.row_titles.get(row, row), rotation=270, ha="left", va="center",
                 fontsize=st.title_fontsize, transform=tax.transAxes)

    if st.scale_bar_mm:
        first = next((panels[(row, "Fixed")] for row in row_list if (row, "Fixed") in panels), None)
        if first is None:
            first = next(iter(panels.values()))
        P.add_scale_bar(first, st.scale_bar_mm, spacing, axis, color=st.scale_bar_color,
                        fontsize=st.tick_fontsize * 0.8)

    if title is None:
        title = f"Fixed: {fixed_id}, Moving: {moving_id}, Axis: {axis}, Slice: {index + 1}/{n}"
    if title:
        # y = 0.95 as the paper, but never onto the column titles of a short figure (few rows, sagittal slices):
        # keep room for a title line (+ 6 pt pad), the suptitle line and 8 pt between them.
        room_in = (1.2 * st.title_fontsize + 6 + 1.2 * st.suptitle_fontsize + 8) / 72
        y = max(st.suptitle_y, st.top + room_in / fig.get_figheight())
        fig.suptitle(str(title), y=y, fontsize=st.suptitle_fontsize)
    fig.unireg_panels = panels
    fig.unireg_info = dict(axis=axis, slice_index=index, n=n, fixed_id=str(fixed_id), moving_id=str(moving_id),
                           rows=row_list, columns=columns, spacing=spacing)
    return fig


def get_panel(fig, row: str, column: str):
    """The Axes of one drawn panel of a :func:`comparison_figure` (KeyError when that cell is empty)."""
    return fig.unireg_panels[(row, column)]


def _safe_id(s: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_")
    return text or "x"


def figure_filename(fixed_id: Any, moving_id: Any, axis: int, slice_index: int, n: int, ext: str = "png") -> str:
    """``f{fixed}_m{moving}_axis{a}_slc{s:03d}of{N}.{ext}`` with ``s = slice_index + 1`` (1-based, as the paper)."""
    return f"f{_safe_id(fixed_id)}_m{_safe_id(moving_id)}_axis{int(axis)}_slc{int(slice_index) + 1:03d}of{int(n)}.{ext}"


def _formats(formats: Iterable[str] | str) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    out = []
    for f in formats:
        f = str(f).lower().lstrip(".")
        if f not in FORMATS:
            raise UserError(f"figure format must be one of {', '.join(FORMATS)}, got {f!r}")
        if f not in out:
            out.append(f)
    if not out:
        raise UserError("no figure format given")
    return out


def figure_paths(out_dir, fixed_id, moving_id, axis, slice_index, n, formats=("png",)) -> list[Path]:
    """The files :func:`save_figure` would write."""
    out = Path(out_dir)
    return [out / figure_filename(fixed_id, moving_id, axis, slice_index, n, f) for f in _formats(formats)]


def save_figure(
    fig,
    out_dir,
    fixed_id: Any = None,
    moving_id: Any = None,
    axis: int | None = None,
    slice_index: int | None = None,
    n: int | None = None,
    formats: Iterable[str] | str = ("png",),
    dpi: float = 300,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``fig`` as ``out_dir/f{fixed}_m{moving}_axis{a}_slc{s:03d}of{N}.{png|svg|pdf}`` (``bbox_inches='tight'``).

    Arguments left as None come from ``fig.unireg_info`` (set by :func:`comparison_figure`); ``slice_index`` is
    0-based, the name is 1-based. Existing files are refused (UserError, nothing written) unless ``overwrite``.
    Returns the written paths.
    """
    info = getattr(fig, "unireg_info", {})
    vals = dict(fixed_id=fixed_id, moving_id=moving_id, axis=axis, slice_index=slice_index, n=n)
    for k, v in vals.items():
        if v is None:
            if k not in info:
                raise UserError(f"save_figure: {k} is required for a figure not made by comparison_figure")
            vals[k] = info[k]
    paths = figure_paths(out_dir, formats=formats, **vals)
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{Path(out_dir)} already holds {', '.join(existing)}; use --overwrite (overwrite=True)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for p in paths:
        fig.savefig(p, dpi=dpi, bbox_inches="tight", format=p.suffix[1:], facecolor="white")
    return paths
