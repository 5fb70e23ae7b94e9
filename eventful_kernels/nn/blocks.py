"""Eventful wrappers of an existing ViT block (timm ``Block`` or ViTDet/SAM ``Block``), sharing its weights.

The wrapped block's modules are called as they are (nothing is copied): ``norm1``, ``attn.qkv``,
``attn.q_norm``/``attn.k_norm``, ``attn.norm`` (if any), ``attn.proj``, ``ls1``, ``norm2``, ``mlp``, ``ls2``;
``attn.num_heads`` and ``attn.scale``; ``block.window_size > 0`` selects windowed attention with padding;
``attn.use_rel_pos`` adds the decomposed rel-pos bias (``attn.rel_pos_h``/``rel_pos_w``). Drop-path/dropout are
ignored (inference only; put the model in ``eval()``). Input ``[B, N, D]`` tokens or ``[B, H, W, D]`` (ViTDet/SAM
layout; required for windowed / rel-pos blocks); the output has the input's layout. Rows of B are independent
streams; the first call after construction or ``reset()`` is a flush (dense).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..counting import linear_macs_per_token
from .attention import DenseAttention, EventfulAttention, KVPool, check_kv_options, kv_geometry
from .backend import EventfulModule, float_weight, trust_indices
from .buffers import TokenBuffer
from .gates import TokenGate
from .linear import ConcatLinear, PackedGroup, PackedLinear, PackedMlp
from .matmul import MatmulBuffer, MatmulDeltaAccumulator
from .policies import Policy, Threshold, as_policy
from .relpos import DecomposedRelPos
from .strategy import AttentionShape, check_strategy, choose, default_strategy
from .windows import WindowGrid


_IDENTITY = nn.Identity()
GATE_PLACEMENTS = ("after_norm", "before_norm")


def _layer_scale(ls: nn.Module):
    """How ``ls`` scales a branch: None for an identity, the ``gamma`` tensor of a layer scale ``ls(y) = y * gamma``
    (timm ``LayerScale``, or a module whose class sets ``scales_by_gamma``), False for any other module."""
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if (type(ls).__name__ == "LayerScale" or getattr(type(ls), "scales_by_gamma", False)) and \
            isinstance(gamma, Tensor):
        return gamma
    return False


def _patched_residual(buffer: TokenBuffer, x: Tensor, ls: nn.Module, y_sel: Tensor, index: Optional[Tensor]) -> Tensor:
    """``x + ls(buffer(y_sel, index))`` without mutating the buffer's state; an identity or a layer scale (fused as
    ``addcmul(x, state, gamma)``) lets the buffer patch its state and add in one op (``TokenBuffer.add_to``)."""
    scale = _layer_scale(ls)
    if scale is False:
        return x + ls(buffer(y_sel, index).clone())
    return buffer.add_to(x, y_sel, index, scale)


class _EventfulBlockBase(EventfulModule):
    """Gated, buffered token-wise layers (qkv, projection, MLP) around an attention core set by the subclass."""

    state_attrs = ("_grid",)  # the token grid of the streams ([B, H, W, D] input), None for [B, N, D] tokens
    cache_attrs = ("_windows",)  # window geometry, rebuilt from the grid
    packed_group: Optional[PackedGroup] = None  # checks the packed weights' fingerprints (set by EventfulModel)

    def __init__(self, block: nn.Module, policy: Optional[Policy] = None, backend: str = "ops", *,
                 gate_placement: str = "after_norm"):
        super().__init__(backend)
        if gate_placement not in GATE_PLACEMENTS:
            raise ValueError(f"eventful: argument 'gate_placement' must be one of {GATE_PLACEMENTS}, got "
                             f"{gate_placement!r}")
        self._gate_placement = gate_placement
        for name in ("norm1", "attn", "norm2", "mlp"):
            if not hasattr(block, name):
                raise TypeError(f"eventful: block {type(block).__name__} has no '{name}'; "
                                "expected a timm ViT/SAM Block")
        attn = block.attn
        for name in ("qkv", "proj", "num_heads", "scale"):
            if not hasattr(attn, name):
                raise TypeError(f"eventful: block.attn ({type(attn).__name__}) has no '{name}'")
        self.block = block
        self.dim = attn.qkv.in_features
        self.heads = int(attn.num_heads)
        if attn.qkv.out_features % (3 * self.heads):
            raise ValueError("eventful: attn.qkv.out_features must be 3 * num_heads * head_dim")
        self.head_dim = attn.qkv.out_features // (3 * self.heads)
        self.scale = float(attn.scale)
        self.window = int(getattr(block, "window_size", 0) or 0)
        self.use_rel_pos = bool(getattr(attn, "use_rel_pos", False))
        self._qk_norm = not (
            isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
            and isinstance(getattr(attn, "k_norm", nn.Identity()), nn.Identity)
        )
        self._macs_qkv = linear_macs_per_token(attn.qkv)
        self._macs_proj = linear_macs_per_token(attn.proj)
        self._macs_mlp = linear_macs_per_token(block.mlp)
        self._packed = {}  # "qkv" / "proj" / "mlp" -> packed runner of the module now there (a cache, not state)
        self._policy = as_policy(policy)
        self.qkv_gate = TokenGate(self._policy, backend)
        self.qkv_buffer = TokenBuffer(backend)
        self.proj_gate = TokenGate(self._policy, backend)
        self.proj_buffer = TokenBuffer(backend)
        self.mlp_gate = TokenGate(self._policy, backend)
        self.mlp_buffer = TokenBuffer(backend)
        self._grid: Optional[Tuple[int, int]] = None
        self._windows: Optional[WindowGrid] = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def gate_placement(self) -> str:
        """``"after_norm"`` (the published default: LayerNorm on all tokens, the gates score normalised tokens) or
        ``"before_norm"`` (the gates score the residual stream, LayerNorm runs on the selected rows). Fixed at
        construction: the gates' references hold what they score."""
        return self._gate_placement

    @policy.setter
    def policy(self, value) -> None:
        self._policy = as_policy(value)
        for gate in (self.qkv_gate, self.proj_gate, self.mlp_gate):
            gate.policy = self._policy

    def signature(self) -> tuple:
        attn = self.block.attn
        return (self.dim, self.heads, self.head_dim, self.window, self.use_rel_pos, attn.qkv.out_features,
                attn.proj.out_features, self._gate_placement)

    def _derive_state(self) -> None:
        if self.window > 0 and self._grid is not None:
            state = self.qkv_buffer.state
            device = state.device if state is not None else float_weight(self.block).device
            self._windows = WindowGrid(self._grid[0], self._grid[1], self.window, device)
        else:
            self._windows = None

    def state_shapes(self, streams: int, tokens: int, grid: Optional[Tuple[int, int]]) -> dict:
        """The shape of every state tensor of this block (``"child.attr"`` relative to it) for ``streams`` streams
        of ``tokens`` tokens (on a ``grid``, when the input is one); a ValueError when the grid does not fit."""
        if grid is not None and grid[0] * grid[1] != tokens:
            raise ValueError(f"grid {tuple(grid)} does not hold {tokens} tokens")
        if grid is None and (self.window > 0 or self.use_rel_pos):
            raise ValueError("a windowed / rel-pos block needs the token grid")
        b, n, h, d = streams, tokens, self.heads, self.head_dim
        if self.window > 0:
            ws = self.window
            windows = (-(-grid[0] // ws)) * (-(-grid[1] // ws))
            t, attn_grid = ws * ws, (ws, ws)
        else:
            windows, t, attn_grid = 1, n, grid
        bw = b * windows
        shapes = {
            "qkv_gate.ref": (b, n, self.dim),
            "qkv_buffer.state": (b, windows * t, self.block.attn.qkv.out_features),
            "proj_gate.ref": (b, n, h * d),
            "proj_buffer.state": (b, n, self.block.attn.proj.out_features),
            "mlp_gate.ref": (b, n, self.dim),
            "mlp_buffer.state": (b, n, self.dim),
        }
        for name, m in self.named_modules():  # the attention modules
            if isinstance(m, MatmulBuffer):
                shapes[f"{name}.logits"] = (bw, h, t, t)
            elif isinstance(m, MatmulDeltaAccumulator):
                shapes.update({f"{name}.out": (bw, t, h, d), f"{name}.a_ref": (bw, h, t, t),
                               f"{name}.v_ref": (bw, h, t, d)})
            elif isinstance(m, DecomposedRelPos):
                shapes.update({f"{name}.rel_h": (bw, h, t, attn_grid[0]), f"{name}.rel_w": (bw, h, t, attn_grid[1])})
        return shapes

    def state_dtypes(self, weight_dtype: torch.dtype) -> dict:
        """The dtype of each state tensor (``"child.attr"``) that is not kept in the weights' dtype."""
        return {}

    # ---- token-wise pieces -------------------------------------------------------------------------------
    def _linear(self, role: str, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)``; the ops backend runs it on prepacked weights (:mod:`.linear`), the reference as is. The
        runner is rebuilt when the block's module in that ``role`` was replaced, so a new module is picked up."""
        if self.backend != "ops":
            return module(x)
        packed = self._packed.get(role)
        if packed is None or packed.module is not module:
            if role == "mlp":
                packed = PackedMlp(module)
            elif isinstance(module, (nn.Linear, ConcatLinear)):
                packed = PackedLinear(module)
            else:
                return module(x)
            if self.packed_group is not None:
                self.packed_group.add(packed)
            self._packed[role] = packed
        return packed(x)

    def _qkv(self, h: Tensor) -> Tensor:
        """``attn.qkv`` of normalised tokens ``[B, K, D]`` -> ``[B, K, 3D]`` with q_norm/k_norm applied."""
        attn = self.block.attn
        qkv = self._linear("qkv", attn.qkv, h)
        if self._qk_norm:
            parts = qkv.view(*qkv.shape[:-1], 3, self.heads, self.head_dim)
            parts[..., 0, :, :] = attn.q_norm(parts[..., 0, :, :])
            parts[..., 1, :, :] = attn.k_norm(parts[..., 1, :, :])
        return qkv

    def _split(self, qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """qkv state ``[B, Ntot, 3D]`` -> q, k, v views ``[Bw, H, T, d]`` (windows on the batch dim)."""
        b, ntot, _ = qkv.shape
        nw = self._windows.n_windows if self._windows is not None else 1
        t = ntot // nw
        q, k, v = qkv.view(b * nw, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _attn_grid(self) -> Optional[Tuple[int, int]]:
        return (self.window, self.window) if self._windows is not None else self._grid

    def _tokens_out(self, o: Tensor, b: int) -> Tensor:
        """Attention output ``[Bw, T, D]`` -> image-order ``[B, N, D]``."""
        if self._windows is None:
            return o
        return self._windows.unpartition(o.reshape(b, -1, o.shape[-1]))

    # ---- forward ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(
                f"eventful: argument 'x' must be [B, N, {self.dim}] or [B, H, W, {self.dim}], got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else None
        # Token-major rows for the gates and residuals (SAM's patch embedding hands over a channel-major permuted
        # view; strided rows cost the gate ~8x and the residual adds ~5x). The first block copies, later ones
        # receive the contiguous output of the one before.
        tokens = x.reshape(x.shape[0], -1, self.dim).contiguous()
        flush = self.qkv_gate.flushing
        if flush:
            if grid is None and (self.window > 0 or self.use_rel_pos):
                raise ValueError("eventful: windowed / rel-pos blocks need input of shape [B, H, W, D]")
            if self.window <= 0:
                self._windows = None
            elif self._windows is None or (self._windows.h, self._windows.w) != grid or \
                    self._windows.perm.device != x.device:  # kept when unchanged: a captured graph reads it
                self._windows = WindowGrid(grid[0], grid[1], self.window, x.device)
            self._grid = grid
        elif grid != self._grid and (self.window > 0 or self.use_rel_pos):
            raise ValueError(f"eventful: grid {grid} differs from the stream's {self._grid}; call reset() first")
        try:
            y = self._forward_tokens(tokens, flush)
        except Exception:
            if flush:  # never leave a half-filled state behind: the next call is a flush again
                self.reset()
            raise
        return y.view(x.shape)

    def _forward_tokens(self, x: Tensor, flush: bool) -> Tensor:
        block, attn = self.block, self.block.attn
        b = x.shape[0]
        after = self._gate_placement == "after_norm"
        if after:
            idx1, h_sel = self.qkv_gate(block.norm1(x))
        else:
            idx1, x_sel = self.qkv_gate(x)
            h_sel = block.norm1(x_sel)
        qkv_sel = self._qkv(h_sel)
        if self._windows is None:
            qkv = self.qkv_buffer(qkv_sel, None if flush else idx1)
            wid = None
        elif flush:
            pad = self._qkv(x.new_zeros(1, 1, self.dim)).reshape(-1)
            qkv = self.qkv_buffer(self._windows.partition(qkv_sel, pad), None)
            wid = None
        else:
            wid = self._windows.window_major(idx1)
            qkv = self.qkv_buffer(qkv_sel, wid)
        q, k, v = self._split(qkv)
        o = self._tokens_out(self._attend(q, k, v, idx1, wid, flush), b)

        norm = getattr(attn, "norm", None)
        if norm is None or isinstance(norm, nn.Identity):
            idx2, o_sel = self.proj_gate(o)
        elif after:
            idx2, o_sel = self.proj_gate(norm(o))
        else:
            idx2, o_sel = self.proj_gate(o)
            o_sel = norm(o_sel)
        p_sel = self._linear("proj", attn.proj, o_sel)
        x1 = _patched_residual(self.proj_buffer, x, getattr(block, "ls1", _IDENTITY), p_sel, idx2)

        if after:
            idx3, m_in = self.mlp_gate(block.norm2(x1))
        else:
            idx3, h_sel = self.mlp_gate(x1)
            m_in = block.norm2(h_sel)
        m_sel = self._linear("mlp", block.mlp, m_in)
        y = _patched_residual(self.mlp_buffer, x1, getattr(block, "ls2", _IDENTITY), m_sel, idx3)
        self.last_macs = (
            b * (idx1.shape[1] * self._macs_qkv + idx2.shape[1] * self._macs_proj + idx3.shape[1] * self._macs_mlp)
            + self.attention.last_macs
        )
        return y

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, idx1: Tensor, wid: Optional[Tensor], flush: bool) -> Tensor:
        raise NotImplementedError


class EventfulTokenwiseBlock(_EventfulBlockBase):
    """Token-wise layers gated and buffered; attention computed densely over the buffered q/k/v every frame
    (per window for windowed blocks). ``forward(x) -> y``; ``last_macs`` counts gated linears + dense attention."""

    def __init__(self, block: nn.Module, policy: Optional[Policy] = None, backend: str = "ops", *,
                 gate_placement: str = "after_norm"):
        super().__init__(block, policy, backend, gate_placement=gate_placement)
        self.attention = DenseAttention(block.attn if self.use_rel_pos else None, backend)
        trust_indices(self)

    def _attend(self, q, k, v, idx1, wid, flush):
        return self.attention(q, k, v, self.scale, self._attn_grid())


class EventfulBlock(_EventfulBlockBase):
    """Token-wise layers gated and buffered; attention by one of two strategies (:mod:`.strategy`):

    - ``"eventful"``: QK^T rows/columns of changed tokens recomputed (plus their rel-pos bias), A·V delta-updated at
      their columns (:class:`EventfulAttention`; windowed blocks per window, through a fixed-width per-window
      index padded with ``-1``);
    - ``"dense"``: fused dense attention over the buffered q/k/v of all tokens (:class:`DenseAttention`), no
      attention state;
    - ``"auto"`` (the default unless ``EVENTFUL_ATTENTION`` says otherwise): the cheaper of the two for this
      device, shape and budget under the cost model, decided again when the budget changes.

    ``attention_mode`` is the mode of the last frame and :attr:`attention` its module (``last_macs`` follow it).
    Switching to dense drops the attention state; switching back re-flushes it from the buffered q/k/v. With
    ``r = N`` the block equals the dense block to float tolerance either way.

    Options of the published method (docs/nn-api.md, "Published options"):

    - ``kv_pool=p`` (global blocks only): keys and values average-pooled over ``p x p`` cells of the token grid
      before attention, queries at full resolution (:class:`~eventful_kernels.nn.attention.KVPool`): ``Nk = P +
      (Gh//p)*(Gw//p)`` keys. The grid is the input's (``[B, H, W, D]``), else ``kv_grid`` after ``prefix_tokens``
      (class / register tokens, kept unpooled), else the square grid of the ``N - prefix_tokens`` tokens. With r = N
      the block equals the dense block run on pooled keys and values.
    - ``av_dtype`` (``torch.float16`` / ``torch.bfloat16``): the A·V product's attention weights and values (and
      their stored references) in that dtype, the output accumulated in float32 (eventful mode; the dense mode's
      fused attention keeps no A·V state and runs in the model's dtype).
    """

    state_attrs = _EventfulBlockBase.state_attrs + ("attention_mode",)
    state_defaults = {"attention_mode": "eventful"}
    # the attention problem and the K/V pooling geometry, rebuilt from the qkv state
    cache_attrs = _EventfulBlockBase.cache_attrs + ("_shape", "_kv")

    def __init__(self, block: nn.Module, policy: Optional[Policy] = None, backend: str = "ops",
                 strategy: Optional[str] = None, *, gate_placement: str = "after_norm",
                 kv_pool: Optional[int] = None, av_dtype: Optional[torch.dtype] = None, prefix_tokens: int = 0,
                 kv_grid: Optional[Tuple[int, int]] = None):
        super().__init__(block, policy, backend, gate_placement=gate_placement)
        self.kv_pool = check_kv_options(kv_pool, self.window, self.use_rel_pos, prefix_tokens, kv_grid)
        self.prefix_tokens = int(prefix_tokens)
        self.kv_grid = None if kv_grid is None else (int(kv_grid[0]), int(kv_grid[1]))
        self._kv: Optional[KVPool] = None
        bias_attn = block.attn if self.use_rel_pos else None
        self.eventful_attention = EventfulAttention(bias_attn, backend, self.kv_pool, av_dtype)
        self.dense_attention = DenseAttention(bias_attn, backend, self.kv_pool)
        self.strategy = default_strategy() if strategy is None else strategy
        self.attention_mode = "eventful"
        self.planned_mode: Optional[str] = None  # set by plan(); what compiled code runs
        self._shape: Optional[AttentionShape] = None
        trust_indices(self)

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = check_strategy(value)

    @property
    def attention(self) -> EventfulModule:
        """The attention module of the last frame's mode."""
        return self.dense_attention if self.attention_mode == "dense" else self.eventful_attention

    @property
    def av_dtype(self) -> Optional[torch.dtype]:
        return self.eventful_attention.av_dtype

    def signature(self) -> tuple:
        sig = super().signature()
        if self.kv_pool or self.av_dtype is not None:
            sig += (self.kv_pool or 0, self.prefix_tokens, str(self.kv_grid), str(self.av_dtype))
        return sig

    def state_shapes(self, streams: int, tokens: int, grid: Optional[Tuple[int, int]]) -> dict:
        shapes = super().state_shapes(streams, tokens, grid)
        if self.kv_pool:  # the attention state has Nk key columns
            nk = kv_geometry(self.kv_pool, tokens, grid, self.prefix_tokens, self.kv_grid, "cpu").n_pooled
            b, h, d = streams, self.heads, self.head_dim
            for name, m in self.named_modules():
                if isinstance(m, MatmulBuffer):
                    shapes[f"{name}.logits"] = (b, h, tokens, nk)
                elif isinstance(m, MatmulDeltaAccumulator):
                    shapes.update({f"{name}.a_ref": (b, h, tokens, nk), f"{name}.v_ref": (b, h, nk, d)})
        return shapes

    def state_dtypes(self, weight_dtype: torch.dtype) -> dict:
        av = self.av_dtype
        if av is None or av == weight_dtype:
            return {}
        return {"eventful_attention.av_buffer.a_ref": av, "eventful_attention.av_buffer.v_ref": av}

    def _derive_state(self) -> None:
        super()._derive_state()
        qkv = self.qkv_buffer.state
        if qkv is None:
            self._shape = self._kv = None
            return
        if self.kv_pool:
            self._kv = kv_geometry(self.kv_pool, qkv.shape[1], self._grid, self.prefix_tokens, self.kv_grid,
                                   qkv.device)
        windows = self._windows.n_windows if self._windows is not None else 1
        self._shape = AttentionShape(qkv.shape[0] * windows, self.heads, qkv.shape[1] // windows, self.head_dim,
                                     qkv.dtype, qkv.device, self.use_rel_pos)

    def _decision_k(self) -> int:
        """Changed tokens per attention stream the current policy asks for (a threshold: its capacity)."""
        n_tokens = self._shape.tokens if self._windows is None else self._windows.h * self._windows.w
        pol = self._policy
        k = pol.capacity_for(n_tokens) if isinstance(pol, Threshold) else pol.k(n_tokens)
        if self._windows is not None:
            return 0 if k == 0 else (self._windows.t if self._windows.padded else min(self._windows.t, k))
        return k

    def resolve_mode(self) -> str:
        """The mode the next steady-state frame runs (the cost model's choice is remembered per shape and budget)."""
        if self._strategy != "auto" or self._shape is None:
            return "eventful" if self._strategy == "auto" else self._strategy
        return choose(self._shape, self._decision_k())

    def plan(self) -> str:
        """Resolve the next frame's mode eagerly and keep it for code traced by ``torch.compile`` (which runs the
        planned mode instead of consulting the cost model). Returns it."""
        self.planned_mode = self.resolve_mode()
        return self.planned_mode

    def _attend(self, q, k, v, idx1, wid, flush):
        grid = self._attn_grid()
        if flush:
            self._shape = AttentionShape(q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.dtype, q.device,
                                         self.use_rel_pos)
            if self.kv_pool:  # kept when unchanged: a captured graph reads its map
                kv = kv_geometry(self.kv_pool, q.shape[2], self._grid, self.prefix_tokens, self.kv_grid, q.device)
                if self._kv is None or not self._kv.same(kv):
                    self._kv = kv
        if self._kv is not None:  # pooled keys / values from the buffered ones, every frame (cheap: O(N*d))
            k, v = self._kv.pool_tokens(k), self._kv.pool_tokens(v)
        compiling = torch.compiler.is_compiling() and self.planned_mode is not None and not flush
        mode = self.planned_mode if compiling else self.resolve_mode()
        previous, self.attention_mode = self.attention_mode, mode
        if mode == "dense":
            if not self.eventful_attention.flushing:
                self.eventful_attention.drop_state()  # it would go stale: rebuilt if the mode comes back
            # rel-pos rows: only the changed queries, when the previous frame kept them current
            rows = idx1 if not flush and previous == "dense" and self._windows is None else None
            return self.dense_attention(q, k, v, self.scale, grid, rows)
        if flush or self.eventful_attention.flushing:
            return self.eventful_attention(q, k, v, self.scale, grid)
        if self._windows is None:
            idx_kv = self._kv.changed(idx1) if self._kv is not None else None  # changed pooled tokens
            return self.eventful_attention(q, k, v, self.scale, grid, idx1, idx_kv)
        return self.eventful_attention(q, k, v, self.scale, grid, self._windows.window_index(wid))
