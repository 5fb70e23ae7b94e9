"""Turn a user budget (``int`` tokens, ``float`` fraction, or a policy object) into a gate policy."""
from __future__ import annotations

from typing import Union

from ..nn import policies

Budget = Union[int, float, "policies.TopK", "policies.TopFraction", "policies.Threshold"]
POLICY_TYPES = (policies.TopK, policies.TopFraction, policies.Threshold)


def make_policy(budget: Budget):
    """``int r`` -> ``TopK(r)`` (r >= 1); ``float f`` -> ``TopFraction(f)`` (0 < f <= 1); a policy passes through."""
    if isinstance(budget, POLICY_TYPES):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int, a float or a policy object, got {type(budget).__name__}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget: a token count must be >= 1, got {budget}")
        return policies.TopK(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget: a fraction must be in (0, 1], got {budget}")
    return policies.TopFraction(budget)


def parse_budget(text: str) -> Budget:
    """CLI form: ``"49"`` -> 49 tokens, ``"0.25"`` or ``"1/4"`` -> fraction 0.25, ``"N"`` -> all tokens (1.0)."""
    t = text.strip()
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
