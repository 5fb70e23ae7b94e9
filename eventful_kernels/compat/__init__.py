"""Drop-in modules for code written against the published Eventful Transformers implementation.

The published package's gates, buffers, attention accumulators and policies, with the same names, constructor
arguments, call signatures, return values and flush / ``reset()`` / operation-counting behaviour, running on this
library's fused kernels. Switch a published-style model over by changing its imports::

    from eventful_transformer.base import ExtendedModule        ->  from eventful_kernels.compat.base import ...
    from eventful_transformer.modules import TokenGate, ...      ->  from eventful_kernels.compat.modules import ...
    from eventful_transformer.policies import TokenNormTopK, ... ->  from eventful_kernels.compat.policies import ...

(or import everything from ``eventful_kernels.compat``). What differs is listed in docs/migrating.md.
"""
from .base import Counts, ExtendedModule
from .modules import MatmulBuffer, MatmulDeltaAccumulator, TokenBuffer, TokenDeltaGate, TokenGate
from .policies import TokenNormThreshold, TokenNormTopFraction, TokenNormTopK


def set_policies(model, policy_class, **policy_kwargs) -> None:
    """Give every gate of ``model`` its own ``policy_class(**policy_kwargs)``."""
    for gate in model.modules():
        if isinstance(gate, TokenGate):
            gate.policy = policy_class(**policy_kwargs)


__all__ = [
    "Counts", "ExtendedModule", "TokenGate", "TokenDeltaGate", "TokenBuffer", "MatmulBuffer",
    "MatmulDeltaAccumulator", "TokenNormTopK", "TokenNormTopFraction", "TokenNormThreshold", "set_policies",
]
