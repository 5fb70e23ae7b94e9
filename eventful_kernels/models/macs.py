"""MAC counts for the parts of a model outside its transformer blocks (patch embedding, heads, necks).

The eventful modules report their own counts (``eventful_kernels.counting``); the layers around them run densely
every frame in both the dense and the eventful model, so they are counted the same way for both: forward hooks on
every ``nn.Linear`` / ``nn.Conv2d`` outside the blocks add ``outputs x fan-in`` MACs while counting is on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, List

import torch
from torch import nn

from ..counting import LINEAR_TYPES


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, LINEAR_TYPES):
        return out.numel() * module.in_features
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


class OutsideMacCounter:
    """Counts Linear/Conv2d MACs of ``model`` outside ``blocks`` for the calls made inside :meth:`counting`.

    Hooks stay registered but count only while :meth:`counting` is active, so a dense model that shares these
    layers (weights shared with an eventful copy) never pollutes the count.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module]):
        inside = {id(m) for b in blocks for m in b.modules()}
        self.macs = 0
        self._active = False
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        for m in model.modules():
            if id(m) not in inside and isinstance(m, (*LINEAR_TYPES, nn.Conv2d)):
                self._handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, inputs, out):
        if self._active:
            self.macs += _layer_macs(module, out)

    @contextmanager
    def counting(self):
        """Reset the count, then count the layer calls made inside the ``with`` block."""
        self.macs = 0
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _block_macs(block: nn.Module, x: torch.Tensor) -> int:
    """Dense MACs of one timm block for input ``x`` ([B, N, D] or SAM's [B, H, W, D]), via the agreed formula."""
    from .. import counting

    batch, dim = x.shape[0], x.shape[-1]
    n_tokens = tuple(x.shape[1:3]) if x.dim() == 4 else x.shape[1]  # SAM layout [B, H, W, D]: the grid
    mlp_ratio = block.mlp.fc1.out_features / dim
    window = getattr(block, "window_size", 0) or None
    return batch * counting.dense_block_macs(n_tokens, dim, block.attn.num_heads, mlp_ratio, window=window)


def _hf_layer_macs(layers: List[nn.Module]):
    """``macs(layer, x)``: dense MACs of one of the Hugging Face encoder ``layers`` for ``x [B, N, D]``: its linears
    on every token plus attention (``2 * N * N * heads * head_dim``), the terms the eventful blocks count."""
    from .. import counting
    from .hf import HFBlock

    sizes = {}
    for layer in layers:
        attn = HFBlock(layer).attn
        sizes[id(layer)] = (counting.linear_macs_per_token(layer), attn.num_heads * attn.head_dim)

    def macs(layer: nn.Module, x: torch.Tensor) -> int:
        per_token, width = sizes[id(layer)]
        n = x.shape[1]
        return x.shape[0] * (n * per_token + 2 * n * n * width)

    return macs


class DenseMacCounter:
    """MACs of a dense timm ViT forward (blocks by ``counting.dense_block_macs``) or of a Hugging Face encoder
    (layers by their linears and attention); other layers by hooks."""

    def __init__(self, model: nn.Module):
        if type(model).__module__.startswith("transformers."):
            from .hf import dense_layers

            blocks = dense_layers(model)
            self._macs_of = _hf_layer_macs(blocks)
        else:
            blocks, self._macs_of = list(model.blocks), _block_macs
        self._outside = OutsideMacCounter(model, blocks)
        self._block_macs = 0
        self.n_tokens = None  # tokens per stream entering the first block, seen in the last counted forward
        self._handles = [b.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for b in blocks]

    def _pre_hook(self, block, args, kwargs):
        if self._outside._active:
            x = args[0] if args else kwargs["hidden_states"]
            if self.n_tokens is None:
                self.n_tokens = x[0, ..., 0].numel()
            self._block_macs += self._macs_of(block, x)

    @contextmanager
    def counting(self):
        self._block_macs = 0
        self.n_tokens = None
        with self._outside.counting():
            yield self

    @property
    def macs(self) -> int:
        return self._block_macs + self._outside.macs

    def remove(self) -> None:
        """Unregister every hook from the model."""
        self._outside.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
