"""Tiny Hugging Face vision encoders (random weights, built from configs; nothing downloaded) for the HF tests."""
import torch

from eventful_kernels.models.hf import import_transformers

transformers = import_transformers()

SIZE = 32  # 32 px frames, 8 px patches: a 4 x 4 grid
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=8)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised ones (biases, register tokens, the CLS token) and the
    LayerNorm / layer-scale values matter."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(cls, config, seed: int):
    torch.manual_seed(seed)
    return _perturb(cls(config), seed)


def tiny_vit(seed: int = 0):
    """ViTModel with its tanh pooler; 17 tokens (CLS + 16)."""
    return _build(transformers.ViTModel, transformers.ViTConfig(intermediate_size=64, **_COMMON), seed)


def tiny_dinov2(seed: int = 0):
    """Dinov2Model with layer scale and the plain GELU MLP; 17 tokens."""
    cfg = transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **_COMMON)
    return _build(transformers.Dinov2Model, cfg, seed)


def tiny_dinov2_registers(seed: int = 0):
    """Dinov2WithRegistersModel with 4 register tokens and the SwiGLU MLP; 21 tokens (CLS + 4 registers + 16)."""
    cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, use_swiglu_ffn=True, layerscale_value=0.5,
                                                 **_COMMON)
    return _build(transformers.Dinov2WithRegistersModel, cfg, seed)


def tiny_clip(seed: int = 0):
    """CLIPVisionModel (quick_gelu, pre_layrnorm, post_layernorm on the pooled CLS token); 17 tokens."""
    cfg = transformers.CLIPVisionConfig(intermediate_size=64, hidden_act="quick_gelu", **_COMMON)
    return _build(transformers.CLIPVisionModel, cfg, seed)


def tiny_siglip(seed: int = 0):
    """SiglipVisionModel (no CLS token, tanh-GELU, attention-pooling head); 16 tokens."""
    cfg = transformers.SiglipVisionConfig(intermediate_size=64, **_COMMON)
    return _build(transformers.SiglipVisionModel, cfg, seed)


MODELS = {
    "vit": (tiny_vit, 17),
    "dinov2": (tiny_dinov2, 17),
    "dinov2_registers": (tiny_dinov2_registers, 21),
    "clip": (tiny_clip, 17),
    "siglip": (tiny_siglip, 16),
}
