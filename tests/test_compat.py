"""eventful_kernels.compat: the published implementation's module API on our kernels.

Each class is driven with random frames through the compatibility class and through our own nn layers /
eventful_kernels.reference, and the values must agree; a block written only with the compatibility classes, in the
published block's structure, equals our EventfulBlock frame by frame (and the dense block at full budget).
"""
from __future__ import annotations

import pytest
import torch

from eventful_kernels import reference
from eventful_kernels.compat import (
    Counts, ExtendedModule, MatmulBuffer, MatmulDeltaAccumulator, TokenBuffer, TokenDeltaGate, TokenGate,
    TokenNormThreshold, TokenNormTopFraction, TokenNormTopK, set_policies,
)
from eventful_kernels.nn import EventfulBlock, Threshold, TopFraction, TopK
from eventful_kernels import nn as enn

from nn_utils import BACKENDS, random_video
from test_blocks import make, n_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = dict(rtol=0, atol=0)
FP32 = dict(rtol=1e-5, atol=1e-5)


def _frames(shape, frames=6, seed=0):
    return random_video(shape, frames=frames, seed=seed)


# ---- policies ------------------------------------------------------------------------------------------------

def test_topk_and_fraction_policies_select_the_largest_norms():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(2, 3, 20, 8, generator=g)
    norms = torch.linalg.vector_norm(e, dim=-1)
    want = reference.select_topk(norms.reshape(6, 20), 5).view(2, 3, 5)
    assert torch.equal(TokenNormTopK(5)(e), want)
    assert torch.equal(TokenNormTopFraction(0.25)(e), want)  # int(0.25 * 20) = 5
    assert TokenNormTopFraction(0.26)(e).shape[-1] == 5  # floor, as published
    # columns: dim=-2 reduces over rows
    assert torch.equal(TokenNormTopK(5)(e.transpose(-1, -2), dim=-2), want)
    l1 = torch.linalg.vector_norm(e, ord=1, dim=-1).reshape(6, 20)
    assert torch.equal(TokenNormTopK(5, order=1)(e), reference.select_topk(l1, 5).view(2, 3, 5))
    assert TokenNormTopK(50)(e).shape[-1] == 20  # k > N selects all


def test_threshold_policy_single_row_and_rows():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(1, 30, 4, generator=g)
    norms = torch.linalg.vector_norm(e, dim=-1)
    idx = TokenNormThreshold(2.0)(e)
    assert idx.shape[:-1] == (1,)
    assert torch.equal(idx[0], (norms[0] > 2.0).nonzero().squeeze(-1))
    rows = torch.randn(3, 30, 4, generator=g)
    idx = TokenNormThreshold(2.0)(rows)
    n3 = torch.linalg.vector_norm(rows, dim=-1)
    counts = (n3 > 2.0).sum(-1)
    assert idx.shape == (3, int(counts.max()))
    for b in range(3):
        assert torch.equal(idx[b, : counts[b]], (n3[b] > 2.0).nonzero().squeeze(-1))
        assert bool((idx[b, counts[b]:] == -1).all())


def test_policy_fused_forms_and_status():
    assert TokenNormTopK(7).fused().k(100) == 7
    assert TokenNormTopFraction(0.5).fused().k(197) == 98
    assert isinstance(TokenNormThreshold(0.3).fused(), Threshold)
    assert TokenNormTopK(7, order=1).fused() is None

    class Lowest(TokenNormTopK):  # a subclass with its own selection is called, never fused
        def forward(self, x, dim=-1):
            return (-torch.linalg.vector_norm(x, dim=dim)).topk(self.k, dim=-1).indices.sort(-1).values

    assert Lowest(3).fused() is None
    gate = TokenGate()
    gate.policy = Lowest(2)
    gate(torch.zeros(1, 5, 2))
    _, index = gate(torch.tensor([[[3.0, 0], [0.1, 0], [2.0, 0], [0.0, 0], [5.0, 0]]]))
    assert index.tolist() == [[1, 3]]
    p = TokenNormTopK(3, save_status=True)
    assert p.fused() is None
    e = torch.randn(1, 10, 4)
    out = p(e)
    assert torch.equal(p.last_input, e) and torch.equal(p.last_output, out) and p.last_input is not e
    with pytest.raises(ValueError, match="fraction|'f'"):
        TokenNormTopFraction(1.5)


# ---- gates ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy,ours", [(TokenNormTopK(9), TopK(9)), (TokenNormTopFraction(0.3), TopFraction(0.3))])
def test_token_gate_equals_nn_gate(policy, ours, backend):
    gate = TokenGate(backend=backend)
    gate.policy = policy
    nn_gate = enn.TokenGate(ours)
    frames = _frames((2, 40, 16))
    c_first, idx = gate(frames[0])
    assert c_first is frames[0] and idx is None and not gate.first
    nn_gate(frames[0])
    for t, c in enumerate(frames[1:]):
        c_tilde, index = gate(c)
        want_index, want_sel = nn_gate(c)
        assert torch.equal(index, want_index), f"frame {t}"
        torch.testing.assert_close(c_tilde, want_sel, **EXACT)
        torch.testing.assert_close(gate.p, nn_gate.ref, **EXACT)
    assert frames[0].data_ptr() != gate.p.data_ptr()  # the caller's tensor is never written


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_per_head_custom_policy_and_forced_index(backend):
    """4-D input selects per leading element; a policy without a fused form (L1 norm, or any callable) is called
    on the errors; a forced index shared over heads gathers and updates the reference there."""
    frames = _frames((2, 3, 20, 8))
    gate = TokenGate(backend=backend)
    gate.policy = TokenNormTopK(4)
    l1 = TokenGate(backend=backend)
    l1.policy = TokenNormTopK(4, order=1)
    ref, ref1 = frames[0].clone().reshape(6, 20, 8), frames[0].clone()
    gate(frames[0]), l1(frames[0])
    for c in frames[1:]:
        c_tilde, index = gate(c)
        want_index, want_sel = reference.token_gate(c.reshape(6, 20, 8), ref, 4)
        assert torch.equal(index, want_index.view(2, 3, 4))
        torch.testing.assert_close(c_tilde, want_sel.view(2, 3, 4, 8), **EXACT)
        c_tilde, index = l1(c)
        want = reference.select_topk(torch.linalg.vector_norm(c - ref1, ord=1, dim=-1).reshape(6, 20), 4).view(2, 3, 4)
        assert torch.equal(index, want)
        torch.testing.assert_close(c_tilde, torch.gather(c, 2, want[..., None].expand(2, 3, 4, 8)), **EXACT)
        ref1.scatter_(2, want[..., None].expand(2, 3, 4, 8), c_tilde)
        torch.testing.assert_close(l1.p, ref1, **EXACT)
    forced = torch.tensor([[0, 7, 19], [3, 4, 5]])
    c = frames[-1] + 1.0
    c_tilde, index = gate(c, forced_index=forced)
    assert index is forced
    torch.testing.assert_close(c_tilde, reference.gather_rows(c, forced), **EXACT)
    torch.testing.assert_close(gate.p.view(2, 3, 20, 8)[0, :, 7], c[0, :, 7], **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gate_threshold_policy(backend):
    frames = _frames((1, 40, 16))
    gate = TokenGate(backend=backend)
    gate.policy = TokenNormThreshold(0.5)
    ref = frames[0].clone()
    gate(frames[0])
    for c in frames[1:]:
        before = ref.clone()
        c_tilde, index = gate(c)
        want_index, count, want_sel = reference.token_gate_threshold(c, ref, 0.5, 40)
        k = int(count.max())
        assert torch.equal(index, want_index[:, :k]) and k > 0
        assert torch.equal(index[0], (torch.linalg.vector_norm(c - before, dim=-1)[0] > 0.5).nonzero().squeeze(-1))
        torch.testing.assert_close(c_tilde, want_sel[:, :k], **EXACT)
        torch.testing.assert_close(gate.p, ref, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_delta_gate_equals_nn_gate(backend):
    gate = TokenDeltaGate(backend=backend)
    gate.policy = TokenNormTopK(6)
    nn_gate = enn.TokenDeltaGate(TopK(6))
    frames = _frames((2, 30, 8))
    assert gate(frames[0]) == (frames[0], None, None)
    nn_gate(frames[0])
    for c in frames[1:]:
        c_tilde, e_tilde, index = gate(c)
        want_index, want_sel, want_e = nn_gate(c)
        assert torch.equal(index, want_index)
        torch.testing.assert_close(c_tilde, want_sel, **EXACT)
        torch.testing.assert_close(e_tilde, want_e, **FP32)
        torch.testing.assert_close(gate.p, nn_gate.ref, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_delta_gate_forced_rows_over_heads_and_columns(backend):
    """The published attention path: a value gate on ``v [B,H,N,d]`` and a column gate on ``a [B,H,N,N]``, both
    forced to the qkv gate's index ``[B, K]``."""
    g = torch.Generator().manual_seed(3)
    v_gate, a_gate = TokenDeltaGate(backend=backend), TokenDeltaGate("col", backend=backend)
    v0, a0 = torch.randn(2, 3, 12, 4, generator=g), torch.randn(2, 3, 12, 12, generator=g)
    v_gate(v0), a_gate(a0)
    v_ref, a_ref = v0.clone(), a0.clone()
    for _ in range(3):
        v, a = torch.randn(2, 3, 12, 4, generator=g), torch.randn(2, 3, 12, 12, generator=g)
        index = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(2)])
        v_n, v_d, idx = v_gate(v, forced_index=index)
        assert idx is index
        torch.testing.assert_close(v_n, reference.gather_rows(v, index), **EXACT)
        torch.testing.assert_close(v_d, reference.gather_rows(v, index) - reference.gather_rows(v_ref, index), **EXACT)
        reference.scatter_rows_(v_ref, index, reference.gather_rows(v, index))
        a_n, a_d, _ = a_gate(a, forced_index=index)
        torch.testing.assert_close(a_n, reference.gather_cols(a, index), **EXACT)
        torch.testing.assert_close(a_d, reference.gather_cols(a, index) - reference.gather_cols(a_ref, index), **EXACT)
        reference.scatter_cols_(a_ref, index, reference.gather_cols(a, index))
        torch.testing.assert_close(v_gate.p, v_ref, **EXACT)
        torch.testing.assert_close(a_gate.p, a_ref, **EXACT)


# ---- buffers and attention products --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_token_buffer_rows_equals_nn_buffer_and_columns_equal_reference(backend):
    g = torch.Generator().manual_seed(4)
    buf, nn_buf = TokenBuffer(backend=backend), enn.TokenBuffer()
    x0 = torch.randn(2, 25, 6, generator=g)
    assert torch.equal(buf(x0, None), x0) and buf.b is not x0
    nn_buf(x0)
    col = TokenBuffer("col", backend=backend)
    y0 = torch.randn(2, 3, 6, 25, generator=g)
    col(y0, None)
    want_col = y0.clone()
    for _ in range(3):
        index = torch.stack([torch.randperm(25, generator=g)[:7] for _ in range(2)])
        x = torch.randn(2, 7, 6, generator=g)
        out = buf(x, index)
        assert out is buf.b
        torch.testing.assert_close(out, nn_buf(x, index), **EXACT)
        y = torch.randn(2, 3, 6, 7, generator=g)
        torch.testing.assert_close(col(y, index), reference.scatter_cols_(want_col, index, y), **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_buffer_equals_nn_buffer(backend):
    """Published call: pre-scaled queries and transposed keys; ours: q, k and the scale."""
    g = torch.Generator().manual_seed(5)
    mb, nn_mb = MatmulBuffer(backend=backend), enn.MatmulBuffer()
    scale = 0.35
    for t in range(4):
        q, k = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
        iq = None if t == 0 else torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(2)])
        ik = None if t == 0 else torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(2)])
        out = mb(q * scale, k.transpose(-2, -1), iq, ik)
        assert out is mb.product
        torch.testing.assert_close(out, nn_mb(q, k, iq, ik, scale), **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_delta_accumulator_equals_nn_accumulator(backend):
    """Fed by delta gates as in the published block, the accumulator equals ours (and ``a @ v`` of the gated
    references)."""
    g = torch.Generator().manual_seed(6)
    acc, nn_acc = MatmulDeltaAccumulator(backend=backend), enn.MatmulDeltaAccumulator()
    v_gate, a_gate = TokenDeltaGate(backend=backend), TokenDeltaGate("col", backend=backend)
    for t in range(5):
        v = torch.randn(2, 3, 14, 4, generator=g)
        a = torch.randn(2, 3, 14, 14, generator=g).softmax(-1)
        index = None if t == 0 else torch.stack([torch.randperm(14, generator=g)[:6] for _ in range(2)])
        v_n, v_d, idx = v_gate(v, forced_index=index)
        a_n, a_d, _ = a_gate(a, forced_index=idx)
        out = acc(a_n, v_n, a_d, v_d)
        torch.testing.assert_close(out, nn_acc(a, v, index), **FP32)
        torch.testing.assert_close(out, a_gate.p @ v_gate.p, **FP32)


# ---- counting, resets, errors ----------------------------------------------------------------------------------

def test_counts_follow_the_published_quantities():
    g = torch.Generator().manual_seed(7)
    gate = TokenGate()
    gate.policy = TokenNormTopK(3)
    mb, acc = MatmulBuffer(), MatmulDeltaAccumulator()
    root = ExtendedModule()
    root.gate, root.mb, root.acc = gate, mb, acc
    root.counting()
    assert gate.count_mode and acc.count_mode and gate.policy.count_mode
    b, h, n, d = 2, 2, 10, 4
    x = torch.randn(b, n, d, generator=g)
    gate(x)
    assert root.total_counts()["gate_flops"] == 0  # the flush selects nothing
    gate(x + 1)
    assert gate.counts["gate_flops"] == b * n * d
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    a = torch.randn(b, h, n, n, generator=g)
    mb(q, k.transpose(-1, -2), None, None)
    acc(a, v)
    assert root.total_counts()["matmul_flops"] == 2 * b * h * n * n * d
    root.clear_counts()
    iq = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mb(q, k.transpose(-1, -2), iq, iq[:, :2])
    assert mb.counts["matmul_flops"] == b * h * (3 * n + n * 2) * d
    acc(a[..., :3], v[..., :3, :], a[..., :3], v[..., :3, :])
    assert acc.counts["accumulator_flops"] == b * h * 3 * d + 2 * b * h * n * d
    assert acc.counts["matmul_flops"] == 2 * b * h * n * d * 3
    total = root.total_counts()
    assert isinstance(total, Counts) and total["matmul_flops"] == mb.counts["matmul_flops"] + acc.counts["matmul_flops"]
    assert (total * 2)["gate_flops"] == 0 and (total - total)["matmul_flops"] == 0
    root.no_counting()
    gate(x + 2)
    assert gate.counts["gate_flops"] == 0


def test_reset_makes_the_next_call_a_flush_in_the_whole_tree():
    root = ExtendedModule()
    root.gate, root.buf = TokenGate(), TokenBuffer()
    set_policies(root, TokenNormTopK, k=2)
    assert isinstance(root.gate.policy, TokenNormTopK) and root.gate.policy.k == 2
    x = torch.randn(1, 6, 3)
    root.gate(x), root.buf(x, None)
    assert not root.gate.first and root.buf.b is not None
    root.reset()
    assert root.gate.first and root.gate.p is None and root.buf.first and root.buf.b is None
    y = torch.randn(2, 5, 3)  # a new stream of another shape
    assert root.gate(y) == (y, None)


def test_bad_input_raises_and_leaves_the_state():
    gate = TokenGate()
    x = torch.randn(1, 6, 3)
    gate(x)
    with pytest.raises(ValueError, match="policy is not set"):
        gate(x)
    gate.policy = TokenNormTopK(2)
    p = gate.p.clone()
    with pytest.raises(ValueError, match="argument 'c'"):
        gate(torch.randn(1, 7, 3))
    with pytest.raises(ValueError, match="forced_index"):
        gate(x, forced_index=torch.tensor([[0.5]]))
    with pytest.raises(IndexError, match="out of range"):
        gate(x, forced_index=torch.tensor([[0, 9]]))  # out of range: the op's check, before any write
    assert torch.equal(gate.p, p)
    buf = TokenBuffer()
    buf(x, None)
    with pytest.raises(ValueError, match="'index' is required"):
        buf(x[:, :2], None)
    with pytest.raises(ValueError, match="selects 1 tokens"):
        buf(x[:, :2], torch.tensor([[0]]))
    assert torch.equal(buf.b, x)
    with pytest.raises(ValueError, match="structure"):
        TokenGate("diagonal")
    with pytest.raises(ValueError, match="backend"):
        TokenBuffer(backend="cuda")


# ---- end to end: a block in the published structure, written with the compatibility classes ---------------------

class PublishedStyleBlock(ExtendedModule):
    """The published eventful block (gates after the LayerNorms, QK^T buffer, value / attention delta gates and the
    A·V delta accumulator) around a timm-style block, using only eventful_kernels.compat classes."""

    def __init__(self, block, k):
        super().__init__()
        self.block = block
        self.qkv_gate, self.qkv_accumulator = TokenGate(), TokenBuffer()
        self.projection_gate, self.projection_accumulator = TokenGate(), TokenBuffer()
        self.mlp_gate, self.mlp_accumulator = TokenGate(), TokenBuffer()
        self.matmul_accumulator_1 = MatmulBuffer()
        self.v_gate, self.matmul_gate = TokenDeltaGate(), TokenDeltaGate(structure="col")
        self.matmul_accumulator_2 = MatmulDeltaAccumulator()
        set_policies(self, TokenNormTopK, k=k)

    @torch.no_grad()
    def forward(self, x):
        blk, attn = self.block, self.block.attn
        b, n, dim = x.shape
        h = attn.num_heads
        sel, index = self.qkv_gate(blk.norm1(x))
        qkv = self.qkv_accumulator(attn.qkv(sel), index)
        q, k, v = qkv.view(b, n, 3, h, dim // h).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        a = self.matmul_accumulator_1(q * attn.scale, k.transpose(-2, -1), index, index).softmax(dim=-1)
        v_n, v_d, index_v = self.v_gate(v, forced_index=index)
        a_n, a_d, _ = self.matmul_gate(a, forced_index=index_v)
        o = self.matmul_accumulator_2(a_n, v_n, a_d, v_d).transpose(1, 2).reshape(b, n, dim)
        sel, index = self.projection_gate(o)
        x = x + blk.ls1(self.projection_accumulator(attn.proj(sel), index).clone())
        sel, index = self.mlp_gate(blk.norm2(x))
        return x + blk.ls2(self.mlp_accumulator(blk.mlp(sel), index).clone())


@pytest.mark.parametrize("cfg", ["vit", "vit_qknorm_inplace_ls"])
def test_published_style_block_equals_eventful_block(cfg):
    blk, shape = make(cfg)
    k = n_tokens(shape) // 4
    compat = PublishedStyleBlock(blk, k)
    ours = EventfulBlock(blk, TopK(k), strategy="eventful")
    worst = 0.0
    for t, x in enumerate(_frames(shape, frames=8)):
        y = compat(x)
        torch.testing.assert_close(y, ours(x), rtol=1e-5, atol=1e-5, msg=f"frame {t}")
        with torch.no_grad():
            worst = max(worst, float((y - blk(x)).abs().max()))
    assert worst > 1e-3  # r < N really approximates: not a comparison of two dense runs
    compat.reset()
    x = _frames(shape, frames=1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(compat(x), blk(x), rtol=1e-4, atol=1e-4)  # after reset: a dense flush


def test_published_style_block_at_full_budget_equals_dense():
    blk, shape = make("vit")
    compat = PublishedStyleBlock(blk, n_tokens(shape))
    compat.counting()
    for t, x in enumerate(_frames(shape)):
        with torch.no_grad():
            want = blk(x)
        torch.testing.assert_close(compat(x), want, rtol=1e-4, atol=1e-4, msg=f"frame {t}")
    assert compat.total_counts()["gate_flops"] > 0
