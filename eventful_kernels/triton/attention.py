"""Triton attention patches: ``qk_update_`` (rows and columns of ``q @ k^T``) and ``av_delta_update_`` (``A @ V``).

qk_update_: one launch, 1-D grid of two tile families, each a ``tl.dot`` loop over the head dim written straight
into ``logits`` (no temporaries): row tiles ``[BLOCK_M of index_q] x [BLOCK_N of all Nk]`` and column tiles
``[BLOCK_M of all Nq] x [BLOCK_N of index_k]``. Where a row and a column are both selected the element is written
by both families with the same float32 value (a benign duplicate write). With the optional decomposed rel-pos state
``rel_h [B,H,Nq,Gh]`` / ``rel_w [B,H,Nq,Gw]`` (``Gh*Gw = Nk``; constexpr ``HAS_BIAS``) each tile adds the bias
``rel_h[.., i, j // Gw] + rel_w[.., i, j % Gw]`` (loaded through its strides, in float32) to ``scale * q_i.k_j``
before the single cast to ``logits.dtype``; the full ``[Nq, Nk]`` bias is never materialised.

av_delta_update_: one GEMM-like kernel per ``[BLOCK_M rows] x [BLOCK_D head features]`` tile contracting over the
concatenated 2K selected tokens, ``[a_new[:, S], -a_ref[:, S]] @ [v_new[S]; v_ref[S]]``, accumulated in float32 and
added to ``out``. When one tile spans the whole head dim (d <= 128) its program is the only reader of
``a_ref[rows, S]`` and refreshes it in place right after loading it (constexpr ``REFRESH_A``); otherwise the
column-copy kernel does it after the GEMM. ``v_ref[S]`` is read by every program, so the row-copy kernel refreshes
it in a second launch (same stream: after the GEMM has read it).
Shapes: ``[B, H, N, d]`` / ``[B, H, M, N]`` (rank 3 = one head); ``index [B, K]`` shared over heads; slots holding
-1 (or, unchecked, any id outside ``[0, N)``) are skipped by both ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C
from ._runtime import (INTERPRET, as_4d, cast_out, cdiv, check_index_values, dot_precision, dot_upcast, load_ids,
                       next_pow2, on_device, require_launchable, soft_bf16)
from .gather_scatter import copy_cols, copy_rows


def _configs(cuda_configs, interp_config):
    """Several configs autotuned on a GPU; one fixed config under the interpreter (no benchmarking there).
    Every CUDA config must compile for sm_90 (tests/triton_compile_check.py --all-configs): the autotuner does not
    skip configs that crash the compiler (e.g. BLOCK_N=128 with 4 warps in Triton 3.7)."""
    return [interp_config] if INTERPRET else cuda_configs


_QK_CONFIGS = _configs(
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


_AV_CONFIGS = _configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bm, bk, w, s in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (32, 32, 4, 2)]],
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}))


_AV_SAVED = {}


def _av_save_state(nargs, reset_only=False):
    """Autotuner pre-hook: every trial run changes ``out`` (and with REFRESH_A ``a_ref[..., S]``), so both are saved
    before it -- ``a_ref`` only at the selected columns, not the whole map -- and restored after it."""
    if reset_only:
        return
    _AV_SAVED["out"] = nargs["o_ptr"].clone()
    if nargs["REFRESH_A"]:
        cols = nargs["ar_ptr"].new_empty((*nargs["ar_ptr"].shape[:3], nargs["idx_ptr"].size(1)))
        copy_cols(nargs["ar_ptr"], cols, nargs["idx_ptr"], nargs["N"], src_indexed=True, dst_indexed=False)
        _AV_SAVED["a_ref_cols"] = cols


def _av_restore_state(nargs, exception=None):
    """Autotuner post-hook: undo a trial run (see _av_save_state)."""
    nargs["o_ptr"].copy_(_AV_SAVED.pop("out"))
    cols = _AV_SAVED.pop("a_ref_cols", None)
    if cols is not None:
        copy_cols(cols, nargs["ar_ptr"], nargs["idx_ptr"], nargs["N"], src_indexed=False, dst_indexed=True)


@triton.autotune(configs=_AV_CONFIGS, key=["M", "N", "Dh", "K", "IS_F32", "REFRESH_A"],
                 pre_hook=_av_save_state, post_hook=_av_restore_state)
@triton.jit
def _av_delta_kernel(o_ptr, an_ptr, ar_ptr, vn_ptr, vr_ptr, idx_ptr, H, M, N, Dh, K,
                     o_b, o_h, o_m, o_d, an_b, an_h, an_m, an_n, ar_b, ar_h, ar_m, ar_n,
                     vn_b, vn_h, vn_n, vn_d, vr_b, vr_h, vr_n, vr_d, i_b, i_k, n_db,
                     IS_F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr,
                     REFRESH_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # REFRESH_A (requires n_db == 1): a_ref[rows, ids] = a_new[rows, ids] right after this program read it.
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(M, BLOCK_M)
    db = pid % n_db
    t = pid // n_db
    mb = t % n_mb
    bh = t // n_mb
    h = bh % H
    b = bh // H
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    ds = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = ds < Dh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ids, kv = load_ids(idx_ptr + b * i_b, ks, i_k, K, N)
        ids = tl.where(kv, ids, 0)
        am = rm[:, None] & kv[None, :]
        vm = kv[:, None] & dm[None, :]
        a1 = tl.load(an_ptr + b * an_b + h * an_h + rows[:, None] * an_m + ids[None, :] * an_n, mask=am, other=0)
        v1 = tl.load(vn_ptr + b * vn_b + h * vn_h + ids[:, None] * vn_n + ds[None, :] * vn_d, mask=vm, other=0)
        ar_off = ar_ptr + b * ar_b + h * ar_h + rows[:, None] * ar_m + ids[None, :] * ar_n
        a2 = tl.load(ar_off, mask=am, other=0)
        if REFRESH_A:
            tl.store(ar_off, a1, mask=am)
        v2 = tl.load(vr_ptr + b * vr_b + h * vr_h + ids[:, None] * vr_n + ds[None, :] * vr_d, mask=vm, other=0)
        if UPCAST:
            a1 = a1.to(tl.float32)
            v1 = v1.to(tl.float32)
            a2 = a2.to(tl.float32)
            v2 = v2.to(tl.float32)
        acc = tl.dot(a1, v1, acc, input_precision=PREC)
        acc = tl.dot(-a2, v2, acc, input_precision=PREC)
    om = rm[:, None] & dm[None, :]
    o_off = o_ptr + b * o_b + h * o_h + rows[:, None] * o_m + ds[None, :] * o_d
    o = tl.load(o_off, mask=om, other=0).to(tl.float32) + acc
    tl.store(o_off, cast_out(o, o_ptr.dtype.element_ty, SOFT_BF16), mask=om)


def _check_operands(names, tensors, first_name, first) -> None:
    for name, t in zip(names, tensors):
        C.check_rank(t, name, 3, 4)
        C.check_same_rank(t, name, first, first_name)
        C.check_float(t, name)
        C.check_same_device(t, name, first, first_name)


def _check_heads(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    t4, l4 = as_4d(t), as_4d(like)
    C.check_size(t4, name, 0, l4.size(0), f"the batch size of '{like_name}'")
    C.check_size(t4, name, 1, l4.size(1), f"the head count of '{like_name}'")


def _check_relpos(rel_h, rel_w, logits: Tensor, q: Tensor) -> None:
    """Checks of the optional decomposed rel-pos state of ``qk_update_`` (metadata only, no device work)."""
    if rel_h is None and rel_w is None:
        return
    for name, t, other in (("rel_h", rel_h, "rel_w"), ("rel_w", rel_w, "rel_h")):
        if t is None:
            C.fail(f"argument '{name}' is None but '{other}' is given: the rel-pos bias needs both or neither",
                   ValueError)
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        C.check_same_rank(t, name, logits, "logits")
        C.check_same_dtype(t, name, q, "q")
        C.check_same_device(t, name, logits, "logits")
        _check_heads(t, name, logits, "logits")
        C.check_size(t, name, -2, logits.size(-2), "the row count (Nq) of 'logits'")
    gh, gw, nk = rel_h.size(-1), rel_w.size(-1), logits.size(-1)
    if gh * gw != nk:
        C.fail(f"argument 'rel_h' has Gh = {gh} columns and 'rel_w' has Gw = {gw}, but Gh*Gw must equal Nk = {nk}, "
               f"the column count of 'logits' (shapes {list(rel_h.shape)} and {list(rel_w.shape)})")


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
    for name, t in (("logits", logits), ("q", q), ("k", k), ("index_q", index_q), ("index_k", index_k)):
        C.check_defined(t, name)
    C.check_rank(logits, "logits", 3, 4)
    _check_operands(("logits", "q", "k"), (logits, q, k), "logits", logits)
    C.check_same_dtype(k, "k", q, "q")
    _check_heads(q, "q", logits, "logits")
    _check_heads(k, "k", logits, "logits")
    C.check_size(q, "q", -2, logits.size(-2), "the row count (Nq) of 'logits'")
    C.check_size(k, "k", -2, logits.size(-1), "the column count (Nk) of 'logits'")
    C.check_size(k, "k", -1, q.size(-1), "the head dim of 'q'")
    _check_relpos(rel_h, rel_w, logits, q)
    C.check_index_meta(index_q, "index_q", logits.size(0), logits, "logits")
    C.check_index_meta(index_k, "index_k", logits.size(0), logits, "logits")
    C.check_writable(logits, "logits")
    require_launchable(logits)
    Nq, Nk = logits.size(-2), logits.size(-1)
    if check_index:
        check_index_values((index_q, "index_q", Nq, False), (index_k, "index_k", Nk, False))
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


@on_device
def av_delta_update_(out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor, *,
                     check_index: bool = True) -> Tensor:
    """``out += a_new[...,S] @ v_new[S] - a_ref[...,S] @ v_ref[S]`` (float32), then ``a_ref[...,S] = a_new[...,S]``
    and ``v_ref[S] = v_new[S]``. ``out [B,H,M,d]``, ``a_* [B,H,M,N]``, ``v_* [B,H,N,d]``, ``index [B,K]`` distinct
    ids in ``[0, N)`` or -1 (empty slots: no contribution, no refresh); ``a_*`` and ``v_*`` share one dtype, ``out``
    may have any float dtype. ``check_index=False``: no value check, no host sync. Returns ``out``.
    """
    for name, t in (("out", out), ("a_new", a_new), ("a_ref", a_ref), ("v_new", v_new), ("v_ref", v_ref),
                    ("index", index)):
        C.check_defined(t, name)
    C.check_rank(out, "out", 3, 4)
    _check_operands(("out", "a_new", "a_ref", "v_new", "v_ref"), (out, a_new, a_ref, v_new, v_ref), "out", out)
    for name, t in (("a_ref", a_ref), ("v_new", v_new), ("v_ref", v_ref)):
        C.check_same_dtype(t, name, a_new, "a_new")
    for name, t in (("a_new", a_new), ("a_ref", a_ref), ("v_new", v_new), ("v_ref", v_ref)):
        _check_heads(t, name, out, "out")
    M, Dh, N = out.size(-2), out.size(-1), v_new.size(-2)
    for name, t in (("a_new", a_new), ("a_ref", a_ref)):
        C.check_size(t, name, -2, M, "the row count (M) of 'out'")
        C.check_size(t, name, -1, N, "the token count (N) of 'v_new'")
    C.check_size(v_ref, "v_ref", -2, N, "the token count (N) of 'v_new'")
    for name, t in (("v_new", v_new), ("v_ref", v_ref)):
        C.check_size(t, name, -1, Dh, "the head dim of 'out'")
    C.check_index_meta(index, "index", out.size(0), out, "out")
    for name, t in (("out", out), ("a_ref", a_ref), ("v_ref", v_ref)):
        C.check_writable(t, name)
    require_launchable(out)
    if check_index:
        check_index_values((index, "index", N, True))
    o4, an4, ar4, vn4, vr4 = (as_4d(t) for t in (out, a_new, a_ref, v_new, v_ref))
    B, H = o4.size(0), o4.size(1)
    K = index.size(1)
    if B * H * K == 0:
        return out
    block_d = min(max(next_pow2(Dh), 16), 128)
    n_db = cdiv(Dh, block_d)
    refresh_a = M * Dh > 0 and n_db == 1
    if M * Dh > 0:
        _av_delta_kernel[lambda meta: (B * H * cdiv(M, meta["BLOCK_M"]) * n_db,)](
            o4, an4, ar4, vn4, vr4, index, H, M, N, Dh, K, *o4.stride(), *an4.stride(), *ar4.stride(),
            *vn4.stride(), *vr4.stride(), *index.stride(), n_db,
            IS_F32=a_new.dtype == torch.float32, PREC=dot_precision(a_new.dtype), UPCAST=dot_upcast(a_new.dtype),
            SOFT_BF16=soft_bf16(out.dtype), REFRESH_A=refresh_a, BLOCK_D=block_d)
    if not refresh_a:
        copy_cols(an4, ar4, index, N, src_indexed=True, dst_indexed=True)
    copy_rows(vn4, vr4, index, N, src_indexed=True, dst_indexed=True)
    return out
