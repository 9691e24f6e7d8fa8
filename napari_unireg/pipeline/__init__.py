"""One registration as a sequence of stages (load → pre-align → model grid → predict → refine → native grid →
metrics → write); the public API the CLI, the napari widgets and the benchmarks use."""

from ..errors import Cancelled
from .register import available_devices, default_model_name, register_volumes, write_result
from .types import STAGES, RegisterOptions, RegistrationResult

__all__ = [
    "Cancelled",
    "STAGES",
    "RegisterOptions",
    "RegistrationResult",
    "available_devices",
    "default_model_name",
    "register_volumes",
    "write_result",
]
