"""``eventful-video --overlay``: the video with the tokens each frame re-processed highlighted, over a strip of the
compute per frame (eventful against dense), as an MP4 (PyAV) and an animated GIF (Pillow).

The updated tokens come from the blocks' gates, read by forward hooks on every eventful block's ``qkv_gate``
(its forward returns ``(index [B, K], c_sel)``: the tokens whose qkv, attention rows and columns the block
recomputes; ``-1`` entries are empty slots). Token ids are row-major over the patch grid, after the class / prefix
tokens of timm ViTs (SAM blocks take the ``[B, H, W, D]`` grid itself, no prefix). The module layer is untouched.

Each output frame: the input frame, patches that no block re-processed shown in dim grey, re-processed ones in
colour, tinted by how many blocks re-processed them (summed over blocks: red = one block ... yellow = all) or, for
one block (``--overlay-block i``), in a single tint; below it a strip of GFLOPs per frame, dense against eventful,
with the current frame marked.
"""
from __future__ import annotations

from fractions import Fraction
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..models import EventfulModel
from ..nn.policies import as_policy
from .decode import normalize

TARGET_SIZE = 384  # display size of the picture panel, in pixels (cells of whole pixels: close to it)
SINGLE_TINT = (1.0, 0.15, 0.1)  # one block: re-processed patches in red
TINT = 0.65  # share of the tint in a re-processed patch (the rest is the picture)


class SelectionRecorder:
    """Forward hooks on each eventful block's ``qkv_gate``: which patches every block re-processed in the last
    frame (stream 0), as ``maps() -> bool [blocks, rows, cols]``."""

    def __init__(self, ev: EventfulModel, grid: Tuple[int, int]):
        self.grid = grid
        self.blocks = list(ev.eventful_blocks())
        self._maps: List[Optional[torch.Tensor]] = [None] * len(self.blocks)
        self._handles = [b.qkv_gate.register_forward_hook(partial(self._hook, i)) for i, b in enumerate(self.blocks)]

    def _hook(self, i: int, module, args, out) -> None:
        n = args[0].shape[1]
        rows, cols = self.grid
        prefix = n - rows * cols
        if prefix < 0:
            raise ValueError(f"overlay: block {i} sees {n} tokens, fewer than the {rows}x{cols} patch grid")
        index = out[0][0].detach().to("cpu", torch.long)
        index = index[(index >= prefix) & (index < n)] - prefix  # -1 empty slots and prefix tokens dropped
        sel = torch.zeros(rows * cols, dtype=torch.bool)
        sel[index] = True
        self._maps[i] = sel.view(rows, cols)

    def maps(self) -> torch.Tensor:
        if any(m is None for m in self._maps):
            raise RuntimeError("overlay: a block's gate did not run this frame")
        out = torch.stack(self._maps)
        self._maps = [None] * len(self.blocks)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def record(ev: EventfulModel, frames: torch.Tensor, mean, std, budget, grid: Tuple[int, int],
           tick: Callable[[], None] = lambda: None) -> Tuple[torch.Tensor, List[float]]:
    """Run ``ev`` from a fresh state at ``budget`` over ``frames [T,3,H,W]`` uint8 (its device and dtype) and return
    the patches each block re-processed, ``bool [T, blocks, rows, cols]``, and the GFLOPs of each frame."""
    p = next(ev.parameters())
    ev.reset()
    ev.set_budget(as_policy(budget))
    rec = SelectionRecorder(ev, grid)
    maps, gflops = [], []
    try:
        for frame in frames:
            ev(normalize(frame[None], mean, std).to(device=p.device, dtype=p.dtype))
            maps.append(rec.maps())
            gflops.append(2 * ev.macs_last_frame() / 1e9)
            tick()
    finally:
        rec.remove()
    return torch.stack(maps), gflops


def heat(maps: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """``uint8 [T, rows, cols]``: how many blocks re-processed each patch (``block=None``), or whether block
    ``block`` did (0/1)."""
    if block is not None:
        return maps[:, block].to(torch.uint8)
    return maps.sum(1).to(torch.uint8)


def cell_size(grid: Tuple[int, int], target: int = TARGET_SIZE) -> int:
    """Display pixels per patch: about ``target`` pixels across, whole pixels, an even panel size (for MP4)."""
    rows, cols = grid
    cell = max(1, round(target / max(rows, cols)))
    if (cell * rows) % 2 or (cell * cols) % 2:
        cell += 1
    return cell


def tint_colors(values: torch.Tensor, vmax: int) -> torch.Tensor:
    """``float [..., 3]`` tint of patches re-processed by ``values`` (1..vmax) blocks: red (1) to yellow (vmax);
    ``SINGLE_TINT`` when ``vmax`` is 1."""
    if vmax <= 1:
        return torch.tensor(SINGLE_TINT).expand(*values.shape, 3)
    w = ((values.float() - 1) / (vmax - 1)).clamp(0, 1)
    return torch.stack([torch.ones_like(w), 0.1 + 0.85 * w, torch.zeros_like(w)], -1)


def render_panel(frame: torch.Tensor, counts: torch.Tensor, vmax: int, cell: int) -> np.ndarray:
    """The picture panel: ``frame [3, S, S]`` uint8 resized to the grid at ``cell`` pixels per patch; patches with
    ``counts [rows, cols]`` > 0 in colour with their tint, the others in dim grey. Returns ``uint8 [H, W, 3]``."""
    rows, cols = counts.shape
    h, w = rows * cell, cols * cell
    img = F.interpolate(frame[None].float() / 255.0, size=(h, w), mode="bilinear", antialias=h < frame.shape[-2],
                        align_corners=False)[0].clamp(0, 1).permute(1, 2, 0)  # [H, W, 3]
    grey = (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]
    dim = (0.12 + 0.45 * grey).expand(h, w, 3)
    pix = counts.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    tint = tint_colors(pix.clamp_min(1), vmax)
    lit = (1 - TINT) * img + TINT * tint
    out = torch.where((pix > 0)[..., None], lit, dim)
    return (out * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def gflops_text(x: float) -> str:
    """GFLOPs to show: two decimals, or three significant digits below 1."""
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


class Strip:
    """Matplotlib strip of GFLOPs per frame (dense and eventful) with the current frame marked, ``width x height``
    pixels; :meth:`draw` ``(t) -> uint8 [height, width, 3]``."""

    def __init__(self, gflops: Sequence[float], dense_gflops: Sequence[float], width: int, height: int, label: str,
                 legend: str):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.width, self.height = width, height
        self.gflops, self.dense = list(gflops), list(dense_gflops)
        dpi = 100
        self.fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        font = max(6.0, min(9.0, width / 55))
        ax = self.fig.add_axes((0.14, 0.19, 0.83, 0.55))
        xs = list(range(len(self.gflops)))
        ax.plot(xs, self.dense, "--", color="0.35", lw=1.2, label="dense")
        ax.plot(xs, self.gflops, color="tab:orange", lw=1.0, alpha=0.35)
        (self._past,) = ax.plot([], [], color="tab:orange", lw=1.8, label=f"eventful {label}")
        (self._dot,) = ax.plot([], [], "o", color="tab:red", ms=4)
        self._cursor = ax.axvline(0, color="tab:red", lw=0.8, alpha=0.6)
        top = max(self.gflops + self.dense) * 1.12 or 1.0
        ax.set_ylim(0, top)
        ax.set_xlim(-0.5, max(len(xs) - 0.5, 0.5))
        ax.set_ylabel("GFLOPs", fontsize=font)
        ax.set_xlabel("frame", fontsize=font, labelpad=1)
        ax.tick_params(labelsize=font - 1, pad=1)
        ax.legend(fontsize=font - 1, loc="lower left", ncol=2, framealpha=0.85)
        ax.grid(alpha=0.3)
        self._title = self.fig.text(0.02, 0.97, "", fontsize=font, va="top")
        self.fig.text(0.02, 0.97 - 1.6 * font / height, legend, fontsize=font - 1, va="top", color="0.3")

    def draw(self, t: int) -> np.ndarray:
        xs = list(range(t + 1))
        self._past.set_data(xs, self.gflops[: t + 1])
        self._dot.set_data([t], [self.gflops[t]])
        self._cursor.set_xdata([t, t])
        share = self.gflops[t] / self.dense[t] if self.dense[t] else float("nan")
        self._title.set_text(f"frame {t}: {gflops_text(self.gflops[t])} GFLOPs, {share:.0%} of dense")
        self.canvas.draw()
        buf = np.asarray(self.canvas.buffer_rgba())[..., :3]
        out = np.full((self.height, self.width, 3), 255, dtype=np.uint8)
        h, w = min(self.height, buf.shape[0]), min(self.width, buf.shape[1])
        out[:h, :w] = buf[:h, :w]
        return out


def compose(frames: torch.Tensor, counts: torch.Tensor, vmax: int, gflops: Sequence[float],
            dense_gflops: Sequence[float], label: str, legend: str,
            cell: Optional[int] = None) -> List[np.ndarray]:
    """The output frames: each picture panel over the compute strip; ``uint8 [H, W, 3]`` each, H and W even."""
    grid = tuple(counts.shape[1:])
    cell = cell or cell_size(grid)
    width = grid[1] * cell
    height = max(140, round(width * 0.5))
    height += height % 2
    strip = Strip(gflops, dense_gflops, width, height, label, legend)
    return [np.concatenate([render_panel(f, c, vmax, cell), strip.draw(t)], 0)
            for t, (f, c) in enumerate(zip(frames, counts))]


def write_mp4(path: str, images: Sequence[np.ndarray], fps: float) -> None:
    """H.264 (or MPEG-4 part 2 where libx264 is missing) MP4 through PyAV, yuv420p."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    h, w = images[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        else:
            stream.bit_rate = 8_000_000
        for img in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(path: str, images: Sequence[np.ndarray], fps: float) -> None:
    """Animated GIF (Pillow), looping."""
    from PIL import Image

    pics = [Image.fromarray(img) for img in images]
    duration = max(20, round(1000 / fps))
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=duration, loop=0)


def write(out_dir: str, frames: torch.Tensor, maps: torch.Tensor, gflops: Sequence[float],
          dense_gflops: Sequence[float], fps: float, label: str, block: Optional[int] = None) -> Dict:
    """Write ``overlay.mp4``, ``overlay.gif`` and ``overlay_heat.npy`` (the maps shown: ``uint8 [T, rows, cols]``,
    blocks that re-processed each patch, or 0/1 for one block) into ``out_dir``; returns their description."""
    import os

    counts = heat(maps, block)
    n_blocks = maps.shape[1]
    vmax = 1 if block is not None else n_blocks
    if block is None:
        legend = f"patch colour: blocks that re-processed it (red 1 .. yellow {n_blocks})"
    else:
        legend = f"red: patches block {block} re-processed"
    images = compose(frames, counts, vmax, gflops, dense_gflops, label, legend)
    paths = {k: os.path.join(out_dir, f"overlay.{k}") for k in ("mp4", "gif")}
    write_mp4(paths["mp4"], images, fps)
    write_gif(paths["gif"], images, fps)
    heat_path = os.path.join(out_dir, "overlay_heat.npy")
    np.save(heat_path, counts.numpy())
    return {
        "files": [paths["mp4"], paths["gif"], heat_path],
        "block": block,
        "blocks": n_blocks,
        "grid": list(counts.shape[1:]),
        "frames": len(images),
        "size": [int(images[0].shape[1]), int(images[0].shape[0])],
        "fps": fps,
        "patches_updated_per_frame": [int((c > 0).sum()) for c in counts],
        "gflops_per_frame": list(gflops),
        "dense_gflops_per_frame": list(dense_gflops),
    }
