"""Backend selection and the base class of every stateful eventful module.

A backend is the module that implements the op contract: ``"ops"`` -> :mod:`eventful_kernels.ops`
(``torch.ops.eventful`` fused kernels), ``"reference"`` -> :mod:`eventful_kernels.reference` (pure PyTorch).
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops as _ops
from .. import reference as _reference
from .placement import placed

BACKENDS = {"ops": _ops, "reference": _reference}


def resolve(name: str) -> ModuleType:
    """Backend name -> module implementing the op contract; ``ValueError`` for an unknown name."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"eventful: argument 'backend' must be one of {sorted(BACKENDS)}, got {name!r}") from None


def float_weight(module: nn.Module) -> Tensor:
    """The first floating-point parameter of ``module``: the dtype and device its tokens are computed in (a layer
    quantized with ``torch.ao.quantization.quantize_dynamic`` holds no float weight of its own: its LayerNorms do)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    raise ValueError(f"eventful: {type(module).__name__} has no floating-point parameter")


class BackendChoice:
    """A settable ``backend`` name, checked when set (:func:`resolve`), and ``k_ops``, the op implementation it
    names."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        resolve(name)
        self._backend = name

    @property
    def k_ops(self) -> ModuleType:
        """The op implementation of the current backend."""
        return BACKENDS[self._backend]


class EventfulModule(BackendChoice, nn.Module):
    """Base of the stateful eventful modules.

    ``backend`` (settable) picks the op implementation, ``reset()`` forgets the per-stream state (the next call is
    a flush), ``last_macs`` holds the multiply-accumulates of the last call, summed over the batch (a module's count
    includes its eventful children). State tensors are plain attributes allocated on first use, on the input's
    device; after moving a module to another device call ``reset()``. ``refresh()`` instead makes the next call
    recompute the state densely *in place* (the same tensors, so captured CUDA graphs stay valid): a flush that
    keeps the memory. ``check_index``: whether index arguments
    are value-checked by the ops (True for a module used on its own, which may be handed any index; the blocks set
    it False on their parts, whose indices come from their own gates: no check, no host synchronisation).

    Each subclass declares its own per-stream state in :attr:`state_attrs` (its children declare theirs), used by
    ``reset()``, by copies (``copy.deepcopy``, pickling) and by :func:`eventful_kernels.nn.state.stream_state` /
    :func:`~eventful_kernels.nn.state.load_stream_state`; :attr:`cache_attrs` are rebuilt, never copied.
    """

    check_index: bool = True
    _refresh: bool = False  # the next call recomputes the state densely, into the existing tensors
    # This module's per-stream state: attributes holding tensors or small values (ints, strs, tuples), set to
    # ``state_defaults.get(name)`` (None unless given) by reset(), copied with the module, saved by stream_state().
    state_attrs: Tuple[str, ...] = ()
    state_defaults: Dict[str, object] = {}
    # State tensors allocated at a fixed page offset (a slot of placement.SLOTS): placed again when copied or loaded.
    state_slots: Dict[str, str] = {}
    # Caches (of shapes, weights or values derivable from the state): None after reset() and in a copy; rebuilt on
    # use or by _derive_state().
    cache_attrs: Tuple[str, ...] = ()

    def __init__(self, backend: str = "ops"):
        super().__init__()
        self.backend = backend
        self.last_macs = 0

    def reset(self) -> None:
        """Forget all per-stream state of this module and its eventful children."""
        for m in self.children():
            _reset_tree(m)
        self._reset_state()
        self.last_macs = 0

    def _reset_state(self) -> None:
        """Clear this module's own state and caches (as declared)."""
        for name in self.state_attrs:
            setattr(self, name, self.state_defaults.get(name))
        for name in self.cache_attrs:
            setattr(self, name, None)
        self._refresh = False

    def _derive_state(self) -> None:
        """Rebuild what derives from the state (after a copy or a load); overridden where something does."""

    def signature(self) -> tuple:
        """Configuration that fixes the shapes of the state (compared when a saved stream state is loaded)."""
        return ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self.cache_attrs:
            state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name, slot in self.state_slots.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, placed(value, slot))
        self._derive_state()

    def refresh(self) -> None:
        """Make the next call of this module and its eventful children a flush that writes into the existing state
        tensors (a module without state allocates it as at any flush)."""
        for m in self.modules():
            if isinstance(m, EventfulModule):
                m._refresh = True


def refill(state: Optional[Tensor], src: Tensor) -> Tensor:
    """``src``'s values in ``state`` (in place) when ``state`` has its shape, dtype and device, else in a new
    contiguous copy."""
    if state is not None and state.shape == src.shape and state.dtype == src.dtype and state.device == src.device:
        return state.copy_(src)
    return src.detach().clone(memory_format=torch.contiguous_format)


def _reset_tree(module: nn.Module) -> None:
    if isinstance(module, EventfulModule):
        module.reset()
    else:
        for m in module.children():
            _reset_tree(m)


def trust_indices(module: nn.Module) -> None:
    """Mark every eventful submodule of ``module`` (itself included) as fed by trusted indices (``check_index``
    False): those its owner's gates produce."""
    for m in module.modules():
        if isinstance(m, EventfulModule):
            m.check_index = False


def set_backend(module: nn.Module, name: str) -> nn.Module:
    """Set ``backend = name`` on every eventful submodule of ``module`` (itself included); returns ``module``."""
    resolve(name)
    for m in module.modules():
        if isinstance(m, EventfulModule):
            m.backend = name
    return module
