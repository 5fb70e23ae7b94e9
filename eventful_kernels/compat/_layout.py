"""Map the published modules' tensors (any leading dims, tokens as rows or as columns) onto the ops' layout.

A token tensor is ``[*L, N, D]`` (``"row"``: tokens on the second-to-last dim) or ``[*L, D, N]`` (``"col"``: tokens
on the last dim); an index is ``[*P, K]`` with ``P`` a prefix of ``L``, shared over the remaining leading dims. The
ops take ``[B, H, N, D]`` / ``[B, H, D, N]`` with an index ``[B, K]`` shared over ``H``: ``B = prod(P)``,
``H = prod(L[len(P):])``.
"""
from __future__ import annotations

from math import prod
from typing import Tuple

import torch
from torch import Tensor

STRUCTURES = ("row", "col")


def check_structure(structure) -> str:
    if structure not in STRUCTURES:
        raise ValueError(f"eventful: argument 'structure' must be 'row' or 'col', got {structure!r}")
    return structure


def check_index(index, x: Tensor, name: str) -> Tensor:
    """``index`` must be an int32/int64 tensor ``[*P, K]`` whose ``P`` is a prefix of ``x``'s leading dims."""
    lead = tuple(x.shape[:-2])
    if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64) or index.dim() < 1:
        raise ValueError(f"eventful: argument '{name}' must be an int32/int64 tensor [..., K], got "
                         f"{type(index).__name__ if not isinstance(index, Tensor) else index.dtype}")
    prefix = tuple(index.shape[:-1])
    if lead[: len(prefix)] != prefix or index.device != x.device:
        raise ValueError(f"eventful: argument '{name}' has shape {tuple(index.shape)} on {index.device}; its leading "
                         f"dims must be a prefix of {lead} (on {x.device})")
    return index


def split(x: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
    """``(x4 [B, H, a, b], index2 [B, K])`` for ``x [*L, a, b]`` and ``index [*P, K]``."""
    p = index.dim() - 1
    b, h = prod(x.shape[:p]), prod(x.shape[p:-2])
    return x.reshape(b, h, *x.shape[-2:]), index.reshape(b, index.shape[-1])


def gather(ops, x: Tensor, index: Tensor, structure: str, check: bool = True) -> Tensor:
    """The tokens ``index`` of ``x``: ``[*L, K, D]`` (row) or ``[*L, D, K]`` (col); zeros at ``-1`` slots."""
    x4, i2 = split(x, index)
    if structure == "row":
        y = ops.gather_rows(x4, i2, check_index=check)
        return y.view(*x.shape[:-2], i2.shape[1], x.shape[-1])
    y = ops.gather_cols(x4, i2, check_index=check)
    return y.view(*x.shape[:-1], i2.shape[1])


def scatter_(ops, state: Tensor, index: Tensor, src: Tensor, structure: str, check: bool = True) -> Tensor:
    """Write ``src`` (as :func:`gather` returns) into the tokens ``index`` of ``state`` (contiguous) in place."""
    s4, i2 = split(state, index)
    src4 = src.reshape(*s4.shape[:2], *src.shape[-2:])
    if structure == "row":
        ops.scatter_rows_(s4, i2, src4, check_index=check)
    else:
        ops.scatter_cols_(s4, i2, src4, check_index=check)
    return state
