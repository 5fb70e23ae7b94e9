"""Token-selection policies shared by the gates of a model.

A policy object is shared by every gate of a model, so mutating it (``policy.r = 64``) changes the cost at the
next frame. Top-k policies give the selection size with ``policy.k(n_tokens)``; :class:`Threshold` selects the
tokens whose change exceeds ``h``, up to a fixed capacity (see :class:`eventful_kernels.nn.TokenGate`).
``policy.key()`` identifies the policy's current setting (e.g. to cache one captured frame per budget).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Union

import torch


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"eventful: argument '{name}' must be an int >= 0, got {value!r}")
    return int(value)


class Policy:
    """Base class of selection policies."""

    def k(self, n_tokens: int) -> int:
        raise TypeError(f"eventful: {type(self).__name__} has no fixed top-k size")

    def key(self) -> tuple:
        """Hashable identity of the current setting: equal keys select the same way."""
        return (type(self).__name__, tuple(sorted(vars(self).items())))


class TopK(Policy):
    """Select exactly ``min(r, N)`` tokens per stream."""

    def __init__(self, r: int):
        self.r = r

    @property
    def r(self) -> int:
        return self._r

    @r.setter
    def r(self, value: int) -> None:
        self._r = _check_int(value, "r")

    def k(self, n_tokens: int) -> int:
        return min(self._r, int(n_tokens))

    def __repr__(self) -> str:
        return f"TopK(r={self._r})"


class TopFraction(Policy):
    """Select ``int(f * N)`` tokens per stream (the floor of the float product, as the published implementation
    computes it: ``f = 0.5`` of 197 tokens is 98); ``0 <= f <= 1``."""

    def __init__(self, f: float):
        self.f = f

    @property
    def f(self) -> float:
        return self._f

    @f.setter
    def f(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"eventful: argument 'f' must be a float in [0, 1], got {value!r}")
        self._f = float(value)

    def k(self, n_tokens: int) -> int:
        return min(int(n_tokens), int(self._f * int(n_tokens)))

    def __repr__(self) -> str:
        return f"TopFraction(f={self._f})"


class Threshold(Policy):
    """Select tokens with ``||c - ref||_2 > h``, at most ``capacity`` per stream (default: all N).

    The gates return ``capacity`` slots per stream, the selected tokens first and ``-1`` (empty slots, which every op
    skips) after them, so the shapes of a frame never depend on the data: no host synchronisation, and a frame can
    be compiled or captured as a CUDA graph. The work done per frame is then set by the capacity. ``trim``: cut the
    slots to the largest count in the batch (one read of the counts, which is free on CPU and a synchronisation on
    a GPU); ``None`` (default) trims on CPU tensors outside ``torch.compile`` and never on a GPU.
    """

    def __init__(self, h: float, capacity: Optional[int] = None, trim: Optional[bool] = None):
        self.h = h
        self.capacity = capacity
        self.trim = trim

    @property
    def trim(self) -> Optional[bool]:
        return self._trim

    @trim.setter
    def trim(self, value: Optional[bool]) -> None:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"eventful: argument 'trim' must be None, True or False, got {value!r}")
        self._trim = value

    def trims(self, device) -> bool:
        """Whether the gates cut the slots to the largest count for tensors on ``device``."""
        if self._trim is not None:
            return self._trim
        return torch.device(device).type == "cpu" and not torch.compiler.is_compiling()

    @property
    def h(self) -> float:
        return self._h

    @h.setter
    def h(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
            raise ValueError(f"eventful: argument 'h' must be a real number, got {value!r}")
        self._h = float(value)

    @property
    def capacity(self) -> Optional[int]:
        return self._capacity

    @capacity.setter
    def capacity(self, value: Optional[int]) -> None:
        self._capacity = None if value is None else _check_int(value, "capacity")

    def capacity_for(self, n_tokens: int) -> int:
        """Effective capacity for ``n_tokens`` tokens: ``min(capacity, N)``."""
        n = int(n_tokens)
        return n if self._capacity is None else min(self._capacity, n)

    def __repr__(self) -> str:
        trim = "" if self._trim is None else f", trim={self._trim}"
        return f"Threshold(h={self._h}, capacity={self._capacity}{trim})"


Budget = Union[int, float, Policy]


def as_policy(value: Union[None, int, float, Policy]) -> Policy:
    """A budget as a policy: ``None`` -> ``TopFraction(1.0)`` (all tokens); ``int r`` -> ``TopK(r)``; ``float f`` ->
    ``TopFraction(f)`` (``0 <= f <= 1``); a :class:`Policy` is returned as is. ``ValueError`` naming the budget for
    anything else (bool, str, negative r, f outside [0, 1])."""
    if value is None:
        return TopFraction(1.0)
    if isinstance(value, Policy):
        return value
    if isinstance(value, (bool, str)) or not isinstance(value, Real):
        raise ValueError(f"eventful: a budget must be an int, a float or a Policy, got {value!r}")
    try:
        return TopK(int(value)) if isinstance(value, Integral) else TopFraction(float(value))
    except ValueError as e:
        raise ValueError(f"eventful: budget {value!r}: {e}") from None
