"""Build a Hugging Face vision encoder for ``eventful-video --model hf:<spec>``; nothing is ever downloaded.

``<spec>`` is, in this order:

1. a preset name (:data:`PRESETS`: ``vit-base``, ``dinov2-small``, ``clip-vit-b16``, ``siglip-so400m`` ...): the
   architecture of that published model, built from its config with random weights (seeded);
2. a local path: a ``config.json`` file (random weights) or a directory saved by ``save_pretrained`` (its weights
   when it holds them, else random; a full CLIP / SigLIP checkpoint gives its vision tower);
3. a Hugging Face hub id (``google/siglip-base-patch16-224``): loaded from the local hub cache only
   (``local_files_only``); a clear error when it is not cached.

Config overrides (``--model-kwargs``) are applied to the config (e.g. a tiny depth for tests). The frames'
normalisation comes from the directory's ``preprocessor_config.json`` when there is one, else the family's usual one.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import torch
from torch import nn

from .hf import import_transformers

# Architectures of published encoders (random weights). DINOv2 at 224 px (its config says 518, the position
# embedding is then interpolated every frame; 224 is the usual input).
PRESETS = {
    "vit-base": ("vit", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             image_size=224, patch_size=16)),
    "vit-large": ("vit", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              image_size=224, patch_size=16)),
    "dinov2-small": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                                    patch_size=14)),
    "dinov2-base": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                                   patch_size=14)),
    "dinov2-small-registers": ("dinov2_with_registers", dict(hidden_size=384, num_hidden_layers=12,
                                                             num_attention_heads=6, image_size=224, patch_size=14,
                                                             num_register_tokens=4)),
    "clip-vit-b16": ("clip_vision_model", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                               intermediate_size=3072, image_size=224, patch_size=16,
                                               hidden_act="quick_gelu")),
    "clip-vit-l14": ("clip_vision_model", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, image_size=224, patch_size=14,
                                               hidden_act="quick_gelu")),
    "siglip-base": ("siglip_vision_model", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                intermediate_size=3072, image_size=224, patch_size=16)),
    "siglip-so400m": ("siglip_vision_model", dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                                  intermediate_size=4304, image_size=384, patch_size=14)),
}

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# config.model_type -> (model class, normalisation); full CLIP / SigLIP configs give their vision_config.
_TYPES = {
    "vit": ("ViTModel", _HALF),
    "dinov2": ("Dinov2Model", _IMAGENET),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", _IMAGENET),
    "clip_vision_model": ("CLIPVisionModel", _CLIP),
    "siglip_vision_model": ("SiglipVisionModel", _HALF),
}
_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _class_for(config) -> Tuple[type, object, tuple]:
    """(model class, the config it takes, default normalisation) for a config of a supported model type."""
    transformers = import_transformers()
    model_type = config.model_type
    if model_type in _TOWERS:
        config, model_type = config.vision_config, _TOWERS[model_type]
    if model_type not in _TYPES:
        raise ValueError(f"hf: model type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(set(_TYPES) | set(_TOWERS)))}")
    name, norm = _TYPES[model_type]
    return getattr(transformers, name), config, norm


def _config_for(model_type: str, **fields):
    transformers = import_transformers()
    return transformers.AutoConfig.for_model(model_type, **fields)


def _read_norm(directory: str) -> Optional[tuple]:
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    return (tuple(mean), tuple(std)) if mean and std else None


def create_model(spec: str, seed: int = 0, checkpoint: Optional[str] = None, **overrides) -> nn.Module:
    """The encoder named by ``spec`` (see the module docstring), in eval mode, float32. ``checkpoint``: a state-dict
    or ``.safetensors`` file with the encoder's own key names, loaded over the weights (strict)."""
    transformers = import_transformers()
    weights_dir = None
    norm = None
    if spec in PRESETS:
        model_type, fields = PRESETS[spec]
        config = _config_for(model_type, **{**fields, **overrides})
    elif os.path.isfile(spec):
        config = transformers.AutoConfig.from_pretrained(spec, **overrides)
    elif os.path.isdir(spec):
        config = transformers.AutoConfig.from_pretrained(spec, **overrides)
        norm = _read_norm(spec)
        if any(os.path.isfile(os.path.join(spec, w)) for w in _WEIGHTS):
            weights_dir = spec
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True, **overrides)
        except OSError as exc:
            raise ValueError(f"hf: {spec!r} is not a preset ({', '.join(PRESETS)}), not a local path, and not in "
                             "the local Hugging Face cache (models are never downloaded here; fetch it first, e.g. "
                             "`hf download <id>`, or pass a directory)") from exc
        weights_dir = spec
    cls, config, default_norm = _class_for(config)
    torch.manual_seed(seed)
    if weights_dir is not None:
        model = cls.from_pretrained(weights_dir, config=config, local_files_only=True, dtype=torch.float32)
    else:
        model = cls(config)
    model = model.float().eval()
    if checkpoint:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    model.eventful_normalization = norm or default_norm
    return model


def input_spec(model: nn.Module) -> Tuple[int, tuple, tuple]:
    """(image size, mean, std) for a model made by :func:`create_model` (the family default if made otherwise)."""
    size = model.config.image_size
    size = size[-1] if isinstance(size, (tuple, list)) else size
    norm = getattr(model, "eventful_normalization", None)
    if norm is None:
        norm = _class_for(model.config)[2]
    return int(size), tuple(norm[0]), tuple(norm[1])
