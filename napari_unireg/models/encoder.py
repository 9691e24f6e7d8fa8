"""Shared dual-stream pyramid encoder of the DP family (ARCHITECTURE.md §2): 507,504 parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ResBlock, init_kaiming_encoder

__all__ = ["PyramidEncoder", "ENC_CHANNELS"]

ENC_CHANNELS = (16, 32, 32, 64, 64)


class PyramidEncoder(nn.Module):
    """1×1 projection + ResBlock at full resolution, then a cascade of stride-2 ResBlocks.

    ``forward(x)`` maps ``B×1×S`` to a list of feature maps, fine → coarse, level ``l`` of size ``S/2^l``.
    Moving and fixed images share the weights; InstanceNorm is per sample, so running both as one batch equals
    two passes.
    """

    def __init__(self, channels: Sequence[int] = ENC_CHANNELS, in_channels: int = 1) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        self.channels = channels
        self.proj = nn.Conv3d(in_channels, channels[0], 1)
        blocks = [ResBlock(channels[0], channels[0], 1)]
        blocks += [ResBlock(channels[i - 1], channels[i], 2) for i in range(1, len(channels))]
        self.blocks = nn.ModuleList(blocks)
        init_kaiming_encoder(self)

    @property
    def n_levels(self) -> int:
        return len(self.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = self.proj(x)
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return feats
