"""Pure-PyTorch ground truth of every op in the ``torch.ops.eventful`` contract.

Shapes (see DESIGN.md): tokens are rows. ``x`` is ``[B, N, D]`` or ``[B, H, N, D]``; ``index`` is ``[B, K]``
(int32 or int64, distinct ids in ``[0, N)``) and is shared over the optional head dim ``H``. Column ops act on
the last dim of ``[B, M, N]`` or ``[B, H, M, N]``.

Selection rule shared by every gate: the score of token ``n`` is ``||c[b, n] - ref[b, n]||_2`` (computed in
float32); the ``k`` largest scores are selected, ties broken towards the lower token id, and the returned index is
sorted ascending (token order). Gates update ``ref`` only at the selected tokens.

These functions are deliberately simple; they define semantics and perform no argument checking beyond what
PyTorch itself does. Mutating functions (trailing ``_``) write their outputs in place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _heads(x: Tensor, token_dim: int) -> Tuple[Tensor, bool]:
    """View a rank-3 tensor as rank-4 with a singleton head dim, so one code path serves both ranks."""
    if x.dim() == 3:
        return x.unsqueeze(1), True
    return x, False


def _row_index(index: Tensor, x4: Tensor) -> Tensor:
    """[B, K] -> [B, H, K, D] int64 index expanded along heads and features (the standard composition)."""
    b, h, _, d = x4.shape
    return index.long()[:, None, :, None].expand(b, h, index.shape[1], d)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``y[b, (h,) k] = x[b, (h,) index[b, k]]``. ``x [B,(H,)N,D]`` -> ``y [B,(H,)K,D]`` (contiguous)."""
    x4, squeeze = _heads(x, 2)
    y = torch.gather(x4, 2, _row_index(index, x4))
    return (y.squeeze(1) if squeeze else y).contiguous()


def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``dst[b, (h,) index[b, k]] = src[b, (h,) k]`` in place; returns ``dst``."""
    d4, _ = _heads(dst, 2)
    s4, _ = _heads(src, 2)
    d4.scatter_(2, _row_index(index, s4), s4.to(dst.dtype))
    return dst


def _col_index(index: Tensor, x4: Tensor) -> Tensor:
    b, h, m, _ = x4.shape
    return index.long()[:, None, None, :].expand(b, h, m, index.shape[1])


def gather_cols(x: Tensor, index: Tensor) -> Tensor:
    """``y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]``. ``x [B,(H,)M,N]`` -> ``y [B,(H,)M,K]``."""
    x4, squeeze = _heads(x, 3)
    y = torch.gather(x4, 3, _col_index(index, x4))
    return (y.squeeze(1) if squeeze else y).contiguous()


def scatter_cols_(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k]`` in place; returns ``dst``."""
    d4, _ = _heads(dst, 3)
    s4, _ = _heads(src, 3)
    d4.scatter_(3, _col_index(index, s4), s4.to(dst.dtype))
    return dst


def gate_scores(c: Tensor, ref: Tensor) -> Tensor:
    """``||c - ref||_2`` over the feature dim, in float32. ``[B, N, D]`` -> ``[B, N]``."""
    return (c.float() - ref.float()).pow(2).sum(-1).sqrt()


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores per row (ties -> lower id), sorted ascending. ``[B, N]`` -> ``[B, K]``."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def token_gate(c: Tensor, ref: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k token gate. ``c, ref [B, N, D]``; returns ``(index [B, k] int64, c_sel [B, k, D])``.

    ``ref[index] = c_sel`` in place.
    """
    index = select_topk(gate_scores(c, ref), k)
    c_sel = gather_rows(c, index)
    scatter_rows_(ref, index, c_sel)
    return index, c_sel


def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Threshold gate with a fixed capacity. Returns ``(index [B, capacity], count [B], c_sel [B, capacity, D])``.

    Row ``b`` selects the tokens whose score is ``> threshold``; if more than ``capacity`` qualify, the
    ``capacity`` largest are kept (ties -> lower id). The first ``count[b]`` entries of ``index[b]`` are the
    selection in ascending order; the rest are ``-1`` and the matching rows of ``c_sel`` are zero.
    ``ref`` is updated at the selected tokens only.
    """
    scores = gate_scores(c, ref)
    b, n = scores.shape
    cap = min(capacity, n)
    masked = torch.where(scores > threshold, scores, torch.full_like(scores, -1.0))
    order = torch.sort(masked, dim=-1, descending=True, stable=True)
    count = (order.values[:, :cap] >= 0).sum(-1)
    index = torch.full((b, capacity), -1, dtype=torch.long, device=c.device)
    c_sel = torch.zeros(b, capacity, c.shape[-1], dtype=c.dtype, device=c.device)
    for i in range(b):
        sel = torch.sort(order.indices[i, : int(count[i])]).values
        index[i, : sel.numel()] = sel
        c_sel[i, : sel.numel()] = c[i, sel]
        ref[i, sel] = c[i, sel]
    return index, count, c_sel


def token_delta_gate(
    c: Tensor, ref: Tensor, k: int, index: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: as :func:`token_gate`, also returning ``e_sel = c_sel - ref_old[index]``.

    If ``index [B, K]`` is given it forces the selection (``k`` is ignored). Returns
    ``(index int64 [B, K], c_sel [B, K, D], e_sel [B, K, D])``; ``ref[index] = c_sel`` in place.
    """
    if index is None:
        index = select_topk(gate_scores(c, ref), k)
    index = index.long()
    c_sel = gather_rows(c, index)
    e_sel = (c_sel.float() - gather_rows(ref, index).float()).to(c.dtype)
    scatter_rows_(ref, index, c_sel)
    return index, c_sel, e_sel


def relpos_bias(rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """Dense decomposed rel-pos bias ``[..., Nq, Gh*Gw]``: ``bias[..., i, j] = rel_h[..., i, j // Gw] + rel_w[..., i,
    j % Gw]`` (float32) from ``rel_h [..., Nq, Gh]`` and ``rel_w [..., Nq, Gw]``."""
    return (rel_h.float()[..., :, None] + rel_w.float()[..., None, :]).flatten(-2)


def qk_update_(
    logits: Tensor,
    q: Tensor,
    k: Tensor,
    index_q: Tensor,
    index_k: Tensor,
    scale: float,
    rel_h: Optional[Tensor] = None,
    rel_w: Optional[Tensor] = None,
) -> Tensor:
    """Patch attention logits in place. ``logits [B,H,Nq,Nk]``, ``q [B,H,Nq,d]``, ``k [B,H,Nk,d]``.

    ``logits[:, :, iq, :] = q[iq] @ k^T * scale`` and ``logits[:, :, :, ik] = q @ k[ik]^T * scale``
    (products accumulated in float32, cast to ``logits.dtype``). With the decomposed rel-pos state ``rel_h
    [B,H,Nq,Gh]`` and ``rel_w [B,H,Nq,Gw]`` (``Gh*Gw = Nk``, dtype of q; both or neither) every recomputed entry also
    gets ``rel_h[..., i, j // Gw] + rel_w[..., i, j % Gw]``, added in float32 before the cast. Returns ``logits``.
    """
    if (rel_h is None) != (rel_w is None):
        raise ValueError("eventful: arguments 'rel_h' and 'rel_w' must be given together")
    qf, kf = q.float(), k.float()
    rows = gather_rows(qf, index_q) @ kf.transpose(-1, -2) * scale
    cols = qf @ gather_rows(kf, index_k).transpose(-1, -2) * scale
    if rel_h is not None:
        bias = relpos_bias(rel_h, rel_w)
        rows = rows + gather_rows(bias, index_q)
        cols = cols + gather_cols(bias, index_k)
    scatter_rows_(logits, index_q, rows.to(logits.dtype))
    scatter_cols_(logits, index_k, cols.to(logits.dtype))
    return logits


def av_delta_update_(
    out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor
) -> Tensor:
    """Exact delta update of ``A @ V``. ``out, v_* [B,H,N,d]``; ``a_* [B,H,M,N]``; ``index [B,K]`` (columns of A).

    ``out += a_new[..., S] @ v_new[S] - a_ref[..., S] @ v_ref[S]`` (float32 accumulation), then
    ``a_ref[..., S] = a_new[..., S]`` and ``v_ref[S] = v_new[S]``. Keeps the invariant ``out == a_ref @ v_ref``.
    Returns ``out``.
    """
    an = gather_cols(a_new, index).float()
    ar = gather_cols(a_ref, index).float()
    vn = gather_rows(v_new, index).float()
    vr = gather_rows(v_ref, index).float()
    delta = an @ vn - ar @ vr
    out.copy_((out.float() + delta).to(out.dtype))
    scatter_cols_(a_ref, index, an.to(a_ref.dtype))
    scatter_rows_(v_ref, index, vn.to(v_ref.dtype))
    return out
