"""Weights and stream state: weight changes are never used stale, copies (deepcopy / pickle / torch.save) carry the
streams and no caches.

"Bit-identical" is rtol=0, atol=0 against a twin that ran the same frames and was never copied, saved or loaded.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from eventful_kernels.models import EventfulModel, convert
from eventful_kernels.models.graphs import FrameGraphs
from eventful_kernels.nn import EventfulModule, Threshold, TopK
from eventful_kernels.nn.linear import packing_enabled, sampled_entries

from tiny_timm import tiny_sam, tiny_vit, video

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = dict(rtol=0, atol=0)
TOL = dict(rtol=1e-5, atol=1e-5)
MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}
BUDGETS = {
    "full": (1.0, "eventful"),
    "top": (0.4, "eventful"),
    "topk-dense": (TopK(5), "dense"),
    "threshold": (Threshold(0.3, capacity=12), "eventful"),
}


def _convert(dense, name):
    budget, strategy = BUDGETS[name]
    return convert(dense, copy.deepcopy(budget), strategy=strategy)


def _state_tensors(ev: EventfulModel):
    out = {}
    for name, m in ev.model.named_modules():
        if isinstance(m, EventfulModule):
            for attr in m.state_attrs:
                value = getattr(m, attr)
                if isinstance(value, torch.Tensor):
                    out[f"{name}.{attr}"] = value
    return out


def _bad(frame, stream=0):
    x = frame.clone()
    x[stream, :, 2:6, 2:6] = float("nan")
    return x


# ---------------------------------------------------------------------------------------------------------------
# copies
# ---------------------------------------------------------------------------------------------------------------
def _copy(ev, how):
    if how == "deepcopy":
        return copy.deepcopy(ev)
    if how == "pickle":
        return pickle.loads(pickle.dumps(ev))
    buf = io.BytesIO()
    torch.save(ev, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _prepare(ev, twin, frames, when):
    """Run both models up to the copy point; returns the index of the first frame after it."""
    if when == "before":
        return 0
    for m in (ev, twin):
        for x in frames[:3]:
            m(x)
    if when == "mid":
        return 3
    if when == "reset":
        for m in (ev, twin):
            m.reset()
        return 3
    if when == "refresh-pending":
        for m in (ev, twin):
            m.refresh()
        return 3
    if when == "after-refresh":
        for m in (ev, twin):
            m.refresh()
            m(frames[3])
        return 4
    if when == "after-nonfinite":  # the screen holds the last clean frame of stream 0, the flag is clear
        for m in (ev, twin):
            m(_bad(frames[3]))
        return 4
    raise AssertionError(when)


def _continue(models, frames, start):
    ev, twin, other = models
    for t in range(start, len(frames)):
        y_other = other(frames[t])  # the copy / loaded model runs first: the original must not see its frames
        y = ev(frames[t])
        want = twin(frames[t])
        torch.testing.assert_close(y_other, want, **EXACT, equal_nan=True, msg=f"frame {t}")
        torch.testing.assert_close(y, want, **EXACT, equal_nan=True, msg=f"frame {t}")


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_copy_mid_stream_continues_bit_identically(kind, budget, how):
    make, size = MODELS[kind]
    dense = make()
    ev, twin = _convert(dense, budget), _convert(dense, budget)
    frames = video(7, size, batch=2)
    start = _prepare(ev, twin, frames, "mid")
    _continue((ev, twin, _copy(ev, how)), frames, start)


@pytest.mark.parametrize("when", ["before", "reset", "refresh-pending", "after-refresh", "after-nonfinite"])
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_copy_at_any_time(kind, when):
    make, size = MODELS[kind]
    dense = make()
    ev, twin = _convert(dense, "top"), _convert(dense, "top")
    frames = video(8, size, batch=2)
    start = _prepare(ev, twin, frames, when)
    _continue((ev, twin, copy.deepcopy(ev)), frames, start)


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_copy_shares_nothing_mutable(kind):
    make, size = MODELS[kind]
    dense = make()
    ev = _convert(dense, "top")
    frames = video(4, size, batch=2)
    for x in frames[:3]:
        ev(x)
    cp = copy.deepcopy(ev)
    # its own weights, shared between its eventful blocks and its dense twin as in the original
    originals = {id(p) for p in [*ev.parameters(), *dense.parameters()]}
    storages = {p.untyped_storage().data_ptr() for p in [*ev.parameters(), *dense.parameters()]}
    assert not any(id(p) in originals or p.untyped_storage().data_ptr() in storages for p in cp.parameters())
    assert cp.dense is not dense
    for blk, dense_blk in zip(cp.eventful_blocks(), cp.dense.blocks):
        assert blk.block is dense_blk
    assert {id(p) for p in cp.dense.parameters()} == {id(p) for p in cp.model.parameters()}
    # its own state, workspace, screen, graphs, policy
    mine, theirs = _state_tensors(ev), _state_tensors(cp)
    assert mine.keys() == theirs.keys() and mine
    for name, t in theirs.items():
        assert t.untyped_storage().data_ptr() != mine[name].untyped_storage().data_ptr(), name
        assert torch.equal(t, mine[name]), name
    assert cp.workspace is not ev.workspace and len(cp.workspace) == 0
    assert all(a.workspace is cp.workspace for a in cp.modules() if hasattr(a, "workspace") and a is not cp)
    assert cp._screen is not ev._screen and cp.graphs is not ev.graphs
    assert cp.policy is not ev.policy and all(b.policy is cp.policy for b in cp.eventful_blocks())
    hooks = list(cp.eventful_blocks()[-1]._forward_hooks.values())
    assert [h.screen for h in hooks if hasattr(h, "screen")] == [cp._screen]
    # the copy's budget and weights are its own
    cp.set_budget(0.2)
    assert ev.policy.f == 0.4
    with torch.no_grad():
        cp.dense.blocks[0].mlp.fc1.weight.mul_(2)
    twin = _convert(dense, "top")
    for x in frames[:3]:
        twin(x)
    torch.testing.assert_close(ev(frames[3]), twin(frames[3]), **EXACT)
    outside = ev._outside.macs
    cp(frames[3])
    assert cp.macs_last_frame() < ev.macs_last_frame()  # at its own budget
    assert cp._outside.macs == outside > 0 and ev._outside.macs == outside  # its own counting hooks
    cp._outside.remove()  # the copy's handles remove the copy's hooks only
    ev(frames[3])
    assert ev._outside.macs == outside


@pytest.mark.skipif(not packing_enabled(), reason="oneDNN packing unavailable or disabled")
def test_copy_drops_packed_weights_and_repacks():
    dense = tiny_vit()
    ev = convert(dense, 0.5)
    frames = video(3, 32)
    ev(frames[0])
    packed = ev.eventful_blocks()[0]._packed["qkv"]
    assert packed._packed is not None
    cp = copy.deepcopy(ev)
    copied = cp.eventful_blocks()[0]._packed["qkv"]
    assert copied._packed is None and copied.linear is cp.eventful_blocks()[0].block.attn.qkv
    assert packed._group is ev._packed_group and copied._group is cp._packed_group is not ev._packed_group
    cp(frames[1])
    assert copied._packed is not None and copied._src.data_ptr() == copied.linear.weight.data_ptr()
    seen = []
    ev.eventful_blocks()[0].register_forward_hook(lambda *_: seen.append(ev._packed_group.active))
    ev(frames[2])
    assert seen == [True] and not ev._packed_group.active  # checked before the frame, not at every call


def test_copy_of_graphed_and_compiled_model():
    """Captured graphs are dropped (the copy captures its own); a compiled model is compiled again in the copy."""
    from test_graphs import EmulatedCapture

    dense = tiny_vit()
    ev, twin = convert(dense, 0.4), convert(dense, 0.4)
    ev.graphs = FrameGraphs(ev._screened, capture=EmulatedCapture)
    frames = video(6, 32, batch=2)
    for x in frames[:3]:
        torch.testing.assert_close(ev(x), twin(x), **EXACT)
    assert len(ev.graphs) == 1
    cp = copy.deepcopy(ev)
    assert len(cp.graphs) == 0 and cp.graphs._step.__self__ is cp
    _continue((ev, twin, cp), frames, 3)
    assert len(cp.graphs) == 1

    ev.compile(backend="eager")
    cp = copy.deepcopy(ev)
    assert cp._compiled and cp._compiled[0] is not ev._compiled[0] and cp._compile_kwargs == {"backend": "eager"}
    assert not any(k.startswith("_") for k in cp.state_dict())  # the compiled model is no submodule


# ---------------------------------------------------------------------------------------------------------------
# weight changes: picked up, or a clear error
# ---------------------------------------------------------------------------------------------------------------
def _new_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(p.shape, generator=g) + p.detach() for p in model.parameters()]


@pytest.mark.parametrize("write", ["data.copy_", "ema", "no_grad copy_", "new Parameter"])
@pytest.mark.parametrize("kind", ["vit", "sam", "sam-refresh"])
def test_weight_changes_mid_stream_are_used(kind, write):
    """r = N mid-stream: after any kind of weight write the eventful model equals the dense model on the new
    weights (the linears' packed copies, the rel-pos tables: nothing stale). SAM's windowed blocks keep qkv(0) of
    the flush (the qkv bias) in their padding rows: stream state, recomputed by refresh(); without one the qkv
    bias is left alone here."""
    make, size = MODELS[kind[:3]]
    dense = make()
    ev = convert(dense, 1.0)
    frames = video(6, size, batch=2)
    with torch.no_grad():
        for x in frames[:3]:
            ev(x)
        for (name, p), w in zip(list(dense.named_parameters()), _new_weights(dense, 7)):
            if kind == "sam" and name.endswith("attn.qkv.bias"):
                continue
            if write == "data.copy_":
                p.data.copy_(w)
            elif write == "ema":
                p.data.mul_(0.5).add_(w, alpha=0.5)
            elif write == "no_grad copy_":
                p.copy_(w)
            else:
                module_name, _, attr = name.rpartition(".")
                setattr(dense.get_submodule(module_name), attr, torch.nn.Parameter(w))
        if kind == "sam-refresh":
            ev.refresh()
        for t, x in enumerate(frames[3:], 3):
            torch.testing.assert_close(ev(x), dense(x), **TOL, msg=f"frame {t}")
    assert ev.frames_since_flush == (2 if kind == "sam-refresh" else 5)  # the streams were kept


def test_unsampled_weight_edit_is_seen_after_repack_or_reset():
    """The documented limit of the fingerprint: an edit through .data confined to unsampled entries is not seen
    until repack(model) or model.reset()."""
    from eventful_kernels.nn.linear import repack

    dense = tiny_vit()
    ev = convert(dense, 1.0)
    frames = video(4, 32, batch=2)
    fc = dense.blocks[1].mlp.fc1
    sampled = set(sampled_entries(fc.weight).tolist())
    rows = [i for i in range(fc.weight.numel()) if i not in sampled][:64]
    with torch.no_grad():
        ev(frames[0])
        fc.weight.data.view(-1)[rows] += 1.0
        if packing_enabled():
            assert not torch.allclose(ev(frames[1]), dense(frames[1]), **TOL)
        repack(ev)
        torch.testing.assert_close(ev(frames[2]), dense(frames[2]), **TOL)
        fc.weight.data.view(-1)[rows] -= 1.0
        ev.reset()
        torch.testing.assert_close(ev(frames[3]), dense(frames[3]), **TOL)


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_load_state_dict_on_the_eventful_model_resets_the_streams(kind):
    make, size = MODELS[kind]
    ev = convert(make(), 0.4)
    frames = video(6, size, batch=2)
    for x in frames[:3]:
        ev(x)
    source = convert(make(seed=1), 0.4)
    ev.load_state_dict(source.state_dict())
    assert ev.flushing and ev.frames_since_flush == 0
    for t, x in enumerate(frames[3:], 3):  # as a model converted from the new weights from that frame on
        torch.testing.assert_close(ev(x), source(x), **EXACT, msg=f"frame {t}")
    with pytest.raises(RuntimeError, match="Missing key"):
        ev.load_state_dict({})
    assert ev.flushing  # whatever was copied before the error, the streams start afresh
    ev(frames[0])
    wrapper = torch.nn.ModuleDict({"eventful": ev})
    wrapper.load_state_dict({f"eventful.{k}": v for k, v in source.state_dict().items()})
    assert ev.flushing  # also when a module holding it loads


def test_load_checkpoint_resets_the_streams(tmp_path):
    ev = convert(tiny_vit(), 0.4)
    frames = video(4, 32, batch=2)
    for x in frames[:2]:
        ev(x)
    torch.save(tiny_vit(seed=1).state_dict(), tmp_path / "w.pth")
    ev.load_checkpoint(str(tmp_path / "w.pth"))
    assert ev.flushing
    fresh = convert(tiny_vit(seed=1), 0.4)
    for x in frames[2:]:
        torch.testing.assert_close(ev(x), fresh(x), **EXACT)


def test_state_dict_keys_are_the_models_only():
    ev = convert(tiny_vit(), 0.4)
    keys = set(ev.state_dict())
    assert keys == {f"model.{k}" for k in ev.model.state_dict()}
    ev.compile(backend="eager")
    assert set(ev.state_dict()) == keys


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_load_state_dict_on_the_dense_model_keeps_the_streams(kind):
    """Documented: loading into the dense model copies into the shared weights in place (used from the next frame,
    the streams kept: at r = N a ViT equals the new dense model at once); reset() starts the streams afresh."""
    make, size = MODELS[kind]
    dense = make()
    ev = convert(dense, 1.0)
    frames = video(6, size, batch=2)
    with torch.no_grad():
        for x in frames[:3]:
            ev(x)
        new = make(seed=1)
        dense.load_state_dict(new.state_dict())
        y = ev(frames[3])
        assert ev.frames_since_flush == 3
        if kind == "vit":
            torch.testing.assert_close(y, new(frames[3]), **TOL)
        ev.reset()
        torch.testing.assert_close(ev(frames[4]), new(frames[4]), **TOL)
        assert ev.frames_since_flush == 0


@pytest.mark.parametrize("change", ["half", "bfloat16"])
def test_converted_weights_mid_stream_raise_naming_reset(change):
    dense = tiny_vit()
    ev = convert(dense, 0.5)
    frames = video(4, 32, batch=2)
    ev(frames[0])
    before = _state_tensors(ev)
    getattr(dense, change)()
    dtype = next(dense.parameters()).dtype
    for x in (frames[1], frames[1].to(dtype)):
        with pytest.raises(ValueError, match=r"reset\(\)"):
            ev(x)
    assert all(t is before[k] for k, t in _state_tensors(ev).items())
    ev.reset()
    with torch.no_grad():
        torch.testing.assert_close(ev(frames[2].to(dtype)), dense(frames[2].to(dtype)),
                                   rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_see_weights_written_in_place():
    """A replayed graph reads the weights at their addresses: writes through .data, the rel-pos tables included."""
    dense = tiny_sam().cuda()
    graphed = convert(dense, 0.4)
    eager = convert(dense, 0.4, cuda_graphs=False)
    frames = video(7, 64, batch=2).cuda()
    for t, x in enumerate(frames):
        if t == 4:
            with torch.no_grad():
                dense.blocks[1].attn.rel_pos_h.data.mul_(3.0)
                dense.blocks[0].mlp.fc1.weight.data.mul_(0.5)
        torch.testing.assert_close(graphed(x), eager(x), rtol=1e-5, atol=1e-5, msg=f"frame {t}")
    assert graphed.graphs.captures == 1
