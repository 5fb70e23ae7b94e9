"""``torch.compile(model)`` on a converted model: the steady-state frame is one graph (the flush and other eager
frames pass through an empty one), later frames reuse it without recompiling, and the output equals eager.

The packed oneDNN linears stay on: the eager frames (the flush, refreshes) use them, and inside the compiled graph
they are the custom op ``eventful_nn.packed_linear`` (or plain ``F.linear`` with ``PackedLinear.in_graph = False``).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from eventful_kernels.models import convert
from eventful_kernels.nn.linear import PackedLinear, _LIVE, packing_enabled

from tiny_timm import tiny_sam, tiny_vit, video

TOL = dict(rtol=1e-4, atol=1e-5)
MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}


class Recompiles:
    """Counts dynamo's recompilations (a cache miss on a frame compiled before) through its own counters."""

    def __enter__(self):
        torch._dynamo.utils.counters.clear()
        return self

    @property
    def count(self) -> int:
        return sum(torch._dynamo.utils.counters["recompiles"].values())

    def __exit__(self, *exc):
        return False


def _packed_in_use(model) -> bool:
    linears = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return any(p._packed is not None for p in list(_LIVE) if id(p.linear) in linears)


def _graph_ops(gm) -> str:
    return " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_torch_compile_steady_frame_is_one_graph(kind):
    make, size = MODELS[kind]
    dense = make()
    ev, eager = convert(dense, 0.4, strategy="eventful"), convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(ev, backend=counter, fullgraph=True, dynamic=False)
    with Recompiles() as recompiles:
        for t, x in enumerate(video(7, size, batch=2)):
            if t == 5:  # a new budget: new shapes, one more graph, reused again after
                ev.set_budget(0.25)
                eager.set_budget(0.25)
            torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
            want = 1 if t == 0 else (2 if t < 5 else 3)  # flush pass-through, steady graph, new-budget graph
            assert counter.frame_count == want, f"frame {t}: {counter.frame_count} graphs"
            if t == 4:
                assert recompiles.count == 0
    flush_graph, steady = counter.graphs[0], counter.graphs[1]
    assert "eventful" not in _graph_ops(flush_graph)
    ops = _graph_ops(steady)
    assert "eventful.token_gate" in ops and "eventful.scatter_rows_" in ops and "eventful.qk_update_" in ops
    assert "logical_or" in ops  # the frame screen (its non-finite flag) is part of the graph
    assert "eventful_nn.packed_linear" in ops  # the gated linears keep their packed weights in the graph
    assert ev.frames_since_flush == 6 and ev.macs_last_frame() == eager.macs_last_frame()


def test_torch_compile_with_inductor_and_packed_linears():
    """Inductor lowers the steady frame (~1-2 min on 2 CPU cores); the eager frames keep the packed linears."""
    assert packing_enabled()
    dense = tiny_vit()
    ev, eager = convert(dense, 0.4, strategy="eventful"), convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    compiled = torch.compile(ev, backend=counter, fullgraph=True)
    frames = video(5, 32, batch=2)
    with Recompiles() as recompiles:
        for t, x in enumerate(frames):
            torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
            if t == 0:
                assert _packed_in_use(ev.model)  # the flush ran eagerly on the packed weights
        assert counter.frame_count == 2 and recompiles.count == 0


def test_graph_linears_plain_when_asked(monkeypatch):
    monkeypatch.setattr(PackedLinear, "in_graph", False)
    dense = tiny_vit()
    ev, eager = convert(dense, 0.4, strategy="eventful"), convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(ev, backend=counter, fullgraph=True, dynamic=False)
    for t, x in enumerate(video(4, 32, batch=2)):
        torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
    ops = _graph_ops(counter.graphs[1])
    assert "packed_linear" not in ops and "function linear>" in ops and counter.frame_count == 2


def test_eager_frames_under_torch_compile_refresh_and_failure():
    """Refresh frames run eagerly without recompiling; a frame whose steady step raises marks the streams to
    re-flush, as in eager mode."""
    dense = tiny_vit()
    ev = convert(dense, 0.4, strategy="eventful", refresh_every=2)
    eager = convert(dense, 0.4, strategy="eventful", refresh_every=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(ev, backend=counter, fullgraph=True, dynamic=False)
    for t, x in enumerate(video(7, 32, batch=2)):
        torch.testing.assert_close(compiled(x), eager(x), **TOL, msg=f"frame {t}")
        assert ev.frames_since_flush == eager.frames_since_flush
    assert counter.frame_count == 2

    class Boom(RuntimeError):
        pass

    @torch.compiler.disable
    def explode(frames):
        raise Boom("in the step")

    ev._steady_step = explode  # a steady step that raises half-way
    with pytest.warns(RuntimeWarning, match="re-flushes"), pytest.raises(Boom):
        compiled(video(1, 32, batch=2, seed=5)[0])
    del ev._steady_step
    assert ev.flushing and not ev._packed_group.active
