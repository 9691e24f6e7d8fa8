"""First guesses of the Register widget: which image is fixed, which is moving, which label map goes with each.

Pure functions over layer names (oldest first, as napari lists layers), no napari import:

* a name with a *fixed* word (fixed, template, atlas, reference, target) or a *moving* word (moving, source,
  subject) says its role; otherwise the two most recently added images are taken, the older as fixed;
* the fixed and the moving guess are never the same image;
* a label map goes with an image when its name is the image's name plus a label word (``"demo fixed labels"``,
  ``"fixed seg"``, ``"sub01_T1w_dseg"`` for ``"sub01_T1w"``), else when both names carry the same role word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

FIXED_WORDS = frozenset({"fixed", "template", "atlas", "reference", "ref", "target"})
MOVING_WORDS = frozenset({"moving", "source", "subject", "mov"})
LABEL_WORDS = frozenset(
    {"labels", "label", "seg", "segs", "segmentation", "aseg", "dseg", "parc", "parcellation", "mask", "lbl"}
)
FILE_WORDS = frozenset({"nii", "gz"})


def words(name: str) -> list[str]:
    """Lower-case letter runs of a layer name (digits and punctuation separate words; file suffixes dropped)."""
    return [w for w in re.split(r"[^a-z]+", str(name).lower()) if w and w not in FILE_WORDS]


def tokens(name: str) -> list[str]:
    """Lower-case alphanumeric runs (digits kept: ``sub01`` and ``sub02`` differ)."""
    return [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w and w not in FILE_WORDS]


def role_of(name: str) -> str | None:
    """``"fixed"``, ``"moving"`` or None (no role word, or both)."""
    w = set(words(name))
    fixed, moving = bool(w & FIXED_WORDS), bool(w & MOVING_WORDS)
    if fixed == moving:
        return None
    return "fixed" if fixed else "moving"


def choose_pair(
    names: Sequence[str], fixed: int | None = None, moving: int | None = None
) -> tuple[int | None, int | None]:
    """Indices (into ``names``, oldest first) of the fixed and the moving image; a given index is kept.

    Never returns the same index twice; None where there is nothing left to pick.
    """
    n = len(names)
    if fixed is not None and fixed == moving:
        moving = None
    roles = [role_of(x) for x in names]
    newest_first = list(range(n - 1, -1, -1))

    def newest(role: str | None, avoid: int | None) -> int | None:
        return next((i for i in newest_first if roles[i] == role and i != avoid), None)

    if fixed is None and moving is None:
        fixed, moving = newest("fixed", None), newest("moving", None)
        if fixed is None and moving is None:
            # no names to go by: the two most recently added images, the older one as fixed
            if n >= 2:
                return n - 2, n - 1
            return (0 if n == 1 else None), None
    if fixed is None:
        fixed = newest("fixed", moving)
        if fixed is None:
            fixed = newest(None, moving)
        if fixed is None:
            fixed = next((i for i in newest_first if i != moving), None)
    if moving is None:
        moving = newest("moving", fixed)
        if moving is None:
            moving = newest(None, fixed)
        if moving is None:
            moving = next((i for i in newest_first if i != fixed), None)
    return fixed, moving


def labels_for(image_name: str, label_names: Sequence[str]) -> int | None:
    """Index of the label map that goes with ``image_name`` (the newest of the best matches), or None."""
    img_tokens = tokens(image_name)
    img_role = role_of(image_name)
    best, best_score = None, 0
    for i, name in enumerate(label_names):
        lab = tokens(name)
        stem = [t for t in lab if t not in LABEL_WORDS]
        score = 0
        if stem and stem == img_tokens and len(stem) < len(lab):
            score = 3  # the image's name plus a label word
        elif stem == img_tokens and stem:
            score = 2  # the same name (a label layer named like its image)
        elif img_role is not None and role_of(name) == img_role:
            score = 1
        if score and score >= best_score:
            best, best_score = i, score
    return best
