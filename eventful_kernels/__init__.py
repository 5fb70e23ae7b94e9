"""eventful-kernels: fused kernels for Eventful Transformers behind ``torch.ops.eventful``.

``eventful_kernels.ops`` holds the typed op wrappers, ``eventful_kernels.reference`` the pure-PyTorch ground truth.
``get_include()`` / ``get_library_path()`` serve C++ extensions built on the ops (``#include <eventful/ops.h>``);
``info()`` (or ``python -m eventful_kernels``) reports the build and the backends available, for bug reports.
"""
from ._load import get_include
from ._load import load_native as _load_native
from ._load import loaded_library as _loaded_library

_load_native()

from . import ops, reference  # noqa: E402  (ops need the native library registered first)

import torch as _torch  # noqa: E402

if _torch.cuda.is_available():  # Triton kernels serve CUDA ops the C++ build lacks (never fails without triton)
    from . import triton  # noqa: E402,F401

from ._info import info  # noqa: E402


def get_library_path() -> str:
    """Path of the loaded compiled library (``_C``), which registers ``torch.ops.eventful`` when loaded."""
    return _loaded_library()


__all__ = ["ops", "reference", "get_include", "get_library_path", "info"]
__version__ = "0.1.0"
