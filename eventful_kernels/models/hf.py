"""Hugging Face vision encoders as eventful models: ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
``CLIPVisionModel`` and ``SiglipVisionModel`` (``transformers``, the optional ``hf`` extra).

Each encoder layer is presented to :class:`~eventful_kernels.nn.EventfulBlock` as the timm-style block it expects
(:class:`HFBlock`: ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) by adapter modules
that hold the layer's own submodules: nothing is copied, so weight changes are seen as in the timm models (docs,
"Weights and stream state"). The separate ``q_proj``/``k_proj``/``v_proj`` become one
:class:`~eventful_kernels.nn.linear.ConcatLinear`; the ops backend runs it on one packed copy of the stacked weights,
keyed and fingerprinted per source weight. :class:`HFVisionEncoder` runs the encoder's forward (embeddings, the
eventful blocks, final norms, pooling) and returns what the dense model returns: a ``BaseModelOutputWithPooling``
with ``last_hidden_state`` and ``pooler_output`` (None where the model has no pooler).
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn

from ..nn import EventfulBlock
from ..nn.linear import ConcatLinear, copy_module, with_packed_conv, with_packed_convs
from ._timm import import_torchvision

# Supported model classes -> family; the family names the forward of HFVisionEncoder and the stream checkpoints.
FAMILIES = {
    "ViTModel": "hf-vit",
    "Dinov2Model": "hf-dinov2",
    "Dinov2WithRegistersModel": "hf-dinov2-registers",
    "CLIPVisionModel": "hf-clip",
    "SiglipVisionModel": "hf-siglip",
}

# Encoder layer class -> its (norm1, attention, layer scale 1, norm2, layer scale 2) attribute names; the MLP is
# ``mlp`` in all. Each of these layers computes x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).
_LAYERS = {
    "ViTLayer": ("layernorm_before", "attention", None, "layernorm_after", None),
    "Dinov2Layer": ("norm1", "attention", "layer_scale1", "norm2", "layer_scale2"),
    "Dinov2WithRegistersLayer": ("norm1", "attention", "layer_scale1", "norm2", "layer_scale2"),
    "CLIPEncoderLayer": ("layer_norm1", "self_attn", None, "layer_norm2", None),
    "SiglipEncoderLayer": ("layer_norm1", "self_attn", None, "layer_norm2", None),
}


def import_transformers():
    """Return the ``transformers`` module (torchvision made importable first); ImportError naming the extra."""
    import_torchvision()
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("eventful: Hugging Face models need the 'hf' extra (transformers); run `bash install.sh` "
                          "or see pyproject.toml [project.optional-dependencies] hf") from exc
    return transformers


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def hf_family(model: nn.Module) -> Optional[str]:
    """The family of a supported Hugging Face vision encoder (``"hf-vit"``, ``"hf-dinov2"``,
    ``"hf-dinov2-registers"``, ``"hf-clip"``, ``"hf-siglip"``); None for a model that is not from transformers; a
    TypeError for an unsupported transformers model (naming the vision tower to pass instead, where it has one)."""
    if not _is_hf(model):
        return None
    family = FAMILIES.get(type(model).__name__)
    if family is not None:
        return family
    for name in ("vision_model", "vit", "dinov2"):
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module) and FAMILIES.get(type(tower).__name__):
            raise TypeError(f"convert: {type(model).__name__} is not a vision encoder; pass its vision tower "
                            f"(model.{name}, a {type(tower).__name__})")
    raise TypeError(f"convert: unsupported transformers model {type(model).__name__}; supported: "
                    f"{', '.join(FAMILIES)}")


def dense_layers(model: nn.Module) -> List[nn.Module]:
    """The encoder layers of a supported Hugging Face vision encoder, in order."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(model, "layers", None)
    if layers is None and encoder is not None:
        layers = getattr(encoder, "layers", None)
        if layers is None:
            layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"convert: {type(model).__name__} has no encoder layer list")
    return list(layers)


class HFAttention(nn.Module):
    """A Hugging Face self-attention presented as timm's ``Attention``: ``qkv`` (a ConcatLinear of its
    ``q_proj``, ``k_proj``, ``v_proj``: ``[..., D] -> [..., 3 * heads * head_dim]``), ``proj`` (its output
    projection), ``num_heads``, ``head_dim``, ``scale``. Holds the layer's own linears."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(f"convert: attention {type(attn).__name__} has no '{name}'")
        self.qkv = ConcatLinear(q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj)
        self.proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        heads = attn.num_attention_heads if hasattr(attn, "num_attention_heads") else attn.num_heads
        self.num_heads = int(heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling if hasattr(attn, "scaling") else attn.scale)
        width = self.num_heads * self.head_dim
        if any(p.out_features != width for p in self.qkv.parts()):
            raise ValueError(f"convert: q/k/v projections of {type(attn).__name__} must each give heads * head_dim "
                             f"= {width} features")


class HFLayerScale(nn.Module):
    """A DINOv2 layer scale (``y * lambda1``) presented with timm's ``gamma``, so the blocks fuse it into the
    residual add; holds the layer's own module."""

    scales_by_gamma = True

    def __init__(self, scale: nn.Module):
        super().__init__()
        self.scale = scale

    @property
    def gamma(self) -> Tensor:
        return self.scale.lambda1

    def forward(self, y: Tensor) -> Tensor:
        return self.scale(y)


class HFBlock(nn.Module):
    """A Hugging Face pre-norm encoder layer (:data:`_LAYERS`) presented as a timm ``Block`` (``norm1``, ``attn``,
    ``ls1``, ``norm2``, ``mlp``, ``ls2``) for the eventful blocks. Its submodules are the layer's own."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        names = _LAYERS.get(type(layer).__name__) if _is_hf(layer) else None
        if names is None:
            raise TypeError(f"convert: unsupported encoder layer {type(layer).__name__}; supported: "
                            f"{', '.join(_LAYERS)}")
        norm1, attn, ls1, norm2, ls2 = names
        self.norm1 = getattr(layer, norm1)
        self.attn = HFAttention(getattr(layer, attn))
        self.ls1 = HFLayerScale(getattr(layer, ls1)) if ls1 else nn.Identity()
        self.norm2 = getattr(layer, norm2)
        self.mlp = layer.mlp
        self.ls2 = HFLayerScale(getattr(layer, ls2)) if ls2 else nn.Identity()


def _embeddings(embeddings: nn.Module) -> nn.Module:
    """``embeddings`` as the eventful model holds it: a shallow copy (parameters shared, state-dict names unchanged)
    whose patch conv (``patch_embeddings.projection``: ViT, DINOv2; ``patch_embedding``: CLIP, SigLIP) runs through
    :class:`~eventful_kernels.nn.linear.PackedConv`; the dense model's modules are left as they are."""
    twin = copy_module(embeddings)
    with_packed_convs(twin, "patch_embeddings")  # ViT, DINOv2: its projection
    with_packed_conv(twin, "patch_embedding")  # CLIP, SigLIP
    return twin


class HFVisionEncoder(nn.Module):
    """The forward of a Hugging Face vision encoder over eventful blocks: ``frames [B, 3, H, W]`` ->
    ``BaseModelOutputWithPooling(last_hidden_state [B, N, D], pooler_output)`` as the dense model computes them
    (ViT: final LayerNorm, pooler on the CLS token if present; DINOv2: final LayerNorm, pooled = CLS token; CLIP:
    ``pre_layrnorm`` before the blocks, tokens un-normed, pooled = ``post_layernorm`` of the CLS token; SigLIP:
    ``post_layernorm``, pooled = the attention-pooling head, run densely on the tokens, if present). Holds the dense
    model's own embedding (with ``packed``, the "ops" backend: a shallow copy whose patch conv may run as a packed
    linear, parameters shared), norm and pooling modules."""

    def __init__(self, dense: nn.Module, family: str, blocks: List[nn.Module], packed: bool = True):
        super().__init__()
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        self._output = BaseModelOutputWithPooling
        self.family = family
        self.embeddings = _embeddings(dense.embeddings) if packed else dense.embeddings
        self.pre_norm = dense.pre_layrnorm if family == "hf-clip" else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.norm = dense.post_layernorm if family in ("hf-clip", "hf-siglip") else dense.layernorm
        if family == "hf-vit":
            self.pooler = dense.pooler
        elif family == "hf-siglip":
            self.pooler = dense.head if dense.use_head else None
        else:
            self.pooler = None

    def forward(self, frames: Tensor):
        x = self.blocks(self.pre_norm(self.embeddings(frames)))
        if self.family == "hf-clip":
            return self._output(last_hidden_state=x, pooler_output=self.norm(x[:, 0]))
        last = self.norm(x)
        if self.family.startswith("hf-dinov2"):
            pooled = last[:, 0]
        else:
            pooled = None if self.pooler is None else self.pooler(last)
        return self._output(last_hidden_state=last, pooler_output=pooled)


def hf_pool_geometry(model: nn.Module, family: str) -> dict:
    """K/V pooling geometry of a Hugging Face encoder: its prefix tokens (class and register tokens, never pooled)
    and its patch grid."""
    cfg = model.config
    prefix = 0 if family == "hf-siglip" else 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    side = int(cfg.image_size) // int(cfg.patch_size)
    return {"prefix_tokens": prefix, "kv_grid": (side, side)}


def convert_hf(model: nn.Module, family: str, policy, backend: str, strategy: Optional[str], cuda_graphs: bool,
               refresh_every: Optional[int], gate_placement: str, **block_options):
    """The :class:`EventfulModel` of a supported Hugging Face vision encoder (see :func:`convert`);
    ``block_options`` go to every :class:`EventfulBlock` (the published options ``kv_pool``, ``av_dtype``)."""
    from .eventful_model import EventfulModel

    import_transformers()
    model.eval()
    blocks = [EventfulBlock(HFBlock(layer), policy, backend=backend, strategy=strategy, gate_placement=gate_placement,
                            **block_options)
              for layer in dense_layers(model)]
    encoder = HFVisionEncoder(model, family, blocks, packed=backend == "ops")
    return EventfulModel(encoder, policy, dense=model, family=family, backend=backend, cuda_graphs=cuda_graphs,
                         refresh_every=refresh_every)
