"""Replay of a steady-state frame as one CUDA graph, one graph per (input shape, dtype, device, key).

A steady-state eventful frame has fixed shapes and no host synchronisation, so the whole frame (hundreds of kernel
launches) can be recorded once and replayed with one launch. :class:`FrameGraphs` does that for any ``step(frames)``
whose inputs and state live at fixed addresses:

1. the first frame of a new key runs eagerly on a side stream (it is the real computation of that frame and the
   warm-up: lazy initialisation, Triton autotuning), then the same step is *captured* on a copy of the input —
   capture records kernels without running them, so the state is not touched twice;
2. every later frame with that key copies its input into the static input buffer, replays the graph and returns a
   copy of the static output (the next replay overwrites it).

The caller owns the key (for an eventful model: the budget, the attention modes and the weights' addresses, see
:class:`TensorAddresses`) and must :meth:`clear` the graphs whenever a state tensor may have been reallocated (reset,
flush, a switch of attention mode, another backend). A step that fails to capture (e.g. something in it synchronises)
runs eagerly for that key from then on; the reason is kept in :attr:`failures`. At most ``max_graphs`` graphs are kept
(least recently used dropped).
The step's output is a tensor or a pytree of tensors (a tuple, a dict, a Hugging Face ``ModelOutput``).

Under ``torch.autocast`` the autocast dtype is part of the key, and the capture runs with autocast's cast cache off:
a cached low-precision copy of a weight, made by an eager frame, lives only until the outermost autocast region
exits, so a graph must record its own casts rather than read that copy's memory.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Step = Callable[[Tensor], Tensor]

# Bumped whenever any module registers a parameter or buffer (``module.weight = nn.Parameter(...)``), so a cached
# list of a model's tensors is known to be stale without walking the model every frame.
_REGISTRATIONS = [0]


def _registered(*_args) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)


class TensorAddresses:
    """``addresses()``: the data pointers of every parameter and buffer of ``module``. A captured graph reads its
    weights at fixed addresses: new values written in place are seen by a replay, but a weight that was replaced
    (a new Parameter, ``.data = ...``, a move) is not, so the addresses are part of a graph's key."""

    def __init__(self, module: torch.nn.Module):
        self._module = module
        self._tensors: Optional[list] = None
        self._epoch = -1

    def addresses(self) -> tuple:
        if self._tensors is None or self._epoch != _REGISTRATIONS[0]:
            self._tensors = [*self._module.parameters(), *self._module.buffers()]
            self._epoch = _REGISTRATIONS[0]
        return tuple(t.data_ptr() for t in self._tensors)

    def __getstate__(self) -> dict:
        return {"_module": self._module, "_tensors": None, "_epoch": -1}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes in for ``device_type`` now; None outside autocast."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device_type) if on else None


@contextlib.contextmanager
def uncached_autocast(device_type: str) -> Iterator[None]:
    """The autocast in force (if any) with its cast cache off, for a capture (see the module docstring)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
        yield


class CudaCapture:
    """The CUDA implementation of warm-up, capture and replay (for tensors on ``device_type``)."""

    device_type = "cuda"

    @staticmethod
    def warm(step: Step, frames: Tensor) -> Tensor:
        main = torch.cuda.current_stream(frames.device)
        side = torch.cuda.Stream(frames.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = step(frames)
        main.wait_stream(side)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                t.record_stream(main)
        return out

    @staticmethod
    def capture(step: Step, static_in: Tensor) -> Tuple[Callable[[], None], Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_in)
        return graph.replay, static_out


class _Captured:
    __slots__ = ("replay", "static_in", "static_out")

    def __init__(self, replay: Callable[[], None], static_in: Tensor, static_out: Tensor):
        self.replay, self.static_in, self.static_out = replay, static_in, static_out


class FrameGraphs:
    """``graphs(frames, key) -> out``: replay the captured ``step`` for ``key`` (capturing it on first use)."""

    def __init__(self, step: Step, max_graphs: int = 8, capture=CudaCapture):
        if max_graphs < 1:
            raise ValueError(f"eventful: argument 'max_graphs' must be >= 1, got {max_graphs}")
        self._step = step
        self._capture = capture
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self.failures: Dict[Hashable, str] = {}
        self.captures = 0  # graphs captured so far (a count for tests and benchmarks)

    @property
    def device_type(self) -> str:
        """The device type whose tensors this object captures."""
        return self._capture.device_type

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and its memory pool); failed keys may be tried again."""
        self._graphs.clear()
        self.failures.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_graphs=OrderedDict(), failures={})  # captured for the original's tensors: a copy recaptures
        return state

    def __call__(self, frames: Tensor, key: Hashable) -> Tensor:
        full_key = (tuple(frames.shape), frames.dtype, frames.device, autocast_dtype(self.device_type), key)
        graph = self._graphs.get(full_key)
        if graph is not None:
            self._graphs.move_to_end(full_key)
            graph.static_in.copy_(frames)
            graph.replay()
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, graph.static_out)
        if full_key in self.failures:
            return self._step(frames)
        out = self._capture.warm(self._step, frames)
        self._record(full_key, frames)
        return out

    def _record(self, full_key: Hashable, frames: Tensor) -> Optional[_Captured]:
        static_in = frames.clone()
        try:
            with uncached_autocast(self.device_type):
                replay, static_out = self._capture.capture(self._step, static_in)
        except Exception as exc:  # noqa: BLE001 -- any capture failure means: run this key eagerly
            self.failures[full_key] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"eventful: the frame could not be captured as a CUDA graph, running it eagerly ({exc})",
                          RuntimeWarning, stacklevel=3)
            return None
        self.captures += 1
        graph = self._graphs[full_key] = _Captured(replay, static_in, static_out)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph
