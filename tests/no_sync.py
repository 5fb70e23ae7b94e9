"""A dispatch mode that fails on anything that would make a steady-state frame synchronise with a GPU.

Forbidden inside the mode:
- ops that read a value back to the host (``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``bool(t)``) or
  whose output shape depends on the data (ops tagged ``dynamic_output_shape`` / ``data_dependent_output``:
  ``nonzero``, ``unique``, ``masked_select``, ...), boolean-mask indexing, and copies from a device to the host;
- ``Tensor.tolist()`` (it reads values without dispatching an op);
- an ``eventful::`` op called with an index and ``check_index=True``: on CUDA its value check reads a flag back.

It runs on CPU tensors: what it proves is that the frame's code path issues none of these, which on a GPU means no
synchronisation.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.item.default}
_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
_ADVANCED_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}
_INDEXED = {"gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "qk_update_", "av_delta_update_",
            "token_delta_gate"}


class SyncError(AssertionError):
    pass


class NoSyncMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # names of the ops seen (what the frame ran)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.calls.append(name)
        if func in _ADVANCED_INDEXING:  # tagged dynamic for boolean masks only; integer indices are fine
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                raise SyncError(f"{name} with a boolean mask has a data-dependent shape")
        elif func in _READS or any(tag in func.tags for tag in _TAGS):
            raise SyncError(f"{name} reads data back to the host or has a data-dependent shape")
        if func.namespace == "eventful" and func._opname in _INDEXED:
            has_index = func._opname != "token_delta_gate" or (len(args) > 3 and args[3] is not None)
            if has_index and kwargs.get("check_index", True):
                raise SyncError(f"{name} called with check_index=True (on CUDA: a host read of its check flag)")
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst_cpu = (kwargs.get("device") == torch.device("cpu")) if func is aten._to_copy.default else \
                args[0].device.type == "cpu"
            if dst_cpu and src.device.type != "cpu":
                raise SyncError(f"{name} copies from {src.device} to the host")
        return func(*args, **kwargs)


@contextmanager
def no_sync():
    """Run the block under :class:`NoSyncMode` with ``Tensor.tolist`` disabled; yields the mode."""
    original = torch.Tensor.tolist

    def tolist(self):
        raise SyncError("Tensor.tolist() reads values back to the host")

    torch.Tensor.tolist = tolist
    try:
        with NoSyncMode() as mode:
            yield mode
    finally:
        torch.Tensor.tolist = original
