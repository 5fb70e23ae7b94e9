"""eventful_kernels.models: conversion of timm ViT / SAM ViT, budgets, reset, streams (tiny timm configs)."""
import pytest
import torch
from tiny_timm import SAM_TOKENS, VIT_TOKENS, tiny_sam, tiny_vit, video

from eventful_kernels.models import convert
from eventful_kernels.nn.policies import as_policy
from eventful_kernels.video.budgets import parse_budget
from eventful_kernels.models.macs import DenseMacCounter
from eventful_kernels.nn import EventfulBlock, EventfulTokenwiseBlock
from eventful_kernels.nn.policies import Threshold, TopFraction, TopK

# fp32 everywhere. The dense timm block uses fused SDPA, the eventful one softmax + (delta) matmuls over buffers, so
# sums are accumulated in a different order; observed differences are ~1e-6 on outputs of magnitude ~1, and the
# A·V delta accumulator adds a few ulps per frame. 1e-4 leaves margin for that and still catches any wrong token.
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"vit": (tiny_vit, 32, VIT_TOKENS), "sam": (tiny_sam, 64, SAM_TOKENS)}


def _frames(kind, t=6, batch=1, seed=0):
    return video(t, MODELS[kind][1], batch, seed)


@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("kind", ["vit", "sam"])
@pytest.mark.parametrize("budget", ["fraction", "tokens", "over"])
def test_full_budget_equals_dense_every_frame(kind, backend, budget):
    build, _, n = MODELS[kind]
    dense = build()
    r = {"fraction": 1.0, "tokens": n, "over": 10 * n}[budget]  # TopK(r > N) selects min(r, N) = N
    ev = convert(dense, r, backend=backend)
    for x in _frames(kind):
        want = dense(x)
        got = ev(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", ["vit", "sam"])
@pytest.mark.parametrize("budget", [5, 0.3, TopK(9)])
def test_reduced_budget_ops_matches_reference(kind, budget):
    build, _, n = MODELS[kind]
    dense = build()
    ev_ops = convert(dense, budget, backend="ops")
    ev_ref = convert(dense, budget, backend="reference")
    deviated = False
    for t, x in enumerate(_frames(kind, t=7)):
        y_ops, y_ref, y_dense = ev_ops(x), ev_ref(x), dense(x)
        torch.testing.assert_close(y_ops, y_ref, **TOL)
        if t == 0:  # flush: dense computation
            torch.testing.assert_close(y_ops, y_dense, **TOL)
            flush_macs = ev_ops.macs_last_frame()
        else:
            assert ev_ops.macs_last_frame() < flush_macs
            assert ev_ops.macs_last_frame() == ev_ref.macs_last_frame()
            deviated |= not torch.allclose(y_ops, y_dense, **TOL)
    assert deviated, "with r < N the eventful output should differ from dense on some frame (tokens are skipped)"


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_block_kinds_and_shared_weights(kind):
    build, _, _ = MODELS[kind]
    dense = build()
    dense_blocks = list(dense.blocks)
    ev = convert(dense, 0.5)
    blocks = list(ev.model.blocks)
    for blk, orig in zip(blocks, dense_blocks):
        windowed = kind == "sam" and orig.window_size > 0
        assert type(blk) is (EventfulTokenwiseBlock if windowed else EventfulBlock)
    if kind == "sam":
        assert sum(type(b) is EventfulBlock for b in blocks) == 1  # global_attn_indexes=(1,)
    assert list(dense.blocks) == dense_blocks  # the original model keeps its dense blocks
    own = {p.data_ptr() for p in dense.parameters()}
    assert own == {p.data_ptr() for p in ev.parameters()}  # every weight shared, none copied
    assert ev.dense is dense


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_set_budget_mid_stream(kind):
    build, _, n = MODELS[kind]
    dense = build()
    schedule = {0: 1.0, 2: 4, 4: 0.5, 6: TopK(n)}
    ev_ops, ev_ref = convert(dense, backend="ops"), convert(dense, backend="reference")
    macs = []
    for t, x in enumerate(_frames(kind, t=8)):
        if t in schedule:
            ev_ops.set_budget(schedule[t])
            ev_ref.set_budget(schedule[t])
        y = ev_ops(x)
        torch.testing.assert_close(y, ev_ref(x), **TOL)
        macs.append(ev_ops.macs_last_frame())
        if t in (0, 1, 6, 7):  # r = N: every token refreshed, so the model is exact again from frame 6 on
            torch.testing.assert_close(y, dense(x), **TOL)
    assert macs[1] == macs[6] == macs[7]  # frame 0 is the flush (dense attention), counted differently
    assert macs[2] == macs[3] < macs[4] == macs[5] < macs[1]
    assert isinstance(ev_ops.policy, TopK) and ev_ops.policy.k(n) == n


def test_attention_blocks_share_one_softmax_buffer():
    """Every EventfulAttention of a converted model uses the model's workspace: one buffer per attention shape."""
    ev = convert(tiny_vit(), 0.5)
    attns = [b.attention for b in ev.model.blocks]
    assert len(attns) > 1 and all(a.workspace is ev.workspace for a in attns)
    for x in _frames("vit", t=3):
        ev(x)
    assert len(ev.workspace) == 1  # all blocks have the same [B, H, N, N] attention map
    ev.reset()
    assert len(ev.workspace) == 0


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_reset_starts_a_new_video(kind):
    build, _, _ = MODELS[kind]
    dense = build()
    ev = convert(dense, 5)
    for x in _frames(kind, t=4, seed=1):
        ev(x)
    ev.reset()
    fresh = convert(dense, 5)
    for t, x in enumerate(_frames(kind, t=4, seed=2)):
        y = ev(x)
        torch.testing.assert_close(y, fresh(x), **TOL)
        if t == 0:
            torch.testing.assert_close(y, dense(x), **TOL)  # first frame after reset is a flush


def test_batch_size_change_needs_reset():
    ev = convert(tiny_vit(), 5)
    frames = _frames("vit", t=2, batch=2)
    ev(frames[0])
    with pytest.raises(ValueError, match="reset"):
        ev(frames[1][:1])
    ev.reset()
    assert ev(frames[1][:1]).shape == (1, 10)


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_two_streams_are_independent(kind):
    build, _, _ = MODELS[kind]
    dense = build()
    both = convert(dense, 6)
    single = [convert(dense, 6), convert(dense, 6)]
    for x in _frames(kind, t=6, batch=2, seed=3):
        y = both(x)
        for b in range(2):
            torch.testing.assert_close(y[b : b + 1], single[b](x[b : b + 1]), **TOL)


def test_threshold_policy_single_stream():
    dense = tiny_vit()
    ev_ops = convert(dense, Threshold(0.5), backend="ops")
    ev_ref = convert(dense, Threshold(0.5), backend="reference")
    for x in _frames("vit", t=5):
        torch.testing.assert_close(ev_ops(x), ev_ref(x), **TOL)
    assert ev_ops.macs_last_frame() == ev_ref.macs_last_frame()


def test_outside_block_macs_counted_exactly():
    dense = tiny_vit()
    ev = convert(dense, 1.0)
    x = _frames("vit", t=1)[0]
    ev(x)
    patch_embed = 16 * 32 * (3 * 8 * 8)  # 16 patches x 32 channels x (3 x 8 x 8) fan-in
    head = 10 * 32
    assert ev._outside.macs == patch_embed + head
    counter = DenseMacCounter(dense)
    with counter.counting():
        dense(x)
    assert counter.n_tokens == VIT_TOKENS
    assert counter.macs > patch_embed + head
    dense(x)  # outside counting: the shared hooks must not count
    assert ev._outside.macs == patch_embed + head


def test_bad_input_and_budgets():
    ev = convert(tiny_vit(), 0.5)
    with pytest.raises(ValueError, match="frames"):
        ev(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="frames"):
        ev(torch.randn(1, 4, 32, 32))
    for bad in (-3, 1.5, -0.1, "4", True, None, [2]):
        with pytest.raises(ValueError, match="budget"):
            ev.set_budget(bad)
    assert isinstance(ev.policy, TopFraction) and ev.policy.f == 0.5  # unchanged by the failed calls
    with pytest.raises(TypeError, match="VisionTransformer"):
        convert(torch.nn.Linear(3, 3))


def test_as_policy_and_parse_budget():
    assert isinstance(as_policy(7), TopK) and as_policy(7).k(100) == 7
    assert isinstance(as_policy(0.25), TopFraction) and as_policy(0.25).k(100) == 25
    assert isinstance(as_policy(None), TopFraction) and as_policy(None).k(100) == 100
    pol = Threshold(0.1)
    assert as_policy(pol) is pol
    for bad in (-3, 1.5, "4", True, [2]):
        with pytest.raises(ValueError, match="budget"):
            as_policy(bad)
    assert parse_budget("N") == 1.0 and parse_budget("N/4") == 0.25 and parse_budget("1/8") == 0.125
    assert parse_budget("0.5") == 0.5 and parse_budget("49") == 49 and isinstance(parse_budget("49"), int)
    with pytest.raises(ValueError, match="budget"):
        parse_budget("N/0")
    with pytest.raises(ValueError, match="budget"):
        parse_budget("lots")


def test_set_backend_mid_stream():
    dense = tiny_sam()
    ev_mixed, ev_ref = convert(dense, 0.3, backend="ops"), convert(dense, 0.3, backend="reference")
    for t, x in enumerate(_frames("sam", t=5)):
        if t == 2:
            ev_mixed.set_backend("reference")
        if t == 4:
            ev_mixed.set_backend("ops")
        torch.testing.assert_close(ev_mixed(x), ev_ref(x), **TOL)
    assert ev_mixed.backend == "ops"
    with pytest.raises(ValueError, match="backend"):
        ev_mixed.set_backend("cuda-magic")
    assert ev_mixed.backend == "ops"
