"""``info()``: the build and the backends this process can use, in the detail a bug report needs."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch

from ._load import library_facts

_ENV = ("EVENTFUL_BACKEND_CUDA", "EVENTFUL_ATTENTION", "EVENTFUL_PACKED_LINEAR", "TRITON_INTERPRET")


def _op_names() -> List[str]:
    """The public ops of ``torch.ops.eventful`` (the ``_check_<op>`` argument-check ops are internal)."""
    names = (n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("eventful::"))
    return sorted(n for n in names if not n.startswith("_"))


def _triton() -> Dict[str, Any]:
    """Triton's state without importing it: eventful_kernels.triton is imported only when CUDA is available."""
    loaded = sys.modules.get("eventful_kernels.triton")
    try:
        version: Optional[str] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    out: Dict[str, Any] = {"installed": importlib.util.find_spec("triton") is not None, "version": version,
                           "loaded": loaded is not None}
    if loaded is None:
        out.update(interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1", serves_cuda_ops=[], error=None)
    else:
        out.update(interpreter=bool(loaded.INTERPRET), serves_cuda_ops=sorted(loaded.registered_ops()),
                   error=None if loaded.IMPORT_ERROR is None else repr(loaded.IMPORT_ERROR))
    return out


def _cpp_cuda_ops(ops: List[str]) -> List[str]:
    """Ops with a C++ CUDA kernel (csrc/cuda/), as registered before Triton added its own."""
    loaded = sys.modules.get("eventful_kernels.triton")
    if loaded is not None and getattr(loaded, "AVAILABLE", False):
        before = loaded._register.cpp_cuda_kernels()
        return sorted(n for n, has in before.items() if has)
    return [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{n}", "CUDA")]


def _cpp_cover_devices(cuda_ok: bool) -> Optional[bool]:
    """Whether the C++ CUDA kernels were compiled for every visible GPU (None without a GPU or without Triton, whose
    registration rule decides it)."""
    if not cuda_ok:
        return None
    try:
        from .triton import _register
    except ImportError:
        return None
    return _register.cpp_cuda_covers_devices()


def _cuda_devices() -> List[str]:
    return [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())]


def collect() -> Dict[str, Any]:
    """Everything ``info()`` reports, as a dict of plain values (JSON-serialisable)."""
    import eventful_kernels as ek

    ops = _op_names()
    cuda_ok = torch.cuda.is_available()
    return {
        "eventful_kernels": {"version": ek.__version__, "package": os.path.dirname(os.path.abspath(ek.__file__)),
                             "library": ek.get_library_path(), "include": ek.get_include(), "ops": ops},
        "build": library_facts(ek.get_library_path()),
        "python": {"version": platform.python_version(), "platform": platform.platform(),
                   "machine": platform.machine()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "mkldnn": torch.backends.mkldnn.is_available()},
        "cuda": {"available": cuda_ok, "devices": _cuda_devices() if cuda_ok else [],
                 "cpp_kernels": _cpp_cuda_ops(ops), "cpp_kernels_cover_devices": _cpp_cover_devices(cuda_ok)},
        "triton": _triton(),
        "env": {name: os.environ[name] for name in _ENV if name in os.environ},
    }


def _format(d: Dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, list):
            return ", ".join(map(str, v)) if v else "none"
        return "-" if v is None else str(v)

    lines = []
    for section, values in d.items():
        lines.append(f"{section}:")
        lines += [f"  {key}: {show(value)}" for key, value in values.items()]
    if not d["env"]:
        lines.append("  (no EVENTFUL_* / TRITON_INTERPRET variables set)")
    return "\n".join(lines)


def info(as_dict: bool = False):
    """Print the version, the torch it runs on and was built against, the CPU gate paths (compiled / taken here),
    the ops with C++ CUDA kernels, Triton (version, interpreter, ops it serves) and the relevant environment
    variables. ``as_dict=True`` returns the same as a dict instead of printing."""
    d = collect()
    if as_dict:
        return d
    print(_format(d))
    return None
