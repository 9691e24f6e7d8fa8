"""A network on any model-grid shape (ICON style): pool to the chosen resolution, pad to the network's multiple,
run, crop, bring the field back to the input grid. The engine sees one call, ``adapter(moving, fixed)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.sample import resize_flow, upsample_pooled_flow

__all__ = ["GridAdapter"]


class GridAdapter(nn.Module):
    """Wraps a :class:`~napari_unireg.models.base.RegistrationModel` for inputs of any shape.

    ``resolution='half'`` runs the network on ``avg_pool3d(·, 2, ceil_mode=True)`` inputs and maps the field back
    with the exact pooled-grid geometry (:func:`~napari_unireg.core.sample.upsample_pooled_flow`); sizes that are
    not multiples of ``net.grid_multiple`` are zero-padded at the far end and the field is cropped. Returns
    ``(disp, inverse or None)``, float32, ``B×3×S`` on the input grid ``S`` (voxel units, pull convention).
    """

    def __init__(self, net: nn.Module, resolution: str = "full", amp: bool = True):
        super().__init__()
        if resolution not in ("full", "half"):
            raise ValueError(f"resolution must be 'full' or 'half', got {resolution!r}")
        self.net = net
        self.resolution = resolution
        self.amp = amp

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = tuple(fixed.shape[2:])
        f, m = fixed, moving
        factor = 2 if self.resolution == "half" else 1
        if factor > 1:
            f, m = F.avg_pool3d(f, factor, ceil_mode=True), F.avg_pool3d(m, factor, ceil_mode=True)
        multiple = int(getattr(self.net, "grid_multiple", 16))
        pads = [(-s) % multiple for s in f.shape[2:]]
        if any(pads):  # pad to the network's multiple, crop the field afterwards
            pad = [0, pads[2], 0, pads[1], 0, pads[0]]
            f, m = F.pad(f, pad), F.pad(m, pad)
        device = fixed.device
        use_amp = self.amp and device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            out = self.net(m, f)
        crop = (slice(None), slice(None)) + tuple(slice(0, s - p) for s, p in zip(f.shape[2:], pads))

        def to_input_grid(u: torch.Tensor) -> torch.Tensor:
            u = upsample_pooled_flow(u.float()[crop], factor)
            return resize_flow(u, shape) if tuple(u.shape[2:]) != shape else u  # odd sizes: ceil-pooled grid

        return to_input_grid(out.disp), None if out.inverse is None else to_input_grid(out.inverse)
