"""Intensity-based affine pre-alignment of two brains in world (RAS mm) coordinates (torch, CPU friendly).

The networks only correct residual non-linear differences, so two native scans (different people, scanners,
orientations and voxel sizes) are first brought into affine correspondence:

1. both images are scaled to [0, 1] (:func:`~napari_unireg.core.intensity.normalize_intensity`) and averaged down to
   isotropic pyramid levels (default 6, 4 and 2 mm);
2. initialisation: the centres of mass coincide and an isotropic scale matches the brains' second moments;
3. a 12-parameter affine ``y = A·(x − c_f) + c_m + t`` (``x`` fixed world point, ``y`` moving world point,
   ``c_f``/``c_m`` the centres of mass) maximises the global normalised cross-correlation of the fixed image and
   the resampled moving image over the fixed brain's bounding box (background included, which also rewards the
   brain outlines to match), with Adam, coarse to fine;
4. the result is checked: if the two brains barely overlap afterwards, :class:`UserError`.

Convention of the result (:class:`AffineResult`): ``matrix`` is the 4×4 **pull** transform in RAS mm, fixed
world point ``x`` → moving world point ``matrix @ x``, i.e. ``warped(x) = moving(matrix·x)``; it composes with
a pull displacement ``d`` (world mm, on the fixed grid) as ``x → matrix·(x + d(x))``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .grid import voxel_map
from .intensity import normalize_intensity
from .resample import resample_affine

__all__ = ["AffineResult", "affine_prealign", "mask_overlap"]

MIN_OVERLAP = 0.5
LR_LIN = 1e-2  # Adam step of the linear part at 4 mm (scaled with the level spacing)
LR_TRANS = 1.0  # Adam step of the translation (mm) at 2 mm (scaled with the level spacing)


@dataclass
class AffineResult:
    """Outcome of :func:`affine_prealign` (see the module docstring for the convention of ``matrix``)."""

    matrix: np.ndarray
    fixed_shape: tuple[int, int, int]
    fixed_affine: np.ndarray
    moving_shape: tuple[int, int, int]
    moving_affine: np.ndarray
    ncc: float = float("nan")
    overlap: float = float("nan")
    seconds: float = 0.0
    history: list = field(default_factory=list)

    def voxel_matrix(self, affine: np.ndarray | None = None) -> np.ndarray:
        """4×4 matrix from a voxel of the target grid (default: the fixed grid) to a moving voxel."""
        target = self.fixed_affine if affine is None else np.asarray(affine, dtype=np.float64)
        return voxel_map(target, self.moving_affine, self.matrix)

    def resample(
        self,
        moving: np.ndarray,
        order: int = 1,
        shape: Sequence[int] | None = None,
        affine: np.ndarray | None = None,
        fill: float = 0.0,
    ) -> np.ndarray:
        """The moving array (on its grid) pulled onto the fixed grid, or onto (``shape``, ``affine``) if given.

        ``order=1`` linear for images, ``order=0`` nearest for label maps (dtype kept); ``fill`` outside.
        """
        moving = np.asarray(moving)
        if tuple(moving.shape[:3]) != tuple(self.moving_shape):
            raise UserError(f"array of shape {moving.shape} does not match the moving grid {self.moving_shape}")
        if (shape is None) != (affine is None):
            raise ValueError("give both shape and affine, or neither")
        out_shape = self.fixed_shape if shape is None else tuple(int(s) for s in shape)
        return resample_affine(moving, self.voxel_matrix(affine=affine), out_shape, order=order, fill=fill)

    def resample_labels(
        self, labels: np.ndarray, shape: Sequence[int] | None = None, affine: np.ndarray | None = None
    ) -> np.ndarray:
        """Nearest-neighbour version of :meth:`resample` for label maps (0 outside)."""
        return self.resample(labels, order=0, shape=shape, affine=affine, fill=0)

    def inverse_matrix(self) -> np.ndarray:
        """Moving world point → fixed world point."""
        return np.linalg.inv(self.matrix)

    def compose(
        self, disp: np.ndarray | None = None, shape: Sequence[int] | None = None, affine: np.ndarray | None = None
    ) -> np.ndarray:
        """The whole mapping ``affine ∘ (id + disp)`` as a displacement in voxel units of a grid (``3×S``).

        ``disp`` (``3×S``, voxel units of the grid, pull; None = 0) is applied first, then this affine: grid voxel
        ``p`` maps to the moving world point ``matrix·A·(p + disp(p))`` and the result ``w`` satisfies
        ``A·(p + w(p)) = that point`` (``A`` = the grid's affine, default the fixed grid). Ready for
        :func:`napari_unireg.io.save_disp_itk` with ``A``.
        """
        a = self.fixed_affine if affine is None else np.asarray(affine, dtype=np.float64)
        if disp is not None:
            disp = np.asarray(disp, dtype=np.float32)
            shape = disp.shape[1:]
        shape = self.fixed_shape if shape is None else tuple(int(s) for s in shape)
        m = voxel_map(a, a, self.matrix)  # grid voxel → grid voxel coordinates of the moving point
        axes = [np.arange(n, dtype=np.float64) for n in shape]
        out = np.empty((3, *shape), dtype=np.float32)
        for c in range(3):
            # Σ_k m[c,k]·p_k + m[c,3] − p_c, built from 1D pieces (no 3×S coordinate array).
            base = m[c, 3] + sum(
                (m[c, k] - (k == c)) * axes[k].reshape([-1 if j == k else 1 for j in range(3)]) for k in range(3)
            )
            out[c] = base
            if disp is not None:
                out[c] += sum(np.float32(m[c, k]) * disp[k] for k in range(3))
        return out


# --------------------------------------------------------------------------------------------- helpers


def _level(data, affine: np.ndarray, spacing: float):
    """Area-average ``data`` (torch 3D) to about ``spacing`` mm isotropic; returns (tensor, affine)."""
    import torch
    import torch.nn.functional as F

    sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = np.asarray(data.shape, dtype=np.float64)
    new = np.maximum(np.round(shape * sp / spacing), 2).astype(int)
    if np.all(new >= shape):
        return data, affine
    new = np.minimum(new, shape.astype(int))
    out = F.interpolate(data[None, None], size=tuple(int(n) for n in new), mode="area")[0, 0]
    ratio = shape / new
    s = np.diag([*ratio, 1.0])
    s[:3, 3] = 0.5 * ratio - 0.5  # new voxel j covers old voxels [j·r, (j+1)·r): centre (j + 0.5)·r − 0.5
    return out.contiguous().to(torch.float32), affine @ s


def _world_points(shape, affine: np.ndarray, lo, hi):
    """World coordinates (N×3 float64) of the voxels in the inclusive box ``lo..hi``."""
    axes = [np.arange(lo[i], hi[i] + 1) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    return grid @ affine[:3, :3].T + affine[:3, 3], grid.astype(np.int64)


def _moments(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Intensity centre of mass (world mm), covariance (mm²) and total mass of a non-negative image."""
    w = np.asarray(data, dtype=np.float64)
    total = w.sum()
    idx = np.indices(w.shape, dtype=np.float64).reshape(3, -1)
    flat = w.reshape(-1)
    keep = flat > 0
    idx, flat = idx[:, keep], flat[keep]
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    com = (world * flat).sum(axis=1) / total
    centred = world - com[:, None]
    cov = (centred * flat) @ centred.T / total
    return com, cov, float(total)


def _trilinear_with_grad(flat, shape, vox):
    """Trilinear value and its gradient with respect to the voxel position, 0 outside the volume.

    ``flat`` is the volume raveled (C order) with ``shape``; ``vox`` N×3 voxel positions. Returns (N, 3×N). One
    gather of the 8 corners serves both: several times cheaper on a CPU than grid_sample's backward pass, and
    the exact gradient of the interpolant the loss sees.
    """
    import torch

    dims = torch.tensor(shape, dtype=vox.dtype)
    inside = ((vox >= 0) & (vox <= dims - 1)).all(dim=1)
    i0 = torch.minimum(vox.clamp(min=0).floor(), dims - 2).clamp(min=0)
    f = (vox - i0).clamp(0, 1)
    i0 = i0.long()
    s1, s2 = shape[1] * shape[2], shape[2]
    base = i0[:, 0] * s1 + i0[:, 1] * s2 + i0[:, 2]
    offs = torch.tensor([0, 1, s2, s2 + 1, s1, s1 + 1, s1 + s2, s1 + s2 + 1], dtype=base.dtype)
    c = flat[base[:, None] + offs].T  # 8×N: c000 c001 c010 c011 c100 c101 c110 c111 (bits = axis 0, 1, 2)
    f0, f1, f2 = f[:, 0], f[:, 1], f[:, 2]
    c00 = torch.lerp(c[0], c[1], f2)
    c01 = torch.lerp(c[2], c[3], f2)
    c10 = torch.lerp(c[4], c[5], f2)
    c11 = torch.lerp(c[6], c[7], f2)
    c0 = torch.lerp(c00, c01, f1)
    c1 = torch.lerp(c10, c11, f1)
    value = torch.lerp(c0, c1, f0)
    g0 = c1 - c0
    g1 = torch.lerp(c01 - c00, c11 - c10, f0)
    g2 = torch.lerp(torch.lerp(c[1] - c[0], c[3] - c[2], f1), torch.lerp(c[5] - c[4], c[7] - c[6], f1), f0)
    m = inside.to(value.dtype)
    return value * m, torch.stack([g0, g1, g2]) * m


def _ncc_and_grad(a, b):
    """Global NCC of two vectors and its gradient with respect to ``b``."""
    import torch

    a = a - a.mean()
    b = b - b.mean()
    na = torch.sqrt((a * a).sum()) + 1e-8
    nb = torch.sqrt((b * b).sum()) + 1e-8
    ncc = (a * b).sum() / (na * nb)
    # The mean subtraction drops out of the gradient because both centred vectors sum to zero.
    return ncc, a / (na * nb) - ncc * b / (nb * nb)


class _Adam:
    """Adam with a cosine-decayed step size on a few in-place tensors (torch.optim's import costs seconds)."""

    def __init__(self, params_lr, n_steps: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p, _ in params_lr]
        self.lrs = [lr for _, lr in params_lr]
        self.m = [p.new_zeros(p.shape) for p in self.params]
        self.v = [p.new_zeros(p.shape) for p in self.params]
        self.n_steps, self.betas, self.eps, self.t = max(n_steps, 1), betas, eps, 0

    def step(self, grads) -> None:
        b1, b2 = self.betas
        decay = 0.5 * (1 + np.cos(np.pi * self.t / self.n_steps))
        self.t += 1
        for p, lr, m, v, g in zip(self.params, self.lrs, self.m, self.v, grads):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            p.sub_(lr * decay * m_hat / (v_hat.sqrt() + self.eps))


def mask_overlap(fixed_mask: np.ndarray, moving_mask_on_fixed: np.ndarray) -> float:
    """|F ∩ M| / min(|F|, |M|) of two boolean masks on the same grid (1 = the smaller one fully covered)."""
    f = np.asarray(fixed_mask, dtype=bool)
    m = np.asarray(moving_mask_on_fixed, dtype=bool)
    smaller = min(int(f.sum()), int(m.sum()))
    return float((f & m).sum()) / smaller if smaller else 0.0


@contextmanager
def _torch_threads(n: int):
    """Run with ``n`` intra-op threads, then restore. The loop works on ~40k-element vectors: extra threads
    gain nothing there and, on a busy machine, their spin-waiting made it 10× slower (measured)."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- main entry


def affine_prealign(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    *,
    levels: Sequence[float] = (6.0, 4.0, 2.0),
    iterations: Sequence[int] = (150, 100, 60),
    init: str = "moments",
    max_points: int = 40_000,
    min_overlap: float = MIN_OVERLAP,
    seed: int = 0,
    threads: int = 1,
    progress: Callable[[str, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AffineResult:
    """Register ``moving`` to ``fixed`` (both canonical RAS arrays with their voxel → RAS mm affines).

    ``levels``: pyramid spacings in mm with ``iterations`` Adam steps each. ``init``: ``'moments'`` (centres of
    mass + isotropic scale from the second moments), ``'com'`` (centres of mass only) or ``'none'`` (identity
    in world coordinates: the scanners' coordinates are trusted). ``max_points``: at most this many voxels of
    the fixed brain's box, drawn at random each step, enter the loss (speed; all of them on small levels).
    ``threads``: torch intra-op threads during the call (restored afterwards; 0 keeps the current setting).
    Capture range: about ±45° of rotation between the two heads (measured), any translation with ``init``
    other than ``'none'``. Raises :class:`UserError` when an image has no foreground or the aligned brains
    overlap less than ``min_overlap`` (see :func:`mask_overlap`). ``should_stop()`` returning True aborts with
    :class:`InterruptedError`. Typical cost: 2–3 s of one CPU core for two 256³ 1 mm brains.
    """
    with _torch_threads(threads):
        return _affine_prealign(
            fixed, moving, fixed_affine, moving_affine, levels=levels, iterations=iterations, init=init,
            max_points=max_points, min_overlap=min_overlap, seed=seed, progress=progress, should_stop=should_stop,
        )


def _affine_prealign(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    *,
    levels: Sequence[float],
    iterations: Sequence[int],
    init: str,
    max_points: int,
    min_overlap: float,
    seed: int,
    progress: Callable[[str, float], None] | None,
    should_stop: Callable[[], bool] | None,
) -> AffineResult:
    import torch

    t0 = time.perf_counter()
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    if len(levels) != len(iterations):
        raise ValueError("levels and iterations must have the same length")
    if init not in ("moments", "com", "none"):
        raise ValueError(f"init must be 'moments', 'com' or 'none', not {init!r}")
    try:
        fix = normalize_intensity(fixed)
    except UserError as exc:
        raise UserError(f"fixed image: {exc}") from None
    try:
        mov = normalize_intensity(moving)
    except UserError as exc:
        raise UserError(f"moving image: {exc}") from None

    gen = torch.Generator().manual_seed(seed)
    fix_t = torch.from_numpy(fix)
    mov_t = torch.from_numpy(mov)

    # Initialisation from the coarsest level (moments of a 6 mm image are as good as full resolution, 100× faster).
    f0, fa0 = _level(fix_t, fixed_affine, max(levels))
    m0, ma0 = _level(mov_t, moving_affine, max(levels))
    com_f, cov_f, _ = _moments(f0.numpy(), fa0)
    com_m, cov_m, _ = _moments(m0.numpy(), ma0)
    lin0 = np.eye(3)
    if init == "moments":
        scale = (np.linalg.det(cov_m) / max(np.linalg.det(cov_f), 1e-12)) ** (1.0 / 6.0)
        lin0 = np.eye(3) * float(np.clip(scale, 0.5, 2.0))
    if init == "none":  # y = x: trust the scanners' world coordinates
        com_m = com_f.copy()
    centre_f = torch.tensor(com_f, dtype=torch.float32)
    centre_m = torch.tensor(com_m, dtype=torch.float32)
    lin = torch.tensor(lin0, dtype=torch.float32)
    trans = torch.zeros(3, dtype=torch.float32)

    history: list[tuple[float, int, int, float, float]] = []  # spacing, steps, points/step, NCC, seconds
    total_steps = max(sum(iterations), 1)
    done = 0
    last_ncc = float("nan")
    for spacing, n_iter in zip(levels, iterations):
        t_level = time.perf_counter()
        f_l, fa_l = _level(fix_t, fixed_affine, spacing)
        m_l, ma_l = _level(mov_t, moving_affine, spacing)
        fg = (f_l > 0.05).numpy()
        if not fg.any():
            raise UserError("fixed image: no foreground left after downsampling")
        nz = np.argwhere(fg)
        margin = max(1, int(round(8.0 / spacing)))
        lo = np.maximum(nz.min(0) - margin, 0)
        hi = np.minimum(nz.max(0) + margin, np.asarray(f_l.shape) - 1)
        pts_np, idx = _world_points(f_l.shape, fa_l, lo, hi)
        pts = torch.from_numpy(pts_np.astype(np.float32)) - centre_f
        fvals = f_l[idx[:, 0], idx[:, 1], idx[:, 2]]
        inv_m = torch.from_numpy(np.linalg.inv(ma_l).astype(np.float32))
        n_pts = pts.shape[0]
        n_sample = min(n_pts, int(max_points))

        # No autograd: the trilinear interpolant's gradient and the NCC gradient are analytic (much cheaper on a
        # CPU than backpropagating through grid_sample).
        m_flat = m_l.reshape(-1).contiguous()
        m_shape = tuple(m_l.shape)
        inv_lin, inv_off = inv_m[:3, :3], inv_m[:3, 3]
        # Translation in mm and the linear part (dimensionless) need different step sizes.
        opt = _Adam([(lin, LR_LIN * spacing / 4.0), (trans, LR_TRANS * spacing / 2.0)], n_iter)
        for it in range(n_iter):
            if should_stop is not None and it % 10 == 0 and should_stop():
                raise InterruptedError("pre-alignment cancelled")
            if n_sample < n_pts:
                sel = torch.randint(0, n_pts, (n_sample,), generator=gen)
                p, fv = pts[sel], fvals[sel]
            else:
                p, fv = pts, fvals
            with torch.no_grad():
                y = p @ lin.T + centre_m + trans
                mv, g_vox = _trilinear_with_grad(m_flat, m_shape, y @ inv_lin.T + inv_off)
                ncc, dncc = _ncc_and_grad(fv, mv)
                dy = inv_lin.T @ (g_vox * -dncc)  # 3×N: d(−NCC)/dy in world mm (chain rule through world→voxel)
                opt.step([dy @ p, dy.sum(1)])
            last_ncc = float(ncc)
            done += 1
            if progress is not None and it % 10 == 0:
                progress(f"affine pre-alignment ({spacing:g} mm)", done / total_steps)
        history.append((float(spacing), int(n_iter), n_sample, last_ncc, time.perf_counter() - t_level))

    with torch.no_grad():
        a = lin.detach().double().numpy()
        t = trans.detach().double().numpy()
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = com_m + t - a @ com_f

    # Final NCC on the whole finest-level box and the overlap of the two brains on it.
    with torch.no_grad():
        y = pts @ lin.T + centre_m + trans
        mv, _ = _trilinear_with_grad(m_flat, m_shape, y @ inv_lin.T + inv_off)
        ncc = float(_ncc_and_grad(fvals, mv)[0])
        overlap = mask_overlap(fvals.numpy() > 0.05, mv.numpy() > 0.05)
    result = AffineResult(
        matrix=matrix,
        fixed_shape=tuple(int(s) for s in np.asarray(fixed).shape[:3]),
        fixed_affine=fixed_affine,
        moving_shape=tuple(int(s) for s in np.asarray(moving).shape[:3]),
        moving_affine=moving_affine,
        ncc=ncc,
        overlap=overlap,
        seconds=time.perf_counter() - t0,
        history=history,
    )
    if not np.isfinite(matrix).all() or overlap < min_overlap:
        raise UserError(
            f"no overlap after affine pre-alignment (only {overlap:.0%} of the smaller brain is covered): "
            "check that both images show a brain and that their orientations/affines are right"
        )
    if progress is not None:
        progress("affine pre-alignment done", 1.0)
    return result
