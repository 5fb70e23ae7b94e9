"""Load timm-format checkpoints (``.safetensors`` or a ``torch.save``'d state dict) into a timm ViT (or a Hugging
Face encoder's own state dict into it).

Handles the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` prefixes) and passes the
state dict through timm's own ``checkpoint_filter_fn`` for the model family, so original SAM image-encoder
checkpoints (``image_encoder.*``) and ViT checkpoints with a differently sized position embedding load too.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

from ._timm import import_timm


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: ``.safetensors`` via safetensors, anything else via ``torch.load``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"load_checkpoint: {path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Copy the weights in ``path`` into ``model`` (a timm ViT / SAM ViT, or a Hugging Face encoder with its own key
    names) in place; returns ``model``.

    Weights are copied into the existing parameters, so an eventful model sharing them sees the new values.
    With ``strict`` a missing or unexpected key raises ``RuntimeError`` listing them; shapes must match.
    """
    state = read_state_dict(path)
    if not type(model).__module__.startswith("transformers."):  # Hugging Face models take their own key names
        timm = import_timm()
        from timm.models import vision_transformer, vision_transformer_sam

        if isinstance(model, vision_transformer_sam.VisionTransformerSAM):
            state = vision_transformer_sam.checkpoint_filter_fn(state, model)
        elif isinstance(model, timm.models.vision_transformer.VisionTransformer):
            state = vision_transformer.checkpoint_filter_fn(state, model)
    _check_compatible(model, state, strict, path)
    model.load_state_dict(state, strict=strict)
    return model


def _check_compatible(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool, path: str) -> None:
    """Raise before anything is copied (``load_state_dict`` itself copies the good keys before complaining)."""
    own = model.state_dict()
    problems = []
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing:
            problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            problems.append(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    if problems:
        raise RuntimeError(f"load_checkpoint: {path} does not fit the model: " + "; ".join(problems))
