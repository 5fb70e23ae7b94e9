"""Page placement of the large attention states (eventful_kernels/nn/placement.py)."""
from __future__ import annotations

import pytest
import torch

from eventful_kernels.nn import EventfulAttention
from eventful_kernels.nn.placement import PAGE_BYTES, SLOTS, Workspace, empty_placed, placed_copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_empty_placed_offset_shape_dtype(dtype, slot):
    like = torch.empty(1, dtype=dtype)
    for _ in range(4):  # several allocations: the offset must not depend on where the allocator put the block
        t = empty_placed((2, 3, 17, 33), like, slot)
        assert t.shape == (2, 3, 17, 33) and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % PAGE_BYTES == SLOTS[slot]
        t.fill_(1)  # the whole view lies inside its allocation
        assert bool((t == 1).all())


def test_placed_copy_values():
    src = torch.randn(2, 5, 7, 9).transpose(1, 2)
    out = placed_copy(src, "attention_ref")
    assert out.is_contiguous() and torch.equal(out, src)
    assert out.data_ptr() % PAGE_BYTES == SLOTS["attention_ref"]


def test_empty_placed_unknown_slot():
    with pytest.raises(KeyError):
        empty_placed((4,), torch.empty(1), "nope")


def test_attention_states_get_distinct_page_offsets():
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 16, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    att = EventfulAttention(backend="ops")
    att(q, k, v, 0.3)
    att(q + 0.1, k, v, 0.3, index=torch.tensor([[1, 5]]))
    offsets = {
        "logits": att.qk_buffer.logits.data_ptr() % PAGE_BYTES,
        "attention": att.workspace.get("attention", (b, h, n, n), q, "attention").data_ptr() % PAGE_BYTES,
        "attention_ref": att.av_buffer.a_ref.data_ptr() % PAGE_BYTES,
    }
    assert offsets == SLOTS


def test_workspace_caches_by_name_shape_dtype():
    ws = Workspace()
    like = torch.empty(1)
    a = ws.get("attention", (2, 3, 4), like, "attention")
    assert ws.get("attention", (2, 3, 4), like, "attention") is a
    assert a.data_ptr() % PAGE_BYTES == SLOTS["attention"]
    b = ws.get("attention", (2, 3, 5), like, "attention")  # another shape: its own buffer, the first one kept
    assert b is not a and ws.get("attention", (2, 3, 4), like, "attention") is a
    c = ws.get("attention", (2, 3, 4), torch.empty(1, dtype=torch.bfloat16), "attention")
    assert c.dtype == torch.bfloat16 and len(ws) == 3
    ws.clear()
    assert len(ws) == 0 and ws.get("attention", (2, 3, 4), like, "attention") is not a


def test_shared_workspace_gives_the_same_outputs():
    """Two attention states sharing one softmax scratch buffer, interleaved, match two with their own."""
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 12, 8
    shared = Workspace()
    pairs = []
    for _ in range(2):
        own, sharing = EventfulAttention(backend="ops"), EventfulAttention(backend="ops")
        sharing.workspace = shared
        pairs.append((own, sharing))
    for step in range(4):
        for own, sharing in pairs:  # block 0 then block 1, as in a model
            q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
            index = None if step == 0 else torch.stack([torch.randperm(n)[:5] for _ in range(b)])
            expected = own(q, k, v, 0.3, index=index).clone()
            got = sharing(q, k, v, 0.3, index=index)
            assert torch.equal(got, expected)
    assert len(shared) == 1
