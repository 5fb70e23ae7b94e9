"""Typed wrappers over ``torch.ops.eventful`` plus fake (meta) kernels so ``torch.compile`` and opcheck trace them.

Semantics of every op: :mod:`eventful_kernels.reference`. Shapes: ``x [B, N, D]`` or ``[B, H, N, D]``,
``index [B, K]`` int32/int64 shared over heads; an entry ``-1`` is an empty slot that every op skips. In-place ops
(trailing ``_``) return the tensor they mutate.

Index values: by default (``check_index=True``) every op that takes an index checks its values (ids in ``[0, N)`` or
``-1``, distinct where the op writes through them) before writing anything, and raises an error naming the argument.
On CUDA that check reads one flag back to the host (a synchronisation). ``check_index=False`` is for indices the
caller vouches for, e.g. those the gates return: no check and no synchronisation (CUDA-graph capturable); ids
outside ``[0, N)`` are then treated as empty slots (nothing out of bounds is ever read or written) and duplicate ids
in a write give an unspecified one of the written values.

Every argument is checked before anything is written: ``None`` for a tensor raises ``TypeError`` naming it. The ops
are inference-only (no autograd): with grad mode on, a tensor argument that requires grad is refused with a
``RuntimeError`` naming it (call under ``torch.no_grad()`` / ``torch.inference_mode()``, or pass a detached tensor).
Like PyTorch's own in-place ops, each call bumps the version counter (``t._version``) of every tensor it mutates
(annotated ``Tensor(a!)`` in csrc/ops.cpp) by one. Both hold on every backend (registered once, in csrc/ops.cpp).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

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


def gather_cols(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]``: ``[B,(H,)M,N]`` -> ``[B,(H,)M,K]`` (zero columns at empty
    slots)."""
    return _ops.gather_cols(x, index, check_index=check_index)


def scatter_cols_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k]`` in place (ids in a row must be distinct)."""
    _ops.scatter_cols_(dst, index, src, check_index=check_index)
    return dst


def token_gate(c: Tensor, ref: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k gate on ``||c - ref||_2``: returns ``(index [B,k] int64 ascending, c_sel [B,k,D])``; ``ref[index] = c_sel``."""
    return _ops.token_gate(c, ref, k)


def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tokens with ``||c - ref||_2 > threshold`` (finite), at most ``capacity`` (``0 <= capacity <= N``; largest
    kept), no host sync.

    Returns ``(index [B,capacity] int64, count [B] int64, c_sel [B,capacity,D])``; entries past ``count[b]`` are
    ``-1`` (empty slots, which every op skips) / zero rows. ``ref`` is updated at the selected tokens.
    """
    return _ops.token_gate_threshold(c, ref, threshold, capacity)


def token_delta_gate(
    c: Tensor, ref: Tensor, k: int = -1, index: Optional[Tensor] = None, *, check_index: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: ``(index, c_sel, e_sel = c_sel - ref_old[index])``; ``index`` given forces the selection."""
    return _ops.token_delta_gate(c, ref, k, index, check_index=check_index)


def qk_update_(
    logits: Tensor,
    q: Tensor,
    k: Tensor,
    index_q: Tensor,
    index_k: Tensor,
    scale: float,
    rel_h: Optional[Tensor] = None,
    rel_w: Optional[Tensor] = None,
    *,
    check_index: bool = True,
) -> Tensor:
    """Recompute rows ``index_q`` and columns ``index_k`` of ``logits [B,H,Nq,Nk] = q @ k^T * scale (+ bias)`` in
    place. ``rel_h [B,H,Nq,Gh]`` / ``rel_w [B,H,Nq,Gw]`` (``Gh*Gw = Nk``): the decomposed rel-pos bias
    ``rel_h[.., i, j // Gw] + rel_w[.., i, j % Gw]`` added to every recomputed entry (both or neither)."""
    _ops.qk_update_(logits, q, k, index_q, index_k, scale, rel_h, rel_w, check_index=check_index)
    return logits


def av_delta_update_(
    out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor, *, check_index: bool = True
) -> Tensor:
    """``out += a_new[...,S] @ v_new[S] - a_ref[...,S] @ v_ref[S]``, then ``a_ref[...,S]``/``v_ref[S]`` refreshed."""
    _ops.av_delta_update_(out, a_new, a_ref, v_new, v_ref, index, check_index=check_index)
    return out


# ---- fake kernels: output metadata only, so torch.compile / opcheck / meta tensors trace every op ----

@torch.library.register_fake("eventful::gather_rows")
def _gather_rows_fake(x, index, *, check_index=True):
    return x.new_empty((*x.shape[:-2], index.shape[1], x.shape[-1]))


@torch.library.register_fake("eventful::gather_cols")
def _gather_cols_fake(x, index, *, check_index=True):
    return x.new_empty((*x.shape[:-1], index.shape[1]))


@torch.library.register_fake("eventful::scatter_rows_")
def _scatter_rows_fake(dst, index, src, *, check_index=True):
    return None


@torch.library.register_fake("eventful::scatter_cols_")
def _scatter_cols_fake(dst, index, src, *, check_index=True):
    return None


@torch.library.register_fake("eventful::token_gate")
def _token_gate_fake(c, ref, k):
    b, _, d = c.shape
    return c.new_empty((b, k), dtype=torch.long), c.new_empty((b, k, d))


@torch.library.register_fake("eventful::token_gate_threshold")
def _token_gate_threshold_fake(c, ref, threshold, capacity):
    b, n, d = c.shape
    # the kernels' argument checks that decide the output shape / validity (messages as csrc/include/eventful/checks.h)
    msg = f"eventful: argument 'capacity' must satisfy 0 <= capacity <= N = {n} (tokens in 'c'), got {capacity}"
    torch._check_value(capacity >= 0, lambda: msg)
    torch._check_value(capacity <= n, lambda: msg)
    if isinstance(threshold, (int, float)) and not math.isfinite(threshold):
        raise ValueError(f"eventful: argument 'threshold' must be finite, got {float(threshold)}")
    return (
        c.new_empty((b, capacity), dtype=torch.long),
        c.new_empty((b,), dtype=torch.long),
        c.new_empty((b, capacity, d)),
    )


@torch.library.register_fake("eventful::token_delta_gate")
def _token_delta_gate_fake(c, ref, k, index=None, *, check_index=True):
    b, _, d = c.shape
    kk = index.shape[1] if index is not None else k
    return c.new_empty((b, kk), dtype=torch.long), c.new_empty((b, kk, d)), c.new_empty((b, kk, d))


@torch.library.register_fake("eventful::qk_update_")
def _qk_update_fake(logits, q, k, index_q, index_k, scale, rel_h=None, rel_w=None, *, check_index=True):
    return None


@torch.library.register_fake("eventful::av_delta_update_")
def _av_delta_update_fake(out, a_new, a_ref, v_new, v_ref, index, *, check_index=True):
    return None
