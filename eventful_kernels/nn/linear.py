"""Token-wise linear layers of the gated path, run through oneDNN prepacked weights on CPU.

A gated layer pushes few rows (the r selected tokens) through the same weights every frame. At such small M the
stock ``F.linear`` (MKL sgemm on an unpacked ``[out, in]`` weight) re-packs the weight panel on every call and runs
at ~70% of its large-M rate; a weight reordered once into oneDNN's blocked layout runs small-M products near the
large-M rate (measured 2 threads, M=49, D=768: 105 -> ~190 GFLOP/s). The packed copy is made lazily, keyed by the
weight's storage, version, dtype and device, so ``load_state_dict``/``.to()``/``.half()`` trigger a repack; it costs
one extra copy of the weights. Anything the packed path does not cover (CUDA, float16 without CPU support, no
oneDNN, ``EVENTFUL_PACKED_LINEAR=0``, tracing by ``torch.compile``) runs the module as it is.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_enabled() -> bool:
    """Whether prepacked CPU linears are allowed: oneDNN present and ``EVENTFUL_PACKED_LINEAR`` not ``0``."""
    return os.environ.get("EVENTFUL_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


def _fusable_activation(act: nn.Module) -> Optional[Tuple[str, str]]:
    """oneDNN post-op ``(attr, algorithm)`` equal to ``act``, or None when it cannot be fused."""
    if type(act) is nn.GELU:
        return ("gelu", "tanh" if act.approximate == "tanh" else "none")
    if type(act) is nn.ReLU:
        return ("relu", "")
    return None


class PackedLinear:
    """``linear(x)`` (optionally followed by ``activation``) for ``x [..., in]`` -> ``[..., out]``.

    Holds a reference to ``linear`` (``.module``; weights shared, not copied into the module tree, so state dicts
    are unchanged). On CPU float32/bfloat16 with packing enabled the product runs on a cached oneDNN-reordered copy of
    the weight, the activation fused as a post-op where oneDNN has it (GELU, ReLU); otherwise
    ``activation(linear(x))`` as the modules define it.
    """

    def __init__(self, linear: nn.Linear, activation: Optional[nn.Module] = None):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"eventful: PackedLinear needs an nn.Linear, got {type(linear).__name__}")
        self._exact = type(linear) is nn.Linear  # subclasses may override forward: always called as they are
        self.linear = self.module = linear
        self.activation = activation
        fused = None if activation is None else _fusable_activation(activation)
        self._post_op = fused or ("none", "")
        self._after = activation if activation is not None and fused is None else None
        self._key: Optional[tuple] = None
        self._src: Optional[Tensor] = None
        self._packed: Optional[Tensor] = None

    def _weight_key(self, w: Tensor) -> tuple:
        # The packed source is kept alive in the key, so its address cannot be reused by a new weight while cached.
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), tuple(w.stride()))

    def packed_weight(self, x: Tensor) -> Optional[Tensor]:
        """The reordered weight usable for ``x``, (re)packed when the weight changed; None when not applicable."""
        w = self.linear.weight
        if (
            not self._exact
            or x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.dtype != w.dtype
            or w.dtype not in _PACKED_DTYPES
            or w.requires_grad and torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # the packed call reads storage pointers: run F.linear in a graph
            or not packing_enabled()
        ):
            return None
        key = self._weight_key(w)
        if self._key != key:
            self._key, self._src, self._packed = key, w.detach(), None
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self._src)
            except RuntimeError:  # dtype without CPU support (e.g. bf16 on a CPU lacking it): stay unpacked
                self._packed = None
        return self._packed

    def __call__(self, x: Tensor) -> Tensor:
        packed = self.packed_weight(x)
        if packed is None:
            y = F.linear(x, self.linear.weight, self.linear.bias) if self._exact else self.linear(x)
            return y if self.activation is None else self.activation(y)
        bias = self.linear.bias
        attr, algorithm = self._post_op
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None if bias is None else bias.detach(), attr, [], algorithm)
        return y if self._after is None else self._after(y)


def _is_timm_mlp(mlp: nn.Module) -> bool:
    """Exactly timm's ``Mlp`` with linear layers (not GluMlp/SwiGLU/conv variants, whose forward differs)."""
    cls = type(mlp)
    return (
        cls.__name__ == "Mlp"
        and cls.__module__.startswith("timm.")
        and isinstance(getattr(mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)
        and isinstance(getattr(mlp, "act", None), nn.Module)
    )


class PackedMlp:
    """timm ``Mlp`` (``fc1 -> act -> drop1 -> norm -> fc2 -> drop2``) with both linears packed and ``act`` fused
    into ``fc1``. Dropout is skipped (inference only). Any other MLP type is called as it is. ``.module`` is ``mlp``."""

    def __init__(self, mlp: nn.Module):
        self.mlp = self.module = mlp
        self._plain = _is_timm_mlp(mlp)
        if self._plain:
            self.fc1 = PackedLinear(mlp.fc1, mlp.act)
            self.fc2 = PackedLinear(mlp.fc2)
            norm = getattr(mlp, "norm", None)
            self.norm = None if norm is None or isinstance(norm, nn.Identity) else norm

    def __call__(self, x: Tensor) -> Tensor:
        if not self._plain:
            return self.mlp(x)
        h = self.fc1(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(h)


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every plain ``nn.Linear`` of ``model`` runs on prepacked weights (forward hooks still
    fire); on exit the modules are restored. Gives a dense model the same linear kernels as the eventful blocks,
    e.g. as the stronger dense baseline in benchmarks."""
    patched = []
    try:
        for m in model.modules():
            if type(m) is nn.Linear and "forward" not in m.__dict__:
                m.forward = PackedLinear(m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward
