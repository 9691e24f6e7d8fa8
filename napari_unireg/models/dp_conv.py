"""(a) DP-Conv-{MF, MFC, C} and the coarse-to-fine loop shared with (c) DP-VFA (ARCHITECTURE.md §3, §4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.sample import upsample_flow
from ..core.correlation import local_correlation
from ..core.sample import compose, warp
from .base import RegistrationModel
from .blocks import FlowHead, ResBlock
from .encoder import ENC_CHANNELS, PyramidEncoder
from .output import RegistrationOutput

__all__ = ["DEC_CHANNELS", "DPConv", "DPConvMF", "DPConvMFC", "DPConvC", "coarse_to_fine", "encode_pair"]

DEC_CHANNELS = (32, 64, 64, 128, 128)
N_CORR = 27


def coarse_to_fine(
    feats_m: list[torch.Tensor],
    feats_f: list[torch.Tensor],
    blocks: Sequence[Callable],
    release: bool = False,
    upsample: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """§3 loop. ``feats_*`` fine→coarse; ``blocks[k]`` is the block of encoder level ``n−1−k`` (coarse→fine).

    ``u = DP_0(M, F)``; then per finer level ``u↑ = upsample2(u)``, ``r = DP_k(warp(M_k, u↑), F_k)``,
    ``u = compose(u↑, r)``. A block is ``predict([prepare(moving_warped, fixed)])``: splitting it lets the caller
    drop the inputs before the expensive part, and ``predict`` consumes its one-element list so that it can free
    the block input as soon as possible. With ``release=True`` (inference, the caller's lists are
    consumed) each level's features are dropped after use. ``upsample`` defaults to the authors' ×2 quirk
    (:func:`upsample_flow`); baselines may pass an exact resize.
    """
    n = len(feats_m)
    u = blocks[0].predict([blocks[0].prepare(feats_m[n - 1], feats_f[n - 1])])
    for k in range(1, n):
        level = n - 1 - k
        u = upsample_flow(u, 2) if upsample is None else upsample(u, feats_f[level].shape[2:])
        prepared = [blocks[k].prepare(warp(feats_m[level], u), feats_f[level])]
        if release:  # the warped moving features are already gone; drop this level's inputs too
            feats_m[level] = feats_f[level] = None
        r = blocks[k].predict(prepared)  # consumes ``prepared`` (the block input is freed inside)
        u = compose(u, r)
    return u


def encode_pair(encoder: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[list, list]:
    """Shared-weight features of both images; one batched pass (InstanceNorm is per sample, so equal to two)."""
    b = moving.shape[0]
    feats = encoder(torch.cat([moving, fixed], 0))
    return [f[:b] for f in feats], [f[b:] for f in feats]


class ConvDPBlock(nn.Module):
    """``OutConv(ResBlock(in → Cd))``: the raw residual displacement of one level (level voxels)."""

    def __init__(self, in_ch: int, dec_ch: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.res = ResBlock(in_ch, dec_ch, 1)
        self.head = FlowHead(dec_ch)

    def prepare(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The block input (§4 table)."""
        if self.mode == "mf":
            return torch.cat([moving, fixed], 1)
        corr = local_correlation(fixed, moving)  # the fixed features are the anchor
        if self.mode == "c":
            return corr
        return torch.cat([moving, corr, fixed], 1)  # MFC order is (M, C, F) in the code (§13.10)

    def predict(self, holder: list[torch.Tensor]) -> torch.Tensor:
        """Residual displacement from ``holder = [block input]`` (consumed)."""
        return self.head(self.res.consume(holder))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.predict([self.prepare(moving, fixed)])


class DPConv(RegistrationModel):
    """(a) DP-Conv: shared pyramid encoder + conv residual blocks, coarse-to-fine composition (§3, §4).

    Subclasses fix ``mode``: ``'mf'`` (features), ``'mfc'`` (features + 3×3×3 correlation), ``'c'``
    (correlation only). Output heads start at N(0, σ=1e-5), so the network is near the identity at init.
    ``enc_channels``/``dec_channels`` default to the paper's; smaller values only serve tests and experiments.
    """

    family = "DP (a) conv"
    mode = "mf"

    def __init__(self, enc_channels: Sequence[int] = ENC_CHANNELS, dec_channels: Sequence[int] = DEC_CHANNELS) -> None:
        super().__init__()
        enc_channels, dec_channels = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
        if len(enc_channels) != len(dec_channels):
            raise ValueError(f"{self.name}: enc_channels and dec_channels need one entry per level")
        self.config = {"enc_channels": enc_channels, "dec_channels": dec_channels}
        self.grid_multiple = 2 ** (len(enc_channels) - 1)
        self.encoder = PyramidEncoder(enc_channels)
        blocks = []
        for level in reversed(range(len(enc_channels))):  # coarse → fine
            c = enc_channels[level]
            in_ch = {"mf": 2 * c, "mfc": 2 * c + N_CORR, "c": N_CORR}[self.mode]
            blocks.append(ConvDPBlock(in_ch, dec_channels[level], self.mode))
        self.decoder = nn.ModuleList(blocks)

    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        feats_m, feats_f = encode_pair(self.encoder, moving, fixed)
        u = coarse_to_fine(feats_m, feats_f, list(self.decoder), release=not torch.is_grad_enabled())
        return RegistrationOutput(disp=u, inverse=None)


class DPConvMF(DPConv):
    """DP-Conv-MF: block input ``[M_w, F]`` (2,854,079 parameters)."""

    name = "dp-conv-mf"
    description = "DP conv decoder on moving+fixed features (paper variant a, MF)"
    mode = "mf"


class DPConvMFC(DPConv):
    """DP-Conv-MFC: block input ``[M_w, corr(F, M_w), F]`` (3,168,575 parameters)."""

    name = "dp-conv-mfc"
    description = "DP conv decoder on features + local correlation (paper variant a, MFC)"
    mode = "mfc"


class DPConvC(DPConv):
    """DP-Conv-C: block input ``corr(F, M_w)`` only (1,993,023 parameters)."""

    name = "dp-conv-c"
    description = "DP conv decoder on the local correlation only (paper variant a, C)"
    mode = "c"
