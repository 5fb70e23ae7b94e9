"""CPU qk_update_ / av_delta_update_ against eventful_kernels.reference.

Tolerances. Both ops accumulate in float32; the kernel and the reference differ only in summation order (BLAS tiling,
one GEMM over the concatenated 2K contraction instead of two GEMMs and a subtraction). For a float32 sum of n terms
each result is within gamma_n * sum|terms| of the exact value (gamma_n ~ n * eps32), so the two float32 results differ
by at most delta = 2 * n * eps32 * sum|terms|, which we compute elementwise from |q| @ |k|^T (or |a| @ |v|). A
float16/bfloat16 output then rounds each float32 result once, so the outputs may differ by delta plus one ulp of the
output dtype (relative 2^-10 for float16, 2^-7 for bfloat16; float16 subnormal spacing 2^-24 near zero).
Everything the ops must not touch is compared exactly, and the state copies (a_ref, v_ref) are exact.

Index entries -1 are empty slots (nothing recomputed, added or refreshed there); with check_index=False every id
outside [0, N) is one.
"""
import re
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import ops, reference

from index_slots import out_of_range, with_empty_slots

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
EPS32 = torch.finfo(torch.float32).eps
ULP_REL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ULP_MIN = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


def make_index(b, n, k, dtype, gen):
    """[b, k] distinct ids in [0, n) per row, unsorted."""
    rows = [torch.randperm(n, generator=gen)[:k] for _ in range(b)]
    return torch.stack(rows).to(dtype) if b else torch.empty(0, k, dtype=dtype)


def valid_ids(row, n):
    """The ids of one index row that name a token of [0, n), as int64."""
    row = row.long()
    return row[(row >= 0) & (row < n)]


def randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


def clone_layout(t):
    """Copy of `t` in a fresh storage with the same offset and strides (clone() would compact a padded view)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride())


def assert_within(actual, expected, delta, dtype):
    """|actual - expected| <= delta (float32 summation-order bound) + one ulp of `dtype` (final cast), elementwise."""
    a, e = actual.float(), expected.float()
    bound = 1.01 * delta + ULP_REL[dtype] * 1.01 * e.abs() + ULP_MIN[dtype]
    err = (a - e).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}, max err {err.max().item()}"


# ---------------------------------------------------------------------------------------------------- qk_update_

def qk_delta(q, k, scale):
    """Elementwise bound on the float32 summation-order difference of q @ k^T * scale."""
    d = q.shape[-1]
    return 2 * d * EPS32 * abs(scale) * (q.float().abs() @ k.float().abs().transpose(-1, -2))


def check_qk(logits, q, k, iq, ik, scale, **kwargs):
    """Run the op on a same-layout copy of `logits` and compare with the reference."""
    ours = clone_layout(logits)
    assert ours.stride() == logits.stride()
    ref = reference.qk_update_(logits.clone(), q, k, iq, ik, scale)
    out = ops.qk_update_(ours, q, k, iq, ik, scale, **kwargs)
    assert out is ours
    assert_within(ours, ref, qk_delta(q, k, scale), logits.dtype)
    # Entries outside the selected rows and columns are untouched, bit for bit.
    keep = untouched(logits, iq, ik)
    assert torch.equal(ours[keep], logits[keep])
    return ours


def untouched(logits, iq, ik):
    """Mask of the logits outside rows `iq` and columns `ik` (per batch row, all heads; empty slots name nothing)."""
    b, h, nq, nk = logits.shape
    keep = torch.ones(b, nq, nk, dtype=torch.bool)
    for i in range(b):
        keep[i, valid_ids(iq[i], nq), :] = False
        keep[i, :, valid_ids(ik[i], nk)] = False
    return keep[:, None].expand(b, h, nq, nk)


QK_SHAPES = [  # B, H, Nq, Nk, d, Kq, Kk
    (1, 1, 8, 8, 4, 3, 3),
    (2, 3, 17, 11, 8, 5, 4),  # Nq != Nk, B > 1, H > 1
    (2, 2, 16, 16, 8, 0, 0),  # K = 0
    (2, 2, 9, 7, 4, 9, 7),  # K = N
    (3, 2, 10, 13, 5, 0, 13),  # rows none, columns all
    (1, 4, 33, 65, 16, 33, 1),
    (2, 2, 70, 300, 12, 20, 64),  # several row/column tiles per head
    (2, 2, 45, 4100, 4, 7, 4100),  # column pass: 16-row tiles of the rows the row pass skipped (gaps and runs)
    (2, 2, 4, 5, 0, 2, 3),  # d = 0: selected entries become 0
]


@pytest.mark.parametrize("shape", QK_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_matches_reference(shape, index_dtype, dtype):
    b, h, nq, nk, d, kq, kk = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    iq, ik = make_index(b, nq, kq, index_dtype, gen), make_index(b, nk, kk, index_dtype, gen)
    check_qk(logits, q, k, iq, ik, max(d, 1) ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_update_float32_logits_from_half_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = randn((2, 2, 12, 8), dtype, gen), randn((2, 2, 10, 8), dtype, gen)
    logits = randn((2, 2, 12, 10), torch.float32, gen)
    check_qk(logits, q, k, make_index(2, 12, 4, torch.int64, gen), make_index(2, 10, 3, torch.int32, gen), 0.3)


@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_strided_inputs(dtype):
    """q, k from a [B, N, 3, H, d] qkv permute, logits a transposed view, non-contiguous index."""
    gen = torch.Generator().manual_seed(2)
    b, n, h, d = 2, 20, 3, 8
    qkv = randn((b, n, 3, h, d), dtype, gen).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    q, k = qkv[0], qkv[1]
    assert not q.is_contiguous()
    logits_t = randn((b, h, n, n), dtype, gen).transpose(-1, -2)  # unit stride along rows, not columns
    iq = make_index(b, n, 6, torch.int64, gen).t().contiguous().t()
    ik = make_index(b, n, 5, torch.int32, gen).t().contiguous().t()
    assert not iq.is_contiguous()
    check_qk(logits_t, q, k, iq, ik, 0.25)
    # Logits rows padded in a wider buffer (row stride > Nk), head-dim-strided q.
    wide = randn((b, h, n, n + 7), dtype, gen)[..., :n]
    q_strided = randn((b, h, n, 2 * d), dtype, gen)[..., ::2]
    check_qk(wide, q_strided, k, iq, ik, 0.25)
    # Broadcast (stride-0) read-only inputs.
    check_qk(wide, q[:, :1].expand(b, h, n, d), k[:, :, :1].expand(b, h, n, d), iq, ik, 0.25)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 12), nk=st.integers(1, 12), d=st.integers(1, 9),
    fq=st.floats(0, 1), fk=st.floats(0, 1), dtype=st.sampled_from(FLOATS),
    index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_qk_update_random_shapes(b, h, nq, nk, d, fq, fk, dtype, index_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    iq = make_index(b, nq, round(fq * nq), index_dtype, gen)
    ik = make_index(b, nk, round(fk * nk), index_dtype, gen)
    check_qk(logits, q, k, iq, ik, 1.0 / (d + 1))


def test_qk_update_opcheck():
    gen = torch.Generator().manual_seed(3)
    args = (randn((2, 2, 9, 7), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
            randn((2, 2, 7, 4), torch.float32, gen), make_index(2, 9, 3, torch.int64, gen),
            make_index(2, 7, 2, torch.int32, gen), 0.5)
    torch.library.opcheck(torch.ops.eventful.qk_update_.default, args)


def qk_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    return dict(logits=randn((2, 2, 6, 5), dtype, gen), q=randn((2, 2, 6, 4), dtype, gen),
                k=randn((2, 2, 5, 4), dtype, gen), index_q=make_index(2, 6, 3, torch.int64, gen),
                index_k=make_index(2, 5, 2, torch.int64, gen), scale=0.5)


def _dup(index):
    index = index.clone()
    index[1, 1] = index[1, 0]
    return index


QK_BAD = {  # name: (args -> args, error type, argument named in the message)
    "logits_rank": (lambda a: {**a, "logits": a["logits"][0]}, RuntimeError, "logits"),
    "q_rank": (lambda a: {**a, "q": a["q"][0]}, RuntimeError, "'q'"),
    "q_int": (lambda a: {**a, "q": a["q"].int()}, RuntimeError, "'q'"),
    "k_dtype": (lambda a: {**a, "k": a["k"].half()}, RuntimeError, "'k'"),
    "logits_half_q_float": (lambda a: {**a, "logits": a["logits"].half()}, RuntimeError, "'logits'"),
    "q_batch": (lambda a: {**a, "q": a["q"][:1]}, RuntimeError, "'q'"),
    "q_heads": (lambda a: {**a, "q": a["q"][:, :1]}, RuntimeError, "'q'"),
    "q_rows": (lambda a: {**a, "q": a["q"][:, :, :5]}, RuntimeError, "'q'"),
    "k_rows": (lambda a: {**a, "k": a["k"][:, :, :4]}, RuntimeError, "'k'"),
    "k_head_dim": (lambda a: {**a, "k": a["k"][..., :3]}, RuntimeError, "'k'"),
    "index_q_float": (lambda a: {**a, "index_q": a["index_q"].float()}, RuntimeError, "'index_q'"),
    "index_q_rank": (lambda a: {**a, "index_q": a["index_q"][0]}, RuntimeError, "'index_q'"),
    "index_k_batch": (lambda a: {**a, "index_k": a["index_k"][:1]}, RuntimeError, "'index_k'"),
    "index_q_range": (lambda a: {**a, "index_q": a["index_q"] + 6 - a["index_q"].max()}, IndexError, "'index_q'"),
    "index_k_negative": (lambda a: {**a, "index_k": a["index_k"] - 1 - a["index_k"].max()}, IndexError, "'index_k'"),
    "index_k_range_nq": (lambda a: {**a, "index_k": torch.tensor([[5, 0], [1, 2]])}, IndexError, "'index_k'"),
    "index_q_dup": (lambda a: {**a, "index_q": _dup(a["index_q"])}, RuntimeError, "'index_q'"),
    "index_k_dup": (lambda a: {**a, "index_k": _dup(a["index_k"])}, RuntimeError, "'index_k'"),
    "logits_expanded": (lambda a: {**a, "logits": a["logits"][:, :1].expand(2, 2, 6, 5)}, RuntimeError, "'logits'"),
    "index_q_minus_two": (lambda a: {**a, "index_q": torch.tensor([[-1, 0, -1], [3, -2, -1]])}, IndexError,
                          re.escape("eventful: argument 'index_q' holds -2 at [1, 1], out of range [0, 6)")),
    "index_k_n_after_empty": (lambda a: {**a, "index_k": torch.tensor([[-1, -1], [-1, 5]], dtype=torch.int32)},
                              IndexError,
                              re.escape("eventful: argument 'index_k' holds 5 at [1, 1], out of range [0, 5)")),
    "index_k_dup_after_empty": (lambda a: {**a, "index_k": torch.tensor([[-1, -1, 1], [2, -1, 2]])}, RuntimeError,
                                re.escape("eventful: argument 'index_k' repeats token id 2 in row 1 (ids must be "
                                          "distinct)")),
}


@pytest.mark.parametrize("case", sorted(QK_BAD))
def test_qk_update_bad_input(case):
    fix, exc, name = QK_BAD[case]
    args = fix(qk_args())
    before = args["logits"].clone()
    with pytest.raises(exc, match=name):
        ops.qk_update_(**args)
    assert torch.equal(args["logits"], before)


def test_qk_update_logits_aliasing_q_rejected():
    gen = torch.Generator().manual_seed(5)
    logits = randn((1, 2, 4, 4), torch.float32, gen)
    before = logits.clone()
    with pytest.raises(RuntimeError, match="'logits'.*'q'"):
        ops.qk_update_(logits, logits, randn((1, 2, 4, 4), torch.float32, gen),
                       torch.tensor([[1]]), torch.tensor([[2]]), 1.0)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------------------------- qk_update_ with rel-pos

def check_qk_relpos(logits, q, k, iq, ik, scale, rel_h, rel_w, **kwargs):
    """As check_qk, with the decomposed rel-pos bias. The bias is added to the float32 accumulator in both; besides
    the summation-order bound, the two float32 additions may round differently (2 * eps32 * (|qk| + |bias|))."""
    ours = clone_layout(logits)
    ref = reference.qk_update_(logits.clone(), q, k, iq, ik, scale, rel_h, rel_w)
    assert ops.qk_update_(ours, q, k, iq, ik, scale, rel_h, rel_w, **kwargs) is ours
    bias = reference.relpos_bias(rel_h, rel_w)
    qk = (q.float() @ k.float().transpose(-1, -2) * scale).abs()
    assert_within(ours, ref, qk_delta(q, k, scale) + 2 * EPS32 * (qk + bias.abs()), logits.dtype)
    keep = untouched(logits, iq, ik)
    assert torch.equal(ours[keep], logits[keep])
    # The bias really is applied: without it the recomputed entries differ.
    if (~keep).any() and bias.abs().max() > 0:
        plain = reference.qk_update_(logits.clone(), q, k, iq, ik, scale)
        assert not torch.allclose(ours[~keep].float(), plain[~keep].float())


RELPOS_SHAPES = [  # B, H, Nq, Gh, Gw, d, Kq, Kk
    (1, 1, 12, 3, 4, 4, 3, 5),
    (2, 3, 20, 5, 7, 8, 6, 4),  # Nq != Nk, Gh != Gw, B > 1
    (2, 2, 16, 4, 4, 8, 0, 0),  # K = 0
    (2, 2, 12, 4, 3, 4, 12, 12),  # K = N
    (1, 2, 64, 8, 8, 16, 16, 16),  # several tiles, a square grid (SAM global attention)
    (2, 1, 40, 64, 64, 4, 9, 4096),  # column pass over several tiles of skipped rows, one bias run per grid row
]


@pytest.mark.parametrize("shape", RELPOS_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_matches_reference(shape, index_dtype, dtype):
    b, h, nq, gh, gw, d, kq, kk = shape
    nk = gh * gw
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, "relpos")).encode()))
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    rel_h, rel_w = randn((b, h, nq, gh), dtype, gen), randn((b, h, nq, gw), dtype, gen)
    iq, ik = make_index(b, nq, kq, index_dtype, gen), make_index(b, nk, kk, index_dtype, gen)
    check_qk_relpos(logits, q, k, iq, ik, d**-0.5, rel_h, rel_w)


@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_strided(dtype):
    """rel_h a transposed view (unit stride along rows), rel_w a slice of a wider buffer, float32 logits."""
    gen = torch.Generator().manual_seed(11)
    b, h, nq, gh, gw, d = 2, 2, 15, 3, 5, 8
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, gh * gw, d), dtype, gen)
    rel_h = randn((b, h, gh, nq), dtype, gen).transpose(-1, -2)
    rel_w = randn((b, h, nq, gw + 3), dtype, gen)[..., 1 : gw + 1]
    assert not rel_h.is_contiguous() and not rel_w.is_contiguous()
    iq, ik = make_index(b, nq, 4, torch.int64, gen), make_index(b, gh * gw, 6, torch.int32, gen)
    check_qk_relpos(randn((b, h, nq, gh * gw), torch.float32, gen), q, k, iq, ik, 0.3, rel_h, rel_w)


def test_qk_update_relpos_opcheck():
    gen = torch.Generator().manual_seed(12)
    args = (randn((2, 2, 9, 6), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
            randn((2, 2, 6, 4), torch.float32, gen), make_index(2, 9, 3, torch.int64, gen),
            make_index(2, 6, 2, torch.int32, gen), 0.5, randn((2, 2, 9, 2), torch.float32, gen),
            randn((2, 2, 9, 3), torch.float32, gen))
    torch.library.opcheck(torch.ops.eventful.qk_update_.default, args)


def relpos_args():
    gen = torch.Generator().manual_seed(13)
    return dict(qk_args(), rel_h=randn((2, 2, 6, 1), torch.float32, gen), rel_w=randn((2, 2, 6, 5), torch.float32, gen))


RELPOS_BAD = {
    "rel_w_missing": (lambda a: {**a, "rel_w": None}, "'rel_h' and 'rel_w'"),
    "rel_h_missing": (lambda a: {**a, "rel_h": None}, "'rel_h' and 'rel_w'"),
    "rel_h_rank": (lambda a: {**a, "rel_h": a["rel_h"][0]}, "'rel_h'"),
    "rel_w_dtype": (lambda a: {**a, "rel_w": a["rel_w"].double()}, "'rel_w'"),
    "rel_h_batch": (lambda a: {**a, "rel_h": a["rel_h"][:1]}, "'rel_h'"),
    "rel_w_heads": (lambda a: {**a, "rel_w": a["rel_w"][:, :1]}, "'rel_w'"),
    "rel_h_rows": (lambda a: {**a, "rel_h": a["rel_h"][:, :, :5]}, "'rel_h'"),
    "grid_mismatch": (lambda a: {**a, "rel_w": a["rel_w"][..., :4]}, "Gh\\*Gw"),
    "rel_h_is_logits": (lambda a: {**a, "rel_h": a["logits"][..., :1]}, "'logits'.*'rel_h'"),
}


@pytest.mark.parametrize("case", sorted(RELPOS_BAD))
def test_qk_update_relpos_bad_input(case):
    fix, name = RELPOS_BAD[case]
    args = fix(relpos_args())
    before = args["logits"].clone()
    with pytest.raises((RuntimeError, ValueError), match=name):
        ops.qk_update_(**args)
    assert torch.equal(args["logits"], before)


# ---------------------------------------------------------------------------------------------- av_delta_update_

def av_state(b, h, m, n, d, dtype, out_dtype, gen):
    a_new = torch.rand((b, h, m, n), generator=gen).softmax(-1).to(dtype)
    a_ref = torch.rand((b, h, m, n), generator=gen).softmax(-1).to(dtype)
    v_new, v_ref = randn((b, h, n, d), dtype, gen), randn((b, h, n, d), dtype, gen)
    out = (a_ref.float() @ v_ref.float()).to(out_dtype)
    return out, a_new, a_ref, v_new, v_ref


def av_delta(out, a_new, a_ref, v_new, v_ref, index):
    """Elementwise bound: both sides sum out and 2K products in float32 in different orders."""
    terms = out.float().abs()
    for i in range(index.shape[0]):
        s = valid_ids(index[i], a_new.shape[-1])
        terms[i] += a_new[i][..., s].float().abs() @ v_new[i][:, s].float().abs()
        terms[i] += a_ref[i][..., s].float().abs() @ v_ref[i][:, s].float().abs()
    return 2 * (2 * index.shape[1] + 1) * EPS32 * terms


def check_av(out, a_new, a_ref, v_new, v_ref, index, **kwargs):
    delta = av_delta(out, a_new, a_ref, v_new, v_ref, index)
    ref = [t.clone() for t in (out, a_new, a_ref, v_new, v_ref)]
    reference.av_delta_update_(*ref, index)
    keep = [t.clone() for t in (out, a_new, a_ref, v_new, v_ref)]
    ours = [clone_layout(out), a_new, clone_layout(a_ref), v_new, clone_layout(v_ref)]
    assert ours[0].stride() == out.stride() and ours[2].stride() == a_ref.stride()
    res = ops.av_delta_update_(*ours, index, **kwargs)
    assert res is ours[0]
    assert_within(ours[0], ref[0], delta, out.dtype)
    assert torch.equal(ours[1], keep[1]) and torch.equal(ours[3], keep[3])  # inputs untouched
    assert torch.equal(ours[2], ref[2]) and torch.equal(ours[4], ref[4])  # state copies exact
    return ours


AV_SHAPES = [  # B, H, M, N, d, K
    (1, 1, 8, 8, 4, 3),
    (2, 3, 11, 17, 8, 5),  # M != N, B > 1, H > 1
    (2, 2, 9, 9, 4, 0),  # K = 0
    (2, 2, 7, 7, 6, 7),  # K = N
    (1, 2, 300, 90, 16, 40),  # several row tiles per head
    (2, 2, 0, 5, 3, 2),  # M = 0: only v_ref changes
    (2, 2, 4, 5, 0, 2),  # d = 0: only a_ref changes
]


DTYPE_PAIRS = [(t, t) for t in FLOATS] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("shape", AV_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_matches_reference(shape, index_dtype, dtype, out_dtype):
    b, h, m, n, d, k = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    state = av_state(b, h, m, n, d, dtype, out_dtype, gen)
    check_av(*state, make_index(b, n, k, index_dtype, gen))


def test_av_delta_update_keeps_invariant_over_frames():
    """out == a_ref @ v_ref after every update (float32), over several frames of changing selections."""
    gen = torch.Generator().manual_seed(6)
    out, a_new, a_ref, v_new, v_ref = av_state(2, 2, 12, 10, 4, torch.float32, torch.float32, gen)
    for _ in range(5):
        a_new = torch.rand(a_new.shape, generator=gen).softmax(-1)
        v_new = torch.randn(v_new.shape, generator=gen)
        ops.av_delta_update_(out, a_new, a_ref, v_new, v_ref, make_index(2, 10, 4, torch.int64, gen))
        torch.testing.assert_close(out, a_ref @ v_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_av_delta_update_strided_inputs(dtype):
    """v from a qkv permute, a as transposed views, out from a [B, M, H, d] layout, non-contiguous index."""
    gen = torch.Generator().manual_seed(7)
    b, h, n, d = 2, 3, 14, 8
    qkv = randn((b, n, 3, h, d), dtype, gen).permute(2, 0, 3, 1, 4)
    v_new = qkv[2]
    v_ref = randn((b, h, n, d), dtype, gen)
    a_new = torch.rand((b, h, n, n), generator=gen).to(dtype).transpose(-1, -2)
    a_ref = torch.rand((b, h, n, n), generator=gen).to(dtype).transpose(-1, -2)
    index = make_index(b, n, 5, torch.int32, gen).t().contiguous().t()
    for out in (randn((b, n, h, d), dtype, gen).transpose(1, 2),  # unit stride along d, row stride h*d
                randn((b, h, d, n), torch.float32, gen).transpose(-1, -2)):  # float32, d not unit-stride
        check_av(out, a_new, a_ref, v_new, v_ref, index)
    # Broadcast (stride-0) read-only inputs.
    out = randn((b, h, n, d), dtype, gen)
    check_av(out, a_new[:, :1].expand(b, h, n, n), a_ref, v_new[:, :, :1].expand(b, h, n, d), v_ref, index)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), m=st.integers(1, 12), n=st.integers(1, 12), d=st.integers(1, 9),
    frac=st.floats(0, 1), dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES),
    float_out=st.booleans(), seed=st.integers(0, 2**16),
)
def test_av_delta_update_random_shapes(b, h, m, n, d, frac, dtype, index_dtype, float_out, seed):
    gen = torch.Generator().manual_seed(seed)
    state = av_state(b, h, m, n, d, dtype, torch.float32 if float_out else dtype, gen)
    check_av(*state, make_index(b, n, round(frac * n), index_dtype, gen))


def test_av_delta_update_opcheck():
    gen = torch.Generator().manual_seed(8)
    state = av_state(2, 2, 6, 5, 3, torch.float32, torch.float32, gen)
    torch.library.opcheck(torch.ops.eventful.av_delta_update_.default, (*state, make_index(2, 5, 2, torch.int64, gen)))


def av_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(9)
    out, a_new, a_ref, v_new, v_ref = av_state(2, 2, 6, 5, 3, dtype, dtype, gen)
    return dict(out=out, a_new=a_new, a_ref=a_ref, v_new=v_new, v_ref=v_ref,
                index=make_index(2, 5, 3, torch.int64, gen))


def _expand_heads(t):
    return t[:, :1].expand(t.shape)


AV_BAD = {
    "out_rank": (lambda a: {**a, "out": a["out"][0]}, RuntimeError, "'out'"),
    "a_new_rank": (lambda a: {**a, "a_new": a["a_new"][0]}, RuntimeError, "'a_new'"),
    "v_ref_rank": (lambda a: {**a, "v_ref": a["v_ref"][0]}, RuntimeError, "'v_ref'"),
    "a_new_int": (lambda a: {**a, "a_new": a["a_new"].int()}, RuntimeError, "'a_new'"),
    "a_ref_dtype": (lambda a: {**a, "a_ref": a["a_ref"].half()}, RuntimeError, "'a_ref'"),
    "v_new_dtype": (lambda a: {**a, "v_new": a["v_new"].double()}, RuntimeError, "'v_new'"),
    "v_ref_dtype": (lambda a: {**a, "v_ref": a["v_ref"].bfloat16()}, RuntimeError, "'v_ref'"),
    "out_half_inputs_float": (lambda a: {**a, "out": a["out"].half()}, RuntimeError, "'out'"),
    "a_new_batch": (lambda a: {**a, "a_new": a["a_new"][:1]}, RuntimeError, "'a_new'"),
    "a_new_heads": (lambda a: {**a, "a_new": a["a_new"][:, :1]}, RuntimeError, "'a_new'"),
    "a_new_rows": (lambda a: {**a, "a_new": a["a_new"][:, :, :5]}, RuntimeError, "'a_new'"),
    "a_ref_cols": (lambda a: {**a, "a_ref": a["a_ref"][..., :4]}, RuntimeError, "'a_ref'"),
    "v_new_rows": (lambda a: {**a, "v_new": a["v_new"][:, :, :4]}, RuntimeError, "'v_new'"),
    "v_new_dim": (lambda a: {**a, "v_new": a["v_new"][..., :2]}, RuntimeError, "'v_new'"),
    "v_ref_rows": (lambda a: {**a, "v_ref": a["v_ref"][:, :, :4]}, RuntimeError, "'v_ref'"),
    "index_float": (lambda a: {**a, "index": a["index"].float()}, RuntimeError, "'index'"),
    "index_rank": (lambda a: {**a, "index": a["index"][0]}, RuntimeError, "'index'"),
    "index_batch": (lambda a: {**a, "index": a["index"][:1]}, RuntimeError, "'index'"),
    "index_range": (lambda a: {**a, "index": a["index"] + 5 - a["index"].max()}, IndexError, "'index'"),
    "index_negative": (lambda a: {**a, "index": a["index"] - 1 - a["index"].max()}, IndexError, "'index'"),
    "index_dup": (lambda a: {**a, "index": _dup(a["index"])}, RuntimeError, "'index'"),
    "out_expanded": (lambda a: {**a, "out": _expand_heads(a["out"])}, RuntimeError, "'out'"),
    "a_ref_expanded": (lambda a: {**a, "a_ref": _expand_heads(a["a_ref"])}, RuntimeError, "'a_ref'"),
    "v_ref_expanded": (lambda a: {**a, "v_ref": _expand_heads(a["v_ref"])}, RuntimeError, "'v_ref'"),
    "a_ref_is_a_new": (lambda a: {**a, "a_ref": a["a_new"]}, RuntimeError, "'a_ref'.*'a_new'"),
    "v_ref_is_v_new": (lambda a: {**a, "v_ref": a["v_new"]}, RuntimeError, "'v_ref'.*'v_new'"),
    "index_minus_two": (lambda a: {**a, "index": torch.tensor([[-1, -1, -2], [0, 1, 2]])}, IndexError,
                        re.escape("eventful: argument 'index' holds -2 at [0, 2], out of range [0, 5)")),
    "index_n": (lambda a: {**a, "index": torch.tensor([[4, -1, 3], [-1, 5, -1]], dtype=torch.int32)}, IndexError,
                re.escape("eventful: argument 'index' holds 5 at [1, 1], out of range [0, 5)")),
    "index_dup_after_empty": (lambda a: {**a, "index": torch.tensor([[-1, 4, -1], [-1, 1, 1]])}, RuntimeError,
                              re.escape("eventful: argument 'index' repeats token id 1 in row 1 (ids must be "
                                        "distinct)")),
}


@pytest.mark.parametrize("case", sorted(AV_BAD))
def test_av_delta_update_bad_input(case):
    fix, exc, name = AV_BAD[case]
    args = fix(av_args())
    state = {key: args[key].clone() for key in ("out", "a_new", "a_ref", "v_new", "v_ref")}
    with pytest.raises(exc, match=name):
        ops.av_delta_update_(**args)
    for key, before in state.items():
        assert torch.equal(args[key], before), key


def test_av_delta_update_out_aliasing_v_new_rejected():
    args = av_args()
    args["v_new"] = args["out"][:, :, :5]  # [B,H,5,3] view into out
    before = args["out"].clone()
    with pytest.raises(RuntimeError, match="'out'.*'v_new'"):
        ops.av_delta_update_(**args)
    assert torch.equal(args["out"], before)


def test_ops_under_inference_mode():
    """Worker threads do not inherit inference mode; the kernels must still write inference tensors in place."""
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode():
        q, k = randn((2, 2, 70, 8), torch.float32, gen), randn((2, 2, 70, 8), torch.float32, gen)
        logits = randn((2, 2, 70, 70), torch.float32, gen)
        iq, ik = make_index(2, 70, 20, torch.int64, gen), make_index(2, 70, 30, torch.int64, gen)
        check_qk(logits, q, k, iq, ik, 0.5)
        check_av(*av_state(2, 2, 70, 70, 8, torch.float32, torch.float32, gen), ik)


# --------------------------------------------------------------------------------- empty slots and check_index

QK_EMPTY_SHAPES = [  # B, H, Nq, Nk, d, Kq, Kk, batch rows holding only -1 (in both indices)
    (1, 1, 8, 8, 4, 3, 3, ()),
    (3, 2, 17, 11, 8, 5, 4, (1,)),  # B > 1: per-row id counts differ
    (2, 2, 16, 16, 8, 0, 0, ()),  # K = 0
    (2, 2, 9, 7, 4, 9, 7, ()),  # K = N with some slots empty
    (2, 3, 6, 5, 4, 4, 3, (0, 1)),  # every slot empty
    (3, 2, 70, 300, 12, 40, 64, (2,)),  # several row/column tiles per head
    (3, 1, 45, 4100, 4, 30, 4100, (0,)),  # column pass: 16-row tiles, a different row count per batch row
    (3, 1, 200, 4100, 4, 150, 6, ()),  # row pass: several 63-row tiles, a different row count per batch row
]


def _qk_case(shape, dtype, index_dtype, salt, frac=0.4):
    b, h, nq, nk, d, kq, kk, empty_rows = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, index_dtype, salt)).encode()))
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    iq = with_empty_slots(make_index(b, nq, kq, index_dtype, gen), gen, frac, empty_rows)
    ik = with_empty_slots(make_index(b, nk, kk, index_dtype, gen), gen, frac, empty_rows)
    if b > 1 and kq > 1:
        iq[-1, :2] = -1  # repeated -1
        if 0 not in empty_rows:
            iq[0] = make_index(1, nq, kq, index_dtype, gen)[0]  # a row without empty slots
    return gen, logits, q, k, iq, ik, max(d, 1) ** -0.5


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", QK_EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_empty_slots(dtype, index_dtype, shape, check_index):
    _, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, index_dtype, "empty")
    check_qk(logits, q, k, iq, ik, scale, check_index=check_index)


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_empty_slots(dtype, check_index):
    gen = torch.Generator().manual_seed(31)
    shapes = [(3, 2, 20, 5, 7, 8, 6, 9, (1,)), (2, 1, 40, 64, 64, 4, 9, 4096, ())]  # as RELPOS_SHAPES, + empty rows
    for b, h, nq, gh, gw, d, kq, kk, empty_rows in shapes:
        nk = gh * gw
        q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
        rel_h, rel_w = randn((b, h, nq, gh), dtype, gen), randn((b, h, nq, gw), dtype, gen)
        iq = with_empty_slots(make_index(b, nq, kq, torch.int64, gen), gen, 0.4, empty_rows)
        ik = with_empty_slots(make_index(b, nk, kk, torch.int32, gen), gen, 0.4, empty_rows)
        if not check_index:
            iq, ik = out_of_range(iq, nq, gen, 0.2), out_of_range(ik, nk, gen, 0.2)
        check_qk_relpos(randn((b, h, nq, nk), dtype, gen), q, k, iq, ik, d**-0.5, rel_h, rel_w, check_index=check_index)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_unchecked_out_of_range_ids(dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) recompute nothing, like -1."""
    for shape in QK_EMPTY_SHAPES[:6]:
        gen, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, index_dtype, "oor", frac=0.0)
        iq, ik = out_of_range(iq, shape[2], gen), out_of_range(ik, shape[3], gen)
        check_qk(logits, q, k, iq, ik, scale, check_index=False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_unchecked_equals_checked(dtype):
    for shape in QK_EMPTY_SHAPES:
        _, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, torch.int64, "same")
        checked, unchecked = logits.clone(), logits.clone()
        ops.qk_update_(checked, q, k, iq, ik, scale)
        ops.qk_update_(unchecked, q, k, iq, ik, scale, check_index=False)
        assert torch.equal(checked, unchecked)


def test_qk_update_unchecked_duplicates():
    """check_index=False with repeated ids: no crash, and (every copy recomputing the same values) the result is
    the reference's for the distinct ids."""
    gen = torch.Generator().manual_seed(32)
    b, h, nq, nk, d = 2, 2, 40, 30, 8
    q, k = randn((b, h, nq, d), torch.float32, gen), randn((b, h, nk, d), torch.float32, gen)
    logits = randn((b, h, nq, nk), torch.float32, gen)
    iq = torch.tensor([[3, 3, 3, 7, -1, 39], [0, 39, 0, 5, 5, 5]])
    ik = torch.tensor([[29, 29, 0, 2, 2, -1], [4, 4, 4, 4, 4, 4]])
    ours = logits.clone()
    ops.qk_update_(ours, q, k, iq, ik, 0.5, check_index=False)
    def dedup(t):
        return torch.stack([torch.cat([r.unique(), r.new_full((t.shape[1] - len(r.unique()),), -1)]) for r in t])

    ref = reference.qk_update_(logits.clone(), q, k, dedup(iq), dedup(ik), 0.5)
    assert_within(ours, ref, qk_delta(q, k, 0.5), torch.float32)
    keep = untouched(logits, iq, ik)
    assert torch.equal(ours[keep], logits[keep])


def test_qk_update_unchecked_still_checks_metadata():
    cases = [c for c in sorted(QK_BAD) if not re.search("range|negative|dup|minus|_n_", c)]
    assert len(cases) >= 14
    for case in cases:
        fix, exc, name = QK_BAD[case]
        args = fix(qk_args())
        before = args["logits"].clone()
        with pytest.raises(exc, match=name):
            ops.qk_update_(**args, check_index=False)
        assert torch.equal(args["logits"], before), case
    for case in sorted(RELPOS_BAD):
        fix, name = RELPOS_BAD[case]
        args = fix(relpos_args())
        with pytest.raises((RuntimeError, ValueError), match=name):
            ops.qk_update_(**args, check_index=False)


def test_qk_update_opcheck_empty_slots():
    gen = torch.Generator().manual_seed(33)
    logits, q, k = (randn((2, 2, 9, 6), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
                    randn((2, 2, 6, 4), torch.float32, gen))
    rel = (randn((2, 2, 9, 2), torch.float32, gen), randn((2, 2, 9, 3), torch.float32, gen))
    iq, ik = torch.tensor([[3, -1, 0], [-1, -1, -1]]), torch.tensor([[-1, 5], [2, -1]], dtype=torch.int32)
    op = torch.ops.eventful.qk_update_.default
    for kwargs, (a, b) in (({}, (iq, ik)), ({"check_index": False}, (iq, ik)),
                           ({"check_index": False}, (torch.where(iq < 0, 9, iq), torch.where(ik < 0, -4, ik)))):
        torch.library.opcheck(op, (logits, q, k, a, b, 0.5), kwargs)
        torch.library.opcheck(op, (logits, q, k, a, b, 0.5, *rel), kwargs)


AV_EMPTY_SHAPES = [  # B, H, M, N, d, K, batch rows holding only -1
    (1, 1, 8, 8, 4, 3, ()),
    (3, 3, 11, 17, 8, 5, (1,)),  # B > 1: per-row id counts differ
    (2, 2, 9, 9, 4, 0, ()),  # K = 0
    (2, 2, 7, 7, 6, 7, ()),  # K = N with some slots empty
    (2, 2, 5, 6, 3, 4, (0, 1)),  # every slot empty
    (3, 2, 300, 90, 16, 40, (0,)),  # several row tiles per head
    (2, 2, 0, 5, 3, 2, ()),  # M = 0: only v_ref changes
]


def _av_case(shape, dtype, out_dtype, index_dtype, salt, frac=0.4):
    b, h, m, n, d, k, empty_rows = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, out_dtype, index_dtype, salt)).encode()))
    state = av_state(b, h, m, n, d, dtype, out_dtype, gen)
    index = with_empty_slots(make_index(b, n, k, index_dtype, gen), gen, frac, empty_rows)
    if b > 1 and k > 1:
        index[-1, :2] = -1  # repeated -1
    return gen, state, index


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", AV_EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_empty_slots(dtype, out_dtype, index_dtype, shape, check_index):
    _, state, index = _av_case(shape, dtype, out_dtype, index_dtype, "empty")
    check_av(*state, index, check_index=check_index)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_unchecked_out_of_range_ids(dtype, out_dtype, index_dtype):
    """check_index=False: ids outside [0, N) add nothing and refresh nothing, like -1."""
    for shape in AV_EMPTY_SHAPES:
        gen, state, index = _av_case(shape, dtype, out_dtype, index_dtype, "oor", frac=0.0)
        check_av(*state, out_of_range(index, shape[3], gen), check_index=False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_av_delta_update_unchecked_equals_checked(dtype):
    for shape in AV_EMPTY_SHAPES:
        _, state, index = _av_case(shape, dtype, dtype, torch.int64, "same")
        checked, unchecked = [t.clone() for t in state], [t.clone() for t in state]
        ops.av_delta_update_(*checked, index)
        ops.av_delta_update_(*unchecked, index, check_index=False)
        assert all(torch.equal(x, y) for x, y in zip(checked, unchecked))


def test_av_delta_update_empty_slots_keep_invariant_over_frames():
    """out == a_ref @ v_ref after every update, with -1 padded selections of varying size per batch row."""
    gen = torch.Generator().manual_seed(34)
    out, a_new, a_ref, v_new, v_ref = av_state(3, 2, 12, 10, 4, torch.float32, torch.float32, gen)
    for frame in range(5):
        a_new = torch.rand(a_new.shape, generator=gen).softmax(-1)
        v_new = torch.randn(v_new.shape, generator=gen)
        index = with_empty_slots(make_index(3, 10, 6, torch.int64, gen), gen, 0.5, (frame % 3,))
        ops.av_delta_update_(out, a_new, a_ref, v_new, v_ref, index, check_index=frame % 2 == 0)
        torch.testing.assert_close(out, a_ref @ v_ref, rtol=1e-5, atol=1e-5)


def test_av_delta_update_unchecked_duplicates():
    """check_index=False with repeated ids: no crash; the state copies get the (single) new value and nothing else
    changes. out is unspecified at the rows of a repeated id."""
    gen = torch.Generator().manual_seed(35)
    state = av_state(2, 2, 6, 8, 3, torch.float32, torch.float32, gen)
    index = torch.tensor([[1, 1, 5, -1], [7, 7, 7, 7]])
    ours = [t.clone() for t in state]
    ops.av_delta_update_(*ours, index, check_index=False)
    want = [t.clone() for t in state]
    reference.av_delta_update_(*want, torch.tensor([[1, 5, -1, -1], [7, -1, -1, -1]]))
    assert torch.equal(ours[2], want[2]) and torch.equal(ours[4], want[4])
    assert torch.equal(ours[1], state[1]) and torch.equal(ours[3], state[3])
    assert bool(ours[0].isfinite().all())


def test_av_delta_update_unchecked_still_checks_metadata():
    cases = [c for c in sorted(AV_BAD) if not re.search("range|negative|dup|minus|index_n", c)]
    assert len(cases) >= 20
    for case in cases:
        fix, exc, name = AV_BAD[case]
        args = fix(av_args())
        state = {key: args[key].clone() for key in ("out", "a_new", "a_ref", "v_new", "v_ref")}
        with pytest.raises(exc, match=name):
            ops.av_delta_update_(**args, check_index=False)
        for key, before in state.items():
            assert torch.equal(args[key], before), (case, key)


def test_av_delta_update_opcheck_empty_slots():
    gen = torch.Generator().manual_seed(36)
    state = av_state(2, 2, 6, 5, 3, torch.float32, torch.float32, gen)
    op = torch.ops.eventful.av_delta_update_.default
    index = torch.tensor([[4, -1, -1], [-1, -1, -1]])
    torch.library.opcheck(op, (*state, index))
    torch.library.opcheck(op, (*state, index), {"check_index": False})
    unchecked = torch.tensor([[4, 5, -3], [12, 0, 1]], dtype=torch.int32)
    torch.library.opcheck(op, (*state, unchecked), {"check_index": False})


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), m=st.integers(1, 12), n=st.integers(1, 12), d=st.integers(1, 9),
    fq=st.floats(0, 1), fk=st.floats(0, 1), empty=st.floats(0, 1), check_index=st.booleans(),
    dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_random_empty_slots(b, h, m, n, d, fq, fk, empty, check_index, dtype, index_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pad = (lambda t, size: with_empty_slots(t, gen, empty)) if check_index else (
        lambda t, size: out_of_range(t, size, gen, empty))
    q, k = randn((b, h, m, d), dtype, gen), randn((b, h, n, d), dtype, gen)
    iq = pad(make_index(b, m, round(fq * m), index_dtype, gen), m)
    ik = pad(make_index(b, n, round(fk * n), index_dtype, gen), n)
    check_qk(randn((b, h, m, n), dtype, gen), q, k, iq, ik, 1.0 / (d + 1), check_index=check_index)
    state = av_state(b, h, m, n, d, dtype, dtype, gen)
    check_av(*state, ik, check_index=check_index)
