"""The registration networks: the paper's six DP variants and four baselines, behind one registry.

``from napari_unireg.models import list_models, build_model, load_pretrained`` does not import torch;
building or loading a network does.
"""

from .registry import DP_MODELS, MODEL_NAMES, ModelInfo, build_model, list_models, load_pretrained

__all__ = ["DP_MODELS", "MODEL_NAMES", "ModelInfo", "build_model", "list_models", "load_pretrained",
           "RegistrationOutput", "save_weights", "load_weights"]


def __getattr__(name: str):
    if name == "RegistrationOutput":
        from .output import RegistrationOutput

        return RegistrationOutput
    if name in ("save_weights", "load_weights"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
