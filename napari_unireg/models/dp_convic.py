"""(b) DP-ConvIC-{MF, C}: inverse consistent by construction, SITReg style (ARCHITECTURE.md §5).

Per level ``l`` (coarse → fine) one network ``g`` turns mid-space features into bounded cubic B-spline control
points; the two atomic fields ``a12 = g(fwd)``, ``a21 = g(rev)`` give the anti-symmetric update
``D = a12 ∘ a21⁻¹`` and ``D⁻¹ = a21 ∘ a12⁻¹``. The mapping builder composes the updates into the left/right
half maps ``L``, ``R`` and their inverses; the outputs are ``u12 = L ∘ R⁻¹`` and ``u21 = R ∘ L⁻¹``.

Everything is batched as ``[image 1; image 2]`` (``2B`` samples): the encoder runs once on the concatenated
pair, ``g`` runs on ``[fwd; rev]`` as one batch of 2 when gradients are needed (one direction after the other
in inference, to halve the peak memory), and ``L, R`` (and ``L⁻¹, R⁻¹``)
live in one ``2B×3×S`` tensor each. Swapping the images permutes every batch by halves, hence the exact swap
symmetry. All fields are full-resolution voxel displacements; compositions are evaluated lazily (each stored
field is interpolated once at the final points, never a resampled intermediate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.bspline import UPPER_BOUNDS, bspline_upsample, max_control_point, sample_at_level
from ..core.correlation import reverse_correlation
from ..core.inversion import invert_displacement
from ..core.correlation import local_correlation
from ..core.sample import compose, warp
from .base import RegistrationModel
from .blocks import FlowHead, ResBlock
from .dp_conv import DEC_CHANNELS, N_CORR
from .encoder import ENC_CHANNELS, PyramidEncoder
from .output import RegistrationOutput

__all__ = ["AtomicBlock", "DPConvIC", "DPConvICMF", "DPConvICC", "swap_halves"]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``[x; y] → [y; x]`` along the batch dimension."""
    b = t.shape[0] // 2
    return torch.cat([t[b:], t[:b]], 0)


class AtomicBlock(nn.Module):
    """``g(x) = maxcp·tanh(OutConv(ResBlock(x)))`` read as level-``l`` B-spline control points (level voxels).

    :meth:`atomic` evaluates the spline at every full-resolution voxel and converts to full-resolution voxels
    (``×2^l``): each component is bounded by ``0.99·UB(2^l)·2^l`` and the map is invertible.
    """

    def __init__(self, in_ch: int, dec_ch: int, level: int) -> None:
        super().__init__()
        self.level = int(level)
        self.factor = 2**self.level
        self.maxcp = max_control_point(self.factor)
        self.res = ResBlock(in_ch, dec_ch, 1)
        self.head = FlowHead(dec_ch)

    def control_points(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxcp * torch.tanh(self.head(self.res(x)))

    def atomic(self, x: torch.Tensor) -> torch.Tensor:
        cp = self.control_points(x)
        a = bspline_upsample(cp, self.factor)
        return a * self.factor if a.requires_grad else a.mul_(self.factor)

    @property
    def bound(self) -> float:
        """Largest possible atomic displacement component, full-resolution voxels."""
        return self.maxcp * self.factor


class DPConvIC(RegistrationModel):
    """(b) DP-ConvIC base: subclasses fix ``mode`` (``'mf'`` or ``'c'``).

    ``inv_tol``/``inv_max_iter`` are the forward stop rule of each inversion (1e-2 voxel, 50 iterations).
    In inference (no gradients) the forward and reverse inputs go through ``g`` one after the other instead of as
    one batch of 2: identical maths, half the peak memory at full resolution.
    """

    family = "DP (b) conv IC"
    is_inverse_consistent = True
    mode = "mf"

    def __init__(
        self,
        enc_channels: Sequence[int] = ENC_CHANNELS,
        dec_channels: Sequence[int] = DEC_CHANNELS,
        inv_tol: float = 1e-2,
        inv_max_iter: int = 50,
    ) -> None:
        super().__init__()
        enc_channels, dec_channels = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
        if len(enc_channels) != len(dec_channels):
            raise ValueError(f"{self.name}: enc_channels and dec_channels need one entry per level")
        if len(enc_channels) > len(UPPER_BOUNDS):
            raise ValueError(f"{self.name}: at most 5 levels (B-spline bounds known up to factor 16)")
        self.config = {
            "enc_channels": enc_channels,
            "dec_channels": dec_channels,
            "inv_tol": float(inv_tol),
            "inv_max_iter": int(inv_max_iter),
        }
        self.inv_tol, self.inv_max_iter = float(inv_tol), int(inv_max_iter)
        self.grid_multiple = 2 ** (len(enc_channels) - 1)
        self.encoder = self._make_encoder(enc_channels)
        blocks = []
        for level in reversed(range(self._min_level(), len(enc_channels))):  # coarse → fine
            blocks.append(self._make_block(self._block_in_channels(enc_channels[level]), dec_channels[level], level))
        self.decoder = nn.ModuleList(blocks)

    # ---- construction hooks (the SITReg baseline overrides them) ------------------------------------------
    def _make_encoder(self, channels: list[int]) -> nn.Module:
        return PyramidEncoder(channels)

    def _make_block(self, in_ch: int, dec_ch: int, level: int) -> AtomicBlock:
        return AtomicBlock(in_ch, dec_ch, level)

    def _block_in_channels(self, enc_ch: int) -> int:
        return 2 * N_CORR if self.mode == "c" else 2 * enc_ch

    def _min_level(self) -> int:
        """Finest level that predicts an update (0 = full resolution)."""
        return 0

    # ---- block inputs -------------------------------------------------------------------------------------
    def _forward_input(self, feat: torch.Tensor) -> torch.Tensor:
        """The forward input of ``g`` from the mid-space features ``[f1; f2]`` (B samples)."""
        b = feat.shape[0] // 2
        f1, f2 = feat[:b], feat[b:]
        if self.mode == "mf":  # [f1, f2]
            return torch.cat([f1, f2], 1)
        if self.mode == "c":  # [c12, c21]; corr(f2, f1) is a channel remap of corr(f1, f2) (§13.1)
            c12 = local_correlation(f1, f2)
            return torch.cat([c12, reverse_correlation(c12)], 1)
        return torch.cat([f1 - f2, f1 + f2], 1)  # "diffsum" (SITReg)

    def _reverse_input(self, x: torch.Tensor) -> torch.Tensor:
        """The reverse input from the forward one: swap the halves (MF, C) or negate the difference (diffsum)."""
        n = x.shape[1] // 2
        if self.mode == "diffsum":
            return torch.cat([-x[:, :n], x[:, n:]], 1)
        return torch.cat([x[:, n:], x[:, :n]], 1)

    def atomic_fields(self, block: AtomicBlock, holder: list[torch.Tensor]) -> torch.Tensor:
        """``[a12; a21]`` (2B×3×S, full-res voxels) from the mid-space features ``holder = [[f1; f2]]``.

        The features are taken out of ``holder`` so that they are freed as soon as the input is built. With
        gradients, ``g`` sees ``[fwd; rev]`` as one batch; without, one direction at a time (lower peak memory).
        """
        x = self._forward_input(holder.pop())
        if torch.is_grad_enabled():
            return block.atomic(torch.cat([x, self._reverse_input(x)], 0))
        a12 = block.atomic(x)
        x = self._reverse_input(x)
        return torch.cat([a12, block.atomic(x)], 0)

    # ---- forward ------------------------------------------------------------------------------------------
    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        b = moving.shape[0]
        release = not torch.is_grad_enabled()
        feats = self.encoder(torch.cat([moving, fixed], 0))  # [image 1 = moving; image 2 = fixed]
        maps = inv_maps = None  # [L; R] and [L⁻¹; R⁻¹]; None is the identity
        for block in self.decoder:
            level = block.level
            feat = feats[level]
            if release:
                feats[level] = None
            if maps is not None:  # warp both images' features into the mid space (§5 steps 1-3)
                feat = warp(feat, sample_at_level(maps, level) / 2**level)
            holder = [feat]
            del feat
            a = self.atomic_fields(block, holder)
            inv = invert_displacement(a, max_iter=self.inv_max_iter, tol=self.inv_tol)
            # [D; D⁻¹] = [a12 ∘ a21⁻¹; a21 ∘ a12⁻¹], evaluated lazily at every full-res voxel
            upd = compose(a, swap_halves(inv))
            if maps is None:
                maps, inv_maps = upd, swap_halves(upd)  # L = D, R = D⁻¹, L⁻¹ = D⁻¹, R⁻¹ = D
            else:
                maps = compose(maps, upd)  # L ∘ D,  R ∘ D⁻¹
                del upd
                inv_maps = compose(swap_halves(a), compose(inv, inv_maps))  # D⁻¹ ∘ L⁻¹,  D ∘ R⁻¹
            del a, inv
        u = compose(maps, swap_halves(inv_maps))  # [L ∘ R⁻¹; R ∘ L⁻¹]
        return RegistrationOutput(disp=u[:b], inverse=u[b:])


class DPConvICMF(DPConvIC):
    """DP-ConvIC-MF: ``g`` sees ``[f1, f2]`` forward and ``[f2, f1]`` reverse (2,854,079 parameters)."""

    name = "dp-convic-mf"
    description = "Inverse-consistent DP conv decoder on features (paper variant b, MF)"
    mode = "mf"


class DPConvICC(DPConvIC):
    """DP-ConvIC-C: ``g`` sees ``[c12, c21]`` forward and ``[c21, c12]`` reverse (2,307,519 parameters)."""

    name = "dp-convic-c"
    description = "Inverse-consistent DP conv decoder on local correlation (paper variant b, C)"
    mode = "c"
