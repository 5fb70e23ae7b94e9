"""Runtime helpers shared by the Triton kernels: interpreter mode, launch device, autotune configs, casts.

Argument checks are the C++ ones (``torch.ops.eventful._check_<op>``, csrc/include/eventful/checks.h): every op that
takes an index checks its values there (one host sync on CUDA) unless called with ``check_index=False``. The kernels
mask every id outside ``[0, N)`` either way: ``-1`` (and, unchecked, any other id outside the range) is an empty
slot, so a bad index can never touch memory out of bounds; unchecked duplicate ids give an unspecified one of the
written values.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

next_pow2 = triton.next_power_of_2


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def autotune_configs(cuda_configs, interp_config):
    """Several configs autotuned on a GPU; one fixed config under the interpreter (no benchmarking there).
    Every CUDA config must compile for sm_90 (tests/triton_compile_check.py --all-configs): the autotuner does not
    skip configs that crash the compiler (e.g. BLOCK_N=128 with 4 warps in Triton 3.7)."""
    return [interp_config] if INTERPRET else cuda_configs


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


def as_4d(t: Tensor) -> Tensor:
    """Rank 3 ``[B, N, D]`` -> ``[B, 1, N, D]`` (a view); rank 4 unchanged. Twin of ``as_4d`` in checks.h."""
    return t.unsqueeze(1) if t.dim() == 3 else t
