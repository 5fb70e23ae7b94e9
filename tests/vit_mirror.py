"""Minimal dense ViT / ViTDet-SAM blocks for tests: timm's attribute names and math (non-fused attention path).

ViT ``Block``: ``x + ls1(attn(norm1(x)))`` then ``+ ls2(mlp(norm2(.)))`` on ``[B, N, D]``.
SAM ``Block``: ``[B, H, W, D]``; ``norm1``, window partition (zero padding to multiples of ``window_size``) when
``window_size > 0``, attention with the decomposed rel-pos bias when ``use_rel_pos``, unpartition, residual, MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-1, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None, qk_norm=False, inplace_ls=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim, init_values, inplace_ls) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values, inplace_ls) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def get_rel_pos(q_size, k_size, rel_pos):
    """Embeddings of the relative offsets (query i, key j), linearly resized to 2*max(q,k)-1 entries if needed."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        table = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    else:
        table = rel_pos
    qs, ks = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    offsets = torch.arange(q_size)[:, None] * qs - torch.arange(k_size)[None, :] * ks + (k_size - 1) * ks
    return table[offsets.long()]


def decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size):
    """q [B', N, C] on an (h, w) grid -> bias [B', N, N] with
    bias[(i_h,i_w),(j_h,j_w)] = q.R_h[i_h,j_h] + q.R_w[i_w,j_w]."""
    h, w = size
    rh, rw = get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w)
    bq = q.reshape(q.shape[0], h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", bq, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", bq, rw)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], h * w, h * w)


class SamAttention(nn.Module):
    def __init__(self, dim, num_heads, use_rel_pos=False, input_size=None, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.randn(2 * input_size[0] - 1, self.head_dim) * 0.5)
            self.rel_pos_w = nn.Parameter(torch.randn(2 * input_size[1] - 1, self.head_dim) * 0.5)

    def forward(self, x):
        b, h, w, _ = x.shape
        qkv = self.qkv(x.reshape(b, h * w, -1)).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            q_rows = q.reshape(b * self.num_heads, h * w, -1)
            bias = decomposed_rel_pos_bias(q_rows, self.rel_pos_h, self.rel_pos_w, (h, w))
            attn = attn + bias.view(b, self.num_heads, h * w, h * w)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(x)


def window_partition(x, ws):
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


def window_unpartition(windows, ws, pad_hw, hw):
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // ws // ws)
    x = windows.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


class SamBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, use_rel_pos=False, window_size=0, input_size=None,
                 init_values=None, qk_norm=False):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SamAttention(dim, num_heads, use_rel_pos,
                                 input_size if window_size == 0 else (window_size, window_size), qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        b, h, w, _ = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)
        x = self.drop_path1(self.ls1(self.attn(x)))
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        x = x.reshape(b, h * w, -1)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.reshape(b, h, w, -1)
