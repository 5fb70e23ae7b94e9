"""One replica's streams and its converted model, without Ray: lifecycle, batching of frames, checkpoints.

:class:`ReplicaCore` owns one :class:`~eventful_kernels.models.EventfulModel` and the state of up to
``max_streams`` streams. A batch of frames of streams with the same *batch key* (phase, budget, frame shape and
dtype) runs as one model call of ``B`` independent streams: the batch's states are concatenated into the model
(:func:`~eventful_kernels.serve.slots.put`) and stay there (*resident*) while the next batch has the same streams in
the same order (the steady case of synchronised cameras: no copies at all); a different batch first copies the
resident streams' states out (:func:`~eventful_kernels.serve.slots.take`). Phases: ``"flush"`` (a stream with no
state: its first frame after open, or a re-flush), ``"refresh"`` (a dense recomputation in place: ``refresh_every``
frames since the last flush, or a non-finite value seen in the stream's batch, or a failed frame), ``"steady"``.

Every per-stream outcome is either a result dict or the exception for that stream; one stream's bad request never
fails another's frame.

A plain ``nn.Module`` (the dense model) is served the same way without state: every frame is phase ``"dense"`` and
frames of any streams of one shape batch together (the baseline a deployment compares against).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..models import EventfulModel, make_policy
from ..nn.policies import Policy
from . import slots
from .errors import CapacityError, StreamError, StreamEvicted, StreamNotOpen


@dataclass
class StreamCheckpoint:
    """A stream's state after ``frame`` frames (``frames_since_flush`` of them steady), with its budget: what a
    replica needs to continue the stream (:meth:`ReplicaCore.open` with ``checkpoint=``)."""

    stream: Hashable
    frame: int
    frames_since_flush: int
    budget: Policy
    state: slots.StreamSlice


@dataclass
class _Stream:
    budget: Policy
    state: Optional[slots.StreamSlice]  # None: no state (flush next) or resident in the model
    frames: int = 0
    since_flush: int = 0
    refresh: bool = False
    last_seen: float = 0.0
    has_state: bool = False


def _check_frame(frame, stream) -> Tensor:
    if not isinstance(frame, Tensor) or frame.dim() != 3 or frame.shape[0] != 3 or not frame.is_floating_point():
        what = f"{list(frame.shape)} {frame.dtype}" if isinstance(frame, Tensor) else type(frame).__name__
        raise StreamError(f"stream {stream!r}: argument 'frame' must be a float tensor [3, H, W], got {what}", stream)
    return frame


class ReplicaCore:
    """See the module docstring. ``max_streams``: open streams held at most (memory bound; :class:`CapacityError`
    beyond). ``idle_timeout_s``: :meth:`evict_idle` drops streams idle longer (None: never). ``checkpoint_every``:
    every that many frames of a stream its result carries a :class:`StreamCheckpoint` (None: never).
    ``refresh_every``: a dense in-place recomputation every that many steady frames (None: never)."""

    def __init__(self, model: torch.nn.Module, *, max_streams: int = 16, idle_timeout_s: Optional[float] = None,
                 checkpoint_every: Optional[int] = None, refresh_every: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"argument 'model' must be an EventfulModel or an nn.Module, got {type(model).__name__}")
        self.stateful = isinstance(model, EventfulModel)
        for name, value in (("max_streams", max_streams), ("checkpoint_every", checkpoint_every),
                            ("refresh_every", refresh_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"argument '{name}' must be an int >= 1, got {value!r}")
        if max_streams is None:
            raise ValueError("argument 'max_streams' must be an int >= 1, got None")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"argument 'idle_timeout_s' must be > 0 or None, got {idle_timeout_s!r}")
        if self.stateful and model.refresh_every is not None:
            raise ValueError("the model's own refresh_every counts frames of whatever batch runs; pass "
                             "refresh_every to the replica instead (counted per stream)")
        self.model = model
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self.checkpoint_every = checkpoint_every
        self.refresh_every = refresh_every
        self.clock = clock
        self.streams: Dict[Hashable, _Stream] = {}
        self.resident: Tuple[Hashable, ...] = ()
        self._gone: "OrderedDict[Hashable, str]" = OrderedDict()  # recently closed/evicted ids -> why
        self.batch_sizes: Dict[int, int] = {}
        self.copies = 0  # batches that had to copy states in or out

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def _get(self, stream) -> _Stream:
        s = self.streams.get(stream)
        if s is None:
            why = self._gone.get(stream)
            if why == "evicted":
                raise StreamEvicted(f"stream {stream!r} was evicted after more than {self.idle_timeout_s} s idle; "
                                    "open it again", stream)
            raise StreamNotOpen(f"stream {stream!r} is not open on this replica"
                                + (f" ({why})" if why else ""), stream)
        return s

    def _forget(self, stream, why: str) -> None:
        if stream in self.resident:
            self._evacuate()
        del self.streams[stream]
        self._gone[stream] = why
        self._gone.move_to_end(stream)
        while len(self._gone) > 4 * self.max_streams:
            self._gone.popitem(last=False)

    def open(self, stream, budget=None, checkpoint: Optional[StreamCheckpoint] = None) -> dict:
        """Start (or restart) ``stream``: its next frame is a flush, or continues ``checkpoint``. Returns
        ``{"stream", "start": "flush" | "resumed", "frame"}``."""
        if stream is None:
            raise StreamError("argument 'stream' must not be None")
        policy = make_policy(1.0 if budget is None and checkpoint is None else
                             checkpoint.budget if budget is None else budget)
        if stream not in self.streams and len(self.streams) >= self.max_streams:
            raise CapacityError(f"stream {stream!r}: the replica holds max_streams={self.max_streams} streams; "
                                "close one, wait for idle eviction, or add replicas", stream)
        if checkpoint is not None:
            if not isinstance(checkpoint, StreamCheckpoint):
                raise StreamError(f"argument 'checkpoint' must be a StreamCheckpoint, got "
                                  f"{type(checkpoint).__name__}", stream)
            if checkpoint.state is not None and (not self.stateful or checkpoint.state.architecture !=
                                                 slots.nn_state.architecture(self.model.model)):
                raise StreamError(f"stream {stream!r}: the checkpoint is from a model of another architecture",
                                  stream)
        if stream in self.streams:
            self._forget(stream, "restarted")
        self._gone.pop(stream, None)
        s = _Stream(policy, None, last_seen=self.clock())
        resumed = checkpoint is not None and checkpoint.state is not None
        if resumed:
            s.state, s.has_state = checkpoint.state, True
            s.frames, s.since_flush = checkpoint.frame, checkpoint.frames_since_flush
            s.refresh = checkpoint.state.refresh
        self.streams[stream] = s
        return {"stream": stream, "start": "resumed" if resumed else "flush", "frame": s.frames}

    def close(self, stream) -> None:
        """Free ``stream``'s state (:class:`StreamNotOpen` if it is not open)."""
        self._get(stream)
        self._forget(stream, "closed")

    def set_budget(self, stream, budget) -> None:
        """``stream``'s budget from its next frame on (int tokens, float fraction or a policy)."""
        s = self._get(stream)
        s.budget = make_policy(budget)
        s.last_seen = self.clock()

    def evict_idle(self) -> List[Hashable]:
        """Drop the streams idle for more than ``idle_timeout_s``; returns their ids."""
        if self.idle_timeout_s is None:
            return []
        now = self.clock()
        idle = [k for k, s in self.streams.items() if now - s.last_seen > self.idle_timeout_s]
        for k in idle:
            self._forget(k, "evicted")
        return idle

    def checkpoint(self, stream) -> StreamCheckpoint:
        """``stream``'s state now (to move it to another replica: :meth:`open` there with ``checkpoint=``)."""
        s = self._get(stream)
        return self._checkpoints([stream])[0] if s.has_state and self.stateful else \
            StreamCheckpoint(stream, s.frames, s.since_flush, s.budget, None)

    def _checkpoints(self, streams: Sequence[Hashable]) -> List[StreamCheckpoint]:
        out, resident = [], [k for k in streams if k in self.resident]
        taken = dict(zip(resident, slots.take(self.model, [self.resident.index(k) for k in resident]))) \
            if resident else {}
        for k in streams:
            s = self.streams[k]
            state = taken.get(k, s.state)
            state.refresh = s.refresh
            out.append(StreamCheckpoint(k, s.frames, s.since_flush, s.budget, state))
        return out

    # ---- frames -------------------------------------------------------------------------------------------------
    def phase(self, stream) -> str:
        s = self._get(stream)
        if not self.stateful:
            return "dense"
        if not s.has_state:
            return "flush"
        if s.refresh or (self.refresh_every is not None and s.since_flush >= self.refresh_every):
            return "refresh"
        return "steady"

    def batch_key(self, stream, frame) -> tuple:
        """Frames with equal keys may run in one batch."""
        frame = _check_frame(frame, stream)
        budget = self._get(stream).budget.key() if self.stateful else None
        return (self.phase(stream), budget, tuple(frame.shape), frame.dtype)

    def run(self, items: Sequence[Tuple[Hashable, Tensor]]) -> list:
        """Frames ``[(stream, frame [3, H, W])]`` (each stream at most once) -> per item a result dict
        (``output``, ``frame`` index, ``phase``, ``batch`` size, ``checkpoint`` or None) or the exception."""
        results: list = [None] * len(items)
        groups: "OrderedDict[tuple, list]" = OrderedDict()
        seen = set()
        for i, (stream, frame) in enumerate(items):
            try:
                if stream in seen:
                    raise StreamError(f"stream {stream!r}: two frames in one batch", stream)
                key = self.batch_key(stream, frame)
            except Exception as exc:  # noqa: BLE001 - reported for this stream only
                results[i] = exc
                continue
            seen.add(stream)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            outs = self._run_group([items[i][0] for i in idx], [items[i][1] for i in idx], key[0])
            for i, r in zip(idx, outs):
                results[i] = r
        return results

    def _evacuate(self) -> None:
        if not self.resident:
            return
        for k, state in zip(self.resident, slots.take(self.model)):
            if k in self.streams:
                self.streams[k].state = state
        self.resident = ()
        self.copies += 1

    def _run_dense(self, ids: List[Hashable], frames: List[Tensor]) -> list:
        weight = next(self.model.parameters())
        try:
            with torch.no_grad():
                out = self.model(torch.stack(frames).to(device=weight.device, dtype=weight.dtype)).detach().cpu()
        except Exception as exc:  # noqa: BLE001 - no state to lose
            return [exc] * len(ids)
        now = self.clock()
        for k in ids:
            self.streams[k].frames += 1
            self.streams[k].last_seen = now
        self.batch_sizes[len(ids)] = self.batch_sizes.get(len(ids), 0) + 1
        return [{"stream": k, "output": out[i].clone(), "frame": self.streams[k].frames - 1, "phase": "dense",
                 "batch": len(ids), "checkpoint": None} for i, k in enumerate(ids)]

    def _run_group(self, ids: List[Hashable], frames: List[Tensor], phase: str) -> list:
        if not self.stateful:
            return self._run_dense(ids, frames)
        model, records = self.model, [self.streams[k] for k in ids]
        batch = tuple(ids)
        if phase == "flush":
            self._evacuate()
            slots.clear(model)
        elif batch != self.resident:
            self._evacuate()
            slots.put(model, [s.state for s in records])
            for s in records:
                s.state = None
            self.resident = batch
            self.copies += 1
        if phase == "refresh":
            model.refresh()
        if model.policy.key() != records[0].budget.key():
            model.set_budget(records[0].budget)
        weight = next(model.model.parameters())
        x = torch.stack(frames).to(device=weight.device, dtype=weight.dtype)
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001 - the model marked its streams for a re-flush
            if phase == "flush":
                slots.clear(model)
                self.resident = ()
            else:
                for s in records:
                    s.refresh = True
            return [exc] * len(ids)
        self.resident = batch
        out = out.detach().cpu()
        poisoned = model._screen.poisoned()
        now = self.clock()
        for s in records:
            s.has_state = True
            s.frames += 1
            s.since_flush = 0 if phase != "steady" else s.since_flush + 1
            s.refresh = poisoned
            s.last_seen = now
        every = self.checkpoint_every
        due = [k for k, s in zip(ids, records) if every is not None and s.frames % every == 0]
        ckpts = dict(zip(due, self._checkpoints(due))) if due else {}
        self.batch_sizes[len(ids)] = self.batch_sizes.get(len(ids), 0) + 1
        return [{"stream": k, "output": out[i].clone(), "frame": s.frames - 1, "phase": phase,
                 "batch": len(ids), "checkpoint": ckpts.get(k)} for i, (k, s) in enumerate(zip(ids, records))]

    def stats(self) -> dict:
        """Open streams, resident batch, batch sizes formed (size -> count), state copies."""
        return {"streams": len(self.streams), "resident": list(self.resident), "batch_sizes": dict(self.batch_sizes),
                "copies": self.copies}
