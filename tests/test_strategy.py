"""Attention strategy of the global blocks: patched state ("eventful") or fused dense attention ("dense"), and the
cost model that picks one per device and shape ("auto").

Anchors: r = N equals the dense block under either strategy and across switches; ops equal reference; switching
frees / rebuilds the attention state; op counts follow the strategy that ran; the cost model's choice follows the
rates (pinned here, so the tests do not depend on this machine's speed).
"""
from __future__ import annotations

import math

import pytest
import torch

from eventful_kernels.models import convert
from eventful_kernels.nn import EventfulBlock, TopFraction, TopK
from eventful_kernels.nn import strategy as S

from nn_utils import BACKENDS, random_video
from test_blocks import FP32, make, n_tokens
from tiny_timm import tiny_sam, tiny_vit, video

# A GPU-like device: fast fused attention, memory traffic dominates; a CPU-like one: attention kernels slow.
GPU_LIKE = S.DeviceRates(matmul=300e12, attention=400e12, attention_masked=150e12, bandwidth=4e12, launch=5e-6,
                         line=32)
CPU_LIKE = S.DeviceRates(matmul=150e9, attention=100e9, attention_masked=80e9, bandwidth=13e9, launch=2e-6, line=64)


@pytest.fixture
def pinned():
    """Pin CPU rates for the test, unpin afterwards."""
    def pin(rates):
        S.set_rates("cpu", torch.float32, rates)
    yield pin
    S.set_rates("cpu", torch.float32, None)


def _shape(n, batch=1, bias=False, dtype=torch.float16, device="cuda"):
    return S.AttentionShape(batch, 12, n, 64, dtype, torch.device(device), bias)


def test_cost_model_terms():
    shape = _shape(4096, bias=True)
    costs = [S.eventful_cost(shape, k, GPU_LIKE) for k in (0, 256, 1024, 4096)]
    assert costs == sorted(costs) and costs[0] > 0  # more changed tokens cost more; k = 0 still pays the softmax
    softmax = 2 * 12 * 4096 * 4096 * 2 / GPU_LIKE.bandwidth
    assert costs[0] == pytest.approx(softmax + 4 * GPU_LIKE.launch)
    dense = S.dense_cost(shape, GPU_LIKE)
    assert dense == pytest.approx(4 * 12 * 4096**2 * 64 / 150e12 + 2 * 12 * 4096**2 * 2 / 4e12 + 10e-6)
    # on a GPU-like device dense attention wins at N = 4096 even at a small budget; on a CPU-like one it loses
    assert S.choose(shape, 256, GPU_LIKE) == "dense"
    cpu = _shape(4096, bias=True, dtype=torch.float32, device="cpu")
    assert S.choose(cpu, 1024, CPU_LIKE) == "eventful"
    # the crossover moves with the budget: at K = N the patched state costs more than recomputing
    assert S.choose(cpu, 4096, CPU_LIKE) == "dense"


def test_measured_rates_are_sane():
    rates = S.measure_rates("cpu", torch.float32, state_bytes=1 << 20, head_dim=32)
    for name in ("matmul", "attention", "attention_masked", "bandwidth"):
        value = getattr(rates, name)
        assert math.isfinite(value) and 1e6 < value < 1e15, (name, value)
    assert 0 < rates.launch < 1e-2 and rates.line == 64
    assert S.measure_rates("cpu", torch.float32, state_bytes=1 << 20, head_dim=32) is rates  # cached


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["vit", "sam_global_relpos", "sam_window_relpos_padded"])
def test_dense_strategy_full_budget_equals_dense(cfg, backend):
    blk, shape = make(cfg)
    eb = EventfulBlock(blk, TopK(n_tokens(shape)), backend=backend, strategy="dense")
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(eb(x), blk(x), **FP32, msg=f"frame {t}")
        assert eb.attention_mode == "dense" and eb.eventful_attention.flushing  # no N x N state is kept


@pytest.mark.parametrize("cfg", ["vit", "sam_global_relpos", "sam_window_relpos_padded"])
def test_switching_strategy_mid_stream(cfg):
    """Switch eventful -> dense -> eventful: r = N stays equal to dense; at r < N ops equal reference; the state
    is freed in dense mode and rebuilt (re-flushed from the buffered q/k/v) when eventful comes back."""
    blk, shape = make(cfg)
    full = EventfulBlock(blk, TopK(n_tokens(shape)), strategy="eventful")
    ops = EventfulBlock(blk, TopFraction(0.3), backend="ops", strategy="eventful")
    ref = EventfulBlock(blk, TopFraction(0.3), backend="reference", strategy="eventful")
    for t, x in enumerate(random_video(shape, frames=9)):
        if t in (3, 6):
            for eb in (full, ops, ref):
                eb.strategy = "dense" if t == 3 else "eventful"
        torch.testing.assert_close(full(x), blk(x), **FP32, msg=f"frame {t}")
        torch.testing.assert_close(ops(x), ref(x), **FP32, msg=f"frame {t}")
        assert ops.attention_mode == ("dense" if 3 <= t < 6 else "eventful")
        assert ops.eventful_attention.flushing == (3 <= t < 6)


def test_macs_follow_the_strategy():
    blk, shape = make("vit")
    b, n = shape[0], n_tokens(shape)
    d_head = 64 // 4
    eb = EventfulBlock(blk, TopK(7), strategy="dense")
    for x in random_video(shape, frames=3):
        eb(x)
    assert eb.attention.last_macs == 2 * b * 4 * n * n * d_head  # QK^T + A·V over all tokens
    eb.strategy = "eventful"
    eb(random_video(shape, frames=1)[0])  # re-flush of the attention state: dense-sized
    eb(random_video(shape, frames=1)[0])
    assert eb.attention.last_macs == b * 4 * (7 * n + n * 7) * d_head + 2 * b * 4 * n * 7 * d_head


# Extreme rates that decide the tiny test shapes one way or the other.
SLOW_ATTENTION = S.DeviceRates(matmul=1e15, attention=1e6, attention_masked=1e6, bandwidth=1e15, launch=0.0, line=64)
SLOW_MEMORY = S.DeviceRates(matmul=1e6, attention=1e15, attention_masked=1e15, bandwidth=1e6, launch=0.0, line=64)


def test_auto_follows_the_cost_model(pinned):
    """With pinned rates the choice is deterministic and follows the model; re-pinning changes the next frame's
    mode (the state is rebuilt), and the outputs at r = N stay equal to dense throughout."""
    dense = tiny_sam()
    pinned(SLOW_ATTENTION)
    ev = convert(dense, 1.0, strategy="auto")
    frames = video(6, 64)
    for t, x in enumerate(frames):
        if t == 3:
            pinned(SLOW_MEMORY)
        torch.testing.assert_close(ev(x), dense(x), rtol=1e-4, atol=1e-4)
        assert ev.attention_modes() == ["eventful" if t < 3 else "dense"], t
    shape = ev.eventful_blocks()[1]._shape
    assert S.choose(shape, 64, SLOW_MEMORY) == "dense" and S.choose(shape, 64, SLOW_ATTENTION) == "eventful"
    assert S.choose(shape, 64, CPU_LIKE) in S.MODES


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_full_budget_model_equals_dense_under_either_strategy(kind):
    make_model, size = (tiny_vit, 32) if kind == "vit" else (tiny_sam, 64)
    dense = make_model()
    for strategy in ("eventful", "dense"):
        ev = convert(dense, 1.0, strategy=strategy)
        for x in video(4, size, batch=2):
            torch.testing.assert_close(ev(x), dense(x), rtol=1e-4, atol=1e-4)


def test_strategy_argument_checked():
    blk, _ = make("vit")
    with pytest.raises(ValueError, match="'strategy'"):
        EventfulBlock(blk, strategy="sparse")
    ev = convert(tiny_vit(), 0.5)
    with pytest.raises(ValueError, match="'strategy'"):
        ev.set_strategy("fast")
