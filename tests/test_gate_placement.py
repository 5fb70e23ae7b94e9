"""Gate placement: after the LayerNorms (the published default, ours) or before them. Both equal the dense block
at r = N, the fused ops equal the reference backend, and both equal an independent rendering of the published
algorithm (tests/published_mirror.py) frame by frame at r < N.
"""
from __future__ import annotations

import pytest
import torch

from eventful_kernels.models import convert
from eventful_kernels.nn import EventfulBlock, EventfulTokenwiseBlock, TopFraction, TopK

from nn_utils import BACKENDS, random_video
from published_mirror import PublishedBlock
from test_blocks import FP32, make, n_tokens
from tiny_timm import tiny_sam, tiny_vit, video

PLACEMENTS = ["after_norm", "before_norm"]
CONFIGS = ["vit", "vit_qknorm_inplace_ls", "sam_global_relpos", "sam_window_relpos_padded"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("cls", [EventfulTokenwiseBlock, EventfulBlock])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_full_budget_equals_dense(cfg, cls, placement):
    blk, shape = make(cfg)
    eb = cls(blk, TopK(n_tokens(shape)), gate_placement=placement)
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(eb(x), blk(x), **FP32, msg=f"frame {t}")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("cls", [EventfulTokenwiseBlock, EventfulBlock])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_ops_equal_reference(cfg, cls, placement):
    blk, shape = make(cfg)
    e_ops = cls(blk, TopFraction(0.3), backend="ops", gate_placement=placement)
    e_ref = cls(blk, TopFraction(0.3), backend="reference", gate_placement=placement)
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(e_ops(x), e_ref(x), **FP32, msg=f"frame {t}")
        assert e_ops.last_macs == e_ref.last_macs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("cfg", ["vit", "vit_qknorm_inplace_ls"])
def test_equals_the_published_algorithm(cfg, placement, backend):
    """Frame by frame at r < N against the literal rendering of the published block: selections, buffers, QK^T
    rows/columns and the A·V delta all agree (float32 rounding only)."""
    blk, shape = make(cfg)
    k = n_tokens(shape) // 4
    ours = EventfulBlock(blk, TopK(k), backend=backend, strategy="eventful", gate_placement=placement)
    published = PublishedBlock(blk, k, gate_before_ln=placement == "before_norm")
    worst = 0.0
    for t, x in enumerate(random_video(shape, frames=10)):
        y, want = ours(x), published(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"frame {t}")
        with torch.no_grad():
            worst = max(worst, float((want - blk(x)).abs().max()))
    assert worst > 1e-3  # r < N really approximates: the comparison is not between two dense runs


def test_placements_choose_differently_and_the_gates_hold_what_they_score():
    blk, shape = make("vit")
    after = EventfulBlock(blk, TopFraction(0.25), gate_placement="after_norm")
    before = EventfulBlock(blk, TopFraction(0.25), gate_placement="before_norm")
    frames = random_video(shape, frames=4)
    for x in frames:
        after(x)
        before(x)
    assert not torch.equal(after.qkv_gate.ref, before.qkv_gate.ref)
    fresh = EventfulBlock(blk, TopFraction(0.25), gate_placement="after_norm")
    fresh(frames[0])
    torch.testing.assert_close(fresh.qkv_gate.ref, blk.norm1(frames[0]), rtol=0, atol=0)  # normalised tokens


@pytest.mark.parametrize("make_model,size", [(tiny_vit, 32), (tiny_sam, 64)])
def test_convert_option_and_default(make_model, size):
    dense = make_model()
    ev = convert(dense, 1.0)
    assert {b.gate_placement for b in ev.eventful_blocks()} == {"after_norm"}
    before = convert(dense, 1.0, gate_placement="before_norm")
    assert {b.gate_placement for b in before.eventful_blocks()} == {"before_norm"}
    for x in video(3, size, batch=2):
        torch.testing.assert_close(ev(x), dense(x), **FP32)
        torch.testing.assert_close(before(x), dense(x), **FP32)
    with pytest.raises(ValueError, match="gate_placement"):
        convert(dense, 1.0, gate_placement="inside")
    with pytest.raises(ValueError, match="gate_placement"):
        EventfulBlock(make("vit")[0], gate_placement="sideways")


def test_stream_state_does_not_cross_placements():
    dense = tiny_vit()
    a, b = convert(dense, 0.5), convert(dense, 0.5, gate_placement="before_norm")
    for x in video(2, 32, batch=2):
        a(x)
    with pytest.raises(ValueError):
        b.load_stream_state(a.stream_state())
    assert b.flushing  # untouched
