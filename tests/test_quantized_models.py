"""Models whose linear layers are not ``nn.Linear``: here PyTorch's dynamic int8 quantization
(``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per call, the LayerNorms and
everything else float32). The eventful blocks run such layers as they are (never packed) on the tokens they
select; the model's compute dtype and device come from its floating-point parameters."""
from __future__ import annotations

import copy

import pytest
import torch

import tiny_hf
from eventful_kernels.models import convert, quantize_int8
from tiny_timm import tiny_sam, tiny_vit, video

MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64), "hf-clip": (tiny_hf.tiny_clip, tiny_hf.SIZE)}


def _out(y):
    return y if isinstance(y, torch.Tensor) else y.last_hidden_state


@pytest.mark.parametrize("kind", list(MODELS))
def test_full_budget_equals_the_quantized_dense_model(kind):
    """r = N: every block selects every token, so each quantized product sees the same rows as in the dense
    model (the same per-call activation scale) and the outputs agree to float32 rounding."""
    make, size = MODELS[kind]
    q = quantize_int8(make())
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    ev = convert(q, 1.0)
    for t, x in enumerate(video(4, size, batch=2)):
        torch.testing.assert_close(_out(ev(x)), _out(q(x)), rtol=1e-5, atol=1e-5, msg=f"frame {t}")


@pytest.mark.parametrize("kind", list(MODELS))
def test_reduced_budget_ops_equal_reference_and_streams_move(kind):
    """r < N: the fused ops equal the reference backend frame by frame (the same quantized layers run on the same
    selected tokens in both); the streams survive stream_state / load_stream_state and deepcopy; the op counts
    equal those of the float32 model at the same budget."""
    make, size = MODELS[kind]
    dense = make()
    q = quantize_int8(dense)
    ops, ref, f32 = convert(q, 0.5), convert(q, 0.5, backend="reference"), convert(dense, 0.5)
    frames = video(6, size, batch=2)
    for t, x in enumerate(frames[:4]):
        y = _out(ops(x))
        torch.testing.assert_close(y, _out(ref(x)), rtol=1e-5, atol=1e-5, msg=f"frame {t}")
        f32(x)
        assert ops.macs_last_frame() == f32.macs_last_frame()
        assert torch.isfinite(y).all()
    other = convert(q, 0.5)
    other.load_stream_state(ops.stream_state())
    twin = copy.deepcopy(ops)
    for t, x in enumerate(frames[4:], 4):
        y = _out(ops(x))
        torch.testing.assert_close(_out(other(x)), y, rtol=0, atol=0, msg=f"loaded, frame {t}")
        torch.testing.assert_close(_out(twin(x)), y, rtol=0, atol=0, msg=f"copy, frame {t}")


def test_quantize_int8_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match=r"float32 model on the CPU, got torch.bfloat16 on cpu"):
        quantize_int8(tiny_vit().to(torch.bfloat16))
    with pytest.raises(ValueError, match="no floating-point weights"):
        quantize_int8(torch.nn.ReLU())
    dense = tiny_vit()
    q = quantize_int8(dense)
    assert type(dense.blocks[0].mlp.fc1) is torch.nn.Linear  # the original is left as it is
    assert type(q.blocks[0].mlp.fc1) is not torch.nn.Linear
