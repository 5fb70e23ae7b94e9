"""Argument checks of the Triton backend: Python mirror of csrc/include/eventful/checks.h (same messages, same
exception types), so every backend rejects bad input identically and before touching any state.

Index *value* checks (range, uniqueness) run as one small Triton kernel that sets an error flag; the flag is read
back once (a host sync) and, only if set, the exact C++ message is rebuilt on the host from a CPU copy of the index.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# c10::ScalarType names, as the C++ messages print them.
_SCALAR_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype(t: Tensor) -> str:
    return _SCALAR_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def fail(msg: str, exc: type = RuntimeError) -> None:
    raise exc("eventful: " + msg)


def check_defined(t, name: str) -> None:
    """A required tensor argument (C++: an undefined tensor)."""
    if t is None:
        fail(f"argument '{name}' must be a Tensor, got None", TypeError)


def check_float(t: Tensor, name: str) -> None:
    if t.dtype not in _FLOATS:
        fail(f"argument '{name}' must be float32, float16 or bfloat16, got {_dtype(t)}")


def check_rank(t: Tensor, name: str, lo: int, hi: int) -> None:
    if not lo <= t.dim() <= hi:
        want = str(lo) if lo == hi else f"{lo} or {hi}"
        fail(f"argument '{name}' must have rank {want}, got shape {_shape(t)}")


def check_same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        fail(f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def check_same_dtype(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        fail(f"argument '{name}' has dtype {_dtype(t)} but '{ref_name}' has dtype {_dtype(ref)}")


def check_size(t: Tensor, name: str, dim: int, expected: int, what: str) -> None:
    if t.size(dim) != expected:
        dim = dim % t.dim()
        fail(f"argument '{name}' has size {t.size(dim)} at dim {dim} but {what} is {expected} (shape {_shape(t)})")


def check_same_rank(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dim() != ref.dim():
        fail(f"argument '{name}' must have the rank of '{ref_name}' ({ref.dim()}), got shape {_shape(t)}")


def check_writable(t: Tensor, name: str) -> None:
    if torch._debug_has_internal_overlap(t) == 1:  # MemOverlap::Yes
        fail(f"argument '{name}' is written in place and must not have internal overlap (e.g. an expanded tensor)")


def check_index_meta(index: Tensor, name: str, batch: int, like: Tensor, like_name: str) -> None:
    if index.dtype not in (torch.int64, torch.int32):
        fail(f"argument '{name}' must be int32 or int64, got {_dtype(index)}")
    if index.dim() != 2:
        fail(f"argument '{name}' must have shape [B, K], got {_shape(index)}")
    check_size(index, name, 0, batch, f"the batch size of '{like_name}'")
    check_same_device(index, name, like, like_name)


def check_k(k: int, n: int) -> None:
    if not 0 <= k <= n:
        fail(f"argument 'k' must satisfy 0 <= k <= N = {n} (tokens in 'c'), got {k}", ValueError)


def check_capacity(capacity: int, n: int) -> None:
    if not 0 <= capacity <= n:
        fail(f"argument 'capacity' must satisfy 0 <= capacity <= N = {n} (tokens in 'c'), got {capacity}", ValueError)


def check_threshold(threshold: float) -> None:
    if not math.isfinite(threshold):
        fail(f"argument 'threshold' must be finite, got {float(threshold)}", ValueError)


def raise_index_error(index: Tensor, name: str, n: int, unique: bool) -> None:
    """Host scan in the C++ order (row by row, range before uniqueness; -1, an empty slot, is skipped); raises the
    first error found."""
    rows = index.detach().to("cpu", torch.int64).tolist()
    for b, row in enumerate(rows):
        seen = set()
        for j, v in enumerate(row):
            if v == -1:
                continue
            if not 0 <= v < n:
                fail(f"argument '{name}' holds {v} at [{b}, {j}], out of range [0, {n})", IndexError)
            if unique:
                if v in seen:
                    fail(f"argument '{name}' repeats token id {v} in row {b} (ids must be distinct)")
                seen.add(v)
    raise AssertionError("eventful: the device index check flagged an index the host check accepts")
