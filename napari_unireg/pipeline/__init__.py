"""One registration as a sequence of stages (load → pre-align → model grid → predict → refine → native grid →
metrics → write, :mod:`.stages`); the public API the CLI, the napari widgets and the benchmarks use."""

from ..errors import Cancelled
from .device import available_devices, resolve_device
from .models import default_model_name
from .register import register_volumes, validate_options, warm_up
from .types import STAGE_WEIGHTS, STAGES, RegisterOptions, RegistrationResult
from .write import OUTPUTS, RESULT_FILES, json_ready, write_result

__all__ = [
    "Cancelled",
    "OUTPUTS",
    "RESULT_FILES",
    "STAGES",
    "STAGE_WEIGHTS",
    "RegisterOptions",
    "RegistrationResult",
    "available_devices",
    "default_model_name",
    "json_ready",
    "register_volumes",
    "resolve_device",
    "validate_options",
    "warm_up",
    "write_result",
]
