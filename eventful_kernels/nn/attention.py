"""Attention cores used by the eventful blocks, over ``Bw`` independent streams (batch x windows).

Inputs are ``q [Bw, H, T, d]`` and ``k, v [Bw, H, Tk, d]`` (strided views of a qkv buffer are fine; ``Tk = T``
unless the keys and values are pooled, see :class:`KVPool`); outputs are ``[Bw, T, H*d]`` tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import EventfulModule
from .matmul import MatmulBuffer, MatmulDeltaAccumulator
from .placement import Workspace
from .relpos import DecomposedRelPos

AV_DTYPES = (torch.float16, torch.bfloat16)


class KVPool:
    """Average pooling of keys and values over ``p x p`` cells of the token grid (the published "spatial"
    configurations, ``pool_size`` there), and the matching map of changed tokens.

    Tokens: ``N = P + Gh*Gw``, the ``P`` prefix tokens (class / register tokens) first, then the grid row-major.
    Pooled keys: ``Nk = P + Hp*Wp`` with ``Hp = Gh // p``, ``Wp = Gw // p``: the prefix tokens unpooled, then pooled
    cell ``(i, j)`` = the mean of grid tokens ``(p*i + a, p*j + b)``, ``0 <= a, b < p``, row-major. As
    ``avg_pool2d(kernel=p, stride=p)`` without padding (what the published dense block runs), a grid side that ``p``
    does not divide drops its last ``Gh % p`` rows / ``Gw % p`` columns: those tokens are no key or value (their
    queries still attend). The published code pools grids without prefix tokens only (ViTDet); keeping them as
    keys of their own is this package's choice.

    ``pool(x [B, H, N, d]) -> [B, H, Nk, d]``; ``changed(index [B, K]) -> [B, min(K, Nk)]``: the pooled tokens any
    of whose source tokens is in ``index``, ascending, then ``-1`` empty slots (each token lies in at most one
    pooled token, so ``min(K, Nk)`` is the exact bound). ``pool_of [N]`` maps a token to its pooled token (``-1``:
    dropped). No host synchronisation, fixed shapes.
    """

    def __init__(self, pool: int, tokens: int, grid: Tuple[int, int], prefix: int, device):
        gh, gw = int(grid[0]), int(grid[1])
        if prefix < 0 or prefix + gh * gw != tokens:
            raise ValueError(f"eventful: kv pooling: {prefix} prefix tokens + grid {(gh, gw)} do not make the "
                             f"{tokens} tokens of the input")
        self.pool, self.tokens, self.grid, self.prefix = int(pool), int(tokens), (gh, gw), int(prefix)
        self.hp, self.wp = gh // self.pool, gw // self.pool
        if self.hp == 0 or self.wp == 0:
            raise ValueError(f"eventful: kv pooling {pool}x{pool} needs a grid of at least that size, got {(gh, gw)}")
        self.n_pooled = self.prefix + self.hp * self.wp
        rows = torch.arange(gh, device=device)[:, None] // self.pool
        cols = torch.arange(gw, device=device)[None, :] // self.pool
        cell = torch.where((rows < self.hp) & (cols < self.wp), self.prefix + rows * self.wp + cols, -1)
        self.pool_of = torch.cat([torch.arange(self.prefix, device=device), cell.reshape(-1)])

    def same(self, other: "KVPool") -> bool:
        """Whether ``other`` has the same geometry on the same device."""
        return (self.pool, self.tokens, self.grid, self.prefix, self.pool_of.device) == \
            (other.pool, other.tokens, other.grid, other.prefix, other.pool_of.device)

    def width(self, k: int) -> int:
        """Slots of :meth:`changed` for an index of ``k`` slots."""
        return min(k, self.n_pooled)

    def pool_tokens(self, x: Tensor) -> Tensor:
        """``x [B, H, N, d]`` (any strides) -> ``[B, H, Nk, d]`` (new tensor)."""
        p, (gh, gw) = self.pool, self.grid
        g = x[:, :, self.prefix:].unflatten(2, (gh, gw))[:, :, : self.hp * p, : self.wp * p]
        g = g.unflatten(3, (self.wp, p)).unflatten(2, (self.hp, p)).mean((3, 5)).flatten(2, 3)
        return torch.cat([x[:, :, : self.prefix], g], 2) if self.prefix else g

    def changed(self, index: Tensor) -> Tensor:
        """Pooled index ``[B, min(K, Nk)]`` (ascending, ``-1``-padded) of the tokens in ``index [B, K]``."""
        b, k = index.shape
        nk, width = self.n_pooled, self.width(k)
        idx = index.long()
        # -1 and dropped tokens go to a spare column nk of the mask
        ids = torch.where(idx >= 0, self.pool_of[idx.clamp(0, self.tokens - 1)], -1)
        ids = torch.where(ids >= 0, ids, nk)
        mask = torch.zeros(b, nk + 1, dtype=torch.bool, device=index.device).scatter_(1, ids, True)[:, :nk]
        # compaction: the j-th changed pooled token (ascending) goes to slot j, the rest to a spare slot `width`
        slot = torch.where(mask, mask.long().cumsum(1) - 1, width)
        value = torch.where(mask, torch.arange(nk, device=index.device).expand(b, nk), -1)
        out = torch.full((b, width + 1), -1, dtype=torch.long, device=index.device)
        return out.scatter_(1, slot, value)[:, :width]


def _pool_last(x: Tensor, p: int) -> Tensor:
    """Mean over ``p`` consecutive entries of the last dim, the last ``G % p`` dropped: ``[..., G] -> [..., G//p]``."""
    g = x.shape[-1] // p
    return x[..., : g * p].unflatten(-1, (g, p)).mean(-1)


class PooledRelPos(DecomposedRelPos):
    """Decomposed rel-pos bias towards keys pooled ``p x p`` over the grid (:class:`KVPool`, no prefix tokens).

    As the published code: the relative-position table ``R_h [Gh(q), Gh(k), C]`` is average-pooled over its key axis
    (``avg_pool1d(p)``, the last ``Gh % p`` key rows dropped), likewise ``R_w``. The bias being linear in the table,
    that is the per-row state of :class:`DecomposedRelPos` (``rel_h [B,H,N,Gh]``, kept and updated at the changed
    query rows as there) pooled over its last dim, done when the bias is read: ``decomposed()`` gives
    ``(rel_h [B,H,N,Gh//p], rel_w [B,H,N,Gw//p])``, ``dense()`` ``[B,H,N,Nk]``, ``rows`` / ``cols`` index pooled keys.
    """

    def __init__(self, attn: nn.Module, pool: int, backend: str = "ops"):
        super().__init__(attn, backend)
        self.pool = int(pool)

    def decomposed(self) -> Tuple[Tensor, Tensor]:
        return _pool_last(self.rel_h, self.pool), _pool_last(self.rel_w, self.pool)

    def dense(self) -> Tensor:
        rh, rw = self.decomposed()
        b, h, n, gh = rh.shape
        return (rh[..., :, None] + rw[..., None, :]).reshape(b, h, n, gh * rw.shape[-1])

    def rows(self, index_q: Tensor) -> Tensor:
        if self._sel is None or self._sel[0] is not index_q:
            raise RuntimeError("eventful: PooledRelPos.rows() needs update(q, grid, index_q) with the same index first")
        sel_h, sel_w = _pool_last(self._sel[1], self.pool), _pool_last(self._sel[2], self.pool)
        b, h, k, gh = sel_h.shape
        return (sel_h[..., :, None] + sel_w[..., None, :]).reshape(b, h, k, gh * sel_w.shape[-1])

    def cols(self, index_k: Tensor) -> Tensor:
        rh, rw = self.decomposed()
        gw = rw.shape[-1]
        idx = index_k.long()
        empty = idx < 0
        ops, checked = self.k_ops, self.check_index
        cols_h = torch.where(empty, idx, torch.div(idx, gw, rounding_mode="floor"))
        cols_w = torch.where(empty, idx, idx % gw)
        return ops.gather_cols(rh, cols_h, check_index=checked).add_(ops.gather_cols(rw, cols_w, check_index=checked))


def _rel_pos(attn: Optional[nn.Module], kv_pool: Optional[int], backend: str) -> Optional[DecomposedRelPos]:
    if attn is None:
        return None
    return PooledRelPos(attn, kv_pool, backend) if kv_pool else DecomposedRelPos(attn, backend)


class DenseAttention(EventfulModule):
    """``softmax(q k^T * scale + bias) v`` computed densely every call (the attention of a token-wise block, and the
    dense strategy of :class:`~eventful_kernels.nn.EventfulBlock`).

    With ``attn`` given, the decomposed rel-pos bias of ``attn`` is added; its per-row terms are state, recomputed
    only at ``index`` (the query rows that changed since the previous call) when given, else in full. ``kv_pool``:
    ``k``/``v`` are the pooled keys/values (:class:`KVPool`) and the bias is pooled with them (:class:`PooledRelPos`).
    ``last_macs = 2*Bw*H*T*Tk*d``.
    """

    def __init__(self, attn: Optional[nn.Module] = None, backend: str = "ops", kv_pool: Optional[int] = None):
        super().__init__(backend)
        self.rel_pos = _rel_pos(attn, kv_pool, backend)

    @torch.no_grad()
    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, grid: Optional[Tuple[int, int]] = None,
                index: Optional[Tensor] = None) -> Tensor:
        bw, h, t, d = q.shape
        bias = None
        if self.rel_pos is not None:
            bias = self.rel_pos.update(q, grid, index).dense()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        self.last_macs = 2 * bw * h * t * k.shape[2] * d
        return o.transpose(1, 2).reshape(bw, t, h * d)


class EventfulAttention(EventfulModule):
    """Eventful attention: logits buffer (QK^T rows/cols, + rel-pos), dense softmax, A·V delta accumulator.

    ``forward(q, k, v, scale, grid, index=None, index_kv=None) -> [Bw, T, H*d]`` (a view of the accumulator state).
    The first call (flush) is dense. Afterwards ``index [Bw, K]`` are the tokens whose q changed and ``index_kv``
    those whose k/v changed (default ``index``; with pooled keys the changed pooled tokens, :meth:`KVPool.changed`);
    ``-1``: empty slot. Logit rows ``index`` and columns ``index_kv`` are recomputed, A·V columns ``index_kv``
    delta-updated. ``K = 0`` leaves the output unchanged. State: logits ``[Bw,H,T,Tk]`` (q's dtype), the A·V
    output ``[Bw,T,H,d]`` (q's dtype) and its references ``a_ref [Bw,H,T,Tk]``, ``v_ref [Bw,H,Tk,d]``.

    ``av_dtype`` (``torch.float16`` / ``torch.bfloat16``, the published ``matmul_2_cast``): the attention weights
    (softmax computed in q's dtype, then rounded) and ``v`` enter the A·V product, and are kept as ``a_ref`` /
    ``v_ref``, in that dtype; the products are accumulated into the output in q's dtype (float32), as
    ``av_delta_update_`` allows. Halves the ``a_ref`` state. ``last_macs`` = the logits buffer's + the accumulator's.
    """

    def __init__(self, attn: Optional[nn.Module] = None, backend: str = "ops", kv_pool: Optional[int] = None,
                 av_dtype: Optional[torch.dtype] = None):
        super().__init__(backend)
        if av_dtype is not None and av_dtype not in AV_DTYPES:
            raise ValueError(
                f"eventful: argument 'av_dtype' must be None, torch.float16 or torch.bfloat16, got {av_dtype}")
        self.av_dtype = av_dtype
        self.qk_buffer = MatmulBuffer(backend)
        self.av_buffer = MatmulDeltaAccumulator(backend)
        self.rel_pos = _rel_pos(attn, kv_pool, backend)
        # Holds the softmax output, scratch rewritten every call; EventfulModel gives all its blocks one workspace.
        self.workspace = Workspace()

    def _reset_state(self) -> None:
        super()._reset_state()
        self.workspace.clear()

    @property
    def flushing(self) -> bool:
        """True when the next call is a flush (no state, or a refresh is pending)."""
        return self.av_buffer.flushing or self.qk_buffer.logits is None or self.qk_buffer._refresh

    def drop_state(self) -> None:
        """Free the attention state (the next call is a flush) but keep the workspace, which may be shared."""
        for m in (self.qk_buffer, self.av_buffer, self.rel_pos):
            if m is not None:
                m.reset()
        self.last_macs = 0

    @torch.no_grad()
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        grid: Optional[Tuple[int, int]] = None,
        index: Optional[Tensor] = None,
        index_kv: Optional[Tensor] = None,
    ) -> Tensor:
        flush = self.flushing
        if flush:
            if self.av_dtype is not None and q.dtype not in (torch.float32, self.av_dtype):
                raise ValueError(f"eventful: argument 'av_dtype' ({self.av_dtype}) must be None or the dtype of a "
                                 f"16-bit model ({q.dtype}); it rounds the A·V product of a float32 model")
            index = index_kv = None
            self.qk_buffer.refresh()
            self.av_buffer.refresh()
            if self.rel_pos is not None:
                self.rel_pos.refresh()
        elif index is None:
            raise ValueError("eventful: argument 'index' is required after the flush call")
        elif index.shape[1] == 0:
            self.last_macs = 0
            return self.av_buffer.tokens
        elif index_kv is None:
            index_kv = index
        bias = self.rel_pos.update(q, grid, index) if self.rel_pos is not None else None
        logits = self.qk_buffer(q, k, index, index_kv, scale, bias)
        a = torch.softmax(logits, -1, out=self.workspace.get("attention", logits.shape, logits, "attention"))
        if self.av_dtype is not None and self.av_dtype != a.dtype:
            # Rounded copy in a second scratch tensor, placed at the logits' page offset: the copy walks it with the
            # softmax output, the A·V update with a_ref, both at other offsets (see placement.py).
            v = v.to(self.av_dtype)
            a = self.workspace.get("attention_av", a.shape, v, "logits").copy_(a)
        self.av_buffer(a, v, index_kv, out_dtype=q.dtype)
        self.last_macs = self.qk_buffer.last_macs + self.av_buffer.last_macs
        return self.av_buffer.tokens


def check_kv_options(kv_pool: Optional[int], window: int, rel_pos: bool, prefix_tokens: int,
                     kv_grid: Optional[Tuple[int, int]]) -> Optional[int]:
    """Validate a block's K/V pooling options; returns ``kv_pool`` (None when off)."""
    if kv_pool is None:
        return None
    if isinstance(kv_pool, bool) or not isinstance(kv_pool, int) or kv_pool < 2:
        raise ValueError(
            f"eventful: argument 'kv_pool' must be None or an int >= 2 (the pooling size), got {kv_pool!r}")
    if window > 0:
        raise ValueError("eventful: 'kv_pool' applies to global attention only (windowed blocks are not pooled, as in "
                         "the published configurations)")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"eventful: argument 'prefix_tokens' must be an int >= 0, got {prefix_tokens!r}")
    if rel_pos and prefix_tokens:
        raise ValueError("eventful: 'kv_pool' with a rel-pos bias needs a grid without prefix tokens")
    if kv_grid is not None and (len(kv_grid) != 2 or min(int(g) for g in kv_grid) <= 0):
        raise ValueError(f"eventful: argument 'kv_grid' must be None or (H, W), got {kv_grid!r}")
    return kv_pool


def kv_geometry(pool: int, tokens: int, grid: Optional[Tuple[int, int]], prefix_tokens: int,
                kv_grid: Optional[Tuple[int, int]], device) -> KVPool:
    """The :class:`KVPool` of a stream: on the input grid of a ``[B, H, W, D]`` input (``grid``; no prefix tokens),
    else on ``kv_grid`` after ``prefix_tokens`` tokens, else on the square grid of the ``tokens - prefix_tokens``
    tokens; ``ValueError`` when the tokens do not fit."""
    if grid is not None:
        if prefix_tokens:
            raise ValueError("eventful: a [B, H, W, D] input holds no prefix tokens; 'prefix_tokens' must be 0")
        return KVPool(pool, tokens, grid, 0, device)
    if kv_grid is None:
        side = int(round((tokens - prefix_tokens) ** 0.5)) if tokens > prefix_tokens else 0
        if side * side != tokens - prefix_tokens or side == 0:
            raise ValueError(f"eventful: kv pooling: {tokens} tokens minus {prefix_tokens} prefix tokens is no square "
                             "grid; pass kv_grid=(H, W)")
        kv_grid = (side, side)
    return KVPool(pool, tokens, tuple(kv_grid), prefix_tokens, device)
