"""Keep non-finite values out of a stream's state, without synchronising with the device.

An eventful model carries state from frame to frame: one frame with a NaN patch would otherwise poison it for good
(the A·V accumulator adds deltas forever). :class:`FrameScreen` guards a model's steady-state frames:

- ``screen(frames)``: per stream, the frame itself if all its values are finite, else the last clean frame of that
  stream. So a non-finite input frame never reaches the state: for its stream it acts as a repeat of the last clean
  frame, and ``finish`` replaces its output by NaN (that frame is lost, the stream is not);
- ``observe(tokens)`` (the owner calls it on the last block's output tokens: a non-finite value written into any
  token state reaches them through the residual stream in the same frame) and ``finish(out, clean)`` record whether
  a stream whose input was finite still produced a non-finite value (overflow inside the model).
  :meth:`poisoned` reads that flag on the host *one frame later without waiting*: on
  CUDA the flag is copied to pinned memory inside the frame and an event recorded after it; the flag is read only
  once the event has completed (usually by the next frame; a GPU running further behind is read a frame later).
  The owner then re-flushes the streams.

All device work is a few elementwise passes over the input frame and the output, and is CUDA-graph capturable.
An output may be a tensor or a pytree of them (a tuple, a dict, a Hugging Face ``ModelOutput``): every floating
tensor in it with one row per stream is checked and masked.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


def _finite_sum(t: Tensor, dim=None) -> Tensor:
    """Zero where every value of ``t`` (over ``dim``; all of it when None) is finite, NaN otherwise: ``0 * v`` is 0
    for a finite v and NaN for +-inf and NaN, and a sum of zeros is exactly 0. Two kernels (``isfinite().all()``
    takes five: at small batches a GPU frame costs about its launches)."""
    zeros = torch.mul(t, 0)
    return zeros.sum() if dim is None else zeros.flatten(1).sum(dim)


def finite_streams(frames: Tensor) -> Tensor:
    """``[B]`` bool: whether every value of stream b's frame is finite."""
    return _finite_sum(frames, 1).eq(0)


def _per_stream(mask: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class FrameScreen:
    """See the module docstring. :meth:`start` at each flush (eager) allocates the buffers."""

    def __init__(self) -> None:
        self._last: Optional[Tensor] = None  # last clean frame of every stream
        self._flag: Optional[Tensor] = None  # device: a clean stream produced a non-finite output
        self._host: Optional[Tensor] = None  # the flag on the host (pinned on CUDA)
        self._event = None

    def clear(self) -> None:
        self._last = self._flag = self._host = self._event = None

    def stream_state(self) -> dict:
        """``{"last": a copy of the last clean frames or None, "poisoned": the flag}`` (reads the flag from the
        device: a synchronisation on a GPU)."""
        return {"last": None if self._last is None else self._last.clone(),
                "poisoned": self._flag is not None and bool(self._flag.any())}

    def load_stream_state(self, last: Optional[Tensor], poisoned: bool) -> None:
        """Take ``last`` (copied) as every stream's last clean frame and set the flag to ``poisoned``."""
        if last is None:
            self.clear()
            return
        self.start(last)
        if poisoned:
            self._flag.fill_(True)
            self._host.fill_(True)

    def __getstate__(self) -> dict:
        return self.stream_state()

    def __setstate__(self, state: dict) -> None:
        self.clear()  # the pinned host copy and the CUDA event are made again
        self.load_stream_state(state["last"], state["poisoned"])

    def start(self, frames: Tensor) -> None:
        """Take ``frames`` (finite) as every stream's last clean frame; (re)allocate the flag."""
        self._last = frames.detach().clone()
        cuda = frames.device.type == "cuda"
        self._flag = torch.zeros(1, dtype=torch.bool, device=frames.device)
        self._host = torch.zeros(1, dtype=torch.bool, pin_memory=cuda) if cuda else self._flag
        self._event = torch.cuda.Event() if cuda else None

    @property
    def ready(self) -> bool:
        return self._last is not None

    def screen(self, frames: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x, clean [B] bool)``: non-finite streams replaced by their last clean frame, which ``x`` becomes."""
        clean = finite_streams(frames)
        torch.where(_per_stream(clean, frames), frames, self._last, out=self._last)
        return self._last, clean

    def observe(self, tokens: Tensor) -> None:
        """Record whether ``tokens`` (computed from screened, finite frames) hold a non-finite value."""
        if self._flag is not None and isinstance(tokens, Tensor):
            torch.logical_or(self._flag, _finite_sum(tokens).ne(0).view(1), out=self._flag)

    @staticmethod
    def _per_stream_output(out, clean: Tensor) -> bool:
        return isinstance(out, Tensor) and out.is_floating_point() and out.dim() > 0 and out.shape[0] == clean.numel()

    @classmethod
    def mask(cls, out, clean: Tensor):
        """``out`` with every value of an unclean stream replaced by NaN (that frame of that stream is lost)."""
        def masked(t):
            return torch.where(_per_stream(clean, t), t, float("nan")) if cls._per_stream_output(t, clean) else t

        return masked(out) if isinstance(out, Tensor) else pytree.tree_map(masked, out)

    def finish(self, out, clean: Tensor):
        """NaN outputs for unclean streams; records a non-finite output of a clean stream (read by ``poisoned``)."""
        for t in pytree.tree_leaves(out):
            if self._per_stream_output(t, clean):
                self.observe(t)  # every stream's input was finite after screening
        if self._host is not self._flag:
            self._host.copy_(self._flag, non_blocking=True)
        return self.mask(out, clean)

    def frame_done(self) -> None:
        """Call after each screened frame, outside any captured graph: marks when the flag copy has landed."""
        if self._event is not None:
            self._event.record()

    def poisoned(self) -> bool:
        """Whether a clean stream produced a non-finite output in a finished frame; clears the flag. Never waits."""
        if self._flag is None or (self._event is not None and not self._event.query()):
            return False
        if not bool(self._host.numpy()[0]):  # a host read of host memory: no device synchronisation
            return False
        self._flag.zero_()
        if self._host is not self._flag:
            self._host.zero_()
        return True
