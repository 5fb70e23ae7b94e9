"""Turn a user budget (``int`` tokens, ``float`` fraction, or a policy object) into a gate policy."""
from __future__ import annotations

from typing import Union

from ..nn.policies import Policy, as_policy

Budget = Union[int, float, Policy]


def make_policy(budget: Budget) -> Policy:
    """``int r`` -> ``TopK(r)``, ``float f`` -> ``TopFraction(f)`` (``0 <= f <= 1``), a :class:`Policy` passes
    through. ``ValueError`` for anything else (bool, str, negative r, f outside [0, 1])."""
    if budget is None or isinstance(budget, str):
        raise ValueError(f"budget must be an int, a float or a Policy, got {budget!r}")
    try:
        return as_policy(budget)
    except ValueError as e:
        raise ValueError(f"budget {budget!r}: {e}") from None


def parse_budget(text: str) -> Union[int, float]:
    """CLI form: ``"49"`` -> 49 tokens, ``"0.25"`` or ``"1/4"`` -> fraction 0.25, ``"N"`` -> all tokens (1.0),
    ``"N/8"`` -> 0.125."""
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
