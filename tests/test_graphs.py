"""Captured steady-state frames (``cuda_graphs=True``): graph bookkeeping on CPU with an emulated capture, the real
CUDA capture where a GPU is present. Either way the outputs must equal the eager model's frame by frame."""
from __future__ import annotations

import pytest
import torch

from eventful_kernels.models import convert
from eventful_kernels.models.graphs import FrameGraphs
from eventful_kernels.nn import Threshold

from tiny_timm import tiny_sam, tiny_vit, video

TOL = dict(rtol=1e-5, atol=1e-6)


class EmulatedCapture:
    """CPU stand-in for CUDA capture: capturing runs nothing; a replay runs the step on the static input and writes
    its result into the static output, as a graph replay would."""

    device_type = "cpu"

    @staticmethod
    def warm(step, frames):
        return step(frames)

    @staticmethod
    def capture(step, static_in):
        # the dtype a real capture's output has: the models here end in a linear, autocast's dtype under autocast
        static_out = torch.empty(0, dtype=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                 else static_in.dtype)

        def replay():
            out = step(static_in)
            static_out.resize_(out.shape).copy_(out)

        return replay, static_out


def _emulated(ev):
    ev.graphs = FrameGraphs(ev._screened, capture=EmulatedCapture)
    ev.cuda_graphs = True
    return ev


@pytest.mark.parametrize("make,size", [(tiny_vit, 32), (tiny_sam, 64)])
def test_graph_per_budget_and_mode(make, size):
    dense = make()
    graphed = _emulated(convert(dense, 0.4, strategy="eventful"))
    eager = convert(dense, 0.4, strategy="eventful")
    frames = video(12, size, batch=2)
    captures = []
    for t, x in enumerate(frames):
        if t == 4:  # a second budget: a second graph
            for m in (graphed, eager):
                m.set_budget(0.25)
        if t == 6:  # back to the first: its graph is reused
            for m in (graphed, eager):
                m.set_budget(0.4)
        if t == 8:  # another attention mode frees the attention state: every graph is dropped
            for m in (graphed, eager):
                m.set_strategy("dense")
        if t == 10:  # a new video
            for m in (graphed, eager):
                m.reset()
        torch.testing.assert_close(graphed(x), eager(x), **TOL, msg=f"frame {t}")
        captures.append((graphed.graphs.captures, len(graphed.graphs)))
    # frame 0 flush; 1 captures; 2-3 replay; 4 captures (new budget); 6 reuses; 8 clears and captures (dense);
    # 10 flush clears; 11 captures
    assert [c for c, _ in captures] == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4]
    assert [n for _, n in captures] == [0, 1, 1, 1, 2, 2, 2, 2, 1, 1, 0, 1]


def test_replaced_weight_gets_a_new_graph():
    """A graph reads weights at fixed addresses: a replaced weight (a new Parameter) must key a new graph, while
    new values written in place keep the graph."""
    dense = tiny_vit()
    graphed = _emulated(convert(dense, 0.4, strategy="eventful"))
    eager = convert(dense, 0.4, strategy="eventful")
    frames = video(6, 32)
    fc = dense.blocks[0].mlp.fc1
    for t, x in enumerate(frames):
        if t == 3:
            with torch.no_grad():
                fc.weight.mul_(0.5)  # in place: the same graph
        if t == 4:
            fc.weight = torch.nn.Parameter(fc.weight.detach() * 2)  # replaced: a new graph
        torch.testing.assert_close(graphed(x), eager(x), **TOL, msg=f"frame {t}")
        assert graphed.graphs.captures == (1 if t < 4 else 2) if t else True


def test_capture_failure_falls_back_to_eager():
    class Failing(EmulatedCapture):
        @staticmethod
        def capture(step, static_in):
            raise RuntimeError("operation not permitted when stream is capturing")

    dense = tiny_vit()
    graphed = convert(dense, 0.5, strategy="eventful")
    graphed.graphs = FrameGraphs(graphed._screened, capture=Failing)
    graphed.cuda_graphs = True
    eager = convert(dense, 0.5, strategy="eventful")
    frames = video(4, 32)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        for x in frames:
            torch.testing.assert_close(graphed(x), eager(x), **TOL)
    assert len(graphed.graphs) == 0 and len(graphed.graphs.failures) == 1


def test_frame_graphs_bounded():
    graphs = FrameGraphs(lambda x: x * 2, max_graphs=2, capture=EmulatedCapture)
    for k in range(4):
        assert torch.equal(graphs(torch.ones(2), k), torch.full((2,), 2.0))
    assert len(graphs) == 2 and graphs.captures == 4
    with pytest.raises(ValueError, match="max_graphs"):
        FrameGraphs(lambda x: x, max_graphs=0)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["eventful", "dense"])
@pytest.mark.parametrize("policy", [0.4, Threshold(0.3, capacity=12)])
@pytest.mark.parametrize("make,size", [(tiny_vit, 32), (tiny_sam, 64)])
def test_cuda_graph_equals_eager(make, size, policy, strategy):
    dense = make().cuda()
    graphed = convert(dense, policy, strategy=strategy)  # graphs on by default for CUDA inputs
    eager = convert(dense, policy, strategy=strategy, cuda_graphs=False)
    for t, x in enumerate(video(6, size, batch=2).cuda()):
        torch.testing.assert_close(graphed(x), eager(x), **TOL, msg=f"frame {t}")
    assert graphed.graphs.captures == 1 and not graphed.graphs.failures


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["eventful", "dense"])
@pytest.mark.parametrize("policy", [0.4, Threshold(0.3, capacity=12)])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("make,size", [(tiny_vit, 32), (tiny_sam, 64)])
def test_cuda_steady_frames_do_not_synchronise(make, size, policy, strategy, graphs):
    """torch's sync debug mode raises on any synchronising CUDA call inside a steady-state frame (eager frames, and
    replays of the captured one)."""
    ev = convert(make().cuda(), policy, strategy=strategy, cuda_graphs=graphs)
    frames = video(5, size, batch=2).cuda()
    ev(frames[0])
    ev(frames[1])  # Triton autotuning (which synchronises) happens on the first frame of each shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in frames[2:]:
            ev(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_capture_under_autocast_records_its_own_casts():
    """Under torch.autocast a capture runs with the autocast dtype kept and autocast's cast cache off (a cached
    low-precision weight copy dies when the outermost autocast region exits; a graph must not read it), and the
    captured frames equal the eager model's."""
    seen = []

    class Recording(EmulatedCapture):
        @staticmethod
        def capture(step, static_in):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         torch.is_autocast_cache_enabled()))
            return EmulatedCapture.capture(step, static_in)

    dense = tiny_vit()
    graphed, eager = convert(dense, 0.4, strategy="eventful"), convert(dense, 0.4, strategy="eventful")
    graphed.graphs = FrameGraphs(graphed._screened, capture=Recording)
    graphed.cuda_graphs = True
    for t, x in enumerate(video(5, 32, batch=2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(graphed(x), eager(x), rtol=0, atol=0, msg=f"frame {t}")
    assert seen == [(True, torch.bfloat16, False)] and graphed.graphs.captures == 1
    assert torch.is_autocast_cache_enabled()  # restored
