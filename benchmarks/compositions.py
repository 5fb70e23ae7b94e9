"""The standard-PyTorch compositions each fused op is measured against.

These mirror how the published Eventful Transformers code does the same work: index tensors expanded to the full
feature width for gather/scatter_, ``topk`` over norms of an explicit ``c - ref`` temporary, dense products of the
gathered pieces. They are the baseline of every speedup ratio in benchmarks/; the semantics are the op's.
"""
import torch


def _rows(index, b, h, d):
    return index[:, None, :, None].expand(b, h, index.shape[1], d)


def gather_rows(x, index):
    b, n, d = x.shape
    return x.gather(1, index[..., None].expand(b, index.shape[1], d))


def scatter_rows_(dst, index, src):
    b, n, d = dst.shape
    dst.scatter_(1, index[..., None].expand(b, index.shape[1], d), src)


def scatter_rows_residual_(dst, index, src, residual):
    scatter_rows_(dst, index, src)
    return residual + dst


def gather_cols(x, index):
    b, h, m, n = x.shape
    return x.gather(3, index[:, None, None, :].expand(b, h, m, index.shape[1]))


def scatter_cols_(dst, index, src):
    b, h, m, n = dst.shape
    dst.scatter_(3, index[:, None, None, :].expand(b, h, m, index.shape[1]), src)


def token_gate(c, ref, k):
    e = c - ref
    index = e.norm(dim=-1).topk(k, dim=-1).indices
    expanded = index[..., None].expand(-1, -1, c.shape[-1])
    c_sel = c.gather(1, expanded)
    ref.scatter_(1, expanded, c_sel)
    return index, c_sel


def token_gate_threshold(c, ref, threshold, capacity):
    e = c - ref
    norms = e.norm(dim=-1)
    masked = torch.where(norms > threshold, norms, torch.full_like(norms, -1.0))
    values, index = masked.topk(capacity, dim=-1)
    valid = values >= 0
    count = valid.sum(-1)
    index = torch.where(valid, index, torch.full_like(index, -1))
    safe = index.clamp_min(0)[..., None].expand(-1, -1, c.shape[-1])
    c_sel = c.gather(1, safe) * valid[..., None]
    ref.scatter_(1, safe, torch.where(valid[..., None], c_sel, ref.gather(1, safe)))
    return index, count, c_sel


def token_delta_gate(c, ref, k):
    e = c - ref
    index = e.norm(dim=-1).topk(k, dim=-1).indices
    expanded = index[..., None].expand(-1, -1, c.shape[-1])
    c_sel = c.gather(1, expanded)
    e_sel = e.gather(1, expanded)
    ref.scatter_(1, expanded, c_sel)
    return index, c_sel, e_sel


def qk_update_(logits, q, k, index_q, index_k, scale):
    b, h, n, d = q.shape
    q_sel = q.gather(2, _rows(index_q, b, h, d))
    rows = q_sel @ k.transpose(-1, -2) * scale
    logits.scatter_(2, _rows(index_q, b, h, logits.shape[-1]), rows)
    k_sel = k.gather(2, _rows(index_k, b, h, d))
    cols = q @ k_sel.transpose(-1, -2) * scale
    logits.scatter_(3, index_k[:, None, None, :].expand(b, h, logits.shape[2], index_k.shape[1]), cols)


def qk_update_relpos_(logits, q, k, index_q, index_k, scale, rel_h, rel_w):
    """qk_update_ plus the decomposed rel-pos bias of the recomputed entries, gathered with expanded indices."""
    b, h, n, d = q.shape
    gh, gw = rel_h.shape[-1], rel_w.shape[-1]
    q_sel = q.gather(2, _rows(index_q, b, h, d))
    rh_sel, rw_sel = rel_h.gather(2, _rows(index_q, b, h, gh)), rel_w.gather(2, _rows(index_q, b, h, gw))
    rows = q_sel @ k.transpose(-1, -2) * scale + (rh_sel[..., :, None] + rw_sel[..., None, :]).flatten(-2)
    logits.scatter_(2, _rows(index_q, b, h, logits.shape[-1]), rows)
    k_sel = k.gather(2, _rows(index_k, b, h, d))
    kk = index_k.shape[1]
    expand = lambda i: i[:, None, None, :].expand(b, h, n, kk)  # noqa: E731
    cols = q @ k_sel.transpose(-1, -2) * scale
    cols = cols + rel_h.gather(3, expand(index_k // gw)) + rel_w.gather(3, expand(index_k % gw))
    logits.scatter_(3, expand(index_k), cols)


def av_delta_update_(out, a_new, a_ref, v_new, v_ref, index):
    b, h, m, n = a_new.shape
    d = v_new.shape[-1]
    cols = index[:, None, None, :].expand(b, h, m, index.shape[1])
    rows = _rows(index, b, h, d)
    an, ar = a_new.gather(3, cols), a_ref.gather(3, cols)
    vn, vr = v_new.gather(2, rows), v_ref.gather(2, rows)
    out += an @ vn - ar @ vr
    a_ref.scatter_(3, cols, an)
    v_ref.scatter_(2, rows, vn)
