"""Add, find and remove the result layers of a run in a viewer (duck-typed viewer API, no Qt)."""

from __future__ import annotations

from typing import Any

from . import results
from .convert import NIFTI_KEY
from .runs import META_KEY, Run


#: layer attributes set after creation (napari's add_* functions do not take them)
POST_ATTRS = ("contour",)


def layers_of(viewer: Any, run: Run, kind: str | None = None) -> list[Any]:
    """Layers of ``run`` (of one ``kind`` when given) currently in the viewer."""
    out = []
    for layer in viewer.layers:
        meta = (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}
        if meta.get("run") == run.id and (kind is None or meta.get("kind") == kind):
            out.append(layer)
    return out


def add_kind(viewer: Any, run: Run, kind: str, visible: bool | None = None, **params: Any) -> list[Any]:
    """Build and add the layers of one kind (replacing any previous ones of that kind); returns them.

    ``visible`` given: the layers are created shown or hidden (no flash of a layer that is hidden at once).

    Result layers get the fixed file's geometry (``metadata['nifti']``) so that saving one writes it like the
    fixed image (its voxel order and header).
    """
    remove_kind(viewer, run, kind)
    added = []
    for data, kwargs, ltype in results.build(run, kind, **params):
        if run.nifti is not None:
            kwargs["metadata"] = {**kwargs.get("metadata", {}), NIFTI_KEY: run.nifti}
        if visible is not None:
            kwargs["visible"] = bool(visible)
        post = {k: kwargs.pop(k) for k in POST_ATTRS if k in kwargs}  # not constructor arguments
        layer = getattr(viewer, f"add_{ltype}")(data, **kwargs)
        for k, v in post.items():
            setattr(layer, k, v)
        added.append(layer)
    if any(((lay.metadata or {}).get(META_KEY) or {}).get("per_axis") is not None for lay in added):
        follow_grids(viewer)
        update_grids(viewer)
    return added


def order_kinds(viewer: Any, run: Run, kinds: tuple[str, ...]) -> None:
    """Put the run's layers of ``kinds`` into that order, bottom to top, in the slots they occupy now."""
    layers = [lay for kind in kinds for lay in layers_of(viewer, run, kind)]
    slots = sorted(viewer.layers.index(lay) for lay in layers)
    for layer, slot in zip(layers, slots):
        here = viewer.layers.index(layer)
        if here != slot:
            viewer.layers.move(here, slot)


def remove_kind(viewer: Any, run: Run, kind: str) -> None:
    for layer in layers_of(viewer, run, kind):
        viewer.layers.remove(layer)


def set_visible(viewer: Any, run: Run, kind: str, visible: bool, **params: Any) -> list[Any]:
    """Show a kind (adding its layers the first time) or hide it (layers kept, so toggling back is instant)."""
    found = layers_of(viewer, run, kind)
    if visible and not found:
        return add_kind(viewer, run, kind, **params)
    for layer in found:
        layer.visible = visible
    return found


# ---------------------------------------------------------------------------------------------- grids
# A deformation grid or label-outline layer holds one volume per slicing axis (metadata['unireg']['per_axis']):
# the main viewer shows the one across its displayed slicing axis, so the lines always lie in the visible plane.

_GRID_FOLLOW: "weakref.WeakSet" = None  # type: ignore[assignment]


def slicing_axis(viewer: Any) -> int:
    """World axis across the main viewer's 2D plane (2, axial, in 3D display)."""
    dims = viewer.dims
    if dims.ndisplay == 2 and len(dims.order) >= 3:
        return int(dims.order[-3])
    return 2


def update_grids(viewer: Any, event: Any = None) -> None:
    """Put the volume of the current slicing axis into every per-axis layer (grids, label outlines)."""
    axis = slicing_axis(viewer)
    for layer in list(viewer.layers):
        meta = (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}
        per_axis = meta.get("per_axis")
        if per_axis is not None and len(per_axis) == 3 and layer.data is not per_axis[axis]:
            layer.data = per_axis[axis]


def follow_grids(viewer: Any) -> None:
    """Keep the grid layers matched to the slicing axis (connected once per viewer)."""
    import weakref

    global _GRID_FOLLOW
    if _GRID_FOLLOW is None:
        _GRID_FOLLOW = weakref.WeakSet()
    if viewer in _GRID_FOLLOW:
        return
    _GRID_FOLLOW.add(viewer)
    ref = weakref.ref(viewer)

    def on_dims(event: Any = None) -> None:
        v = ref()
        if v is not None:
            update_grids(v)

    viewer.dims.events.order.connect(on_dims)
    viewer.dims.events.ndisplay.connect(on_dims)
