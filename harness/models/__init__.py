from .adapter import ArchAdapter, UnknownArchitectureError, adapter_for, parse_override
from .loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, from_pretrained_objects, load_model
from .snapshot import WeightSnapshot, param_digest

__all__ = ["ArchAdapter", "UnknownArchitectureError", "adapter_for", "parse_override", "DEFAULT_MODEL",
           "LoadedModel", "ModelLoadError", "from_pretrained_objects", "load_model", "WeightSnapshot", "param_digest"]
