"""Triton ``qk_update_``: recompute the selected rows and columns of ``logits = q @ k^T * scale (+ bias)`` in place.

One launch, 1-D grid of two tile families, each a ``tl.dot`` loop over the head dim written straight into ``logits``
(no temporaries): row tiles ``[BLOCK_M of index_q] x [BLOCK_N of all Nk]`` and column tiles ``[BLOCK_M of all Nq] x
[BLOCK_N of index_k]``. Where a row and a column are both selected the element is written by both families with the
same float32 value (a benign duplicate write). With the optional decomposed rel-pos state ``rel_h [B,H,Nq,Gh]`` /
``rel_w [B,H,Nq,Gw]`` (``Gh*Gw = Nk``; constexpr ``HAS_BIAS``) each tile adds the bias ``rel_h[.., i, j // Gw] +
rel_w[.., i, j % Gw]`` (loaded through its strides, in float32) to ``scale * q_i.k_j`` before the single cast to
``logits.dtype``; the full ``[Nq, Nk]`` bias is never materialised.
Shapes: ``[B, H, N, d]`` / ``[B, H, M, N]`` (rank 3 = one head); ``index_q/index_k [B, K]`` shared over heads; slots
holding -1 (or, unchecked, any id outside ``[0, N)``) are skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import (as_4d, autotune_configs, cast_out, cdiv, dot_precision, dot_upcast, load_ids, next_pow2,
                       on_device, require_launchable, soft_bf16)

_checks = torch.ops.eventful  # the C++ argument checks: _check_<op> (csrc/checks.cpp)


_QK_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
     for bm, bn, w, s in [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 64, 4, 2)]],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}))


@triton.autotune(configs=_QK_CONFIGS, key=["Nq", "Nk", "Dh", "Kq", "Kk", "IS_F32", "HAS_BIAS"])
@triton.jit
def _qk_update_kernel(l_ptr, q_ptr, k_ptr, iq_ptr, ik_ptr, rh_ptr, rw_ptr, H, Nq, Nk, Dh, Kq, Kk, Gw, scale,
                      l_b, l_h, l_m, l_n, q_b, q_h, q_m, q_d, k_b, k_h, k_n, k_d, iq_b, iq_k, ik_b, ik_k,
                      rh_b, rh_h, rh_m, rh_g, rw_b, rw_h, rw_m, rw_g, BH,
                      IS_F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # HAS_BIAS: rh_ptr/rw_ptr are rel_h [B,H,Nq,Gh] / rel_w [B,H,Nq,Gw] (Gh*Gw = Nk); otherwise dummies never read.
    pid = tl.program_id(0).to(tl.int64)
    n_kqb = tl.cdiv(Kq, BLOCK_M)
    n_nb = tl.cdiv(Nk, BLOCK_N)
    n_row_tiles = BH * n_kqb * n_nb
    if pid < n_row_tiles:  # rows index_q[slots] x columns [cols]
        nb = pid % n_nb
        qb = (pid // n_nb) % n_kqb
        bh = pid // (n_nb * n_kqb)
        b = bh // H
        q_slots = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows, rmask = load_ids(iq_ptr + b * iq_b, q_slots, iq_k, Kq, Nq)
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < Nk
    else:  # rows [rows] x columns index_k[slots]
        p = pid - n_row_tiles
        n_kkb = tl.cdiv(Kk, BLOCK_N)
        n_mb = tl.cdiv(Nq, BLOCK_M)
        kb = p % n_kkb
        mb = (p // n_kkb) % n_mb
        bh = p // (n_kkb * n_mb)
        b = bh // H
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Nq
        k_slots = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        cols, cmask = load_ids(ik_ptr + b * ik_b, k_slots, ik_k, Kk, Nk)
    h = bh % H
    rows = tl.where(rmask, rows, 0)
    cols = tl.where(cmask, cols, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, Dh, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < Dh
        qa = tl.load(q_ptr + b * q_b + h * q_h + rows[:, None] * q_m + ds[None, :] * q_d,
                     mask=rmask[:, None] & dm[None, :], other=0)
        kt = tl.load(k_ptr + b * k_b + h * k_h + cols[None, :] * k_n + ds[:, None] * k_d,
                     mask=cmask[None, :] & dm[:, None], other=0)
        if UPCAST:
            qa = qa.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qa, kt, acc, input_precision=PREC)
    acc = acc * scale
    if HAS_BIAS:  # bias[i, j] = rel_h[i, j // Gw] + rel_w[i, j % Gw], summed in float32 like the reference
        bm = rmask[:, None] & cmask[None, :]
        rh = tl.load(rh_ptr + b * rh_b + h * rh_h + rows[:, None] * rh_m + (cols // Gw)[None, :] * rh_g,
                     mask=bm, other=0).to(tl.float32)
        rw = tl.load(rw_ptr + b * rw_b + h * rw_h + rows[:, None] * rw_m + (cols % Gw)[None, :] * rw_g,
                     mask=bm, other=0).to(tl.float32)
        acc = acc + (rh + rw)
    tl.store(l_ptr + b * l_b + h * l_h + rows[:, None] * l_m + cols[None, :] * l_n,
             cast_out(acc, l_ptr.dtype.element_ty, SOFT_BF16), mask=rmask[:, None] & cmask[None, :])


@on_device
def qk_update_(logits: Tensor, q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, scale: float,
               rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None, *, check_index: bool = True) -> Tensor:
    """Recompute rows ``index_q`` and columns ``index_k`` of ``logits [B,H,Nq,Nk] = q @ k^T * scale`` in place.

    ``q [B,H,Nq,d]``, ``k [B,H,Nk,d]`` (same dtype), ``index_q/index_k [B,Kq]/[B,Kk]``; products accumulate in
    float32 and are cast to ``logits.dtype``. Optional ``rel_h [B,H,Nq,Gh]`` and ``rel_w [B,H,Nq,Gw]`` (both or
    neither; rank, dtype of ``q``, ``Gh*Gw = Nk``): every recomputed entry ``(i, j)`` also gets
    ``rel_h[.., i, j // Gw] + rel_w[.., i, j % Gw]``, added in float32 before the cast. Empty slots (-1) of either
    index recompute nothing; ``check_index=False``: no value check, no host sync. Returns ``logits``.
    """
    _checks._check_qk_update(logits, q, k, index_q, index_k, scale, rel_h, rel_w, check_index=check_index)
    require_launchable(logits)
    Nq, Nk = logits.size(-2), logits.size(-1)
    l4, q4, k4 = as_4d(logits), as_4d(q), as_4d(k)
    B, H, _, Dh = q4.shape
    Kq, Kk = index_q.size(1), index_k.size(1)
    if B * H == 0 or (Kq * Nk == 0 and Kk * Nq == 0):
        return logits
    block_d = min(max(next_pow2(Dh), 16), 128)
    has_bias = rel_h is not None
    if has_bias:  # rank and dims checked above; Gw >= 1 here since Nk > 0
        rh4, rw4 = as_4d(rel_h), as_4d(rel_w)
        gw, bias_strides = rw4.size(-1), (*rh4.stride(), *rw4.stride())
    else:  # dummy pointers (never read) and zero strides
        rh4 = rw4 = l4
        gw, bias_strides = 1, (0,) * 8

    def grid(meta):
        return (B * H * (cdiv(Kq, meta["BLOCK_M"]) * cdiv(Nk, meta["BLOCK_N"])
                         + cdiv(Nq, meta["BLOCK_M"]) * cdiv(Kk, meta["BLOCK_N"])),)

    _qk_update_kernel[grid](
        l4, q4, k4, index_q, index_k, rh4, rw4, H, Nq, Nk, Dh, Kq, Kk, gw, float(scale),
        *l4.stride(), *q4.stride(), *k4.stride(), *index_q.stride(), *index_k.stride(), *bias_strides, B * H,
        IS_F32=q.dtype == torch.float32, PREC=dot_precision(q.dtype), UPCAST=dot_upcast(q.dtype),
        SOFT_BF16=soft_bf16(logits.dtype), HAS_BIAS=has_bias, BLOCK_D=block_d)
    return logits


KERNELS = {"qk_update_": qk_update_}
