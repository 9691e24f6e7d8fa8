"""Publication figures with matplotlib (no napari, no torch): the paper's registration comparison figure.

Quick use::

    from napari_unireg.viz import comparison_figure, save_figure
    fig = comparison_figure(fixed, moving, {"DP-ConvIC-C": disp}, fixed_seg, moving_seg, axis=2)
    save_figure(fig, "figures", "0001", "0002", formats=("png", "pdf"))

Submodules: :mod:`.panels` (one row type for one slice into an Axes), :mod:`.grid` (the whole figure and its
file names), :mod:`.colors` (label lookup table), :mod:`.cli` (``unireg figure``). Names are loaded on first
use, so importing this package (e.g. from ``unireg --help``) does not import matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "comparison_figure": "grid",
    "save_figure": "grid",
    "figure_filename": "grid",
    "figure_paths": "grid",
    "get_panel": "grid",
    "FigureStyle": "grid",
    "ROWS": "grid",
    "ROW_TITLES": "grid",
    "FORMATS": "grid",
    "draw_deformed": "panels",
    "draw_difference": "panels",
    "draw_labels": "panels",
    "draw_grid": "panels",
    "draw_jacobian": "panels",
    "add_scale_bar": "panels",
    "default_slice_index": "panels",
    "orient_slice": "panels",
    "label_colors": "colors",
    "label_cmap_norm": "colors",
    "ITKSNAP_COLORS": "colors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
