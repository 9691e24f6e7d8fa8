"""The one return type of every registration network."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RegistrationOutput:
    """Result of ``model(moving, fixed)``.

    ``disp``: ``B×3×S`` fixed→moving displacement in voxels, pull convention
    (``warped_moving(p) = moving(p + disp(p))``). ``inverse``: the moving→fixed displacement
    (``warped_fixed(p) = fixed(p + inverse(p))``) for inverse-consistent models, else ``None``.
    """

    disp: torch.Tensor
    inverse: torch.Tensor | None = None
