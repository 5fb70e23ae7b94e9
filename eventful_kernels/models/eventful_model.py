"""EventfulModel: a converted timm ViT or Hugging Face vision encoder run one video frame at a time, with a budget
changeable at any frame."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .. import counting
from ..nn import EventfulAttention, EventfulBlock, EventfulTokenwiseBlock, set_backend, set_policy
from ..nn import state as nn_state
from ..nn.backend import float_weight
from ..nn.linear import PackedGroup, PackedConv, repack
from ..nn.placement import Workspace
from ..nn.strategy import check_strategy
from .graphs import FrameGraphs, TensorAddresses, autocast_dtype
from .screen import FrameScreen, finite_streams
from .macs import OutsideMacCounter
from ..nn.policies import Budget, as_policy

_EVENTFUL_BLOCKS = (EventfulBlock, EventfulTokenwiseBlock)

STREAM_STATE_FORMAT = 1


def _frame_spec(frames: torch.Tensor) -> tuple:
    """What a stream's frames keep from frame to frame: ``(C, H, W)``, dtype, device and the autocast dtype (the
    streams' state holds what that precision computed)."""
    return tuple(frames.shape[1:]), frames.dtype, frames.device, autocast_dtype(frames.device.type)


def _autocast_words(dtype: Optional[torch.dtype]) -> str:
    return "outside autocast" if dtype is None else f"under autocast({nn_state.dtype_name(dtype)})"


_STEADY = object()  # _begin: the frame is a steady-state step for the caller to run


def _reset_after_load(model: "EventfulModel", incompatible_keys) -> None:
    """``load_state_dict`` post-hook (also when a module holding the model loads): state computed with the old
    weights must not meet the new ones. Loading into the dense model instead keeps the streams (documented)."""
    model.reset()


class _ObserveTokens:
    """Forward hook of the last block: hands its output tokens to the frame screen (a class, so copies of the model
    get a hook on their own screen)."""

    def __init__(self, screen: FrameScreen):
        self.screen = screen

    def __call__(self, module, args, out) -> None:
        self.screen.observe(out)


class EventfulModel(nn.Module):
    """Eventful version of a timm ViT or a Hugging Face vision encoder; built by
    :func:`eventful_kernels.models.convert`.

    ``forward(frames [B, 3, H, W])`` processes one frame of ``B`` independent streams and returns what the wrapped
    model returns (logits ``[B, classes]`` for ViT, neck features ``[B, C, H/16, W/16]`` for SAM, a
    ``BaseModelOutputWithPooling`` for a Hugging Face encoder). The first
    frame after construction or :meth:`reset` is the flush (dense); later frames (*steady state*) re-process only
    the tokens selected by the policy. Inference only (runs under ``torch.no_grad``).

    A steady-state frame has fixed shapes and no host synchronisation (top-k policies, or a threshold policy that
    does not trim), so it can be compiled (:meth:`compile`) or replayed as one CUDA graph (``cuda_graphs``, the
    default, on CUDA inputs: captured at the first steady frame of each budget, input shape, dtype, attention modes
    and weight addresses, see :mod:`eventful_kernels.models.graphs`). The flush always runs eagerly.

    Weights are shared with the dense model and read live (see docs/nn-api.md, "Weights and stream state"):
    :meth:`load_state_dict` and :meth:`load_checkpoint` also reset the streams. ``copy.deepcopy``, pickling and
    ``torch.save`` copy the model with its streams (the dense twin too), never its caches. :meth:`stream_state` /
    :meth:`load_stream_state` save and restore the streams alone.
    """

    def __init__(self, model: nn.Module, policy, *, dense: nn.Module, family: str, backend: str = "ops",
                 cuda_graphs: bool = True, refresh_every: Optional[int] = None):
        super().__init__()
        self.model = model.eval()
        self.family = family
        self.policy = policy
        self.backend = backend
        self._dense = [dense]  # a list, so the dense twin is not registered as a submodule (no duplicate state_dict)
        self._streams: Optional[int] = None
        self._blocks = [m for m in self.model.modules() if isinstance(m, _EVENTFUL_BLOCKS)]
        self._global_blocks = [b for b in self._blocks if isinstance(b, EventfulBlock)]
        self._outside = OutsideMacCounter(model, self._blocks)
        # One scratch workspace for every eventful attention: their softmax outputs are dead after each block, so
        # blocks of equal shape share one [B,H,N,N] buffer (SAM 1024 px: 805 MB instead of 4 x 805 MB).
        self.workspace = Workspace()
        for m in self.model.modules():
            if isinstance(m, EventfulAttention):
                m.workspace = self.workspace
        # The packed weights' fingerprints are compared once before each frame, all together (see nn/linear.py).
        self._packed_group = PackedGroup()
        for b in self._blocks:
            b.packed_group = self._packed_group
        for m in self.model.modules():  # convs run as packed linears (the patch embedding, SAM's neck: convert)
            runner = m.__dict__.get("forward")
            if isinstance(runner, PackedConv):
                self._packed_group.add(runner)
        self._compile_kwargs: Optional[dict] = None
        self._compiled: tuple = ()  # (the compiled model,) after compile(); a tuple, so it is not a submodule
        self.graphs = FrameGraphs(self._screened)
        self.cuda_graphs = cuda_graphs
        self._weights = TensorAddresses(self.model)
        self._screen = FrameScreen()
        blocks = self.eventful_blocks()
        if blocks:  # the last block's tokens show any non-finite value written into a token state that frame
            blocks[-1].register_forward_hook(_ObserveTokens(self._screen))
        self._spec: Optional[tuple] = None  # (C, H, W), dtype, device, autocast dtype of the streams' frames
        self._since_flush = 0
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 1):
            raise ValueError(f"eventful: argument 'refresh_every' must be None or an int >= 1, got {refresh_every!r}")
        self.refresh_every = refresh_every
        self._modes: Optional[tuple] = None
        self.register_load_state_dict_post_hook(_reset_after_load)

    @property
    def _step(self):
        """What runs a steady-state frame: the compiled model after :meth:`compile`, else the model."""
        return self._compiled[0] if self._compiled else self.model

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_compiled"] = ()  # compiled again from _compile_kwargs in the copy
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self._compile_kwargs is not None:
            self._compiled = (torch.compile(self.model, **self._compile_kwargs),)
        if torch.is_inference_mode_enabled():
            # copy.deepcopy or unpickling under inference mode made the streams' state of inference tensors, which
            # the frames (never run in inference mode) could not update in place: take normal copies of it.
            self.load_stream_state(self.stream_state(), check_weights=False)

    @property
    def dense(self) -> nn.Module:
        """The original (dense) model; shares every weight with this one."""
        return self._dense[0]

    def eventful_blocks(self):
        """The eventful blocks, in order (fixed at conversion)."""
        return self._blocks

    @property
    def flushing(self) -> bool:
        """True when the next frame is a flush (some block holds no state)."""
        return any(b.qkv_gate.flushing for b in self.eventful_blocks())

    def _prepare_steady(self) -> tuple:
        """Decide each global block's attention mode for this frame (eagerly, before any compiled or captured code)
        and return them; captured graphs are dropped when a mode changes (a switch frees or rebuilds state)."""
        modes = tuple(b.plan() for b in self._global_blocks)
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

    def _check_frames(self, frames) -> None:
        """Reject a frame that does not fit the streams, before anything is touched."""
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be [B, 3, H, W], got shape {shape}")
        if frames.shape[0] == 0:
            raise ValueError("frames: batch size 0; a frame must hold at least one stream")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be floating point (normalised pixels), got {frames.dtype}")
        weight = next(self.model.parameters(), None)
        if weight is not None and (frames.dtype != weight.dtype or frames.device != weight.device):
            raise ValueError(
                f"frames are {frames.dtype} on {frames.device} but the model's weights are {weight.dtype} on "
                f"{weight.device}; cast the frames (or move the model and call reset())"
            )
        if self._streams is not None and frames.shape[0] != self._streams:
            raise ValueError(
                f"frames: batch size {frames.shape[0]} differs from the {self._streams} streams in the state; "
                "call reset() before starting new streams"
            )
        spec = _frame_spec(frames)
        if self._spec is not None and spec[:3] != self._spec[:3]:
            raise ValueError(
                f"frames: {list(frames.shape[1:])} {frames.dtype} on {frames.device} differs from the streams' "
                f"{list(self._spec[0])} {self._spec[1]} on {self._spec[2]}; call reset() before starting new streams"
            )
        if self._spec is not None and spec[3] != self._spec[3]:
            raise ValueError(
                f"frames: run {_autocast_words(spec[3])} but the streams started {_autocast_words(self._spec[3])} "
                "(their state holds what that precision computed); call reset() before starting new streams"
            )
        if self._blocks:
            ref, weight = self._blocks[0].qkv_gate.ref, float_weight(self._blocks[0].block)
            computed = (weight.dtype, None if self._spec is None else self._spec[3])
            if ref is not None and (ref.dtype not in computed or ref.device != weight.device):
                raise ValueError(
                    f"the model's weights are {weight.dtype} on {weight.device} but the streams' state is {ref.dtype} "
                    f"on {ref.device} (the model was converted or moved since the streams started); call reset() "
                    "before the next frame"
                )

    # ``torch.compile(model)``: this frame is skipped (the bookkeeping below runs in Python, never guarded), while
    # the frames it calls are still compiled: :meth:`_steady_step`, the steady-state frame, becomes one graph.
    @torch.compiler.disable(recursive=False)
    def forward(self, frames: torch.Tensor):
        # Never inference mode: state made under it would be inference tensors, which a later frame outside it could
        # not update. Inference-mode inputs are fine as inputs; the outputs are normal tensors.
        with torch.inference_mode(False), torch.no_grad():
            out = self._begin(frames)
            if out is not _STEADY:
                return self._passed(out)
            try:
                out = self._steady_step(frames)
            except BaseException as exc:
                self._end(frames, exc)
                raise
            self._end(frames)
            return out

    @torch.compiler.disable
    def _begin(self, frames: torch.Tensor):
        """Everything of a frame but a plain steady-state step, eagerly: checks, refreshes, the flush and captured
        CUDA graphs (returning the frame's output), or the preparation of a steady-state frame (returning
        ``_STEADY``: the caller runs :meth:`_steady_step`, then :meth:`_end`)."""
        self._check_frames(frames)
        if self._screen.poisoned() or (self.refresh_every and self._since_flush >= self.refresh_every):
            self.refresh()
        group = self._packed_group
        group.check()
        group.active = True
        try:
            out = self._frame(frames)
        except BaseException as exc:
            group.active = False
            self._failed(exc)
            raise
        if out is _STEADY:
            return out
        group.active = False
        self._streams = frames.shape[0]
        return out

    @torch.compiler.disable
    def _end(self, frames: torch.Tensor, exc: Optional[BaseException] = None) -> None:
        """Close a steady-state frame run by :meth:`_steady_step` (``exc``: it raised)."""
        self._packed_group.active = False
        if exc is not None:
            self._failed(exc)
            return
        self._screen.frame_done()
        self._since_flush += 1
        self._streams = frames.shape[0]

    def _passed(self, out):
        """A frame run eagerly by :meth:`_begin`, handed back through a frame that ``torch.compile`` traces (an
        empty graph), so ``torch.compile(model, fullgraph=True)`` finds a compiled frame on those frames too."""
        return out

    def _steady_step(self, frames: torch.Tensor):
        """One steady-state frame: screen, model, output check. Traced as one graph by ``torch.compile(model)``."""
        x, clean = self._screen.screen(frames)
        return self._screen.finish(self._step(x), clean)

    def _frame(self, frames: torch.Tensor):
        if not self._screen.ready or any(b.qkv_gate.ref is None for b in self.eventful_blocks()):  # new streams
            self.graphs.clear()
            self._modes = None
            self._screen.start(frames)
            with self._outside.counting():  # layers outside the blocks run densely: same count every frame
                out = self.model(frames)
            self._since_flush = 0
            clean = finite_streams(frames)
            if not bool(clean.all()):  # the flush is eager: it may read a value back
                self.reset()  # nothing clean to keep: the next frame flushes again
                return self._screen.mask(out, clean)
            self._spec = _frame_spec(frames)
            self._screen.frame_done()
            return out
        if self.flushing:  # a refresh: dense, into the existing state tensors (captured graphs stay valid)
            with self._outside.counting():
                out = self._screened(frames, self.model)
            self._since_flush = 0
            return out
        modes = self._prepare_steady()
        if self.cuda_graphs and frames.device.type == self.graphs.device_type:
            out = self.graphs(frames, (self._budget_key(), modes, self.backend, self._weights.addresses()))
            self._screen.frame_done()
            self._since_flush += 1
            return out
        return _STEADY

    def _screened(self, frames: torch.Tensor, step=None):
        """One frame through ``step`` (default: the steady-state step) behind the :class:`FrameScreen`."""
        x, clean = self._screen.screen(frames)
        out = self._screen.finish((self._step if step is None else step)(x), clean)
        if step is not None:
            self._screen.frame_done()
        return out

    def _failed(self, exc: BaseException) -> None:
        """A frame raised half-way: the state may be half updated, so every stream re-flushes on the next frame."""
        self.refresh()
        self.graphs.clear()
        note = ("eventful: the frame raised before it completed; every stream re-flushes on the next frame "
                "(the state is recomputed from that frame)")
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)

    @property
    def frames_since_flush(self) -> int:
        """Steady-state frames since the last flush or refresh (0 right after one)."""
        return self._since_flush

    def refresh(self) -> None:
        """Make the next frame a flush that recomputes every stream's state densely, in place (captured graphs
        stay valid). Used for ``refresh_every`` and after a failed frame; bounds the drift of the accumulated
        A·V deltas."""
        for block in self.eventful_blocks():
            block.refresh()

    def compile(self, **kwargs) -> None:
        """Compile the steady-state frame with ``torch.compile(**kwargs)`` (e.g. ``fullgraph=True``); the flush
        stays eager. A budget change that alters the shapes compiles once more; later frames reuse the graph."""
        self._compiled = (torch.compile(self.model, **kwargs),)
        self._compile_kwargs = dict(kwargs)
        self.graphs.clear()

    def set_budget(self, budget: Budget) -> None:
        """Change the per-block budget from the next frame on: int tokens, float fraction, or a policy object."""
        if budget is None:
            raise ValueError("eventful: set_budget: a budget must be an int, a float or a Policy, got None")
        pol = as_policy(budget)
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
        return [b.attention_mode for b in self._global_blocks]

    def set_backend(self, backend: str) -> None:
        """Switch every eventful module to ``"ops"`` (fused kernels) or ``"reference"`` (pure PyTorch)."""
        set_backend(self.model, backend)
        self.backend = backend
        self.graphs.clear()

    def reset(self) -> None:
        """Forget all state: the next frame is a flush and may start a different number of streams. The packed
        weights are made again too (:func:`eventful_kernels.nn.linear.repack`)."""
        self.forget_streams()
        repack(self.model)

    def forget_streams(self) -> None:
        """Forget every stream (the next frame is a flush of any number of streams); the packed weights stay."""
        for block in self.eventful_blocks():
            block.reset()
        self.graphs.clear()
        self._screen.clear()
        self._modes = None
        self._streams = None
        self._spec = None
        self._since_flush = 0

    def macs_last_frame(self) -> int:
        """Multiply-accumulates of the last frame: eventful blocks (``counting.count_macs``) + dense layers around."""
        return counting.count_macs(self.model) + self._outside.macs

    def load_checkpoint(self, path: str, strict: bool = True) -> None:
        """Load a checkpoint (state-dict file or safetensors; timm format, or a Hugging Face encoder's own key names)
        into the shared weights, then reset."""
        from .checkpoint import load_checkpoint

        try:
            load_checkpoint(self.dense, path, strict=strict)
        finally:
            self.reset()

    # ---- stream checkpoints -------------------------------------------------------------------------------------
    def stream_state(self) -> dict:
        """A copy of the streams' state as plain data (tensors, ints, floats, strs, bools, None, lists, dicts; no
        modules, no weights): every eventful module's state, the blocks' geometry and attention modes, the
        stream count, the frame spec, the frames since the last flush, the screen's last clean frames and any
        pending refresh, with the architecture and a fingerprint of the weights. ``torch.save`` it and
        ``torch.load(weights_only=True)`` it back; :meth:`load_stream_state` continues it bit-identically in any
        converted model of the same architecture and weights (on the same device and dtype). Reads a flag from the
        device (a synchronisation on a GPU)."""
        spec = self._spec
        return {
            "format": STREAM_STATE_FORMAT,
            "family": self.family,
            "streams": self._streams,
            "frames": None if spec is None else {"shape": list(spec[0]), "dtype": nn_state.dtype_name(spec[1]),
                                                 "device": str(spec[2]),
                                                 "autocast": None if spec[3] is None else nn_state.dtype_name(spec[3])},
            "frames_since_flush": self._since_flush,
            "screen": self._screen.stream_state(),
            "model": nn_state.stream_state(self.model),
        }

    def load_stream_state(self, state: dict, check_weights: bool = True) -> None:
        """Replace the streams by ``state`` (from :meth:`stream_state`, possibly of another model of the same
        architecture and weights): the next frame continues them exactly as the saved model's next frame would.

        Everything is checked first: a ``ValueError`` names what does not fit (the format, the family, the
        architecture, the weights' dtype/shape or, unless ``check_weights=False``, values, a missing or unexpected
        key, a shape, a dtype or device other than the weights', the number of streams) and the model is left as
        it was. Loading onto another device or dtype is not supported. Captured graphs are dropped."""
        with torch.inference_mode(False):  # the copies are normal tensors, which the frames can update in place
            self._load_stream_state(state, check_weights)

    def _load_stream_state(self, state: dict, check_weights: bool) -> None:
        staged, spec = self._check_stream_state(state, check_weights)
        nn_state.apply_stream_state(staged)
        self._streams = state["streams"]
        self._spec = spec
        self._since_flush = state["frames_since_flush"]
        screen = state["screen"]
        self._screen.load_stream_state(screen["last"], screen["poisoned"])
        self.graphs.clear()
        self._modes = None

    def _check_stream_state(self, state, check_weights: bool):
        fail = nn_state._fail
        nn_state.check_keys(state, ("format", "family", "streams", "frames", "frames_since_flush", "screen", "model"),
                            "the state")
        if state["format"] != STREAM_STATE_FORMAT:
            fail(f"format {state['format']!r}, this version reads {STREAM_STATE_FORMAT}")
        if state["family"] != self.family:
            fail(f"saved from a model of family {state['family']!r}, this one is {self.family!r}")
        streams = state["streams"]
        if streams is not None and (isinstance(streams, bool) or not isinstance(streams, int) or streams < 1):
            fail(f"'streams' must be None or an int >= 1, got {streams!r}")
        since = state["frames_since_flush"]
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            fail(f"'frames_since_flush' must be an int >= 0, got {since!r}")
        device = next(self.model.parameters()).device
        spec = None
        frames = state["frames"]
        if frames is not None:
            keys = ("shape", "dtype", "device") + (("autocast",) if isinstance(frames, dict) and "autocast" in frames
                                                   else ())  # a state saved before autocast was recorded: none
            nn_state.check_keys(frames, keys, "'frames'")
            shape, dtype = frames["shape"], nn_state.parse_dtype(frames["dtype"])
            if not isinstance(shape, (list, tuple)) or len(shape) != 3 or shape[0] != 3 or \
                    not all(isinstance(s, int) and s > 0 for s in shape):
                fail(f"'frames' shape must be [3, H, W], got {shape!r}")
            if dtype is None or not dtype.is_floating_point:
                fail(f"'frames' dtype must name a floating dtype, got {frames['dtype']!r}")
            if str(frames["device"]) != str(device):
                fail(f"the frames were on {frames['device']}, the model is on {device} (loading onto another "
                     "device is not supported)")
            autocast = frames.get("autocast")
            state_autocast = None if autocast is None else nn_state.parse_dtype(autocast)
            if autocast is not None and (state_autocast is None or not state_autocast.is_floating_point):
                fail(f"'frames' autocast must be None or name a floating dtype, got {autocast!r}")
            spec = (tuple(shape), dtype, device, state_autocast)
        screen = state["screen"]
        nn_state.check_keys(screen, ("last", "poisoned"), "'screen'")
        last = screen["last"]
        if not isinstance(screen["poisoned"], bool):
            fail("screen.poisoned must be a bool")
        if last is not None:
            if not isinstance(last, torch.Tensor) or last.dim() != 4 or last.device != device:
                fail(f"screen.last must be a [B, 3, H, W] tensor on {device}")
            if streams is not None and last.shape[0] != streams:
                fail(f"screen.last holds {last.shape[0]} streams, not {streams}")
            if spec is not None and (tuple(last.shape[1:]) != spec[0] or last.dtype != spec[1]):
                fail(f"screen.last is {list(last.shape)} {last.dtype}, the frames {list(spec[0])} {spec[1]}")
            streams = last.shape[0] if streams is None else streams
        staged, _ = nn_state.check_stream_state(self.model, state["model"], streams, check_weights,
                                                None if spec is None else spec[3])
        return staged, spec
