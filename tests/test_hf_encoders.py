"""Hugging Face vision encoders (ViT, DINOv2 with and without registers, CLIP, SigLIP) as eventful models: r = N
equals the dense HF model, ops equals reference at r < N through a budget change, steady frames never synchronise,
weights are shared and read live, copies and stream checkpoints continue the streams (tiny configs, random weights)."""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face extra (transformers) is not installed; bash install.sh "
                                           "installs it")

from eventful_kernels import counting  # noqa: E402
from eventful_kernels.models import convert, model_family  # noqa: E402
from eventful_kernels.models.graphs import FrameGraphs  # noqa: E402
from eventful_kernels.models.hf import HFBlock  # noqa: E402
from eventful_kernels.nn import EventfulBlock, Threshold, TopK  # noqa: E402
from eventful_kernels.nn.linear import ConcatLinear, packing_enabled  # noqa: E402

from no_sync import no_sync  # noqa: E402
from tiny_hf import MODELS, SIZE, transformers  # noqa: E402
from tiny_timm import video  # noqa: E402

# The dense HF layers run SDPA, the eventful ones softmax + (delta) matmuls over buffers: sums in another order.
TOL = dict(atol=1e-4, rtol=1e-4)
KINDS = list(MODELS)
FAMILY = {"vit": "hf-vit", "dinov2": "hf-dinov2", "dinov2_registers": "hf-dinov2-registers", "clip": "hf-clip",
          "siglip": "hf-siglip"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _assert_outputs_close(got, want, msg=""):
    assert type(got) is type(want)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL, msg=msg)
    if want.pooler_output is None:
        assert got.pooler_output is None
    else:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL, msg=msg)


@pytest.mark.parametrize("placement", ["after_norm", "before_norm"])
@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_equals_dense(kind, backend, placement):
    build, n = MODELS[kind]
    dense = build()
    ev = convert(dense, 1.0, backend=backend, gate_placement=placement)
    assert model_family(dense) == ev.family == FAMILY[kind]
    for t, x in enumerate(video(4, SIZE, batch=2)):
        want = dense(x)
        got = ev(x)
        assert got.last_hidden_state.shape == (2, n, 32)
        _assert_outputs_close(got, want, msg=f"frame {t}")
    assert (ev(x).pooler_output is None) == (kind == "siglip" and not dense.use_head)


@pytest.mark.parametrize("kind", KINDS)
def test_reduced_budget_ops_equals_reference_through_a_budget_change(kind):
    build, n = MODELS[kind]
    dense = build()
    ev_ops = convert(dense, 0.5, backend="ops")
    ev_ref = convert(dense, 0.5, backend="reference")
    deviated = False
    for t, x in enumerate(video(7, SIZE, batch=2)):
        if t == 4:
            ev_ops.set_budget(TopK(3))
            ev_ref.set_budget(TopK(3))
        got, ref, want = ev_ops(x), ev_ref(x), dense(x)
        _assert_outputs_close(got, ref, msg=f"frame {t}")
        k = n if t == 0 else (n // 2 if t < 4 else 3)
        for block in ev_ops.eventful_blocks():  # every gated linear ran on k tokens of each of the 2 streams
            linears = k * (block._macs_qkv + block._macs_proj + block._macs_mlp)
            assert block.last_macs == 2 * linears + block.attention.last_macs, f"frame {t}"
        if t == 0:
            _assert_outputs_close(got, want)  # the flush is dense
        else:
            deviated |= not torch.allclose(got.last_hidden_state, want.last_hidden_state, **TOL)
        assert torch.isfinite(got.last_hidden_state).all()
    assert deviated  # r < N really skips tokens


@pytest.mark.parametrize("kind", KINDS)
def test_steady_frames_never_synchronise(kind):
    build, _ = MODELS[kind]
    ev = convert(build(), Threshold(0.3, capacity=6, trim=False), backend="ops", strategy="eventful")
    frames = video(5, SIZE, batch=2)
    ev(frames[0])
    ev(frames[1])
    with no_sync() as mode:
        for x in frames[2:]:
            ev(x)
        ev.set_budget(0.25)
        ev(frames[2])
    ran = " ".join(mode.calls)
    assert "eventful.qk_update_." in ran and "eventful.av_delta_update_." in ran and "eventful.scatter_rows_." in ran


def test_layers_are_adapted_with_shared_modules():
    dense = MODELS["dinov2_registers"][0]()
    ev = convert(dense, 0.5)
    layer = dense.encoder.layer[1]
    block = ev.eventful_blocks()[1]
    assert isinstance(block, EventfulBlock) and isinstance(block.block, HFBlock)
    view = block.block
    assert view.norm1 is layer.norm1 and view.norm2 is layer.norm2 and view.mlp is layer.mlp
    assert isinstance(view.attn.qkv, ConcatLinear)
    assert view.attn.qkv.parts() == (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj)
    assert view.attn.proj is layer.attention.o_proj and view.ls1.gamma is layer.layer_scale1.lambda1
    assert view.attn.num_heads == 2 and view.attn.scale == pytest.approx(16 ** -0.5)
    own = {id(p) for p in dense.parameters()}
    assert all(id(p) in own for p in ev.parameters())  # nothing copied
    clip = MODELS["clip"][0]()
    assert convert(clip, 0.5).model.pre_norm is clip.pre_layrnorm


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_weight_edits_are_seen(kind):
    """Writes through ``.data`` (no ``_version`` bump) into one of q/k/v and into the MLP: the stacked packed qkv
    and the packed MLP are remade, so after a refresh the eventful model equals the edited dense model."""
    build, _ = MODELS[kind]
    dense = build()
    ev = convert(dense, 1.0, backend="ops")
    frames = video(4, SIZE)
    ev(frames[0])
    ev(frames[1])
    layers = dense.layers if kind == "vit" else dense.encoder.layers
    with torch.no_grad():
        layers[0].attention.k_proj.weight.data.mul_(1.5) if kind == "vit" else \
            layers[0].self_attn.k_proj.weight.data.mul_(1.5)
        layers[1].mlp.fc1.weight.data.add_(0.1)
    ev.refresh()
    _assert_outputs_close(ev(frames[2]), dense(frames[2]))
    _assert_outputs_close(ev(frames[3]), dense(frames[3]))
    if packing_enabled():
        packed = ev.eventful_blocks()[0]._packed["qkv"]
        assert packed._packed is not None and len(packed._srcs) == 3


def test_unsupported_models_are_named():
    cfg = transformers.CLIPConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, image_size=SIZE, patch_size=8),
                                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64))
    full = transformers.CLIPModel(cfg)
    with pytest.raises(TypeError, match="model.vision_model"):
        convert(full)
    with pytest.raises(TypeError, match="unsupported transformers model"):
        convert(transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64)))
    ev = convert(full.vision_model, 1.0)  # the tower itself converts
    x = video(1, SIZE)[0]
    _assert_outputs_close(ev(x), full.vision_model(x))


@pytest.mark.parametrize("kind", ["siglip", "dinov2_registers"])
def test_copies_and_stream_checkpoints_continue_the_streams(kind):
    build, _ = MODELS[kind]
    dense = build()
    ev = convert(dense, 0.5)
    frames = video(6, SIZE, batch=2)
    for x in frames[:3]:
        ev(x)
    twin = copy.deepcopy(ev)
    saved = ev.stream_state()
    other = convert(dense, 0.5)
    other.load_stream_state(saved)
    for x in frames[3:]:
        want = ev(x)
        for m in (twin, other):
            got = m(x)
            assert torch.equal(got.last_hidden_state, want.last_hidden_state)
            if want.pooler_output is not None:
                assert torch.equal(got.pooler_output, want.pooler_output)
    with pytest.raises(ValueError, match="family"):
        convert(MODELS["vit"][0](), 0.5).load_stream_state(saved)


def test_non_finite_frame_masks_every_output_of_its_stream():
    dense = MODELS["siglip"][0]()
    ev = convert(dense, 0.5)
    frames = video(4, SIZE, batch=2)
    ev(frames[0])
    bad = frames[1].clone()
    bad[1, 0, 3, 3] = float("nan")
    out = ev(bad)
    assert torch.isnan(out.last_hidden_state[1]).all() and torch.isnan(out.pooler_output[1]).all()
    assert torch.isfinite(out.last_hidden_state[0]).all() and torch.isfinite(out.pooler_output[0]).all()
    assert torch.isfinite(ev(frames[2]).last_hidden_state).all()


class _EmulatedCapture:
    """CPU stand-in for CUDA capture of a pytree output: a replay runs the step and writes into the static output."""

    device_type = "cpu"

    @staticmethod
    def warm(step, frames):
        return step(frames)

    @staticmethod
    def capture(step, static_in):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        static_out = BaseModelOutputWithPooling(last_hidden_state=torch.empty(0), pooler_output=torch.empty(0))

        def replay():
            out = step(static_in)
            for key in ("last_hidden_state", "pooler_output"):
                static_out[key].resize_(out[key].shape).copy_(out[key])

        return replay, static_out


def test_graph_replay_of_a_model_output():
    dense = MODELS["clip"][0]()
    graphed = convert(dense, 0.5)
    graphed.graphs = FrameGraphs(graphed._screened, capture=_EmulatedCapture)
    eager = convert(dense, 0.5)
    outs = []
    for t, x in enumerate(video(5, SIZE)):
        got, want = graphed(x), eager(x)
        _assert_outputs_close(got, want, msg=f"frame {t}")
        outs.append(got)
    assert graphed.graphs.captures == 1 and len(graphed.graphs) == 1
    assert outs[3].last_hidden_state.data_ptr() != outs[4].last_hidden_state.data_ptr()  # copies, not the buffer


def test_macs_count_the_eventful_blocks():
    dense = MODELS["vit"][0]()
    ev = convert(dense, TopK(4))
    frames = video(2, SIZE)
    ev(frames[0])
    ev(frames[1])
    n, d, heads, hd = 17, 32, 2, 16
    per_token = 3 * d * d + d * d + 2 * d * 64
    attention = heads * (4 * n + n * 4) * hd + 2 * heads * n * 4 * hd
    assert counting.count_macs(ev.model) == 2 * (4 * per_token + attention)


TINY_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": SIZE, "patch_size": 8}


@pytest.fixture
def _restore_threads():
    before = torch.get_num_threads()  # the CLI sets torch's thread count for the whole process
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_restore_threads")
def test_cli_runs_an_hf_preset(tmp_path, capsys):
    import json

    from eventful_kernels import cli

    out = tmp_path / "out"
    rc = cli.main(["--model", "hf:clip-vit-b16", "--model-kwargs", json.dumps(TINY_CONFIG), "--frames", "4",
                   "--budgets", "N,N/4", "--threads", "1", "--out", str(out), "--quiet", "--system-malloc",
                   "--no-plots"])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["tokens"] == 17 and res["input_size"] == SIZE and res["framework"] == "HF"
    by = {b["budget"]: b for b in res["budgets"]}
    assert by["N"]["rel_error_max"] < 1e-4 and by["N/4"]["rel_error_max"] > by["N"]["rel_error_max"]
    assert by["N/4"]["gflops_mean"] < res["dense"]["gflops_mean"] and by["N/4"]["tokens"] == 4
    # dense count: patch embedding (16 patches x 3*8*8 x 32) + 2 layers of linears on 17 tokens + attention
    per_layer = 17 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 17 * 17 * 32
    assert res["dense"]["gflops_mean"] == pytest.approx(2 * (16 * 192 * 32 + 2 * per_layer) / 1e9)
    assert "dense HF" in capsys.readouterr().out


def test_hf_specs_presets_directories_and_the_cache(tmp_path):
    from eventful_kernels.models.hf_create import PRESETS, create_model, input_spec

    dinov2 = create_model("dinov2-small", **{k: v for k, v in TINY_CONFIG.items() if k != "intermediate_size"})
    assert type(dinov2).__name__ == "Dinov2Model" and dinov2.config.hidden_size == 32
    assert input_spec(dinov2) == (SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert PRESETS["siglip-so400m"][1]["hidden_size"] == 1152
    # a saved full CLIP model (vision + text): its vision tower with the saved weights and normaliser
    cfg = transformers.CLIPConfig(vision_config=TINY_CONFIG, text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}')
    tower = create_model(str(tmp_path))
    x = video(1, SIZE)[0]
    assert type(tower).__name__ == "CLIPVisionModel"
    assert torch.equal(tower(x).pooler_output, full.vision_model(x).pooler_output)
    assert input_spec(tower) == (SIZE, (0.1, 0.2, 0.3), (1, 2, 3))
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        create_model("nobody/no-such-model-here")


def test_the_hf_extra_is_installed_by_install_sh():
    """CI runs install.sh: every pin of pyproject's hf extra must be in the requirement files it installs."""
    import os
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]["hf"]
    installed = set()
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        installed |= {line.strip() for line in open(os.path.join(root, name)) if line.strip()[:1].isalnum()}
    assert "transformers==5.23.0" in extra and set(extra) <= installed
    assert transformers.__version__ == "5.23.0"


def test_steady_frame_compiles_as_one_graph():
    """SigLIP (with its attention-pooling head): the steady frame compiles with fullgraph=True, once."""
    import torch._dynamo.testing

    dense = MODELS["siglip"][0]()
    compiled = convert(dense, 0.4, strategy="eventful")
    eager = convert(dense, 0.4, strategy="eventful")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, backend=counter, dynamic=False)
    for t, x in enumerate(video(4, SIZE, batch=2)):
        _assert_outputs_close(compiled(x), eager(x), msg=f"frame {t}")
        assert counter.frame_count == (0 if t == 0 else 1)


@pytest.mark.skipif(not packing_enabled(), reason="oneDNN packing unavailable or disabled")
def test_concat_linear_packs_one_stack_that_follows_every_part():
    from torch import nn

    from eventful_kernels.nn.linear import PackedGroup, PackedLinear, repack

    torch.manual_seed(0)
    q, k, v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
    cat = ConcatLinear(q_proj=q, k_proj=k, v_proj=v)
    assert (cat.in_features, cat.out_features) == (32, 96)
    packed = PackedLinear(cat)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(packed(x), torch.cat([q(x), k(x), v(x)], -1))
    stack = packed._packed
    assert stack is not None and len(packed._srcs) == 3
    v.weight.data.mul_(2.0)  # no _version bump: the fingerprint of v's weight sees it
    torch.testing.assert_close(packed(x), cat(x))
    assert packed._packed is not stack
    k.bias.data.add_(1.0)  # biases are read at every call
    torch.testing.assert_close(packed(x), cat(x))
    cat.k_proj = nn.Linear(32, 32)  # a replaced part: its weight's address keys a new stack
    torch.testing.assert_close(packed(x), cat(x))
    group = PackedGroup()
    group.add(packed)
    group.check()
    q.weight.data.add_(0.5)
    group.check()  # the group compares all three parts' sampled bytes at once and repacks
    group.active = True
    torch.testing.assert_close(packed(x), cat(x))
    group.active = False
    repack(nn.Sequential(cat))
    assert packed._packed is None


@pytest.mark.parametrize("kind", KINDS)
def test_published_options_pool_keys_and_values_and_keep_ops_equal_to_reference(kind):
    """``kv_pool=2`` and a 16-bit A·V on an HF encoder: the 4x4 patch grid pools to 2x2 keys (class and register
    tokens unpooled), ops equals reference at r < N, and pooling really changes the result and the count."""
    build, n = MODELS[kind]
    dense = build()
    plain = convert(dense, 0.5, strategy="eventful")
    pooled = {b: convert(dense, 0.5, backend=b, strategy="eventful", kv_pool=2, av_dtype=torch.bfloat16)
              for b in ("ops", "reference")}
    for t, x in enumerate(video(4, SIZE, batch=2)):
        got, ref, unpooled = pooled["ops"](x), pooled["reference"](x), plain(x)
        # bfloat16 A·V products on both sides, summed in another order: bfloat16 rounding (8 bits of mantissa)
        torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=2e-2, rtol=2e-2,
                                   msg=f"frame {t}")
        assert not torch.allclose(got.last_hidden_state, unpooled.last_hidden_state, atol=1e-3, rtol=1e-3)
        assert pooled["ops"].macs_last_frame() < plain.macs_last_frame()
    prefix = 0 if kind == "siglip" else 1 + (4 if kind == "dinov2_registers" else 0)
    assert all(b.kv_pool == 2 for b in pooled["ops"].eventful_blocks())
    assert n == prefix + 16


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_patch_conv_runs_as_a_packed_linear(kind):
    """In bf16 on a CPU without native bf16 the eventful model runs the patch conv as linear_bf16 over the patches
    (a copy of the embeddings, parameters shared, state-dict names unchanged; the dense model keeps its conv): r = N
    stays within bf16 rounding of the dense bf16 model, and a weight edit reaches it."""
    from eventful_kernels.nn.linear import PackedConv, bf16_kernel

    build, _ = MODELS[kind]
    dense = build().to(torch.bfloat16)
    ev = convert(dense, 1.0)
    runners = [m.__dict__["forward"] for m in ev.modules() if isinstance(m.__dict__.get("forward"), PackedConv)]
    assert len(runners) == 1 and not any("forward" in m.__dict__ for m in dense.modules())
    assert ev.model.embeddings is not dense.embeddings
    dense_keys = set(dense.state_dict())
    assert {k for k in ev.model.state_dict() if k.startswith("embeddings.")} <= dense_keys
    x = next(iter(video(1, SIZE, batch=2))).to(torch.bfloat16)
    got, want = ev(x).last_hidden_state.float(), dense(x).last_hidden_state.float()
    assert float((got - want).norm() / want.norm()) < 2e-2  # bf16 rounding, summed in another order
    if bf16_kernel() == "eventful" and packing_enabled():
        assert runners[0].linear._bf16
    conv = runners[0].conv
    conv.weight.data.mul_(0)  # through .data (the dense conv shares it): only the fingerprint sees the edit
    ev.reset()
    got, want = ev(x).last_hidden_state.float(), dense(x).last_hidden_state.float()
    assert float((got - want).norm() / want.norm()) < 2e-2
