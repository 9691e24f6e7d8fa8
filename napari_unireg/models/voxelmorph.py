"""VoxelMorph baseline (LUMIR's ``VxmDense_2``-style U-Net, about 0.33 M parameters)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.sample import integrate_velocity, resize_flow
from .base import RegistrationModel
from .blocks import FlowHead
from .output import RegistrationOutput

__all__ = ["VoxelMorph"]


class _ConvAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.LeakyReLU(0.2))


class VoxelMorph(RegistrationModel):
    """VoxelMorph (Balakrishnan et al. 2019) dense U-Net, ``vm2`` features: encoder ``[16, 32, 32, 32]``,
    decoder ``[32, 32, 32, 32, 32, 16, 16]``, 327,331 parameters with the defaults.

    Input ``[moving, fixed]`` (2 channels); each encoder level is Conv3³+LeakyReLU(0.2) then max-pool; the decoder
    convolves, upsamples ×2 (nearest) and concatenates the skip; three extra full-resolution convs; flow head
    ``N(0, 1e-5)``. With ``int_steps > 0`` the output is a stationary velocity integrated by scaling and squaring
    at ``1/int_downsize`` resolution (voxelmorph's default diffeomorphic mode: 7 steps at half resolution).

    Deviations from the original: written from the paper and the public defaults, not from the code; the
    integration uses this package's ``warp`` (border padding, align_corners=True) instead of voxelmorph's
    SpatialTransformer (zero padding); resizing of the velocity uses ``resize_flow`` (exact voxel ratio).
    """

    name = "voxelmorph"
    family = "baseline"
    description = "VoxelMorph dense U-Net (vm2 features), diffeomorphic by default"

    def __init__(
        self,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        int_steps: int = 7,
        int_downsize: int = 2,
    ) -> None:
        super().__init__()
        enc, dec = [int(c) for c in enc_features], [int(c) for c in dec_features]
        if len(dec) < len(enc):
            raise ValueError("voxelmorph: dec_features needs at least as many entries as enc_features")
        self.config = {"enc_features": enc, "dec_features": dec, "int_steps": int(int_steps),
                       "int_downsize": int(int_downsize)}
        self.int_steps, self.int_downsize = int(int_steps), int(int_downsize)
        self.grid_multiple = 2 ** len(enc)
        n = len(enc)
        self.encoder = nn.ModuleList()
        prev, skips = 2, []
        for c in enc:
            self.encoder.append(_ConvAct(prev, c))
            skips.append(c)
            prev = c
        self.up_convs = nn.ModuleList()
        for level in range(n):
            self.up_convs.append(_ConvAct(prev, dec[level]))
            prev = dec[level] + skips[n - 1 - level]
        self.extra = nn.ModuleList()
        for c in dec[n:]:
            self.extra.append(_ConvAct(prev, c))
            prev = c
        self.head = FlowHead(prev)

    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        x = torch.cat([moving, fixed], 1)
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for conv in self.up_convs:
            x = F.interpolate(conv(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], 1)
        for conv in self.extra:
            x = conv(x)
        flow = self.head(x)
        if self.int_steps > 0:
            shape = flow.shape[2:]
            if self.int_downsize > 1:
                flow = resize_flow(flow, [s // self.int_downsize for s in shape])
            flow = integrate_velocity(flow, self.int_steps)
            if self.int_downsize > 1:
                flow = resize_flow(flow, shape)
        return RegistrationOutput(disp=flow, inverse=None)

    def parameter_split(self) -> tuple[int, int]:
        enc = sum(p.numel() for p in self.encoder.parameters())
        return enc, sum(p.numel() for p in self.parameters()) - enc
