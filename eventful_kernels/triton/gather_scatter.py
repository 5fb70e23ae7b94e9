"""Triton gather/scatter of token rows and attention-map columns (pure data movement).

Rows: ``x [B, (H,) N, D]``, one program per (batch*head, block of K ids, block of D features). The feature block
is a contiguous ``tl.arange`` over a power-of-2 width, so with a unit feature stride (specialised to a constant by
the JIT) and 16-element-aligned strides each row moves in 16-byte vectors. Columns: ``x [B, (H,) M, N]``, one
program per (batch*head, block of M rows, block of K ids). ``index [B, K]`` (int32/int64) is shared over heads; ids
outside ``[0, N)`` (-1: empty slots) are skipped: a gather writes a zero row/column there, a scatter nothing.
One kernel per layout serves gather, scatter and indexed copy (``dst[idx] = src[idx]``) via constexpr flags.
``scatter_rows_residual_``: one program per (batch row, block of tokens) inverts the index over its tokens (which
slot, if any, writes each), then moves them block of features by block of features, so the scatter and the residual
add of a token happen in one program.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import (INTERPRET, as_4d, cast_out, cdiv, load_ids, next_pow2, on_device, require_launchable,
                       soft_bf16)

_checks = torch.ops.eventful  # the C++ argument checks: _check_<op> (csrc/checks.cpp)


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, H, K, D, n_ids,
                      s_b, s_h, s_n, s_d, d_b, d_h, d_n, d_d, i_b, i_k, n_kb, n_db,
                      SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # src/dst row r of program slot k: r = index[b, k] if that side is indexed, else k.
    pid = tl.program_id(0).to(tl.int64)
    db = pid % n_db
    t = pid // n_db
    kb = t % n_kb
    bh = t // n_kb
    h = bh % H
    b = bh // H
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    ids, valid = load_ids(idx_ptr + b * i_b, ks, i_k, K, n_ids)
    src_rows = ids if SRC_INDEXED else ks
    dst_rows = ids if DST_INDEXED else ks
    ds = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = ds < D
    ld_mask = valid[:, None] & dm[None, :]
    x = tl.load(src_ptr + b * s_b + h * s_h + src_rows[:, None] * s_n + ds[None, :] * s_d, mask=ld_mask, other=0)
    st_rows = valid if DST_INDEXED else km  # a gather writes zero rows for (unchecked) bad ids
    tl.store(dst_ptr + b * d_b + h * d_h + dst_rows[:, None] * d_n + ds[None, :] * d_d,
             x.to(dst_ptr.dtype.element_ty), mask=st_rows[:, None] & dm[None, :])


@triton.jit
def _copy_cols_kernel(src_ptr, dst_ptr, idx_ptr, H, M, K, n_ids,
                      s_b, s_h, s_m, s_n, d_b, d_h, d_m, d_n, i_b, i_k, n_mb, n_kb,
                      SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    kb = pid % n_kb
    t = pid // n_kb
    mb = t % n_mb
    bh = t // n_mb
    h = bh % H
    b = bh // H
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    ids, valid = load_ids(idx_ptr + b * i_b, ks, i_k, K, n_ids)
    src_cols = ids if SRC_INDEXED else ks
    dst_cols = ids if DST_INDEXED else ks
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    x = tl.load(src_ptr + b * s_b + h * s_h + rows[:, None] * s_m + src_cols[None, :] * s_n,
                mask=rm[:, None] & valid[None, :], other=0)
    st_cols = valid if DST_INDEXED else km
    tl.store(dst_ptr + b * d_b + h * d_h + rows[:, None] * d_m + dst_cols[None, :] * d_n,
             x.to(dst_ptr.dtype.element_ty), mask=rm[:, None] & st_cols[None, :])


@triton.jit
def _scatter_residual_kernel(dst_ptr, src_ptr, res_ptr, scale_ptr, y_ptr, idx_ptr, N, K, D,
                             d_b, d_n, d_d, s_b, s_n, s_d, r_b, r_n, r_d, i_b, i_k, n_nb,
                             SCALED: tl.constexpr, SOFT_BF16: tl.constexpr, EMULATED_FMA: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nb = pid % n_nb
    b = pid // n_nb
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    # slot[r]: the index slot writing token rows[r], -1 if none. Ids outside [0, N) match no token.
    slot = tl.full([BLOCK_N], -1, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        km = ks < K
        ids = tl.load(idx_ptr + b * i_b + ks * i_k, mask=km, other=-1).to(tl.int64)
        hit = (ids[None, :] == rows[:, None]) & km[None, :]
        slot = tl.maximum(slot, tl.max(tl.where(hit, ks[None, :], -1), axis=1))
    sel = (slot >= 0) & rm
    s_rows = tl.where(sel, slot, 0)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        m2 = rm[:, None] & dm[None, :]
        sel2 = sel[:, None] & dm[None, :]
        new = tl.load(src_ptr + b * s_b + s_rows[:, None] * s_n + ds[None, :] * s_d, mask=sel2, other=0)
        d_ptrs = dst_ptr + b * d_b + rows[:, None] * d_n + ds[None, :] * d_d
        old = tl.load(d_ptrs, mask=m2 & ~sel[:, None], other=0)
        v = tl.where(sel[:, None], new, old)
        tl.store(d_ptrs, v, mask=sel2)
        x = v.to(tl.float32)
        r = tl.load(res_ptr + b * r_b + rows[:, None] * r_n + ds[None, :] * r_d, mask=m2, other=0).to(tl.float32)
        if SCALED:
            g = tl.load(scale_ptr + ds, mask=dm, other=0).to(tl.float32)[None, :]
            # The interpreter's fma rounds twice. In float64 the float32 product is exact and the sum then rounds
            # twice (to float64, to float32), which equals one rounding but for ties at one part in 2^29.
            if EMULATED_FMA:
                r = (x.to(tl.float64) * g.to(tl.float64) + r.to(tl.float64)).to(tl.float32)
            else:
                r = tl.fma(x, g, r)
        else:
            r = r + x
        tl.store(y_ptr + (b * N + rows)[:, None] * D + ds[None, :], cast_out(r, y_ptr.dtype.element_ty, SOFT_BF16),
                 mask=m2)


def feature_block(d: int, cap: int = 512) -> int:
    """Power-of-2 block along a row's features, at most ``cap``: the largest that leaves at most 1/8 of the last
    block idle (D = 768 -> 256, three full blocks, not 512 + half a block)."""
    block = min(next_pow2(max(d, 1)), cap)
    while block > 64 and cdiv(d, block) * block - d > d // 8:
        block //= 2
    return block


def _row_blocks(k: int, d: int) -> tuple:
    block_d = feature_block(d)
    budget = 16384 if INTERPRET else 2048  # elements per program; the interpreter prefers few, large programs
    block_k = max(1, min(next_pow2(max(k, 1)), budget // block_d))
    return block_k, block_d


def copy_rows(src: Tensor, dst: Tensor, index: Tensor, n_ids: int, src_indexed: bool, dst_indexed: bool) -> None:
    """Launch the row kernel: ``src4/dst4 [B, H, *, D]`` views, ``K = index.size(1)`` rows moved per (b, h)."""
    s4, d4 = as_4d(src), as_4d(dst)
    B, H, D = d4.size(0), d4.size(1), d4.size(3)
    K = index.size(1)
    if B * H * K * D == 0:
        return
    block_k, block_d = _row_blocks(K, D)
    n_kb, n_db = cdiv(K, block_k), cdiv(D, block_d)
    warps = 8 if block_k * block_d >= 8192 else 4
    _copy_rows_kernel[(B * H * n_kb * n_db,)](
        s4, d4, index, H, K, D, n_ids, *s4.stride(), *d4.stride(), index.stride(0), index.stride(1), n_kb, n_db,
        SRC_INDEXED=src_indexed, DST_INDEXED=dst_indexed, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps)


def copy_cols(src: Tensor, dst: Tensor, index: Tensor, n_ids: int, src_indexed: bool, dst_indexed: bool) -> None:
    """Launch the column kernel: ``src4/dst4 [B, H, M, *]`` views, ``K = index.size(1)`` columns per (b, h)."""
    s4, d4 = as_4d(src), as_4d(dst)
    B, H, M = d4.size(0), d4.size(1), d4.size(2)
    K = index.size(1)
    if B * H * M * K == 0:
        return
    block_k = min(next_pow2(K), 64 if INTERPRET else 32)
    block_m = max(1, min(next_pow2(M), (16384 if INTERPRET else 4096) // block_k))
    n_mb, n_kb = cdiv(M, block_m), cdiv(K, block_k)
    _copy_cols_kernel[(B * H * n_mb * n_kb,)](
        s4, d4, index, H, M, K, n_ids, *s4.stride(), *d4.stride(), index.stride(0), index.stride(1), n_mb, n_kb,
        SRC_INDEXED=src_indexed, DST_INDEXED=dst_indexed, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)


@on_device
def gather_rows(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) k] = x[b, (h,) index[b, k]]``: ``x [B,(H,)N,D]`` -> ``y [B,(H,)K,D]`` contiguous (zero rows at
    empty slots). ``check_index=False``: no value check, no host sync."""
    _checks._check_gather_rows(x, index, check_index=check_index)
    require_launchable(x)
    y = x.new_empty((*x.shape[:-2], index.size(1), x.size(-1)))
    copy_rows(x, y, index, x.size(-2), src_indexed=True, dst_indexed=False)
    return y


@on_device
def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) index[b, k]] = src[b, (h,) k]`` in place (ids in a row distinct; empty slots write nothing);
    returns ``dst``."""
    _checks._check_scatter_rows(dst, index, src, check_index=check_index)
    require_launchable(dst)
    copy_rows(src, dst, index, dst.size(-2), src_indexed=False, dst_indexed=True)
    return dst


@on_device
def scatter_rows_residual_(dst: Tensor, index: Tensor, src: Tensor, residual: Tensor, scale: Optional[Tensor] = None,
                           *, check_index: bool = True) -> Tensor:
    """``dst[b, index[b, k]] = src[b, k]`` in place, and ``y = residual + dst`` (``* scale [D]`` first, if given)
    from the same loads: ``dst``/``residual [B, N, D]``, ``src [B, K, D]``; returns ``y`` contiguous."""
    _checks._check_scatter_rows_residual(dst, index, src, residual, scale, check_index=check_index)
    require_launchable(dst)
    B, N, D = dst.shape
    K = index.size(1)
    y = torch.empty((B, N, D), dtype=dst.dtype, device=dst.device)
    if B * N * D == 0:
        return y
    block_d = feature_block(D, cap=256)
    block_n = 16 if INTERPRET else 8
    block_k = max(1, min(next_pow2(max(K, 1)), 128 if INTERPRET else 64))
    n_nb = cdiv(N, block_n)
    scaled = scale is not None
    g = scale.contiguous() if scaled else dst
    _scatter_residual_kernel[(B * n_nb,)](
        dst, src, residual, g, y, index, N, K, D, *dst.stride(), *src.stride(), *residual.stride(),
        index.stride(0), index.stride(1), n_nb,
        SCALED=scaled, SOFT_BF16=soft_bf16(dst.dtype), EMULATED_FMA=INTERPRET, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_D=block_d, num_warps=4)
    return y


@on_device
def gather_cols(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]``: ``x [B,(H,)M,N]`` -> ``y [B,(H,)M,K]`` contiguous (zero
    columns at empty slots)."""
    _checks._check_gather_cols(x, index, check_index=check_index)
    require_launchable(x)
    y = x.new_empty((*x.shape[:-1], index.size(1)))
    copy_cols(x, y, index, x.size(-1), src_indexed=True, dst_indexed=False)
    return y


@on_device
def scatter_cols_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k]`` in place (ids in a row distinct; empty slots write
    nothing); returns ``dst``."""
    _checks._check_scatter_cols(dst, index, src, check_index=check_index)
    require_launchable(dst)
    copy_cols(src, dst, index, dst.size(-1), src_indexed=False, dst_indexed=True)
    return dst


KERNELS = {"gather_rows": gather_rows, "scatter_rows_": scatter_rows_,
           "scatter_rows_residual_": scatter_rows_residual_, "gather_cols": gather_cols, "scatter_cols_": scatter_cols_}
