"""File > Open Sample > napari-unireg: the embedded demo pair (MNI152-based fixed/moving images and labels)."""

from __future__ import annotations

from typing import Any


def _demo_volumes() -> tuple[Any, Any, Any, Any]:
    """(fixed, moving, fixed_seg, moving_seg) Volumes of the demo pair."""
    from napari_unireg.io import demo

    for name in ("demo_pair", "demo_volumes"):  # files cached by the demo module: real NIfTI headers
        fn = getattr(demo, name, None)
        if fn is not None:
            return tuple(fn())[:4]
    from napari_unireg.io.demo_data import make_demo_pair
    from napari_unireg.io import volume_from_array

    p = make_demo_pair()
    return (
        volume_from_array(p.fixed, p.affine, kind="image", name="fixed"),
        volume_from_array(p.moving, p.affine, kind="image", name="moving"),
        volume_from_array(p.fixed_seg, p.affine, kind="label", name="fixed labels"),
        volume_from_array(p.moving_seg, p.affine, kind="label", name="moving labels"),
    )


def _label_names() -> dict[int, str]:
    try:
        from napari_unireg.io.demo_data import DEMO_LABELS
    except ImportError:
        return {}
    return dict(DEMO_LABELS)


def demo_pair() -> list[tuple]:
    """Layer data tuples: demo fixed, demo moving (images) and their label maps."""
    from .anatomical import orient_current_viewer
    from .reader import volume_layer_data

    orient_current_viewer()  # napari adds these layers next: show them as an axial plane, anterior up
    fixed, moving, fixed_seg, moving_seg = _demo_volumes()
    names = _label_names()
    out = [
        volume_layer_data(fixed, name="demo fixed"),
        volume_layer_data(moving, name="demo moving"),
    ]
    if fixed_seg is not None:
        out.append(volume_layer_data(fixed_seg, name="demo fixed labels", label_names=names))
    if moving_seg is not None:
        out.append(volume_layer_data(moving_seg, name="demo moving labels", label_names=names))
    # the moving image starts hidden so that the fixed one is what the user sees first
    out[1][1]["visible"] = False
    for t in out[2:]:
        t[1]["visible"] = False
    return out
