"""Tiny timm models and synthetic videos for the model-level tests (fast on 2 CPU cores)."""
import torch

from eventful_kernels.models import import_timm

timm = import_timm()
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.vision_transformer_sam import VisionTransformerSAM  # noqa: E402

VIT_TOKENS = 17  # (32 / 8)^2 patches + class token
SAM_TOKENS = 64  # (64 / 8)^2 patches; window 3 does not divide the 8x8 grid, so windowed blocks pad to 9x9


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialized ones (biases, SAM rel-pos tables, pos-embed) matter."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return _perturb(m, seed)


def tiny_sam(seed: int = 0) -> VisionTransformerSAM:
    torch.manual_seed(seed)
    m = VisionTransformerSAM(
        img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,),
        use_rel_pos=True, neck_chans=16, global_pool="", num_classes=0,
    )
    return _perturb(m, seed)


def video(frames: int, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``[T, B, 3, size, size]``: a static noisy background with a bright square moving across it and small
    per-frame noise, so a few tokens change a lot and the rest a little (like real video)."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(batch, 3, size, size, generator=g)
    out = []
    side = size // 4
    for t in range(frames):
        x = bg + 0.02 * torch.randn(batch, 3, size, size, generator=g)
        for b in range(batch):
            pos = (t * (3 + b) + 5 * b) % (size - side)
            x[b, :, pos : pos + side, pos : pos + side] += 2.0
        out.append(x)
    return torch.stack(out)
