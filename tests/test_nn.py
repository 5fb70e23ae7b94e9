"""Module layer: policies, gates, buffers, matmul buffers, rel-pos state, windows, counting.

Semantics are checked against eventful_kernels.reference (the oracle) and, where possible, against dense
recomputation. Every stateful module is run with both backends ("ops" = torch.ops.eventful kernels).
Tolerances: fp32 products of length <= 64 agree to ~1e-6 relative; we use 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from eventful_kernels import reference
from eventful_kernels.counting import count_macs, dense_block_macs, linear_macs_per_token
from eventful_kernels.nn import (
    DecomposedRelPos,
    EventfulBlock,
    MatmulBuffer,
    MatmulDeltaAccumulator,
    Threshold,
    TokenBuffer,
    TokenDeltaGate,
    TokenGate,
    TopFraction,
    TopK,
    WindowGrid,
    as_policy,
    set_backend,
    set_policy,
)
from eventful_kernels.nn.relpos import rel_pos_table

from nn_utils import BACKENDS, random_video
from vit_mirror import Block, SamAttention, get_rel_pos, window_partition

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- policies
def test_topk_policy():
    p = TopK(5)
    assert p.k(10) == 5 and p.k(3) == 3 and p.k(0) == 0
    p.r = 0
    assert p.k(10) == 0
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="'r'"):
            TopK(bad)


def test_topfraction_policy():
    assert TopFraction(0.5).k(10) == 5
    assert TopFraction(0.25).k(10) == 2  # int(2.5): the floor, as published
    assert TopFraction(0.5).k(197) == 98 and TopFraction(0.25).k(197) == 49
    assert TopFraction(0.01).k(10) == 0  # no minimum
    assert TopFraction(0.0).k(10) == 0
    assert TopFraction(1.0).k(7) == 7
    for f in (0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1 / 3):
        for n in (1, 7, 10, 17, 197, 4096):
            assert TopFraction(f).k(n) == int(f * n)  # the published expression, float artefacts included
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="'f'"):
            TopFraction(bad)


def test_threshold_policy_and_as_policy():
    p = Threshold(0.5)
    assert p.capacity_for(10) == 10
    p.capacity = 4
    assert p.capacity_for(10) == 4 and p.capacity_for(3) == 3
    with pytest.raises(TypeError):
        p.k(10)
    with pytest.raises(ValueError, match="'capacity'"):
        Threshold(0.5, capacity=-1)
    assert isinstance(as_policy(3), TopK) and as_policy(3).r == 3
    assert isinstance(as_policy(0.5), TopFraction)
    assert as_policy(None).k(9) == 9
    assert as_policy(p) is p
    with pytest.raises(ValueError):
        as_policy(True)


# ---------------------------------------------------------------- gates
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_gate_matches_reference(backend, dtype):
    frames = random_video((3, 20, 16), frames=5, dtype=dtype)
    gate = TokenGate(TopK(6), backend=backend)
    idx, sel = gate(frames[0])
    assert idx.shape == (3, 20) and torch.equal(idx[1], torch.arange(20))
    assert sel is frames[0] and torch.equal(gate.ref, frames[0]) and gate.ref.data_ptr() != frames[0].data_ptr()
    ref = frames[0].clone()
    for c in frames[1:]:
        e_idx, e_sel = reference.token_gate(c, ref, 6)
        idx, sel = gate(c)
        assert idx.dtype == torch.int64 and torch.equal(idx, e_idx)
        assert torch.equal(sel, e_sel) and torch.equal(gate.ref, ref)
        assert gate.last_macs == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_strided_input_and_budget_change(backend):
    frames = random_video((2, 12, 8), frames=4)
    gate = TokenGate(TopK(4), backend=backend)
    ref = None
    for t, c in enumerate(frames):
        strided = torch.stack([c, c], dim=-1)[..., 0]  # same values as c, non-contiguous
        assert not strided.is_contiguous()
        if t == 2:
            gate.policy.r = 9
        idx, sel = gate(strided)
        if ref is None:
            ref = c.clone()
            continue
        e_idx, e_sel = reference.token_gate(c, ref, gate.policy.r)
        assert idx.shape == (2, gate.policy.r) and torch.equal(idx, e_idx) and torch.equal(sel, e_sel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_k_zero_and_k_n(backend):
    frames = random_video((2, 10, 8), frames=3)
    gate = TokenGate(TopK(0), backend=backend)
    gate(frames[0])
    idx, sel = gate(frames[1])
    assert idx.shape == (2, 0) and sel.shape == (2, 0, 8)
    assert torch.equal(gate.ref, frames[0])  # nothing selected, reference untouched
    gate.policy.r = 10
    idx, sel = gate(frames[2])
    assert torch.equal(idx, torch.arange(10).expand(2, 10)) and torch.equal(sel, frames[2])
    assert torch.equal(gate.ref, frames[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_streams_independent(backend):
    a = random_video((1, 16, 8), frames=4, seed=1)
    b1 = random_video((1, 16, 8), frames=4, seed=2)
    b2 = random_video((1, 16, 8), frames=4, seed=3)
    g1, g2 = TokenGate(TopK(5), backend=backend), TokenGate(TopK(5), backend=backend)
    for x, y, z in zip(a, b1, b2):
        i1, s1 = g1(torch.cat([x, y]))
        i2, s2 = g2(torch.cat([x, z]))
        assert torch.equal(i1[0], i2[0]) and torch.equal(s1[0], s2[0])
    assert not torch.equal(i1[1], i2[1])  # the other stream did differ


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_reset(backend):
    frames = random_video((2, 10, 8), frames=3)
    gate = TokenGate(TopK(3), backend=backend)
    gate(frames[0])
    gate(frames[1])
    assert not gate.flushing
    gate.reset()
    assert gate.flushing and gate.ref is None
    idx, sel = gate(frames[2])
    assert idx.shape == (2, 10) and torch.equal(gate.ref, frames[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_threshold_single_stream(backend):
    frames = random_video((1, 30, 8), frames=4)
    gate = TokenGate(Threshold(1.0), backend=backend)
    gate(frames[0])
    ref = frames[0].clone()
    for c in frames[1:]:
        scores = reference.gate_scores(c, ref)[0]
        expect = torch.nonzero(scores > 1.0).flatten()
        idx, sel = gate(c)
        assert 0 < expect.numel() < 30  # the data exercises a real subset
        assert torch.equal(idx[0], expect) and torch.equal(sel[0], c[0, expect])
        ref[0, expect] = c[0, expect]
        assert torch.equal(gate.ref, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_threshold_capacity(backend):
    frames = random_video((1, 30, 8), frames=2, p_change=1.0)
    gate = TokenGate(Threshold(0.0, capacity=5), backend=backend)
    gate(frames[0])
    scores = reference.gate_scores(frames[1], frames[0])
    idx, _ = gate(frames[1])
    assert torch.equal(idx, reference.select_topk(scores, 5))


def _threshold_slots(scores, h, width):
    """Expected threshold selection: each row's above-h ids ascending, then -1, ``width`` slots."""
    rows = []
    for row in scores:
        ids = torch.nonzero(row > h).flatten().tolist()
        rows.append(ids + [-1] * (width - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trim", [None, False])
def test_token_gate_threshold_batched_rule(backend, trim):
    """Every stream selects exactly its own above-threshold tokens; the others' extra slots are -1 (empty) with
    zero rows. On CPU the default trims the slots to the largest count; ``trim=False`` keeps all N (capacity)."""
    frames = random_video((3, 30, 8), frames=3)
    h = 1.0
    gate = TokenGate(Threshold(h, trim=trim), backend=backend)
    gate(frames[0])
    ref = frames[0].clone()
    for c in frames[1:]:
        scores = reference.gate_scores(c, ref)
        counts = (scores > h).sum(-1)
        assert len(set(counts.tolist())) > 1  # rows differ, so the padding matters
        width = int(counts.max()) if trim is None else 30
        idx, sel = gate(c)
        expect = _threshold_slots(scores, h, width)
        assert torch.equal(idx, expect)
        for b in range(3):
            n = int(counts[b])
            assert torch.equal(sel[b, :n], c[b, expect[b, :n]]) and not sel[b, n:].any()
        reference.scatter_rows_(ref, idx, sel)
        assert torch.equal(gate.ref, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_bad_input_leaves_state(backend):
    frames = random_video((2, 10, 8), frames=2)
    gate = TokenGate(TopK(3), backend=backend)
    with pytest.raises(ValueError, match="'c'"):
        gate(frames[0][0])
    with pytest.raises(ValueError, match="'c'"):
        gate(frames[0].long())
    gate(frames[0])
    before = gate.ref.clone()
    for bad in (frames[1][:, :9], frames[1][:1], frames[1].double(), frames[1][..., :7]):
        with pytest.raises(ValueError, match="reset"):
            gate(bad)
        assert torch.equal(gate.ref, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_delta_gate_matches_reference(backend, dtype):
    frames = random_video((2, 16, 8), frames=4, dtype=dtype)
    gate = TokenDeltaGate(TopK(5), backend=backend)
    idx, sel, err = gate(frames[0])
    assert torch.equal(sel, frames[0]) and torch.equal(err, frames[0])  # reference starts at zero
    ref = frames[0].clone()
    forced = torch.tensor([[0, 3, 7], [1, 2, 15]])
    for t, c in enumerate(frames[1:]):
        index = forced if t == 1 else None
        e = reference.token_delta_gate(c, ref, 5, index)
        got = gate(c, index)
        for g, x in zip(got, e):
            assert torch.equal(g, x)
        assert torch.equal(gate.ref, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_delta_gate_flush_forced_and_threshold(backend):
    frames = random_video((2, 12, 8), frames=3)
    gate = TokenDeltaGate(Threshold(1.0), backend=backend)
    with pytest.raises(ValueError, match="flush"):
        gate(frames[0], torch.tensor([[0, 1], [2, 3]]))
    assert gate.flushing
    perm = torch.stack([torch.randperm(12), torch.randperm(12)])
    idx, sel, err = gate(frames[0], perm)
    assert torch.equal(idx, perm) and torch.equal(err, sel) and torch.equal(gate.ref, frames[0])
    ref = frames[0].clone()
    scores = reference.gate_scores(frames[1], ref)
    counts = (scores > 1.0).sum(-1)
    assert len(set(counts.tolist())) > 1  # the shorter row is padded
    index = _threshold_slots(scores, 1.0, int(counts.max()))
    e = reference.token_delta_gate(frames[1], ref, -1, index)
    for g, x in zip(gate(frames[1]), e):
        assert torch.equal(g, x)


# ---------------------------------------------------------------- token buffer
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_buffer(backend):
    buf = TokenBuffer(backend=backend)
    x0 = torch.randn(2, 10, 6)
    out = buf(x0, torch.arange(10).expand(2, 10))
    assert torch.equal(out, x0) and buf.n_tokens == 10
    x0.zero_()  # the buffer holds a copy
    assert not torch.equal(buf.state, x0)
    expect = out.clone()
    index = torch.tensor([[1, 4, 9], [0, 2, 3]], dtype=torch.int32)
    src = torch.randn(2, 3, 6)
    out2 = buf(src, index)
    assert out2 is out
    for b in range(2):
        expect[b, index[b].long()] = src[b]
    assert torch.equal(out2, expect)
    assert torch.equal(buf(src[:, :0], index[:, :0]), expect)  # K = 0
    buf.reset()
    assert buf.state is None and buf.n_tokens is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_buffer_flush_permutation_and_strided(backend):
    buf = TokenBuffer(backend=backend)
    perm = torch.stack([torch.randperm(8), torch.randperm(8)])
    src = torch.randn(2, 6, 8).transpose(1, 2)  # [2, 8, 6] strided
    out = buf(src, perm)
    for b in range(2):
        assert torch.equal(out[b, perm[b]], src[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_buffer_bad_input_leaves_state(backend):
    buf = TokenBuffer(backend=backend)
    buf(torch.randn(2, 10, 6))
    before = buf.state.clone()
    idx = torch.tensor([[1, 2], [3, 4]])
    cases = [
        (torch.randn(2, 3, 6), idx),  # K mismatch
        (torch.randn(1, 2, 6), idx[:1]),  # batch mismatch
        (torch.randn(2, 2, 5), idx),  # feature mismatch
        (torch.randn(2, 2, 6).double(), idx),  # dtype mismatch
        (torch.randn(2, 2, 6), idx.float()),  # index dtype
        (torch.randn(2, 2, 6), None),  # index required
    ]
    for x, i in cases:
        with pytest.raises(ValueError):
            buf(x, i)
        assert torch.equal(buf.state, before)
    if backend == "ops":  # the fused op checks values before writing
        for i, exc in ((torch.tensor([[1, 10], [0, 1]]), IndexError), (torch.tensor([[1, 1], [0, 2]]), RuntimeError)):
            with pytest.raises(exc):
                buf(torch.randn(2, 2, 6), i)
            assert torch.equal(buf.state, before)


# ---------------------------------------------------------------- matmul buffers
def _qk(b=2, h=3, n=12, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g).to(dtype), torch.randn(b, h, n, d, generator=g).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_buffer_matches_reference(backend):
    q, k = _qk()
    buf = MatmulBuffer(backend=backend)
    logits = buf(q, k, None, None, 0.5)
    torch.testing.assert_close(logits, q @ k.transpose(-1, -2) * 0.5, **TOL)
    assert buf.last_macs == 2 * 3 * 12 * 12 * 8
    expect = logits.clone()
    q2, k2 = _qk(seed=1)
    iq = torch.tensor([[0, 5, 7], [1, 2, 11]])
    ik = torch.tensor([[3, 4], [0, 9]])
    out = buf(q2, k2, iq, ik, 0.5)
    reference.qk_update_(expect, q2, k2, iq, ik, 0.5)
    assert out is logits
    torch.testing.assert_close(out, expect, **TOL)
    assert buf.last_macs == 2 * 3 * (3 * 12 + 12 * 2) * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_buffer_changed_tokens_give_dense(backend):
    """Recomputing rows and columns of exactly the changed tokens reproduces the dense logits (strided q/k)."""
    qkv = torch.randn(2, 12, 3, 3, 8)  # [B, N, 3, H, d] like a qkv buffer
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    buf = MatmulBuffer(backend=backend)
    buf(q, k, None, None, 0.3)
    idx = torch.tensor([[2, 3, 8], [0, 6, 11]])
    for b in range(2):
        qkv[b, idx[b]] = torch.randn(3, 3, 3, 8)
    out = buf(q, k, idx, idx, 0.3)
    torch.testing.assert_close(out, q @ k.transpose(-1, -2) * 0.3, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_buffer_with_bias(backend):
    class Bias:
        def __init__(self, full):
            self.full = full

        def rows(self, i):
            return reference.gather_rows(self.full, i)

        def cols(self, i):
            return reference.gather_cols(self.full, i)

        def dense(self):
            return self.full

    q, k = _qk()
    bias = Bias(torch.randn(2, 3, 12, 12))
    buf = MatmulBuffer(backend=backend)
    torch.testing.assert_close(buf(q, k, None, None, 0.5, bias), q @ k.transpose(-1, -2) * 0.5 + bias.full, **TOL)
    idx = torch.tensor([[1, 4], [0, 7]])
    q2, k2 = q.clone(), k.clone()
    for b in range(2):
        q2[b, :, idx[b]] += 1.0
        k2[b, :, idx[b]] -= 1.0
    out = buf(q2, k2, idx, idx, 0.5, bias)
    torch.testing.assert_close(out, q2 @ k2.transpose(-1, -2) * 0.5 + bias.full, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_buffer_errors(backend):
    q, k = _qk()
    buf = MatmulBuffer(backend=backend)
    with pytest.raises(ValueError, match="'q'"):
        buf(q[0], k, None, None, 1.0)
    buf(q, k, None, None, 1.0)
    before = buf.logits.clone()
    with pytest.raises(ValueError, match="index_q"):
        buf(q, k, None, torch.zeros(2, 1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="reset"):
        buf(q[:, :, :5], k[:, :, :5], torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), 1.0)
    assert torch.equal(buf.logits, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_delta_accumulator_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    a0 = torch.softmax(torch.randn(2, 3, 10, 12, generator=g), -1).to(dtype)
    v0 = torch.randn(2, 3, 12, 8, generator=g).to(dtype)
    acc = MatmulDeltaAccumulator(backend=backend)
    out = acc(a0, v0)
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: 8-bit mantissa, fp32 accumulation
    torch.testing.assert_close(out, (a0.float() @ v0.float()).to(dtype), **tol)
    assert acc.last_macs == 2 * 3 * 10 * 12 * 8
    assert acc.tokens.shape == (2, 10, 24) and torch.equal(acc.tokens.view(2, 10, 3, 8).transpose(1, 2), out)
    e_out, e_a, e_v = out.clone(), a0.clone(), v0.clone()
    for seed in (1, 2):
        a = torch.softmax(torch.randn(2, 3, 10, 12, generator=g), -1).to(dtype)
        v = torch.randn(2, 3, 12, 8, generator=g).to(dtype)
        index = torch.stack([torch.randperm(12, generator=g)[:4], torch.randperm(12, generator=g)[:4]])
        reference.av_delta_update_(e_out, a, e_a, v, e_v, index)
        got = acc(a, v, index)
        assert acc.last_macs == 2 * 2 * 3 * 10 * 4 * 8
        torch.testing.assert_close(got, e_out, **tol)
        torch.testing.assert_close(acc.a_ref, e_a, **tol)
        torch.testing.assert_close(acc.v_ref, e_v, **tol)
    # invariant: out == a_ref @ v_ref; with every column selected the output is exact
    torch.testing.assert_close(acc.out.transpose(1, 2).float(), acc.a_ref.float() @ acc.v_ref.float(), **tol)
    a = torch.softmax(torch.randn(2, 3, 10, 12, generator=g), -1).to(dtype)
    v = torch.randn(2, 3, 12, 8, generator=g).to(dtype)
    torch.testing.assert_close(acc(a, v, torch.arange(12).expand(2, 12)).float(), a.float() @ v.float(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_delta_accumulator_reset_and_errors(backend):
    a = torch.softmax(torch.randn(2, 3, 10, 10), -1)
    v = torch.randn(2, 3, 10, 8)
    acc = MatmulDeltaAccumulator(backend=backend)
    acc(a, v)
    before = acc.out.clone()
    with pytest.raises(ValueError, match="'index'"):
        acc(a, v, None)
    with pytest.raises(ValueError, match="'v'"):
        acc(a, v[:, :, :9], torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(acc.out, before)
    acc.reset()
    assert acc.out is None and acc.a_ref is None
    torch.testing.assert_close(acc(a * 2, v), (a * 2) @ v, **TOL)


# ---------------------------------------------------------------- rel-pos state and windows
def test_rel_pos_table_matches_timm_rule():
    rel = torch.randn(2 * 5 - 1, 4)
    torch.testing.assert_close(rel_pos_table(5, 5, rel), get_rel_pos(5, 5, rel))
    torch.testing.assert_close(rel_pos_table(7, 7, rel), get_rel_pos(7, 7, rel))  # interpolated


@pytest.mark.parametrize("backend", BACKENDS)
def test_decomposed_rel_pos_rows_update(backend):
    attn = SamAttention(16, 2, use_rel_pos=True, input_size=(3, 4))
    rp = DecomposedRelPos(attn, backend=backend)
    q = torch.randn(2, 2, 12, 8)
    rp.update(q, (3, 4))
    idx = torch.tensor([[0, 5, 11], [2, 3, 4]])
    q2 = q.clone()
    for b in range(2):
        q2[b, :, idx[b]] = torch.randn(2, 3, 8)
    rp.update(q2, (3, 4), idx)
    dense = DecomposedRelPos(attn, backend=backend).update(q2, (3, 4)).dense()
    torch.testing.assert_close(rp.dense(), dense, **TOL)
    torch.testing.assert_close(rp.rows(idx), reference.gather_rows(dense, idx), **TOL)
    torch.testing.assert_close(rp.cols(idx), reference.gather_cols(dense, idx), **TOL)
    with pytest.raises(RuntimeError, match="update"):
        rp.rows(idx.clone())


@pytest.mark.parametrize("grid", [(3, 4), (5, 5)])
def test_decomposed_rel_pos_dense_matches_definition(grid):
    """bias[i, j] = q_i . R_h[qh_i, kh_j] + q_i . R_w[qw_i, kw_j], q a strided view as the blocks pass it."""
    gh, gw = grid
    n, d, heads = gh * gw, 8, 2
    attn = SamAttention(heads * d, heads, use_rel_pos=True, input_size=grid)
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    q = torch.randn(3, n, 3, heads, d).permute(2, 0, 3, 1, 4)[0]  # [B, H, N, d] view of a qkv buffer
    rh = rel_pos_table(gh, gh, attn.rel_pos_h)  # [Gh, Gh, d]
    rw = rel_pos_table(gw, gw, attn.rel_pos_w)
    qg = q.reshape(3, heads, gh, gw, d)
    by_row = torch.einsum("bnhwc,hkc->bnhwk", qg, rh)  # [B, H, Gh, Gw, Gh]: key grid row
    by_col = torch.einsum("bnhwc,wkc->bnhwk", qg, rw)  # [B, H, Gh, Gw, Gw]: key grid column
    want = by_row[..., :, None] + by_col[..., None, :]
    got = DecomposedRelPos(attn).update(q, grid)
    torch.testing.assert_close(got.dense(), want.reshape(3, heads, n, n), **TOL)
    assert got.rel_h.is_contiguous() and got.rel_w.is_contiguous()


def test_window_grid_partition_matches_timm():
    x = torch.randn(2, 5, 7, 6)
    grid = WindowGrid(5, 7, 3, torch.device("cpu"))
    win, (hp, wp) = window_partition(x, 3)
    part = grid.partition(x.reshape(2, 35, 6), torch.zeros(6))
    assert (hp, wp) == (grid.hp, grid.wp) and grid.n_windows == 6
    assert torch.equal(part.view(-1, 3, 3, 6), win)
    assert torch.equal(grid.unpartition(part), x.reshape(2, 35, 6))
    assert int(grid.pad_mask.sum()) == 6 * 9 - 35 and torch.equal(grid.n_real.sum(), torch.tensor(35))


def test_window_grid_window_index():
    grid = WindowGrid(4, 4, 2, torch.device("cpu"))  # 4 windows of 4 tokens, no padding
    ids = torch.tensor([[0, 1, 5], [15, 14, 10]])  # image ids
    index = grid.window_index(grid.window_major(ids))
    # width min(T, K) = 3 whatever the data; selected window positions ascending, then -1 (empty slots)
    assert index.shape == (8, 3)
    # stream 0: image 0, 1 -> window 0 pos 0, 1; image 5 (row 1, col 1) -> window 0 pos 3
    assert index[0].tolist() == [0, 1, 3] and index[1].tolist() == [-1, -1, -1]
    # stream 1: image 15 -> window 3 pos 3, 14 -> window 3 pos 2, 10 -> window 3 pos 0
    assert index[7].tolist() == [0, 2, 3] and (index[4:7] == -1).all()
    assert grid.window_index(grid.window_major(ids[:, :0])).shape == (8, 0)
    # empty slots of the token index stay empty
    padded = torch.tensor([[0, -1, 5], [-1, -1, -1]])
    assert torch.equal(grid.window_major(padded)[1], torch.tensor([-1, -1, -1]))
    index = grid.window_index(grid.window_major(padded))
    assert index[0].tolist() == [0, 3, -1] and (index[1:] == -1).all()


def test_window_grid_full_window_takes_padding():
    grid = WindowGrid(3, 3, 2, torch.device("cpu"))  # padded to 4x4; window 3 holds one real token (image 8)
    index = grid.window_index(grid.window_major(torch.tensor([[8]])))
    assert index.shape == (4, 4)  # a padded grid: T slots per window
    assert index[3].tolist() == [0, 1, 2, 3]  # the real token plus its 3 padding tokens
    assert (index[:3] == -1).all()


# ---------------------------------------------------------------- backends, policies, counting
def test_set_backend_and_policy():
    blk = EventfulBlock(Block(16, 2).eval(), TopK(3), backend="reference")
    set_backend(blk, "ops")
    assert all(m.backend == "ops" for m in blk.modules() if hasattr(m, "_backend"))
    with pytest.raises(ValueError, match="backend"):
        set_backend(blk, "cuda")
    with pytest.raises(ValueError, match="backend"):
        TokenGate(backend="nope")
    p = TopFraction(0.5)
    set_policy(blk, p)
    assert blk.policy is p and blk.qkv_gate.policy is p and blk.mlp_gate.policy is p
    blk.policy = 4
    assert blk.proj_gate.policy.r == 4


def test_dense_block_macs():
    d, n, hidden = 64, 50, 256
    assert dense_block_macs(n, d, 4, 4.0) == 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    # windowed 7x9 grid, ws 4 -> padded 8x12
    np_ = 96
    assert dense_block_macs((7, 9), d, 4, 4.0, window=4) == (
        3 * np_ * d * d + 2 * np_ * 16 * d + np_ * d * d + 2 * 63 * d * hidden
    )
    assert dense_block_macs(36, d, 4, 4.0, window=3) == dense_block_macs((6, 6), d, 4, 4.0, window=3)
    with pytest.raises(ValueError):
        dense_block_macs(35, d, 4, 4.0, window=3)
    with pytest.raises(ValueError):
        dense_block_macs(10, 63, 4, 4.0)


def test_count_macs_and_linear_macs():
    blk = Block(16, 2, mlp_ratio=2.0)
    assert linear_macs_per_token(blk.mlp) == 2 * 16 * 32
    assert linear_macs_per_token(blk.attn.qkv) == 16 * 48
    m = torch.nn.Sequential(EventfulBlock(Block(16, 2).eval(), backend="reference"),
                            EventfulBlock(Block(16, 2).eval(), backend="reference"))
    x = torch.randn(1, 5, 16)
    m(x)
    assert count_macs(m) == m[0].last_macs + m[1].last_macs == 2 * dense_block_macs(5, 16, 2, 4.0)
    assert count_macs(m[0].qkv_gate) == 0
