"""linear_bf16_pack / linear_bf16: a bf16 linear layer for CPUs without native bf16 arithmetic (AVX2 without
AVX512-BF16/AMX, where oneDNN's bf16 products run several times slower than float32): the weight is stored once as
bf16 panels, products accumulate in float32, one rounding to bf16 at the end. CPU only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import LINEAR_BF16_PANEL

_ops = torch.ops.eventful

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def linear_bf16_pack(weight: Tensor) -> Tensor:
    """``weight [out, in]`` bf16 -> ``[ceil(out/16), in, 16]`` bf16 panels (what :func:`linear_bf16` reads)."""
    return _ops.linear_bf16_pack(weight)


def linear_bf16(x: Tensor, packed: Tensor, bias: Optional[Tensor], out_features: int,
                activation: str = "none") -> Tensor:
    """``activation(x @ W.T + bias)``: ``x [..., in]`` bf16, ``packed`` from :func:`linear_bf16_pack`, ``bias [out]``
    bf16/float32 or None, ``activation`` one of :data:`ACTIVATIONS` (``gelu``: erf). Float32 accumulation, bias
    and activation; returns ``[..., out]`` bf16 rounded once (nearest even)."""
    return _ops.linear_bf16(x, packed, bias, out_features, activation)


@torch.library.register_fake("eventful::linear_bf16_pack")
def _linear_bf16_pack_fake(weight):
    n, k = weight.shape
    return weight.new_empty((-(-n // LINEAR_BF16_PANEL), k, LINEAR_BF16_PANEL))


@torch.library.register_fake("eventful::linear_bf16")
def _linear_bf16_fake(x, packed, bias, out_features, activation="none"):
    return x.new_empty((*x.shape[:-1], out_features))
