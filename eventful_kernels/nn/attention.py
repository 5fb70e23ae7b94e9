"""Attention cores used by the eventful blocks, over ``Bw`` independent streams (batch x windows).

Inputs are ``q, k, v [Bw, H, T, d]`` (strided views of a qkv buffer are fine); outputs are ``[Bw, T, H*d]`` tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import EventfulModule
from .matmul import MatmulBuffer, MatmulDeltaAccumulator
from .placement import Workspace
from .relpos import DecomposedRelPos


class DenseAttention(EventfulModule):
    """``softmax(q k^T * scale + bias) v`` computed densely every call (the attention of a token-wise block).

    With ``attn`` given, the decomposed rel-pos bias of ``attn`` is added; its per-row terms are state, recomputed
    only at ``index`` (the query rows that changed since the previous call) when given, else in full.
    ``last_macs = 2*Bw*H*T*T*d``.
    """

    def __init__(self, attn: Optional[nn.Module] = None, backend: str = "ops"):
        super().__init__(backend)
        self.rel_pos = DecomposedRelPos(attn, backend) if attn is not None else None

    @torch.no_grad()
    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, grid: Optional[Tuple[int, int]] = None,
                index: Optional[Tensor] = None) -> Tensor:
        bw, h, t, d = q.shape
        bias = None
        if self.rel_pos is not None:
            bias = self.rel_pos.update(q, grid, index).dense()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        self.last_macs = 2 * bw * h * t * t * d
        return o.transpose(1, 2).reshape(bw, t, h * d)


class EventfulAttention(EventfulModule):
    """Eventful attention: logits buffer (QK^T rows/cols, + rel-pos), dense softmax, A·V delta accumulator.

    ``forward(q, k, v, scale, grid, index=None) -> [Bw, T, H*d]`` (a view of the accumulator state).
    The first call (flush) is dense. Afterwards ``index [Bw, K]`` are the tokens whose q/k/v changed (``-1``: empty
    slot): their logit rows and columns are recomputed and their A·V columns delta-updated. ``K = 0`` leaves the
    output unchanged. ``last_macs`` = the logits buffer's + the accumulator's.
    """

    def __init__(self, attn: Optional[nn.Module] = None, backend: str = "ops"):
        super().__init__(backend)
        self.qk_buffer = MatmulBuffer(backend)
        self.av_buffer = MatmulDeltaAccumulator(backend)
        self.rel_pos = DecomposedRelPos(attn, backend) if attn is not None else None
        # Holds the softmax output, scratch rewritten every call; EventfulModel gives all its blocks one workspace.
        self.workspace = Workspace()

    def _reset_state(self) -> None:
        super()._reset_state()
        self.workspace.clear()

    @property
    def flushing(self) -> bool:
        """True when the next call is a flush (no state, or a refresh is pending)."""
        return self.av_buffer.flushing or self.qk_buffer.logits is None or self.qk_buffer._refresh

    def drop_state(self) -> None:
        """Free the attention state (the next call is a flush) but keep the workspace, which may be shared."""
        for m in (self.qk_buffer, self.av_buffer, self.rel_pos):
            if m is not None:
                m.reset()
        self.last_macs = 0

    @torch.no_grad()
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        grid: Optional[Tuple[int, int]] = None,
        index: Optional[Tensor] = None,
    ) -> Tensor:
        flush = self.flushing
        if flush:
            index = None
            self.qk_buffer.refresh()
            self.av_buffer.refresh()
            if self.rel_pos is not None:
                self.rel_pos.refresh()
        elif index is None:
            raise ValueError("eventful: argument 'index' is required after the flush call")
        elif index.shape[1] == 0:
            self.last_macs = 0
            return self.av_buffer.tokens
        bias = self.rel_pos.update(q, grid, index) if self.rel_pos is not None else None
        logits = self.qk_buffer(q, k, index, index, scale, bias)
        a = torch.softmax(logits, -1, out=self.workspace.get("attention", logits.shape, logits, "attention"))
        self.av_buffer(a, v, index)
        self.last_macs = self.qk_buffer.last_macs + self.av_buffer.last_macs
        return self.av_buffer.tokens
