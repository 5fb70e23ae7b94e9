"""Eventful module layer: policies, token gates and buffers, stateful attention products, eventful blocks.

Every stateful module takes ``backend="ops"`` (fused ``torch.ops.eventful`` kernels) or ``"reference"`` (pure
PyTorch), has ``reset()`` (new video; the next call is a dense flush) and ``last_macs``. See docs/nn-api.md.
"""
from .attention import DenseAttention, EventfulAttention
from .backend import BACKENDS, EventfulModule, set_backend
from .blocks import EventfulBlock, EventfulTokenwiseBlock
from .buffers import TokenBuffer
from .gates import TokenDeltaGate, TokenGate
from .matmul import MatmulBuffer, MatmulDeltaAccumulator
from .policies import Policy, Threshold, TopFraction, TopK, as_policy
from .relpos import DecomposedRelPos
from .windows import WindowGrid


def set_policy(module, policy) -> None:
    """Point every gate and block in ``module`` at ``policy`` (int -> TopK, float -> TopFraction, or a Policy)."""
    policy = as_policy(policy)
    for m in module.modules():
        if isinstance(m, (TokenGate, TokenDeltaGate)):
            m.policy = policy
        elif isinstance(m, (EventfulBlock, EventfulTokenwiseBlock)):
            m._policy = policy


__all__ = [
    "BACKENDS", "EventfulModule", "set_backend", "set_policy",
    "Policy", "TopK", "TopFraction", "Threshold", "as_policy",
    "TokenGate", "TokenDeltaGate", "TokenBuffer", "MatmulBuffer", "MatmulDeltaAccumulator",
    "DecomposedRelPos", "DenseAttention", "EventfulAttention", "WindowGrid",
    "EventfulBlock", "EventfulTokenwiseBlock",
]
