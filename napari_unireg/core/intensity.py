"""Intensity scaling and integer crop/pad of numpy volumes (the model-grid preparation's pure parts)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

__all__ = ["MODEL_SHAPE", "normalize_intensity", "is_normalized", "tissue_means", "standardize_contrast",
           "T1_TISSUE_MEANS", "CropPad", "foreground_bbox", "crop_or_pad", "apply_window", "undo_crop_or_pad"]

#: The networks' grid (1 mm RAS, the Learn2Reg/LUMIR box): written once, used everywhere.
MODEL_SHAPE = (160, 224, 192)


def normalize_intensity(data: np.ndarray, mask: np.ndarray | None = None, pmax: float = 99.5) -> np.ndarray:
    """Scale an image to [0, 1]: clip to ``[0, p]`` with ``p`` the ``pmax`` percentile of the foreground, divide.

    This is the data README's protocol (foreground = ``mask``, else voxels > 0; 0 outside the foreground).
    Raw scanner ranges (e.g. 0–4095) need nothing special. Negative values: a constant negative background
    (the minimum value covering ≥ 5 % of the volume, e.g. −1024) is shifted to 0 first; scattered negative
    values (interpolation ringing, noise) are clipped to 0. Returns float32.
    """
    x = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise UserError("the image contains NaN or infinite values")
    if mask is None:
        lo = float(x.min())
        if lo < 0 and np.count_nonzero(x == lo) >= 0.05 * x.size:
            x = x - lo
        mask = x > 0
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != x.shape:
            raise UserError(f"mask shape {mask.shape} does not match the image {x.shape}")
    fg = x[mask]
    if fg.size == 0:
        raise UserError("the image has no foreground (no voxel above 0): nothing to normalise")
    p = float(np.percentile(fg, pmax))
    if not p > 0:
        raise UserError(f"the image's {pmax} percentile of the foreground is {p:g}: cannot scale it to [0, 1]")
    out = np.clip(x, 0, p) / np.float32(p)
    out[~mask] = 0
    return out.astype(np.float32, copy=False)


def is_normalized(data: np.ndarray, pmax: float = 99.5) -> bool:
    """True when ``data`` is already scaled to [0, 1] like :func:`normalize_intensity` would scale it.

    Values in [0, 1] and the ``pmax`` percentile of the voxels > 0 at least 0.95 (a min–max scaled image with
    bright outliers, whose brain sits far below 1, does not pass).
    """
    x = np.asarray(data)
    if x.dtype.kind != "f" or x.min() < 0 or x.max() > 1:
        return False
    fg = x[x > 0]
    return fg.size > 0 and float(np.percentile(fg, pmax)) >= 0.95


#: CSF, grey and white-matter means (:func:`tissue_means`): the median over the 14 training images of the data set
#: on the model grid, scaled like every model input (:func:`normalize_intensity`): the contrast the networks were
#: trained on. ``tests/test_contrast.py`` recomputes them from the data when it is present.
T1_TISSUE_MEANS = (0.327, 0.732, 0.976)


#: Intensities at or below this are left out of the tissue fit (mask rims, edited-out voxels).
LOW = 0.05


def tissue_means(data: np.ndarray, classes: int = 3, bins: int = 256, iterations: int = 60) -> tuple[float, ...] | None:
    """Means of a ``classes``-Gaussian mixture fitted (EM on a ``bins``-bin histogram) to the foreground (> 0) of
    an image scaled to [0, 1], in increasing order; None when the fit is degenerate (a class with < 2 % of the
    voxels, or two means closer than 0.05). Voxels at the clipping level (≥ 0.999) are left out: the percentile
    clip of :func:`normalize_intensity` piles them up in one bin; so are the faintest (≤ ``LOW``): the rim of a
    brain mask and the zeroed voxels of an edited one, which are no tissue.

    EM on the histogram rather than on the voxels (scikit-learn's mixture would be a new dependency for 256
    points): milliseconds per image. Class *means* rather than percentiles: they do not move when the tissue
    proportions do (an atrophied brain has more CSF and thinner cortex, which shifts every percentile but not what
    CSF, grey and white matter look like).
    """
    x = np.asarray(data, dtype=np.float32)
    v = x[(x > LOW) & (x < 0.999)]
    if v.size < 100 * classes:
        return None
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    centre = 0.5 * (edges[:-1] + edges[1:])
    weight = hist.astype(np.float64)
    cdf = np.cumsum(weight) / weight.sum()
    mu = np.interp((np.arange(classes) + 0.5) / classes, cdf, centre)  # start at the quantiles of equal classes
    sd = np.full(classes, 0.1)
    pi = np.full(classes, 1.0 / classes)
    for _ in range(iterations):
        logp = -0.5 * ((centre[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
        logp -= logp.max(axis=1, keepdims=True)
        r = np.exp(logp)
        r *= weight[:, None] / r.sum(axis=1, keepdims=True)
        n = r.sum(axis=0) + 1e-12
        mu = (r * centre[:, None]).sum(axis=0) / n
        sd = np.maximum(np.sqrt((r * (centre[:, None] - mu) ** 2).sum(axis=0) / n), 1.0 / bins)
        pi = n / n.sum()
    order = np.argsort(mu)
    mu, pi = mu[order], pi[order]
    if pi.min() < 0.02 or np.diff(mu).min() < 0.05:
        return None
    return tuple(float(m) for m in mu)


def standardize_contrast(data: np.ndarray, reference: Sequence[float] = T1_TISSUE_MEANS) -> np.ndarray:
    """Map an image scaled to [0, 1] so that its tissue means (:func:`tissue_means`) land on ``reference``:
    piecewise linear through ``(0, 0)``, the means, and ``(1, 1)``; monotone, background (0) kept at 0.

    What another scanner or sequence changes most in a T1 image is the contrast mapping between the tissues
    (`benchmarks/robustness.py`: a gamma of 0.6/1.6 costs the 2 mm dp-vfa three times what a bias field or thick
    slices do), which the networks learnt from their training images; the classical NCC methods barely notice it.
    An image whose fit is degenerate is returned unchanged.
    """
    x = np.asarray(data, dtype=np.float32)
    means = tissue_means(x)
    if means is None or len(means) != len(reference) or means[-1] >= 1.0:
        return x
    knots = np.concatenate([[0.0], means, [1.0]])
    values = np.concatenate([[0.0], np.asarray(reference, dtype=np.float64), [1.0]])
    return np.interp(x, knots, values).astype(np.float32)


@dataclass(frozen=True)
class CropPad:
    """Integer window of a crop/pad: ``out[q] = in[q + start]`` (``start`` < 0 means padding before)."""

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    start: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return self.in_shape == self.out_shape and not any(self.start)


def foreground_bbox(array: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive ``(lo, hi)`` voxel indices of ``array > threshold``, or None when there is no foreground."""
    fg = np.asarray(array) > threshold
    if fg.ndim > 3:
        fg = fg.reshape(fg.shape[:3] + (-1,)).any(axis=-1)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        if idx.size == 0:
            return None
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.asarray(lo), np.asarray(hi)


def _window_starts(in_shape, out_shape, bbox) -> tuple[int, int, int]:
    starts = []
    for axis, (n, s) in enumerate(zip(in_shape, out_shape)):
        if bbox is None:
            lo, hi = 0, n - 1
        else:
            lo, hi = int(bbox[0][axis]), int(bbox[1][axis])
        if n == s and hi - lo + 1 <= s:
            starts.append(0)  # already the right size and everything fits: keep it (exact identity)
            continue
        start = int(np.floor((lo + hi) / 2 - (s - 1) / 2 + 0.5))
        if hi - lo + 1 <= s:
            start = min(max(start, hi - s + 1), lo)  # the whole foreground stays inside the window
        starts.append(start)
    return tuple(starts)


def crop_or_pad(
    array: np.ndarray, shape: Sequence[int] = MODEL_SHAPE, *, foreground: np.ndarray | None = None, fill: float = 0
) -> tuple[np.ndarray, CropPad]:
    """Crop and/or pad the first three axes of ``array`` to ``shape``, centred on the brain bounding box.

    The brain is ``foreground > 0`` (default: ``array > 0``). Along an axis that already has the target length
    and holds the whole brain nothing moves. Otherwise the window is centred on the bounding box and shifted so
    the whole brain stays inside when it fits (a warning is raised when it cannot fit). Returns the new array
    and the :class:`CropPad` record for :func:`undo_crop_or_pad`.
    """
    shape = tuple(int(s) for s in shape)
    in_shape = tuple(int(s) for s in array.shape[:3])
    bbox = foreground_bbox(array if foreground is None else foreground)
    start = _window_starts(in_shape, shape, bbox)
    if bbox is not None:
        size = bbox[1] - bbox[0] + 1
        if np.any(size > np.asarray(shape)):
            warnings.warn(
                f"the brain ({tuple(int(s) for s in size)} voxels) is larger than the model grid {shape}: "
                "its edges are cropped",
                stacklevel=2,
            )
    record = CropPad(in_shape, shape, start)
    return apply_window(array, record.start, shape, fill), record


def apply_window(array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill: float) -> np.ndarray:
    """``out[q] = array[q + start]`` inside ``array``, ``fill`` elsewhere (integer window, exact)."""
    in_shape = array.shape[:3]
    if tuple(in_shape) == tuple(shape) and not any(start):
        return array
    out = np.full(tuple(shape) + array.shape[3:], fill, dtype=array.dtype)
    src, dst = [], []
    for n, s, a in zip(in_shape, shape, start):
        lo, hi = max(a, 0), min(a + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[tuple(dst)] = array[tuple(src)]
    return out


def undo_crop_or_pad(array: np.ndarray, record: CropPad, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: put ``array`` (``record.out_shape``) back on the original grid."""
    if tuple(array.shape[:3]) != record.out_shape:
        raise UserError(f"array of shape {tuple(array.shape)} does not match the crop record {record.out_shape}")
    return apply_window(array, tuple(-a for a in record.start), record.in_shape, fill)
