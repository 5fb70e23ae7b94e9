"""Per-stream state of an :class:`~eventful_kernels.models.EventfulModel` taken out of a batch and put back in one.

An eventful model holds the state of ``B`` streams together: every state tensor of every eventful module has the
streams as its leading dimension (``[B, ...]``, or ``[B * windows, ...]`` batch-major for windowed attention), the
frame screen keeps ``[B, 3, H, W]`` last clean frames, and the rest (token grid, attention modes, pending refresh,
frame spec) is one value for all streams. So a batch of independent streams is built by concatenating each stream's
slices along dim 0 and split back by cutting dim 0 into ``B`` equal parts: exact, since every stream's computation
in a batch is independent of the others'.

:func:`take` copies each stream's slices out of the model (one ``[k, ...]`` tensor per state tensor and stream, so
a stream's memory is its own); :func:`put` concatenates streams into the model's state tensors *in place* when the
model already holds a batch of the same shape (addresses kept: captured CUDA graphs stay valid), else into new
tensors (placed as the model places them; caches, graphs and the scratch workspace dropped). :func:`clear`
empties the model for a flush without re-packing the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..models import EventfulModel
from ..nn import state as nn_state
from ..nn.placement import empty_placed

Key = Tuple[str, str]  # (eventful module name, state attribute)


@dataclass
class StreamSlice:
    """One stream's state: ``tensors[(module, attr)]`` are ``[k, ...]`` slices (k = 1, or the number of windows),
    ``values`` the per-model plain values (equal for every stream of a batch), ``last`` the last clean frame
    ``[1, 3, H, W]``, ``spec`` the frames' ``((3, H, W), dtype, device, autocast dtype)``, ``refresh`` whether the
    stream's next frame must recompute its state densely (kept by the owner: :func:`put` leaves no refresh
    pending)."""

    tensors: Dict[Key, Tensor]
    values: Dict[Key, object]
    last: Tensor
    spec: tuple
    refresh: bool = False
    architecture: list = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + \
            self.last.numel() * self.last.element_size()


def _modules(model: EventfulModel):
    return nn_state.eventful_modules(model.model)


def take(model: EventfulModel, indices: Optional[Sequence[int]] = None) -> List[StreamSlice]:
    """Copies of the state of streams ``indices`` (default: all) of ``model``, which must hold streams."""
    b = model._streams
    if b is None or model._screen._last is None:
        raise ValueError("take: the model holds no streams (no frame since the last flush)")
    indices = range(b) if indices is None else indices
    tensors: List[Dict[Key, Tensor]] = [{} for _ in indices]
    values: Dict[Key, object] = {}
    for name, m in _modules(model):
        for attr in m.state_attrs:
            v = getattr(m, attr)
            if isinstance(v, Tensor):
                parts = v.detach().unflatten(0, (b, v.shape[0] // b))
                for out, i in zip(tensors, indices):
                    out[(name, attr)] = parts[i].clone()
            else:
                values[(name, attr)] = v
    last = model._screen._last
    arch = nn_state.architecture(model.model)
    return [StreamSlice(t, dict(values), last[i : i + 1].clone(), model._spec, False, arch)
            for t, i in zip(tensors, indices)]


def clear(model: EventfulModel) -> None:
    """Forget every stream (the next frame is a flush of any number of streams) and free the shared attention
    scratch; weights stay packed."""
    model.forget_streams()
    model.workspace.clear()


def _cat_into(current, parts: List[Tensor], slot: Optional[str]) -> Tuple[Tensor, bool]:
    """``cat(parts)`` written into ``current`` when it has that shape, dtype and device; else a new tensor."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    like = parts[0]
    if isinstance(current, Tensor) and tuple(current.shape) == shape and current.dtype == like.dtype \
            and current.device == like.device and current.is_contiguous():
        return torch.cat(parts, out=current), False
    out = empty_placed(shape, like, slot) if slot else torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.cat(parts, out=out), True


def put(model: EventfulModel, streams: Sequence[StreamSlice]) -> None:
    """Make ``streams`` (in this order) the model's batch. They must agree on every per-model value and the frame
    spec (a ``ValueError`` otherwise, the model untouched)."""
    if not streams:
        raise ValueError("put: no streams")
    first = streams[0]
    for s in streams[1:]:
        if s.values != first.values or s.spec != first.spec:
            raise ValueError("put: the streams differ in per-model state (frame size, token grid or attention "
                             "mode); batch only streams of one frame size and strategy")
    arch = nn_state.architecture(model.model)
    for s in streams:
        if s.architecture and s.architecture != arch:
            raise ValueError("put: a stream state from a model of another architecture")
    modules = _modules(model)
    for name, m in modules:
        for attr in m.state_attrs:
            if (name, attr) not in first.values and (name, attr) not in first.tensors:
                raise ValueError(f"put: the stream state lacks {name}.{attr}")
    reallocated = False
    for name, m in modules:
        for attr in m.state_attrs:
            key = (name, attr)
            if key in first.values:
                setattr(m, attr, first.values[key])
                continue
            new, fresh = _cat_into(getattr(m, attr), [s.tensors[key] for s in streams], m.state_slots.get(attr))
            reallocated = reallocated or fresh
            setattr(m, attr, new)
        m._refresh = False
    screen = model._screen
    last, fresh = _cat_into(screen._last, [s.last for s in streams], None)
    if fresh or screen._flag is None:
        screen.start(last)
        reallocated = True
    if reallocated:
        for _, m in modules:
            for attr in m.cache_attrs:
                setattr(m, attr, None)
        for _, m in modules:
            m._derive_state()
        model.graphs.clear()
        model.workspace.clear()  # scratch of the old batch size: one size's worth is kept, not one per size seen
        model._modes = None
    model._streams = len(streams)
    model._spec = first.spec
    model._since_flush = 0
