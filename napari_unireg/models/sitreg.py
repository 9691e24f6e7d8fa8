"""SITReg baseline (Honkamaa & Marttinen, LUMIR 2024 winner design), reduced to 5.3 M parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import FlowHead, ResBlock, init_kaiming_encoder
from .dp_convic import AtomicBlock, DPConvIC

__all__ = ["SITReg"]


class _DeepEncoder(nn.Module):
    """``depth`` ResBlocks per level (the first one strided), fine → coarse outputs."""

    def __init__(self, channels: Sequence[int], depth: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, channels[0], 1)
        levels = []
        for i, c in enumerate(channels):
            prev = channels[max(i - 1, 0)]
            blocks = [ResBlock(prev, c, 1 if i == 0 else 2)] + [ResBlock(c, c, 1) for _ in range(depth - 1)]
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        init_kaiming_encoder(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = self.proj(x)
        for level in self.levels:
            h = level(h)
            feats.append(h)
        return feats


class _DeepAtomicBlock(AtomicBlock):
    def __init__(self, in_ch: int, dec_ch: int, level: int, depth: int) -> None:
        super().__init__(in_ch, dec_ch, level)
        self.res = nn.Sequential(ResBlock(in_ch, dec_ch, 1), *[ResBlock(dec_ch, dec_ch, 1) for _ in range(depth - 1)])
        self.head = FlowHead(dec_ch)


class SITReg(DPConvIC):
    """SITReg: symmetric, inverse-consistent, topology-preserving multi-resolution registration.

    Same construction as DP-ConvIC (which the paper derived from SITReg): per level, bounded cubic B-spline atomic
    fields ``a12 = g(fwd)``, ``a21 = g(rev)``, the anti-symmetric update ``a12 ∘ a21⁻¹`` through the fixed-point
    inversion layer, and the mid-space mapping builder; the outputs are exact inverses up to the solver
    tolerance and swap symmetric. SITReg specifics kept: the ``(f1 − f2, f1 + f2)`` block input, deeper
    encoder and update networks (``depth`` ResBlocks per level), no full-resolution update (``min_level = 1``:
    the finest atomic field is a spline on the half-resolution grid).

    Deviations: reduced width and depth (5,321,996 parameters with the defaults; the challenge model
    ``cc_grad_1.0_very_deep_heavy`` has 15.08 M), ResBlocks with InstanceNorm as in the DP encoder, a single
    atomic update per level, this package's B-spline and Anderson inversion instead of ``composable_mapping`` and
    ``deformation_inversion_layer``. Rebuilt from the SITReg paper's description, not from its code.
    """

    name = "sitreg"
    family = "baseline"
    description = "SITReg inverse-consistent multi-resolution network (reduced)"
    is_inverse_consistent = True
    mode = "diffsum"

    def __init__(
        self,
        enc_channels: Sequence[int] = (16, 32, 64, 64, 96),
        dec_channels: Sequence[int] = (32, 64, 64, 96, 96),
        depth: int = 2,
        min_level: int = 1,
        inv_tol: float = 1e-2,
        inv_max_iter: int = 50,
    ) -> None:
        self._depth, self._min = int(depth), int(min_level)
        if self._depth < 1 or not 0 <= self._min < len(enc_channels):
            raise ValueError("sitreg: depth must be ≥ 1 and min_level a valid level")
        super().__init__(enc_channels, dec_channels, inv_tol, inv_max_iter)
        self.config.update({"depth": self._depth, "min_level": self._min})

    def _make_encoder(self, channels: list[int]) -> nn.Module:
        return _DeepEncoder(channels, self._depth)

    def _make_block(self, in_ch: int, dec_ch: int, level: int) -> AtomicBlock:
        return _DeepAtomicBlock(in_ch, dec_ch, level, self._depth)

    def _block_in_channels(self, enc_ch: int) -> int:
        return 2 * enc_ch

    def _min_level(self) -> int:
        return self._min
