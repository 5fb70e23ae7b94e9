"""eventful-kernels: fused kernels for Eventful Transformers behind ``torch.ops.eventful``.

``eventful_kernels.ops`` holds the typed op wrappers, ``eventful_kernels.reference`` the pure-PyTorch ground truth.
"""
from ._load import load_native as _load_native

_LIBRARY_PATH = _load_native()

from . import ops, reference  # noqa: E402  (ops need the native library registered first)

import torch as _torch  # noqa: E402

if _torch.cuda.is_available():  # Triton kernels serve CUDA ops the C++ build lacks (never fails without triton)
    from . import triton  # noqa: E402,F401

__all__ = ["ops", "reference"]
__version__ = "0.1.0"
