"""Convert a timm ViT or a Hugging Face vision encoder into an :class:`EventfulModel` that shares its weights.

Supported: timm ``VisionTransformer`` (every block global -> ``EventfulBlock``) and ``VisionTransformerSAM``
(``samvit_*``: windowed blocks -> ``EventfulTokenwiseBlock``, global blocks -> ``EventfulBlock``); transformers
``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel``, ``SiglipVisionModel``
(:mod:`.hf`: every layer -> ``EventfulBlock``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import EventfulBlock, EventfulTokenwiseBlock
from ..nn.linear import copy_module, with_packed_convs
from ._timm import import_timm
from .eventful_model import EventfulModel
from .hf import convert_hf, hf_family, hf_pool_geometry
from ..nn.policies import Budget, as_policy


def model_family(model: nn.Module) -> str:
    """``"vit"`` for timm ``VisionTransformer``, ``"sam"`` for ``VisionTransformerSAM``, ``"hf-vit"`` /
    ``"hf-dinov2"`` / ``"hf-dinov2-registers"`` / ``"hf-clip"`` / ``"hf-siglip"`` for the supported Hugging Face
    encoders; TypeError otherwise."""
    family = hf_family(model)
    if family is not None:
        return family
    timm = import_timm()
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(model, VisionTransformerSAM):
        return "sam"
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return "vit"
    raise TypeError(
        "convert: model must be a timm VisionTransformer or VisionTransformerSAM or a supported Hugging Face vision "
        f"encoder, got {type(model).__name__}"
    )


def _check_block(block: nn.Module, i: int) -> None:
    attn = getattr(block, "attn", None)
    needed = ("norm1", "attn", "norm2", "mlp")
    if attn is None or not all(hasattr(block, a) for a in needed) or not hasattr(attn, "qkv"):
        raise TypeError(
            f"convert: block {i} ({type(block).__name__}) is not a standard pre-norm ViT block "
            "(needs norm1, attn.qkv, attn.proj, norm2, mlp)"
        )


def convert(
    model: nn.Module,
    policy: Optional[Budget] = None,
    backend: str = "ops",
    strategy: Optional[str] = None,
    cuda_graphs: bool = True,
    refresh_every: Optional[int] = None,
    gate_placement: str = "after_norm",
    kv_pool: Optional[int] = None,
    av_dtype: Optional[torch.dtype] = None,
) -> EventfulModel:
    """Wrap ``model``'s blocks in eventful blocks; returns an :class:`EventfulModel` sharing every weight.

    ``model`` itself is left unchanged (still the dense model) except that both are put in eval mode.
    ``policy``: an int (top-r tokens), a float (fraction of tokens) or a policy; default all tokens (r = N).
    ``strategy``: attention of the global blocks, ``"auto"`` / ``"eventful"`` / ``"dense"`` (see
    :mod:`eventful_kernels.nn.strategy`); default ``EVENTFUL_ATTENTION`` or ``"auto"``. ``cuda_graphs``: replay
    each steady-state frame on CUDA inputs as one captured CUDA graph (see :class:`EventfulModel`; on by default,
    ``False`` runs every frame eagerly). ``refresh_every``: recompute the state densely (in place) every that many
    steady-state frames, which bounds the drift of the accumulated A·V deltas (see :meth:`EventfulModel.refresh`).
    ``gate_placement``: ``"after_norm"`` (default, as published: the gates score LayerNorm-ed tokens) or
    ``"before_norm"`` (the gates score the residual stream; LayerNorm only on the selected rows).

    Options of the published method, for the global blocks (``EventfulBlock``; windowed blocks are left as they are,
    as in the published configurations): ``kv_pool`` (None or the pooling size, e.g. 2): keys and values
    average-pooled over ``kv_pool x kv_pool`` cells of the patch grid; ViT prefix tokens (class / register tokens,
    ``model.num_prefix_tokens``) stay unpooled; the grid is ``model.patch_embed.grid_size`` (with
    ``dynamic_img_size``: the square grid of the tokens). ``av_dtype`` (None, ``torch.float16`` or
    ``torch.bfloat16``): the attention weights and values of the A·V product, and its stored references, in that
    dtype, the output accumulated in float32. See docs/nn-api.md, "Published options".
    A Hugging Face encoder's eventful model returns a ``BaseModelOutputWithPooling`` as the dense model does.
    """
    family = model_family(model)
    pol = as_policy(policy)
    options = {"kv_pool": kv_pool, "av_dtype": av_dtype}
    if family.startswith("hf-"):
        if kv_pool:
            options.update(hf_pool_geometry(model, family))
        return convert_hf(model, family, pol, backend, strategy, cuda_graphs, refresh_every, gate_placement,
                          **options)
    if family == "vit" and kv_pool:
        options["prefix_tokens"] = int(getattr(model, "num_prefix_tokens", 0))
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None and not getattr(model, "dynamic_img_size", False):
            options["kv_grid"] = (int(grid[0]), int(grid[1]))
    blocks = []
    for i, block in enumerate(model.blocks):
        _check_block(block, i)
        windowed = family == "sam" and getattr(block, "window_size", 0) > 0
        if windowed:
            blocks.append(EventfulTokenwiseBlock(block, pol, backend=backend, gate_placement=gate_placement))
        else:
            blocks.append(EventfulBlock(block, pol, backend=backend, strategy=strategy, gate_placement=gate_placement,
                                        **options))
    # Shallow copy with its own child table: the copy gets eventful blocks, the original keeps its dense ones;
    # every other submodule (norms, head) is the same object in both. With the "ops" backend the patch embedding
    # and SAM's neck are copied too (parameters shared), so their convs can run as packed linears (PackedConv) in
    # the eventful model only.
    twin = copy_module(model)
    twin.blocks = nn.Sequential(*blocks)
    if backend == "ops":
        with_packed_convs(twin, "patch_embed")
        with_packed_convs(twin, "neck")
    if hasattr(twin, "grad_checkpointing"):
        twin.grad_checkpointing = False
    return EventfulModel(twin, pol, dense=model, family=family, backend=backend, cuda_graphs=cuda_graphs,
                         refresh_every=refresh_every)
