"""Token-selection policies with the published names: ``policy(errors, dim=-1) -> index``.

A policy reduces the token errors ``x`` (``[..., N, D]`` with ``dim=-1``, or ``[..., D, N]`` with ``dim=-2``) to
norms ``[..., N]`` (float32, ``ord=order``) and returns the chosen token ids ``[..., K]``, ascending (ties towards
the lower id). The gates of :mod:`eventful_kernels.compat.modules` call it like that, except that an L2 policy
(``order=2``) is fused into the gate's kernel: :meth:`fused` names the equivalent
:mod:`eventful_kernels.nn.policies` policy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..nn.policies import Policy, Threshold, TopFraction, TopK
from .base import ExtendedModule


class _NormPolicy(ExtendedModule):
    def __init__(self, order=2):
        super().__init__()
        self.order = order

    def _norms(self, x: Tensor, dim: int) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError("eventful: argument 'x' must be a tensor of token errors with at least 2 dims")
        return torch.linalg.vector_norm(x.float(), ord=self.order, dim=dim)

    def fused(self) -> Optional[Policy]:
        """The :mod:`eventful_kernels.nn.policies` policy the gates' fused kernels apply for this one, or None when
        the gate must call this policy on the errors (a norm other than L2, a policy that records its calls, or a
        subclass with its own ``forward``)."""
        if self.order != 2 or type(self).forward is not type(self)._FORWARD:
            return None
        return self._ours()


def _top(norms: Tensor, k: int) -> Tensor:
    n = norms.shape[-1]
    flat = norms.reshape(-1, n)
    return reference.select_topk(flat, k).view(*norms.shape[:-1], k)


class TokenNormTopK(_NormPolicy):
    """The ``k`` tokens with the largest error norm (all N when ``k >= N``). ``save_status=True`` keeps copies of
    the last input and output in ``last_input`` / ``last_output``."""

    def __init__(self, k, order=2, save_status=False):
        super().__init__(order)
        self.k = k
        self.save_status = save_status
        self.last_input = None
        self.last_output = None

    def _size(self, n: int) -> int:
        return TopK(self.k).k(n)

    def forward(self, x: Tensor, dim: int = -1) -> Tensor:
        norms = self._norms(x, dim)
        out = _top(norms, self._size(norms.shape[-1]))
        if self.save_status:
            self.last_input, self.last_output = x.clone(), out.clone()
        return out

    def _ours(self) -> Optional[Policy]:
        return None if self.save_status else TopK(self.k)


class TokenNormTopFraction(_NormPolicy):
    """The ``int(fraction * N)`` tokens with the largest error norm, ``0 <= fraction <= 1``."""

    def __init__(self, fraction, order=2):
        super().__init__(order)
        TopFraction(fraction)  # validates: a float in [0, 1]
        self.fraction = fraction

    def forward(self, x: Tensor, dim: int = -1) -> Tensor:
        norms = self._norms(x, dim)
        return _top(norms, TopFraction(self.fraction).k(norms.shape[-1]))

    def _ours(self) -> Policy:
        return TopFraction(self.fraction)


class TokenNormThreshold(_NormPolicy):
    """Every token whose error norm exceeds ``threshold``, ascending: ``[1, ..., 1, K]`` when all leading dims are
    1 (K data-dependent, read back to the host). With several rows (an extension) each row lists its tokens then
    ``-1`` empty slots up to the largest count, which every compatibility module and op skips."""

    def __init__(self, threshold=0.0, order=2):
        super().__init__(order)
        self.threshold = threshold

    def forward(self, x: Tensor, dim: int = -1) -> Tensor:
        norms = self._norms(x, dim)
        n = norms.shape[-1]
        index, count = reference.select_threshold(norms.reshape(-1, n), float(self.threshold), n)
        k = int(count.max()) if count.numel() else 0
        return index[:, :k].reshape(*norms.shape[:-1], k)

    def _ours(self) -> Policy:
        return Threshold(float(self.threshold), trim=True)


for _cls in (TokenNormTopK, TokenNormTopFraction, TokenNormThreshold):
    _cls._FORWARD = _cls.forward
