"""Runtime switches shared by the Triton kernels: interpreter mode, launch-device check, index value check.

``EVENTFUL_CHECK_INDEX=0`` skips the index value check (one host sync per op that takes a user index). The kernels
still mask every id outside ``[0, N)``, so a bad index can never write out of bounds; with the check off such ids
are dropped silently (gathers give zero rows) and duplicate ids give an unspecified one of the written values.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
CHECK_INDEX_VALUES: bool = os.environ.get("EVENTFUL_CHECK_INDEX", "1").strip() != "0"

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
    # flag = 1 if any id is outside [0, n) or (UNIQUE) repeats within its row; seen is a zeroed [B, n] scratch.
    b = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    km = ks < K
    ids = tl.load(idx_ptr + b * stride_b + ks * stride_k, mask=km, other=0).to(tl.int64)
    ok = (ids >= 0) & (ids < n)
    bad = km & ~ok
    if UNIQUE:
        old = tl.atomic_add(seen_ptr + b * n + ids, 1, mask=km & ok)
        bad = bad | (km & ok & (old > 0))
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), 0))


def check_index_values(*checks) -> None:
    """Value check of one or more indices, each given as ``(index [B, K], name, n, unique)``: every id in
    ``[0, n)`` (and distinct per row if ``unique``). One zero-fill, one tiny kernel per index and ONE host sync for
    all of them, before any write; on failure the first bad index (in argument order) raises the C++ message."""
    checks = [c for c in checks if c[0].numel() > 0]
    if not CHECK_INDEX_VALUES or not checks:
        return
    sizes = [c[0].size(0) * c[2] if c[3] else 0 for c in checks]
    scratch = torch.zeros(len(checks) + sum(sizes), dtype=torch.int32, device=checks[0][0].device)
    offset = len(checks)
    for slot, ((index, _, n, unique), size) in enumerate(zip(checks, sizes)):
        b, k = index.shape
        block = min(next_pow2(k), 1024)
        seen = scratch[offset:offset + size] if unique else scratch
        _validate_index_kernel[(b, cdiv(k, block))](
            index, seen, scratch[slot:slot + 1], k, n, index.stride(0), index.stride(1), UNIQUE=unique, BLOCK=block)
        offset += size
    flags = scratch[:len(checks)].tolist()  # the host sync
    for flag, (index, name, n, unique) in zip(flags, checks):
        if flag:
            _checks.raise_index_error(index, name, n, unique)


def as_4d(t: Tensor) -> Tensor:
    """Rank 3 ``[B, N, D]`` -> ``[B, 1, N, D]`` (a view); rank 4 unchanged. Twin of ``as_4d`` in checks.h."""
    return t.unsqueeze(1) if t.dim() == 3 else t
