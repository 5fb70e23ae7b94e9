"""Conversion of timm ViTs and Hugging Face vision encoders into eventful models (see docs/nn-api.md, "Models" and
"Hugging Face vision encoders").

``convert(model, policy, backend)`` -> :class:`EventfulModel`; ``load_checkpoint(model, path)`` for timm-format
weights; ``import_timm()`` imports timm beside a CPU-only torch; :mod:`.hf` holds the Hugging Face adapters.
"""
from ._timm import import_timm
from .checkpoint import load_checkpoint, read_state_dict
from .convert import convert, model_family
from .eventful_model import EventfulModel
from .policy import make_policy, parse_budget

__all__ = [
    "EventfulModel",
    "convert",
    "import_timm",
    "load_checkpoint",
    "make_policy",
    "model_family",
    "parse_budget",
    "read_state_dict",
]
