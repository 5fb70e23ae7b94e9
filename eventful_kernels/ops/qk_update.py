"""qk_update_: recompute selected rows and columns of attention logits in place."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.eventful


def qk_update_(
    logits: Tensor,
    q: Tensor,
    k: Tensor,
    index_q: Tensor,
    index_k: Tensor,
    scale: float,
    rel_h: Optional[Tensor] = None,
    rel_w: Optional[Tensor] = None,
    *,
    check_index: bool = True,
) -> Tensor:
    """Recompute rows ``index_q`` and columns ``index_k`` of ``logits [B,H,Nq,Nk] = q @ k^T * scale (+ bias)`` in
    place. ``rel_h [B,H,Nq,Gh]`` / ``rel_w [B,H,Nq,Gw]`` (``Gh*Gw = Nk``): the decomposed rel-pos bias
    ``rel_h[.., i, j // Gw] + rel_w[.., i, j % Gw]`` added to every recomputed entry (both or neither)."""
    _ops.qk_update_(logits, q, k, index_q, index_k, scale, rel_h, rel_w, check_index=check_index)
    return logits


@torch.library.register_fake("eventful::qk_update_")
def _qk_update_fake(logits, q, k, index_q, index_k, scale, rel_h=None, rel_w=None, *, check_index=True):
    return None
