"""av_delta_update_: the exact delta update of ``A @ V`` and its state copies."""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.eventful


def av_delta_update_(
    out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor, *, check_index: bool = True
) -> Tensor:
    """``out += a_new[...,S] @ v_new[S] - a_ref[...,S] @ v_ref[S]``, then ``a_ref[...,S]``/``v_ref[S]`` refreshed."""
    _ops.av_delta_update_(out, a_new, a_ref, v_new, v_ref, index, check_index=check_index)
    return out


@torch.library.register_fake("eventful::av_delta_update_")
def _av_delta_update_fake(out, a_new, a_ref, v_new, v_ref, index, *, check_index=True):
    return None
