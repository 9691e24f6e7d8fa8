"""Peer registration methods for the benchmarks, and the conversion of their outputs to our convention.

Peers (all optional, from PyPI; a missing one is skipped by ``benchmarks/accuracy.py``):

* **Greedy** (``picsl-greedy``): the command of ``shared/data/baselines_val.json`` (:data:`GREEDY_COMMAND`).
* **ANTs SyN** (``antspyx``): ``ants.registration(type_of_transform='SyN')``, default settings, seeded; the
  affine and deformable stages are composed into one displacement field by ``antsApplyTransforms``.
* **VoxelMorph** (``voxelmorph`` 0.3, PyTorch backend): ``VxmPairwise`` trained by :func:`train_voxelmorph` with
  the package's own model and losses on the same pairs and step budget as ``unireg train``.

Greedy and ANTs write ITK displacement fields (LPS millimetres, pull, on the fixed grid): :func:`itk_to_vox`
turns them into our convention (voxel units of the fixed image's canonical RAS grid, channel = array axis,
pull; on the RAS 1 mm Learn2Reg box this is ``u = (-w_x, -w_y, +w_z)``). :func:`verify_conversion` checks the
conversion on every pair: our warp of the moving image must reproduce the peer's own resliced image.

Command line (the VoxelMorph training, which the accuracy benchmark does not run itself)::

    python benchmarks/peers.py train-voxelmorph --data ../shared/data/dataset.json --out runs/vxm \\
        [--steps N | --set optim.epochs=...] [--resolution half] [--device cuda] [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PEERS = ("greedy", "ants", "voxelmorph")
#: Python distribution of each peer (for versions and the "not installed" message).
DISTRIBUTIONS = {"greedy": "picsl-greedy", "ants": "antspyx", "voxelmorph": "voxelmorph"}
#: The Greedy command of ``baselines_val.json`` ({threads}, {fixed}, {moving}, {warp} filled in).
GREEDY_COMMAND = ("-d 3 -threads {threads} -seed 1 -m NCC 2x2x2 -n 100x50x10 -s 1.732vox 0.7071vox -e 1.0 -wp 0 "
                  "-i {fixed} {moving} -o {warp}")
GREEDY_RESLICE = "-d 3 -threads {threads} -rf {fixed} -rm {moving} {resliced} -r {warp}"
#: Minimum correlation between our warp of the moving image and the peer's own resliced image.
MIN_CORRELATION = 0.99
#: Maximum of mean|ours − peer's| / mean|moving − peer's|: what is left of the peer's own change of the image.
MAX_RESIDUAL = 0.1
_LPS = np.diag([-1.0, -1.0, 1.0])


class ConversionError(AssertionError):
    """The converted peer field does not reproduce the peer's own resliced image."""


@dataclass
class PeerResult:
    """One peer registration: ``disp`` ``3×X×Y×Z`` in voxel units of the fixed image's canonical grid (pull),
    ``resliced`` the peer's own warped moving image on that grid, ``seconds`` the registration call only."""

    disp: np.ndarray
    resliced: np.ndarray
    seconds: float
    command: str
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- availability
def peer_version(name: str) -> str | None:
    """Installed version of a peer's distribution, None when it is not installed."""
    try:
        return metadata.version(DISTRIBUTIONS[name])
    except metadata.PackageNotFoundError:
        return None


def peer_available(name: str) -> tuple[bool, str]:
    """``(ok, text)``: the version, or why the peer cannot run here (import tried, so broken installs show)."""
    if name not in DISTRIBUTIONS:
        return False, f"unknown peer {name!r} (known: {', '.join(PEERS)})"
    version = peer_version(name)
    if version is None:
        return False, f"not installed (pip install {DISTRIBUTIONS[name]})"
    module = {"greedy": "picsl_greedy", "ants": "ants", "voxelmorph": "voxelmorph"}[name]
    try:
        with _quiet_imports():
            __import__(module)
    except Exception as exc:  # noqa: BLE001 - report any import failure as "unavailable"
        return False, f"{DISTRIBUTIONS[name]} {version} is installed but does not import: {exc}"
    return True, version


@contextlib.contextmanager
def _quiet_imports():
    # voxelmorph/neurite pick their backend from the environment: ours is PyTorch.
    os.environ.setdefault("NEURITE_BACKEND", "pytorch")
    os.environ.setdefault("VXM_BACKEND", "pytorch")
    yield


@contextlib.contextmanager
def redirect_fds(path: str | os.PathLike):
    """Send the C/C++ stdout and stderr (Greedy, ANTs print there directly) to ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab") as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


# --------------------------------------------------------------------------------------------- conversion
def itk_to_vox(field_lps_mm: np.ndarray, field_affine: np.ndarray, fixed) -> np.ndarray:
    """ITK displacement (``X×Y×Z×3`` or ``X×Y×Z×1×3``, LPS mm, pull, stored voxel order of a grid with
    ``field_affine``) → ``3×X×Y×Z`` voxel units of ``fixed``'s canonical RAS grid (our/Learn2Reg convention).

    ``fixed`` is a :class:`napari_unireg.io.Volume` (canonical data + affine) and the field must be on its grid.
    For the RAS 1 mm Learn2Reg box this reduces to ``u = (-w_x, -w_y, +w_z)``.
    """
    import nibabel as nib

    from napari_unireg.errors import UserError

    w = np.asarray(field_lps_mm, dtype=np.float64)
    if w.ndim == 5 and w.shape[3] == 1:
        w = w[:, :, :, 0, :]
    if w.ndim != 4 or w.shape[-1] != 3:
        raise UserError(f"expected an ITK displacement field X×Y×Z×1×3, got shape {w.shape}")
    field_affine = np.asarray(field_affine, dtype=np.float64)
    # stored voxel order -> canonical RAS voxel order (the same reorientation load_volume applies to images)
    ornt = nib.orientations.io_orientation(field_affine)
    canon = np.stack([nib.orientations.apply_orientation(w[..., c], ornt) for c in range(3)], axis=0)
    canon_affine = field_affine @ nib.orientations.inv_ornt_aff(ornt, w.shape[:3])
    if canon.shape[1:] != tuple(fixed.shape) or not np.allclose(canon_affine, fixed.affine, atol=1e-3):
        raise UserError(f"the peer's field {canon.shape[1:]} is not on the fixed image grid {tuple(fixed.shape)}")
    # LPS mm -> RAS mm -> canonical voxels: u = A^-1 · diag(-1,-1,1) · w
    to_vox = np.linalg.inv(fixed.affine[:3, :3]) @ _LPS
    return np.einsum("ij,j...->i...", to_vox, canon).astype(np.float32)


def load_itk_as_vox(path: str | os.PathLike, fixed) -> np.ndarray:
    """Read an ITK/ANTs/Greedy displacement file and convert it with :func:`itk_to_vox`."""
    import nibabel as nib

    img = nib.load(str(path))
    return itk_to_vox(np.asanyarray(img.dataobj), img.affine, fixed)


def warp_image(moving: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Linear pull ``moving(p + u(p))`` with border padding (our ``spatial.warp`` in numpy, any grid size)."""
    from scipy.ndimage import map_coordinates

    grid = np.indices(moving.shape, dtype=np.float32)
    return map_coordinates(np.asarray(moving, dtype=np.float32), grid + disp, order=1, mode="nearest")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (whole volume)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def verify_conversion(disp: np.ndarray, moving: np.ndarray, resliced: np.ndarray,
                      min_corr: float = MIN_CORRELATION, name: str = "peer") -> dict[str, float]:
    """Warp ``moving`` with the converted field and compare with the peer's own resliced image.

    Only voxels whose sample point ``p + u(p)`` lies inside the moving grid are compared: outside it the tools
    pad differently (ours repeats the border, ITK fills zeros). Two criteria, because a small field leaves the
    images correlated even when it is converted wrongly: the correlation must reach ``min_corr`` and the
    residual ``mean|ours − resliced| / mean|moving − resliced|`` must stay below :data:`MAX_RESIDUAL` (a correct
    conversion leaves only interpolation round-off, ~1e-6; a wrong sign or axis leaves ~1). Returns
    ``{'corr', 'residual', 'max_abs_diff', 'mean_abs_diff', 'inside_fraction'}``; raises
    :class:`ConversionError` when a criterion fails.
    """
    moving = np.asarray(moving, dtype=np.float32)
    resliced = np.asarray(resliced, dtype=np.float32)
    if resliced.shape != moving.shape or disp.shape != (3, *moving.shape):
        raise ConversionError(f"{name}: shapes differ (field {disp.shape}, moving {moving.shape}, "
                              f"resliced {resliced.shape})")
    ours = warp_image(moving, disp)
    pts = np.indices(moving.shape, dtype=np.float32) + disp
    inside = np.ones(moving.shape, dtype=bool)
    for axis, size in enumerate(moving.shape):
        inside &= (pts[axis] >= 0) & (pts[axis] <= size - 1)
    if not inside.any():
        raise ConversionError(f"{name}: the converted field maps every voxel outside the moving image")
    diff = np.abs(ours[inside] - resliced[inside])
    change = float(np.abs(moving[inside] - resliced[inside]).mean())
    residual = float(diff.mean()) / change if change > 0 else (0.0 if float(diff.mean()) == 0 else float("inf"))
    out = {"corr": correlation(ours[inside], resliced[inside]), "residual": residual,
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "inside_fraction": float(inside.mean())}
    if not out["corr"] >= min_corr or not residual <= MAX_RESIDUAL:
        raise ConversionError(
            f"{name}: our warp with the converted field does not reproduce the peer's resliced image "
            f"(correlation {out['corr']:.4f}, need >= {min_corr}; residual {residual:.3f}, need <= {MAX_RESIDUAL}); "
            "the field conversion is wrong")
    return out


# --------------------------------------------------------------------------------------------- Greedy
def run_greedy(fixed_path: str, moving_path: str, fixed, workdir: str | os.PathLike, threads: int = 2,
               command: str = GREEDY_COMMAND) -> PeerResult:
    """Greedy with ``command`` (default: the baseline's), then its own reslice of the moving image."""
    from picsl_greedy import Greedy3D

    from napari_unireg.io import load_volume

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    warp, resliced = work / "greedy_warp.nii.gz", work / "greedy_resliced.nii.gz"
    cmd = command.format(threads=threads, fixed=fixed_path, moving=moving_path, warp=warp)
    g = Greedy3D()
    log = work / "greedy.log"
    with redirect_fds(log):
        t0 = time.perf_counter()
        g.execute(cmd)
        seconds = time.perf_counter() - t0
        g.execute(GREEDY_RESLICE.format(threads=threads, fixed=fixed_path, moving=moving_path, resliced=resliced,
                                        warp=warp))
    disp = load_itk_as_vox(warp, fixed)
    res = load_volume(resliced, kind="image").data
    return PeerResult(disp, res, seconds, "greedy " + cmd, {"log": str(log)})


# --------------------------------------------------------------------------------------------- ANTs
def run_ants(fixed_path: str, moving_path: str, fixed, workdir: str | os.PathLike, threads: int = 2,
             transform: str = "SyN", seed: int = 1) -> PeerResult:
    """``ants.registration(type_of_transform=transform)`` with ANTsPy's defaults otherwise, seeded; the forward
    transforms (affine + warp) are composed into one displacement field by ``antsApplyTransforms``."""
    # ITK reads its thread count from the environment when it first creates a thread pool.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    from napari_unireg.io import load_volume

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ants.config._random_seed = int(seed)  # ANTsPy 0.6 passes --random-seed only from this module setting
    f, m = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    log = work / "ants.log"
    with redirect_fds(log):
        t0 = time.perf_counter()
        reg = ants.registration(f, m, type_of_transform=transform, outprefix=str(work / "ants_"))
        seconds = time.perf_counter() - t0
        comp = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=str(work / "ants_fwd_"))
    if comp is None or not Path(comp).is_file():
        raise RuntimeError("antsApplyTransforms did not write the composed displacement field")
    resliced_path = work / "ants_resliced.nii.gz"
    ants.image_write(reg["warpedmovout"], str(resliced_path))
    disp = load_itk_as_vox(comp, fixed)
    res = load_volume(resliced_path, kind="image").data
    cmd = (f"ants.registration(fixed, moving, type_of_transform={transform!r}) "
           f"[random seed {seed}, {threads} ITK threads]; transforms {[Path(t).name for t in reg['fwdtransforms']]}")
    return PeerResult(disp, res, seconds, cmd, {"log": str(log)})


# --------------------------------------------------------------------------------------------- VoxelMorph
VXM_DEFAULTS: dict[str, Any] = {
    "nb_features": [16, 16, 16, 16, 16],  # VxmPairwise's default U-Net
    "integration_steps": 5,  # VxmPairwise's default (diffeomorphic, scaling and squaring)
    "lr": 1e-4,  # VoxelMorph's training default
    "lam": 1.0,  # weight of the L2 gradient penalty with the NCC loss (VoxelMorph's recommendation for NCC)
    "window": 9,
}
VXM_WEIGHTS = "voxelmorph_pkg.pt"
VXM_CARD = "voxelmorph_pkg.json"


def build_voxelmorph(nb_features=None, integration_steps: int | None = None):
    """The VoxelMorph package's ``VxmPairwise`` network (3D, one channel per image)."""
    with _quiet_imports():
        import voxelmorph as vxm
    return vxm.nn.models.VxmPairwise(
        ndim=3, source_channels=1, target_channels=1,
        nb_features=list(nb_features or VXM_DEFAULTS["nb_features"]),
        integration_steps=int(VXM_DEFAULTS["integration_steps"] if integration_steps is None else integration_steps),
    )


def load_voxelmorph(path: str | os.PathLike, device: str = "cpu"):
    """``(model, card)`` from a folder written by :func:`train_voxelmorph` (or its ``.pt`` file)."""
    import torch

    from napari_unireg.errors import UserError

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = folder / VXM_WEIGHTS if p.is_dir() else p
    card_path = folder / VXM_CARD
    if not weights.is_file() or not card_path.is_file():
        raise UserError(f"no VoxelMorph weights in {folder} (expected {VXM_WEIGHTS} and {VXM_CARD}); "
                        "train them with: python benchmarks/peers.py train-voxelmorph ...")
    card = json.loads(card_path.read_text())
    model = build_voxelmorph(card["nb_features"], card["integration_steps"])
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return model.to(device).eval(), card


def _vxm_forward(model, moving, fixed, levels: int):
    """``model(moving, fixed)`` on inputs zero-padded to a multiple of ``2**levels`` (the U-Net pools once per
    level); the field and warped image are cropped back to the input grid."""
    import torch.nn.functional as F

    shape = tuple(moving.shape[2:])
    pads = [(-n) % 2**levels for n in shape]
    pad = [0, pads[2], 0, pads[1], 0, pads[0]]
    disp, warped = model(F.pad(moving, pad), F.pad(fixed, pad), return_warped_source=True)
    crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in shape)
    return disp[crop], warped[crop]


def run_voxelmorph(model, card: dict, fixed, moving, device: str = "cpu") -> PeerResult:
    """The trained VoxelMorph network on one pair (canonical Volumes on one grid, intensities as trained).

    The images are put on the network's resolution (``card['resolution']``: average-pooled by 2 for half),
    zero-padded to a multiple of ``2**levels``; the field is cropped and resized to the fixed grid. ``resliced`` is
    VoxelMorph's own ``SpatialTransformer`` output at the network resolution, so it is compared with our warp
    of the moving image at that resolution (``extra['net_disp']``, ``extra['net_moving']``).
    """
    import torch
    import torch.nn.functional as F

    from napari_unireg.core.sample import resize_flow

    dev = torch.device(device)
    f = torch.from_numpy(np.ascontiguousarray(fixed.data, dtype=np.float32))[None, None].to(dev)
    m = torch.from_numpy(np.ascontiguousarray(moving.data, dtype=np.float32))[None, None].to(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if card.get("resolution", "full") == "half":
            f, m = F.avg_pool3d(f, 2), F.avg_pool3d(m, 2)
        net_shape = tuple(f.shape[2:])
        disp, warped = _vxm_forward(model, m, f, len(card.get("nb_features") or VXM_DEFAULTS["nb_features"]))
        full = resize_flow(disp, tuple(fixed.shape)) if net_shape != tuple(fixed.shape) else disp
        if dev.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return PeerResult(
        full[0].float().cpu().numpy(), warped[0, 0].float().cpu().numpy(), seconds,
        f"voxelmorph VxmPairwise {card.get('nb_features')} ({card.get('resolution', 'full')} resolution, "
        f"{card.get('steps')} training steps)",
        {"net_disp": disp[0].float().cpu().numpy(), "net_moving": m[0, 0].float().cpu().numpy()},
    )


def train_voxelmorph(cfg, out: str | os.PathLike, *, lr: float = VXM_DEFAULTS["lr"], lam: float = VXM_DEFAULTS["lam"],
                     nb_features=None, integration_steps: int | None = None, resume: bool = False,
                     log_every: int = 10, save_every: int = 500) -> dict[str, Any]:
    """Train the VoxelMorph package's network with its own model and losses on ``unireg train``'s pairs.

    ``cfg`` is a :class:`napari_unireg.train.Config`: the data set, validation-pair exclusion, pair sampling
    seed, resolution and step budget (``steps`` or ``epochs × pairs_per_epoch``, two directed steps per pair
    like our (a)/(c) variants) are taken from it, so VoxelMorph sees exactly the pairs our variants see.
    Loss: ``-NCC_9(fixed, moving∘φ) + lam·‖∇v‖²`` on the velocity field (neurite's ``NCC`` and
    ``SpatialGradient('l2')``), Adam at ``lr``. Writes ``voxelmorph_pkg.pt`` + ``voxelmorph_pkg.json`` in ``out``.
    """
    import torch

    with _quiet_imports():
        import neurite as ne

    from napari_unireg.errors import UserError
    from napari_unireg.pipeline import resolve_device
    from napari_unireg.train.data import PairDataset, PairPlan, VolumeLoader, discover, make_loader
    from napari_unireg.train.loop import plan_steps

    out = Path(out)
    state_path = out / "voxelmorph_last.pt"
    if state_path.exists() and not resume:
        raise UserError(f"{out} already holds a VoxelMorph run; use --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    tset = discover(cfg.data, None)
    factor = 2 if cfg.data.resolution == "half" else 1
    plan = plan_steps(cfg, symmetric=False)
    torch.manual_seed(cfg.seed)
    model = build_voxelmorph(nb_features, integration_steps).to(device)
    levels = len(nb_features or VXM_DEFAULTS["nb_features"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ncc = ne.nn.modules.NCC(window_size=VXM_DEFAULTS["window"])
    grad = ne.nn.modules.SpatialGradient(penalty="l2")
    step, elapsed0 = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed0 = int(state["step"]), float(state["elapsed"])
    pair_plan = PairPlan(len(tset.entries), tset.excluded, cfg.data.seed)
    dataset = PairDataset(tset, cfg, pair_plan, VolumeLoader(cfg.data.grid_shape, factor, cfg.data.cache_size,
                                                             cfg.data.cache_dir), want_labels=False)
    start_batch, skip = divmod(step, plan.steps_per_pair)
    t_start = time.perf_counter()
    card = {
        "method": "voxelmorph package VxmPairwise (PyTorch backend)",
        "voxelmorph": peer_version("voxelmorph"), "torch": torch.__version__,
        "nb_features": list(nb_features or VXM_DEFAULTS["nb_features"]),
        "integration_steps": int(VXM_DEFAULTS["integration_steps"] if integration_steps is None else integration_steps),
        "loss": f"-NCC(window {VXM_DEFAULTS['window']}) + {lam} * SpatialGradient(l2)(velocity)",
        "lr": lr, "lam": lam, "resolution": cfg.data.resolution, "data": tset.describe(),
        "total_steps": plan.total_steps, "pairs_seed": cfg.data.seed, "seed": cfg.seed, "device": str(device),
    }

    def save(final: bool) -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed": elapsed0 + time.perf_counter() - t_start}, state_path)
        if final:
            torch.save(model.state_dict(), out / VXM_WEIGHTS)
            (out / VXM_CARD).write_text(json.dumps({**card, "steps": step, "wall_seconds":
                                                    elapsed0 + time.perf_counter() - t_start}, indent=1))

    log = open(out / "voxelmorph_log.csv", "a")
    try:
        if step < plan.total_steps:
            loader = make_loader(dataset, start_batch, cfg.optim.batch_size, 0, 1, cfg)
            for batch in loader:
                mov, fix = batch["moving"].to(device), batch["fixed"].to(device)
                directions = [(mov, fix)] + ([(fix, mov)] if plan.bidir else [])
                for m, f in directions[skip:]:
                    model.train()
                    opt.zero_grad(set_to_none=True)
                    disp, warped = _vxm_forward(model, m, f, levels)
                    sim = -ncc(f, warped).mean()
                    # VoxelMorph regularises the velocity field when it integrates one, else the displacement
                    reg = grad(model.velocity if model.integration_steps > 0 else disp)
                    loss = sim + lam * reg
                    loss.backward()
                    opt.step()
                    step += 1
                    if step % max(1, log_every) == 0:
                        log.write(f"{step},{loss.item():.6f},{sim.item():.6f},{reg.item():.6f},"
                                  f"{elapsed0 + time.perf_counter() - t_start:.1f}\n")
                        log.flush()
                    if step % max(1, save_every) == 0:
                        save(False)
                    if step >= plan.total_steps:
                        break
                skip = 0
                if step >= plan.total_steps:
                    break
    finally:
        log.close()
    save(True)
    return {**card, "steps": step, "out": str(out)}


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-voxelmorph", help="train the VoxelMorph package's network on unireg train's pairs")
    t.add_argument("--data", required=True, help="Learn2Reg dataset.json or a folder of images (as unireg train)")
    t.add_argument("--out", required=True)
    t.add_argument("--config", default=None, help="unireg train YAML (the same file as the variants' runs)")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's budget)")
    t.add_argument("--resolution", choices=["full", "half"], default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    t.add_argument("--lr", type=float, default=VXM_DEFAULTS["lr"])
    t.add_argument("--lam", type=float, default=VXM_DEFAULTS["lam"])
    t.add_argument("--resume", action="store_true")
    s = sub.add_parser("status", help="which peers are installed")
    del s
    args = p.parse_args(argv)
    from napari_unireg.errors import UserError

    try:
        if args.cmd == "status":
            for name in PEERS:
                ok, text = peer_available(name)
                print(f"{name:<11} {'ok' if ok else 'missing':<8} {text}")
            return 0
        from napari_unireg.train.config import load_config

        overrides = [f"data.source={args.data}"] + list(args.set)
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        if args.resolution:
            overrides.append(f"data.resolution={args.resolution}")
        if args.device:
            overrides.append(f"device={args.device}")
        if args.threads:
            overrides.append(f"threads={args.threads}")
        cfg = load_config(args.config, overrides)
        res = train_voxelmorph(cfg, args.out, lr=args.lr, lam=args.lam, resume=args.resume)
        print(json.dumps({k: res[k] for k in ("steps", "total_steps", "resolution", "out")}))
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
