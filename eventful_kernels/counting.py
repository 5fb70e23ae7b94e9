"""Per-frame operation counts (multiply-accumulates, MACs) of eventful modules and of the dense baseline.

Counted: linear layers ``K*in*out`` per stream, QK^T rows/columns ``H*(Kq*Nk + N*Kk)*d``, A·V delta
``2*H*N*Kk*d``, dense attention ``2*H*N*Nk*d`` (QK^T + A·V; per window for windowed attention). ``Nk = N`` keys,
or with K/V pooling (``kv_pool = p``) ``Nk = P + (Gh//p)*(Gw//p)`` pooled keys and ``Kk`` the width of the pooled
changed-token index, ``min(Kq, Nk)``. Widths are those the frame runs (a threshold policy's capacity, ``-1`` empty
slots included). The A·V product counts the same in float16/bfloat16 (``av_dtype``). Not counted: normalisation,
softmax, activations, residual adds, gate scores, the rel-pos bias, the K/V pooling (additions).
GFLOPs = 2 * MACs / 1e9.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from torch import nn

try:  # int8 linears of torch.ao.quantization (static and dynamic); the package is deprecated in recent torch
    from torch.ao.nn.quantized import Linear as _QuantizedLinear

    LINEAR_TYPES: Tuple[type, ...] = (nn.Linear, _QuantizedLinear)
except ImportError:  # pragma: no cover - a torch without it
    LINEAR_TYPES = (nn.Linear,)


def count_macs(module: nn.Module) -> int:
    """MACs of the last frame: ``last_macs`` summed over the outermost eventful modules in ``module``.

    An eventful module's ``last_macs`` already includes its eventful children (a block counts its gates, buffers
    and attention), so the walk does not descend into eventful modules.
    """
    from .nn.backend import EventfulModule  # imported here: eventful_kernels.nn imports this module

    if isinstance(module, EventfulModule):
        return int(module.last_macs)
    return sum(count_macs(m) for m in module.children())


def linear_macs_per_token(module: nn.Module) -> int:
    """``sum(in_features * out_features)`` over the linear layers in ``module`` (itself included): ``nn.Linear``
    and the int8 linears of ``torch.ao.quantization`` (:data:`LINEAR_TYPES`)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, LINEAR_TYPES))


def pooled_tokens(grid: Tuple[int, int], kv_pool: int, prefix_tokens: int = 0) -> int:
    """Keys after K/V pooling: ``P + (Gh // p) * (Gw // p)`` (:class:`eventful_kernels.nn.attention.KVPool`)."""
    return prefix_tokens + (grid[0] // kv_pool) * (grid[1] // kv_pool)


def dense_block_macs(
    n_tokens: Union[int, Tuple[int, int]], dim: int, heads: int, mlp_ratio: float, window: Optional[int] = None,
    kv_pool: Optional[int] = None, prefix_tokens: int = 0,
) -> int:
    """MACs of one dense ViT block on one stream of ``n_tokens`` tokens.

    ``qkv 3*N*D^2 + attention 2*N*N*D + proj N*D^2 + MLP 2*N*D*int(D*mlp_ratio)``. With ``window = ws``
    (ViTDet/SAM windowed attention) ``n_tokens`` is the grid ``(H, W)`` (an int must be a square ``H*W``); the grid
    is padded to multiples of ``ws`` and, as in the dense model, qkv, attention (``2*Np*ws*ws*D``) and proj run on
    the ``Np = Hp*Wp`` padded tokens while the MLP runs on the ``N`` real tokens.

    With ``kv_pool = p`` (global attention on keys/values pooled ``p x p``) attention is ``2*N*Nk*D``,
    ``Nk = P + (Gh//p)*(Gw//p)``: ``n_tokens`` is the grid ``(Gh, Gw)`` (then ``N = P + Gh*Gw``) or the token count
    ``N`` (the grid the square of ``N - P``), ``P = prefix_tokens``.
    """
    if dim <= 0 or heads <= 0 or dim % heads:
        raise ValueError(f"eventful: 'dim' ({dim}) must be a positive multiple of 'heads' ({heads})")
    hidden = int(dim * mlp_ratio)
    if isinstance(n_tokens, tuple):
        gh, gw = n_tokens
        n = gh * gw + (prefix_tokens if kv_pool else 0)
    else:
        n = int(n_tokens)
        gh = gw = None
    mlp = 2 * n * dim * hidden
    if kv_pool is not None and (isinstance(kv_pool, bool) or not isinstance(kv_pool, int) or kv_pool < 2):
        raise ValueError(f"eventful: argument 'kv_pool' must be None or an int >= 2, got {kv_pool!r}")
    if kv_pool:
        if window:
            raise ValueError("eventful: 'kv_pool' applies to global attention only, not with 'window'")
        if gh is None:
            side = math.isqrt(max(n - prefix_tokens, 0))
            if side * side != n - prefix_tokens:
                raise ValueError(f"eventful: {n} tokens minus {prefix_tokens} prefix tokens is no square grid; "
                                 "pass the grid (H, W)")
            gh = gw = side
        nk = pooled_tokens((gh, gw), kv_pool, prefix_tokens)
        return 3 * n * dim * dim + 2 * n * nk * dim + n * dim * dim + mlp
    if not window:
        return 3 * n * dim * dim + 2 * n * n * dim + n * dim * dim + mlp
    if gh is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"eventful: windowed 'n_tokens' must be (H, W) or a square, got {n_tokens}")
        gh = gw = side
    np_ = (gh + (-gh % window)) * (gw + (-gw % window))
    return 3 * np_ * dim * dim + 2 * np_ * window * window * dim + np_ * dim * dim + mlp
