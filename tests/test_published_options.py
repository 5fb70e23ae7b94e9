"""Options of the published method: K/V token pooling in global attention (``kv_pool``) and the A·V product in
float16/bfloat16 with a float32 output (``av_dtype``).

Anchors: with r = N a pooled block equals the dense block run on pooled keys/values (the dense twin below, written
from the published definition: ``avg_pool2d`` of the keys/values on the token grid, the rel-pos table
``avg_pool1d``-pooled over its key axis); the "ops" backend equals the "reference" backend at r < N; the A·V output
in 16 bits stays within the bound a 16-bit product implies of the float32 run; counts follow the pooled shapes;
stream states, copies and reset() keep the new state (tests/test_steady_frame.py: steady frames with both options
on never synchronise and compile as one graph).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eventful_kernels.counting import count_macs, dense_block_macs, pooled_tokens
from eventful_kernels.models import convert
from eventful_kernels.models.macs import DenseMacCounter
from eventful_kernels.nn import EventfulBlock, Threshold, TopFraction, TopK
from eventful_kernels.nn.attention import KVPool

from nn_utils import BACKENDS, random_video
from test_blocks import D, FP32, HEADS, make
from tiny_timm import tiny_sam, tiny_vit, video
from vit_mirror import SamBlock, get_rel_pos

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the dense twin: the dense block with pooled keys and values -------------------------------------------------

def dense_pooled(blk: nn.Module, x: torch.Tensor, pool: int, prefix: int = 0, grid=None) -> torch.Tensor:
    """The dense block ``blk`` with keys and values average-pooled ``pool x pool`` over the token grid.

    ``x`` is ``[B, H, W, D]`` (SAM layout, the grid is the input's) or ``[B, N, D]`` with ``N = prefix + H*W`` on
    ``grid = (H, W)``; the prefix tokens' keys/values are kept unpooled ahead of the pooled grid. Pooling is
    ``F.avg_pool2d(kernel=stride=pool)`` (a side ``pool`` does not divide loses its last rows/columns), the rel-pos
    tables are pooled over their key axis with ``F.avg_pool1d`` — both as the published block does.
    """
    attn = blk.attn
    heads, dim = attn.num_heads, attn.qkv.in_features
    hd = dim // heads
    b = x.shape[0]
    if x.dim() == 4:
        gh, gw = x.shape[1:3]
        t = x.reshape(b, -1, dim)
    else:
        t, (gh, gw) = x, grid
    n = t.shape[1]
    q, k, v = attn.qkv(blk.norm1(t)).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    def pool_kv(z):
        g = z[:, :, prefix:].reshape(b * heads, gh, gw, hd).permute(0, 3, 1, 2)
        g = F.avg_pool2d(g, pool).flatten(2).transpose(1, 2).reshape(b, heads, -1, hd)
        return torch.cat([z[:, :, :prefix], g], 2)

    logits = (q * attn.scale) @ pool_kv(k).transpose(-1, -2)
    if getattr(attn, "use_rel_pos", False):
        rh = F.avg_pool1d(get_rel_pos(gh, gh, attn.rel_pos_h).transpose(1, 2), pool).transpose(1, 2)
        rw = F.avg_pool1d(get_rel_pos(gw, gw, attn.rel_pos_w).transpose(1, 2), pool).transpose(1, 2)
        bq = q.reshape(b * heads, gh, gw, hd)
        rel_h = torch.einsum("bhwc,hkc->bhwk", bq, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", bq, rw)
        logits = logits + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, -1)
    o = (logits.softmax(-1) @ pool_kv(v)).transpose(1, 2).reshape(b, n, dim)
    x1 = t + blk.ls1(attn.proj(getattr(attn, "norm", nn.Identity())(o)))
    return (x1 + blk.ls2(blk.mlp(blk.norm2(x1)))).reshape(x.shape)


class DensePooledBlock(nn.Module):
    """A timm block run as :func:`dense_pooled` (the dense twin of a converted model with ``kv_pool``)."""

    def __init__(self, blk, pool, prefix=0, grid=None):
        super().__init__()
        self.blk, self.pool, self.prefix, self.grid = blk, pool, prefix, grid

    def forward(self, x):
        return dense_pooled(self.blk, x, self.pool, self.prefix, self.grid)


# ---- configurations -----------------------------------------------------------------------------------------------

def make_pool(cfg):
    """(dense block, input shape, EventfulBlock options, grid of the [B, N, D] inputs) for a pooled configuration."""
    if cfg == "vit_even":  # class token + 8x8 grid
        blk, _ = make("vit")
        return blk, (2, 65, D), dict(prefix_tokens=1), (8, 8)
    if cfg == "vit_odd":  # class token + 7x7 grid: the last row and column are no keys
        blk, shape = make("vit")
        return blk, shape, dict(prefix_tokens=1), (7, 7)
    if cfg == "vit_qknorm_grid":  # class token + an explicit 4x8 grid, q/k-norm, in-place LayerScale
        blk, shape = make("vit_qknorm_inplace_ls")
        return blk, shape, dict(prefix_tokens=1, kv_grid=(4, 8)), (4, 8)
    if cfg == "sam_relpos_even":
        torch.manual_seed(0)
        return SamBlock(D, HEADS, use_rel_pos=True, input_size=(6, 8)).eval(), (2, 6, 8, D), {}, None
    if cfg == "sam_relpos_odd":  # 6x7: the last grid column is no key
        blk, shape = make("sam_global_relpos")
        return blk, shape, {}, None
    raise KeyError(cfg)


GATE_PLACEMENTS = ["after_norm", "before_norm"]
POOL_CONFIGS = ["vit_even", "vit_odd", "vit_qknorm_grid", "sam_relpos_even", "sam_relpos_odd"]


def n_tokens(shape):
    return shape[1] if len(shape) == 3 else shape[1] * shape[2]


def n_keys(shape, opts, grid):
    g = grid if grid is not None else shape[1:3]
    return pooled_tokens(g, 2, opts.get("prefix_tokens", 0))


def policies(n):
    return {
        "quarter": TopFraction(0.25),
        "topk": TopK(5),
        "threshold": Threshold(1.0, capacity=max(1, n // 3), trim=False),
    }


# ---- the pooling geometry -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,grid", [(0, (6, 8)), (1, (7, 7)), (2, (5, 6)), (0, (3, 2))])
def test_pooled_changed_index(prefix, grid):
    """``changed`` gives each stream's set of pooled tokens hit by its index, ascending, ``-1``-padded, width
    ``min(K, Nk)``; ``-1`` slots and tokens of a dropped row/column hit nothing."""
    n = prefix + grid[0] * grid[1]
    kv = KVPool(2, n, grid, prefix, "cpu")
    assert kv.n_pooled == prefix + (grid[0] // 2) * (grid[1] // 2)

    def pooled_of(t):
        if t < prefix:
            return t
        y, x = divmod(t - prefix, grid[1])
        if y // 2 >= grid[0] // 2 or x // 2 >= grid[1] // 2:
            return None
        return prefix + (y // 2) * (grid[1] // 2) + x // 2

    g = torch.Generator().manual_seed(prefix)
    for k in (0, 1, 3, n // 2, n):
        index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(3)])
        index[1, : k // 3] = -1  # empty slots
        got = kv.changed(index)
        assert got.shape == (3, min(k, kv.n_pooled)) and got.dtype == torch.long
        for row, ids in zip(got.tolist(), index.tolist()):
            want = sorted({p for p in (pooled_of(t) for t in ids if t >= 0) if p is not None})
            assert row == want + [-1] * (len(row) - len(want))


def test_pool_tokens_is_avg_pool2d():
    x = torch.randn(2, 3, 1 + 7 * 9, 5)
    kv = KVPool(2, x.shape[2], (7, 9), 1, "cpu")
    g = F.avg_pool2d(x[:, :, 1:].reshape(6, 7, 9, 5).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    want = torch.cat([x[:, :, :1], g.reshape(2, 3, -1, 5)], 2)
    torch.testing.assert_close(kv.pool_tokens(x), want)
    torch.testing.assert_close(kv.pool_tokens(x.transpose(2, 3).contiguous().transpose(2, 3)), want)  # strided


# ---- K/V pooling in a block ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate_placement", GATE_PLACEMENTS)
@pytest.mark.parametrize("strategy", ["eventful", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", POOL_CONFIGS)
def test_kv_pool_full_budget_equals_dense_pooled(cfg, backend, strategy, gate_placement):
    blk, shape, opts, grid = make_pool(cfg)
    n, nk = n_tokens(shape), n_keys(shape, opts, grid)
    eb = EventfulBlock(blk, TopK(n), backend=backend, strategy=strategy, kv_pool=2, gate_placement=gate_placement,
                       **opts)
    for t, x in enumerate(random_video(shape, frames=6)):
        torch.testing.assert_close(eb(x), dense_pooled(blk, x, 2, opts.get("prefix_tokens", 0), grid), **FP32,
                                   msg=f"frame {t}")
    if strategy == "eventful":
        ea = eb.eventful_attention
        assert ea.qk_buffer.logits.shape == (shape[0], HEADS, n, nk)
        assert ea.av_buffer.a_ref.shape == (shape[0], HEADS, n, nk)
        assert ea.av_buffer.v_ref.shape == (shape[0], HEADS, nk, D // HEADS)
        shapes = eb.state_shapes(shape[0], n, shape[1:3] if len(shape) == 4 else None)
        assert shapes["eventful_attention.qk_buffer.logits"] == (shape[0], HEADS, n, nk)
        assert shapes["eventful_attention.av_buffer.v_ref"] == (shape[0], HEADS, nk, D // HEADS)


@pytest.mark.parametrize("gate_placement", GATE_PLACEMENTS)
@pytest.mark.parametrize("policy", ["quarter", "topk", "threshold"])
@pytest.mark.parametrize("cfg", POOL_CONFIGS)
def test_kv_pool_ops_equal_reference(cfg, policy, gate_placement):
    blk, shape, opts, grid = make_pool(cfg)
    pol = policies(n_tokens(shape))[policy]
    e_ops = EventfulBlock(blk, pol, backend="ops", strategy="eventful", kv_pool=2, gate_placement=gate_placement,
                          **opts)
    e_ref = EventfulBlock(blk, pol, backend="reference", strategy="eventful", kv_pool=2,
                          gate_placement=gate_placement, **opts)
    max_dev = 0.0
    for t, x in enumerate(random_video(shape)):
        y_ops, y_ref = e_ops(x), e_ref(x)
        torch.testing.assert_close(y_ops, y_ref, **FP32, msg=f"frame {t}")
        assert e_ops.last_macs == e_ref.last_macs
        max_dev = max(max_dev, (y_ref - dense_pooled(blk, x, 2, opts.get("prefix_tokens", 0), grid)).abs().max().item())
    assert max_dev > 1e-3  # r < N really approximates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["vit_odd", "sam_relpos_even"])
def test_kv_pool_threshold_capacity(cfg, backend):
    """Threshold with a fixed capacity (``-1`` slots in the query index and in the pooled index): h = 0 selects every
    token, so the block stays equal to the dense twin; h huge changes nothing after the flush."""
    blk, shape, opts, grid = make_pool(cfg)
    n = n_tokens(shape)
    video_ = random_video(shape)
    eb = EventfulBlock(blk, Threshold(0.0, capacity=n, trim=False), backend=backend, strategy="eventful",
                       kv_pool=2, **opts)
    for x in video_:
        torch.testing.assert_close(eb(x), dense_pooled(blk, x, 2, opts.get("prefix_tokens", 0), grid), **FP32)
    eb = EventfulBlock(blk, Threshold(1e9, capacity=7, trim=False), backend=backend, strategy="eventful",
                       kv_pool=2, **opts)
    y0 = eb(video_[0])
    for x in video_[1:]:
        torch.testing.assert_close(eb(x) - x, y0 - video_[0], **FP32)


@pytest.mark.parametrize("cfg", ["vit_even", "sam_relpos_odd"])
def test_kv_pool_streams_independent(cfg):
    blk, shape, opts, _ = make_pool(cfg)
    one = (1,) + shape[1:]
    s0, s1, s2 = (random_video(one, seed=s) for s in (1, 2, 3))
    ea = EventfulBlock(blk, TopFraction(0.25), strategy="eventful", kv_pool=2, **opts)
    eb = EventfulBlock(blk, TopFraction(0.25), strategy="eventful", kv_pool=2, **opts)
    for x0, x1, x2 in zip(s0, s1, s2):
        ya, yb = ea(torch.cat([x0, x1])), eb(torch.cat([x0, x2]))
        torch.testing.assert_close(ya[0], yb[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ya[1], yb[1])


@pytest.mark.parametrize("cfg", ["vit_odd", "sam_relpos_even"])
def test_kv_pool_strategy_switch_mid_stream(cfg):
    """eventful -> dense -> eventful: r = N stays equal to the dense twin (the state is rebuilt from the buffered
    q/k/v, pooled again); at r < N ops equal reference."""
    blk, shape, opts, grid = make_pool(cfg)
    full = EventfulBlock(blk, TopK(n_tokens(shape)), strategy="eventful", kv_pool=2, **opts)
    ops = EventfulBlock(blk, TopFraction(0.3), backend="ops", strategy="eventful", kv_pool=2, **opts)
    ref = EventfulBlock(blk, TopFraction(0.3), backend="reference", strategy="eventful", kv_pool=2, **opts)
    for t, x in enumerate(random_video(shape, frames=9)):
        if t in (3, 6):
            for eb in (full, ops, ref):
                eb.strategy = "dense" if t == 3 else "eventful"
        torch.testing.assert_close(full(x), dense_pooled(blk, x, 2, opts.get("prefix_tokens", 0), grid), **FP32,
                                   msg=f"frame {t}")
        torch.testing.assert_close(ops(x), ref(x), **FP32, msg=f"frame {t}")
        assert ops.attention_mode == ("dense" if 3 <= t < 6 else "eventful")


@pytest.mark.parametrize("cfg", POOL_CONFIGS)
def test_kv_pool_counting(cfg):
    """Flush = the dense pooled block; steady frames: linears + QK^T rows (K x Nk) and columns (N x Kp) + A·V delta
    over Kp = min(K, Nk) pooled columns; dense mode: 2*N*Nk*d per head."""
    blk, shape, opts, grid = make_pool(cfg)
    b, n, d = shape[0], n_tokens(shape), D // HEADS
    prefix = opts.get("prefix_tokens", 0)
    nk = n_keys(shape, opts, grid)
    g = grid if grid is not None else tuple(shape[1:3])
    dense = b * dense_block_macs(g, D, HEADS, 4.0, kv_pool=2, prefix_tokens=prefix)
    if g[0] == g[1]:  # a token count stands for a square grid
        assert dense == b * dense_block_macs(n, D, HEADS, 4.0, kv_pool=2, prefix_tokens=prefix)
    linear = 4 * D * D + 8 * D * D  # qkv + proj + mlp per token
    video_ = random_video(shape, frames=3)
    for r in (n, 7):
        eb = EventfulBlock(blk, TopK(r), backend="reference", strategy="eventful", kv_pool=2, **opts)
        eb(video_[0])
        assert eb.last_macs == dense
        eb(video_[1])
        kp = min(r, nk)
        attn = b * HEADS * (r * nk + n * kp) * d + 2 * b * HEADS * n * kp * d
        assert eb.attention.last_macs == attn
        assert eb.last_macs == b * r * linear + attn == count_macs(nn.ModuleList([eb]))
    eb = EventfulBlock(blk, TopK(7), backend="reference", strategy="dense", kv_pool=2, **opts)
    for x in video_:
        eb(x)
    assert eb.attention.last_macs == 2 * b * HEADS * n * nk * d


def test_kv_pool_arguments_checked():
    blk, shape = make("sam_window")
    with pytest.raises(ValueError, match="global attention"):
        EventfulBlock(blk, kv_pool=2)
    vit, vshape = make("vit")
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="'kv_pool'"):
            EventfulBlock(vit, kv_pool=bad)
    with pytest.raises(ValueError, match="'prefix_tokens'"):
        EventfulBlock(vit, kv_pool=2, prefix_tokens=-1)
    sam, _ = make("sam_global_relpos")
    with pytest.raises(ValueError, match="prefix tokens"):
        EventfulBlock(sam, kv_pool=2, prefix_tokens=1)
    with pytest.raises(ValueError, match="dense_block_macs|global attention"):
        dense_block_macs((8, 8), D, HEADS, 4.0, window=4, kv_pool=2)
    for bad in (1, 0, 2.0):
        with pytest.raises(ValueError, match="'kv_pool'"):
            dense_block_macs((8, 8), D, HEADS, 4.0, kv_pool=bad)
    with pytest.raises(ValueError, match="'kv_grid'"):
        EventfulBlock(vit, kv_pool=2, kv_grid=(0, 4))
    # 50 tokens without a prefix: no square grid -> a clear error at the flush, no state left behind
    eb = EventfulBlock(vit, kv_pool=2)
    x = random_video(vshape, frames=1)[0]
    with pytest.raises(ValueError, match="kv_grid"):
        eb(x)
    assert eb.qkv_gate.flushing and eb.qkv_buffer.state is None
    eb = EventfulBlock(vit, kv_pool=2, prefix_tokens=1, kv_grid=(8, 8))  # 1 + 64 != 50
    with pytest.raises(ValueError, match="do not make"):
        eb(x)
    eb = EventfulBlock(sam, kv_pool=2, prefix_tokens=0)
    eb(random_video((1, 6, 7, D), frames=1)[0])  # fine


# ---- A·V in 16 bits -----------------------------------------------------------------------------------------------

AV_CONFIGS = ["vit", "sam_global_relpos", "vit_odd+pool", "sam_relpos_even+pool"]
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def make_av(cfg):
    """(dense block, input shape, EventfulBlock options) for the A·V dtype tests, with and without pooling."""
    if cfg.endswith("+pool"):
        blk, shape, opts, _ = make_pool(cfg[: -len("+pool")])
        return blk, shape, dict(opts, kv_pool=2)
    blk, shape = make(cfg)
    return blk, shape, {}


@pytest.mark.parametrize("gate_placement", GATE_PLACEMENTS)
@pytest.mark.parametrize("av_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["quarter", "threshold"])
@pytest.mark.parametrize("cfg", AV_CONFIGS)
def test_av_dtype_ops_equal_reference(cfg, policy, av_dtype, gate_placement):
    blk, shape, opts = make_av(cfg)
    pol = policies(n_tokens(shape))[policy]
    e_ops = EventfulBlock(blk, pol, backend="ops", strategy="eventful", av_dtype=av_dtype,
                          gate_placement=gate_placement, **opts)
    e_ref = EventfulBlock(blk, pol, backend="reference", strategy="eventful", av_dtype=av_dtype,
                          gate_placement=gate_placement, **opts)
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(e_ops(x), e_ref(x), **FP32, msg=f"frame {t}")
        assert e_ops.last_macs == e_ref.last_macs
    av = e_ops.eventful_attention.av_buffer
    assert av.a_ref.dtype == av.v_ref.dtype == av_dtype and av.out.dtype == torch.float32


@pytest.mark.parametrize("av_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["full", "quarter", "threshold"])
@pytest.mark.parametrize("cfg", AV_CONFIGS)
def test_av_dtype_within_16_bit_of_float32(cfg, policy, av_dtype):
    """The attention output of the 16-bit A·V run against the float32 run of the same block, every frame.

    Both runs see the same q/k/v (the qkv gate acts on the block input), so their logits, softmax and selected
    columns are identical and at all times ``a_ref16 = round(a_ref32)``, ``v_ref16 = round(v_ref32)``; the outputs
    hold ``a_ref @ v_ref`` accumulated in float32. Rounding each factor to a 16-bit float with unit roundoff ``u``
    (float16 2^-11, bfloat16 2^-8) perturbs each product by at most ``(2u + u^2) |a_ij v_j|``, and since a row of A
    sums to 1, ``|o16 - o32| <= (2u + u^2) * max|v|`` per entry, plus float32 noise (the accumulated deltas of 10
    frames: 1e-5) and float16's subnormal floor (an entry below 2^-14 is rounded to a multiple of 2^-24, at most
    N * 2^-25 * max|v| over a row)."""
    blk, shape, opts = make_av(cfg)
    n = n_tokens(shape)
    pol = TopK(n) if policy == "full" else policies(n)[policy]
    e16 = EventfulBlock(blk, pol, strategy="eventful", av_dtype=av_dtype, **opts)
    e32 = EventfulBlock(blk, pol, strategy="eventful", **opts)
    u = UNIT_ROUNDOFF[av_dtype]
    worst = 0.0
    for t, x in enumerate(random_video(shape)):
        e16(x)
        e32(x)
        o16, o32 = e16.eventful_attention.av_buffer.tokens, e32.eventful_attention.av_buffer.tokens
        vmax = e32.eventful_attention.av_buffer.v_ref.abs().max().item()
        bound = (2 * u + u * u) * vmax + n * 2.0 ** -25 * vmax + 1e-5
        dev = (o16 - o32).abs().max().item()
        assert dev <= bound, f"frame {t}: {dev} > {bound}"
        worst = max(worst, dev / bound)
    assert worst > 1e-3  # the 16-bit path really rounds


@pytest.mark.parametrize("av_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", AV_CONFIGS)
def test_av_dtype_full_budget_close_to_dense(cfg, av_dtype):
    """r = N: every token is recomputed, so the block differs from its dense (pooled) twin only by the 16-bit A·V
    rounding, ``<= (2u + u^2) max|v|`` in the attention output (above), carried through the projection (its row sums
    of |W|, times the LayerScale) into the residual and, a little amplified by norm2 and the MLP, into the output: 4x
    the projected bound is generous and still far below what a wrong column or a dropped delta would give."""
    blk, shape, opts = make_av(cfg)
    eb = EventfulBlock(blk, TopK(n_tokens(shape)), strategy="eventful", av_dtype=av_dtype, **opts)
    pool = opts.get("kv_pool")
    grid = make_pool(cfg[: -len("+pool")])[3] if pool else None
    u = UNIT_ROUNDOFF[av_dtype]
    w = blk.attn.proj.weight.abs().sum(1).max().item()
    gamma = getattr(blk.ls1, "gamma", torch.ones(1)).abs().max().item()
    for t, x in enumerate(random_video(shape)):
        y = eb(x)
        want = dense_pooled(blk, x, pool, opts.get("prefix_tokens", 0), grid) if pool else blk(x)
        vmax = eb.eventful_attention.av_buffer.v_ref.float().abs().max().item()
        bound = 4 * gamma * w * ((2 * u + u * u) * vmax + 1e-5) + 1e-4
        assert (y - want).abs().max().item() <= bound, f"frame {t}"


@pytest.mark.parametrize("cfg", ["vit", "vit_odd+pool"])
def test_av_dtype_dense_mode_and_arguments(cfg):
    """Dense mode keeps no A·V state: ``av_dtype`` leaves it as it is (fused attention in the model's dtype)."""
    blk, shape, opts = make_av(cfg)
    a = EventfulBlock(blk, TopFraction(0.3), strategy="dense", av_dtype=torch.float16, **opts)
    b = EventfulBlock(blk, TopFraction(0.3), strategy="dense", **opts)
    for x in random_video(shape, frames=4):
        assert torch.equal(a(x), b(x))
    for bad in (torch.float32, torch.int8, "float16"):
        with pytest.raises(ValueError, match="'av_dtype'"):
            EventfulBlock(blk, av_dtype=bad)
    # a 16-bit model with another 16-bit A·V dtype: the output (in the model's dtype) cannot hold the products
    half = EventfulBlock(copy.deepcopy(blk).to(torch.bfloat16), strategy="eventful", av_dtype=torch.float16, **opts)
    with pytest.raises(ValueError, match="'av_dtype'"):
        half(random_video(shape, frames=1, dtype=torch.bfloat16)[0])
    assert half.qkv_gate.flushing


# ---- converted models ---------------------------------------------------------------------------------------------

MODELS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}


def dense_pooled_twin(kind, seed=0):
    """The tiny model with its global blocks run as :func:`dense_pooled` (pooling 2, ViT: class token unpooled)."""
    make_model, _ = MODELS[kind]
    m = make_model(seed)
    if kind == "vit":
        m.blocks = nn.Sequential(*[DensePooledBlock(b, 2, 1, tuple(m.patch_embed.grid_size)) for b in m.blocks])
    else:
        m.blocks = nn.Sequential(*[b if b.window_size > 0 else DensePooledBlock(b, 2) for b in m.blocks])
    return m.eval()


@pytest.mark.parametrize("gate_placement", GATE_PLACEMENTS)
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_converted_model_full_budget_equals_dense_pooled_twin(kind, gate_placement):
    make_model, size = MODELS[kind]
    twin = dense_pooled_twin(kind)
    for strategy in ("eventful", "dense"):
        ev = convert(make_model(), 1.0, strategy=strategy, kv_pool=2, gate_placement=gate_placement)
        for t, x in enumerate(video(4, size, batch=2)):
            torch.testing.assert_close(ev(x), twin(x), rtol=1e-4, atol=1e-4, msg=f"{strategy} frame {t}")
    pooled = [b for b in ev.eventful_blocks() if getattr(b, "kv_pool", None)]
    assert len(pooled) == (2 if kind == "vit" else 1)  # global blocks only
    if kind == "vit":
        assert pooled[0].prefix_tokens == 1 and pooled[0].kv_grid == (4, 4)


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_converted_model_counts_follow_pooled_shapes(kind):
    make_model, size = MODELS[kind]
    ev = convert(make_model(), TopK(5), strategy="eventful", kv_pool=2, av_dtype=torch.float16)
    plain = convert(make_model(), TopK(5), strategy="eventful")
    frames = video(3, size, batch=2)
    for x in frames:
        ev(x)
        plain(x)
    diff = 0
    for be, bp in zip(ev.eventful_blocks(), plain.eventful_blocks()):
        if not getattr(be, "kv_pool", None):
            assert be.last_macs == bp.last_macs
            continue
        n, nk, d, h = bp.qkv_buffer.state.shape[1], be._kv.n_pooled, be.head_dim, be.heads
        kp = min(5, nk)
        assert be.attention.last_macs == 2 * (h * (5 * nk + n * kp) * d + 2 * h * n * kp * d)
        diff += bp.attention.last_macs - be.attention.last_macs
    assert plain.macs_last_frame() - ev.macs_last_frame() == diff > 0


@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_converted_model_ideal_speedup_follows_pooled_shapes(kind):
    """The flush costs that of the unpooled model less, per global block, the dense block minus the dense pooled
    block (``dense_block_macs(..., kv_pool=2)``); the ideal speedup (dense timm MACs / eventful MACs, as the video
    runner reports it) is that of the unpooled model at the same budget raised by exactly the attention MACs pooling
    saves."""
    make_model, size = MODELS[kind]
    dense = make_model()
    ev = convert(dense, TopK(5), strategy="eventful", kv_pool=2, av_dtype=torch.float16)
    plain = convert(dense, TopK(5), strategy="eventful")
    frames = video(3, size, batch=2)
    counter = DenseMacCounter(dense)
    with counter.counting():
        dense(frames[0])
    dense_macs = counter.macs
    plain(frames[0])
    ev(frames[0])
    saved = 0
    for be in ev.eventful_blocks():
        if getattr(be, "kv_pool", None):
            kv, ratio = be._kv, be.block.mlp.fc1.out_features / be.dim
            pooled = dense_block_macs(kv.grid, be.dim, be.heads, ratio, kv_pool=2, prefix_tokens=kv.prefix)
            saved += 2 * (dense_block_macs(kv.tokens, be.dim, be.heads, ratio) - pooled)
    assert saved > 0 and ev.macs_last_frame() == plain.macs_last_frame() - saved
    for x in frames[1:]:
        plain(x)
    for x in frames[1:]:
        ev(x)
    attn_saved = sum(bp.attention.last_macs - be.attention.last_macs
                     for be, bp in zip(ev.eventful_blocks(), plain.eventful_blocks()) if getattr(be, "kv_pool", None))
    ideal_plain, ideal = dense_macs / plain.macs_last_frame(), dense_macs / ev.macs_last_frame()
    assert ideal == pytest.approx(dense_macs / (plain.macs_last_frame() - attn_saved), rel=1e-12)
    assert ideal > ideal_plain > 1


STATE_OPTIONS = {
    "pool": dict(kv_pool=2),
    "pool+fp16": dict(kv_pool=2, av_dtype=torch.float16),
    "bf16": dict(av_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("options", list(STATE_OPTIONS))
@pytest.mark.parametrize("kind", ["vit", "sam"])
def test_copies_stream_state_and_reset_with_options(kind, options):
    """A deep copy and a stream state loaded into a fresh model continue the streams bit-identically (the 16-bit A·V
    references are saved and loaded in their dtype); reset() starts over as a fresh model; a model without the
    options refuses the state."""
    make_model, size = MODELS[kind]
    opts = STATE_OPTIONS[options]
    ev = convert(make_model(), 0.4, strategy="eventful", **opts)
    frames = video(6, size, batch=2)
    for x in frames[:3]:
        ev(x)
    state = ev.stream_state()
    modules = state["model"]["modules"]
    refs = [m[k] for name, m in modules.items() if name.endswith("av_buffer") for k in ("a_ref", "v_ref")]
    assert refs and all(r.dtype == opts.get("av_dtype", torch.float32) for r in refs)
    twin = copy.deepcopy(ev)
    fresh = convert(make_model(), 0.4, strategy="eventful", **opts)
    fresh.load_stream_state(state)
    for x in frames[3:]:
        y = ev(x)
        assert torch.equal(twin(x), y) and torch.equal(fresh(x), y)
    for other in (dict(), dict(opts, av_dtype=None) if "av_dtype" in opts else dict(kv_pool=3)):
        with pytest.raises(ValueError, match="architecture differs"):
            convert(make_model(), 0.4, strategy="eventful", **other).load_stream_state(state)
    ev.reset()
    new = convert(make_model(), 0.4, strategy="eventful", **opts)
    for x in frames:
        assert torch.equal(ev(x), new(x))


def test_stream_state_with_16_bit_references_checked():
    """The loader checks the dtype of the 16-bit references against the block's ``av_dtype``."""
    make_model, size = MODELS["vit"]
    ev = convert(make_model(), 0.4, strategy="eventful", av_dtype=torch.float16)
    ev(video(1, size, batch=2)[0])
    state = ev.stream_state()
    modules = state["model"]["modules"]
    name = next(n for n in modules if n.endswith("av_buffer"))
    modules[name]["a_ref"] = modules[name]["a_ref"].float()
    fresh = convert(make_model(), 0.4, strategy="eventful", av_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"a_ref is float32 .* \(the block keeps it in float16\)"):
        fresh.load_stream_state(state)
    assert all(b.qkv_buffer.state is None for b in fresh.eventful_blocks())


@pytest.mark.parametrize("cfg", ["vit_even", "sam_relpos_odd"])
def test_kv_pool_budget_change_and_refresh(cfg):
    """A small budget for 4 frames, then r = N: from there on every cached value is recomputed -> the dense twin. A
    refresh keeps the pooling map (a captured CUDA graph reads it)."""
    blk, shape, opts, grid = make_pool(cfg)
    policy = TopK(3)
    eb = EventfulBlock(blk, policy, strategy="eventful", kv_pool=2, **opts)
    for t, x in enumerate(random_video(shape, frames=8)):
        if t == 4:
            policy.r = n_tokens(shape)
        if t == 6:
            kv = eb._kv
            eb.refresh()
        y = eb(x)
        want = dense_pooled(blk, x, 2, opts.get("prefix_tokens", 0), grid)
        if 0 < t < 4:
            assert not torch.allclose(y, want, **FP32)
        if t >= 4:
            torch.testing.assert_close(y, want, **FP32, msg=f"frame {t}")
    assert eb._kv is kv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["vit_odd+pool", "sam_relpos_even+pool"])
def test_cuda_matches_cpu_with_options(cfg, backend):
    """Pooled K/V and a float16 A·V on the GPU equal the CPU reference (TF32 off: fp32 tolerance)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    blk, shape, opts = make_av(cfg)
    policy = Threshold(1.0, capacity=n_tokens(shape) // 3, trim=False)
    e_cpu = EventfulBlock(blk, policy, backend="reference", strategy="eventful", av_dtype=torch.float16, **opts)
    e_gpu = EventfulBlock(copy.deepcopy(blk).cuda(), policy, backend=backend, strategy="eventful",
                          av_dtype=torch.float16, **opts)
    for t, x in enumerate(random_video(shape)):
        torch.testing.assert_close(e_gpu(x.cuda()).cpu(), e_cpu(x), **FP32, msg=f"frame {t}")
