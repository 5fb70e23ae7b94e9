"""Registration of the Triton kernels as the CUDA implementation of ``torch.ops.eventful``.

Rule (coordinates with the C++ CUDA kernels of csrc/cuda/): ``EVENTFUL_BACKEND_CUDA`` selects
- ``auto`` (default): Triton fills in every op that has no CUDA kernel registered from C++;
- ``triton``: Triton serves every op, overriding C++ CUDA kernels;
- ``cuda``: Triton registers nothing (C++ CUDA kernels only).
The schemas of the ops that take an index end in ``*, bool check_index=True``; the functions take it as a keyword.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch

from .av_delta_update import KERNELS as _AV_DELTA_UPDATE
from .gather_scatter import KERNELS as _GATHER_SCATTER
from .qk_update import KERNELS as _QK_UPDATE
from .token_gate import KERNELS as _TOKEN_GATE

BACKENDS = ("auto", "triton", "cuda")


def _none(fn: Callable) -> Callable:
    """Dispatcher kernels of ``-> ()`` schemas return None (the plain functions return the mutated tensor). The
    dispatcher passes keyword-only schema arguments (``check_index``) as keywords."""
    def kernel(*args, **kwargs):
        fn(*args, **kwargs)
    kernel.__name__ = fn.__name__
    return kernel


# op name -> dispatcher kernel, from each family module's KERNELS (in torch.ops.eventful's order, csrc/ops.cpp)
KERNELS: Dict[str, Callable] = {
    name: _none(fn) if name.endswith("_") else fn
    for family in (_GATHER_SCATTER, _TOKEN_GATE, _QK_UPDATE, _AV_DELTA_UPDATE) for name, fn in family.items()
}

_LIB: Optional[torch.library.Library] = None
_REGISTERED: List[str] = []
_CPP_CUDA: Dict[str, bool] = {}  # C++ CUDA kernel present before Triton registered anything


def backend_from_env() -> str:
    value = os.environ.get("EVENTFUL_BACKEND_CUDA", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"eventful: EVENTFUL_BACKEND_CUDA must be one of {BACKENDS}, got {value!r}")
    return value


def should_register(backend: str, has_cpp_cuda_kernel: bool) -> bool:
    return backend == "triton" or (backend == "auto" and not has_cpp_cuda_kernel)


def has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "CUDA")


def register_cuda_kernels(backend: Optional[str] = None) -> List[str]:
    """Register the Triton kernels for the CUDA key per the rule above (once); returns the op names registered."""
    global _LIB
    if _LIB is not None:
        return list(_REGISTERED)
    backend = backend or backend_from_env()
    _CPP_CUDA.update({n: has_cuda_kernel(n) for n in KERNELS})
    chosen = [n for n in KERNELS if should_register(backend, _CPP_CUDA[n])]
    _LIB = torch.library.Library("eventful", "IMPL")
    for name in chosen:
        torch.library.register_kernel(f"eventful::{name}", "cuda", KERNELS[name], lib=_LIB)
    _REGISTERED[:] = chosen
    return list(chosen)


def cpp_cuda_kernels() -> Dict[str, bool]:
    """Per op: whether a C++ CUDA kernel was registered when the Triton kernels were registered."""
    return dict(_CPP_CUDA)


def registered_ops() -> List[str]:
    """Ops whose CUDA kernel is the Triton one in this process."""
    return list(_REGISTERED)
