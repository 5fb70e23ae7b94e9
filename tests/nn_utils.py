"""Shared helpers for the module-layer tests: backends and random videos with temporal coherence."""
from __future__ import annotations

import torch

BACKENDS = ["ops", "reference"]


def random_video(shape, frames=10, p_change=0.3, step=0.5, dtype=torch.float32, seed=0):
    """``frames`` tensors of ``shape``: frame 0 random, then each token moves by ``step * N(0,1)`` with prob.
    ``p_change`` plus a small drift everywhere (so gate scores are distinct and selection matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out = [x.to(dtype)]
    for _ in range(frames - 1):
        moved = (torch.rand(shape[:-1] + (1,), generator=g) < p_change).float()
        x = x + step * torch.randn(shape, generator=g) * moved + 0.01 * torch.randn(shape, generator=g)
        out.append(x.to(dtype))
    return out
