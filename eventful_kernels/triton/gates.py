"""Triton token gates: ``token_gate``, ``token_gate_threshold``, ``token_delta_gate`` (``c, ref [B, N, D]``).

Pipeline, all on device (no host sync except the value check of an explicit index):
1. ``_scores_kernel``: float32 ``||c - ref||_2`` per token in one pass over c and ref (no N x D temporary);
   the threshold gate writes ``score if score > h else -1`` instead.
2. ``torch.topk`` on the ``[B, N]`` scores gives ``t``, the k-th largest score of each row (N floats: cheap).
3. ``_select_kernel`` (one program per row): selects every score ``> t`` plus the lowest-id ties ``== t`` until k
   are taken -- exactly the reference's stable descending sort -- and compacts them in token order with a prefix
   sum, so the index comes out ascending without a sort; pads with -1 and writes the count (threshold gate).
4. ``_gate_copy_kernel``: ``c_sel = c[index]``, ``e_sel = c_sel - ref[index]`` (delta gate, read before the
   write), ``ref[index] = c_sel``; empty slots (-1, or unchecked ids outside ``[0, N)``) give zero rows and no
   write.
NaN scores rank above every number (as in torch.sort/topk); the threshold gate never selects them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C
from ._runtime import (INTERPRET, cast_out, cdiv, check_index_values, load_ids, next_pow2, on_device,
                       require_launchable, soft_bf16)


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
def _rank_masks(s, t):
    # (s ranks strictly above t, s ties with t) under "NaN is the largest value" (torch.sort / torch.topk order).
    tv = tl.zeros_like(s) + t  # broadcast first: the interpreter cannot mix scalar and vector booleans
    s_nan = s != s
    t_nan = tv != tv
    gt = (s > tv) | (s_nan & ~t_nan)
    eq = (s == tv) | (s_nan & t_nan)
    return gt, eq


@triton.jit
def _select_kernel(s_ptr, kth_ptr, idx_ptr, count_ptr, N, k, width,
                   HAS_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(kth_ptr + b)
    n_gt = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + b * N + ns, mask=ns < N, other=0.0)
        gt, eq = _rank_masks(s, t)
        n_gt += tl.sum((gt & (ns < N)).to(tl.int32), axis=0)
    need = k - n_gt  # ties with t taken lowest id first
    n_sel = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nm = ns < N
        s = tl.load(s_ptr + b * N + ns, mask=nm, other=0.0)
        gt, eq = _rank_masks(s, t)
        eq = eq & nm
        eq_rank = tl.cumsum(eq.to(tl.int32), axis=0) + n_eq
        sel = nm & (gt | (eq & (eq_rank <= need)))
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
def _gate_copy_kernel(c_ptr, r_ptr, idx_ptr, sel_ptr, e_ptr, K, D, N,
                      c_b, c_n, c_d, r_b, r_n, r_d, i_b, i_k, n_kb, n_db,
                      WITH_E: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    db = pid % n_db
    t = pid // n_db
    kb = t % n_kb
    b = t // n_kb
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < K
    ids, valid = load_ids(idx_ptr + b * i_b, ks, i_k, K, N)
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


def _check_gate(c: Tensor, ref: Tensor) -> None:
    C.check_rank(c, "c", 3, 3)
    C.check_float(c, "c")
    C.check_same_device(ref, "ref", c, "c")
    C.check_same_dtype(ref, "ref", c, "c")
    C.check_rank(ref, "ref", 3, 3)
    C.check_size(ref, "ref", 0, c.size(0), "the batch size of 'c'")
    C.check_size(ref, "ref", 1, c.size(1), "the token count of 'c'")
    C.check_size(ref, "ref", 2, c.size(2), "the feature size of 'c'")
    C.check_writable(ref, "ref")


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


def _select(scores: Tensor, k: int, width: int, thresholded: bool) -> Tuple[Tensor, Tensor]:
    """``k`` largest per row (ties -> lower id), ascending, into ``index [B, width]``; ``count [B]`` if thresholded."""
    B, N = scores.shape
    index = torch.empty((B, width), dtype=torch.int64, device=scores.device)
    count = torch.empty((B,), dtype=torch.int64, device=scores.device)
    if k == N:  # everything ranks (scores are >= 0 or NaN; -1 marks "below threshold"): skip the topk
        kth = torch.full((B,), -1.0, dtype=torch.float32, device=scores.device)
    else:
        kth = torch.topk(scores, k, dim=1, largest=True, sorted=True).values[:, k - 1].contiguous()
    block_n = min(next_pow2(N), 1024 if INTERPRET else 2048)
    _select_kernel[(B,)](scores, kth, index, count, N, k, width,
                         HAS_THRESHOLD=thresholded, BLOCK_N=block_n, num_warps=8 if block_n >= 2048 else 4)
    return index, count


def _gate_copy(c: Tensor, ref: Tensor, index: Tensor, with_e: bool) -> Tuple[Tensor, Optional[Tensor]]:
    B, N, D = c.shape
    K = index.size(1)
    c_sel = c.new_empty((B, K, D))
    e_sel = c.new_empty((B, K, D)) if with_e else None
    if B * K * D == 0:
        return c_sel, e_sel
    block_d = min(next_pow2(D), 512)
    block_k = max(1, min(next_pow2(K), (16384 if INTERPRET else 4096) // block_d))
    n_kb, n_db = cdiv(K, block_k), cdiv(D, block_d)
    _gate_copy_kernel[(B * n_kb * n_db,)](
        c, ref, index, c_sel, c_sel if e_sel is None else e_sel, K, D, N, *c.stride(), *ref.stride(),
        index.stride(0), index.stride(1), n_kb, n_db,
        WITH_E=with_e, SOFT_BF16=soft_bf16(c.dtype), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return c_sel, e_sel


@on_device
def token_gate(c: Tensor, ref: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k gate: ``(index [B,k] int64 ascending, c_sel [B,k,D])`` on ``||c - ref||_2``; ``ref[index] = c_sel``."""
    _check_gate(c, ref)
    C.check_in_range(k, "k", 0, c.size(1), "N, the token count of 'c'")
    require_launchable(c)
    if k == 0:
        return torch.empty((c.size(0), 0), dtype=torch.int64, device=c.device), c.new_empty((c.size(0), 0, c.size(2)))
    index, _ = _select(_scores(c, ref, None), k, k, thresholded=False)
    c_sel, _ = _gate_copy(c, ref, index, with_e=False)
    return index, c_sel


@on_device
def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tokens with ``||c - ref||_2 > threshold``, at most ``capacity`` (largest kept, ties -> lower id), no host sync.

    Returns ``(index [B,capacity] int64, count [B] int64, c_sel [B,capacity,D])``: the first ``count[b]`` ids of a
    row ascending, then -1 (zero rows in ``c_sel``). ``ref`` is updated at the selected tokens only.
    """
    _check_gate(c, ref)
    if capacity < 0:
        C.fail(f"argument 'capacity' must be >= 0, got {capacity}")
    require_launchable(c)
    B, N, _ = c.shape
    cap = min(capacity, N)
    if cap == 0:
        index = torch.full((B, capacity), -1, dtype=torch.int64, device=c.device)
        return index, torch.zeros(B, dtype=torch.int64, device=c.device), c.new_zeros((B, capacity, c.size(2)))
    index, count = _select(_scores(c, ref, threshold), cap, capacity, thresholded=True)
    c_sel, _ = _gate_copy(c, ref, index, with_e=False)
    return index, count, c_sel


@on_device
def token_delta_gate(c: Tensor, ref: Tensor, k: int = -1, index: Optional[Tensor] = None, *,
                     check_index: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: ``(index [B,K] int64, c_sel, e_sel = c_sel - ref_old[index])`` (``[B,K,D]``); ``ref[index] = c_sel``.

    An explicit ``index [B, K]`` (distinct ids per row; -1: an empty slot, a zero row and no write) forces the
    selection, ``k`` is ignored, and the index is returned as an int64 copy. ``check_index=False``: no value check of
    it, no host sync.
    """
    _check_gate(c, ref)
    B, N, D = c.shape
    if index is None:
        C.check_in_range(k, "k", 0, N, "N, the token count of 'c'")
    else:
        C.check_index_meta(index, "index", B, c, "c")
    require_launchable(c)
    if index is not None:
        if check_index:
            check_index_values((index, "index", N, True))
        index = index.to(torch.int64, memory_format=torch.contiguous_format, copy=True)
    elif k == 0:
        index = torch.empty((B, 0), dtype=torch.int64, device=c.device)
    else:
        index, _ = _select(_scores(c, ref, None), k, k, thresholded=False)
    c_sel, e_sel = _gate_copy(c, ref, index, with_e=True)
    return index, c_sel, e_sel
