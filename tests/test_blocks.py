"""Eventful blocks around timm-style ViT and ViTDet/SAM blocks (tests/vit_mirror.py mirrors timm's math).

Anchors: r = N equals the dense block on every frame of a 10-frame video; r < N, the "ops" backend equals the
"reference" backend; budget changes, threshold policy, stream independence, reset, counting, errors.
fp32 tolerance 1e-4: the dense/eventful paths differ only in summation order (observed ~5e-7) plus the A·V
accumulator's running sum over 10 frames.
"""
from __future__ import annotations

import pytest
import torch

from eventful_kernels.counting import count_macs, dense_block_macs
from eventful_kernels.nn import EventfulBlock, EventfulTokenwiseBlock, Threshold, TopFraction, TopK, set_backend

from nn_utils import BACKENDS, random_video
from vit_mirror import Block, SamBlock

D, HEADS = 64, 4
FP32 = dict(rtol=1e-4, atol=1e-4)
CLASSES = [EventfulTokenwiseBlock, EventfulBlock]


def make(cfg, seed=0):
    """(dense block, input shape) for a named configuration."""
    torch.manual_seed(seed)
    if cfg == "vit":
        return Block(D, HEADS, init_values=0.5).eval(), (2, 50, D)
    if cfg == "vit_qknorm_inplace_ls":
        return Block(D, HEADS, init_values=0.5, qk_norm=True, inplace_ls=True).eval(), (2, 33, D)
    if cfg == "sam_global_relpos":
        return SamBlock(D, HEADS, use_rel_pos=True, input_size=(6, 7)).eval(), (2, 6, 7, D)
    if cfg == "sam_window_relpos_padded":
        return SamBlock(D, HEADS, use_rel_pos=True, window_size=4, init_values=0.5).eval(), (2, 7, 9, D)
    if cfg == "sam_window":
        return SamBlock(D, HEADS, window_size=3, qk_norm=True).eval(), (2, 6, 6, D)
    raise KeyError(cfg)


CONFIGS = ["vit", "vit_qknorm_inplace_ls", "sam_global_relpos", "sam_window_relpos_padded", "sam_window"]


def n_tokens(shape):
    return shape[1] if len(shape) == 3 else shape[1] * shape[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_full_budget_equals_dense(cfg, cls, backend):
    blk, shape = make(cfg)
    eb = cls(blk, TopK(n_tokens(shape)), backend=backend)
    for t, x in enumerate(random_video(shape)):
        y = eb(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, blk(x), **FP32, msg=f"frame {t}")


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_ops_equal_reference_partial_budget(cfg, cls):
    blk, shape = make(cfg)
    policy = TopFraction(0.3)
    e_ops, e_ref = cls(blk, policy, backend="ops"), cls(blk, policy, backend="reference")
    max_dev = 0.0
    for t, x in enumerate(random_video(shape)):
        y_ops, y_ref = e_ops(x), e_ref(x)
        torch.testing.assert_close(y_ops, y_ref, **FP32, msg=f"frame {t}")
        assert e_ops.last_macs == e_ref.last_macs
        max_dev = max(max_dev, (y_ref - blk(x)).abs().max().item())
    assert max_dev > 1e-3  # r < N really approximates (the comparison is not between two dense runs)


@pytest.mark.parametrize("cfg", ["vit", "sam_window_relpos_padded"])
def test_ops_equal_reference_bf16(cfg):
    """bf16 (8-bit mantissa, eps 2^-8 = 0.4%): each path rounds ~10 times per block (linears, softmax, buffers,
    accumulator); kernels may accumulate in a different order than the reference, so outputs may differ by a few
    ulps of their magnitude. We allow 3% of the output's max magnitude: the same block run in bf16 instead of fp32
    deviates by up to ~2% on this video, so a backend error larger than bf16's own rounding noise still fails."""
    blk, shape = make(cfg)
    blk = blk.to(torch.bfloat16)
    policy = TopFraction(0.3)
    e_ops, e_ref = EventfulBlock(blk, policy, backend="ops"), EventfulBlock(blk, policy, backend="reference")
    for t, x in enumerate(random_video(shape, dtype=torch.bfloat16)):
        y_ops, y_ref = e_ops(x).float(), e_ref(x).float()
        scale = y_ref.abs().max().item()
        assert (y_ops - y_ref).abs().max().item() <= 3e-2 * scale, f"frame {t}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg", ["vit", "sam_window_relpos_padded"])
def test_budget_change_mid_stream(cfg, cls, backend):
    """Small budget for 5 frames, then r = N: from that frame on every cached value is refreshed -> dense."""
    blk, shape = make(cfg)
    n, b = n_tokens(shape), shape[0]
    policy = TopK(5)
    eb = cls(blk, policy, backend=backend)
    per_token = 4 * D * D + 2 * D * 4 * D  # qkv + proj + mlp MACs per token
    for t, x in enumerate(random_video(shape)):
        if t == 5:
            policy.r = n
        y = eb(x)
        if 0 < t < 5:
            assert eb.qkv_gate.ref is not None and eb.last_macs >= b * 5 * per_token
            assert eb.last_macs - eb.attention.last_macs == b * 5 * per_token
            assert not torch.allclose(y, blk(x), **FP32)
        if t >= 5:
            torch.testing.assert_close(y, blk(x), **FP32, msg=f"frame {t}")
            assert eb.last_macs - eb.attention.last_macs == b * n * per_token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg,batch", [("vit", 1), ("vit", 2), ("sam_window_relpos_padded", 2)])
def test_threshold_policy(cfg, cls, backend, batch):
    blk, shape = make(cfg)
    video = random_video((batch,) + shape[1:])
    # h = 0: every token drifts a little, so all are selected each frame -> dense
    eb = cls(blk, Threshold(0.0), backend=backend)
    for x in video:
        torch.testing.assert_close(eb(x), blk(x), **FP32)
    # h huge: K = 0 after the flush, nothing is recomputed; only the residual input changes
    eb = cls(blk, Threshold(1e9), backend=backend)
    y0 = eb(video[0])
    for x in video[1:]:
        y = eb(x)
        torch.testing.assert_close(y - x, y0 - video[0], **FP32)
        assert eb.last_macs == (eb.attention.last_macs if cls is EventfulTokenwiseBlock else 0)
    # a middle threshold selects a strict subset, different per frame
    eb = cls(blk, Threshold(1.5), backend=backend)
    sizes = set()
    for x in video:
        eb(x)
        sizes.add(eb.last_macs)
    assert len(sizes) > 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg", ["vit", "sam_global_relpos", "sam_window_relpos_padded"])
def test_streams_independent(cfg, cls, backend):
    blk, shape = make(cfg)
    one = (1,) + shape[1:]
    s0, s1, s2 = (random_video(one, seed=s) for s in (1, 2, 3))
    policy = TopFraction(0.25)
    ea, eb = cls(blk, policy, backend=backend), cls(blk, policy, backend=backend)
    for x0, x1, x2 in zip(s0, s1, s2):
        ya, yb = ea(torch.cat([x0, x1])), eb(torch.cat([x0, x2]))
        torch.testing.assert_close(ya[0], yb[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ya[1], yb[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_reset_restarts_stream(cls, backend):
    blk, shape = make("sam_window_relpos_padded")
    eb = cls(blk, TopFraction(0.3), backend=backend)
    video = random_video(shape, frames=4)
    first = [eb(x).clone() for x in video]
    eb.reset()
    assert eb.qkv_gate.flushing and eb.attention.last_macs == 0
    for x, y in zip(video, first):
        assert torch.equal(eb(x), y)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_counting(cfg):
    blk, shape = make(cfg)
    b, n = shape[0], n_tokens(shape)
    grid = shape[1:3] if len(shape) == 4 else None
    window = getattr(blk, "window_size", 0)
    padded = window and (grid[0] % window or grid[1] % window)
    dense = b * dense_block_macs(grid if window else n, D, HEADS, 4.0, window or None)
    if window:
        np_ = (grid[0] + (-grid[0] % window)) * (grid[1] + (-grid[1] % window))
        dense_attn = b * 2 * np_ * window * window * D
        pad_linear = b * (np_ - n) * 4 * D * D  # qkv + proj of padding tokens, skipped by the eventful block
    else:
        dense_attn, pad_linear = b * 2 * n * n * D, 0
    video = random_video(shape, frames=3)
    for cls in CLASSES:
        eb = cls(blk, TopK(n), backend="reference")
        eb(video[0])
        assert eb.last_macs == dense - pad_linear  # flush: dense
        eb(video[1])
        extra = dense_attn if cls is EventfulBlock else 0  # rows+cols and delta A·V: twice the dense attention
        assert eb.last_macs == dense - pad_linear + extra
        assert count_macs(torch.nn.ModuleList([eb])) == eb.last_macs
    assert not padded or pad_linear > 0
    # r < N, global attention: linears K/N of dense, attention rows/cols + delta
    if not window:
        r = 7
        for cls, attn in ((EventfulTokenwiseBlock, b * 2 * n * n * D), (EventfulBlock, b * 4 * r * n * D)):
            eb = cls(blk, TopK(r), backend="reference")
            eb(video[0])
            eb(video[1])
            assert eb.last_macs == b * r * (4 * D * D + 8 * D * D) + attn


def test_weights_shared_not_copied():
    blk, _ = make("sam_window_relpos_padded")
    for cls in CLASSES:
        eb = cls(blk, backend="reference")
        assert eb.block is blk
        assert {p.data_ptr() for p in eb.parameters()} == {p.data_ptr() for p in blk.parameters()}
        assert sum(p.numel() for p in eb.parameters()) == sum(p.numel() for p in blk.parameters())
        with torch.no_grad():
            blk.attn.proj.bias.add_(1.0)  # a weight update is seen by the wrapper
        x = torch.randn(1, 7, 9, D)
        torch.testing.assert_close(eb(x), blk(x), **FP32)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_input(cls):
    blk, shape = make("sam_window_relpos_padded")
    eb = cls(blk, backend="reference")
    with pytest.raises(ValueError, match="'x'"):
        eb(torch.randn(2, 7, 9, D + 1))
    with pytest.raises(ValueError, match=r"\[B, H, W, D\]"):
        eb(torch.randn(2, 63, D))
    assert eb.qkv_gate.flushing
    x = torch.randn(shape)
    eb(x)
    state = [t.clone() for t in (eb.qkv_gate.ref, eb.qkv_buffer.state, eb.mlp_gate.ref)]
    for bad in (torch.randn(2, 9, 7, D), torch.randn(1, 7, 9, D)):
        with pytest.raises(ValueError, match="reset"):
            eb(bad)
        for s, t in zip(state, (eb.qkv_gate.ref, eb.qkv_buffer.state, eb.mlp_gate.ref)):
            assert torch.equal(s, t)
    with pytest.raises(TypeError, match="norm1"):
        cls(torch.nn.Linear(4, 4))


def test_set_backend_switches_mid_stream():
    """Both backends hold the same state layout, so switching backend between frames keeps the stream."""
    blk, shape = make("vit")
    a = EventfulBlock(blk, TopFraction(0.3), backend="reference")
    b = EventfulBlock(blk, TopFraction(0.3), backend="reference")
    for t, x in enumerate(random_video(shape, frames=6)):
        if t == 3:
            set_backend(a, "ops")
        torch.testing.assert_close(a(x), b(x), **FP32)


def test_failed_flush_leaves_no_state():
    blk, shape = make("vit")
    eb = EventfulBlock(blk, TopK(n_tokens(shape)), backend="reference")
    x = random_video(shape, frames=1)[0]
    with pytest.raises(RuntimeError):
        eb(x.double())  # the gate accepts it, the float32 Linear does not
    assert eb.qkv_gate.flushing and eb.qkv_buffer.state is None
    torch.testing.assert_close(eb(x), blk(x), **FP32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("cfg", ["vit", "sam_window_relpos_padded"])
def test_cuda_matches_cpu(cfg, cls, backend):
    """All state lives on the input's device; CUDA results equal the CPU reference (TF32 off: fp32 tolerance)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    blk, shape = make(cfg)
    policy = TopFraction(0.3)
    e_cpu = cls(blk, policy, backend="reference")
    e_gpu = cls(make(cfg)[0].cuda(), policy, backend=backend)
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(e_gpu(x.cuda()).cpu(), e_cpu(x), **FP32, msg=f"frame {t}")
