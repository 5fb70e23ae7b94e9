"""Dynamic int8 quantization of a model's linear layers, for the CPU.

``quantize_int8(model)`` is ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` on a
copy: int8 weights, activations quantized per call, everything else (LayerNorms, convolutions, embeddings) left in
float32. The copy converts like any model (``convert(quantize_int8(model), 0.25)``); its eventful blocks run the
int8 linears on the tokens each gate selects. PyTorch marks ``torch.ao.quantization`` deprecated; its notice is
silenced here.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn.backend import float_weight


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamic-int8 copy of ``model`` (float32, on the CPU); ``model`` is left as it is."""
    need = "quantize_int8: dynamic int8 quantization needs a float32 model on the CPU, got"
    try:
        weight = float_weight(model)
    except ValueError:
        raise ValueError(f"{need} no floating-point weights") from None
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"{need} {weight.dtype} on {weight.device}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
