"""Base class of every registration network: the common interface and the input check."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from .output import RegistrationOutput

__all__ = ["RegistrationModel", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class RegistrationModel(nn.Module):
    """``model(moving, fixed) -> RegistrationOutput``; inputs ``B×1×D0×D1×D2``, dims multiples of ``grid_multiple``.

    Subclasses set ``name``, ``family``, ``is_inverse_consistent`` and ``grid_multiple``, store their constructor
    arguments in ``self.config`` (JSON-able: ``build_model(name, **config)`` rebuilds the same architecture) and
    implement :meth:`_forward`. ``encoder`` (if any) is the submodule counted as the encoder in the model table.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    is_inverse_consistent: ClassVar[bool] = False
    grid_multiple: int = 16

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    def check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise :class:`UserError` naming the problem if the pair cannot go through this network."""
        for what, t in (("moving", moving), ("fixed", fixed)):
            if not isinstance(t, torch.Tensor):
                raise UserError(f"{self.name}: {what} must be a torch tensor, got {type(t).__name__}")
            if t.dim() != 5 or t.shape[1] != 1:
                raise UserError(f"{self.name}: {what} must be B×1×D0×D1×D2, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise UserError(f"{self.name}: {what} must be a floating point tensor, got {t.dtype}")
        if moving.shape != fixed.shape:
            raise UserError(
                f"{self.name}: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape"
            )
        m = self.grid_multiple
        bad = [int(s) for s in fixed.shape[2:] if s % m or s < m]
        if bad:
            raise UserError(
                f"{self.name}: every image dimension must be a multiple of {m}, got {tuple(fixed.shape[2:])} "
                f"(pad or crop to the model grid)"
            )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:  # noqa: D102
        from ..core.sample import clear_cache

        self.check_inputs(moving, fixed)
        try:
            return self._forward(moving, fixed)
        finally:
            clear_cache()  # no full-resolution identity grid outlives the call

    def _forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        raise NotImplementedError

    # encoder/decoder split of the parameter count (model table of the paper)
    def parameter_split(self) -> tuple[int, int]:
        """(encoder, decoder) trainable parameter counts."""
        enc = getattr(self, "encoder", None)
        n_enc = count_parameters(enc) if isinstance(enc, nn.Module) else 0
        return n_enc, count_parameters(self) - n_enc
