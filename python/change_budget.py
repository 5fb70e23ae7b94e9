"""Change the compute budget of a running stream at any frame: top-r, a fraction of the tokens, or a threshold.

    python python/change_budget.py

A small ViT on synthetic frames (a bright square moving over a still background): the budget follows a schedule,
and the compute of each frame is printed. The stream is never reset.
"""
import torch

from eventful_kernels.models import convert, import_timm
from eventful_kernels.nn import Threshold, TopK


def moving_square(t: int, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g) * 0.2
    x[..., 40 + 6 * t: 90 + 6 * t, 60:110] = 1.0
    return x


def main():
    torch.manual_seed(0)
    dense = import_timm().create_model("vit_small_patch16_224", pretrained=False).eval()
    model = convert(dense, TopK(49))
    schedule = {4: 0.5, 8: TopK(16), 12: Threshold(2.0, capacity=64)}  # frame -> new budget
    with torch.no_grad():
        for t in range(16):
            if t in schedule:
                model.set_budget(schedule[t])
                print(f"-- budget now {schedule[t]!r}")
            model(moving_square(t))
            per_block = [blk.last_macs / 1e6 for blk in model.eventful_blocks()]
            print(f"frame {t:2d}: {model.macs_last_frame() / 1e9:5.2f} GMACs; first blocks (MMACs): "
                  + ", ".join(f"{m:.0f}" for m in per_block[:4]))


if __name__ == "__main__":
    main()
