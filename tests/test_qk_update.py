"""qk_update_ (family ``qk_update``) on every backend (tests/op_support.py) against eventful_kernels.reference.

Tolerances. The op accumulates in float32; the kernels and the reference differ only in summation order (BLAS or
tl.dot tiling). For a float32 sum of n terms each result is within gamma_n * sum|terms| of the exact value
(gamma_n ~ n * eps32), so two float32 results differ by at most delta = 2 * n * eps32 * sum|terms|, computed
elementwise from |q| @ |k|^T. A float16/bfloat16 output then rounds each float32 result once, so the outputs may
differ by delta plus one ulp of the output dtype. Everything the op must not touch is compared exactly.

Index entries -1 are empty slots (nothing recomputed there); with check_index=False every id outside [0, N) is one.
"""
import re
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from eventful_kernels import reference
from eventful_kernels import reference as R

from op_support import (EPS32, FLOATS, INDEX_DTYPES, MATMUL_TOL, assert_same_guards, assert_within,
                        clone_layout, gen, guarded, index_with_empty, make_index, opcheck, out_of_range, over, randn,
                        run_bad_case, skip_meta_on_dispatcher, strided, strided_index, valid_ids, with_empty_slots)


def _dup(index):
    index = index.clone()
    index[1, 1] = index[1, 0]
    return index


def qk_delta(q, k, scale):
    """Elementwise bound on the float32 summation-order difference of q @ k^T * scale."""
    d = q.shape[-1]
    return 2 * d * EPS32 * abs(scale) * (q.float().abs() @ k.float().abs().transpose(-1, -2))


def check_qk(impl, logits, q, k, iq, ik, scale, **kwargs):
    """Run the op on a same-layout copy of `logits` and compare with the reference."""
    ours = clone_layout(logits)
    assert ours.stride() == logits.stride()
    ref = reference.qk_update_(logits.clone(), q, k, iq, ik, scale)
    out = impl.qk_update_(ours, q, k, iq, ik, scale, **kwargs)
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


@over()
@pytest.mark.parametrize("shape", QK_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_matches_reference(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    b, h, nq, nk, d, kq, kk = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    iq, ik = make_index(b, nq, kq, index_dtype, gen), make_index(b, nk, kk, index_dtype, gen)
    check_qk(impl, logits, q, k, iq, ik, max(d, 1) ** -0.5)


@over()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_update_float32_logits_from_half_inputs(impl, dtype):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(1)
    q, k = randn((2, 2, 12, 8), dtype, gen), randn((2, 2, 10, 8), dtype, gen)
    logits = randn((2, 2, 12, 10), torch.float32, gen)
    check_qk(impl, logits, q, k, make_index(2, 12, 4, torch.int64, gen), make_index(2, 10, 3, torch.int32, gen), 0.3)


@over()
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_strided_inputs(impl, dtype):
    """q, k from a [B, N, 3, H, d] qkv permute, logits a transposed view, non-contiguous index."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(2)
    b, n, h, d = 2, 20, 3, 8
    qkv = randn((b, n, 3, h, d), dtype, gen).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    q, k = qkv[0], qkv[1]
    assert not q.is_contiguous()
    logits_t = randn((b, h, n, n), dtype, gen).transpose(-1, -2)  # unit stride along rows, not columns
    iq = make_index(b, n, 6, torch.int64, gen).t().contiguous().t()
    ik = make_index(b, n, 5, torch.int32, gen).t().contiguous().t()
    assert not iq.is_contiguous()
    check_qk(impl, logits_t, q, k, iq, ik, 0.25)
    # Logits rows padded in a wider buffer (row stride > Nk), head-dim-strided q.
    wide = randn((b, h, n, n + 7), dtype, gen)[..., :n]
    q_strided = randn((b, h, n, 2 * d), dtype, gen)[..., ::2]
    check_qk(impl, wide, q_strided, k, iq, ik, 0.25)
    # Broadcast (stride-0) read-only inputs.
    check_qk(impl, wide, q[:, :1].expand(b, h, n, d), k[:, :, :1].expand(b, h, n, d), iq, ik, 0.25)


@over()
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 12), nk=st.integers(1, 12), d=st.integers(1, 9),
    fq=st.floats(0, 1), fk=st.floats(0, 1), dtype=st.sampled_from(FLOATS),
    index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_qk_update_random_shapes(impl, b, h, nq, nk, d, fq, fk, dtype, index_dtype, seed):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed)
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    iq = make_index(b, nq, round(fq * nq), index_dtype, gen)
    ik = make_index(b, nk, round(fk * nk), index_dtype, gen)
    check_qk(impl, logits, q, k, iq, ik, 1.0 / (d + 1))


@over("cpu", "cuda")
def test_qk_update_opcheck(impl):
    gen = torch.Generator().manual_seed(3)
    args = (randn((2, 2, 9, 7), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
            randn((2, 2, 7, 4), torch.float32, gen), make_index(2, 9, 3, torch.int64, gen),
            make_index(2, 7, 2, torch.int32, gen), 0.5)
    opcheck(impl, torch.ops.eventful.qk_update_.default, args)


def qk_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    return dict(logits=randn((2, 2, 6, 5), dtype, gen), q=randn((2, 2, 6, 4), dtype, gen),
                k=randn((2, 2, 5, 4), dtype, gen), index_q=make_index(2, 6, 3, torch.int64, gen),
                index_k=make_index(2, 5, 2, torch.int64, gen), scale=0.5)


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


@over()
@pytest.mark.parametrize("case", sorted(QK_BAD))
def test_qk_update_bad_input(impl, case):
    fix, exc, name = QK_BAD[case]
    args = fix(qk_args())
    before = args["logits"].clone()
    with pytest.raises(exc, match=name):
        impl.qk_update_(**args)
    assert torch.equal(args["logits"], before)


@over()
def test_qk_update_logits_aliasing_q_rejected(impl):
    gen = torch.Generator().manual_seed(5)
    logits = randn((1, 2, 4, 4), torch.float32, gen)
    before = logits.clone()
    with pytest.raises(RuntimeError, match="'logits'.*'q'"):
        impl.qk_update_(logits, logits, randn((1, 2, 4, 4), torch.float32, gen),
                       torch.tensor([[1]]), torch.tensor([[2]]), 1.0)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------------------------- qk_update_ with rel-pos

def check_qk_relpos(impl, logits, q, k, iq, ik, scale, rel_h, rel_w, **kwargs):
    """As check_qk, with the decomposed rel-pos bias. The bias is added to the float32 accumulator in both; besides
    the summation-order bound, the two float32 additions may round differently (2 * eps32 * (|qk| + |bias|))."""
    ours = clone_layout(logits)
    ref = reference.qk_update_(logits.clone(), q, k, iq, ik, scale, rel_h, rel_w)
    assert impl.qk_update_(ours, q, k, iq, ik, scale, rel_h, rel_w, **kwargs) is ours
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


@over()
@pytest.mark.parametrize("shape", RELPOS_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_matches_reference(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    b, h, nq, gh, gw, d, kq, kk = shape
    nk = gh * gw
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, "relpos")).encode()))
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, nk, d), dtype, gen)
    logits = randn((b, h, nq, nk), dtype, gen)
    rel_h, rel_w = randn((b, h, nq, gh), dtype, gen), randn((b, h, nq, gw), dtype, gen)
    iq, ik = make_index(b, nq, kq, index_dtype, gen), make_index(b, nk, kk, index_dtype, gen)
    check_qk_relpos(impl, logits, q, k, iq, ik, d**-0.5, rel_h, rel_w)


@over()
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_strided(impl, dtype):
    """rel_h a transposed view (unit stride along rows), rel_w a slice of a wider buffer, float32 logits."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(11)
    b, h, nq, gh, gw, d = 2, 2, 15, 3, 5, 8
    q, k = randn((b, h, nq, d), dtype, gen), randn((b, h, gh * gw, d), dtype, gen)
    rel_h = randn((b, h, gh, nq), dtype, gen).transpose(-1, -2)
    rel_w = randn((b, h, nq, gw + 3), dtype, gen)[..., 1 : gw + 1]
    assert not rel_h.is_contiguous() and not rel_w.is_contiguous()
    iq, ik = make_index(b, nq, 4, torch.int64, gen), make_index(b, gh * gw, 6, torch.int32, gen)
    check_qk_relpos(impl, randn((b, h, nq, gh * gw), torch.float32, gen), q, k, iq, ik, 0.3, rel_h, rel_w)


@over("cpu", "cuda")
def test_qk_update_relpos_opcheck(impl):
    gen = torch.Generator().manual_seed(12)
    args = (randn((2, 2, 9, 6), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
            randn((2, 2, 6, 4), torch.float32, gen), make_index(2, 9, 3, torch.int64, gen),
            make_index(2, 6, 2, torch.int32, gen), 0.5, randn((2, 2, 9, 2), torch.float32, gen),
            randn((2, 2, 9, 3), torch.float32, gen))
    opcheck(impl, torch.ops.eventful.qk_update_.default, args)


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


@over()
@pytest.mark.parametrize("case", sorted(RELPOS_BAD))
def test_qk_update_relpos_bad_input(impl, case):
    fix, name = RELPOS_BAD[case]
    args = fix(relpos_args())
    before = args["logits"].clone()
    with pytest.raises((RuntimeError, ValueError), match=name):
        impl.qk_update_(**args)
    assert torch.equal(args["logits"], before)


@over()
def test_ops_under_inference_mode(impl):
    """Worker threads do not inherit inference mode; the kernels must still write inference tensors in place."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode():
        q, k = randn((2, 2, 70, 8), torch.float32, gen), randn((2, 2, 70, 8), torch.float32, gen)
        logits = randn((2, 2, 70, 70), torch.float32, gen)
        iq, ik = make_index(2, 70, 20, torch.int64, gen), make_index(2, 70, 30, torch.int64, gen)
        check_qk(impl, logits, q, k, iq, ik, 0.5)


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


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", QK_EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_empty_slots(impl, dtype, index_dtype, shape, check_index):
    impl.skip_unless_fast()
    _, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, index_dtype, "empty")
    check_qk(impl, logits, q, k, iq, ik, scale, check_index=check_index)


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_relpos_empty_slots(impl, dtype, check_index):
    impl.skip_unless_fast()
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
        check_qk_relpos(impl, randn((b, h, nq, nk), dtype, gen), q, k, iq, ik, d**-0.5, rel_h, rel_w,
                        check_index=check_index)


@over()
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_unchecked_out_of_range_ids(impl, dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) recompute nothing, like -1."""
    impl.skip_unless_fast()
    for shape in QK_EMPTY_SHAPES[:6]:
        gen, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, index_dtype, "oor", frac=0.0)
        iq, ik = out_of_range(iq, shape[2], gen), out_of_range(ik, shape[3], gen)
        check_qk(impl, logits, q, k, iq, ik, scale, check_index=False)


@over()
@pytest.mark.parametrize("dtype", FLOATS)
def test_qk_update_unchecked_equals_checked(impl, dtype):
    impl.skip_unless_fast()
    for shape in QK_EMPTY_SHAPES:
        _, logits, q, k, iq, ik, scale = _qk_case(shape, dtype, torch.int64, "same")
        checked, unchecked = logits.clone(), logits.clone()
        impl.qk_update_(checked, q, k, iq, ik, scale)
        impl.qk_update_(unchecked, q, k, iq, ik, scale, check_index=False)
        assert torch.equal(checked, unchecked)


@over()
def test_qk_update_unchecked_duplicates(impl):
    """check_index=False with repeated ids: no crash, and (every copy recomputing the same values) the result is
    the reference's for the distinct ids."""
    gen = torch.Generator().manual_seed(32)
    b, h, nq, nk, d = 2, 2, 40, 30, 8
    q, k = randn((b, h, nq, d), torch.float32, gen), randn((b, h, nk, d), torch.float32, gen)
    logits = randn((b, h, nq, nk), torch.float32, gen)
    iq = torch.tensor([[3, 3, 3, 7, -1, 39], [0, 39, 0, 5, 5, 5]])
    ik = torch.tensor([[29, 29, 0, 2, 2, -1], [4, 4, 4, 4, 4, 4]])
    ours = logits.clone()
    impl.qk_update_(ours, q, k, iq, ik, 0.5, check_index=False)
    def dedup(t):
        return torch.stack([torch.cat([r.unique(), r.new_full((t.shape[1] - len(r.unique()),), -1)]) for r in t])

    ref = reference.qk_update_(logits.clone(), q, k, dedup(iq), dedup(ik), 0.5)
    assert_within(ours, ref, qk_delta(q, k, 0.5), torch.float32)
    keep = untouched(logits, iq, ik)
    assert torch.equal(ours[keep], logits[keep])


@over()
def test_qk_update_unchecked_still_checks_metadata(impl):
    cases = [c for c in sorted(QK_BAD) if not re.search("range|negative|dup|minus|_n_", c)]
    assert len(cases) >= 14
    for case in cases:
        fix, exc, name = QK_BAD[case]
        args = fix(qk_args())
        before = args["logits"].clone()
        with pytest.raises(exc, match=name):
            impl.qk_update_(**args, check_index=False)
        assert torch.equal(args["logits"], before), case
    for case in sorted(RELPOS_BAD):
        fix, name = RELPOS_BAD[case]
        args = fix(relpos_args())
        with pytest.raises((RuntimeError, ValueError), match=name):
            impl.qk_update_(**args, check_index=False)


@over("cpu", "cuda")
def test_qk_update_opcheck_empty_slots(impl):
    gen = torch.Generator().manual_seed(33)
    logits, q, k = (randn((2, 2, 9, 6), torch.float32, gen), randn((2, 2, 9, 4), torch.float32, gen),
                    randn((2, 2, 6, 4), torch.float32, gen))
    rel = (randn((2, 2, 9, 2), torch.float32, gen), randn((2, 2, 9, 3), torch.float32, gen))
    iq, ik = torch.tensor([[3, -1, 0], [-1, -1, -1]]), torch.tensor([[-1, 5], [2, -1]], dtype=torch.int32)
    op = torch.ops.eventful.qk_update_.default
    for kwargs, (a, b) in (({}, (iq, ik)), ({"check_index": False}, (iq, ik)),
                           ({"check_index": False}, (torch.where(iq < 0, 9, iq), torch.where(ik < 0, -4, ik)))):
        opcheck(impl, op, (logits, q, k, a, b, 0.5), kwargs)
        opcheck(impl, op, (logits, q, k, a, b, 0.5, *rel), kwargs)


@over()
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), m=st.integers(1, 12), n=st.integers(1, 12), d=st.integers(1, 9),
    fq=st.floats(0, 1), fk=st.floats(0, 1), empty=st.floats(0, 1), check_index=st.booleans(),
    dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_random_empty_slots(impl, b, h, m, n, d, fq, fk, empty, check_index, dtype, index_dtype, seed):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed)
    pad = (lambda t, size: with_empty_slots(t, gen, empty)) if check_index else (
        lambda t, size: out_of_range(t, size, gen, empty))
    q, k = randn((b, h, m, d), dtype, gen), randn((b, h, n, d), dtype, gen)
    iq = pad(make_index(b, m, round(fq * m), index_dtype, gen), m)
    ik = pad(make_index(b, n, round(fk * n), index_dtype, gen), n)
    check_qk(impl, randn((b, h, m, n), dtype, gen), q, k, iq, ik, 1.0 / (d + 1), check_index=check_index)


# ---------------------------------------------------------------- rank 3 and 4, layouts, logits dtype: every backend

def _assert_untouched(logits, want, iq, ik):
    """Entries outside rows iq and columns ik (empty slots and other ids out of range excluded) are bit-identical."""
    mask = torch.ones_like(want, dtype=torch.bool)
    nq, nk = want.shape[-2:]
    for bi in range(want.size(0)):
        mask[bi, ..., valid_ids(iq[bi], nq), :] = False
        mask[bi, ..., valid_ids(ik[bi], nk)] = False
    assert torch.equal(logits[mask], want[mask])


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update_ranks_and_layouts(impl, dtype, idt):
    g = gen(6)
    cases = [((2, 2, 13, 17, 24), "contig", dtype), ((1, 3, 40, 35, 136), "step", dtype),
             ((2, 0, 9, 11, 16), "contig", dtype), ((2, None, 10, 12, 32), "colmajor", torch.float32)]
    for (b, h, nq, nk, d), layout, ldt in cases:
        lead = (b,) if h is None else (b, h)  # h None: rank-3 tensors (one head)
        for kq, kk in ((0, 0), (3, 5), (nq, 0), (0, nk), (nq, nk), (1, 2)):
            q = strided(randn((*lead, nq, d), dtype, g), layout)
            kt = strided(randn((*lead, nk, d), dtype, g), layout)
            logits = strided(randn((*lead, nq, nk), ldt, g), layout)  # logits may be float32 for 16-bit q, k
            want = logits.clone()
            iq = make_index(b, nq, kq, idt, g)
            iq = strided_index(iq) if layout == "step" else iq
            ik = make_index(b, nk, kk, idt, g)
            impl.qk_update_(logits, q, kt, iq, ik, 0.37)
            R.qk_update_(want, q, kt, iq, ik, 0.37)
            torch.testing.assert_close(logits, want, **MATMUL_TOL[ldt])
            _assert_untouched(logits, want, iq, ik)


def _rel_view(shape, dtype, g, how):
    """A rel-pos table [..., Nq, G] as a contiguous tensor or a strided view: 'transposed' (a [..., G, Nq] tensor
    transposed), 'step' (every other column), 'sliced' (an interior window of a bigger buffer)."""
    if how == "transposed":
        return randn((*shape[:-2], shape[-1], shape[-2]), dtype, g).transpose(-1, -2)
    if how == "sliced":
        big = randn([n + 3 for n in shape], dtype, g)
        return big[tuple(slice(1, 1 + n) for n in shape[:-2]) + (slice(2, 2 + shape[-2]), slice(1, 1 + shape[-1]))]
    return strided(randn(shape, dtype, g), how)


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update_relpos_ranks_and_layouts(impl, dtype, idt):
    """The decomposed rel-pos bias (rel_h [..,Nq,Gh], rel_w [..,Nq,Gw], Gh*Gw = Nk, Gh != Gw), rank 3 and 4."""
    g = gen(14)
    cases = [((2, 2, 9, (3, 4), 16), "contig", "contig", "contig", dtype),
             ((1, 2, 10, (5, 7), 24), "step", "transposed", "sliced", dtype),
             ((2, None, 8, (4, 3), 16), "contig", "sliced", "step", dtype),
             ((2, None, 7, (1, 5), 16), "colmajor", "step", "transposed", torch.float32),
             ((2, 0, 5, (2, 3), 16), "contig", "contig", "contig", dtype)]
    for (b, h, nq, (gh, gw), d), layout, lh, lw, ldt in cases:
        nk = gh * gw
        lead = (b,) if h is None else (b, h)
        for kq, kk in ((0, 0), (3, 5), (nq, 0), (0, nk), (nq, nk), (1, 2)):
            q = strided(randn((*lead, nq, d), dtype, g), layout)
            kt = strided(randn((*lead, nk, d), dtype, g), layout)
            rel_h, rel_w = _rel_view((*lead, nq, gh), dtype, g, lh), _rel_view((*lead, nq, gw), dtype, g, lw)
            logits = strided(randn((*lead, nq, nk), ldt, g), layout)
            want = logits.clone()
            iq = make_index(b, nq, kq, idt, g)
            iq = strided_index(iq) if layout == "step" else iq
            ik = make_index(b, nk, kk, idt, g)
            impl.qk_update_(logits, q, kt, iq, ik, 0.37, rel_h, rel_w)
            R.qk_update_(want, q, kt, iq, ik, 0.37, rel_h, rel_w)
            torch.testing.assert_close(logits, want, **MATMUL_TOL[ldt])
            _assert_untouched(logits, want, iq, ik)
            if kq == nq and kk == 0 and logits.numel() > 0:  # the bias really is added (not a no-op)
                plain = logits.clone()
                impl.qk_update_(plain, q, kt, iq, ik, 0.37)
                assert not torch.equal(plain, logits)


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update_empty_slots_layouts(impl, dtype, idt):
    g = gen(22)
    for (b, h, nq, nk, d), layout in [((3, 2, 9, 11, 16), "contig"), ((2, None, 10, 7, 24), "step")]:
        lead = (b,) if h is None else (b, h)
        for kq, kk in ((0, 4), (4, 0), (nq, nk + 2), (3, 5)):
            q = strided(randn((*lead, nq, d), dtype, g), layout)
            kt = strided(randn((*lead, nk, d), dtype, g), layout)
            logits0 = strided(randn((*lead, nq, nk), dtype, g), layout)
            iq = index_with_empty(b, kq, nq, idt, g, strided=layout == "step")
            ik = index_with_empty(b, kk, nk, idt, g)
            want = R.qk_update_(logits0.clone(), q, kt, iq, ik, 0.37)
            for check_index in (True, False):
                logits = logits0.clone()
                impl.qk_update_(logits, q, kt, iq, ik, 0.37, check_index=check_index)
                torch.testing.assert_close(logits, want, **MATMUL_TOL[dtype])
                _assert_untouched(logits, want, iq, ik)


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update_unchecked_out_of_range_writes_nothing_outside(impl, dtype, idt):
    g = gen(23)
    B, H, N, D = 2, 2, 9, 24
    q, _ = guarded((B, H, N, D), dtype, g)
    kt, _ = guarded((B, H, N + 2, D), dtype, g)
    logits, buf = guarded((B, H, N, N + 2), dtype, g)
    iq = index_with_empty(B, 5, N, idt, g, bad=(N, 2 * N + 3, -5, -1))
    ik = index_with_empty(B, 5, N + 2, idt, g, bad=(N + 2, 2 * N + 7, -5, -1))
    buf_want = buf.clone()
    inner = (slice(1, -1),) * 4
    R.qk_update_(buf_want[inner], q, kt, iq, ik, 0.37)
    impl.qk_update_(logits, q, kt, iq, ik, 0.37, check_index=False)
    torch.testing.assert_close(buf, buf_want, **MATMUL_TOL[dtype])
    assert_same_guards(buf, buf_want)
    _assert_untouched(logits, buf_want[inner], iq, ik)


# ---------------------------------------------------------------- bad input with exact messages: every backend

def _attn_state():
    g = gen(10)
    f32 = torch.float32
    return {"logits": randn((2, 2, 6, 6), f32, g), "q": randn((2, 2, 6, 16), f32, g),
            "k": randn((2, 2, 6, 16), f32, g), "rel_h": randn((2, 2, 6, 2), f32, g),
            "rel_w": randn((2, 2, 6, 3), f32, g)}


_OK = torch.tensor([[1, 4], [0, 5]])
_OOB = torch.tensor([[1, 4], [0, 6]])
_NEG = torch.tensor([[-1, 4], [0, -2]])


def _qk(iq, ik, **over_):
    def call(impl, s):
        a = {**{k: s[k] for k in ("logits", "q", "k")}, **over_}
        a = {k: (s[v] if isinstance(v, str) else v(s)) if k in over_ else v for k, v in a.items()}
        return impl.qk_update_(a["logits"], a["q"], a["k"], iq, ik, 0.5, a.get("rel_h"), a.get("rel_w"))
    return call


def _qkr(**over_):  # with the rel-pos bias (Nk = 6 = Gh 2 x Gw 3), valid indices
    return _qk(_OK, _OK, **{"rel_h": lambda s: s["rel_h"], "rel_w": lambda s: s["rel_w"], **over_})


BAD = [  # (id, call(impl, state), exception, message fragment)
    ("oob q", _qk(_OOB, _OK), IndexError, "'index_q' holds 6"),
    ("oob k", _qk(_OK, _NEG), IndexError, "'index_k' holds -2 at [1, 1]"),
    ("both oob", _qk(_OOB, _NEG), IndexError, "'index_q' holds 6"),
    ("dup q", _qk(torch.tensor([[1, 1], [0, 2]]), _OK), RuntimeError, "'index_q' repeats token id 1 in row 0"),
    ("head dim", _qk(_OK, _OK, k=lambda s: s["k"][..., :8]), RuntimeError,
     "'k' has size 8 at dim 3 but the head dim of 'q' is 16"),
    ("k dtype", _qk(_OK, _OK, k=lambda s: s["k"].half()), RuntimeError, "'k' has dtype Half but 'q'"),
    ("rank", _qk(_OK, _OK, q=lambda s: s["q"][:, 0]), RuntimeError, "'q' must have the rank of 'logits'"),
    ("heads", _qk(_OK, _OK, q=lambda s: s["q"][:, :1]), RuntimeError, "'q' has size 1 at dim 1"),
    ("logits overlap", _qk(_OK, _OK, logits=lambda s: s["logits"][:, :, :1].expand(2, 2, 6, 6)), RuntimeError,
     "'logits' is written in place"),
    ("rel_h without rel_w", _qkr(rel_w=lambda s: None), ValueError,
     "arguments 'rel_h' and 'rel_w' must be given together (got only 'rel_h')"),
    ("rel_w without rel_h", _qkr(rel_h=lambda s: None), ValueError, "must be given together (got only 'rel_w')"),
    ("rel_h rank", _qkr(rel_h=lambda s: s["rel_h"][:, 0]), RuntimeError, "'rel_h' must have the rank of 'logits' (4)"),
    ("rel_w dtype", _qkr(rel_w=lambda s: s["rel_w"].double()), RuntimeError,
     "'rel_w' has dtype Double but 'q' has dtype Float"),
    ("rel_h batch", _qkr(rel_h=lambda s: s["rel_h"][:1]), RuntimeError,
     "'rel_h' has size 1 at dim 0 but the batch size of 'logits' is 2"),
    ("rel_w heads", _qkr(rel_w=lambda s: s["rel_w"][:, :1]), RuntimeError,
     "'rel_w' has size 1 at dim 1 but the head count of 'logits' is 2"),
    ("rel_h rows", _qkr(rel_h=lambda s: s["rel_h"][:, :, :5]), RuntimeError,
     "'rel_h' has size 5 at dim 2 but the row count Nq of 'logits' is 6"),
    ("rel Gh*Gw", _qkr(rel_w=lambda s: s["rel_w"][..., :2]), RuntimeError, "must satisfy Gh*Gw = Nk = 6"),
    ("rel_h device", _qkr(rel_h=lambda s: s["rel_h"].to("meta")), RuntimeError, "'rel_h' is on meta"),
    ("rel before index values", _qk(_OOB, _OK, rel_h=lambda s: s["rel_h"], rel_w=lambda s: s["rel_w"][..., :1]),
     RuntimeError, "Gh*Gw = Nk"),
    ("logits None", _qk(_OK, _OK, logits=lambda s: None), TypeError, "'logits' must be a Tensor, got None"),
]


@over()
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exact_messages(impl, case):
    name, call, exc, fragment = case
    skip_meta_on_dispatcher(impl, name)
    run_bad_case(impl, _attn_state, call, exc, fragment)
