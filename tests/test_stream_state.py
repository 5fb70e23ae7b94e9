"""Weights and stream state: weight changes are never used stale, copies (deepcopy / pickle / torch.save) carry the
streams and no caches, and stream_state() / load_stream_state() move streams between models bit-identically.

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
from eventful_kernels.nn import EventfulBlock, EventfulModule, Threshold, TopK
from eventful_kernels.nn import state as nn_state
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
    assert copied._packed is not None and copied._srcs[0].data_ptr() == copied.linear.weight.data_ptr()
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
# stream_state / load_stream_state
# ---------------------------------------------------------------------------------------------------------------
def _plain_only(value, where="state"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            _plain_only(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain_only(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), (where, type(value))


def _saved(ev, via):
    state = ev.stream_state()
    _plain_only(state)
    if via == "dict":
        return state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("via", ["dict", "torch.save"])
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_stream_moves_to_a_fresh_model_bit_identically(kind, budget, via):
    make, size = MODELS[kind]
    ev, twin = _convert(make(), budget), _convert(make(), budget)
    frames = video(7, size, batch=2)
    start = _prepare(ev, twin, frames, "mid")
    fresh = _convert(make(), budget)  # another instance of the same weights
    fresh.load_stream_state(_saved(ev, via))
    assert not fresh.flushing and fresh.frames_since_flush == ev.frames_since_flush
    assert fresh.attention_modes() == ev.attention_modes()
    _continue((ev, twin, fresh), frames, start)


@pytest.mark.parametrize("when", ["before", "reset", "refresh-pending", "after-refresh", "after-nonfinite"])
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_stream_moves_at_any_time(kind, when):
    make, size = MODELS[kind]
    ev, twin = _convert(make(), "threshold"), _convert(make(), "threshold")
    frames = video(8, size, batch=2)
    start = _prepare(ev, twin, frames, when)
    fresh = _convert(make(), "threshold")
    fresh.load_stream_state(_saved(ev, "torch.save"))
    _continue((ev, twin, fresh), frames, start)


def test_stream_moves_with_a_pending_poisoned_flag():
    """A non-finite value produced inside the model on a clean frame: the next frame re-flushes, also in the model
    the stream was moved to in between."""
    dense = tiny_vit()
    ev, twin = convert(dense, 0.5), convert(dense, 0.5)
    frames = video(6, 32, batch=2)
    weight = dense.blocks[1].mlp.fc2.weight
    for m in (ev, twin):
        m(frames[0])
        m(frames[1])
    with torch.no_grad():
        saved = weight.clone()
        weight[0, 0] = float("inf")
    for m in (ev, twin):
        m(frames[2])
    with torch.no_grad():
        weight.copy_(saved)
    state = ev.stream_state()
    assert state["screen"]["poisoned"]
    fresh = convert(tiny_vit(), 0.5)
    fresh.load_stream_state(state)
    _continue((ev, twin, fresh), frames, 3)
    assert fresh.frames_since_flush == ev.frames_since_flush == 2  # frame 3 was the refresh


def test_stream_state_is_a_snapshot_and_loads_twice():
    dense = tiny_sam()
    ev, twin = convert(dense, 0.4), convert(dense, 0.4)
    frames = video(7, 64, batch=2)
    start = _prepare(ev, twin, frames, "mid")
    state = ev.stream_state()
    kept = copy.deepcopy(state)
    ev(frames[start])
    twin(frames[start])
    first, second = convert(tiny_sam(), 0.4), convert(tiny_sam(), 0.4)
    first.load_stream_state(state)
    second.load_stream_state(state)
    for m in (first, second):  # loading copies: two models from one dict, the dict itself unchanged
        assert all(t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
                   for t in _state_tensors(m).values() for s in [state["screen"]["last"]])
        m(frames[start])
    flat = lambda s: [v for v in torch.utils._pytree.tree_leaves(s) if isinstance(v, torch.Tensor)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(state), flat(kept)))
    _continue((first, twin, second), frames, start + 1)


def test_stream_state_loads_into_a_running_model_and_drops_graphs():
    from test_graphs import EmulatedCapture

    dense = tiny_vit()
    ev, twin = convert(dense, 0.4), convert(dense, 0.4)
    frames = video(8, 32, batch=2)
    start = _prepare(ev, twin, frames, "mid")
    target = convert(dense, 0.4)
    target.graphs = FrameGraphs(target._screened, capture=EmulatedCapture)
    for x in video(4, 32, batch=3, seed=5):  # other streams, other batch size
        target(x)
    assert len(target.graphs) == 1
    target.load_stream_state(ev.stream_state())
    assert len(target.graphs) == 0
    _continue((ev, twin, target), frames, start)


def test_module_level_stream_state():
    """nn.state works on any eventful module tree, e.g. a single block."""
    from tiny_timm import tiny_sam as make

    blk = make().blocks[1]  # global, rel-pos
    eb, twin = EventfulBlock(blk, 0.4), EventfulBlock(blk, 0.4)
    xs = torch.randn(6, 2, 8, 8, 32)
    for x in xs[:3]:
        torch.testing.assert_close(eb(x), twin(x), **EXACT)
    other = EventfulBlock(blk, 0.4)
    nn_state.load_stream_state(other, nn_state.stream_state(eb))
    for x in xs[3:]:
        want = twin(x)
        torch.testing.assert_close(other(x), want, **EXACT)
        torch.testing.assert_close(eb(x), want, **EXACT)


# ---- rejected states leave the model untouched ------------------------------------------------------------------
def _drop(path):
    def edit(state):
        *parents, last = path
        node = state
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _set(path, value):
    def edit(state):
        *parents, last = path
        node = state
        for p in parents:
            node = node[p]
        node[last] = value(node[last]) if callable(value) else value
    return edit


def _first_stream_only(block):
    def edit(state):
        for name, entries in state["model"]["modules"].items():
            if name.startswith(block + "."):
                entries.update({k: v[:1] for k, v in entries.items() if isinstance(v, torch.Tensor)})
    return edit


BAD = {
    "format": (_set(["format"], 99), "format"),
    "family": (_set(["family"], "sam"), "family"),
    "missing key": (_drop(["frames_since_flush"]), "missing keys"),
    "missing module": (_drop(["model", "modules", "blocks.1.mlp_buffer"]), r"missing keys \['blocks.1.mlp_buffer'\]"),
    "missing attr": (_drop(["model", "modules", "blocks.0.qkv_gate", "ref"]), r"missing keys \['ref'\]"),
    "unexpected attr": (_set(["model", "modules", "blocks.0.qkv_gate", "extra"], 1), "unexpected keys"),
    "shape": (_set(["model", "modules", "blocks.1.proj_buffer", "state"], lambda t: t[:, :-1]),
              r"blocks.1.proj_buffer.state has shape \[2, 16, 32\], expected \[2, 17, 32\]"),
    "attention shape": (_set(["model", "modules", "blocks.0.eventful_attention.qk_buffer", "logits"],
                             lambda t: t[:, :1]), "qk_buffer.logits has shape"),
    "dtype": (_set(["model", "modules", "blocks.0.mlp_gate", "ref"], lambda t: t.double()),
              "float64 on cpu but the block's weights are float32"),
    "streams": (_set(["streams"], 3), "3"),
    "one block's streams": (_first_stream_only("blocks.1"), "expected \\[2, 17, 32\\] \\(2 streams"),
    "half a module": (_set(["model", "modules", "blocks.0.eventful_attention.av_buffer", "v_ref"], None),
                      "all there or none"),
    "no token state": (_set(["model", "modules", "blocks.0.qkv_gate", "ref"], None), "without a token state"),
    "screen": (_set(["screen", "last"], lambda t: t[:, :, :16]), "screen.last"),
    "frames device": (_set(["frames", "device"], "meta"), "another device"),
    "frames dtype": (_set(["frames", "dtype"], "int64"), "floating dtype"),
    "since flush": (_set(["frames_since_flush"], -1), "frames_since_flush"),
    "mode": (_set(["model", "modules", "blocks.0", "attention_mode"], "sparse"), "attention_mode"),
    "refresh": (_set(["model", "modules", "blocks.0.qkv_gate", "refresh"], "yes"), "refresh must be a bool"),
    "not plain": (_set(["model", "modules", "blocks.0", "grid"], object()), "plain value"),
    "architecture": (_set(["model", "architecture"], lambda a: a[:-1]), "architecture differs"),
    "weights": (_set(["model", "weights", "blocks.0.block.attn.qkv.weight"], lambda s: s[:-1] + "0"), "weights differ"),
    "weight dtype": (_set(["model", "weights", "head.weight"], lambda s: "float16" + s[len("float32"):]),
                     "another architecture or dtype"),
    "not a dict": (lambda s: s.clear() or s.update({"model": []}), "missing keys"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_is_rejected_and_nothing_changes(case):
    edit, match = BAD[case]
    dense = tiny_vit()
    ev, twin = convert(dense, 0.4), convert(dense, 0.4)
    frames = video(7, 32, batch=2)
    source = convert(dense, 0.4)
    for x in video(3, 32, batch=2, seed=3):
        source(x)
    start = _prepare(ev, twin, frames, "mid")
    before = _state_tensors(ev)
    state = source.stream_state()
    edit(state)
    with pytest.raises(ValueError, match=match):
        ev.load_stream_state(state)
    after = _state_tensors(ev)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    for t in range(start, len(frames)):
        torch.testing.assert_close(ev(frames[t]), twin(frames[t]), **EXACT, msg=f"frame {t}")


def test_architecture_and_weights_must_match():
    ev = convert(tiny_vit(), 0.4)
    frames = video(3, 32, batch=2)
    ev(frames[0])
    state = ev.stream_state()
    with pytest.raises(ValueError, match="family"):
        convert(tiny_sam(), 0.4).load_stream_state(state)
    from tiny_timm import VisionTransformer

    deeper = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="architecture differs"):
        convert(deeper.eval(), 0.4).load_stream_state(state)
    other = convert(tiny_vit(seed=1), 0.4)
    with pytest.raises(ValueError, match="weights differ"):
        other.load_stream_state(state)
    other.load_stream_state(state, check_weights=False)  # allowed when asked for
    assert not other.flushing


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
