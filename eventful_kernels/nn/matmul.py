"""Stateful attention products: the QK^T logits buffer and the A·V delta accumulator.

Shapes: ``q [B,H,Nq,d]``, ``k, v [B,H,N,d]``, logits / attention ``[B,H,Nq,N]``; ``index [B,K]`` token ids shared
over heads. Inputs may be strided views (e.g. of a qkv buffer); state tensors are owned, contiguous, updated in place.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

from .backend import EventfulModule, refill
from .linear import product_dtype
from .placement import empty_placed, placed_copy


class LogitBias(Protocol):
    """Additive logit bias (e.g. decomposed relative position) as rows, columns or the dense map."""

    def rows(self, index_q: Tensor) -> Tensor: ...  # [B,H,Kq,N]

    def cols(self, index_k: Tensor) -> Tensor: ...  # [B,H,Nq,Kk]

    def dense(self) -> Tensor: ...  # [B,H,Nq,N]

    # Optional: ``decomposed() -> (rel_h [B,H,Nq,Gh], rel_w [B,H,Nq,Gw])`` with bias[i, j] = rel_h[i, j // Gw] +
    # rel_w[i, j % Gw]; a bias that has it is added inside ``qk_update_`` instead of by rows()/cols().


def _check_heads(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"eventful: argument '{name}' must be a floating tensor of shape [B, H, N, d]")


def _check_index(index: Optional[Tensor], name: str, batch: int) -> None:
    if index is None:
        raise ValueError(f"eventful: argument '{name}' is required after the flush call")
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"eventful: argument '{name}' must be an int32/int64 tensor of shape [B={batch}, K]")


class MatmulBuffer(EventfulModule):
    """QK^T state. ``forward(q, k, index_q, index_k, scale, bias=None) -> logits [B,H,Nq,Nk]`` (the state itself).

    Flush: ``logits = q @ k^T * scale (+ bias.dense())``. Afterwards rows ``index_q`` and columns ``index_k`` are
    recomputed in place by the fused ``qk_update_``; a decomposed rel-pos bias (``bias.decomposed()``) is added
    inside the op, any other bias's ``rows`` / ``cols`` are added to the recomputed entries afterwards (once where
    rows and columns cross; untouched entries already hold their bias).
    ``last_macs``: flush ``B*H*Nq*Nk*d``, update ``B*H*(Kq*Nk + Nq*Kk)*d``.
    """

    state_attrs = ("logits",)
    state_slots = {"logits": "logits"}

    def __init__(self, backend: str = "ops"):
        super().__init__(backend)
        self.logits: Optional[Tensor] = None

    @torch.no_grad()
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        index_q: Optional[Tensor],
        index_k: Optional[Tensor],
        scale: float,
        bias: Optional[LogitBias] = None,
    ) -> Tensor:
        _check_heads(q, "q")
        _check_heads(k, "k")
        b, h, nq, d = q.shape
        nk = k.shape[2]
        if k.shape[:2] != q.shape[:2] or k.shape[3] != d or k.dtype != q.dtype:
            raise ValueError(
                f"eventful: argument 'k' {tuple(k.shape)} {k.dtype} does not match 'q' {tuple(q.shape)} {q.dtype}")
        if self.logits is None or self._refresh:
            logits = self.logits
            if logits is None or logits.shape != (b, h, nq, nk) or logits.dtype != q.dtype or logits.device != q.device:
                logits = empty_placed((b, h, nq, nk), q, "logits")
            up = product_dtype(q)
            if up == q.dtype:
                torch.matmul(q, k.transpose(-1, -2), out=logits).mul_(scale)
            else:
                logits.copy_(torch.matmul(q.to(up), k.to(up).transpose(-1, -2)).mul_(scale))
            if bias is not None:
                logits.add_(bias.dense())
            self.logits = logits
            self._refresh = False
            self.last_macs = b * h * nq * nk * d
            return logits
        logits = self.logits
        if logits.shape != (b, h, nq, nk) or logits.dtype != q.dtype or logits.device != q.device:
            raise ValueError(
                f"eventful: q/k give logits {(b, h, nq, nk)} {q.dtype} but the buffer holds {tuple(logits.shape)} "
                f"{logits.dtype}; call reset() before starting a new stream"
            )
        _check_index(index_q, "index_q", b)
        _check_index(index_k, "index_k", b)
        kq, kk = index_q.shape[1], index_k.shape[1]
        self.last_macs = b * h * (kq * nk + nq * kk) * d
        ops = self.k_ops
        fused = bias.decomposed() if hasattr(bias, "decomposed") else ()  # rel-pos bias added inside the op
        checked = self.check_index
        ops.qk_update_(logits, q, k, index_q, index_k, scale, *fused, check_index=checked)
        if bias is None or fused:
            return logits
        # add the bias to the recomputed entries: rows, then columns except where they cross those rows
        if kq:
            rows = ops.gather_rows(logits, index_q, check_index=checked).add_(bias.rows(index_q))
            ops.scatter_rows_(logits, index_q, rows, check_index=checked)
        if kk:
            cols_bias = bias.cols(index_k)
            if kq:
                ops.scatter_rows_(cols_bias, index_q, cols_bias.new_zeros(b, h, kq, kk), check_index=checked)
            cols = ops.gather_cols(logits, index_k, check_index=checked).add_(cols_bias)
            ops.scatter_cols_(logits, index_k, cols, check_index=checked)
        return logits


class MatmulDeltaAccumulator(EventfulModule):
    """A·V state. ``forward(a [B,H,M,N], v [B,H,N,d], index [B,K]) -> out [B,H,M,d]`` (a view of the state).

    Flush: ``out = a @ v``; ``a`` and ``v`` are stored (copied) as the references. Afterwards the fused
    ``av_delta_update_``: ``out += a[..., S] @ v[S] - a_ref[..., S] @ v_ref[S]`` with ``S = index``, then the
    references are refreshed at ``S`` (invariant ``out == a_ref @ v_ref``). The state is stored token-major
    (``[B, M, H, d]``), so :attr:`tokens` is a free ``[B, M, H*d]`` view (heads merged, as before a projection).
    ``last_macs``: flush ``B*H*M*N*d``, update ``2*B*H*M*K*d``.

    ``out_dtype`` (a forward argument, default ``a``'s dtype): the dtype of the output state, float32 with
    float16/bfloat16 ``a``/``v`` (the references keep ``a``'s dtype; the products are accumulated in float32: the
    flush multiplies the 16-bit values upcast, as ``av_delta_update_`` does, so ``out == a_ref @ v_ref`` holds to
    float32 rounding).
    """

    state_attrs = ("out", "a_ref", "v_ref")
    state_slots = {"a_ref": "attention_ref"}

    def __init__(self, backend: str = "ops"):
        super().__init__(backend)
        self.out: Optional[Tensor] = None  # [B, M, H, d]
        self.a_ref: Optional[Tensor] = None
        self.v_ref: Optional[Tensor] = None

    @property
    def flushing(self) -> bool:
        """True when the next call is a flush (no state, or a refresh is pending)."""
        return self.out is None or self._refresh

    @property
    def tokens(self) -> Tensor:
        """The output as ``[B, M, H*d]`` tokens (a view of the state)."""
        b, m, h, d = self.out.shape
        return self.out.view(b, m, h * d)

    @torch.no_grad()
    def forward(self, a: Tensor, v: Tensor, index: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
        _check_heads(a, "a")
        _check_heads(v, "v")
        b, h, m, n = a.shape
        d = v.shape[3]
        out_dtype = a.dtype if out_dtype is None else out_dtype
        if v.shape[:3] != (b, h, n) or v.dtype != a.dtype or v.device != a.device:
            raise ValueError(
                f"eventful: argument 'v' {tuple(v.shape)} {v.dtype} does not match 'a' {tuple(a.shape)} {a.dtype}")
        if out_dtype not in (a.dtype, torch.float32):
            raise ValueError(
                f"eventful: argument 'out_dtype' must be float32 or the dtype of 'a' ({a.dtype}), got {out_dtype}")
        if self.flushing:
            out = self.out
            if out is None or out.shape != (b, m, h, d) or out.dtype != out_dtype or out.device != a.device:
                out = torch.empty(b, m, h, d, dtype=out_dtype, device=a.device)
            up = out_dtype if out_dtype != a.dtype else product_dtype(a)
            if up == a.dtype:
                out.permute(0, 2, 1, 3).copy_(torch.matmul(a, v))
            else:
                out.permute(0, 2, 1, 3).copy_(torch.matmul(a.to(up), v.to(up)))
            if self.a_ref is not None and self.a_ref.shape == a.shape and self.a_ref.dtype == a.dtype and \
                    self.a_ref.device == a.device:
                self.a_ref.copy_(a)
            else:
                self.a_ref = placed_copy(a.detach(), "attention_ref")
            self.v_ref = refill(self.v_ref, v)
            self.out = out
            self._refresh = False
            self.last_macs = b * h * m * n * d
            return out.permute(0, 2, 1, 3)
        if self.a_ref.shape != a.shape or self.v_ref.shape != v.shape or self.a_ref.dtype != a.dtype or \
                self.out.dtype != out_dtype:
            raise ValueError(
                f"eventful: a {tuple(a.shape)} {a.dtype} / v {tuple(v.shape)} (output {out_dtype}) do not match the "
                f"stored references {tuple(self.a_ref.shape)} {self.a_ref.dtype} / {tuple(self.v_ref.shape)} (output "
                f"{self.out.dtype}); call reset() before starting a new stream"
            )
        _check_index(index, "index", b)
        out4 = self.out.permute(0, 2, 1, 3)
        self.last_macs = 2 * b * h * m * index.shape[1] * d
        if index.shape[1]:
            self.k_ops.av_delta_update_(out4, a, self.a_ref, v, self.v_ref, index, check_index=self.check_index)
        return out4
