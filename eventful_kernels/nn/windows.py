"""Geometry of windowed attention (ViTDet / SAM): an ``H x W`` token grid padded to multiples of the window size
``ws`` and cut into ``nW`` windows of ``T = ws*ws`` tokens.

Window-major order numbers the padded grid window by window (row-major inside a window), so a ``[B, nW*T, C]``
tensor in that order is a free ``[B*nW, T, C]`` view. Image order is ``h*W + w`` over the unpadded grid.
"""
from __future__ import annotations


import torch
from torch import Tensor


class WindowGrid:
    """Window partition of an ``h x w`` grid with window size ``ws`` (bottom/right padding, as ViTDet/SAM)."""

    def __init__(self, h: int, w: int, ws: int, device: torch.device):
        if ws <= 0:
            raise ValueError(f"eventful: window size must be > 0, got {ws}")
        self.h, self.w, self.ws = h, w, ws
        self.hp, self.wp = h + (-h % ws), w + (-w % ws)
        self.nwh, self.nww = self.hp // ws, self.wp // ws
        self.n_windows = self.nwh * self.nww
        self.t = ws * ws
        rows = torch.arange(h, device=device)[:, None]
        cols = torch.arange(w, device=device)[None, :]
        win = (rows // ws) * self.nww + cols // ws
        # perm[image id] = window-major id of the same token
        self.perm = (win * self.t + (rows % ws) * ws + cols % ws).reshape(-1)
        real = torch.zeros(self.n_windows * self.t, dtype=torch.int8, device=device)
        real[self.perm] = 1
        self.pad_mask = (1 - real).view(self.n_windows, self.t)  # [nW, T] 1 at padding tokens
        self.n_real = real.view(self.n_windows, self.t).sum(-1)  # [nW]

    @property
    def padded(self) -> bool:
        return self.hp != self.h or self.wp != self.w

    def partition(self, x: Tensor, pad: Tensor) -> Tensor:
        """Image order ``[B, h*w, C]`` -> window-major ``[B, nW*T, C]``; padding tokens take the value ``pad [C]``."""
        b, _, c = x.shape
        out = pad.to(x.dtype).reshape(1, 1, c).expand(b, self.n_windows * self.t, c).contiguous()
        out.index_copy_(1, self.perm, x)
        return out

    def window_major(self, ids: Tensor) -> Tensor:
        """Image-order token ids ``[B, K]`` -> window-major ids (``-1`` empty slots stay ``-1``)."""
        return torch.where(ids >= 0, self.perm[ids.clamp(min=0)], -1)

    def unpartition(self, y: Tensor) -> Tensor:
        """Window-major ``[B, nW*T, C]`` -> image order ``[B, h*w, C]`` (one gather; padding dropped)."""
        return torch.index_select(y, 1, self.perm)

    def window_index(self, wid: Tensor) -> Tensor:
        """Per-window selection from window-major token ids ``wid [B, K]`` (``-1``: empty slot).

        Returns ``index [B*nW, Kw]`` int64: each window's selected tokens ascending, then ``-1`` (empty slots).
        ``Kw`` does not depend on the data (no host synchronisation): ``T`` when the grid is padded, else
        ``min(T, K)``. A window whose real tokens are all selected also selects its padding tokens (so its
        attention is refreshed exactly, e.g. at ``r = N``); otherwise padding tokens count as unchanged.
        """
        b, k = wid.shape
        kw = 0 if k == 0 else (self.t if self.padded else min(self.t, k))
        valid = wid >= 0
        mask = torch.zeros(b, self.n_windows * self.t, dtype=torch.int8, device=wid.device)
        mask.scatter_add_(1, torch.where(valid, wid, 0).long(), valid.to(torch.int8))  # ids distinct: 0/1
        if self.padded:
            m = mask.view(b, self.n_windows, self.t)
            full = (m.sum(-1) == self.n_real).to(torch.int8)
            m.add_(self.pad_mask * full[..., None])
        mask = mask.view(b * self.n_windows, self.t)
        pos = torch.arange(self.t, device=wid.device)
        first = torch.sort(torch.where(mask > 0, pos, pos + self.t), dim=-1).values[:, :kw]  # selected first
        return torch.where(first < self.t, first, -1)
