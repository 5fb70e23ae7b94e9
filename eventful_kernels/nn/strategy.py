"""Attention strategy of an eventful global block, chosen per device and shape from a cost model.

An :class:`~eventful_kernels.nn.EventfulBlock` gates its token-wise layers either way; for attention it can

- ``"eventful"``: keep the ``[B, H, N, N]`` logits and attention state and patch it (``qk_update_`` on the K changed
  rows and columns, a dense softmax, ``av_delta_update_`` on the K changed columns) — the published method;
- ``"dense"``: recompute attention from the buffered q, k, v of all N tokens with fused attention
  (``scaled_dot_product_attention``), which never materialises the N x N map and keeps no attention state.

Cost model (seconds per frame and block, over all B streams and H heads; ``E`` bytes per state element, ``L`` bytes
per memory transaction, so touching K random columns of a row of N costs ``min(N*E, K*max(E, L))`` bytes)::

    eventful = 8*B*H*N*K*d / matmul                                   # QK^T rows + columns, A·V delta (new - ref)
             + B*H*(K*N*E + 4*cols(N, K) + 2*N*N*E) / bandwidth          # row/column writes, A·V column reads and
             + 4 * launch                                                # the reference refresh, softmax read+write
    dense    = 4*B*H*N*N*d / attention  (attention_masked with a rel-pos bias, plus 2*B*H*N*N*E / bandwidth to
             + launch                    build and read the dense bias)

The rates come from :func:`measure_rates`: a few short timings on the device itself (batched product, fused
attention with and without a mask, a copy as large as one attention state, one tiny kernel), cached per device,
dtype and state size for the life of the process; :func:`set_rates` pins them (e.g. for a reproducible run).
Fused attention needs no N x N traffic, so on a GPU it wins at every budget for large N (at N = 4096 the softmax
alone moves ~0.8 GB per block in fp16 — longer than dense flash attention takes); on CPU the bandwidth and the
attention kernels are slow enough that the patched state wins at the usual budgets. ``EVENTFUL_ATTENTION``
(``auto``, ``eventful`` or ``dense``) sets the default strategy of new blocks.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

STRATEGIES = ("auto", "eventful", "dense")
MODES = ("eventful", "dense")


def default_strategy() -> str:
    """The strategy new blocks get: ``EVENTFUL_ATTENTION`` if set, else ``"auto"``."""
    value = os.environ.get("EVENTFUL_ATTENTION", "auto").strip().lower() or "auto"
    return check_strategy(value, "EVENTFUL_ATTENTION")


def check_strategy(value: str, name: str = "strategy") -> str:
    if value not in STRATEGIES:
        raise ValueError(f"eventful: argument '{name}' must be one of {STRATEGIES}, got {value!r}")
    return value


@dataclass(frozen=True)
class DeviceRates:
    """Throughputs the cost model needs, for one device and dtype."""

    matmul: float  # FLOP/s of attention-shaped batched products
    attention: float  # FLOP/s of fused dense attention without a mask
    attention_masked: float  # FLOP/s of fused dense attention with an additive [B, H, N, N] mask (read included)
    bandwidth: float  # bytes/s of a copy as large as one attention state
    launch: float  # seconds per kernel launch
    line: int  # bytes per memory transaction


@dataclass(frozen=True)
class AttentionShape:
    """One block's attention problem: ``batch`` streams (x windows), ``heads``, ``tokens``, ``head_dim``."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    bias: bool  # decomposed rel-pos bias

    @property
    def state_bytes(self) -> int:
        return self.batch * self.heads * self.tokens * self.tokens * _elt(self.dtype)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def eventful_cost(shape: AttentionShape, k: int, rates: DeviceRates) -> float:
    """Modelled seconds of one eventful attention update with ``k`` changed tokens per stream."""
    b, h, n, d, e = shape.batch, shape.heads, shape.tokens, shape.head_dim, _elt(shape.dtype)
    k = min(max(k, 0), n)
    cols = n * min(n * e, k * max(e, rates.line))
    flops = 8.0 * b * h * n * k * d
    moved = b * h * (k * n * e + 4 * cols + 2 * n * n * e)
    return flops / rates.matmul + moved / rates.bandwidth + 4 * rates.launch


def dense_cost(shape: AttentionShape, rates: DeviceRates) -> float:
    """Modelled seconds of dense fused attention over all tokens."""
    b, h, n, d, e = shape.batch, shape.heads, shape.tokens, shape.head_dim, _elt(shape.dtype)
    flops = 4.0 * b * h * n * n * d
    if not shape.bias:
        return flops / rates.attention + rates.launch
    return flops / rates.attention_masked + 2.0 * b * h * n * n * e / rates.bandwidth + 2 * rates.launch


_RATES: Dict[tuple, DeviceRates] = {}
_PINNED: Dict[tuple, DeviceRates] = {}


def set_rates(device, dtype: torch.dtype, rates: Optional[DeviceRates]) -> None:
    """Pin the rates used for ``device``/``dtype`` (``None`` unpins: they are measured again on next use)."""
    key = (torch.device(device).type, dtype)
    if rates is None:
        _PINNED.pop(key, None)
    else:
        _PINNED[key] = rates
    _CHOICES.clear()


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    cuda = device.type == "cuda"

    def best(fn, reps: int) -> float:
        fn()  # warm-up (lazy initialisation, kernel selection)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best


def _time_masked_attention(best, q, kv, reps: int) -> float:
    mask = torch.zeros(*q.shape[:3], kv.shape[2], device=q.device, dtype=q.dtype)  # freed on return
    return best(lambda: F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask), reps)


def _time_copy(best, numel: int, device, dtype, reps: int) -> float:
    src = torch.empty(numel, device=device, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    return best(lambda: dst.copy_(src), reps)


def measure_rates(device, dtype: torch.dtype, state_bytes: int = 1 << 26, head_dim: int = 64) -> DeviceRates:
    """Time the cost model's ingredients on ``device`` (~0.1 s on a 2-core CPU, a few ms on a GPU); cached per
    device type, dtype and power-of-two bucket of ``state_bytes``. Pinned rates (:func:`set_rates`) win."""
    device = torch.device(device)
    pinned = _PINNED.get((device.type, dtype))
    if pinned is not None:
        return pinned
    cap = 1 << (30 if device.type == "cuda" else 28)
    size = 1 << max(16, min(int(state_bytes), cap).bit_length() - 1)
    key = (device.type, device.index, dtype, size, head_dim)
    if key in _RATES:
        return _RATES[key]
    best = _timer(device)
    gpu = device.type == "cuda"
    heads, n = 12, (4096 if gpu else 512)
    reps = 5 if gpu else 3
    with torch.no_grad():
        q = torch.randn(1, heads, n, head_dim, device=device).to(dtype)
        kv = torch.randn(1, heads, n, head_dim, device=device).to(dtype)
        # the CPU kernels of qk_update_ / av_delta_update_ multiply float32 tiles whatever the state's dtype
        tiles = torch.float32 if device.type == "cpu" else dtype
        rows, keys = q[:, :, : n // 4].to(tiles), kv.to(tiles)
        matmul = 2.0 * heads * (n // 4) * n * head_dim / best(lambda: torch.matmul(rows, keys.transpose(-1, -2)), reps)
        attention = 4.0 * heads * n * n * head_dim / best(lambda: F.scaled_dot_product_attention(q, kv, kv), reps)
        masked = 4.0 * heads * n * n * head_dim / _time_masked_attention(best, q, kv, reps)
        bandwidth = 2.0 * size / _time_copy(best, size // _elt(dtype), device, dtype, reps)
        one = torch.zeros(1, device=device)
        launch = best(lambda: one.add_(1), 20)
    rates = DeviceRates(matmul, attention, masked, bandwidth, launch, 32 if gpu else 64)
    _RATES[key] = rates
    return rates


_CHOICES: Dict[Tuple[AttentionShape, int], str] = {}


def choose(shape: AttentionShape, k: int, rates: Optional[DeviceRates] = None) -> str:
    """``"eventful"`` or ``"dense"``: the cheaper one for ``shape`` and ``k`` changed tokens per stream under the
    cost model (remembered per shape and k for the process, so a stream never flips back and forth)."""
    key = (shape, int(k))
    if rates is None and key in _CHOICES:
        return _CHOICES[key]
    r = rates or measure_rates(shape.device, shape.dtype, shape.state_bytes, shape.head_dim)
    mode = "dense" if dense_cost(shape, r) < eventful_cost(shape, k, r) else "eventful"
    if rates is None:
        _CHOICES[key] = mode
    return mode
