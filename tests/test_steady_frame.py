"""The steady-state frame is GPU-shaped: no host synchronisation, no data-dependent shape, and it compiles as one
graph (``torch.compile(fullgraph=True)``) that later frames reuse without recompiling.

Proved on CPU: :mod:`no_sync` fails on every op that would read a value back from a GPU, and ``torch.compile`` with
``fullgraph=True`` fails on any graph break (``.item()``, ``.tolist()``, data-dependent shapes, host-side checks).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from eventful_kernels.models import convert
from eventful_kernels.nn import Threshold, TopFraction, TopK

from no_sync import SyncError, no_sync
from tiny_timm import tiny_sam, tiny_vit, video

TOL = dict(rtol=1e-4, atol=1e-5)
MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}


def _policies():
    return {
        "fraction": TopFraction(0.4),
        "topk": TopK(5),
        "threshold": Threshold(0.3, capacity=12, trim=False),
    }


@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("strategy", ["eventful", "dense"])
@pytest.mark.parametrize("policy", ["fraction", "topk", "threshold"])
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_steady_frames_never_synchronise(kind, policy, strategy, backend):
    make, size = MODELS[kind]
    ev = convert(make(), _policies()[policy], backend=backend, strategy=strategy)
    frames = video(5, size, batch=2)
    ev(frames[0])  # flush (may synchronise)
    ev(frames[1])
    with no_sync() as mode:
        for x in frames[2:]:
            ev(x)
    ran = " ".join(mode.calls)
    if backend == "ops":
        assert "eventful.token_gate" in ran and "eventful.scatter_rows_." in ran
        if strategy == "eventful":
            assert "eventful.qk_update_." in ran and "eventful.av_delta_update_." in ran
        else:
            assert "eventful.qk_update_." not in ran and "scaled_dot_product" in ran
    assert ev.attention_modes() == [strategy] * len(ev.attention_modes())


PUBLISHED_OPTIONS = dict(kv_pool=2, av_dtype=torch.float16)  # pooled K/V, 16-bit A·V (docs/nn-api.md)


@pytest.mark.parametrize("gate_placement", ["after_norm", "before_norm"])
@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("strategy", ["eventful", "dense"])
@pytest.mark.parametrize("policy", ["fraction", "threshold"])
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_steady_frames_with_published_options_never_synchronise(kind, policy, strategy, backend, gate_placement):
    """The pooled changed-token index is built on the device, the 16-bit A·V runs in place: no sync either, and the
    frames equal the reference backend's."""
    make, size = MODELS[kind]
    opts = dict(PUBLISHED_OPTIONS, strategy=strategy, gate_placement=gate_placement)
    ev = convert(make(), _policies()[policy], backend=backend, **opts)
    ref = convert(make(), _policies()[policy], backend="reference", **opts)
    frames = video(5, size, batch=2)
    for x in frames[:2]:
        ev(x)
        ref(x)
    with no_sync() as mode:
        outs = [ev(x).clone() for x in frames[2:]]
    for t, (x, y) in enumerate(zip(frames[2:], outs)):
        torch.testing.assert_close(y, ref(x), **TOL, msg=f"frame {t + 2}")
    ran = " ".join(mode.calls)
    if backend == "ops" and strategy == "eventful":
        assert "eventful.qk_update_." in ran and "eventful.av_delta_update_." in ran
    assert ev.attention_modes() == [strategy] * len(ev.attention_modes())


def test_no_sync_mode_catches_a_synchronising_frame():
    """The check can fail: a threshold policy that trims reads the counts back, and a checked op reads its flag."""
    ev = convert(tiny_vit(), Threshold(0.3, trim=True))
    frames = video(3, 32)
    ev(frames[0])
    with pytest.raises(SyncError, match="_local_scalar_dense"):
        with no_sync():
            ev(frames[1])
    with pytest.raises(SyncError, match="check_index=True"):
        with no_sync():
            torch.ops.eventful.gather_rows(torch.randn(1, 4, 2), torch.tensor([[1, 2]]))
    with pytest.raises(SyncError, match="tolist"):
        with no_sync():
            torch.tensor([1]).tolist()


@pytest.mark.parametrize("kind,compiler", [("vit", "aot_eager"), ("sam", "aot_eager")])
def test_steady_frame_compiles_as_one_graph(kind, compiler):
    make, size = MODELS[kind]
    dense = make()
    compiled = convert(dense, 0.4, strategy="eventful")
    eager = convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, backend=counter, dynamic=False)
    frames = video(7, size, batch=2)
    for t, x in enumerate(frames):
        if t == 5:  # a new budget: new shapes, one more graph, then reused again
            compiled.set_budget(0.25)
            eager.set_budget(0.25)
        torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
        expected = 0 if t == 0 else (1 if t < 5 else 2)
        assert counter.frame_count == expected, f"frame {t}: {counter.frame_count} compilations"


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_steady_frame_with_published_options_compiles_as_one_graph(kind):
    make, size = MODELS[kind]
    dense = make()
    compiled = convert(dense, 0.4, strategy="eventful", **PUBLISHED_OPTIONS)
    eager = convert(dense, 0.4, strategy="eventful", **PUBLISHED_OPTIONS)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, backend=counter, dynamic=False)
    for t, x in enumerate(video(5, size, batch=2)):
        torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
        assert counter.frame_count == (0 if t == 0 else 1), f"frame {t}"


def test_steady_frame_lowers_with_inductor():
    """Inductor lowers the graph with the in-place custom ops (one compilation: ~1-2 min on 2 CPU cores)."""
    dense = tiny_vit()
    compiled = convert(dense, 0.4, strategy="eventful")
    eager = convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, backend=counter, dynamic=False)
    for x in video(4, 32, batch=2):
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
    assert counter.frame_count == 1


def test_compiled_dense_strategy_and_threshold_frame():
    """Dense attention in the global blocks and a fixed-capacity threshold policy compile as one graph too."""
    dense = tiny_sam()
    policy = Threshold(0.3, capacity=20, trim=False)
    compiled = convert(dense, policy, strategy="dense")
    eager = convert(dense, policy, strategy="dense")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, backend=counter, dynamic=False)
    for x in video(4, 64, batch=2):
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
    assert counter.frame_count == 1
