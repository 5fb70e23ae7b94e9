"""Budgets as the CLI and the benchmarks write them.

``N`` (all tokens), ``N/4`` or ``1/4`` or ``0.25`` (a fraction), ``49`` (a token count), and threshold budgets
``t0.5`` (``Threshold(0.5)``: the tokens whose change exceeds 0.5) or ``t0.5:49`` (at most 49 of them per block).
A budget must be able to select at least one token: ``0``, ``0.0`` and ``N/0`` are rejected, as are fractions above
1, negative counts and negative thresholds.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

from ..nn.policies import Policy, Threshold, as_policy

Budget = Union[int, float, Threshold]

THRESHOLD_FORM = "t<threshold>[:<capacity>], e.g. t0.5 or t0.5:49"


def _parse_topk(text: str) -> Union[int, float]:
    """``"49"`` -> 49 tokens, ``"0.25"`` or ``"1/4"`` -> fraction 0.25, ``"N"`` -> all tokens (1.0), ``"N/8"`` ->
    0.125."""
    t = text.strip()
    try:
        if t.upper() == "N":
            return 1.0
        if t.upper().startswith("N/"):
            return 1.0 / float(t[2:])
        if "/" in t:
            num, den = t.split("/", 1)
            return float(num) / float(den)
        if any(ch in t for ch in ".eE"):
            return float(t)
        return int(t)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {text!r}: expected N, N/<d>, a fraction like 0.25 or a token count") from None


def parse_budget(text: str) -> Budget:
    """``"N/4"`` -> 0.25, ``"49"`` -> 49, ``"t0.5"`` -> ``Threshold(0.5)``, ``"t0.5:49"`` -> ``Threshold(0.5, 49)``.
    ``ValueError`` naming the budget for anything malformed or selecting no tokens."""
    t = str(text).strip()
    if not t:
        raise ValueError("empty budget (expected N, N/<d>, a fraction like 0.25, a token count or t<threshold>)")
    if t[0] in "tT":
        h_text, sep, cap_text = t[1:].partition(":")
        try:
            h = float(h_text)
            cap = int(cap_text) if sep else None
        except ValueError:
            raise ValueError(f"budget {text!r}: expected {THRESHOLD_FORM}") from None
        if not math.isfinite(h) or h < 0:
            raise ValueError(f"budget {text!r}: the threshold must be a finite number >= 0")
        if cap is not None and cap < 1:
            raise ValueError(f"budget {text!r}: the capacity must be a token count >= 1")
        return Threshold(h, cap)
    b = _parse_topk(t)
    if isinstance(b, float) and not math.isfinite(b):
        raise ValueError(f"budget {text!r}: expected N, N/<d>, a fraction like 0.25 or a token count")
    try:
        as_policy(b)
    except ValueError:
        what = "a fraction must lie in (0, 1]" if isinstance(b, float) else "a token count must be >= 1"
        raise ValueError(f"budget {text!r}: {what}") from None
    if b == 0:
        raise ValueError(f"budget {text!r} selects no tokens; the smallest budget is 1 token (or a fraction > 0)")
    return b


def parse_budget_list(text: str) -> List[Tuple[str, Budget]]:
    """``"N,N/4,t0.5"`` -> ``[("N", 1.0), ("N/4", 0.25), ("t0.5", Threshold(0.5))]``; each budget at most once."""
    out: List[Tuple[str, Budget]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if any(part == seen for seen, _ in out):
            raise ValueError(f"budget {part!r} is given twice")
        out.append((part, parse_budget(part)))
    if not out:
        raise ValueError("no budgets given (e.g. N,N/2,N/4,t0.5)")
    return out


def fresh(budget: Budget) -> Union[int, float, Policy]:
    """A budget for one model: a threshold policy is copied, so no two models share a policy object."""
    if isinstance(budget, Threshold):
        return Threshold(budget.h, budget.capacity, budget.trim)
    return budget


def budget_text(budget: Budget) -> str:
    """The CLI form of a budget (``0.25``, ``49``, ``t0.5``, ``t0.5:49``)."""
    if isinstance(budget, Threshold):
        return f"t{budget.h:g}" + ("" if budget.capacity is None else f":{budget.capacity}")
    return str(budget)


def budget_label(text: str, budget: Budget) -> str:
    """Row label: ``r=N/4`` for top-k budgets, ``h=0.5`` (``h=0.5, cap 49``) for thresholds."""
    if isinstance(budget, Threshold):
        return f"h={budget.h:g}" + ("" if budget.capacity is None else f", cap {budget.capacity}")
    return f"r={text}"


def tokens_for(budget: Budget, n_tokens: int) -> int:
    """Tokens re-processed per block: the top-k size, or a threshold's capacity (the most it may select)."""
    pol = as_policy(fresh(budget))
    if isinstance(pol, Threshold):
        return pol.capacity_for(n_tokens)
    return pol.k(n_tokens)
