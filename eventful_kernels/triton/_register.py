"""Registration of the Triton kernels as the CUDA implementation of ``torch.ops.eventful``.

Rule (coordinates with the C++ CUDA kernels of csrc/cuda/): ``EVENTFUL_BACKEND_CUDA`` selects
- ``auto`` (default): Triton fills in every op that has no CUDA kernel registered from C++, and serves every op
  when the C++ CUDA kernels were not compiled for each visible GPU (their targets: ``cuda_archs`` of
  ``eventful_kernels.info()``);
- ``triton``: Triton serves every op, overriding C++ CUDA kernels;
- ``cuda``: Triton registers nothing (C++ CUDA kernels only).
The schemas of the ops that take an index end in ``*, bool check_index=True``; the functions take it as a keyword.
"""
from __future__ import annotations

import ctypes
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def _returns_nothing(name: str) -> bool:
    return not getattr(torch.ops.eventful, name).default._schema.returns


# op name -> dispatcher kernel, from each family module's KERNELS (in torch.ops.eventful's order, csrc/ops.cpp)
KERNELS: Dict[str, Callable] = {
    name: _none(fn) if _returns_nothing(name) else fn
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


def arch_covers(archs: Sequence[str], capability: Tuple[int, int]) -> bool:
    """Whether code compiled for the nvcc targets ``archs`` runs on a GPU of compute ``capability`` (major, minor):
    ``sm_XY`` on X.Y and later minors of X, ``compute_XY`` (PTX) on X.Y and later, the architecture-specific
    ``sm_XYa`` / ``compute_XYa`` on X.Y only. A target of another form counts as covering (never refuse on a guess)."""
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if m is None:
            return True
        target = (int(m.group(2)), int(m.group(3)))
        if m.group(4):
            covered = capability == target
        elif m.group(1) == "sm":
            covered = capability[0] == target[0] and capability[1] >= target[1]
        else:
            covered = capability >= target
        if covered:
            return True
    return False


def _nvml_capabilities() -> Optional[List[Tuple[int, int]]]:
    """Compute capability of every GPU of the machine from NVML (no CUDA context is created, so importing the package
    stays cheap and fork-safe; NVML does not apply CUDA_VISIBLE_DEVICES). None when NVML cannot tell."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        caps = []
        for i in range(count.value):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0 or \
                    nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            caps.append((major.value, minor.value))
        return caps
    finally:
        nvml.nvmlShutdown()


def device_capabilities() -> Optional[List[Tuple[int, int]]]:
    """Compute capabilities of the GPUs: torch's visible devices once CUDA is initialised, else NVML's; None when
    unknown."""
    if torch.cuda.is_initialized():
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return _nvml_capabilities()


def library_cuda_archs() -> Optional[List[str]]:
    """The nvcc targets the C++ CUDA kernels were compiled for (``[]``: none; None: a library that does not say)."""
    from .._load import library_facts, loaded_library  # runs while eventful_kernels itself is being imported

    path = loaded_library()
    return None if path is None else library_facts(path)["cuda_archs"]


def cpp_cuda_covers_devices() -> bool:
    """Whether the C++ CUDA kernels were compiled for every GPU (True when the library or the devices do not say)."""
    try:
        archs = library_cuda_archs()
        caps = device_capabilities() if archs else None
    except Exception:  # a report must never keep the package from importing: trust the kernels
        return True
    return caps is None or all(arch_covers(archs, cap) for cap in caps)


def has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "CUDA")


def register_cuda_kernels(backend: Optional[str] = None) -> List[str]:
    """Register the Triton kernels for the CUDA key per the rule above (once); returns the op names registered."""
    global _LIB
    if _LIB is not None:
        return list(_REGISTERED)
    backend = backend or backend_from_env()
    _CPP_CUDA.update({n: has_cuda_kernel(n) for n in KERNELS})
    usable = backend != "auto" or cpp_cuda_covers_devices()  # else the C++ kernels would fail at their first launch
    chosen = [n for n in KERNELS if should_register(backend, _CPP_CUDA[n] and usable)]
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
