"""Pure-PyTorch ground truth of every op in the ``torch.ops.eventful`` contract.

Shapes (see DESIGN.md): tokens are rows. ``x`` is ``[B, N, D]`` or ``[B, H, N, D]``; ``index`` is ``[B, K]``
(int32 or int64, distinct ids in ``[0, N)``) and is shared over the optional head dim ``H``. Column ops act on
the last dim of ``[B, M, N]`` or ``[B, H, M, N]``.

Empty slots: an index entry ``-1`` (what ``token_gate_threshold`` pads with) is an empty slot, and every op skips
it: a gather yields a zero row (column), a scatter writes nothing for it, ``token_delta_gate`` returns zero rows
and leaves ``ref`` alone there, ``qk_update_`` recomputes nothing for it and ``av_delta_update_`` adds nothing.
``-1`` may repeat within a row. Ids outside ``[0, N)`` are errors for the checked ops; with ``check_index=False``
(indices the caller vouches for) the kernels treat them as empty slots too, so nothing outside the tensors is ever
touched. This reference treats every id outside ``[0, N)`` as an empty slot and checks nothing.

Selection rule shared by every gate: the score of token ``n`` is ``||c[b, n] - ref[b, n]||_2`` (computed in
float32); the ``k`` largest scores are selected, ties broken towards the lower token id, and the returned index is
sorted ascending (token order). Gates update ``ref`` only at the selected tokens.

These functions are deliberately simple and never synchronise with the device (no data-dependent shapes); they
define semantics and perform no argument checking beyond what PyTorch itself does (``check_index`` is accepted for
signature parity with :mod:`eventful_kernels.ops` and ignored). Mutating functions (trailing ``_``) write their
outputs in place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

PAD = -1  # the empty-slot id


def _heads(x: Tensor) -> Tuple[Tensor, bool]:
    """View a rank-3 tensor as rank-4 with a singleton head dim, so one code path serves both ranks."""
    if x.dim() == 3:
        return x.unsqueeze(1), True
    return x, False


def _expand(index: Tensor, x4: Tensor, dim: int) -> Tensor:
    """``[B, K]`` -> int64 index shaped like ``x4 [B, H, M, D]`` with K at ``dim`` (2: rows, 3: columns)."""
    b, h, m, d = x4.shape
    k = index.shape[1]
    if dim == 2:
        return index.long()[:, None, :, None].expand(b, h, k, d)
    return index.long()[:, None, None, :].expand(b, h, m, k)


def _slots(index: Tensor, dim: int) -> Tensor:
    """``[B, K]`` -> the same broadcastable against a ``[B, H, M, D]`` operand with K at ``dim``."""
    return index[:, None, :, None] if dim == 2 else index[:, None, None, :]


def _valid(index: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """``(valid [B, K] bool, safe [B, K] int64)``: slots holding an id in ``[0, n)``, and the ids with every other
    slot pointed at 0 (safe to index with)."""
    idx = index.long()
    valid = (idx >= 0) & (idx < n)
    return valid, torch.where(valid, idx, 0)


def _gather(x: Tensor, index: Tensor, dim: int) -> Tensor:
    x4, squeeze = _heads(x)
    n = x4.shape[dim]
    valid, safe = _valid(index, n)
    if n == 0:  # only empty slots can exist
        shape = list(x4.shape)
        shape[dim] = index.shape[1]
        y = x4.new_zeros(shape)
    else:
        y = torch.gather(x4, dim, _expand(safe, x4, dim)).masked_fill_(~_slots(valid, dim), 0)
    return (y.squeeze(1) if squeeze else y).contiguous()


def _scatter_(dst: Tensor, index: Tensor, src: Tensor, dim: int) -> Tensor:
    d4, _ = _heads(dst)
    s4, _ = _heads(src)
    n = d4.shape[dim]
    if n == 0 or index.shape[1] == 0:
        return dst
    valid, safe = _valid(index, n)
    # scatter_ cannot skip a slot, so an empty slot is aimed at the token the first valid slot of its row writes,
    # with that slot's value (a duplicate write of one value); in a row without a valid slot, at token 0 with
    # token 0's current value. Either way it changes nothing, deterministically, with no data-dependent shape.
    first = valid.int().argmax(1, keepdim=True)  # [B, 1]
    target = torch.where(valid, safe, torch.gather(safe, 1, first))
    src_first = torch.gather(s4, dim, _expand(first, s4, dim))
    dst_zero = torch.gather(d4, dim, _expand(torch.zeros_like(first), d4, dim))
    fill = torch.where(_slots(valid.any(1, keepdim=True), dim), src_first.to(dst.dtype), dst_zero)
    values = torch.where(_slots(valid, dim), s4.to(dst.dtype), fill)
    d4.scatter_(dim, _expand(target, s4, dim), values)
    return dst


def gather_rows(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) k] = x[b, (h,) index[b, k]]`` (zero rows at empty slots). ``x [B,(H,)N,D]`` -> ``[B,(H,)K,D]``."""
    return _gather(x, index, 2)


def scatter_rows_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) index[b, k]] = src[b, (h,) k]`` in place (empty slots write nothing); returns ``dst``."""
    return _scatter_(dst, index, src, 2)


def scatter_rows_residual_(dst: Tensor, index: Tensor, src: Tensor, residual: Tensor, scale: Optional[Tensor] = None,
                           *, check_index: bool = True) -> Tensor:
    """``dst[b, index[b, k]] = src[b, k]`` in place, then ``y = residual + dst`` (``residual + dst * scale`` with a
    ``scale [D]``, as ``torch.addcmul``): a buffer patched and added to the residual stream. ``dst``/``residual``
    ``[B, N, D]``, ``src [B, K, D]``; returns ``y [B, N, D]`` (a new tensor). The kernels round ``dst * scale +
    residual`` once (a fused multiply-add), as torch.addcmul's CUDA and vectorized CPU kernels do; float16/bfloat16
    products are exact in float32, so only float32 could see a CPU whose torch.addcmul rounds twice."""
    _scatter_(dst, index, src, 2)
    return residual + dst if scale is None else torch.addcmul(residual, dst, scale)


def gather_cols(x: Tensor, index: Tensor, *, check_index: bool = True) -> Tensor:
    """``y[b, (h,) m, k] = x[b, (h,) m, index[b, k]]`` (zero columns at empty slots): ``[B,(H,)M,N]`` ->
    ``[B,(H,)M,K]``."""
    return _gather(x, index, 3)


def scatter_cols_(dst: Tensor, index: Tensor, src: Tensor, *, check_index: bool = True) -> Tensor:
    """``dst[b, (h,) m, index[b, k]] = src[b, (h,) m, k]`` in place (empty slots write nothing); returns ``dst``."""
    return _scatter_(dst, index, src, 3)


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


def select_threshold(scores: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor]:
    """``(index [B, capacity] int64, count [B] int64)``: per row the ids with ``score > threshold`` (never a NaN
    score), the ``capacity`` largest if more qualify (ties -> lower id), ascending, then ``-1`` (empty slots)."""
    b, n = scores.shape
    cap = min(capacity, n)
    masked = torch.where(scores > threshold, scores, torch.full_like(scores, -1.0))
    order = torch.sort(masked, dim=-1, descending=True, stable=True)
    hit = order.values[:, :cap] >= 0
    ids = torch.sort(torch.where(hit, order.indices[:, :cap], n), dim=-1).values  # misses sort last
    index = torch.full((b, capacity), PAD, dtype=torch.long, device=scores.device)
    index[:, :cap] = torch.where(ids < n, ids, PAD)
    return index, hit.sum(-1)


def token_gate_threshold(c: Tensor, ref: Tensor, threshold: float, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Threshold gate with a fixed capacity. Returns ``(index [B, capacity], count [B], c_sel [B, capacity, D])``.

    Row ``b`` selects the tokens whose score is ``> threshold`` (never a NaN score); if more than ``capacity``
    qualify, the ``capacity`` largest are kept (ties -> lower id). The first ``count[b]`` entries of ``index[b]``
    are the selection in ascending order; the rest are ``-1`` (empty slots) and the matching rows of ``c_sel`` are
    zero. ``ref`` is updated at the selected tokens only.

    The kernels require a finite ``threshold`` and ``0 <= capacity <= N`` (a larger capacity could only add empty
    slots; callers pass ``min(capacity, N)``) and reject anything else; this reference does not check either.
    """
    index, count = select_threshold(gate_scores(c, ref), threshold, capacity)
    c_sel = gather_rows(c, index)
    scatter_rows_(ref, index, c_sel)
    return index, count, c_sel


def token_delta_gate(
    c: Tensor, ref: Tensor, k: int, index: Optional[Tensor] = None, *, check_index: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """Delta gate: as :func:`token_gate`, also returning ``e_sel = c_sel - ref_old[index]``.

    If ``index [B, K]`` is given it forces the selection (``k`` is ignored; empty slots give zero rows). Returns
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
    *,
    check_index: bool = True,
) -> Tensor:
    """Patch attention logits in place. ``logits [B,H,Nq,Nk]``, ``q [B,H,Nq,d]``, ``k [B,H,Nk,d]``; empty slots of
    ``index_q`` / ``index_k`` recompute nothing.

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
    out: Tensor, a_new: Tensor, a_ref: Tensor, v_new: Tensor, v_ref: Tensor, index: Tensor, *, check_index: bool = True
) -> Tensor:
    """Exact delta update of ``A @ V``. ``out, v_* [B,H,N,d]``; ``a_* [B,H,M,N]``; ``index [B,K]`` (columns of A;
    empty slots contribute nothing and refresh nothing).

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


LINEAR_BF16_PANEL = 16  # output features per panel of a linear_bf16_pack weight


def linear_bf16_pack(weight: Tensor) -> Tensor:
    """``weight [out, in]`` bf16 -> ``[ceil(out/16), in, 16]`` bf16 panels: ``packed[p, k, j] = weight[16p + j, k]``,
    zero where ``16p + j >= out``."""
    n, k = weight.shape
    p = -(-n // LINEAR_BF16_PANEL)
    padded = weight.new_zeros((p * LINEAR_BF16_PANEL, k))
    padded[:n] = weight
    return padded.view(p, LINEAR_BF16_PANEL, k).transpose(1, 2).contiguous()


def linear_bf16_unpack(packed: Tensor, out_features: int) -> Tensor:
    """The ``[out, in]`` weight a :func:`linear_bf16_pack` result holds."""
    p, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(p * LINEAR_BF16_PANEL, k)[:out_features]


def linear_bf16(x: Tensor, packed: Tensor, bias: Optional[Tensor], out_features: int,
                activation: str = "none") -> Tensor:
    """``act(x @ W.T + bias)`` for ``x [..., in]`` bf16 and ``W`` the weight ``packed`` holds: the products and the
    bias add in float32, the activation (``none``, ``relu``, ``gelu`` (erf), ``gelu_tanh``) in float32, one
    rounding to bf16 at the end. Returns ``[..., out]`` bf16."""
    w = linear_bf16_unpack(packed, out_features).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    if activation == "relu":
        y = torch.relu(y)
    elif activation in ("gelu", "gelu_tanh"):
        y = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y.to(torch.bfloat16)
