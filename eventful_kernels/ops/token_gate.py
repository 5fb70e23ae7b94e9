"""token_gate, token_gate_threshold, token_delta_gate: select the tokens of ``c [B, N, D]`` that changed most
against ``ref`` and refresh ``ref`` there."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.eventful


def token_gate(c: Tensor, ref: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k gate on ``||c - ref||_2``: returns ``(index [B,k] int64 ascending, c_sel [B,k,D])``;
    ``ref[index] = c_sel``."""
    return _ops.token_gate(c, ref, k)


def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tokens with ``||c - ref||_2 > threshold`` (finite), at most ``capacity`` (``0 <= capacity <= N``; largest
    kept), no host sync.

    Returns ``(index [B,capacity] int64, count [B] int64, c_sel [B,capacity,D])``; entries past ``count[b]`` are
    ``-1`` (empty slots, which every op skips) / zero rows. ``ref`` is updated at the selected tokens.
    """
    return _ops.token_gate_threshold(c, ref, threshold, capacity)


def token_delta_gate(
    c: Tensor, ref: Tensor, k: int = -1, index: Optional[Tensor] = None, *, check_index: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: ``(index, c_sel, e_sel = c_sel - ref_old[index])``; ``index`` given forces the selection."""
    return _ops.token_delta_gate(c, ref, k, index, check_index=check_index)


@torch.library.register_fake("eventful::token_gate")
def _token_gate_fake(c, ref, k):
    b, _, d = c.shape
    return c.new_empty((b, k), dtype=torch.long), c.new_empty((b, k, d))


@torch.library.register_fake("eventful::token_gate_threshold")
def _token_gate_threshold_fake(c, ref, threshold, capacity):
    b, n, d = c.shape
    if all(isinstance(s, int) for s in (*c.shape, *ref.shape)):
        _ops._check_token_gate_threshold(c, ref, threshold, capacity)  # the kernels' own checks (checks.h)
    else:  # symbolic sizes: the output shape still needs 0 <= capacity <= N (the kernel raises the full message)
        torch._check_value(capacity >= 0)
        torch._check_value(capacity <= n)
    return (
        c.new_empty((b, capacity), dtype=torch.long),
        c.new_empty((b,), dtype=torch.long),
        c.new_empty((b, capacity, d)),
    )


@torch.library.register_fake("eventful::token_delta_gate")
def _token_delta_gate_fake(c, ref, k, index=None, *, check_index=True):
    b, _, d = c.shape
    kk = index.shape[1] if index is not None else k
    return c.new_empty((b, kk), dtype=torch.long), c.new_empty((b, kk, d)), c.new_empty((b, kk, d))
