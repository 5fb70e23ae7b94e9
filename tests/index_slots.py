"""Index makers for the empty-slot (-1) and unchecked-index (check_index=False) cases of the op tests."""
from __future__ import annotations

import torch


def out_of_range_ids(shape, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Ids outside [0, n) of the given shape, drawn from -1, -5, n, 2n + 3 and the dtype's max."""
    bad = torch.tensor([-1, -5, n, 2 * n + 3, torch.iinfo(dtype).max], dtype=dtype)
    return bad[torch.randint(0, len(bad), tuple(shape), generator=gen)]


def with_empty_slots(index: torch.Tensor, gen: torch.Generator, frac: float = 0.4, empty_rows=(), fill=-1):
    """`index` with about `frac` of its entries (random positions) and every row in `empty_rows` set to `fill`."""
    out = index.clone()
    out[torch.rand(index.shape, generator=gen) < frac] = fill
    for b in empty_rows:
        out[b] = fill
    return out


def out_of_range(index: torch.Tensor, n: int, gen: torch.Generator, frac: float = 0.4) -> torch.Tensor:
    """`index` with about `frac` of its entries replaced by ids outside [0, n) (see `out_of_range_ids`)."""
    pick = out_of_range_ids(index.shape, n, index.dtype, gen)
    return torch.where(torch.rand(index.shape, generator=gen) < frac, pick, index)
