"""Decomposed relative-position logit bias (MViTv2 / ViTDet / SAM), kept as per-query-row state.

For a query at grid cell ``(qh, qw)`` and a key at ``(kh, kw)`` the bias is ``rel_h[q, kh] + rel_w[q, kw]`` with
``rel_h[q] = R_h[qh] @ q_vec`` and ``rel_w[q] = R_w[qw] @ q_vec`` (``q_vec`` after q-norm, before the scale). The
bias depends on the query only, so ``rel_h [B,H,N,Gh]`` / ``rel_w [B,H,N,Gw]`` are stored and recomputed at the
changed query rows; bias rows/columns for the logits buffer are assembled from them. The tables ``R_h``/``R_w`` are
gathered from the parameters at every call (a few small kernels), so a weight changed in place is always used, also
by a replayed CUDA graph.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import EventfulModule, refill
from .linear import product_dtype


def rel_pos_index(q_size: int, k_size: int, device) -> Tensor:
    """``[q_size, k_size]`` int64: the row of the (resized) rel-pos table for each query/key pair."""
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return relative.long()


def rel_pos_table(q_size: int, k_size: int, rel_pos: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """Relative-position embeddings ``[q_size, k_size, C]`` for the offsets between query and key positions.

    ``rel_pos [L, C]`` is linearly resized to ``2*max(q_size, k_size) - 1`` entries when its length differs; with
    different sizes the shorter side's coordinates are scaled (the ViTDet/SAM rule). ``index``: the
    :func:`rel_pos_index` of these sizes, when the caller keeps it.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        table = rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1)
        resized = F.interpolate(table, size=max_rel_dist, mode="linear")
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    return resized[rel_pos_index(q_size, k_size, rel_pos.device) if index is None else index]


class DecomposedRelPos(EventfulModule):
    """Per-row decomposed rel-pos state for an attention module ``attn`` with ``rel_pos_h`` / ``rel_pos_w``.

    ``update(q [B,H,N,d], grid (Gh, Gw), index_q=None)``: flush / dense (``index_q`` None) computes every row,
    otherwise only rows ``index_q``. Then ``rows(index_q)``, ``cols(index_k)``, ``dense()`` give the bias as
    ``[B,H,K,N]``, ``[B,H,N,K]``, ``[B,H,N,N]``. The parameters are read from ``attn`` (not copied).
    """

    state_attrs = ("rel_h", "rel_w")
    cache_attrs = ("_index", "_grid", "_sel")

    def __init__(self, attn: nn.Module, backend: str = "ops"):
        super().__init__(backend)
        self._attn = (attn,)  # a tuple so the wrapped module is not registered twice
        self.rel_h: Optional[Tensor] = None
        self.rel_w: Optional[Tensor] = None
        self._index: Optional[Tuple[tuple, Tensor, Tensor]] = None  # (grid, device), table row indices
        self._grid: Optional[Tuple[int, int]] = None
        self._sel: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    def _make_tables(self, grid: Tuple[int, int], like: Tensor) -> Tuple[Tensor, Tensor]:
        attn = self._attn[0]
        gh, gw = grid
        if self._index is None or self._index[0] != (grid, like.device):
            self._index = ((grid, like.device), rel_pos_index(gh, gh, like.device), rel_pos_index(gw, gw, like.device))
        rh = rel_pos_table(gh, gh, attn.rel_pos_h, self._index[1]).to(like.dtype)
        rw = rel_pos_table(gw, gw, attn.rel_pos_w, self._index[2]).to(like.dtype)
        return rh, rw

    @torch.no_grad()
    def update(self, q: Tensor, grid: Tuple[int, int], index_q: Optional[Tensor] = None) -> "DecomposedRelPos":
        b, h, n, d = q.shape
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"eventful: grid {grid} does not hold the {n} query tokens")
        rh, rw = self._make_tables((gh, gw), q)
        self._grid = (gh, gw)
        self._sel = None
        if index_q is None or self.rel_h is None or self._refresh:
            # One batched product over the query cells t = (qh, qw): [B*H, d] @ [rh[qh]; rw[qw]]^T. Half the time
            # of two einsums, which each permute q into a grid-row- / grid-column-major copy first. The stacked
            # table is [N, Gh+Gw, d] (1.4 MB for a 14x14 window, 134 MB once per flush of a 64x64 global grid).
            cell = torch.cat([rh[:, None].expand(gh, gw, gh, d), rw[None].expand(gh, gw, gw, d)], 2).view(n, gh + gw, d)
            up = product_dtype(q)
            both = torch.bmm(q.permute(2, 0, 1, 3).reshape(n, b * h, d).to(up),
                             cell.transpose(1, 2).to(up)).to(q.dtype)  # [N, B*H, Gh+Gw]
            both = both.view(n, b, h, gh + gw).permute(1, 2, 0, 3)
            self.rel_h = refill(self.rel_h, both[..., :gh])
            self.rel_w = refill(self.rel_w, both[..., gh:])
            self._refresh = False
            return self
        if self.rel_h.shape[:3] != (b, h, n):
            raise ValueError("eventful: q does not match the stored rel-pos state; call reset()")
        if index_q.shape[1] == 0:
            return self
        ops = self.k_ops
        checked = self.check_index
        idx = index_q.long()
        cell = idx.clamp(0, n - 1)  # -1 (empty slot) reads any table row: its result is never written
        q_sel = ops.gather_rows(q, idx, check_index=checked)  # [B,H,K,d]
        up = product_dtype(q)
        q_up = q_sel.to(up)
        sel_h = torch.einsum("bnkc,bkjc->bnkj", q_up, rh[torch.div(cell, gw, rounding_mode="floor")].to(up))
        sel_w = torch.einsum("bnkc,bkjc->bnkj", q_up, rw[cell % gw].to(up))
        sel_h, sel_w = sel_h.to(q.dtype), sel_w.to(q.dtype)
        ops.scatter_rows_(self.rel_h, idx, sel_h, check_index=checked)
        ops.scatter_rows_(self.rel_w, idx, sel_w, check_index=checked)
        self._sel = (index_q, sel_h, sel_w)
        return self

    def rows(self, index_q: Tensor) -> Tensor:
        """Bias rows ``[B,H,K,N]`` of the query rows passed to the last :meth:`update`."""
        if self._sel is None or self._sel[0] is not index_q:
            raise RuntimeError("eventful: DecomposedRelPos.rows() needs update(q, grid, index_q) with the same index "
                               "first")
        _, sel_h, sel_w = self._sel
        b, h, k, gh = sel_h.shape
        return (sel_h[..., :, None] + sel_w[..., None, :]).reshape(b, h, k, gh * sel_w.shape[-1])

    def cols(self, index_k: Tensor) -> Tensor:
        """Bias columns ``[B,H,N,K]`` for key tokens ``index_k`` (every query row)."""
        gw = self._grid[1]
        idx = index_k.long()
        ops = self.k_ops
        empty = idx < 0  # empty slots stay empty
        cols_h = torch.where(empty, idx, torch.div(idx, gw, rounding_mode="floor"))
        cols_w = torch.where(empty, idx, idx % gw)
        checked = self.check_index
        return ops.gather_cols(self.rel_h, cols_h, check_index=checked).add_(
            ops.gather_cols(self.rel_w, cols_w, check_index=checked)
        )

    def decomposed(self) -> Tuple[Tensor, Tensor]:
        """The per-row state ``(rel_h [B,H,N,Gh], rel_w [B,H,N,Gw])``, as ``qk_update_`` takes it."""
        return self.rel_h, self.rel_w

    def dense(self) -> Tensor:
        """The full bias ``[B,H,N,N]``."""
        b, h, n, gh = self.rel_h.shape
        return (self.rel_h[..., :, None] + self.rel_w[..., None, :]).reshape(b, h, n, n)
