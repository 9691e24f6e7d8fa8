"""Building blocks shared by the DP networks (ARCHITECTURE.md §2, §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResBlock", "FlowHead", "init_kaiming_encoder"]

NEG_SLOPE = 0.2


class ResBlock(nn.Module):
    """Conv3³(stride s)→IN→LReLU(0.2)→Conv3³→IN, plus a Conv1³(stride s)→IN skip; LReLU of the sum.

    All convs have a bias, all InstanceNorms are affine. In-place activations keep the full-resolution peak low.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.skip = nn.Conv3d(in_ch, out_ch, 1, stride=stride)
        self.norm_skip = nn.InstanceNorm3d(out_ch, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x)), NEG_SLOPE, inplace=True)
        y = self.norm2(self.conv2(y))
        y = y + self.norm_skip(self.skip(x))
        return F.leaky_relu(y, NEG_SLOPE, inplace=True)


class FlowHead(nn.Conv3d):
    """Output conv ``Conv3d(C→3, 3³, pad 1)`` with weights ``N(0, σ=1e-5)`` and zero bias (§4 init quirk)."""

    def __init__(self, in_ch: int, out_ch: int = 3, std: float = 1e-5) -> None:
        super().__init__(in_ch, out_ch, 3, padding=1)
        nn.init.normal_(self.weight, 0.0, std)
        nn.init.zeros_(self.bias)


def init_kaiming_encoder(module: nn.Module, a: float = NEG_SLOPE) -> None:
    """``kaiming_normal_(a=0.2)`` on every Conv3d of ``module`` (1×1 projections included), bias 0 (§2)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=a)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
