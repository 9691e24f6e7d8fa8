"""Brain extraction for raw T1 heads: detect whether an image is already brain-extracted, extract it if not.

The registration networks were trained on brain-extracted images; a head with scalp and skull pulls the warp
towards the skin. This module decides per image (``auto``), runs the extractor and returns the masked, scaled
brain plus its mask on the image's own grid. The extractor is `deepbet <https://github.com/wwu-mmll/deepbet>`_
(MIT; TorchScript weights inside its wheel, nothing downloaded at run time), an optional extra:
``pip install 'napari-unireg[skullstrip]'``.

Conventions: arrays are ``X×Y×Z`` in canonical RAS voxel order (as :class:`napari_unireg.io.Volume` holds them),
``affine`` maps voxel indices to RAS millimetres. Masks are ``uint8`` (1 = brain) on the same grid.

Not done: bias-field (N4) correction. deepbet normalises with the 0.5/99.5 percentiles itself, and the
registration scales each brain by its own 99.5 percentile; smooth bias inside the brain is left to the networks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ..errors import UserError

__all__ = [
    "SKULL_STRIP_MODES",
    "MISSING_MESSAGE",
    "looks_brain_extracted",
    "extract_brain",
    "apply_skull_strip",
    "skull_strip_stage",
    "SkullStripResult",
    "warp_with_field",
]

SKULL_STRIP_MODES = ("auto", "on", "off")
MISSING_MESSAGE = "brain extraction needs deepbet: pip install 'napari-unireg[skullstrip]'"

# Detector: measured on the development data (see tests/test_skullstrip.py and benchmarks/skullstrip.py):
# brain-extracted images have 1.3-1.9 l of foreground natively and up to 2.45 l once affinely scaled to MNI space
# (imagesTr); the ICBM head has 4.5 l, a head cropped at the chin still well over 3 l.
MAX_BRAIN_ML = 3000.0
MIN_BRAIN_ML = 300.0  # a mask smaller than this (a newborn's brain is ~400 ml) is a failed extraction
MIN_BACKGROUND = 0.05  # fraction of voxels at the background value: any masked image has far more (≥ 45 %)
MIN_ZERO_SHELL = 0.9  # fraction of the ~2-6 mm shell around the foreground at the background value
MAX_HEAD_COVERAGE = 0.9  # a brain mask covering more of a head's foreground than this has kept the scalp
DETECT_SPACING_MM = 2.0  # the detector works on a ~2 mm subsampled grid (fast, and enough for volumes in ml)
# Intensities relative to the image's bright end (99.5th percentile above the background value):
BACKGROUND_TOL = 0.01  # "at the background value": exact zeros, and the faint ringing of a spline-resampled brain
OBJECT_THRESHOLD = 0.1  # the object (head or brain): air noise of a T1 head stays below this


# --------------------------------------------------------------------------------------------- detection


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _subsample(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every n-th voxel along each axis so the spacing is about DETECT_SPACING_MM; returns (array, spacing mm)."""
    spacing = _spacing(affine)
    step = np.maximum(1, np.round(DETECT_SPACING_MM / spacing)).astype(int)
    return np.asarray(data, dtype=np.float32)[:: step[0], :: step[1], :: step[2]], spacing * step


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of ``mask`` with its cavities filled (ventricles, dark skull inside a scalp)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


class _Layout(NamedTuple):
    """A (subsampled) image split into background and object."""

    near_background: np.ndarray  # bool: within BACKGROUND_TOL of the background value
    object: np.ndarray  # bool: largest component above OBJECT_THRESHOLD, cavities filled


def _layout(x: np.ndarray) -> _Layout:
    """Background value = the median of the array's outer faces (0 for a masked image, the air for a head)."""
    faces = np.concatenate([x[[0, -1]].ravel(), x[:, [0, -1]].ravel(), x[:, :, [0, -1]].ravel()])
    bg = float(np.median(faces))
    bright = float(np.percentile(np.abs(x - bg), 99.5))
    if not bright > 0:
        return _Layout(np.ones(x.shape, bool), np.zeros(x.shape, bool))
    dev = np.abs(x - bg)
    return _Layout(dev <= BACKGROUND_TOL * bright, _largest_filled(dev > OBJECT_THRESHOLD * bright))


def _head_foreground_ml(data: np.ndarray, affine: np.ndarray) -> float:
    x, spacing = _subsample(data, affine)
    return float(np.count_nonzero(_layout(x).object)) * float(np.prod(spacing)) / 1000.0


def looks_brain_extracted(data: np.ndarray, affine: np.ndarray) -> tuple[bool, str]:
    """Whether an image is already brain-extracted, with the reason in words.

    ``data``: ``X×Y×Z`` image (any numeric dtype, any intensity range), ``affine``: voxel -> mm. A brain-extracted
    image is a brain-sized object (≤ MAX_BRAIN_ML, about 140×170×120 mm) surrounded by a constant background
    (zero after masking, give or take the faint ringing of a spline resampling); a head has noise around it, or,
    when its background was zeroed, a head-sized object (scalp, skull, face and neck: > 3 l). Works on a ~2 mm
    subsampled copy (well under a second).
    """
    x, spacing = _subsample(data, affine)
    near_bg, obj = _layout(x)
    n = int(np.count_nonzero(obj))
    if n == 0:
        return False, "no foreground"
    at_bg = float(np.count_nonzero(near_bg)) / x.size
    ml = n * float(np.prod(spacing)) / 1000.0
    idx = np.nonzero(obj)
    extent = [(int(i.max()) - int(i.min()) + 1) * s for i, s in zip(idx, spacing)]
    size = f"{ml:.0f} ml, {extent[0]:.0f}×{extent[1]:.0f}×{extent[2]:.0f} mm"
    if at_bg < MIN_BACKGROUND:
        return False, f"no background ({100 * at_bg:.1f} % of voxels at the background value), foreground {size}"
    if ml > MAX_BRAIN_ML:
        return False, f"foreground of {size}: head-sized (> {MAX_BRAIN_ML:.0f} ml)"
    from scipy import ndimage

    step = max(1, int(round(2.0 / float(spacing.min()))))  # shell from ~2 mm to ~6 mm outside the object
    inner = ndimage.binary_dilation(obj, iterations=step)
    shell = ndimage.binary_dilation(inner, iterations=2 * step) & ~inner
    zero_shell = float(np.mean(near_bg[shell])) if shell.any() else 1.0
    if zero_shell < MIN_ZERO_SHELL:
        return False, (f"foreground of {size}, only {100 * zero_shell:.0f} % of its surroundings at the background "
                       "value (noise or scalp around it)")
    return True, f"brain-sized foreground ({size}) on a constant background ({100 * at_bg:.0f} % of voxels)"


# --------------------------------------------------------------------------------------------- extraction


def _resolve_device(device: Any):
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device or "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} is not available for brain extraction (no CUDA)")
    return torch.device(name)


@functools.lru_cache(maxsize=2)
def _extractor(device_name: str):
    """deepbet's two TorchScript models (bounding box at 128³, mask at 256³) on ``device_name``, loaded once."""
    try:
        from deepbet import BrainExtraction
    except ImportError:
        raise UserError(MISSING_MESSAGE) from None
    import torch

    bet = BrainExtraction(no_gpu=True)  # loads on the CPU; moved to the asked device below
    bet.model.to(torch.device(device_name))
    bet.bbox_model.to(torch.device(device_name))
    return bet


def _run_deepbet(data: np.ndarray, affine: np.ndarray, device: str) -> np.ndarray:
    """deepbet's mask (bool, same grid) of a canonical RAS array: its own resampling, largest component, filled."""
    import nibabel as nib

    bet = _extractor(device)
    x = np.ascontiguousarray(data, dtype=np.float32)
    try:
        _brain, mask_img, _tiv = bet.run(nib.Nifti1Image(x, np.asarray(affine, dtype=np.float64)))
    except AssertionError:  # deepbet asserts when its bounding-box model finds nothing
        raise UserError("no brain found (deepbet found no head to put a bounding box on)") from None
    except ValueError:  # keep_largest_connected_component of an empty mask: argmax of an empty bincount
        raise UserError("no brain found (deepbet's mask is empty)") from None
    return np.asarray(mask_img.dataobj) > 0


def extract_brain(
    data: np.ndarray, affine: np.ndarray, *, device: Any = "cpu", name: str = "image", expect_head: bool = True
) -> np.ndarray:
    """Brain mask of an ``X×Y×Z`` canonical RAS image (``uint8``, 1 = brain, same grid) by deepbet.

    Checks the mask: fewer than MIN_BRAIN_ML ml -> no brain found; more than MAX_BRAIN_ML ml, or (when
    ``expect_head``) more than MAX_HEAD_COVERAGE of the head's foreground -> the extraction kept the head.
    Each raises :class:`UserError` naming ``name``. ``expect_head=False`` for an image that is already a brain
    (extracting it again keeps nearly all of it by design). ``device``: "cpu", "cuda[:N]", "auto" or a torch.device.
    Raises UserError(MISSING_MESSAGE) when deepbet is not installed.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise UserError(f"{name}: brain extraction needs a 3D image, not shape {data.shape}")
    dev = _resolve_device(device)
    try:
        mask = _run_deepbet(data, affine, str(dev))
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from None
    voxel_ml = float(np.prod(_spacing(affine))) / 1000.0
    ml = float(np.count_nonzero(mask)) * voxel_ml
    if ml < MIN_BRAIN_ML:
        raise UserError(
            f"{name}: no brain found (the extracted mask is {ml:.0f} ml, < {MIN_BRAIN_ML:.0f} ml); "
            "is it a T1-weighted head MRI with correct voxel sizes?"
        )
    if ml > MAX_BRAIN_ML:
        raise UserError(
            f"{name}: brain extraction failed (the mask is {ml:.0f} ml, > {MAX_BRAIN_ML:.0f} ml: it covers the head); "
            "use --skull-strip off if the image is already a brain"
        )
    if expect_head:
        head_ml = _head_foreground_ml(data, affine)
        if head_ml > 0 and ml > MAX_HEAD_COVERAGE * head_ml:
            raise UserError(
                f"{name}: brain extraction failed (the mask covers {100 * ml / head_ml:.0f} % of the head, "
                f"{ml:.0f} of {head_ml:.0f} ml); use --skull-strip off if the image is already a brain"
            )
    return mask.astype(np.uint8)


def _normalize_intensity(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from ..core.intensity import normalize_intensity

    return normalize_intensity(data, mask=mask)


def apply_skull_strip(volume_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The brain alone, scaled for registration: float32 ``X×Y×Z`` in [0, 1], exactly 0 outside ``mask``.

    Raw scanner values (int16/uint16 ranges, negative offsets, bright outliers such as vessels or fat at the
    mask's edge) are handled by the data protocol's scaling restricted to the brain: clip to [0, p99.5 of the
    brain], divide. ``mask`` (any dtype, nonzero = brain) must have the image's shape.
    """
    x = np.asarray(volume_data, dtype=np.float32)
    m = np.asarray(mask) != 0
    if m.shape != x.shape:
        raise UserError(f"brain mask shape {m.shape} does not match the image {x.shape}")
    if not m.any():
        raise UserError("the brain mask is empty")
    return _normalize_intensity(np.where(m, x, np.float32(0)), m)


# --------------------------------------------------------------------------------------------- pipeline stage


class SkullStripResult(NamedTuple):
    """What :func:`skull_strip_stage` returns (a tuple: unpack it or use the names)."""

    fixed: Any  # Volume: the brain (scaled, 0 outside) or the input unchanged
    moving: Any
    fixed_mask: Any  # Volume (uint8 label map on the fixed grid) when a brain was extracted, else None
    moving_mask: Any
    messages: list[str]


def _decide(volume, mode: str) -> tuple[bool, bool, str]:
    """``(extract, already_done, reason)``: whether ``mode`` sends ``volume`` to the extractor, and why."""
    if mode == "off":
        return False, False, "skull stripping off"
    if mode == "auto":  # a phantom or a cropped patch is no head: never send it to the extractor unasked
        ml = _head_foreground_ml(volume.data, volume.affine)
        if ml < MIN_BRAIN_ML:
            return False, False, f"{ml:.0f} ml of foreground, too small for a brain or head: left as is"
    done, reason = looks_brain_extracted(volume.data, volume.affine)
    if mode == "auto" and done:
        return False, True, f"already brain-extracted ({reason})"
    return True, done, reason


def needs_extraction(volume, mode: str) -> bool:
    """Whether :func:`skull_strip_stage` would run the extractor on ``volume`` (cheap: no network)."""
    return _decide(volume, mode)[0]


def _strip_one(volume, role: str, mode: str, device: Any) -> tuple[Any, Any, str]:
    extract, done, reason = _decide(volume, mode)
    if not extract:
        return volume, None, f"{role}: {reason}"
    label = f"{role} image {volume.name!r}"
    mask = extract_brain(volume.data, volume.affine, device=device, name=label, expect_head=not done)
    brain = apply_skull_strip(volume.data, mask)
    ml = float(np.count_nonzero(mask)) * float(np.prod(volume.spacing)) / 1000.0
    if done:  # mode == "on" on a brain: do it as asked, and say what it kept
        kept = 100.0 * ml / max(_head_foreground_ml(volume.data, volume.affine), 1e-9)
        message = (f"{role}: already brain-extracted ({reason}); extracted again as asked "
                   f"(mask {ml:.0f} ml, {min(kept, 100.0):.0f} % of the foreground)")
    else:
        message = f"{role}: skull found ({reason}) → brain extracted ({ml:.0f} ml)"
    return (volume.with_data(brain, is_label=False),
            volume.with_data(mask, is_label=True, name=f"{volume.name} brain mask"),
            message)


def skull_strip_stage(fixed, moving, mode: str = "auto", device: Any = "cpu") -> SkullStripResult:
    """Brain-extract the images that need it before registration.

    ``fixed``/``moving``: :class:`napari_unireg.io.Volume` images (canonical RAS). ``mode``: ``"auto"`` (extract
    the images that are not already brain-extracted, see :func:`looks_brain_extracted`), ``"on"`` (extract both,
    even a brain) or ``"off"`` (return them unchanged). Returns new Volumes (same grid and header; the inputs are
    not modified), each mask as a uint8 label Volume on its image's grid or None when nothing was extracted, and
    one message per image saying what was decided and why. Raises :class:`UserError` (one line, naming the
    image) when deepbet is missing or the extraction fails.
    """
    if mode not in SKULL_STRIP_MODES:
        raise UserError(f"skull stripping must be one of {', '.join(SKULL_STRIP_MODES)}, not {mode!r}")
    fixed_out, fixed_mask, fixed_msg = _strip_one(fixed, "fixed", mode, device)
    moving_out, moving_mask, moving_msg = _strip_one(moving, "moving", mode, device)
    return SkullStripResult(fixed_out, moving_out, fixed_mask, moving_mask, [fixed_msg, moving_msg])


def warp_with_field(moving, fixed, disp_native: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Pull another moving image (e.g. the full head) through a registration's fixed-grid field.

    ``disp_native``: ``3×X×Y×Z`` on the fixed canonical grid in fixed voxel units, as
    ``RegistrationResult.disp_native`` (pre-alignment folded in, moving placed by world coordinates). ``moving``
    may be on any grid (its own affine is used), e.g. the head the brain was extracted from. ``order``: 1 linear
    (images), 0 nearest (labels). Returns an ``X×Y×Z`` array on the fixed grid (float32, or the labels' dtype),
    0 outside the moving image.
    """
    from .stages import pull

    d = np.asarray(disp_native, dtype=np.float64)
    if d.shape != (3, *fixed.shape):
        raise UserError(f"displacement field {d.shape} does not match the fixed grid (3, {fixed.shape})")
    return pull(moving, fixed, np.indices(fixed.shape, dtype=np.float64) + d, order=order)
