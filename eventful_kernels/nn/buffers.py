"""Token buffer: the full output of a token-wise layer, patched at the selected tokens every frame."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import EventfulModule, refill
from .gates import check_tokens


class TokenBuffer(EventfulModule):
    """``forward(x_sel [B,K,D'], index [B,K] or None) -> full [B,N,D']``.

    Scatters ``x_sel`` into the stored state at ``index`` (in place; ``-1`` slots are skipped) and returns the state
    tensor itself (callers must not mutate it). The flush call (state empty) stores ``x_sel`` as the state (with
    ``index`` given, the state is filled through it, so any permutation of ``arange(N)`` works); ``n_tokens = K`` of
    that call. ``add_to(residual, x_sel, index, scale)`` returns ``residual + forward(x_sel, index)`` (scaled), in one
    op after the flush.
    """

    state_attrs = ("state",)

    def __init__(self, backend: str = "ops"):
        super().__init__(backend)
        self.state: Optional[Tensor] = None

    @property
    def n_tokens(self) -> Optional[int]:
        return None if self.state is None else self.state.shape[1]

    def _check_call(self, x_sel: Tensor, index: Optional[Tensor]) -> None:
        """The arguments of a call, checked before anything is written (``index`` may be None: the flush)."""
        check_tokens(x_sel, "x_sel")
        self.last_macs = 0
        if index is None:
            return
        if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64) or index.dim() != 2:
            raise ValueError("eventful: argument 'index' must be an int32/int64 tensor of shape [B, K]")
        if tuple(index.shape) != tuple(x_sel.shape[:2]):
            raise ValueError(
                f"eventful: argument 'index' has shape {tuple(index.shape)} but 'x_sel' is {tuple(x_sel.shape)}"
            )

    @torch.no_grad()
    def forward(self, x_sel: Tensor, index: Optional[Tensor] = None) -> Tensor:
        self._check_call(x_sel, index)
        if self.state is None or self._refresh:
            if index is None:
                self.state = refill(self.state, x_sel)
            else:
                state = self.state
                if state is None or state.shape != x_sel.shape or state.dtype != x_sel.dtype or \
                        state.device != x_sel.device:
                    state = torch.empty_like(x_sel, memory_format=torch.contiguous_format)
                self.k_ops.scatter_rows_(state, index, x_sel, check_index=self.check_index)
                self.state = state
            self._refresh = False
            return self.state
        self._check_steady(x_sel, index)
        if index.shape[1]:
            self.k_ops.scatter_rows_(self.state, index, x_sel, check_index=self.check_index)
        return self.state

    def _check_steady(self, x_sel: Tensor, index: Optional[Tensor]) -> None:
        s = self.state
        if index is None:
            raise ValueError("eventful: argument 'index' is required after the flush call")
        if (x_sel.shape[0] != s.shape[0] or x_sel.shape[2] != s.shape[2] or x_sel.dtype != s.dtype
                or x_sel.device != s.device):
            raise ValueError(
                f"eventful: argument 'x_sel' is {tuple(x_sel.shape)} {x_sel.dtype} on {x_sel.device} but the buffer "
                f"holds {tuple(s.shape)} {s.dtype} on {s.device}; call reset() before starting a new stream"
            )

    @torch.no_grad()
    def add_to(self, residual: Tensor, x_sel: Tensor, index: Optional[Tensor] = None,
               scale: Optional[Tensor] = None) -> Tensor:
        """``residual + forward(x_sel, index)``, the state multiplied by ``scale [D']`` first if given (as
        ``torch.addcmul``); a new tensor. After the flush, with ``residual`` shaped like the state and every operand
        in its dtype and device, one op patches the state and adds (``scatter_rows_residual_``): the state is read
        once, no separate add runs."""
        s = self.state
        fused = (
            s is not None and not self._refresh and isinstance(index, Tensor)
            and isinstance(residual, Tensor) and residual.shape == s.shape and residual.dtype == s.dtype
            and residual.device == s.device
            and (scale is None or scale.shape == s.shape[-1:] and scale.dtype == s.dtype and scale.device == s.device)
        )
        if not fused:
            full = self.forward(x_sel, index)
            return residual + full if scale is None else torch.addcmul(residual, full, scale)
        self._check_call(x_sel, index)
        self._check_steady(x_sel, index)
        return self.k_ops.scatter_rows_residual_(s, index, x_sel, residual, scale, check_index=self.check_index)
