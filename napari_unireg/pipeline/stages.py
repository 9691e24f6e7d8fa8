"""The stages of one registration, each a small pure function with typed inputs and outputs.

    load → pre-align → model grid → predict → refine → native grid → metrics → write

``load`` is :func:`napari_unireg.io.load_volume`; ``write`` is :func:`napari_unireg.pipeline.write.write_result`;
:func:`napari_unireg.pipeline.register.register_volumes` composes the rest. No stage keeps state between calls.
Arrays on the model grid are canonical RAS 1 mm (``GridMapping.model_shape``); displacements are ``3×S`` in voxel
units of their grid, pull convention (:mod:`napari_unireg.core.grid`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, UserError
from .model_grid import GridMapping

__all__ = [
    "CLASSICAL_STEPS",
    "Inputs",
    "OnModelGrid",
    "Field",
    "NativeOutputs",
    "check_inputs",
    "prealign",
    "model_grid",
    "predict",
    "refine",
    "metrics",
    "native_grid",
    "native_slabs",
    "estimate_peak_bytes",
    "available_memory_bytes",
    "check_memory",
]

#: Adam steps per level of the classical method (levels 1/4 and 1/2 resolution).
CLASSICAL_STEPS = 60
#: ``report(fraction)`` of one stage; raises :class:`Cancelled` when the caller asked to stop.
Report = Callable[[float], None]


@dataclass(frozen=True)
class Inputs:
    """The loaded volumes (canonical RAS :class:`~napari_unireg.io.Volume`); label maps optional."""

    fixed: Any
    moving: Any
    fixed_seg: Any = None
    moving_seg: Any = None


@dataclass(frozen=True)
class OnModelGrid:
    """Both images (and label maps) on the fixed image's model grid; the moving ones through ``matrix``."""

    mapping: GridMapping
    fixed: np.ndarray
    moving: np.ndarray
    fixed_seg: np.ndarray | None
    moving_seg: np.ndarray | None
    matrix: np.ndarray | None  # 4×4 pre-alignment (world, pull), None = identity


@dataclass(frozen=True)
class Field:
    """A displacement on the model grid (``1×3×S`` tensor) and its inverse when the network gives one."""

    disp: Any
    inverse: Any = None

    def numpy(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(disp, inverse)`` as float32 ``3×S`` arrays."""
        import torch

        with torch.inference_mode():
            d = self.disp[0].float().cpu().numpy()
            i = self.inverse[0].float().cpu().numpy() if self.inverse is not None else None
        return d, i


@dataclass(frozen=True)
class NativeOutputs:
    """Results on the fixed image's native canonical grid."""

    disp: np.ndarray  # 3×X×Y×Z, Learn2Reg convention w.r.t. the moving image placed by world coordinates
    warped: np.ndarray
    warped_seg: np.ndarray | None
    jacobian: np.ndarray
    inverse: np.ndarray | None


def _called(vol) -> str:
    """How a message names a volume: its file name when it came from a file, else its layer/volume name."""
    path = getattr(vol, "path", None)
    return Path(path).name if path else str(vol.name)


def check_inputs(inputs: Inputs) -> None:
    """:class:`UserError` for a missing image, an image given as labels (or the reverse), a label map off its
    image's grid."""
    for vol, role in ((inputs.fixed, "fixed image"), (inputs.moving, "moving image")):
        if vol is None:
            raise UserError(f"no {role} given")
        if vol.is_label:
            raise UserError(f"the {role} ({vol.name}) is a label map; give an intensity image")
    for vol in (inputs.fixed, inputs.moving):
        n = int(np.count_nonzero(np.asarray(vol.data) > 0))
        if n == 0:
            raise UserError(f"{_called(vol)}: no voxel above 0 (empty, or only negative values): nothing to register")
        if n < max(100, vol.data.size // 10000):  # a brain has 10^5-10^6 voxels; this is a few stray ones
            raise UserError(f"{_called(vol)} has only {n} voxels above 0: nearly empty, nothing to register")
    for seg, img, role in ((inputs.fixed_seg, inputs.fixed, "fixed"), (inputs.moving_seg, inputs.moving, "moving")):
        if seg is None:
            continue
        if not seg.is_label:
            raise UserError(f"the {role} label map ({seg.name}) is an intensity image, not labels")
        if not seg.grid.same_as(img.grid, atol=1e-3):
            raise UserError(
                f"the {role} label map {seg.name} {seg.shape} is not on the grid of the {role} image "
                f"{img.name} {img.shape}"
            )


def check_overlap(inputs: Inputs) -> None:
    """Without pre-alignment the images must share world space: :class:`UserError` naming both files when their
    boxes do not intersect (a header off by hundreds of mm, or images of different scanners' origins)."""
    (flo, fhi), (mlo, mhi) = inputs.fixed.grid.world_box(), inputs.moving.grid.world_box()
    if np.all(np.maximum(flo, mlo) <= np.minimum(fhi, mhi)):
        return
    gap = float(np.linalg.norm((flo + fhi) / 2 - (mlo + mhi) / 2))
    raise UserError(f"{_called(inputs.moving)} does not overlap {_called(inputs.fixed)} in world space (box centres "
                    f"{gap:.0f} mm apart) and --prealign none keeps it there; use --prealign affine or correct "
                    "the header")


#: The last few pre-alignments, by the content of the pair (:func:`_pair_digest`): a front end that runs another
#: model or refinement on the same pair (the napari widget, a notebook) does not pay the ~2–4 s search again.
_PREALIGN_MEMO: OrderedDict[bytes, np.ndarray] = OrderedDict()
_PREALIGN_MEMO_SIZE = 4
_PREALIGN_LOCK = threading.Lock()


def _pair_digest(inputs: Inputs, method: str) -> bytes:
    """A digest of both images' voxels and voxel→world matrices (BLAKE2, ~50 ms for two 1 mm brains)."""
    h = hashlib.blake2b(method.encode(), digest_size=20)
    for vol in (inputs.fixed, inputs.moving):
        data = np.ascontiguousarray(vol.data)
        h.update(f"{data.dtype.str}{data.shape}".encode())
        h.update(memoryview(data).cast("B"))
        h.update(np.asarray(vol.affine, dtype=np.float64).tobytes())
    return h.digest()


def prealign(inputs: Inputs, method: str, report: Report, should_stop=None) -> np.ndarray | None:
    """The affine pre-alignment (world, pull: fixed point → moving point), or None for ``method='none'``.
    Remembered for the last few pairs (same voxels and matrices give the same search, so its result)."""
    if method == "none":
        return None
    from ..core.prealign import affine_prealign

    key = _pair_digest(inputs, method)
    with _PREALIGN_LOCK:
        if key in _PREALIGN_MEMO:
            _PREALIGN_MEMO.move_to_end(key)
            return _PREALIGN_MEMO[key].copy()
    try:
        result = affine_prealign(inputs.fixed.data, inputs.moving.data, inputs.fixed.affine, inputs.moving.affine,
                                 should_stop=should_stop, progress=lambda _stage, f: report(f))
    except InterruptedError:
        raise Cancelled() from None
    matrix = np.asarray(result.matrix, dtype=np.float64)
    with _PREALIGN_LOCK:
        _PREALIGN_MEMO[key] = matrix.copy()
        while len(_PREALIGN_MEMO) > _PREALIGN_MEMO_SIZE:
            _PREALIGN_MEMO.popitem(last=False)
    return matrix


#: Below this fraction of the fixed brain inside the moving image's field of view, the user is warned.
COVERAGE_WARNING = 0.9


def model_grid(inputs: Inputs, matrix: np.ndarray | None, shape) -> OnModelGrid:
    """Fixed image to the model grid (1 mm, ``shape``, centred on the brain); the moving image (and labels)
    pulled onto it through ``matrix`` from their own grids; intensities scaled to [0, 1]."""
    from ..core.intensity import is_normalized, normalize_intensity
    from .model_grid import to_model_grid

    fixed_m, mapping = to_model_grid(inputs.fixed, shape)
    moving_m = mapping.resample_to_model(inputs.moving, matrix)
    if not is_normalized(moving_m):
        moving_m = normalize_intensity(moving_m)
    if np.count_nonzero(moving_m > 0) < 0.001 * moving_m.size:
        raise UserError("fixed and moving images do not overlap after pre-alignment")
    brain = fixed_m > 0
    covered = mapping.coverage(inputs.moving, brain, matrix)
    if covered < COVERAGE_WARNING:  # a slab or a cropped scan: the rest of the brain is matched against nothing
        warnings.warn(f"{_called(inputs.moving)} covers only {100 * covered:.0f} % of the fixed image's brain: "
                      "the registration outside it is an extrapolation", stacklevel=2)
    _warn_if_mirrored(fixed_m, moving_m, brain, _called(inputs.moving))
    fixed_seg = mapping.to_model(inputs.fixed_seg.data, order=0) if inputs.fixed_seg is not None else None
    moving_seg = mapping.resample_to_model(inputs.moving_seg, matrix) if inputs.moving_seg is not None else None
    return OnModelGrid(mapping, fixed_m, moving_m, fixed_seg, moving_seg, matrix)


#: A moving image that matches the fixed one this much better when mirrored left-right is announced.
MIRROR_MARGIN = 0.005  # real pairs of different brains: as they are 0.009-0.019 above mirrored


def _warn_if_mirrored(fixed_m: np.ndarray, moving_m: np.ndarray, brain: np.ndarray, name: str) -> None:
    """Warn when the moving image correlates better with the fixed one mirrored left-right (model grid axis 0,
    centred on the brain) than as it is: a flipped header or a mirrored file, which no affine fit can undo."""
    if not brain.any():
        return
    f = fixed_m[brain]
    direct = np.corrcoef(f, moving_m[brain])[0, 1]
    mirrored = np.corrcoef(f, moving_m[::-1][brain])[0, 1]
    # only a real match counts (noise and phantoms correlate near 0 either way)
    if np.isfinite(direct) and np.isfinite(mirrored) and mirrored > 0.5 and mirrored > direct + MIRROR_MARGIN:
        warnings.warn(f"{name} matches the fixed image better mirrored left-right (correlation {mirrored:.2f} vs "
                      f"{direct:.2f}): check its header's left-right orientation", stacklevel=3)


def tensors(grid: OnModelGrid, device) -> tuple[Any, Any]:
    """``(fixed, moving)`` as ``1×1×S`` float32 tensors on ``device``."""
    import torch

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)

    return t(grid.fixed), t(grid.moving)


#: How the networks' input intensities are prepared (RegisterOptions.contrast).
CONTRAST_MODES = ("scale", "standardize")


def network_inputs(fixed_t, moving_t, contrast: str) -> tuple[Any, Any]:
    """The pair as the network sees it: as scaled (``'scale'``), or each image's tissue contrast moved to the
    training images' (``'standardize'``, :func:`~napari_unireg.core.intensity.standardize_contrast`)."""
    if contrast == "scale":
        return fixed_t, moving_t
    import torch

    from ..core.intensity import standardize_contrast

    def one(t):
        return torch.from_numpy(standardize_contrast(t[0, 0].cpu().numpy()))[None, None].to(t.device)

    return one(fixed_t), one(moving_t)


def predict(model, fixed_t, moving_t, *, resolution: str, amp: bool, io_lambda: float, io_fold_weight: float,
            report: Report, should_stop=None) -> Field:
    """The network's field on the model grid (``model.net`` wrapped in a
    :class:`~napari_unireg.models.adapter.GridAdapter`), or the classical method's when ``model.net`` is None."""
    import torch

    if model.net is None:
        from ..core.instance_opt import instance_optimise

        disp = instance_optimise(fixed_t, moving_t, steps=CLASSICAL_STEPS, lam=io_lambda, fold_weight=io_fold_weight,
                                 progress=report, should_stop=should_stop)
        return Field(disp)
    from ..models.adapter import GridAdapter

    with torch.inference_mode():
        disp, inverse = GridAdapter(model.net, resolution, amp)(moving_t, fixed_t)
    return Field(disp, inverse)


def refine(field: Field, fixed_t, moving_t, *, steps: int, io_lambda: float, io_fold_weight: float, report: Report,
           should_stop=None) -> Field:
    """Instance optimisation of ``field`` for ``steps`` Adam steps (the field unchanged for 0 steps). The inverse
    is dropped: the refinement breaks exact inverse consistency."""
    if steps <= 0:
        return field
    from ..core.instance_opt import instance_optimise

    disp = instance_optimise(fixed_t, moving_t, init_disp=field.disp, steps=steps, lam=io_lambda,
                             fold_weight=io_fold_weight, progress=report, should_stop=should_stop)
    return Field(disp)


def metrics(grid: OnModelGrid, disp: np.ndarray, inverse: np.ndarray | None) -> dict[str, Any]:
    """Metrics on the model grid (1 mm, the Learn2Reg convention): regularity always, Dice/HD95 with both label
    maps (moving labels alone are warped, not scored), inverse consistency with an inverse field."""
    from ..core.metrics import evaluate_registration, inverse_consistency_error

    both = grid.fixed_seg is not None and grid.moving_seg is not None
    out = evaluate_registration(disp, grid.fixed_seg if both else None, grid.moving_seg if both else None,
                                fixed_image=grid.fixed)
    if inverse is not None:
        out["inverse_consistency"] = inverse_consistency_error(disp, inverse)
    return out


#: Memory model of one CPU registration (bytes), measured with ``/usr/bin/time -v`` on the demo pair (1 mm,
#: 160×224×192) and on its fixed image resampled to 0.5 mm (320×448×384): torch, the network and the model-grid
#: arrays cost a fixed amount; every fixed (native) voxel then holds the fixed image, the outputs (field 12 B,
#: warped image, labels, float32 Jacobian) and, while the files are written in parallel, the ITK field and
#: nibabel's slices; every moving voxel its image and labels.
MEMORY_BASE = 0.75 * 2**30
MEMORY_PER_FIXED_VOXEL = 52
MEMORY_PER_MOVING_VOXEL = 12
#: What a network needs beyond that, by (model, resolution it runs at): the model grid is always 160×224×192, so
#: it does not depend on the images. Measured as the peak RSS of ``unireg register`` on a 1 mm validation pair
#: (``--prealign none``, 2 threads; session 19) minus the estimate above (1.16 GB): at 1 mm dp-vfa peaks at
#: 3.4 GB, dp-convic-c at 4.4 GB; at 2 mm the inverse-consistent variants at 2.1 GB (their composition runs on
#: the 1 mm grid), the others within the estimate. A pair not measured takes the largest value of its resolution.
NETWORK_EXTRA_BYTES = {
    ("dp-vfa", "full"): 2.3 * 2**30, ("dp-convic-c", "full"): 3.3 * 2**30,
    ("dp-convic-c", "half"): 1.0 * 2**30, ("dp-convic-mf", "half"): 1.0 * 2**30,
    ("dp-vfa", "half"): 0, ("dp-conv-mf", "half"): 0, ("dp-conv-mfc", "half"): 0, ("dp-conv-c", "half"): 0,
}


def network_extra_bytes(network: tuple[str, str] | None) -> int:
    """:data:`NETWORK_EXTRA_BYTES` of ``(model, resolution)``; 0 for None (no network in the run)."""
    if network is None:
        return 0
    if network in NETWORK_EXTRA_BYTES:
        return int(NETWORK_EXTRA_BYTES[network])
    same_resolution = [v for (_, res), v in NETWORK_EXTRA_BYTES.items() if res == network[1]]
    return int(max(same_resolution or NETWORK_EXTRA_BYTES.values()))


def estimate_peak_bytes(fixed_shape, moving_shape=None, network: tuple[str, str] | None = None) -> int:
    """Peak resident memory a registration of these shapes needs (bytes, an upper estimate from
    :data:`MEMORY_BASE`, the per-voxel costs and, when ``network`` = ``(model, resolution)`` is given, what that
    network needs: :func:`network_extra_bytes`). The shapes come from the file headers (``nib.load(path).shape``
    reads no data) and the network's resolution from its card, so the estimate is known before anything is
    loaded."""
    n_fixed = int(np.prod([int(n) for n in tuple(fixed_shape)[:3]]))
    n_moving = int(np.prod([int(n) for n in tuple(moving_shape)[:3]])) if moving_shape is not None else n_fixed
    return int(MEMORY_BASE + MEMORY_PER_FIXED_VOXEL * n_fixed + MEMORY_PER_MOVING_VOXEL * n_moving
               + network_extra_bytes(network))


def available_memory_bytes() -> int | None:
    """Memory the kernel can give this process now (``MemAvailable`` of /proc/meminfo, else free pages), or None
    where the platform does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(fixed_shape, moving_shape=None, available: int | None = None,
                 network: tuple[str, str] | None = None) -> str:
    """One line stating the memory a run needs; :class:`UserError` (one line) when the machine cannot hold it.

    ``available`` defaults to :func:`available_memory_bytes` (unknown: the run is allowed); ``network`` is
    ``(model, resolution)`` (:func:`..pipeline.models.network_plan`)."""
    need = estimate_peak_bytes(fixed_shape, moving_shape, network)
    have = available_memory_bytes() if available is None else available
    shape = "×".join(str(int(n)) for n in tuple(fixed_shape)[:3])
    if have is not None and need > have:
        at_1mm = network is not None and network[1] == "full"
        hint = "close other programs, run the network at 2 mm (--resolution half)" if at_1mm else "close other programs"
        raise UserError(f"not enough memory: a {shape} fixed image needs about {need / 2**30:.1f} GB and "
                        f"{have / 2**30:.1f} GB are available; {hint} or resample the fixed image "
                        "to a coarser grid (e.g. 1 mm)")
    avail = f" of {have / 2**30:.1f} GB available" if have is not None else ""
    return f"memory: about {need / 2**30:.1f} GB needed{avail} (fixed grid {shape})"


#: Voxels per slab of the native-grid stage: with :data:`NATIVE_THREADS` slabs in flight its float64 coordinate
#: temporaries (~24 bytes a voxel per array) stay ~25 MB whatever the fixed image's size. Each array (12 MB) is
#: also below glibc's largest heap allocation (32 MB): from the second slab on it reuses freed heap memory, where
#: 2M-voxel slabs (48 MB arrays) were mapped and page-faulted anew for every slab (a 1 mm brain's stage:
#: 0.6-3.9 s with 2M, 0.6-1.0 s with 500k: `bench/napari_speed_s23.md`).
NATIVE_SLAB_VOXELS = 500_000
#: Slabs computed at once: their work is numpy and ``map_coordinates``, which release the GIL.
NATIVE_THREADS = 2


def native_slabs(shape) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges along axis 0 covering ``shape`` in slabs of ≤ ``NATIVE_SLAB_VOXELS``."""
    rows = max(1, NATIVE_SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))
    return [(s, min(s + rows, int(shape[0]))) for s in range(0, int(shape[0]), rows)]


def _field_rows(mapping: GridMapping, disp: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    """Rows ``start:stop`` (native axis 0) of ``mapping.field_to_native(disp)``, bitwise the same values."""
    from ..core.resample import sample_separable

    if mapping.is_identity:
        return np.array(disp[:, rows[0]:rows[1]], dtype=np.float32)
    sampled = sample_separable(np.moveaxis(np.asarray(disp, dtype=np.float32), 0, -1), mapping.scale,
                               mapping.offset, mapping.native_shape, order=1, outside="border", rows=rows)
    v = np.moveaxis(sampled, -1, 0) / mapping.scale.reshape(3, 1, 1, 1).astype(np.float32)
    return np.ascontiguousarray(v, dtype=np.float32)


def native_grid(grid: OnModelGrid, disp: np.ndarray, inverse: np.ndarray | None, inputs: Inputs) -> NativeOutputs:
    """Fixed-grid outputs: the Learn2Reg field w.r.t. the moving image placed on the fixed grid by world
    coordinates (pre-alignment folded in), the moving image/labels sampled once from their own grid, the
    Jacobian determinant.

    Streamed in slabs along axis 0 (:func:`native_slabs`): every voxel's value is computed exactly as for the
    whole grid, while the temporaries stay ~100 MB (a 0.5 mm fixed image would need GBs of float64
    coordinates at once)."""
    from ..core.grid import apply_affine_field
    from ..core.metrics import jacobian_determinant

    fixed = inputs.fixed
    shape = tuple(fixed.shape)
    to_fixed = fixed.grid.voxel_map(fixed.grid, grid.matrix)  # pre-aligned fixed voxel -> fixed voxel
    disp_native = np.empty((3, *shape), dtype=np.float32)
    warped = np.empty(shape, dtype=np.float32)
    seg = inputs.moving_seg
    warped_seg = np.empty(shape, dtype=seg.data.dtype) if seg is not None else None

    def slab(rows: tuple[int, int]) -> None:
        v = _field_rows(grid.mapping, disp, rows)  # native voxels, without the pre-alignment
        ident = np.indices((rows[1] - rows[0], *shape[1:]), dtype=np.float64)
        ident[0] += rows[0]
        fixed_coords = apply_affine_field(to_fixed, ident + v)  # fixed voxel of the moving world point
        del v
        disp_native[:, rows[0]:rows[1]] = fixed_coords - ident
        del ident
        warped[rows[0]:rows[1]] = pull(inputs.moving, fixed, fixed_coords, order=1)
        if seg is not None:
            warped_seg[rows[0]:rows[1]] = pull(seg, fixed, fixed_coords, order=0)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=NATIVE_THREADS) as pool:
        list(pool.map(slab, native_slabs(shape)))  # list(): re-raises a slab's exception
    return NativeOutputs(
        disp=disp_native,
        warped=warped,
        warped_seg=warped_seg,
        jacobian=jacobian_determinant(disp_native, dtype=np.float32, threads=NATIVE_THREADS),  # as written, shown
        inverse=None if inverse is None else grid.mapping.field_to_native(inverse),
    )


def pull(volume, fixed, fixed_coords: np.ndarray, *, order: int) -> np.ndarray:
    """``volume`` (any grid) sampled at ``fixed_coords`` (``3×X×Y×Z`` fixed voxel coordinates of the moving world
    points, i.e. identity + ``disp_native``), by world coordinates: float32 for ``order`` 1, the labels' dtype for
    ``order`` 0; 0 outside ``volume``."""
    from ..core.grid import apply_affine_field
    from ..core.resample import sample_points

    coords = apply_affine_field(fixed.grid.voxel_map(volume.grid), fixed_coords)  # -> this volume's voxels
    out = sample_points(volume.data, coords, order=order, outside="fill")  # nearest keeps the labels' dtype
    return out.astype(volume.data.dtype, copy=False) if order == 0 else out.astype(np.float32, copy=False)
