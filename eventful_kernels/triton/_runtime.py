"""Runtime helpers shared by the Triton kernels: interpreter mode, launch-device check, index value check.

Every op that takes an index checks its values (one host sync) unless called with ``check_index=False``. The
kernels mask every id outside ``[0, N)`` either way: ``-1`` (and, unchecked, any other id outside the range) is an
empty slot, so a bad index can never touch memory out of bounds; unchecked duplicate ids give an unspecified one of
the written values.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

next_pow2 = triton.next_power_of_2


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def require_launchable(t: Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
        return
    raise RuntimeError(
        f"eventful.triton: cannot run on {t.device} tensors"
        + (" (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)" if t.device.type == "cpu" else "")
    )


def on_device(fn):
    """Run ``fn`` with its first tensor argument's CUDA device current (Triton launches on the current device)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, Tensor)), None)
        if t is None or t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return wrapper


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul setting (IEEE unless TF32 is allowed), like the reference's ``@``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 as raw integers; upcasting to fp32 first is exact (bf16 products
    and fp32 accumulation are what the GPU's bf16 dot computes too)."""
    return INTERPRET and dtype == torch.bfloat16


def soft_bf16(dtype: torch.dtype) -> bool:
    """The interpreter rounds fp32 -> bf16 towards zero; kernels then round to nearest even by hand (as the GPU's
    cvt.rn does and torch's ``.to(bfloat16)`` does), so interpreted results match the reference bit for bit."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def cast_out(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even; SOFT_BF16 does the bf16 rounding with integer ops."""
    if SOFT_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def load_ids(row_ptr, slots, stride, K, n):
    """Ids at ``slots`` of one index row (``row_ptr`` = its start): ``(ids int64, valid)``; slots >= K read -1, and
    ``valid`` marks slots < K whose id lies in ``[0, n)``. Every kernel masks its index-driven accesses with it."""
    ids = tl.load(row_ptr + slots * stride, mask=slots < K, other=-1).to(tl.int64)
    return ids, (slots < K) & (ids >= 0) & (ids < n)


@triton.jit
def _validate_index_kernel(idx_ptr, seen_ptr, flag_ptr, K, n, stride_b, stride_k,
                           UNIQUE: tl.constexpr, BLOCK: tl.constexpr):
    # One program per index row: flag[b] = 1 if an id of row b is outside [0, n) and not -1, or (UNIQUE) an id in
    # [0, n) repeats; seen[b*n : (b+1)*n] is this row's scratch, zeroed here (so no memset launch is needed).
    b = tl.program_id(0).to(tl.int64)
    if UNIQUE:
        for n0 in range(0, n, BLOCK):
            ns = n0 + tl.arange(0, BLOCK)
            tl.store(seen_ptr + b * n + ns, tl.zeros([BLOCK], dtype=tl.int32), mask=ns < n)
        tl.debug_barrier()
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        km = ks < K
        ids = tl.load(idx_ptr + b * stride_b + ks * stride_k, mask=km, other=-1).to(tl.int64)
        ok = km & (ids >= 0) & (ids < n)
        bad = bad | (km & ~ok & (ids != -1)).to(tl.int32)
        if UNIQUE:
            old = tl.atomic_add(seen_ptr + b * n + ids, 1, mask=ok)
            bad = bad | (ok & (old > 0)).to(tl.int32)
    tl.store(flag_ptr + b, tl.max(bad, 0))


def check_index_values(*checks) -> None:
    """Value check of one or more indices, each given as ``(index [B, K], name, n, unique)``: every id in
    ``[0, n)`` or ``-1`` (an empty slot), and if ``unique`` no id in ``[0, n)`` twice in a row. One small launch per
    index and ONE host sync for all of them, before any write; on failure the first bad index (in argument order)
    raises the C++ message."""
    checks = [c for c in checks if c[0].numel() > 0]
    if not checks:
        return
    rows = [c[0].size(0) for c in checks]
    seen_sizes = [b * c[2] if c[3] else 0 for b, c in zip(rows, checks)]
    scratch = torch.empty(sum(rows) + sum(seen_sizes), dtype=torch.int32, device=checks[0][0].device)
    flag_at, seen_at = 0, sum(rows)
    for (index, _, n, unique), b, size in zip(checks, rows, seen_sizes):
        k = index.size(1)
        block = min(max(next_pow2(k), 256), 1024)  # also the step of the zeroing loop over n
        seen = scratch[seen_at:seen_at + size] if unique else scratch
        _validate_index_kernel[(b,)](index, seen, scratch[flag_at:flag_at + b], k, n, index.stride(0),
                                     index.stride(1), UNIQUE=unique, BLOCK=block, num_warps=4)
        flag_at += b
        seen_at += size
    flags = scratch[:sum(rows)].tolist()  # the host sync
    flag_at = 0
    for (index, name, n, unique), b in zip(checks, rows):
        if any(flags[flag_at:flag_at + b]):
            _checks.raise_index_error(index, name, n, unique)
        flag_at += b


def as_4d(t: Tensor) -> Tensor:
    """Rank 3 ``[B, N, D]`` -> ``[B, 1, N, D]`` (a view); rank 4 unchanged. Twin of ``as_4d`` in checks.h."""
    return t.unsqueeze(1) if t.dim() == 3 else t
