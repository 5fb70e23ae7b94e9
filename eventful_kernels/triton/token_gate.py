"""Triton token gates (family ``token_gate``): ``token_gate``, ``token_gate_threshold``, ``token_delta_gate``
(``c, ref [B, N, D]``).

Three launches, all on device (no host sync except the value check of an explicit index):
1. ``_scores_kernel``: float32 ``||c - ref||_2`` per token in one pass over c and ref (no N x D temporary);
   the threshold gate writes ``score if score > h else -1`` instead.
2. ``_select_kernel`` (one program per row): maps each score to an integer key with torch.sort's order (NaN
   largest), finds ``t``, the key of the k-th largest score, by a 32-step bisection on the key bits (the row stays
   in registers while N <= SELECT_BLOCK, else it is re-read per step), then selects every key ``> t`` plus the
   lowest-id ties ``== t`` until k are taken -- exactly the reference's stable descending sort -- and compacts them
   in token order with a prefix sum, so the index comes out ascending without a sort; pads with -1 and writes the
   count (threshold gate).
3. ``_gate_copy_kernel``: ``c_sel = c[index]``, ``e_sel = c_sel - ref[index]`` (delta gate, read before the
   write), ``ref[index] = c_sel``; empty slots (-1, or unchecked ids outside ``[0, N)``) give zero rows and no
   write. With an explicit index it also writes the returned int64 copy of the index: one launch in all.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import INTERPRET, cast_out, cdiv, load_ids, next_pow2, on_device, require_launchable, soft_bf16
from .gather_scatter import feature_block

_checks = torch.ops.eventful  # the C++ argument checks: _check_<op> (csrc/checks.cpp)


@triton.jit
def _scores_kernel(c_ptr, r_ptr, out_ptr, N, D, c_b, c_n, c_d, r_b, r_n, r_d, threshold, n_nb,
                   HAS_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nb = pid % n_nb
    b = pid // n_nb
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = ns < N
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = nm[:, None] & (ds < D)[None, :]
        x = tl.load(c_ptr + b * c_b + ns[:, None] * c_n + ds[None, :] * c_d, mask=m, other=0).to(tl.float32)
        y = tl.load(r_ptr + b * r_b + ns[:, None] * r_n + ds[None, :] * r_d, mask=m, other=0).to(tl.float32)
        e = x - y
        acc += e * e
    s = tl.sqrt_rn(tl.sum(acc, axis=1))
    if HAS_THRESHOLD:
        s = tl.where(s > threshold, s, -1.0)
    tl.store(out_ptr + b * N + ns, s, mask=nm)


@triton.jit
def _order_keys(s):
    # float32 -> int64 keys in [0, 2^32) ordered like torch.sort orders the floats: -0.0 == 0.0, NaN above all.
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(s != s, 0x7FFFFFFF, key)
    return key.to(tl.int64) + 2147483647 + 1


@triton.jit
def _select_kernel(s_ptr, idx_ptr, count_ptr, N, k, width,
                   HAS_THRESHOLD: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    # 1 <= k <= N. Keys of masked-off lanes are -1, below every candidate (>= 1) of the bisection.
    b = tl.program_id(0).to(tl.int64)
    row = s_ptr + b * N
    if ONE_BLOCK:  # N <= BLOCK_N: the whole row in registers
        ns = tl.arange(0, BLOCK_N)
        row_s = tl.load(row + ns, mask=ns < N, other=0.0)
        keys = tl.where(ns < N, _order_keys(row_s), -1)
    t = tl.zeros([], dtype=tl.int64)  # invariant: at least k keys >= t
    step = tl.full([], 2147483647, tl.int64) + 1
    for _ in range(32):
        cand = t + step
        if ONE_BLOCK:
            n_ge = tl.sum((keys >= cand).to(tl.int32), axis=0)
        else:
            n_ge = tl.zeros([], dtype=tl.int32)
            for n0 in range(0, N, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                blk = tl.where(ns < N, _order_keys(tl.load(row + ns, mask=ns < N, other=0.0)), -1)
                n_ge += tl.sum((blk >= cand).to(tl.int32), axis=0)
        t = tl.where(n_ge >= k, cand, t)
        step = step // 2
    # t is now the k-th largest key; take every key above it and the lowest-id ties until k are taken
    n_sel = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    need = k + tl.zeros([], dtype=tl.int32)  # k - (keys above t): how many ties with t are taken
    if ONE_BLOCK:
        need -= tl.sum((keys > t).to(tl.int32), axis=0)
    else:
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            blk = tl.where(ns < N, _order_keys(tl.load(row + ns, mask=ns < N, other=0.0)), -1)
            need -= tl.sum((blk > t).to(tl.int32), axis=0)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        if ONE_BLOCK:
            s = row_s
            blk = keys
        else:
            s = tl.load(row + ns, mask=ns < N, other=0.0)
            blk = tl.where(ns < N, _order_keys(s), -1)
        eq = blk == t
        eq_rank = tl.cumsum(eq.to(tl.int32), axis=0) + n_eq
        sel = (blk > t) | (eq & (eq_rank <= need))
        if HAS_THRESHOLD:
            sel = sel & (s >= 0)  # -1 marks "not above the threshold"
        pos = tl.cumsum(sel.to(tl.int32), axis=0) + n_sel - 1
        tl.store(idx_ptr + b * width + pos, ns.to(tl.int64), mask=sel & (pos < width))
        n_sel += tl.sum(sel.to(tl.int32), axis=0)
        n_eq += tl.sum(eq.to(tl.int32), axis=0)
    if HAS_THRESHOLD:
        tl.store(count_ptr + b, n_sel.to(tl.int64))
        for p0 in range(0, width, BLOCK_N):
            ps = p0 + tl.arange(0, BLOCK_N)
            tl.store(idx_ptr + b * width + ps, tl.full([BLOCK_N], -1, tl.int64), mask=(ps >= n_sel) & (ps < width))


@triton.jit
def _gate_copy_kernel(c_ptr, r_ptr, idx_ptr, sel_ptr, e_ptr, out_idx_ptr, K, D, N,
                      c_b, c_n, c_d, r_b, r_n, r_d, i_b, i_k, n_kb, n_db,
                      WITH_E: tl.constexpr, COPY_INDEX: tl.constexpr, SOFT_BF16: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # COPY_INDEX: the programs of the first feature block also write index as a contiguous int64 [B, K] (as given).
    pid = tl.program_id(0).to(tl.int64)
    db = pid % n_db
    t = pid // n_db
    kb = t % n_kb
    b = t // n_kb
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    ids, valid = load_ids(idx_ptr + b * i_b, ks, i_k, K, N)
    if COPY_INDEX:
        tl.store(out_idx_ptr + b * K + ks, ids, mask=km & (db == 0))
    ds = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = ds < D
    m = valid[:, None] & dm[None, :]
    out_m = km[:, None] & dm[None, :]
    out_off = b * K * D + ks[:, None] * D + ds[None, :]  # c_sel / e_sel are contiguous [B, K, D]
    x = tl.load(c_ptr + b * c_b + ids[:, None] * c_n + ds[None, :] * c_d, mask=m, other=0)
    r_off = r_ptr + b * r_b + ids[:, None] * r_n + ds[None, :] * r_d
    if WITH_E:
        r = tl.load(r_off, mask=m, other=0)
        e = x.to(tl.float32) - r.to(tl.float32)
        tl.store(e_ptr + out_off, cast_out(e, e_ptr.dtype.element_ty, SOFT_BF16), mask=out_m)
    tl.store(sel_ptr + out_off, x, mask=out_m)
    tl.store(r_off, x, mask=m)


def _scores(c: Tensor, ref: Tensor, threshold: Optional[float]) -> Tensor:
    B, N, D = c.shape
    out = torch.empty((B, N), dtype=torch.float32, device=c.device)
    block_d = min(next_pow2(max(D, 1)), 128)
    block_n = max(1, min(next_pow2(N), (8192 if INTERPRET else 2048) // block_d))
    n_nb = cdiv(N, block_n)
    _scores_kernel[(B * n_nb,)](
        c, ref, out, N, D, *c.stride(), *ref.stride(), 0.0 if threshold is None else float(threshold), n_nb,
        HAS_THRESHOLD=threshold is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out


SELECT_BLOCK = 1024 if INTERPRET else 4096  # rows up to this many tokens are selected from registers


def _select(scores: Tensor, k: int, width: int, thresholded: bool, block_n: Optional[int] = None
            ) -> Tuple[Tensor, Tensor]:
    """``k`` (>= 1) largest per row (ties -> lower id), ascending, into ``index [B, width]``; ``count [B]`` if
    thresholded. ``block_n`` (tests): the select kernel's block, ``min(next_pow2(N), SELECT_BLOCK)`` by default."""
    B, N = scores.shape
    index = torch.empty((B, width), dtype=torch.int64, device=scores.device)
    count = torch.empty((B,), dtype=torch.int64, device=scores.device)
    block_n = block_n or min(next_pow2(N), SELECT_BLOCK)
    _select_kernel[(B,)](scores, index, count, N, k, width, HAS_THRESHOLD=thresholded, ONE_BLOCK=N <= block_n,
                         BLOCK_N=block_n, num_warps=16 if block_n >= 4096 else 8 if block_n >= 1024 else 4)
    return index, count


def _gate_copy(c: Tensor, ref: Tensor, index: Tensor, with_e: bool, copy_index: bool = False
               ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(index, c_sel, e_sel)``; ``copy_index``: ``index`` is the caller's and the returned one is a contiguous int64
    copy of it, written by the same launch."""
    B, N, D = c.shape
    K = index.size(1)
    out_index = torch.empty((B, K), dtype=torch.int64, device=c.device) if copy_index else index
    c_sel = c.new_empty((B, K, D))
    e_sel = c.new_empty((B, K, D)) if with_e else None
    if B * K * D == 0:
        if copy_index:
            out_index.copy_(index)
        return out_index, c_sel, e_sel
    block_d = feature_block(D)
    block_k = max(1, min(next_pow2(K), (16384 if INTERPRET else 2048) // block_d))
    n_kb, n_db = cdiv(K, block_k), cdiv(D, block_d)
    _gate_copy_kernel[(B * n_kb * n_db,)](
        c, ref, index, c_sel, c_sel if e_sel is None else e_sel, out_index, K, D, N, *c.stride(), *ref.stride(),
        index.stride(0), index.stride(1), n_kb, n_db, WITH_E=with_e, COPY_INDEX=copy_index,
        SOFT_BF16=soft_bf16(c.dtype), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out_index, c_sel, e_sel


@on_device
def token_gate(c: Tensor, ref: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k gate: ``(index [B,k] int64 ascending, c_sel [B,k,D])`` on ``||c - ref||_2``; ``ref[index] = c_sel``."""
    _checks._check_token_gate(c, ref, k)
    require_launchable(c)
    if k == 0:
        return torch.empty((c.size(0), 0), dtype=torch.int64, device=c.device), c.new_empty((c.size(0), 0, c.size(2)))
    index, _ = _select(_scores(c, ref, None), k, k, thresholded=False)
    _, c_sel, _ = _gate_copy(c, ref, index, with_e=False)
    return index, c_sel


@on_device
def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tokens with ``||c - ref||_2 > threshold`` (finite), at most ``capacity`` (``0 <= capacity <= N``; largest kept,
    ties -> lower id), no host sync.

    Returns ``(index [B,capacity] int64, count [B] int64, c_sel [B,capacity,D])``: the first ``count[b]`` ids of a
    row ascending, then -1 (zero rows in ``c_sel``). ``ref`` is updated at the selected tokens only.
    """
    _checks._check_token_gate_threshold(c, ref, threshold, capacity)
    require_launchable(c)
    B, N, _ = c.shape
    if capacity == 0:
        index = torch.full((B, 0), -1, dtype=torch.int64, device=c.device)
        return index, torch.zeros(B, dtype=torch.int64, device=c.device), c.new_zeros((B, 0, c.size(2)))
    index, count = _select(_scores(c, ref, threshold), capacity, capacity, thresholded=True)
    _, c_sel, _ = _gate_copy(c, ref, index, with_e=False)
    return index, count, c_sel


@on_device
def token_delta_gate(c: Tensor, ref: Tensor, k: int = -1, index: Optional[Tensor] = None, *,
                     check_index: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: ``(index [B,K] int64, c_sel, e_sel = c_sel - ref_old[index])`` (``[B,K,D]``); ``ref[index] = c_sel``.

    An explicit ``index [B, K]`` (distinct ids per row; -1: an empty slot, a zero row and no write) forces the
    selection (``k`` must then be -1 or K), and the index is returned as an int64 copy. ``check_index=False``: no
    value check of it, no host sync.
    """
    _checks._check_token_delta_gate(c, ref, k, index, check_index=check_index)
    require_launchable(c)
    B = c.size(0)
    if index is not None:
        return _gate_copy(c, ref, index, with_e=True, copy_index=True)
    if k == 0:
        index = torch.empty((B, 0), dtype=torch.int64, device=c.device)
    else:
        index, _ = _select(_scores(c, ref, None), k, k, thresholded=False)
    return _gate_copy(c, ref, index, with_e=True)


KERNELS = {"token_gate": token_gate, "token_gate_threshold": token_gate_threshold,
           "token_delta_gate": token_delta_gate}
