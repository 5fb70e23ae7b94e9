"""Locate and load the compiled op library (``_C``, which registers torch.ops.eventful) and the public C++ headers.

The library sits next to the package. Python started in a source checkout imports the checkout's
``eventful_kernels/``, which has no library after a non-editable install (``pip install .``); the installed copy's
library is used then.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.metadata
import os
import warnings
from typing import Dict, Iterator, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_INCLUDE = os.path.join(os.path.dirname(_HERE), "csrc", "include")


def _installed_package_dirs() -> Iterator[str]:
    """``eventful_kernels/`` of every installed distribution other than this directory (editable ones have none)."""
    for dist in importlib.metadata.distributions(name="eventful-kernels"):
        path = os.path.abspath(str(dist.locate_file("eventful_kernels")))
        if path != _HERE and os.path.isdir(path):
            yield path


def _library_in(folder: str) -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_C" + suffix)
        if os.path.exists(path):
            return path
    found = sorted(glob.glob(os.path.join(folder, "_C*.so")))
    return found[0] if found else None


def find_library() -> Optional[str]:
    """Path of the compiled library: next to this package, else in an installed copy of it; None if neither."""
    for folder in (_HERE, *_installed_package_dirs()):
        path = _library_in(folder)
        if path is not None:
            return path
    return None


_LOADED: Optional[str] = None  # the library load_native loaded


def loaded_library() -> Optional[str]:
    """Path of the library :func:`load_native` loaded into this process; None before it did."""
    return _LOADED


def load_native() -> str:
    """Load the compiled library into torch (registers torch.ops.eventful); returns its path."""
    global _LOADED
    path = find_library()
    if path is None:
        raise ImportError(
            "eventful_kernels: compiled library _C not found next to the package or in an installed copy; build it "
            "with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)"
        )
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise ImportError(
            f"eventful_kernels: cannot load {path}: {exc}. The library is compiled against one torch version; if it "
            f"was built for another than the installed torch {torch.__version__}, rebuild it "
            "(`pip install --no-build-isolation .`)"
        ) from exc
    _LOADED = path
    built = library_facts(path)["torch_built_against"]
    if built is not None and _minor(built) != _minor(torch.__version__):
        warnings.warn(
            f"eventful_kernels: {path} was built against torch {built} but torch {torch.__version__} is running; "
            "rebuild it (`pip install --no-build-isolation .`) if ops misbehave",
            RuntimeWarning,
            stacklevel=3,
        )
    return path


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def library_facts(path: str) -> Dict[str, Optional[object]]:
    """What the library reports about its build (csrc/build_info.cpp): the torch it was compiled against, the
    compiler, the CPU gate paths compiled in, and the one dense rows take on this machine; the path linear_bf16 takes
    here; the CUDA targets of the C++ CUDA kernels (``[]`` without them). None where unknown."""
    lib = ctypes.CDLL(path)
    build = _text(lib, "eventful_build_info")
    if build is None:  # a library built before it reported its build
        return {"torch_built_against": None, "compiler": None, "cpu_gate_paths": None, "cpu_gate_path": None,
                "cpu_linear_bf16_path": None, "cuda_archs": None}
    facts = dict(line.split("=", 1) for line in build.splitlines() if "=" in line)
    archs = facts.get("cuda_archs")
    return {
        "torch_built_against": facts.get("torch"),
        "compiler": facts.get("compiler"),
        "cpu_gate_paths": facts.get("cpu_gate_paths", "").split(","),
        "cuda_archs": None if archs is None else [a for a in archs.split(",") if a],
        "cpu_gate_path": _text(lib, "eventful_cpu_gate_path"),
        "cpu_linear_bf16_path": _text(lib, "eventful_cpu_linear_bf16_path"),
    }


def _text(lib, symbol: str) -> Optional[str]:
    """A ``const char*`` the library returns from ``symbol``; None for a library built without it."""
    fn = getattr(lib, symbol, None)
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def get_include() -> str:
    """Folder to add to the include path for ``#include <eventful/ops.h>`` and ``<eventful/checks.h>``."""
    candidates = [os.path.join(_HERE, "include"), _SOURCE_INCLUDE]
    candidates += [os.path.join(d, "include") for d in _installed_package_dirs()]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "eventful", "ops.h")):
            return folder
    raise FileNotFoundError("eventful_kernels: the C++ headers (eventful/ops.h) are not installed with this package")
