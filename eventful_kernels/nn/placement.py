"""Page placement of the large attention states (CPU).

The logits buffer, the softmax output and the A·V reference are ``[B, H, N, N]`` tensors of the same size, walked
in lockstep (softmax reads logits row ``i`` while writing attention row ``i``; the A·V update reads the attention
and its reference at the same columns while writing the reference). When two such tensors start at nearly the same
offset within a 4 KiB page, a load and an earlier store a few cache lines apart share their low 12 address bits and
the core stalls the load on a false dependency ("4K aliasing"). The allocator decides those offsets, so whether a
run hit it was chance: measured on the 2-core VM (N = 4096, 12 heads, fp32), a softmax into an output 64 B past its
input's page offset took 121 ms instead of 65-92 ms, and the A·V update with reference and attention 0-128 B apart
took 156-173 ms instead of 132 ms. Each state therefore gets its own fixed page offset (a slot of :data:`SLOTS`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

PAGE_BYTES = 4096
# Page offsets in bytes, a cache-line multiple apart by roughly a third of a page in both directions.
SLOTS = {"logits": 0, "attention": 1344, "attention_ref": 2688}


def empty_placed(shape: Sequence[int], like: Tensor, slot: str) -> Tensor:
    """Uninitialised contiguous tensor of ``shape`` with ``like``'s dtype/device whose data starts ``SLOTS[slot]``
    bytes past a 4 KiB page boundary (CPU; other devices get a plain ``torch.empty``)."""
    offset = SLOTS[slot]
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    numel = 1
    for s in shape:
        numel *= int(s)
    item = like.element_size()
    spare = PAGE_BYTES // item
    raw = torch.empty(numel + spare, dtype=like.dtype, device=like.device)
    start = ((offset - raw.data_ptr()) % PAGE_BYTES) // item  # allocations are cache-line aligned: exact
    return raw[start : start + numel].view(shape)


def placed_copy(src: Tensor, slot: str) -> Tensor:
    """Contiguous copy of ``src`` placed as :func:`empty_placed` (``slot``)."""
    return empty_placed(src.shape, src, slot).copy_(src)


def placed(t: Tensor, slot: str) -> Tensor:
    """``t`` itself when it is contiguous and already placed at ``slot`` (or not on the CPU), else a placed copy."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % PAGE_BYTES == SLOTS[slot]):
        return t
    return placed_copy(t, slot)


class Workspace:
    """Scratch tensors that live only within one forward call, shared by the modules that hold this workspace.

    ``get(name, shape, like, slot)`` returns the cached tensor for ``(name, shape, dtype, device)`` (placed as
    :func:`empty_placed`) or allocates it; contents are undefined on return. The softmax output of
    :class:`~eventful_kernels.nn.EventfulAttention` is such a tensor: it is rewritten in full every call and dead
    after it, so the global blocks of one model can share a single ``[B,H,N,N]`` buffer (SAM at 1024 px: one
    805 MB buffer instead of four). Modules sharing a workspace must not run concurrently.
    """

    def __init__(self) -> None:
        self._tensors: dict = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor, slot: str) -> Tensor:
        key = (name, tuple(int(s) for s in shape), like.dtype, like.device)
        t = self._tensors.get(key)
        if t is None:
            t = self._tensors[key] = empty_placed(shape, like, slot)
        return t

    def clear(self) -> None:
        """Drop every cached tensor (their memory goes back to the allocator)."""
        self._tensors.clear()

    def __getstate__(self) -> dict:
        return {"_tensors": {}}  # scratch: a copy starts empty

    def __len__(self) -> int:
        return len(self._tensors)
