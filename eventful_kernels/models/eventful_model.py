"""EventfulModel: a converted timm ViT run one video frame at a time, with a budget changeable at any frame."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import counting
from ..nn import EventfulAttention, EventfulBlock, EventfulTokenwiseBlock, set_backend, set_policy
from ..nn.placement import Workspace
from .macs import OutsideMacCounter
from .policy import Budget, make_policy

_EVENTFUL_BLOCKS = (EventfulBlock, EventfulTokenwiseBlock)


class EventfulModel(nn.Module):
    """Eventful version of a timm ViT; built by :func:`eventful_kernels.models.convert`.

    ``forward(frames [B, 3, H, W])`` processes one frame of ``B`` independent streams and returns what the wrapped
    timm model returns (logits ``[B, classes]`` for ViT, neck features ``[B, C, H/16, W/16]`` for SAM). The first
    frame after construction or :meth:`reset` is the flush (dense); later frames re-process only the tokens
    selected by the policy. Inference only (runs under ``torch.no_grad``).
    """

    def __init__(self, model: nn.Module, policy, *, dense: nn.Module, family: str, backend: str = "ops"):
        super().__init__()
        self.model = model.eval()
        self.family = family
        self.policy = policy
        self.backend = backend
        self._dense = [dense]  # a list, so the dense twin is not registered as a submodule (no duplicate state_dict)
        self._streams: Optional[int] = None
        self._outside = OutsideMacCounter(model, self.eventful_blocks())
        # One scratch workspace for every eventful attention: their softmax outputs are dead after each block, so
        # blocks of equal shape share one [B,H,N,N] buffer (SAM 1024 px: 805 MB instead of 4 x 805 MB).
        self.workspace = Workspace()
        for m in self.model.modules():
            if isinstance(m, EventfulAttention):
                m.workspace = self.workspace

    @property
    def dense(self) -> nn.Module:
        """The original timm model; shares every weight with this one."""
        return self._dense[0]

    def eventful_blocks(self):
        return [m for m in self.model.modules() if isinstance(m, _EVENTFUL_BLOCKS)]

    @torch.no_grad()
    def forward(self, frames: torch.Tensor):
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, H, W], got shape {tuple(frames.shape)}")
        if self._streams is not None and frames.shape[0] != self._streams:
            raise ValueError(
                f"frames: batch size {frames.shape[0]} differs from the {self._streams} streams in the state; "
                "call reset() before starting new streams"
            )
        with self._outside.counting():
            out = self.model(frames)
        self._streams = frames.shape[0]
        return out

    def set_budget(self, budget: Budget) -> None:
        """Change the per-block budget from the next frame on: int tokens, float fraction, or a policy object."""
        pol = make_policy(budget)
        set_policy(self.model, pol)
        self.policy = pol

    def set_backend(self, backend: str) -> None:
        """Switch every eventful module to ``"ops"`` (fused kernels) or ``"reference"`` (pure PyTorch)."""
        set_backend(self.model, backend)
        self.backend = backend

    def reset(self) -> None:
        """Forget all state: the next frame is a flush and may start a different number of streams."""
        for block in self.eventful_blocks():
            block.reset()
        self._streams = None

    def macs_last_frame(self) -> int:
        """Multiply-accumulates of the last frame: eventful blocks (``counting.count_macs``) + dense layers around."""
        return counting.count_macs(self.model) + self._outside.macs

    def load_checkpoint(self, path: str, strict: bool = True) -> None:
        """Load a timm-format checkpoint (state-dict file or safetensors) into the shared weights, then reset."""
        from .checkpoint import load_checkpoint

        load_checkpoint(self.dense, path, strict=strict)
        self.reset()
