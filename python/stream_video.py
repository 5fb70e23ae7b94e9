"""Convert a timm ViT and stream a real video through it, frame by frame.

    python python/stream_video.py                      # ViT-B/16 on Big Buck Bunny, r = N/4, 16 frames
    python python/stream_video.py --frames 8 --model vit_small_patch16_224 --budget 0.5

The first frame runs dense (the flush); every later frame recomputes only the tokens that changed most. The weights
here are random (nothing is downloaded); load a checkpoint with eventful_kernels.models.load_checkpoint.
"""
import argparse

import torch

from eventful_kernels.models import convert, import_timm
from eventful_kernels.video.decode import normalize, read_frames, sample_video


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the tokens recomputed per frame")
    p.add_argument("--video", default="bigbuckbunny", help="bigbuckbunny, bikes, or a path")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    dense = import_timm().create_model(a.model, pretrained=False).eval()  # or load your checkpoint
    eventful = convert(dense, a.budget)  # shares dense's weights
    size = dense.patch_embed.img_size[0]
    path = a.video if a.video.endswith(".mp4") else sample_video(a.video)
    frames = normalize(read_frames(path, size, a.frames), dense.pretrained_cfg["mean"], dense.pretrained_cfg["std"])

    with torch.no_grad():
        dense_macs = None
        for t, frame in enumerate(frames):
            x = frame[None]  # [1, 3, H, W]: one stream
            y, want = eventful(x), dense(x)
            macs = eventful.macs_last_frame()
            if dense_macs is None:
                dense_macs = macs  # the flush frame runs the whole model
            err = float((y - want).norm() / want.norm())
            print(f"frame {t:3d}: {macs / 1e9:6.2f} GMACs ({dense_macs / macs:4.2f}x fewer than dense), "
                  f"relative deviation from dense {err:.3f}")


if __name__ == "__main__":
    main()
