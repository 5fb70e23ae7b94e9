"""Token-wise linear layers of the gated path, run through oneDNN prepacked weights on CPU.

A gated layer pushes few rows (the r selected tokens) through the same weights every frame. At such small M the
stock ``F.linear`` (MKL sgemm on an unpacked ``[out, in]`` weight) re-packs the weight panel on every call and runs
at ~70% of its large-M rate; a weight reordered once into oneDNN's blocked layout runs small-M products near the
large-M rate (measured 2 threads, M=49, D=768: 105 -> ~190 GFLOP/s). The packed copy is made lazily and costs one
extra copy of the weights. bfloat16 on a CPU without native bf16 arithmetic (AVX2, no AVX512-BF16/AMX), where
oneDNN's bf16 products run 3-7x slower than float32, is packed for ``torch.ops.eventful.linear_bf16`` instead (bf16
weight panels, float32 FMAs, bias and activation fused; :func:`bf16_kernel`), and a convolution (the patch
embedding, SAM's neck) can run as such a linear over its patches (:class:`PackedConv`). Anything the packed path
does not cover (CUDA, float16 without CPU support, no oneDNN, ``EVENTFUL_PACKED_LINEAR=0``) runs the module as it
is.
Inside a ``torch.compile`` graph the packed product is the custom op ``torch.ops.eventful_nn.packed_linear``
(opaque to the compiler, which sees its output shape only), so compiled frames keep the packed weights;
``PackedLinear.in_graph = False`` makes them plain ``F.linear`` there.

A packed copy is a cache of the weight, so it must never outlive the values it was made from:

- it is keyed by the weight's storage, ``_version``, dtype, device, shape and strides: a new Parameter,
  ``.data = ...``, ``.to()``/``.half()`` and in-place writes through the Parameter (``load_state_dict``,
  ``with torch.no_grad(): w.copy_(...)``) repack it;
- writes through ``.data`` (``w.data.copy_(...)``, an EMA ``w.data.mul_(a).add_(...)``) do not bump ``_version``,
  so the packed copy keeps a fingerprint of the weight: the bytes of :data:`FINGERPRINT_RUNS` runs of
  :data:`FINGERPRINT_RUN_BYTES` consecutive bytes (256 float32 / 512 bfloat16 entries), evenly spaced at a fixed
  pseudo-random phase (:func:`sample_runs`). They are compared with the weight's bytes now before the packed copy is
  used, and any difference repacks. A :class:`PackedGroup` compares those of many linears at once: an eventful model
  checks all of its packed weights once before each frame (one concatenation and one compare: ~0.37 ms for ViT-B's
  48 weights, cold in cache as they are in a frame, against ~1.6 ms for 48 separate checks; measured by
  ``benchmarks/bench_weight_check.py``), and its linears skip their own check during the frame. A linear outside
  such a frame checks at every call.
- A change confined to unsampled bytes that also avoids ``_version`` is not seen: after such an edit call
  :func:`repack` (or ``EventfulModel.reset()``, which calls it). Non-contiguous weights are not packed.

:class:`ConcatLinear` presents separate linears of one input (Hugging Face's ``q_proj``/``k_proj``/``v_proj``) as
one layer with concatenated outputs; its packed copy is one reordered stack of their weights, keyed and
fingerprinted per source weight as above, so any of them changing repacks the stack.

Copies (``copy.deepcopy``, pickling) drop the packed weights; they are made again on the first call.
"""
from __future__ import annotations

import copy
import functools
import os
import random
import weakref
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..counting import LINEAR_TYPES

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN_TENSORS = (Tensor, nn.Parameter)  # a subclass (e.g. a quantized weight) runs as its module says

FINGERPRINT_RUNS = 16  # runs of consecutive bytes sampled per weight ...
FINGERPRINT_RUN_BYTES = 64  # ... a cache line each: the weight is cold when checked (the product reads the copy)
_LIVE: "weakref.WeakSet[PackedLinear]" = weakref.WeakSet()  # every PackedLinear, for repack() and PackedGroup
_PACKS = [0]  # bumped whenever a packed copy is dropped (before every repack too): groups rebuild their lists


def sample_runs(t: Tensor) -> Tensor:
    """The bytes of ``t`` (contiguous) that the fingerprint compares: a ``[runs, bytes]`` uint8 view of its memory,
    :data:`FINGERPRINT_RUNS` runs of :data:`FINGERPRINT_RUN_BYTES` evenly spaced at a pseudo-random phase fixed by
    the size (line-aligned when the storage is); all of ``t`` (``[1, nbytes]``) when it is that small."""
    flat = t.detach().reshape(-1).view(torch.uint8)
    n, runs, run = flat.numel(), FINGERPRINT_RUNS, FINGERPRINT_RUN_BYTES
    if n <= runs * run:
        return flat.view(1, n)
    spacing = (n // runs) // run * run
    phase = random.Random(n).randrange(spacing - run + 1) // run * run
    return flat.as_strided((runs, run), (spacing, 1), flat.storage_offset() + phase)


def sampled_entries(t: Tensor) -> Tensor:
    """Flat indices of the entries of ``t`` that :func:`sample_runs` reads (wholly or in part)."""
    view, size = sample_runs(t), t.element_size()
    base = t.detach().reshape(-1).view(torch.uint8).storage_offset()
    first = view.storage_offset() - base
    starts = first + torch.arange(view.shape[0]) * (view.stride(0) if view.shape[0] > 1 else 0)
    byte = (starts[:, None] + torch.arange(view.shape[1])).reshape(-1)
    return torch.unique(byte // size)


def bf16_kernel() -> str:
    """Which kernel runs packed bf16 linears on this CPU: ``"onednn"`` (oneDNN's reordered weight) where the CPU
    has native bf16 arithmetic (AVX512-BF16 / AMX), else ``"eventful"`` (:func:`eventful_kernels.ops.linear_bf16`:
    bf16 weight panels, float32 FMAs; oneDNN's bf16 products run 3-7x slower than float32 there).
    ``EVENTFUL_BF16_LINEAR=onednn|eventful`` overrides."""
    choice = os.environ.get("EVENTFUL_BF16_LINEAR", "auto")
    if choice not in ("auto", "onednn", "eventful"):
        raise ValueError(f"eventful: EVENTFUL_BF16_LINEAR must be auto, onednn or eventful, got {choice!r}")
    if choice == "auto":
        return "onednn" if _native_bf16() else "eventful"
    return choice


def product_dtype(t: Tensor) -> torch.dtype:
    """The dtype plain PyTorch products of ``t`` (attention maps, rel-pos tables) should run in: float32 for bf16 on
    a CPU where :func:`bf16_kernel` is ``"eventful"`` (PyTorch's bf16 products run several times slower than
    float32 there; e.g. the q kᵀ of a 4096-token SAM flush), else ``t``'s own dtype."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16 and bf16_kernel() == "eventful":
        return torch.float32
    return t.dtype


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


_ACTIVATION_NAMES = {("none", ""): "none", ("relu", ""): "relu", ("gelu", "none"): "gelu",
                     ("gelu", "tanh"): "gelu_tanh"}  # oneDNN post-op (attr, algorithm) -> linear_bf16 activation


def packing_enabled() -> bool:
    """Whether prepacked CPU linears are allowed: oneDNN present and ``EVENTFUL_PACKED_LINEAR`` not ``0``."""
    return os.environ.get("EVENTFUL_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


@torch.compiler.assume_constant_result
def _packing_on() -> bool:
    """:func:`packing_enabled`, read once per compilation inside a ``torch.compile`` graph (a constant there)."""
    return packing_enabled()


def _hf_gelu(act: nn.Module) -> Optional[str]:
    """The approximation of a Hugging Face GELU module (``GELUActivation``: ``"none"``, ``GELUTanh``: ``"tanh"``)
    when it runs ``F.gelu`` (not its Python formula), else None."""
    cls = type(act)
    if not cls.__module__.startswith("transformers."):
        return None
    fn = getattr(act, "act", None)
    if cls.__name__ == "GELUActivation" and fn is F.gelu:
        return "none"
    if cls.__name__ == "GELUTanh" and isinstance(fn, functools.partial) and fn.func is F.gelu and \
            fn.keywords == {"approximate": "tanh"} and not fn.args:
        return "tanh"
    return None


def _fusable_activation(act: nn.Module) -> Optional[Tuple[str, str]]:
    """oneDNN post-op ``(attr, algorithm)`` equal to ``act``, or None when it cannot be fused."""
    if type(act) is nn.GELU:
        return ("gelu", "tanh" if act.approximate == "tanh" else "none")
    if type(act) is nn.ReLU:
        return ("relu", "")
    approximate = _hf_gelu(act)
    if approximate is not None:
        return ("gelu", approximate)
    return None


class ConcatLinear(nn.Module):
    """``x [..., in] -> cat([linear(x) for linear in parts], -1)``: linears of one input presented as one layer
    (e.g. separate q/k/v projections as a fused qkv). The parts are registered under the given names and shared,
    never copied: their weights are the model's. ``in_features`` / ``out_features`` as for ``nn.Linear``."""

    def __init__(self, **parts: nn.Linear):
        super().__init__()
        if not parts or not all(isinstance(p, LINEAR_TYPES) for p in parts.values()):
            raise TypeError("eventful: ConcatLinear needs one or more linear parts (nn.Linear, or an int8 linear of "
                            "torch.ao.quantization)")
        if len({p.in_features for p in parts.values()}) != 1:
            raise ValueError("eventful: ConcatLinear parts must have the same in_features")
        for name, part in parts.items():
            self.add_module(name, part)

    def parts(self) -> Tuple[nn.Linear, ...]:
        """The linears as they are now, in order."""
        return tuple(self._modules.values())

    @property
    def in_features(self) -> int:
        return self.parts()[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts()], -1)


class ConvLinear:
    """A plain ``nn.Conv2d`` (:func:`is_plain_conv`) seen as the linear layer it is on its unfolded input patches:
    ``weight [out, in_channels * kh * kw]`` (a view of the conv's weight, read at every access, so edits and
    replacements of the conv's parameters show) and ``bias``. Not a module: the conv stays where it is in the
    model."""

    def __init__(self, conv: nn.Conv2d):
        if not is_plain_conv(conv):
            raise TypeError("eventful: ConvLinear needs an nn.Conv2d with one group, zero padding given as numbers "
                            "(or 'valid') and no forward override")
        self.conv = conv

    @property
    def weight(self) -> Tensor:
        w = self.conv.weight
        return w.reshape(w.shape[0], -1)  # a view of a contiguous weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv.bias

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def is_plain_conv(m: nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Conv2d`` (the class itself) with one group and zero padding given as numbers or
    ``"valid"``, whose forward is not overridden: a product of its weight with the unfolded input."""
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and (m.padding == "valid" or not isinstance(m.padding, str)) and "forward" not in m.__dict__)


def is_patchify_conv(m: nn.Module) -> bool:
    """Whether ``m`` is a plain conv that cuts its input into disjoint patches (a ViT patch embedding): kernel =
    stride, no padding, no dilation; unfolding it is a reshape."""
    return (is_plain_conv(m) and tuple(m.kernel_size) == tuple(m.stride) and m.padding in (0, (0, 0), "valid")
            and tuple(m.dilation) == (1, 1))


class PackedConv:
    """``conv(x)`` for a plain ``conv`` (:func:`is_plain_conv`) and ``x [B, C, H, W]``, run as a packed linear over
    the input patches where that is the fast path: bf16 on a CPU without native bf16, where PyTorch's convolution
    falls back to a slow generic kernel (ViT-B/16's patch embedding at 224 px: ~140 ms against ~2 ms; SAM's 3x3 neck
    conv at 64x64: ~19 s against ~0.13 s). Patchify convs unfold by a reshape, others by ``F.unfold``. Returns
    ``[B, out, Ho, Wo]`` as the conv does (a channels-last view); anything else calls the conv."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = self.module = conv
        self.patchify = is_patchify_conv(conv)
        self.linear = PackedLinear(ConvLinear(conv))

    def runners(self) -> List["PackedLinear"]:
        return [self.linear]

    def __call__(self, x: Tensor) -> Tensor:
        conv = self.conv
        if (x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.bfloat16 or conv.weight.dtype != x.dtype
                or not conv.weight.is_contiguous()  # (channels-last weights would be copied and repacked per call)
                or bf16_kernel() != "eventful" or not _packing_on() or torch.compiler.is_compiling()
                or x.shape[1] != conv.in_channels or self.patchify and (x.shape[2] % conv.stride[0]
                                                                       or x.shape[3] % conv.stride[1])):
            return conv._conv_forward(x, conv.weight, conv.bias)
        b, c, h, w = x.shape
        if self.patchify:
            kh, kw = conv.stride
            patches = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, h // kh,
                                                                                                 w // kw, -1)
            return self.linear(patches).permute(0, 3, 1, 2)
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, padding, conv.stride
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # [B, C*kh*kw, Ho*Wo]
        return self.linear(cols.transpose(1, 2)).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)


class PackedGroup:
    """Fingerprint checks of the packed linears that name this group, all at once.

    The owner calls :meth:`check` before a batch of calls (an eventful model: before each frame), which repacks any
    linear whose sampled bytes changed, then sets :attr:`active` while the batch runs; meanwhile the group's linears
    skip their own check. One concatenation and one compare instead of one check per linear.
    """

    def __init__(self) -> None:
        self.active = False
        self._epoch = -1
        self._runners: List["PackedLinear"] = []
        self._views: list = []
        self._expected = b""

    def add(self, runner) -> None:
        """Make ``runner`` (a :class:`PackedLinear`, or a :class:`PackedMlp` for its linears) part of the group."""
        for r in runner.runners():
            r._group = self

    def check(self) -> None:
        """Repack every linear of the group whose sampled bytes changed since it was packed."""
        if not PackedLinear.check_fingerprint:
            return
        if self._epoch != _PACKS[0]:
            self._runners = [r for r in list(_LIVE) if r._group is self and r._fp_views is not None]
            self._views = [v for r in self._runners for v in r._fp_views]
            self._expected = b"".join(r._fp for r in self._runners)
            self._epoch = _PACKS[0]
        # ravel: a small weight's sample is all of it ([1, nbytes]), a large one's [runs, run bytes]
        if self._views and np.concatenate([v.ravel() for v in self._views]).tobytes() != self._expected:
            for r in self._runners:
                if r.sampled_bytes() != r._fp:
                    r.invalidate()

    def __getstate__(self) -> dict:
        return {"active": False, "_epoch": -1, "_runners": [], "_views": [], "_expected": b""}


_RUNNERS: "weakref.WeakValueDictionary[int, PackedLinear]" = weakref.WeakValueDictionary()  # handle -> runner


@torch.library.custom_op("eventful_nn::packed_linear", mutates_args=())
def packed_linear_op(x: Tensor, weights: List[Tensor], handle: int) -> Tensor:
    """``PackedLinear`` number ``handle`` applied to ``x`` (its packed product and fused activation), as one op of a
    compiled graph. ``weights``: those of its linears (output features in order), passed so the graph depends on
    them."""
    return _RUNNERS[handle].eager(x)


@packed_linear_op.register_fake
def _packed_linear_fake(x, weights, handle):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


class PackedLinear:
    """``linear(x)`` (optionally followed by ``activation``) for ``x [..., in]`` -> ``[..., out]``.

    Holds a reference to ``linear`` (``.module``; weights shared, not copied into the module tree, so state dicts
    are unchanged), an ``nn.Linear`` or a :class:`ConcatLinear` (whose parts are read at every call). On CPU
    float32/bfloat16 with packing enabled the product runs on a cached oneDNN-reordered copy of the weight (of the
    stacked weights of a ``ConcatLinear``), the activation fused as a post-op where oneDNN has it (GELU, ReLU);
    otherwise ``activation(linear(x))`` as the modules define it.
    """

    def __init__(self, linear: nn.Module, activation: Optional[nn.Module] = None):
        if not isinstance(linear, (nn.Linear, ConcatLinear, ConvLinear)):
            raise TypeError("eventful: PackedLinear needs an nn.Linear, ConcatLinear or ConvLinear, got "
                            f"{type(linear).__name__}")
        # subclasses may override forward: always called as they are
        self._exact = type(linear) in (nn.Linear, ConcatLinear, ConvLinear)
        self.linear = self.module = linear
        self.activation = activation
        fused = None if activation is None else _fusable_activation(activation)
        self._post_op = fused or ("none", "")
        self._after = activation if activation is not None and fused is None else None
        self._key: Optional[tuple] = None
        self._srcs: Optional[Tuple[Tensor, ...]] = None
        self._packed: Optional[Tensor] = None
        self._bf16 = False  # the packed copy is linear_bf16 panels (else a oneDNN reordered weight)
        self._fp: Optional[bytes] = None  # the sampled bytes when packed
        self._fp_views: Optional[List[np.ndarray]] = None  # the same bytes of the weights now (views of their memory)
        self._group: Optional[PackedGroup] = None
        _LIVE.add(self)
        self._handle = id(self)
        _RUNNERS[self._handle] = self

    # Compare the sampled bytes; False only to measure what the comparison costs.
    check_fingerprint: bool = True
    # Inside a torch.compile graph: the packed product as a custom op (True) or plain F.linear (False).
    in_graph: bool = True

    def runners(self) -> List["PackedLinear"]:
        return [self]

    def linears(self) -> Tuple[nn.Linear, ...]:
        """The ``nn.Linear`` layers (or :class:`ConvLinear`) whose weights are packed (those of a ``ConcatLinear``
        as they are now)."""
        return self.linear.parts() if isinstance(self.linear, ConcatLinear) else (self.linear,)

    def sampled_bytes(self) -> bytes:
        """The fingerprinted bytes of the packed weights as they are now."""
        return b"".join(v.tobytes() for v in self._fp_views)

    def invalidate(self) -> None:
        """Drop the packed copy: the next call packs the weight as it is then."""
        self._key = self._srcs = self._packed = self._fp = self._fp_views = None
        _PACKS[0] += 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_key=None, _srcs=None, _packed=None, _fp=None, _fp_views=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _LIVE.add(self)
        self._handle = id(self)
        _RUNNERS[self._handle] = self

    def _weight_key(self, w: Tensor) -> tuple:
        # The packed source is kept alive in the key, so its address cannot be reused by a new weight while cached.
        # Inference tensors (a model built under torch.inference_mode) keep no version counter: their in-place
        # writes are seen by the fingerprint alone.
        version = -1 if w.is_inference() else w._version
        return (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape), tuple(w.stride()))

    def _packable(self, x: Tensor, linears: Tuple[nn.Linear, ...]) -> bool:
        if (
            not self._exact
            or x.device.type != "cpu"
            or x.dtype not in _PACKED_DTYPES
            or not _packing_on()
        ):
            return False
        grad = torch.is_grad_enabled()
        no_bias = linears[0].bias is None
        for m in linears:
            w = m.weight
            if (type(m) not in (nn.Linear, ConvLinear) or type(w) not in _PLAIN_TENSORS  # not a tensor subclass
                    or w.device.type != "cpu" or w.dtype != x.dtype
                    or not w.is_contiguous() or grad and w.requires_grad or (m.bias is None) != no_bias):
                return False
        return True

    def packed_weight(self, x: Tensor) -> Optional[Tensor]:
        """The reordered weight usable for ``x``, (re)packed when the weight changed; None when not applicable."""
        linears = self.linears()
        if torch.compiler.is_compiling() or not self._packable(x, linears):  # in a graph: packed_linear_op instead
            return None
        weights = [m.weight for m in linears]
        key = tuple(self._weight_key(w) for w in weights)
        if self._key == key and (
            self._fp_views is None  # not packed
            or not self.check_fingerprint
            or self._group is not None and self._group.active  # the group checked it before this frame
            or self.sampled_bytes() == self._fp
        ):
            return self._packed
        self.invalidate()
        self._key, self._srcs = key, tuple(w.detach() for w in weights)
        stacked = self._srcs[0] if len(self._srcs) == 1 else torch.cat(self._srcs)
        self._bf16 = stacked.dtype == torch.bfloat16 and bf16_kernel() == "eventful"
        try:
            if self._bf16:
                self._packed = torch.ops.eventful.linear_bf16_pack(stacked)
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(stacked)
        except RuntimeError:  # dtype without CPU support (e.g. bf16 on a CPU lacking it): stay unpacked
            self._packed = None
        if self._packed is not None:
            # Views of the weights' own memory (the key pins them): later writes through .data show in them.
            self._fp_views = [sample_runs(src).numpy() for src in self._srcs]
            self._fp = self.sampled_bytes()
        return self._packed

    def _out_features(self) -> int:
        return sum(m.weight.shape[0] for m in self.linears())

    def _bias(self) -> Optional[Tensor]:
        biases = [m.bias for m in self.linears()]
        if biases[0] is None:
            return None
        return biases[0].detach() if len(biases) == 1 else torch.cat([b.detach() for b in biases])

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and PackedLinear.in_graph:
            linears = self.linears()
            if self._packable(x, linears):
                return packed_linear_op(x, [m.weight for m in linears], self._handle)
        return self.eager(x)

    def eager(self, x: Tensor) -> Tensor:
        """``activation(linear(x))`` on the packed weight when it applies, else as the modules define it."""
        packed = self.packed_weight(x)
        if packed is None:
            lin = self.linear
            y = F.linear(x, lin.weight, lin.bias) if type(lin) is nn.Linear else lin(x)
            return y if self.activation is None else self.activation(y)
        attr, algorithm = self._post_op
        if self._bf16:
            y = torch.ops.eventful.linear_bf16(x, packed, self._bias(), self._out_features(),
                                               _ACTIVATION_NAMES[self._post_op])
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, packed, self._bias(), attr, [], algorithm)
        return y if self._after is None else self._after(y)


# Hugging Face MLPs whose forward is exactly ``fc2(activation_fn(fc1(x)))``.
_HF_MLPS = ("ViTMLP", "Dinov2MLP", "Dinov2WithRegistersMLP", "CLIPMLP", "SiglipMLP")


def _mlp_activation(mlp: nn.Module) -> Optional[nn.Module]:
    """The activation of a plain two-linear MLP: timm's ``Mlp`` (not GluMlp/SwiGLU/conv variants, whose forward
    differs) or one of the Hugging Face MLPs in :data:`_HF_MLPS`; None for any other module."""
    cls = type(mlp)
    if cls.__name__ == "Mlp" and cls.__module__.startswith("timm."):
        act = getattr(mlp, "act", None)
    elif cls.__name__ in _HF_MLPS and cls.__module__.startswith("transformers."):
        act = getattr(mlp, "activation_fn", None)
    else:
        return None
    linear = isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
    return act if linear and isinstance(act, nn.Module) else None


class PackedMlp:
    """timm ``Mlp`` (``fc1 -> act -> drop1 -> norm -> fc2 -> drop2``) or a plain Hugging Face MLP
    (``fc2(activation_fn(fc1(x)))``) with both linears packed and the activation fused into ``fc1``. Dropout is
    skipped (inference only). Any other MLP type is called as it is. ``.module`` is ``mlp``."""

    def __init__(self, mlp: nn.Module):
        self.mlp = self.module = mlp
        act = _mlp_activation(mlp)
        self._plain = act is not None
        if self._plain:
            self.fc1 = PackedLinear(mlp.fc1, act)
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

    def runners(self) -> List[PackedLinear]:
        return [self.fc1, self.fc2] if self._plain else []


def repack(model: nn.Module) -> nn.Module:
    """Drop the packed copy of every linear layer of ``model`` (packed by eventful blocks or by
    :func:`packed_linears`): each is packed again from the weight as it is at its next call. Needed only after a
    weight edit that neither bumps ``_version`` nor touches a sampled entry (see the module docstring). Returns
    ``model``."""
    linears = {id(m) for m in model.modules() if isinstance(m, (nn.Linear, ConcatLinear, nn.Conv2d))}
    for packed in list(_LIVE):
        conv = getattr(packed.linear, "conv", None)  # a ConvLinear's conv
        if id(packed.linear) in linears or id(conv) in linears or any(id(m) in linears for m in packed.linears()):
            packed.invalidate()
    return model


def with_packed_conv(owner: nn.Module, name: str) -> Optional[PackedConv]:
    """Give ``owner`` its own copy of its conv child ``name`` (:func:`is_plain_conv`) that runs through a
    :class:`PackedConv`: a shallow copy sharing the conv's parameters (same names in the state dict) with its own
    hook tables, so the original conv, which other models may share, is left as it is. Returns the runner, or None
    (nothing changed) when the child is not such a conv."""
    conv = owner._modules.get(name)
    if conv is None or not is_plain_conv(conv):
        return None
    twin = copy_module(conv)
    runner = PackedConv(twin)
    twin.forward = runner
    owner._modules[name] = twin
    return runner


def with_packed_convs(owner: nn.Module, name: str) -> None:
    """Replace ``owner``'s child ``name`` by a copy (:func:`copy_module`) whose direct conv children run through
    :class:`PackedConv` (:func:`with_packed_conv`); nothing when it has no such child."""
    child = owner._modules.get(name)
    if not isinstance(child, nn.Module) or not any(is_plain_conv(m) for m in child._modules.values()):
        return
    twin = copy_module(child)
    owner._modules[name] = twin
    for conv_name in list(twin._modules):
        with_packed_conv(twin, conv_name)


def copy_module(m: nn.Module) -> nn.Module:
    """A shallow copy of ``m`` sharing its parameters, buffers and children, with its own child table and hook
    tables (hooks added to one do not fire on the other)."""
    twin = copy.copy(m)
    twin._modules = dict(m._modules)
    for name, value in vars(m).items():
        if name.endswith("hooks") and isinstance(value, dict):
            setattr(twin, name, type(value)(value))
    return twin


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
