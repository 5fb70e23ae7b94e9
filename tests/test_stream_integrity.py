"""Nothing silently corrupts a stream: non-finite frames, non-finite values produced inside the model, a frame
that raises half-way, bad frames, and drift over long videos (periodic refresh).

r = N anchors: the eventful model then equals the dense model, so "the stream recovered" means "equals dense again".
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from eventful_kernels.models import convert

from tiny_timm import tiny_sam, tiny_vit, video

TOL = dict(rtol=1e-5, atol=1e-5)
MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}


def _bad(frame: torch.Tensor, stream: int, value: float) -> torch.Tensor:
    x = frame.clone()
    x[stream, :, 4:12, 4:12] = value
    return x


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_nonfinite_frame_costs_that_frame_only_full_budget(kind):
    make, size = MODELS[kind]
    dense = make()
    ev = convert(dense, 1.0)
    frames = video(8, size, batch=2)
    for t, x in enumerate(frames):
        bad = {3: (0, float("nan")), 5: (1, float("inf"))}.get(t)
        if bad:
            x = _bad(x, *bad)
        y = ev(x)
        want = dense(x)
        if bad:
            stream = bad[0]
            assert torch.isnan(y[stream]).all()  # that frame of that stream is lost ...
            torch.testing.assert_close(y[1 - stream], want[1 - stream], **TOL)  # ... the other is not
        else:
            torch.testing.assert_close(y, want, **TOL, msg=f"frame {t}")


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_nonfinite_frame_acts_as_a_repeat_of_the_last_clean_frame(kind):
    """At r < N the screened stream continues exactly as if the bad frame had been its last clean frame again."""
    make, size = MODELS[kind]
    dense = make()
    ev, twin = convert(dense, 0.4), convert(dense, 0.4)
    frames = video(7, size, batch=2)
    for t, x in enumerate(frames):
        if t == 3:
            y = ev(_bad(x, 0, float("-inf")))
            repeat = x.clone()
            repeat[0] = frames[2][0]
            y_twin = twin(repeat)
            assert torch.isnan(y[0]).all()
            torch.testing.assert_close(y[1], y_twin[1], rtol=0, atol=0)
            continue
        torch.testing.assert_close(ev(x), twin(x), rtol=0, atol=0, msg=f"frame {t}")
        assert torch.isfinite(ev.dense(x)).all()


def test_nonfinite_flush_frame_flushes_again():
    dense = tiny_vit()
    ev = convert(dense, 0.5)
    frames = video(3, 32, batch=2)
    ev(_bad(frames[0], 1, float("nan")))
    assert ev.flushing  # nothing was kept
    torch.testing.assert_close(ev(frames[1]), dense(frames[1]), **TOL)  # a clean flush is dense
    assert not ev.flushing


@pytest.mark.parametrize("budget", [1.0, 0.4])
def test_nonfinite_output_of_a_clean_frame_refreshes_the_streams(budget):
    """Overflow inside the model on a clean frame poisons the token state: the next frame re-flushes every stream
    (a refresh: dense, equal to a fresh model's flush) and the streams continue like freshly flushed ones."""
    dense = tiny_vit()
    ev = convert(dense, budget)
    weight = dense.blocks[1].mlp.fc2.weight
    frames = video(7, 32, batch=2)
    for t in range(3):
        ev(frames[t])
    with torch.no_grad():
        saved = weight.clone()
        weight[0, 0] = float("inf")  # a stand-in for an fp16 overflow, for one frame
    y = ev(frames[3])
    if budget == 1.0:  # at r < N the poisoned rows may miss the class token this frame: they are in the state
        assert not torch.isfinite(y).all()
    with torch.no_grad():
        weight.copy_(saved)
    fresh = convert(dense, budget)  # its first frame is a flush: dense
    for t in range(4, 7):
        torch.testing.assert_close(ev(frames[t]), fresh(frames[t]), **TOL, msg=f"frame {t}")
        assert ev.frames_since_flush == t - 4


class _Boom(torch.nn.Module):
    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("simulated interrupt")
        return self.inner(x)


@pytest.mark.parametrize("where", ["norm1", "norm2", "mlp"])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_frame_that_raises_marks_a_reflush(block, where):
    """An exception inside any block on a steady-state frame: the error says the streams re-flush; the next frame
    is a flush from that frame (equal to a fresh model's first frame), later frames match the fresh model."""
    dense = tiny_sam()  # blocks 0 and 2 windowed, block 1 global with rel-pos
    ev = convert(dense, 0.4)
    frames = video(7, 64, batch=2)
    for t in range(3):
        ev(frames[t])
    blk = dense.blocks[block]
    original = getattr(blk, where)
    setattr(blk, where, _Boom(original, at=1))
    with pytest.warns(RuntimeWarning, match="re-flushes on the next frame"):
        with pytest.raises(KeyboardInterrupt) as info:
            ev(frames[3])
    assert any("re-flushes" in n for n in getattr(info.value, "__notes__", ["re-flushes"]))
    setattr(blk, where, original)
    fresh = convert(dense, 0.4)
    for t in range(4, 7):
        torch.testing.assert_close(ev(frames[t]), fresh(frames[t]), **TOL, msg=f"frame {t}")


def test_bad_frames_are_rejected_before_the_state_is_touched():
    dense = tiny_vit()
    ev, twin = convert(dense, 0.5), convert(dense, 0.5)
    frames = video(5, 32, batch=2)
    ev(frames[0])
    twin(frames[0])
    bad = [frames[1][:1], frames[1][:0], frames[1].double(), frames[1][:, :, :16], frames[1].to(torch.uint8),
           frames[1][:, :2], "frame"]
    for x in bad:
        with pytest.raises(ValueError, match="frames"):
            ev(x)
    for x in frames[1:]:
        torch.testing.assert_close(ev(x), twin(x), rtol=0, atol=0)
    ev.reset()
    with pytest.raises(ValueError, match="batch size 0"):
        ev(frames[0][:0])


@pytest.mark.usefixtures("one_thread")
def test_periodic_refresh_bounds_drift():
    """r = N over 10,000 frames of a tiny model: with refresh_every=500 the deviation from dense stays <= 1e-5."""
    dense = tiny_vit()
    ev = convert(dense, 1.0, strategy="eventful", refresh_every=500)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 2, 3, 32, 32, generator=g)
    worst, flushes = 0.0, 0
    for t in range(10_000):
        x = base[t % 4] + 0.05 * torch.randn(2, 3, 32, 32, generator=g)
        y = ev(x)
        flushes += ev.frames_since_flush == 0
        if t % 250 == 249:
            with torch.no_grad():
                want = dense(x)
            worst = max(worst, float((y - want).norm() / want.norm()))  # dense(x) under no_grad below
    assert flushes == 10_000 // 500  # the first flush and one refresh every 500 frames
    assert worst <= 1e-5, worst
    with pytest.raises(ValueError, match="refresh_every"):
        convert(dense, 1.0, refresh_every=0)


def test_inference_mode_frames_mix_with_normal_ones():
    """A flush under torch.inference_mode() and later frames outside it (and back): the state is never made of
    inference tensors, outputs are normal tensors, results equal a twin that never used inference mode."""
    dense = tiny_vit()
    ev, twin = convert(dense, 0.5), convert(dense, 0.5)
    frames = video(5, 32, batch=2)
    for t, x in enumerate(frames):
        if t % 2 == 0:
            with torch.inference_mode():
                y = ev(x.clone())
        else:
            y = ev(x)
        assert not y.is_inference()
        torch.testing.assert_close(y, twin(x), rtol=0, atol=0, msg=f"frame {t}")



@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_model_built_under_inference_mode(kind):
    """Weights that are inference tensors (a model created and converted under torch.inference_mode(), as serving
    code often does) keep no version counter: the packed weights must still be made, used, and re-made when such a
    weight is edited in place; the streams equal a twin built normally and move through stream_state."""
    make, size = MODELS[kind]
    twin_dense = make()
    twin = convert(twin_dense, 0.5)
    frames = video(6, size, batch=2)
    with torch.inference_mode():
        dense = make()
        ev = convert(dense, 0.5)
    assert next(dense.parameters()).is_inference()
    for t, x in enumerate(frames[:3]):
        with torch.inference_mode():
            y = ev(x)
        torch.testing.assert_close(y, twin(x), rtol=0, atol=0, msg=f"frame {t}")
    with torch.inference_mode():  # state copied under inference mode: the copies must still be updatable
        other = convert(dense, 0.5)
        other.load_stream_state(ev.stream_state())
        copies = [other, copy.deepcopy(ev), pickle.loads(pickle.dumps(ev)), copy.deepcopy(convert(dense, 0.5))]
        y = ev(frames[3])
    torch.testing.assert_close(y, twin(frames[3]), rtol=0, atol=0)
    for i, c in enumerate(copies[:3]):
        torch.testing.assert_close(c(frames[3]), y, rtol=0, atol=0, msg=f"copy {i}")
    fresh = convert(twin_dense, 0.5)
    for t, x in enumerate(frames[:3]):  # a copy made before its first frame starts streams of its own
        torch.testing.assert_close(copies[3](x), fresh(x), rtol=0, atol=0, msg=f"fresh copy, frame {t}")
    with torch.inference_mode():
        dense.blocks[0].mlp.fc1.weight.mul_(1.5)  # no version bump: seen by the fingerprint alone
    with torch.no_grad():
        twin_dense.blocks[0].mlp.fc1.weight.mul_(1.5)
    for t, x in enumerate(frames[4:], 4):
        with torch.inference_mode():
            y = ev(x)
        torch.testing.assert_close(y, twin(x), rtol=0, atol=0, msg=f"frame {t}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_autocast_streams(kind):
    """Under torch.autocast the streams compute in the autocast dtype: r = N follows the dense model under the same
    autocast (bf16 rounding: relative L2 < 2e-2), and a frame under another autocast dtype, or none, is rejected
    before anything is touched (the state holds what the first precision computed), until reset()."""
    make, size = MODELS[kind]
    dense = make()
    ev, twin, full = convert(dense, 0.5), convert(dense, 0.5), convert(dense, 1.0)
    frames = video(6, size, batch=2)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    for t, x in enumerate(frames[:3]):
        with bf16:
            y, want = ev(x), twin(x)
            assert _rel(full(x), dense(x)) < 2e-2
        torch.testing.assert_close(y, want, rtol=0, atol=0, msg=f"frame {t}")
    with pytest.raises(ValueError, match=r"under autocast\(float16\) but the streams started under autocast\(bfloat16"):
        with torch.autocast("cpu", dtype=torch.float16):
            ev(frames[3])
    with pytest.raises(ValueError, match=r"run outside autocast but the streams started under autocast\(bfloat16"):
        ev(frames[3])
    state = ev.stream_state()
    assert state["frames"]["autocast"] == "bfloat16"
    for t, x in enumerate(frames[3:], 3):  # the rejected frames changed nothing
        with bf16:
            y, want = ev(x), twin(x)
        torch.testing.assert_close(y, want, rtol=0, atol=0, msg=f"frame {t}")
    other = convert(dense, 0.5)
    other.load_stream_state(state)
    with pytest.raises(ValueError, match="outside autocast"):
        other(frames[3])
    ev.reset()
    ev(frames[0])  # a new stream may start outside autocast
    assert ev.stream_state()["frames"]["autocast"] is None


def test_stream_state_without_autocast_entry_loads():
    """A stream state saved before the autocast dtype was recorded (no 'autocast' key) loads as 'outside autocast';
    a bad value is refused by name."""
    dense = tiny_vit()
    ev, twin = convert(dense, 0.5), convert(dense, 0.5)
    frames = video(4, 32, batch=2)
    for x in frames[:2]:
        ev(x), twin(x)
    state = ev.stream_state()
    del state["frames"]["autocast"]
    other = convert(dense, 0.5)
    other.load_stream_state(state)
    torch.testing.assert_close(other(frames[2]), twin(frames[2]), rtol=0, atol=0)
    state["frames"]["autocast"] = "int8"
    with pytest.raises(ValueError, match="autocast must be None or name a floating dtype"):
        convert(dense, 0.5).load_stream_state(state)
