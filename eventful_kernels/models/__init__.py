"""Conversion of timm ViTs and Hugging Face vision encoders into eventful models (see docs/nn-api.md, "Models" and
"Hugging Face vision encoders").

``convert(model, policy, backend)`` -> :class:`EventfulModel`; ``load_checkpoint(model, path)`` for timm-format
weights; ``import_timm()`` imports timm beside a CPU-only torch; :mod:`.hf` holds the Hugging Face adapters;
``quantize_int8(model)`` gives a dynamic-int8 copy for the CPU.
"""
from ._timm import import_timm
from .checkpoint import load_checkpoint, read_state_dict
from .convert import convert, model_family
from .eventful_model import EventfulModel
from .quantize import quantize_int8

__all__ = [
    "EventfulModel",
    "convert",
    "import_timm",
    "load_checkpoint",
    "model_family",
    "quantize_int8",
    "read_state_dict",
]
