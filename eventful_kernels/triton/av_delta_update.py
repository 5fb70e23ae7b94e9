"""Triton ``av_delta_update_``: the exact delta update of ``out = A @ V`` and the refresh of its state copies.

One GEMM-like kernel per ``[BLOCK_M rows] x [BLOCK_D head features]`` tile contracting over the concatenated 2K
selected tokens, ``[a_new[:, S], -a_ref[:, S]] @ [v_new[S]; v_ref[S]]``, accumulated in float32 and added to ``out``.
When one tile spans the whole head dim (d <= 128) its program is the only reader of ``a_ref[rows, S]`` and refreshes
it in place right after loading it (constexpr ``REFRESH_A``); otherwise the column-copy kernel does it after the
GEMM. ``v_ref[S]`` is read by every program, so the row-copy kernel refreshes it in a second launch (same stream:
after the GEMM has read it).
Shapes: ``out [B, H, M, d]``, ``a_* [B, H, M, N]``, ``v_* [B, H, N, d]`` (rank 3 = one head); ``index [B, K]``
shared over heads; slots holding -1 (or, unchecked, any id outside ``[0, N)``) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import (as_4d, autotune_configs, cast_out, cdiv, dot_precision, dot_upcast, load_ids, next_pow2,
                       on_device, require_launchable, soft_bf16)
from .gather_scatter import copy_cols, copy_rows

_checks = torch.ops.eventful  # the C++ argument checks: _check_<op> (csrc/checks.cpp)


_AV_CONFIGS = autotune_configs(
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


@on_device
def av_delta_update_(out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor, *,
                     check_index: bool = True) -> Tensor:
    """``out += a_new[...,S] @ v_new[S] - a_ref[...,S] @ v_ref[S]`` (float32), then ``a_ref[...,S] = a_new[...,S]``
    and ``v_ref[S] = v_new[S]``. ``out [B,H,M,d]``, ``a_* [B,H,M,N]``, ``v_* [B,H,N,d]``, ``index [B,K]`` distinct
    ids in ``[0, N)`` or -1 (empty slots: no contribution, no refresh); ``a_*`` and ``v_*`` share one dtype, ``out``
    is float32 or their dtype. ``check_index=False``: no value check, no host sync. Returns ``out``.
    """
    _checks._check_av_delta_update(out, a_new, a_ref, v_new, v_ref, index, check_index=check_index)
    require_launchable(out)
    M, Dh, N = out.size(-2), out.size(-1), v_new.size(-2)
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


KERNELS = {"av_delta_update_": av_delta_update_}
