"""Whether a timing run can be trusted.

A run is *noisy* when

- any efficiency (measured speedup / ideal speedup, the ideal being the ratio of the operation counts) exceeds
  ``MAX_EFFICIENCY`` (1.1): the eventful model cannot run faster than its operation count allows, so such a ratio
  means the baseline's frames were slowed by something else (load from other processes, page faults). The
  efficiency checked is the like-for-like one (:func:`like_for_like`): against the dense model with the same
  prepacked linear kernels where that baseline ran (on CPU the packed kernels alone make dense timm ~1.3x
  slower than its packed twin, so against plain timm an honest r = N run reads ~1.3); or
- the spread of the dense model's steady-state frame times exceeds ``MAX_SPREAD`` (30 %), the spread being
  ``(p90 - p10) / median`` of its ms/frame over frames 1.. (percentiles with linear interpolation between the
  closest ranks, as ``numpy.percentile``).
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

MAX_EFFICIENCY = 1.1
MAX_SPREAD = 0.30
SPREAD = "(p90 - p10) / median of the steady-state ms/frame (frames 1..; linear-interpolated percentiles)"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear interpolation between the closest ranks."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """``(p90 - p10) / median`` of ``values`` (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    if med <= 0:
        return 0.0
    return (percentile(values, 90) - percentile(values, 10)) / med


def noise_check(dense_ms: Mapping[str, Sequence[float]], efficiencies: Mapping[str, Optional[float]],
                max_efficiency: float = MAX_EFFICIENCY, max_spread: float = MAX_SPREAD) -> Dict:
    """Flag a run as noisy.

    ``dense_ms``: steady-state ms/frame of each dense baseline (label -> values); ``efficiencies``: each eventful
    run's efficiency (label -> value; None is skipped). Returns ``{"noisy", "reasons", "dense_spread",
    "max_efficiency", "max_spread", "spread"}``; ``reasons`` is one line per tripped check.
    """
    reasons: List[str] = []
    spreads = {label: spread(ms) for label, ms in dense_ms.items()}
    for label, s in spreads.items():
        if s > max_spread:
            reasons.append(f"{label} frame times spread {s:.0%} > {max_spread:.0%} ((p90 - p10) / median)")
    for label, eff in efficiencies.items():
        if eff is not None and eff > max_efficiency:
            reasons.append(f"{label} efficiency {eff:.2f} > {max_efficiency:g} (faster than its operation count "
                           "allows: the baseline was slowed by something else)")
    return {
        "noisy": bool(reasons),
        "reasons": reasons,
        "dense_spread": spreads,
        "max_efficiency": max_efficiency,
        "max_spread": max_spread,
        "spread": SPREAD,
    }


def rates(run: Mapping[str, float], dense: Mapping[str, float], dense_packed: Optional[Mapping[str, float]] = None
          ) -> Dict[str, float]:
    """Speedup, ideal speedup and efficiency of one eventful run (its ``Run.summary()``) against the dense
    baseline's summary, and against the packed dense baseline's when given."""
    out = {
        "speedup": dense["ms_median"] / run["ms_median"],
        "ideal_speedup": dense["gflops_mean"] / run["gflops_mean"],
    }
    out["efficiency"] = out["speedup"] / out["ideal_speedup"]
    if dense_packed is not None:
        out["speedup_vs_dense_packed"] = dense_packed["ms_median"] / run["ms_median"]
        out["efficiency_vs_dense_packed"] = (
            out["speedup_vs_dense_packed"] / (dense_packed["gflops_mean"] / run["gflops_mean"])
        )
    return out


def like_for_like(entry: Mapping[str, float]) -> float:
    """The efficiency the noise check uses: against the packed dense model where it ran (the same linear kernels
    as the eventful blocks, so the operation counts compare like for like), else against dense timm."""
    return entry.get("efficiency_vs_dense_packed", entry["efficiency"])
