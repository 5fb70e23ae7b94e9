"""Gates, buffers and attention accumulators with the published names, call signatures and return values,
running on the fused ``torch.ops.eventful`` kernels (``backend="ops"``) or their reference (``"reference"``).

Every module's first call after construction or ``reset()`` is the *flush* (``first`` is True before it): it
computes densely and stores the state. Tokens are rows (``structure="row"``: ``[..., N, D]``) or columns
(``structure="col"``: ``[..., D, N]``, e.g. the columns of an attention matrix); an index is ``[..., K]`` over
leading dims that prefix the tensor's and is shared over the rest (``[B, K]`` serves every head of
``[B, H, N, d]``). ``-1`` entries (what a threshold policy pads with when several rows are gated at once) are
empty slots that every module skips. With ``count_mode`` on, each call adds to ``counts`` the quantities the
published modules count (``gate_flops``, ``matmul_flops``, ``accumulator_flops``).
"""
from __future__ import annotations

from math import prod
from typing import Optional

import torch
from torch import Tensor

from ..nn.backend import BackendChoice
from ..nn.policies import Threshold
from . import _layout
from .base import ExtendedModule


def _tensor(x, name: str, min_dim: int = 2) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < min_dim or not x.is_floating_point():
        raise ValueError(f"eventful: argument '{name}' must be a floating tensor with at least {min_dim} dims")
    return x


def _same(x: Tensor, name: str, state: Tensor, what: str, token_dim: Optional[int] = None) -> None:
    """``x`` must match ``state`` in dtype, device and shape (except at ``token_dim``, the selected tokens)."""
    xs, ss = list(x.shape), list(state.shape)
    if token_dim is not None and len(xs) == len(ss):
        xs[token_dim] = ss[token_dim] = 0
    if xs != ss or x.dtype != state.dtype or x.device != state.device:
        raise ValueError(
            f"eventful: argument '{name}' is {tuple(x.shape)} {x.dtype} on {x.device} but the {what} holds "
            f"{tuple(state.shape)} {state.dtype} on {state.device}; call reset() before starting a new stream"
        )


def _own(x: Tensor) -> Tensor:
    return x.detach().clone(memory_format=torch.contiguous_format)


class _OpsModule(BackendChoice, ExtendedModule):
    """A compatibility module running on a backend of :mod:`eventful_kernels.nn.backend` (settable)."""

    def __init__(self, backend: str = "ops"):
        super().__init__()
        self.backend = backend
        self.first = True

    def _count(self, name: str, value: int) -> None:
        if self.count_mode:
            self.counts[name] += int(value)


class TokenGate(_OpsModule):
    """``forward(c, forced_index=None) -> (c_tilde, index)``: the tokens of ``c`` that changed most since they
    were last selected, chosen by ``self.policy`` (set it before the second call, e.g. ``TokenNormTopK(k)``).

    Flush: returns ``(c, None)`` and keeps a copy of ``c`` as the reference ``p``. Later: ``index = policy(c - p)``
    (or ``forced_index``), ``c_tilde = c`` at ``index`` (``[..., K, D]`` / ``[..., D, K]``), ``p`` updated there.
    An L2 top-k / fraction / threshold policy runs inside one fused kernel (``token_gate``, row structure), which
    never forms ``c - p``; index ids are ascending. ``counts["gate_flops"] += p.numel()`` per later call.
    """

    def __init__(self, structure: str = "row", *, backend: str = "ops"):
        super().__init__(backend)
        self.structure = _layout.check_structure(structure)
        self.policy = None
        self.p: Optional[Tensor] = None

    @property
    def _token_dim(self) -> int:
        return -2 if self.structure == "row" else -1

    def forward(self, c: Tensor, forced_index: Optional[Tensor] = None):
        if self.first:
            return self.forward_first(c)
        return self.forward_incremental(c, forced_index=forced_index)

    @torch.no_grad()
    def forward_first(self, c: Tensor):
        _tensor(c, "c")
        self.p = _own(c)
        self.first = False
        return c, None

    def _check(self, c: Tensor, forced_index: Optional[Tensor]) -> None:
        _tensor(c, "c")
        _same(c, "c", self.p, "gate reference")
        if forced_index is not None:
            _layout.check_index(forced_index, c, "forced_index")
        elif self.policy is None:
            raise ValueError(f"eventful: {type(self).__name__}.policy is not set; assign a policy such as "
                             "TokenNormTopK(k) before the second call")

    def _fused(self, forced_index):
        """The fused policy when the selection can run inside the gate kernel (row tokens, policy-chosen)."""
        if forced_index is not None or self.structure != "row":
            return None
        fused = getattr(self.policy, "fused", None)
        return fused() if callable(fused) else None

    def _select(self, c: Tensor, forced_index: Optional[Tensor]) -> Tensor:
        if forced_index is not None:
            return forced_index
        return self.policy(c - self.p, dim=-1 if self.structure == "row" else -2)

    @torch.no_grad()
    def forward_incremental(self, c: Tensor, forced_index: Optional[Tensor] = None):
        self._check(c, forced_index)
        self._count("gate_flops", self.p.numel())
        policy = self._fused(forced_index)
        if policy is not None:
            n, d = c.shape[-2:]
            c3, p3 = c.reshape(-1, n, d), self.p.view(-1, n, d)
            if isinstance(policy, Threshold):
                index, count, c_sel = self.k_ops.token_gate_threshold(c3, p3, policy.h, n)
                k = int(count.max()) if count.numel() else 0
                index, c_sel = index[:, :k], c_sel[:, :k]
            else:
                index, c_sel = self.k_ops.token_gate(c3, p3, policy.k(n))
            k = index.shape[1]
            return c_sel.reshape(*c.shape[:-2], k, d), index.reshape(*c.shape[:-2], k)
        index = self._select(c, forced_index)
        c_tilde = _layout.gather(self.k_ops, c, index, self.structure)
        _layout.scatter_(self.k_ops, self.p, index, c_tilde, self.structure)
        return c_tilde, index

    def reset_self(self) -> None:
        self.first = True
        self.p = None


class TokenDeltaGate(TokenGate):
    """``forward(c, forced_index=None) -> (c_tilde, e_tilde, index)``: as :class:`TokenGate`, also returning the
    change ``e_tilde = c_tilde - p_old`` of each selected token since it was last selected. Flush:
    ``(c, None, None)``. An L2 top-k policy (row tokens) runs in the fused ``token_delta_gate`` kernel."""

    @torch.no_grad()
    def forward_first(self, c: Tensor):
        c, _ = super().forward_first(c)
        return c, None, None

    @torch.no_grad()
    def forward_incremental(self, c: Tensor, forced_index: Optional[Tensor] = None):
        self._check(c, forced_index)
        self._count("gate_flops", self.p.numel())
        policy = self._fused(forced_index)
        if policy is not None and not isinstance(policy, Threshold):
            n, d = c.shape[-2:]
            index, c_sel, e_sel = self.k_ops.token_delta_gate(c.reshape(-1, n, d), self.p.view(-1, n, d), policy.k(n))
            k = index.shape[1]
            lead = c.shape[:-2]
            return c_sel.reshape(*lead, k, d), e_sel.reshape(*lead, k, d), index.reshape(*lead, k)
        index = self._select(c, forced_index)
        c_tilde = _layout.gather(self.k_ops, c, index, self.structure)
        e_tilde = c_tilde - _layout.gather(self.k_ops, self.p, index, self.structure)
        _layout.scatter_(self.k_ops, self.p, index, c_tilde, self.structure)
        return c_tilde, e_tilde, index


class TokenBuffer(_OpsModule):
    """``forward(x, index) -> b``: the full output of a token-wise layer, patched at ``index`` every call.

    Flush: stores a copy of ``x`` (``index`` ignored). Later: ``x`` (``[..., K, D]`` / ``[..., D, K]``) is written
    into the state ``b`` at ``index`` in place; returns ``b`` itself (do not modify it).
    """

    def __init__(self, structure: str = "row", *, backend: str = "ops"):
        super().__init__(backend)
        self.structure = _layout.check_structure(structure)
        self.b: Optional[Tensor] = None

    def forward(self, x: Tensor, index: Optional[Tensor]):
        if self.first:
            return self.forward_first(x)
        return self.forward_incremental(x, index)

    @torch.no_grad()
    def forward_first(self, x: Tensor) -> Tensor:
        _tensor(x, "x")
        self.b = _own(x)
        self.first = False
        return self.b

    @torch.no_grad()
    def forward_incremental(self, x: Tensor, index: Tensor) -> Tensor:
        _tensor(x, "x")
        token_dim = -2 if self.structure == "row" else -1
        _same(x, "x", self.b, "buffer", token_dim=x.dim() + token_dim)
        if index is None:
            raise ValueError("eventful: argument 'index' is required after the first call")
        _layout.check_index(index, self.b, "index")
        if index.shape[-1] != x.shape[token_dim]:
            raise ValueError(f"eventful: argument 'index' selects {index.shape[-1]} tokens but 'x' holds "
                             f"{x.shape[token_dim]}")
        _layout.scatter_(self.k_ops, self.b, index, x, self.structure)
        return self.b

    def reset_self(self) -> None:
        self.first = True
        self.b = None


def _heads(x: Tensor) -> Tensor:
    return x.unsqueeze(-3) if x.dim() == 2 else x


class MatmulBuffer(_OpsModule):
    """``forward(q, k, index_q, index_k) -> product``: the query-key product ``q @ k`` kept up to date.

    ``q [..., M, d]`` (already scaled), ``k [..., d, N]`` (keys transposed). Flush: ``product = q @ k``. Later the
    rows ``index_q`` and columns ``index_k`` are recomputed in place by the fused ``qk_update_``; returns the state
    ``product`` itself. ``counts["matmul_flops"]``: ``product.numel() * d`` at the flush, then the recomputed
    entries times ``d``.
    """

    def __init__(self, *, backend: str = "ops"):
        super().__init__(backend)
        self.product: Optional[Tensor] = None

    def forward(self, q: Tensor, k: Tensor, index_q: Optional[Tensor], index_k: Optional[Tensor]):
        if self.first:
            return self.forward_first(q, k)
        return self.forward_incremental(q, k, index_q, index_k)

    @staticmethod
    def _check_qk(q, k) -> None:
        _tensor(q, "q")
        _tensor(k, "k")
        if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-2] or q.dtype != k.dtype:
            raise ValueError(f"eventful: arguments 'q' {tuple(q.shape)} and 'k' {tuple(k.shape)} (keys transposed, "
                             "[..., d, N]) do not multiply")

    @torch.no_grad()
    def forward_first(self, q: Tensor, k: Tensor) -> Tensor:
        self._check_qk(q, k)
        self.product = torch.matmul(q, k).contiguous()
        self._count("matmul_flops", self.product.numel() * q.shape[-1])
        self.first = False
        return self.product

    @torch.no_grad()
    def forward_incremental(self, q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor) -> Tensor:
        self._check_qk(q, k)
        out = self.product
        if q.shape[:-1] + k.shape[-1:] != out.shape or q.dtype != out.dtype or q.device != out.device:
            raise ValueError(f"eventful: q @ k gives {tuple(q.shape[:-1] + k.shape[-1:])} {q.dtype} but the buffer "
                             f"holds {tuple(out.shape)} {out.dtype}; call reset() before starting a new stream")
        for idx, name in ((index_q, "index_q"), (index_k, "index_k")):
            if idx is None:
                raise ValueError(f"eventful: argument '{name}' is required after the first call")
            _layout.check_index(idx, out, name)
        if index_q.shape[:-1] != index_k.shape[:-1]:
            raise ValueError(f"eventful: 'index_q' {tuple(index_q.shape)} and 'index_k' {tuple(index_k.shape)} must "
                             "have the same leading dims")
        q4, iq = _layout.split(_heads(q), index_q)
        k4, ik = _layout.split(_heads(k).transpose(-1, -2), index_k)
        out4, _ = _layout.split(_heads(out), index_q)
        self.k_ops.qk_update_(out4, q4, k4, iq, ik, 1.0)
        m, n, d = out.shape[-2], out.shape[-1], q.shape[-1]
        self._count("matmul_flops", prod(out.shape[:-2]) * (index_q.shape[-1] * n + m * index_k.shape[-1]) * d)
        return out

    def reset_self(self) -> None:
        self.first = True
        self.product = None


class MatmulDeltaAccumulator(_OpsModule):
    """``forward(a_n_tilde, v_n_tilde, a_delta_tilde, v_delta_tilde) -> product``: the attention-value product
    kept up to date from the changed tokens alone.

    Flush: ``product = a @ v`` (``a_n_tilde`` the full attention ``[..., M, N]``, ``v_n_tilde`` the values
    ``[..., N, d]``). Later, with the new columns ``a_n [..., M, K]`` / rows ``v_n [..., K, d]`` of the changed
    tokens and their changes ``a_delta`` / ``v_delta`` (what :class:`TokenDeltaGate` returns):
    ``product += a_n @ v_n - (a_n - a_delta) @ (v_n - v_delta)`` in the fused ``av_delta_update_`` (float32
    accumulation). Returns the state itself. ``counts``: ``matmul_flops`` as two products, plus
    ``accumulator_flops = v_n.numel() + 2 * product.numel()``.
    """

    def __init__(self, *, backend: str = "ops"):
        super().__init__(backend)
        self.product: Optional[Tensor] = None

    def forward(self, a_n_tilde: Tensor, v_n_tilde: Tensor, a_delta_tilde: Optional[Tensor] = None,
                v_delta_tilde: Optional[Tensor] = None):
        if self.first:
            return self.forward_first(a_n_tilde, v_n_tilde)
        return self.forward_incremental(a_n_tilde, v_n_tilde, a_delta_tilde, v_delta_tilde)

    @torch.no_grad()
    def forward_first(self, a: Tensor, v: Tensor) -> Tensor:
        _tensor(a, "a_n_tilde")
        _tensor(v, "v_n_tilde")
        self.product = torch.matmul(a, v).contiguous()
        self._count("matmul_flops", self.product.numel() * a.shape[-1])
        self.first = False
        return self.product

    @torch.no_grad()
    def forward_incremental(self, a_n: Tensor, v_n: Tensor, a_delta: Tensor, v_delta: Tensor) -> Tensor:
        out = self.product
        for x, name in ((a_n, "a_n_tilde"), (a_delta, "a_delta_tilde"), (v_n, "v_n_tilde"), (v_delta, "v_delta_tilde")):
            _tensor(x, name)
            if x.dtype != out.dtype or x.device != out.device:
                raise ValueError(f"eventful: argument '{name}' is {x.dtype} on {x.device}, the accumulator "
                                 f"{out.dtype} on {out.device}")
        lead, (m, d), kk = out.shape[:-2], out.shape[-2:], a_n.shape[-1]
        if a_n.shape != (*lead, m, kk) or a_delta.shape != a_n.shape or v_n.shape != (*lead, kk, d) or \
                v_delta.shape != v_n.shape:
            raise ValueError(
                f"eventful: expected a_n_tilde/a_delta_tilde {(*lead, m, kk)} and v_n_tilde/v_delta_tilde "
                f"{(*lead, kk, d)} for the accumulator {tuple(out.shape)}, got {tuple(a_n.shape)}, "
                f"{tuple(a_delta.shape)}, {tuple(v_n.shape)}, {tuple(v_delta.shape)}")
        b = prod(lead)
        if kk and b:
            every = torch.arange(kk, device=out.device).expand(b, kk)
            a4, v4 = a_n.reshape(b, 1, m, kk), v_n.reshape(b, 1, kk, d)
            a_old = (a4 - a_delta.reshape(b, 1, m, kk)).contiguous()
            v_old = (v4 - v_delta.reshape(b, 1, kk, d)).contiguous()
            self.k_ops.av_delta_update_(out.view(b, 1, m, d), a4, a_old, v4, v_old, every, check_index=False)
        self._count("accumulator_flops", v_n.numel() + 2 * out.numel())
        self._count("matmul_flops", 2 * out.numel() * kk)
        return out

    def reset_self(self) -> None:
        self.first = True
        self.product = None
