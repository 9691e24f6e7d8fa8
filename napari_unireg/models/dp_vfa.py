"""(c) DP-VFA: the DP encoder with vector-field-attention blocks (ARCHITECTURE.md §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.correlation import OFFSETS
from .base import RegistrationModel
from .dp_conv import coarse_to_fine, encode_pair
from .blocks import conv3d_slabs
from .encoder import ENC_CHANNELS, PyramidEncoder
from ..core.correlation import window_dots
from ..core.sample import full_precision
from .output import RegistrationOutput

__all__ = ["DPVFA", "VFABlock", "window_logits", "attention_displacement"]


def window_logits(query: torch.Tensor, keys_padded: torch.Tensor, scale: float) -> torch.Tensor:
    """``<Q(p), K(p + 1 + o_j)>·scale`` for the 27 offsets; ``keys_padded`` is 2 voxels larger per axis."""
    return window_dots(query, keys_padded, scale)


def attention_displacement(logits: torch.Tensor) -> torch.Tensor:
    """``r(p) = Σ_j softmax_j(logits)·o_j`` (``B×27×S`` → ``B×3×S``, float32); each component lies in (−1, 1)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        weights = torch.softmax(full_precision(logits), dim=1)
        offsets = torch.tensor(OFFSETS, dtype=weights.dtype, device=logits.device)  # 27×3, channel order of corr
        return torch.einsum("bjxyz,jc->bcxyz", weights, offsets)


class VFABlock(nn.Module):
    """One level: shared ``Conv3d(C→C, 3³)`` projection, attention over the 27 neighbours, temperature √C.

    [quirk §6/§13.7] the warped moving features are replicate-padded *before* the projection, so ``K`` is
    ``N+2`` and its border embeddings differ from the fixed image's.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = int(channels)
        self.proj = nn.Conv3d(channels, channels, 3, padding=1)  # PyTorch default init

    def prepare(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Attention logits ``B×27×S``."""
        query = conv3d_slabs(self.proj, fixed)
        keys = conv3d_slabs(self.proj, F.pad(moving, (1, 1, 1, 1, 1, 1), mode="replicate"))
        return window_logits(query, keys, 1.0 / math.sqrt(self.channels))

    def predict(self, holder: list[torch.Tensor]) -> torch.Tensor:
        """Residual displacement from ``holder = [logits]`` (consumed)."""
        return attention_displacement(holder.pop())

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.predict([self.prepare(moving, fixed)])


class DPVFA(RegistrationModel):
    """(c) DP-VFA: shared pyramid encoder + one VFA block per level, §3 coarse-to-fine loop (791,104 params).

    Each level contributes a residual of at most 1 level voxel per component.
    """

    name = "dp-vfa"
    family = "DP (c) VFA"
    description = "DP encoder with vector field attention decoder (paper variant c)"

    def __init__(self, enc_channels: Sequence[int] = ENC_CHANNELS) -> None:
        super().__init__()
        enc_channels = [int(c) for c in enc_channels]
        self.config = {"enc_channels": enc_channels}
        self.grid_multiple = 2 ** (len(enc_channels) - 1)
        self.encoder = PyramidEncoder(enc_channels)
        self.decoder = nn.ModuleList(VFABlock(enc_channels[level]) for level in reversed(range(len(enc_channels))))

    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        feats_m, feats_f = encode_pair(self.encoder, moving, fixed)
        u = coarse_to_fine(feats_m, feats_f, list(self.decoder), release=not torch.is_grad_enabled())
        return RegistrationOutput(disp=u, inverse=None)
