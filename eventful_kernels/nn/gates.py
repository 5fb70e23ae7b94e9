"""Token gates: pick the tokens whose input changed most since they were last selected.

A gate keeps a reference ``ref [B, N, D]`` (the value of each token when it was last selected). The first call after
construction or ``reset()`` is the *flush*: every token is selected and ``ref`` is filled. Afterwards the policy
selects on the score ``||c - ref||_2`` and ``ref`` is updated at the selected tokens only (error accumulates in the
unselected ones until they are picked). Rows of the batch are independent streams.

Shapes never depend on the data: a top-k policy selects ``K = policy.k(N)`` tokens per stream, a
:class:`~eventful_kernels.nn.policies.Threshold` policy fills ``capacity`` slots per stream and pads with ``-1``
(empty slots, which every op skips). So a steady-state frame needs no host synchronisation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .backend import EventfulModule, refill
from .policies import Policy, Threshold, as_policy


def check_tokens(x: Tensor, name: str) -> None:
    """``x`` must be a floating ``[B, N, D]`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"eventful: argument '{name}' must be a Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"eventful: argument '{name}' must have shape [B, N, D], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"eventful: argument '{name}' must be floating point, got {x.dtype}")


def check_state_match(x: Tensor, name: str, state: Tensor, what: str) -> None:
    """``x`` must agree with an existing state tensor in shape, dtype and device (else: call ``reset()``)."""
    if x.shape != state.shape or x.dtype != state.dtype or x.device != state.device:
        raise ValueError(
            f"eventful: argument '{name}' is {tuple(x.shape)} {x.dtype} on {x.device} but the {what} holds "
            f"{tuple(state.shape)} {state.dtype} on {state.device}; call reset() before starting a new stream"
        )


def trim_slots(policy: Threshold, count: Tensor, *selected: Tensor) -> Tuple[Tensor, ...]:
    """Cut threshold selections ``[B, capacity, ...]`` to the largest count in the batch when the policy trims on
    their device (the only place a gate reads a value back); otherwise return them as they are."""
    if not policy.trims(count.device):
        return selected
    k = int(count.max()) if count.numel() else 0
    return tuple(t[:, :k] for t in selected)


class _GateBase(EventfulModule):
    state_attrs = ("ref",)
    cache_attrs = ("_arange",)

    def __init__(self, policy: Optional[Policy] = None, backend: str = "ops"):
        super().__init__(backend)
        self.policy = as_policy(policy)
        self.ref: Optional[Tensor] = None
        self._arange: Optional[Tensor] = None

    @property
    def flushing(self) -> bool:
        """True when the next call is a flush (no reference yet, or a refresh is pending)."""
        return self.ref is None or self._refresh

    def _all_tokens(self, c: Tensor) -> Tensor:
        """``arange(N)`` expanded to ``[B, N]`` int64 (cached per N and device)."""
        b, n, _ = c.shape
        if self._arange is None or self._arange.numel() != n or self._arange.device != c.device:
            self._arange = torch.arange(n, device=c.device)
        return self._arange.expand(b, n)

    def _check(self, c: Tensor) -> None:
        check_tokens(c, "c")
        if self.ref is not None:
            check_state_match(c, "c", self.ref, "gate reference")


class TokenGate(_GateBase):
    """Top-k / threshold token gate. ``forward(c [B,N,D]) -> (index [B,K] int64, c_sel [B,K,D])``.

    Top-k policies: ``K = policy.k(N)``, ids ascending, one fused ``token_gate`` call. Threshold policy: one fused
    ``token_gate_threshold`` call; each stream's above-threshold tokens (the largest ``capacity`` of them) ascending,
    then ``-1`` with zero rows in ``c_sel``; ``K = capacity``, or the largest count when the policy trims. At the
    flush ``c_sel`` is ``c`` itself (not a copy). No host synchronisation except a trimming threshold policy's.
    """

    @torch.no_grad()
    def forward(self, c: Tensor) -> Tuple[Tensor, Tensor]:
        self._check(c)
        self.last_macs = 0
        if self.flushing:
            self.ref = refill(self.ref, c)
            self._refresh = False
            return self._all_tokens(c), c
        policy = self.policy
        if not isinstance(policy, Threshold):
            return self.k_ops.token_gate(c, self.ref, policy.k(c.shape[1]))
        index, count, c_sel = self.k_ops.token_gate_threshold(c, self.ref, policy.h, policy.capacity_for(c.shape[1]))
        return trim_slots(policy, count, index, c_sel)


class TokenDeltaGate(_GateBase):
    """Delta gate. ``forward(c [B,N,D], index=None) -> (index [B,K], c_sel [B,K,D], e_sel = c_sel - ref_old)``.

    As :class:`TokenGate`, also returning the change ``e_sel`` of each selected token since it was last selected; an
    explicit ``index [B, K]`` (distinct ids, ``-1`` for empty slots) forces the selection. The reference starts at
    zero, so the flush returns ``e_sel = c_sel = c`` (a forced index at the flush must select all N tokens).
    """

    @torch.no_grad()
    def forward(self, c: Tensor, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        self._check(c)
        self.last_macs = 0
        if index is not None:
            _check_index(index, c)
        if self.flushing:
            if index is None:
                self.ref = refill(self.ref, c)
                self._refresh = False
                return self._all_tokens(c), c, c
            if index.shape[1] != c.shape[1]:
                raise ValueError(
                    f"eventful: argument 'index' selects {index.shape[1]} of {c.shape[1]} tokens, but the flush "
                    "(first call after reset) must select all of them"
                )
            ref = torch.zeros_like(c, memory_format=torch.contiguous_format)
            out = self.k_ops.token_delta_gate(c, ref, -1, index, check_index=self.check_index)
            self.ref = refill(self.ref, ref)
            self._refresh = False
            return out
        if index is not None:
            return self.k_ops.token_delta_gate(c, self.ref, -1, index, check_index=self.check_index)
        policy = self.policy
        if not isinstance(policy, Threshold):
            return self.k_ops.token_delta_gate(c, self.ref, policy.k(c.shape[1]), None)
        scores = reference.gate_scores(c, self.ref)
        index, count = reference.select_threshold(scores, policy.h, policy.capacity_for(c.shape[1]))
        (index,) = trim_slots(policy, count, index)
        return self.k_ops.token_delta_gate(c, self.ref, -1, index, check_index=False)


def _check_index(index: Tensor, c: Tensor) -> None:
    if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64) or index.dim() != 2:
        raise ValueError("eventful: argument 'index' must be an int32/int64 tensor of shape [B, K]")
    if index.shape[0] != c.shape[0] or index.device != c.device:
        raise ValueError(
            f"eventful: argument 'index' has shape {tuple(index.shape)} on {index.device}, "
            f"expected [B={c.shape[0]}, K] on {c.device}"
        )
