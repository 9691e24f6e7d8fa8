"""Colour tables of the figures: the ITK-SNAP-like label lookup table and tick formatting.

Imports matplotlib only inside functions, so the table itself can be read without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: ITK-SNAP's default label colours for labels 0..35 (0 = background, black). Label 20/21 (right cerebral white
#: matter/cortex of the 35-label table) come out snow/medium purple, 1/2 (left) red/lime, as in the paper's figure.
ITKSNAP_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # 0 background
    (255, 0, 0),  # 1 red
    (0, 255, 0),  # 2 lime
    (0, 0, 255),  # 3 blue
    (255, 255, 0),  # 4 yellow
    (0, 255, 255),  # 5 cyan
    (255, 0, 255),  # 6 magenta
    (255, 239, 213),  # 7 papaya whip
    (0, 0, 205),  # 8 medium blue
    (205, 133, 63),  # 9 peru
    (210, 180, 140),  # 10 tan
    (102, 205, 170),  # 11 medium aquamarine
    (0, 0, 128),  # 12 navy
    (0, 139, 139),  # 13 dark cyan
    (46, 139, 87),  # 14 sea green
    (255, 228, 225),  # 15 misty rose
    (106, 90, 205),  # 16 slate blue
    (221, 160, 221),  # 17 plum
    (233, 150, 122),  # 18 dark salmon
    (165, 42, 42),  # 19 brown
    (255, 250, 250),  # 20 snow
    (147, 112, 219),  # 21 medium purple
    (218, 112, 214),  # 22 orchid
    (75, 0, 130),  # 23 indigo
    (255, 182, 193),  # 24 light pink
    (60, 179, 113),  # 25 medium sea green
    (255, 235, 205),  # 26 blanched almond
    (255, 228, 196),  # 27 bisque
    (218, 165, 32),  # 28 goldenrod
    (0, 128, 128),  # 29 teal
    (188, 143, 143),  # 30 rosy brown
    (255, 105, 180),  # 31 hot pink
    (255, 218, 185),  # 32 peach puff
    (222, 184, 135),  # 33 burlywood
    (127, 255, 0),  # 34 chartreuse
    (139, 69, 19),  # 35 saddle brown
)

#: Labels above 35 cycle through these qualitative palettes (60 distinct colours).
_EXTRA_PALETTES = ("tab20", "tab20b", "tab20c")


def label_colors(max_label: int = 35) -> np.ndarray:
    """RGB colours (``(max_label+1)×3``, floats in [0, 1]) for labels ``0..max_label``.

    0..35 are ITK-SNAP's defaults; higher labels cycle a 60-colour qualitative palette (tab20, tab20b, tab20c).
    """
    import matplotlib

    n = int(max_label) + 1
    base = np.asarray(ITKSNAP_COLORS, dtype=np.float64) / 255.0
    if n <= len(base):
        return base[: max(n, 1)].copy()
    extra = np.concatenate([np.asarray(matplotlib.colormaps[p].colors)[:, :3] for p in _EXTRA_PALETTES])
    more = extra[np.arange(n - len(base)) % len(extra)]
    return np.concatenate([base, more])


def label_cmap_norm(max_label: int = 35):
    """``(ListedColormap, BoundaryNorm)`` mapping integer label ``k`` to its colour (bins ``k ± 0.5``)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    colors = label_colors(max_label)
    cmap = ListedColormap(colors, name=f"itksnap_{len(colors) - 1}")
    norm = BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors))
    return cmap, norm


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick texts as in the paper's colour bars: integers plainly, others with two decimals, zero as ``0``."""
    ticks = [float(t) for t in ticks]
    if all(abs(t - round(t)) < 1e-9 for t in ticks):
        return [f"{int(round(t))}" for t in ticks]
    return ["0" if abs(t) < 1e-12 else f"{t:.2f}" for t in ticks]
