"""Typed wrappers over ``torch.ops.eventful`` plus fake (meta) kernels so ``torch.compile`` and opcheck trace them,
one module per op family (``gather_scatter``, ``token_gate``, ``qk_update``, ``av_delta_update``, ``linear_bf16``; as
in csrc/), each
op's fake kernel beside its wrapper.

Semantics of every op: :mod:`eventful_kernels.reference`. Shapes: ``x [B, N, D]`` or ``[B, H, N, D]``,
``index [B, K]`` int32/int64 shared over heads; an entry ``-1`` is an empty slot that every op skips. In-place ops
(trailing ``_``) return the tensor they mutate.

Index values: by default (``check_index=True``) every op that takes an index checks its values (ids in ``[0, N)`` or
``-1``, distinct where the op writes through them) before writing anything, and raises an error naming the argument.
On CUDA that check reads one flag back to the host (a synchronisation). ``check_index=False`` is for indices the
caller vouches for, e.g. those the gates return: no check and no synchronisation (CUDA-graph capturable); ids
outside ``[0, N)`` are then treated as empty slots (nothing out of bounds is ever read or written) and duplicate ids
in a write give an unspecified one of the written values.

Every argument is checked before anything is written: ``None`` for a tensor raises ``TypeError`` naming it. The ops
are inference-only (no autograd): with grad mode on, a tensor argument that requires grad is refused with a
``RuntimeError`` naming it (call under ``torch.no_grad()`` / ``torch.inference_mode()``, or pass a detached tensor).
Like PyTorch's own in-place ops, each call bumps the version counter (``t._version``) of every tensor it mutates
(annotated ``Tensor(a!)`` in csrc/ops.cpp) by one. Both hold on every backend (registered once, in csrc/ops.cpp).
"""
from .av_delta_update import av_delta_update_
from .gather_scatter import gather_cols, gather_rows, scatter_cols_, scatter_rows_, scatter_rows_residual_
from .linear_bf16 import linear_bf16, linear_bf16_pack
from .qk_update import qk_update_
from .token_gate import token_delta_gate, token_gate, token_gate_threshold

__all__ = ["gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
           "token_gate_threshold", "token_delta_gate", "qk_update_", "av_delta_update_", "linear_bf16_pack",
           "linear_bf16"]
