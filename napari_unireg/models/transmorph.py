"""TransMorph baseline (Chen et al. 2022): Swin-transformer encoder + conv decoder, reduced width and depth."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RegistrationModel
from .blocks import FlowHead
from .output import RegistrationOutput

__all__ = ["TransMorph"]


def _window_partition(x: torch.Tensor, ws: tuple[int, int, int]) -> torch.Tensor:
    """``B×D×H×W×C`` (multiples of ``ws``) → ``(B·nW)×(ws0·ws1·ws2)×C``."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], c)


def _window_reverse(windows: torch.Tensor, ws: tuple[int, int, int], b: int, d: int, h: int, w: int) -> torch.Tensor:
    x = windows.view(b, d // ws[0], h // ws[1], w // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


class _WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: tuple[int, int, int], heads: int) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        w0, w1, w2 = window
        self.bias_table = nn.Parameter(torch.zeros((2 * w0 - 1) * (2 * w1 - 1) * (2 * w2 - 1), heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._index_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def _bias_index(self, ws: tuple[int, int, int], device) -> torch.Tensor:
        """Table rows of every token pair of a (possibly clipped) window ``ws``: offsets index the full table."""
        key = tuple(ws)
        if key not in self._index_cache:
            with torch.inference_mode(False):  # a plain tensor: usable by later autograd passes too
                self._index_cache[key] = self._make_index(ws)
        return self._index_cache[key].to(device)

    def _make_index(self, ws: tuple[int, int, int]) -> torch.Tensor:
        _, w1, w2 = self.window
        coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in ws], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor(self.window) - 1
        strides = ((2 * w1 - 1) * (2 * w2 - 1), 2 * w2 - 1, 1)
        return rel[..., 0] * strides[0] + rel[..., 1] * strides[1] + rel[..., 2]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, ws: tuple[int, int, int]) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.bias_table[self._bias_index(ws, x.device).reshape(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shifted: bool, mlp_ratio: float = 4.0):
        super().__init__()
        self.window, self.shifted = window, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        b, _, c = x.shape
        d, h, w = size
        # a window never exceeds the feature map (Swin's rule); no shift along an axis that fits in one window
        ws = tuple(min(wi, si) for wi, si in zip(self.window, size))
        shift = tuple(wi // 2 if (self.shifted and si > wi) else 0 for wi, si in zip(ws, size))
        y = self.norm1(x).view(b, d, h, w, c)
        pads = [(-s) % wi for s, wi in zip(size, ws)]
        y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        dp, hp, wp = y.shape[1:4]
        mask = None
        if any(shift):
            y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = self._mask((dp, hp, wp), ws, shift, x.device)
        y = _window_reverse(self.attn(_window_partition(y, ws), mask, ws), ws, b, dp, hp, wp)
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        y = y[:, :d, :h, :w].reshape(b, d * h * w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))

    @staticmethod
    def _mask(size, ws, shift, device) -> torch.Tensor:
        """−100 between tokens that the cyclic shift brought together from different regions."""
        img = torch.zeros((1, *size, 1), device=device)
        region = 0
        slices = [
            (slice(0, -wi), slice(-wi, -si), slice(-si, None)) if si else (slice(None),) for wi, si in zip(ws, shift)
        ]
        for s0 in slices[0]:
            for s1 in slices[1]:
                for s2 in slices[2]:
                    img[:, s0, s1, s2, :] = region
                    region += 1
        win = _window_partition(img, ws).squeeze(-1)
        diff = win[:, None, :] - win[:, :, None]
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class _PatchMerging(nn.Module):
    """2×2×2 neighbours concatenated (8C) → LayerNorm → Linear(8C → 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        b, _, c = x.shape
        d, h, w = size
        x = x.view(b, d, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        x = torch.cat(parts, -1)
        new = tuple(x.shape[1:4])
        return self.reduction(self.norm(x.reshape(b, -1, 8 * c))), new


class _ConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False), nn.InstanceNorm3d(out_ch), nn.LeakyReLU(0.2, True)
        )


class _DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.conv1 = _ConvNormAct(in_ch + skip_ch, out_ch)
        self.conv2 = _ConvNormAct(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], 1)))


class _SwinEncoder(nn.Module):
    def __init__(self, embed_dim: int, depths: Sequence[int], heads: Sequence[int], window: Sequence[int]) -> None:
        super().__init__()
        window = tuple(int(w) for w in window)
        self.patch_embed = nn.Conv3d(2, embed_dim, 4, stride=4)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            dim = embed_dim * 2**i
            self.stages.append(nn.ModuleList(_SwinBlock(dim, nh, window, bool(j % 2)) for j in range(depth)))
            self.merges.append(_PatchMerging(dim) if i < len(depths) - 1 else nn.Identity())
            self.out_norms.append(nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        b, c = x.shape[:2]
        size = tuple(x.shape[2:])
        x = self.patch_norm(x.flatten(2).transpose(1, 2))
        outs = []
        for stage, merge, norm in zip(self.stages, self.merges, self.out_norms):
            for block in stage:
                x = block(x, size)
            outs.append(norm(x).transpose(1, 2).reshape(b, -1, *size))
            if not isinstance(merge, nn.Identity):
                x, size = merge(x, size)
        return outs


class TransMorph(RegistrationModel):
    """TransMorph: a Swin transformer on the concatenated pair (patch 4, stages at 1/4…1/32) and a U-Net-like
    conv decoder with two full/half-resolution conv skips, flow head ``N(0, 1e-5)``.

    Deviations: reduced size (embed dim 48, depths (2, 2, 2, 2), heads (4, 4, 8, 8): about 11 M parameters
    instead of 46.56 M) so that it trains and runs on a workstation; no stochastic depth; windows are padded
    when the feature map is not a multiple of the window; InstanceNorm + LeakyReLU in the decoder; written from
    the paper's description, not the code. Dimensions must be multiples of 32.
    """

    name = "transmorph"
    family = "baseline"
    description = "TransMorph Swin-transformer network (reduced)"

    def __init__(
        self,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        heads: Sequence[int] = (4, 4, 8, 8),
        window: Sequence[int] = (5, 7, 6),
        skip_channels: int = 16,
    ) -> None:
        super().__init__()
        depths, heads, window = [int(d) for d in depths], [int(h) for h in heads], [int(w) for w in window]
        if len(depths) != len(heads):
            raise ValueError("transmorph: depths and heads need one entry per stage")
        self.config = {"embed_dim": int(embed_dim), "depths": depths, "heads": heads, "window": window,
                       "skip_channels": int(skip_channels)}
        self.grid_multiple = 4 * 2 ** (len(depths) - 1)
        self.encoder = _SwinEncoder(int(embed_dim), depths, heads, window)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.up = nn.ModuleList(_DecoderBlock(dims[i + 1], dims[i], dims[i]) for i in reversed(range(len(dims) - 1)))
        sc = int(skip_channels)
        self.conv_full = _ConvNormAct(2, sc)
        self.conv_half = _ConvNormAct(2, sc)
        self.up_half = _DecoderBlock(dims[0], sc, sc)
        self.up_full = _DecoderBlock(sc, sc, sc)
        self.head = FlowHead(sc)

    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        x = torch.cat([moving, fixed], 1)
        skip_full = self.conv_full(x)
        skip_half = self.conv_half(F.avg_pool3d(x, 2))
        feats = self.encoder(x)
        h = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1])):
            h = block(h, skip)
        h = self.up_half(h, skip_half)
        h = self.up_full(h, skip_full)
        return RegistrationOutput(disp=self.head(h), inverse=None)
