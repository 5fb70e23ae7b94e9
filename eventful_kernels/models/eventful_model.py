"""EventfulModel: a converted timm ViT run one video frame at a time, with a budget changeable at any frame."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import counting
from ..nn import EventfulAttention, EventfulBlock, EventfulTokenwiseBlock, set_backend, set_policy
from ..nn.placement import Workspace
from ..nn.strategy import check_strategy
from .graphs import FrameGraphs, TensorAddresses
from .macs import OutsideMacCounter
from .policy import Budget, make_policy

_EVENTFUL_BLOCKS = (EventfulBlock, EventfulTokenwiseBlock)


class EventfulModel(nn.Module):
    """Eventful version of a timm ViT; built by :func:`eventful_kernels.models.convert`.

    ``forward(frames [B, 3, H, W])`` processes one frame of ``B`` independent streams and returns what the wrapped
    timm model returns (logits ``[B, classes]`` for ViT, neck features ``[B, C, H/16, W/16]`` for SAM). The first
    frame after construction or :meth:`reset` is the flush (dense); later frames (*steady state*) re-process only
    the tokens selected by the policy. Inference only (runs under ``torch.no_grad``).

    A steady-state frame has fixed shapes and no host synchronisation (top-k policies, or a threshold policy that
    does not trim), so it can be compiled (:meth:`compile`) or replayed as one CUDA graph (``cuda_graphs``, the
    default, on CUDA inputs: captured at the first steady frame of each budget, input shape, dtype, attention modes
    and weight addresses, see :mod:`eventful_kernels.models.graphs`). The flush always runs eagerly.
    """

    def __init__(self, model: nn.Module, policy, *, dense: nn.Module, family: str, backend: str = "ops",
                 cuda_graphs: bool = True):
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
        self._step = self.model
        self.graphs = FrameGraphs(self._run_step)
        self.cuda_graphs = cuda_graphs
        self._weights = TensorAddresses(self.model)
        self._modes: Optional[tuple] = None

    @property
    def dense(self) -> nn.Module:
        """The original timm model; shares every weight with this one."""
        return self._dense[0]

    def eventful_blocks(self):
        return [m for m in self.model.modules() if isinstance(m, _EVENTFUL_BLOCKS)]

    def _run_step(self, frames: torch.Tensor):
        return self._step(frames)

    @property
    def flushing(self) -> bool:
        """True when the next frame is a flush (some block holds no state)."""
        return any(b.qkv_gate.flushing for b in self.eventful_blocks())

    def _prepare_steady(self) -> tuple:
        """Decide each global block's attention mode for this frame (eagerly, before any compiled or captured code)
        and return them; captured graphs are dropped when a mode changes (a switch frees or rebuilds state)."""
        modes = tuple(b.plan() for b in self.eventful_blocks() if isinstance(b, EventfulBlock))
        if modes != self._modes:
            self.graphs.clear()
            self._modes = modes
        return modes

    def _budget_key(self) -> tuple:
        keys = []
        for b in self.eventful_blocks():
            key = b.policy.key()
            if not keys or keys[-1] != key:
                keys.append(key)
        return tuple(keys)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor):
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be [B, 3, H, W], got shape {shape}")
        if self._streams is not None and frames.shape[0] != self._streams:
            raise ValueError(
                f"frames: batch size {frames.shape[0]} differs from the {self._streams} streams in the state; "
                "call reset() before starting new streams"
            )
        if self.flushing:
            self.graphs.clear()
            self._modes = None
            with self._outside.counting():  # layers outside the blocks run densely: same count every frame
                out = self.model(frames)
        else:
            modes = self._prepare_steady()
            if self.cuda_graphs and frames.device.type == self.graphs.device_type:
                out = self.graphs(frames, (self._budget_key(), modes, self.backend, self._weights.addresses()))
            else:
                out = self._step(frames)
        self._streams = frames.shape[0]
        return out

    def compile(self, **kwargs) -> None:
        """Compile the steady-state frame with ``torch.compile(**kwargs)`` (e.g. ``fullgraph=True``); the flush
        stays eager. A budget change that alters the shapes compiles once more; later frames reuse the graph."""
        self._step = torch.compile(self.model, **kwargs)
        self.graphs.clear()

    def set_budget(self, budget: Budget) -> None:
        """Change the per-block budget from the next frame on: int tokens, float fraction, or a policy object."""
        pol = make_policy(budget)
        set_policy(self.model, pol)
        self.policy = pol

    def set_strategy(self, strategy: str) -> None:
        """Attention strategy of every global block from the next frame on: ``"auto"``, ``"eventful"`` or
        ``"dense"`` (see :mod:`eventful_kernels.nn.strategy`)."""
        check_strategy(strategy)
        for b in self.eventful_blocks():
            if isinstance(b, EventfulBlock):
                b.strategy = strategy

    def attention_modes(self) -> list:
        """The attention mode each global block ran in the last frame (``"eventful"`` / ``"dense"``)."""
        return [b.attention_mode for b in self.eventful_blocks() if isinstance(b, EventfulBlock)]

    def set_backend(self, backend: str) -> None:
        """Switch every eventful module to ``"ops"`` (fused kernels) or ``"reference"`` (pure PyTorch)."""
        set_backend(self.model, backend)
        self.backend = backend
        self.graphs.clear()

    def reset(self) -> None:
        """Forget all state: the next frame is a flush and may start a different number of streams."""
        for block in self.eventful_blocks():
            block.reset()
        self.graphs.clear()
        self._modes = None
        self._streams = None

    def macs_last_frame(self) -> int:
        """Multiply-accumulates of the last frame: eventful blocks (``counting.count_macs``) + dense layers around."""
        return counting.count_macs(self.model) + self._outside.macs

    def load_checkpoint(self, path: str, strict: bool = True) -> None:
        """Load a timm-format checkpoint (state-dict file or safetensors) into the shared weights, then reset."""
        from .checkpoint import load_checkpoint

        load_checkpoint(self.dense, path, strict=strict)
        self.reset()
