"""gather_rows, scatter_rows_, scatter_rows_residual_, gather_cols, scatter_cols_: rows ``[B, (H,) N, D]`` and
columns ``[B, (H,) M, N]`` selected by ``index [B, K]``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.eventful


def gather_rows(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) k] = x[b, (h,) index[b, k]]``: ``[B,(H,)N,D]`` -> ``[B,(H,)K,D]`` (zero rows at empty slots)."""
    return _ops.gather_rows(x, index, check_index=check_index)


def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) index[b, k]] = src[b, (h,) k]`` in place (ids in a row must be distinct)."""
    _ops.scatter_rows_(dst, index, src, check_index=check_index)
    return dst


def scatter_rows_residual_(dst: Tensor, index: Tensor, src: Tensor, residual: Tensor, scale: Optional[Tensor] = None,
                           *, check_index: bool = True) -> Tensor:
    """``dst[b, index[b, k]] = src[b, k]`` in place, and returns ``y = residual + dst`` (``residual + dst * scale``
    with ``scale [D]``, as ``torch.addcmul``) in the same pass: ``dst``/``residual [B, N, D]``, ``src [B, K, D]``,
    ``y [B, N, D]`` contiguous; float32 arithmetic, one rounding. The residual add of an eventful block's patched
    buffer in one kernel, where ``scatter_rows_`` and an add take two."""
    return _ops.scatter_rows_residual_(dst, index, src, residual, scale, check_index=check_index)


def gather_cols(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]``: ``[B,(H,)M,N]`` -> ``[B,(H,)M,K]`` (zero columns at empty
    slots)."""
    return _ops.gather_cols(x, index, check_index=check_index)


def scatter_cols_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k]`` in place (ids in a row must be distinct)."""
    _ops.scatter_cols_(dst, index, src, check_index=check_index)
    return dst


@torch.library.register_fake("eventful::gather_rows")
def _gather_rows_fake(x, index, *, check_index=True):
    return x.new_empty((*x.shape[:-2], index.shape[1], x.shape[-1]))


@torch.library.register_fake("eventful::gather_cols")
def _gather_cols_fake(x, index, *, check_index=True):
    return x.new_empty((*x.shape[:-1], index.shape[1]))


@torch.library.register_fake("eventful::scatter_rows_")
def _scatter_rows_fake(dst, index, src, *, check_index=True):
    return None


@torch.library.register_fake("eventful::scatter_rows_residual_")
def _scatter_rows_residual_fake(dst, index, src, residual, scale=None, *, check_index=True):
    return torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)


@torch.library.register_fake("eventful::scatter_cols_")
def _scatter_cols_fake(dst, index, src, *, check_index=True):
    return None
