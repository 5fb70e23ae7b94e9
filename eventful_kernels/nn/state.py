"""The per-stream state of a tree of eventful modules as plain data: save it, check it, load it.

Every :class:`~eventful_kernels.nn.EventfulModule` declares its own state in ``state_attrs`` (tensors and small
values); :func:`stream_state` gathers copies of them for every eventful module under a root, with the architecture
(each eventful module's type and :meth:`~eventful_kernels.nn.EventfulModule.signature`) and a fingerprint of the
weights (dtype, shape and a fixed sample of the entries of every parameter and buffer). The result holds only
tensors, ints, floats, strs, bools, None, lists, tuples and dicts, so ``torch.save`` / ``torch.load(weights_only=True)``
keep it. :func:`load_stream_state` checks all of it against a root of the same architecture before changing
anything (a ``ValueError`` naming what differs, the modules untouched), then sets every module's state to copies:
the streams continue exactly as they would have in the modules that were saved. The tensors are loaded on the
device and dtype they were saved with, which must be those the block keeps them in: the weights' device, and the
weights' dtype except where the block says otherwise (``state_dtypes``: the 16-bit A·V references); no conversion.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .backend import EventfulModule, float_weight
from .linear import sample_runs
from .placement import placed_copy

_TOKEN_STATE = ("qkv_gate.ref", "qkv_buffer.state", "proj_gate.ref", "proj_buffer.state", "mlp_gate.ref",
                "mlp_buffer.state")  # a block's token-wise state: all present (a running stream) or none


def _key(attr: str) -> str:
    return attr.lstrip("_")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def eventful_modules(root: nn.Module) -> List[Tuple[str, EventfulModule]]:
    """``(qualified name, module)`` of every eventful module under ``root`` (``root`` itself included, as "")."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, EventfulModule)]


def architecture(root: nn.Module) -> list:
    """``[name, type, signature]`` of every eventful module under ``root``."""
    return [[name, type(m).__name__, list(m.signature())] for name, m in eventful_modules(root)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name) -> Optional[torch.dtype]:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def weights_fingerprint(root: nn.Module) -> Dict[str, str]:
    """``name -> "dtype[shape]:digest"`` for every parameter and buffer of ``root``; the digest covers the bytes the
    packed linears' fingerprint samples (:func:`~eventful_kernels.nn.linear.sample_runs`): equal weights give equal
    strings, other weights (another checkpoint, a fine-tuned copy) differ with near certainty."""
    out = {}
    for name, t in [*root.named_parameters(), *root.named_buffers()]:
        sample = sample_runs(t.detach().contiguous()).cpu().numpy().tobytes()
        out[name] = f"{dtype_name(t.dtype)}{list(t.shape)}:{hashlib.sha1(sample).hexdigest()[:16]}"
    return out


def _snapshot(value):
    if isinstance(value, Tensor):
        return value.detach().clone(memory_format=torch.contiguous_format)
    return value


def module_state(m: EventfulModule) -> dict:
    """Copies of ``m``'s own declared state (keys without the leading ``_``) and ``refresh`` (pending refresh)."""
    out = {_key(attr): _snapshot(getattr(m, attr)) for attr in m.state_attrs}
    out["refresh"] = bool(m._refresh)
    return out


def stream_state(root: nn.Module) -> dict:
    """The per-stream state of every eventful module under ``root`` (copies), with the architecture and the weights'
    fingerprint; see the module docstring."""
    return {
        "architecture": architecture(root),
        "weights": weights_fingerprint(root),
        "modules": {name: module_state(m) for name, m in eventful_modules(root)},
    }


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def _fail(what: str):
    raise ValueError(f"stream state: {what}")


def check_keys(entries, expected, where: str) -> None:
    if not isinstance(entries, dict):
        _fail(f"{where} must be a dict, got {type(entries).__name__}")
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected), key=str)
    if missing or unexpected:
        _fail(f"{where}: missing keys {missing}, unexpected keys {unexpected}")


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_architecture(root: nn.Module, saved) -> None:
    if not isinstance(saved, (list, tuple)):
        _fail("'architecture' must be a list")
    own, saved = architecture(root), _as_lists(saved)
    for i in range(max(len(own), len(saved))):
        a = saved[i] if i < len(saved) else None
        b = own[i] if i < len(own) else None
        if a != b:
            _fail(f"the architecture differs: eventful module {i} is {a} in the saved state but {b} in the model")


def _check_weights(root: nn.Module, saved, check_values: bool) -> None:
    own = weights_fingerprint(root)
    if not isinstance(saved, dict):
        _fail("'weights' must be a dict")
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own), key=str)
    if missing or unexpected:
        _fail(f"the architecture differs: the model has parameters {missing[:6]} the saved state lacks, and "
              f"lacks {unexpected[:6]}")
    for name, fp in own.items():
        mine, theirs = fp.split(":")[0], str(saved[name]).split(":")[0]
        if mine != theirs:
            _fail(f"parameter {name} is {theirs} in the saved state but {mine} in the model (loading onto "
                  "another architecture or dtype is not supported)")
        if check_values and fp != saved[name]:
            _fail(f"the weights differ from those the stream was computed with, first at {name}; load the same "
                  "weights, or pass check_weights=False to continue the stream with these")


def _check_values(name: str, m: EventfulModule, entries) -> None:
    keys = [_key(a) for a in m.state_attrs] + ["refresh"]
    check_keys(entries, keys, f"module '{name}'")
    if not isinstance(entries["refresh"], bool):
        _fail(f"{name}.refresh must be a bool")
    for attr in m.state_attrs:
        value = entries[_key(attr)]
        if not isinstance(value, Tensor) and not _plain(value):
            _fail(f"{_join(name, _key(attr))} must be a tensor or a plain value, got {type(value).__name__}")
    tensors = [k for k in keys if isinstance(entries[k], Tensor)]
    empty = [k for k in keys if entries[k] is None]
    if tensors and empty:
        _fail(f"module '{name}' holds {tensors} but not {empty}: a module's state tensors are all there or none")


def _check_block(name: str, block: EventfulModule, states: dict, streams: Optional[int],
                 autocast: Optional[torch.dtype] = None) -> Optional[int]:
    """Shapes, dtypes and devices of a block's state; returns the number of streams it holds (None: none).
    ``autocast``: the dtype the streams computed in under ``torch.autocast``, which any tensor may hold too."""
    def entry(rel: str):
        mod, _, attr = rel.rpartition(".")
        return states[_join(name, mod)][attr]

    tensors = {}
    for sub, m in block.named_modules():
        if isinstance(m, EventfulModule):
            for attr in m.state_attrs:
                value = states[_join(name, sub)][_key(attr)]
                if isinstance(value, Tensor):
                    tensors[_join(sub, _key(attr))] = value
    ref = entry("qkv_gate.ref")
    if ref is None:
        if tensors:
            _fail(f"block '{name}' holds {sorted(tensors)} without a token state (qkv_gate.ref)")
        return None
    absent = [rel for rel in _TOKEN_STATE if entry(rel) is None]
    if absent:
        _fail(f"block '{name}' has a token state without {absent}")
    if ref.dim() != 3:
        _fail(f"{_join(name, 'qkv_gate.ref')} must be [B, N, D], got {list(ref.shape)}")
    b = ref.shape[0] if streams is None else streams
    grid = states[name].get("grid")
    if grid is not None and (not isinstance(grid, (list, tuple)) or len(grid) != 2
                             or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        _fail(f"{_join(name, 'grid')} must be None or two positive ints, got {grid!r}")
    mode = states[name].get("attention_mode", "eventful")
    if mode not in ("eventful", "dense"):
        _fail(f"{_join(name, 'attention_mode')} must be 'eventful' or 'dense', got {mode!r}")
    try:
        shapes = block.state_shapes(b, ref.shape[1], None if grid is None else tuple(grid))
    except ValueError as exc:
        _fail(f"block '{name}': {exc}")
    weight = float_weight(block.block)
    dtypes = block.state_dtypes(weight.dtype)
    for rel, t in tensors.items():
        where = _join(name, rel)
        dtype = dtypes.get(rel, weight.dtype)
        if t.dtype not in (dtype, autocast) or t.device != weight.device:
            kept = "" if dtype == weight.dtype else f" (the block keeps it in {dtype_name(dtype)})"
            _fail(f"{where} is {dtype_name(t.dtype)} on {t.device} but the block's weights are "
                  f"{dtype_name(weight.dtype)} on {weight.device}{kept} (loading onto another dtype or device is not "
                  "supported)")
        want = shapes.get(rel)
        if want is not None and tuple(t.shape) != tuple(want):
            _fail(f"{where} has shape {list(t.shape)}, expected {list(want)} ({b} streams of {ref.shape[1]} tokens)")
    return b


def check_stream_state(root: nn.Module, state, streams: Optional[int] = None, check_weights: bool = True,
                       autocast: Optional[torch.dtype] = None) -> Tuple[Dict[EventfulModule, dict], Optional[int]]:
    """Check ``state`` (from :func:`stream_state`) against ``root``; ``ValueError`` naming the first difference.
    ``autocast``: the dtype the streams computed in under ``torch.autocast`` (tensors may hold it too).

    Returns what loading sets (per module: attribute -> a fresh copy) and the number of streams the state holds
    (``streams`` when given, which every block must then hold; None when no block holds any). Changes nothing.
    """
    check_keys(state, ("architecture", "weights", "modules"), "the module state")
    _check_architecture(root, state["architecture"])
    _check_weights(root, state["weights"], check_weights)
    modules = eventful_modules(root)
    check_keys(state["modules"], [name for name, _ in modules], "'modules'")
    states = state["modules"]
    for name, m in modules:
        _check_values(name, m, states[name])
    for name, m in modules:
        if hasattr(m, "state_shapes"):
            held = _check_block(name, m, states, streams, autocast)
            if held is not None:
                if streams is not None and held != streams:
                    _fail(f"block '{name}' holds {held} streams, not {streams}")
                streams = held
    staged = {}
    for name, m in modules:
        values = {}
        for attr in m.state_attrs:
            value = states[name][_key(attr)]
            if isinstance(value, Tensor):
                slot = m.state_slots.get(attr)
                value = placed_copy(value, slot) if slot else _snapshot(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[attr] = value
        values["_refresh"] = states[name]["refresh"]
        staged[m] = values
    return staged, streams


def apply_stream_state(staged: Dict[EventfulModule, dict]) -> None:
    """Set what :func:`check_stream_state` returned (cannot fail), then rebuild the derived values."""
    for m, values in staged.items():
        for attr, value in values.items():
            setattr(m, attr, value)
        for attr in m.cache_attrs:
            setattr(m, attr, None)
    for m in staged:
        m._derive_state()


def load_stream_state(root: nn.Module, state, check_weights: bool = True) -> None:
    """Check ``state`` against ``root`` (see :func:`check_stream_state`), then load copies of it."""
    staged, _ = check_stream_state(root, state, check_weights=check_weights)
    apply_stream_state(staged)
