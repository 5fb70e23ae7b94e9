"""Call the fused ops directly, next to their pure-PyTorch references (eventful_kernels.reference).

    python python/call_ops.py

One eventful step by hand: a gate picks the K tokens of a [B, N, D] stream that moved most, the changed rows and
columns of the attention logits are recomputed in place, and A·V is patched with an exact delta.
"""
import torch

from eventful_kernels import ops, reference

B, N, D, H, d, K = 2, 196, 384, 6, 64, 49
torch.manual_seed(0)

# Gate: top-K tokens by ||c - ref||, the reference updated at those tokens.
c, ref = torch.randn(B, N, D), torch.randn(B, N, D)
ref_expected = ref.clone()
index, c_sel = ops.token_gate(c, ref, K)  # index [B, K] int64, c_sel [B, K, D]; ref updated in place
index_r, c_sel_r = reference.token_gate(c, ref_expected, K)
assert torch.equal(index.sort(-1).values, index_r.sort(-1).values) and torch.equal(ref, ref_expected)
print("token_gate: selected", tuple(index.shape), "tokens; the reference agrees")

# Row gather / scatter (any -1 in an index is an empty slot, skipped).
rows = ops.gather_rows(c, index)
torch.testing.assert_close(rows, c_sel)
buffer = torch.zeros(B, N, D)
ops.scatter_rows_(buffer, index, rows)
print("gather_rows / scatter_rows_: rows moved,", int((buffer.abs().sum(-1) > 0).sum()), "tokens written")

# Attention state: logits [B, H, N, N] patched at the K changed rows and columns.
q, k = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
logits = q @ k.transpose(-1, -2) * d ** -0.5
q2, k2 = q.clone(), k.clone()
q2[:, :, index[0]] += 1.0  # pretend the selected tokens of stream 0 changed (same ids used for every stream here)
k2[:, :, index[0]] += 1.0
same = index[:1].expand(B, K).contiguous()
ops.qk_update_(logits, q2, k2, same, same, d ** -0.5)
torch.testing.assert_close(logits, q2 @ k2.transpose(-1, -2) * d ** -0.5, rtol=1e-4, atol=1e-4)
print("qk_update_: the patched logits equal a dense recomputation")

# A·V: out += A_new[:, :, :, K] @ V_new[K] - A_ref[:, :, :, K] @ V_ref[K]; the references are updated.
a_ref, v_ref = torch.softmax(torch.randn(B, H, N, N), -1), torch.randn(B, H, N, d)
out = a_ref @ v_ref
a_new, v_new = a_ref.clone(), v_ref.clone()
a_new[..., same[0]] = torch.rand(B, H, N, K)
v_new[:, :, same[0]] += 0.5
ops.av_delta_update_(out, a_new, a_ref, v_new, v_ref, same)
torch.testing.assert_close(out, a_new @ v_new, rtol=1e-4, atol=1e-4)
print("av_delta_update_: the accumulated output equals A_new @ V_new")
