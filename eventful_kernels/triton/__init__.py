"""Triton kernels for every op of the eventful contract, registered as the CUDA implementation of
``torch.ops.eventful`` (see ``_register`` for the rule shared with the C++ CUDA kernels and the
``EVENTFUL_BACKEND_CUDA`` switch), one module per op family (``gather_scatter``, ``token_gate``, ``qk_update``,
``av_delta_update``, as in csrc/). Argument checks are the C++ ones (``torch.ops.eventful._check_<op>``). Each op is
also a plain function on tensors, e.g.
``eventful_kernels.triton.gather_rows(x, index)``; CPU tensors run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported). Semantics: :mod:`eventful_kernels.reference`.

Importing this package never fails: without a usable triton, ``AVAILABLE`` is False, ``IMPORT_ERROR`` says why,
nothing is registered, and using an op raises ImportError.
"""
from __future__ import annotations

OPS = ("gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
       "token_gate_threshold", "token_delta_gate", "qk_update_", "av_delta_update_")

try:
    import triton as _triton  # noqa: F401  (the top-level package, not this one)
    import triton.language as _tl  # noqa: F401

    AVAILABLE, IMPORT_ERROR = True, None
except Exception as exc:  # ImportError, or a broken install failing at import
    AVAILABLE, IMPORT_ERROR = False, exc

if AVAILABLE:
    from ._register import register_cuda_kernels, registered_ops
    from ._runtime import INTERPRET
    from .av_delta_update import av_delta_update_
    from .gather_scatter import gather_cols, gather_rows, scatter_cols_, scatter_rows_, scatter_rows_residual_
    from .qk_update import qk_update_
    from .token_gate import token_delta_gate, token_gate, token_gate_threshold

    __all__ = ["AVAILABLE", "IMPORT_ERROR", "INTERPRET", "av_delta_update_", "gather_cols", "gather_rows",
               "qk_update_", "registered_ops", "scatter_cols_", "scatter_rows_", "scatter_rows_residual_",
               "token_delta_gate", "token_gate",
               "token_gate_threshold"]
    register_cuda_kernels()
else:
    INTERPRET = False

    def registered_ops():
        return []

    def __getattr__(name):
        if name in OPS:
            raise ImportError(f"eventful_kernels.triton.{name}: triton is not available ({IMPORT_ERROR!r})")
        raise AttributeError(name)

__all__ = ["AVAILABLE", "IMPORT_ERROR", "INTERPRET", "OPS", "registered_ops", *OPS]
