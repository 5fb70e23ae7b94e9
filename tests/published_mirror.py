"""An independent, literal rendering of the published Eventful Transformers block algorithm (gates, buffers, the
QK^T buffer and the A·V delta accumulator) in plain PyTorch, for a timm-style ViT block (tests/vit_mirror.py).

Written from the method's description and the published implementation's semantics (top-k on the L2 norm of the
token error, the reference updated at the selected tokens only, gates after the LayerNorms unless
``gate_before_ln``): nothing here is shared with eventful_kernels, so it is an oracle for the library's blocks.
"""
from __future__ import annotations

import torch


class _Gate:
    def __init__(self):
        self.ref = None

    def __call__(self, c, k):
        if self.ref is None:
            self.ref = c.clone()
            return None, c
        error = torch.linalg.vector_norm(c - self.ref, dim=-1)
        index = error.topk(k, dim=-1, sorted=False).indices
        rows = index[..., None].expand(*index.shape, c.shape[-1])
        c_sel = c.gather(-2, rows)
        self.ref.scatter_(-2, rows, c_sel)
        return index, c_sel


class _Buffer:
    def __init__(self):
        self.state = None

    def __call__(self, x, index):
        if index is None:
            self.state = x.clone()
        else:
            self.state.scatter_(-2, index[..., None].expand(*index.shape, x.shape[-1]), x)
        return self.state


class PublishedBlock:
    """``block(x [B, N, D]) -> y``, eventful with ``k`` tokens per gate after the first (dense) call."""

    def __init__(self, block, k, gate_before_ln=False):
        self.block, self.k, self.before = block, k, gate_before_ln
        self.gates = [_Gate() for _ in range(3)]
        self.buffers = [_Buffer() for _ in range(3)]
        self.logits = self.out = self.a_ref = self.v_ref = None

    def _gated(self, i, x, norm, layer):
        if self.before:
            index, sel = self.gates[i](x, self.k)
            sel = norm(sel)
        else:
            index, sel = self.gates[i](norm(x), self.k)
        return index, self.buffers[i](layer(sel), index)

    @torch.no_grad()
    def __call__(self, x):
        blk, attn = self.block, self.block.attn
        b, n, dim = x.shape
        h, d = attn.num_heads, dim // attn.num_heads
        index, qkv = self._gated(0, x, blk.norm1, attn.qkv)
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * attn.scale
        if index is None:
            self.logits = q @ k.transpose(-2, -1)
        else:
            hi = index[:, None, :, None].expand(b, h, self.k, d)
            rows = q.gather(2, hi) @ k.transpose(-2, -1)
            self.logits.scatter_(2, index[:, None, :, None].expand(b, h, self.k, n), rows)
            cols = q @ k.gather(2, hi).transpose(-2, -1)
            self.logits.scatter_(3, index[:, None, None, :].expand(b, h, n, self.k), cols)
        a = self.logits.softmax(-1)
        if index is None:
            self.out, self.a_ref, self.v_ref = a @ v, a.clone(), v.clone()
        else:
            ci = index[:, None, None, :].expand(b, h, n, self.k)
            ri = index[:, None, :, None].expand(b, h, self.k, d)
            a_new, v_new = a.gather(3, ci), v.gather(2, ri)
            self.out += a_new @ v_new - self.a_ref.gather(3, ci) @ self.v_ref.gather(2, ri)
            self.a_ref.scatter_(3, ci, a_new)
            self.v_ref.scatter_(2, ri, v_new)
        o = self.out.transpose(1, 2).reshape(b, n, dim)
        _, p = self._gated(1, o, lambda t: t, attn.proj)
        x1 = x + blk.ls1(p.clone())
        _, m = self._gated(2, x1, blk.norm2, blk.mlp)
        return x1 + blk.ls2(m.clone())
