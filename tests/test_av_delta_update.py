"""av_delta_update_ (family ``av_delta_update``) on every backend (tests/op_support.py) against
eventful_kernels.reference.

Tolerances. The op accumulates in float32; the kernels and the reference differ only in summation order (BLAS or
tl.dot tiling). For a float32 sum of n terms each result is within gamma_n * sum|terms| of the exact value
(gamma_n ~ n * eps32), so two float32 results differ by at most delta = 2 * n * eps32 * sum|terms|, computed
elementwise from |a| @ |v|. A float16/bfloat16 output then rounds each float32 result once, so the outputs may
differ by delta plus one ulp of the output dtype. Everything the op must not touch is compared exactly, and the
state copies (a_ref, v_ref) are exact.

Index entries -1 are empty slots (nothing added or refreshed there); with check_index=False every id outside [0, N)
is one.
"""
import re
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from eventful_kernels import reference
from eventful_kernels import reference as R

from op_support import (EPS32, FLOATS, INDEX_DTYPES, MATMUL_TOL, assert_same, assert_same_guards, assert_within,
                        clone_layout, gen, guarded, index_with_empty, make_index, opcheck, out_of_range, over, randn,
                        run_bad_case, skip_meta_on_dispatcher, strided, strided_index, valid_ids, with_empty_slots)


def _dup(index):
    index = index.clone()
    index[1, 1] = index[1, 0]
    return index


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


def check_av(impl, out, a_new, a_ref, v_new, v_ref, index, **kwargs):
    delta = av_delta(out, a_new, a_ref, v_new, v_ref, index)
    ref = [t.clone() for t in (out, a_new, a_ref, v_new, v_ref)]
    reference.av_delta_update_(*ref, index)
    keep = [t.clone() for t in (out, a_new, a_ref, v_new, v_ref)]
    ours = [clone_layout(out), a_new, clone_layout(a_ref), v_new, clone_layout(v_ref)]
    assert ours[0].stride() == out.stride() and ours[2].stride() == a_ref.stride()
    res = impl.av_delta_update_(*ours, index, **kwargs)
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


@over()
@pytest.mark.parametrize("shape", AV_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_matches_reference(impl, shape, index_dtype, dtype, out_dtype):
    impl.skip_unless_fast()
    b, h, m, n, d, k = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    state = av_state(b, h, m, n, d, dtype, out_dtype, gen)
    check_av(impl, *state, make_index(b, n, k, index_dtype, gen))


@over()
def test_av_delta_update_keeps_invariant_over_frames(impl):
    """out == a_ref @ v_ref after every update (float32), over several frames of changing selections."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(6)
    out, a_new, a_ref, v_new, v_ref = av_state(2, 2, 12, 10, 4, torch.float32, torch.float32, gen)
    for _ in range(5):
        a_new = torch.rand(a_new.shape, generator=gen).softmax(-1)
        v_new = torch.randn(v_new.shape, generator=gen)
        impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, make_index(2, 10, 4, torch.int64, gen))
        torch.testing.assert_close(out, a_ref @ v_ref, rtol=1e-5, atol=1e-5)


@over()
@pytest.mark.parametrize("dtype", FLOATS)
def test_av_delta_update_strided_inputs(impl, dtype):
    """v from a qkv permute, a as transposed views, out from a [B, M, H, d] layout, non-contiguous index."""
    impl.skip_unless_fast()
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
        check_av(impl, out, a_new, a_ref, v_new, v_ref, index)
    # Broadcast (stride-0) read-only inputs.
    out = randn((b, h, n, d), dtype, gen)
    check_av(impl, out, a_new[:, :1].expand(b, h, n, n), a_ref, v_new[:, :, :1].expand(b, h, n, d), v_ref, index)


@over()
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), m=st.integers(1, 12), n=st.integers(1, 12), d=st.integers(1, 9),
    frac=st.floats(0, 1), dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES),
    float_out=st.booleans(), seed=st.integers(0, 2**16),
)
def test_av_delta_update_random_shapes(impl, b, h, m, n, d, frac, dtype, index_dtype, float_out, seed):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed)
    state = av_state(b, h, m, n, d, dtype, torch.float32 if float_out else dtype, gen)
    check_av(impl, *state, make_index(b, n, round(frac * n), index_dtype, gen))


@over("cpu", "cuda")
def test_av_delta_update_opcheck(impl):
    gen = torch.Generator().manual_seed(8)
    state = av_state(2, 2, 6, 5, 3, torch.float32, torch.float32, gen)
    opcheck(impl, torch.ops.eventful.av_delta_update_.default, (*state, make_index(2, 5, 2, torch.int64, gen)))


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


@over()
@pytest.mark.parametrize("case", sorted(AV_BAD))
def test_av_delta_update_bad_input(impl, case):
    fix, exc, name = AV_BAD[case]
    args = fix(av_args())
    state = {key: args[key].clone() for key in ("out", "a_new", "a_ref", "v_new", "v_ref")}
    with pytest.raises(exc, match=name):
        impl.av_delta_update_(**args)
    for key, before in state.items():
        assert torch.equal(args[key], before), key


@over()
def test_av_delta_update_out_aliasing_v_new_rejected(impl):
    args = av_args()
    args["v_new"] = args["out"][:, :, :5]  # [B,H,5,3] view into out
    before = args["out"].clone()
    with pytest.raises(RuntimeError, match="'out'.*'v_new'"):
        impl.av_delta_update_(**args)
    assert torch.equal(args["out"], before)


@over()
def test_ops_under_inference_mode(impl):
    """Worker threads do not inherit inference mode; the kernels must still write inference tensors in place."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode():
        ik = make_index(2, 70, 30, torch.int64, gen)
        check_av(impl, *av_state(2, 2, 70, 70, 8, torch.float32, torch.float32, gen), ik)


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


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", AV_EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_empty_slots(impl, dtype, out_dtype, index_dtype, shape, check_index):
    impl.skip_unless_fast()
    _, state, index = _av_case(shape, dtype, out_dtype, index_dtype, "empty")
    check_av(impl, *state, index, check_index=check_index)


@over()
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS)
def test_av_delta_update_unchecked_out_of_range_ids(impl, dtype, out_dtype, index_dtype):
    """check_index=False: ids outside [0, N) add nothing and refresh nothing, like -1."""
    impl.skip_unless_fast()
    for shape in AV_EMPTY_SHAPES:
        gen, state, index = _av_case(shape, dtype, out_dtype, index_dtype, "oor", frac=0.0)
        check_av(impl, *state, out_of_range(index, shape[3], gen), check_index=False)


@over()
@pytest.mark.parametrize("dtype", FLOATS)
def test_av_delta_update_unchecked_equals_checked(impl, dtype):
    impl.skip_unless_fast()
    for shape in AV_EMPTY_SHAPES:
        _, state, index = _av_case(shape, dtype, dtype, torch.int64, "same")
        checked, unchecked = [t.clone() for t in state], [t.clone() for t in state]
        impl.av_delta_update_(*checked, index)
        impl.av_delta_update_(*unchecked, index, check_index=False)
        assert all(torch.equal(x, y) for x, y in zip(checked, unchecked))


@over()
def test_av_delta_update_empty_slots_keep_invariant_over_frames(impl):
    """out == a_ref @ v_ref after every update, with -1 padded selections of varying size per batch row."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(34)
    out, a_new, a_ref, v_new, v_ref = av_state(3, 2, 12, 10, 4, torch.float32, torch.float32, gen)
    for frame in range(5):
        a_new = torch.rand(a_new.shape, generator=gen).softmax(-1)
        v_new = torch.randn(v_new.shape, generator=gen)
        index = with_empty_slots(make_index(3, 10, 6, torch.int64, gen), gen, 0.5, (frame % 3,))
        impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, index, check_index=frame % 2 == 0)
        torch.testing.assert_close(out, a_ref @ v_ref, rtol=1e-5, atol=1e-5)


@over()
def test_av_delta_update_unchecked_duplicates(impl):
    """check_index=False with repeated ids: no crash; the state copies get the (single) new value and nothing else
    changes. out is unspecified at the rows of a repeated id."""
    gen = torch.Generator().manual_seed(35)
    state = av_state(2, 2, 6, 8, 3, torch.float32, torch.float32, gen)
    index = torch.tensor([[1, 1, 5, -1], [7, 7, 7, 7]])
    ours = [t.clone() for t in state]
    impl.av_delta_update_(*ours, index, check_index=False)
    want = [t.clone() for t in state]
    reference.av_delta_update_(*want, torch.tensor([[1, 5, -1, -1], [7, -1, -1, -1]]))
    assert torch.equal(ours[2], want[2]) and torch.equal(ours[4], want[4])
    assert torch.equal(ours[1], state[1]) and torch.equal(ours[3], state[3])
    assert bool(ours[0].isfinite().all())


@over()
def test_av_delta_update_unchecked_still_checks_metadata(impl):
    cases = [c for c in sorted(AV_BAD) if not re.search("range|negative|dup|minus|index_n", c)]
    assert len(cases) >= 20
    for case in cases:
        fix, exc, name = AV_BAD[case]
        args = fix(av_args())
        state = {key: args[key].clone() for key in ("out", "a_new", "a_ref", "v_new", "v_ref")}
        with pytest.raises(exc, match=name):
            impl.av_delta_update_(**args, check_index=False)
        for key, before in state.items():
            assert torch.equal(args[key], before), (case, key)


@over("cpu", "cuda")
def test_av_delta_update_opcheck_empty_slots(impl):
    gen = torch.Generator().manual_seed(36)
    state = av_state(2, 2, 6, 5, 3, torch.float32, torch.float32, gen)
    op = torch.ops.eventful.av_delta_update_.default
    index = torch.tensor([[4, -1, -1], [-1, -1, -1]])
    opcheck(impl, op, (*state, index))
    opcheck(impl, op, (*state, index), {"check_index": False})
    unchecked = torch.tensor([[4, 5, -3], [12, 0, 1]], dtype=torch.int32)
    opcheck(impl, op, (*state, unchecked), {"check_index": False})


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
    ik = pad(make_index(b, n, round(fk * n), index_dtype, gen), n)
    state = av_state(b, h, m, n, d, dtype, dtype, gen)
    check_av(impl, *state, ik, check_index=check_index)


# ---------------------------------------------------------------- rank 3 and 4, layouts, out dtype: every backend

@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_av_delta_update_ranks_and_layouts(impl, dtype, idt):
    g = gen(7)
    cases = [((2, 2, 13, 17, 24), "contig", dtype), ((1, 3, 40, 45, 136), "step", dtype),
             ((2, None, 9, 11, 16), "colmajor", dtype), ((1, 2, 8, 10, 16), "contig", torch.float32)]
    for (b, h, m, n, d), layout, odt in cases:
        lead = (b,) if h is None else (b, h)
        for k in (0, 4, 33 if n > 33 else n - 1, n):
            a_new = strided(torch.rand((*lead, m, n), generator=g).to(dtype), layout)
            a_ref = strided(torch.rand((*lead, m, n), generator=g).to(dtype), layout)
            v_new = strided(randn((*lead, n, d), dtype, g), layout)
            v_ref = strided(randn((*lead, n, d), dtype, g), layout)
            out = strided(randn((*lead, m, d), odt, g), layout)  # out may be float32 for 16-bit inputs
            idx = make_index(b, n, k, idt, g)
            idx = strided_index(idx) if layout == "step" else idx
            state = [out.clone(), a_ref.clone(), v_ref.clone()]
            res = impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, idx)
            R.av_delta_update_(state[0], a_new, state[1], v_new, state[2], idx)
            assert res is out
            torch.testing.assert_close(out, state[0], **MATMUL_TOL[odt])
            assert_same(a_ref, state[1])
            assert_same(v_ref, state[2])


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_av_delta_update_empty_slots_layouts(impl, dtype, idt):
    g = gen(22)
    for (b, h, m, nk, d), layout in [((3, 2, 9, 11, 16), "contig"), ((2, None, 10, 7, 24), "step")]:
        lead = (b,) if h is None else (b, h)
        for k in (0, 4, nk, nk + 2):
            a_new = strided(torch.rand((*lead, m, nk), generator=g).to(dtype), layout)
            a_ref = strided(torch.rand((*lead, m, nk), generator=g).to(dtype), layout)
            v_new = strided(randn((*lead, nk, d), dtype, g), layout)
            v_ref = strided(randn((*lead, nk, d), dtype, g), layout)
            out = strided(randn((*lead, m, d), dtype, g), layout)
            idx = index_with_empty(b, k, nk, idt, g, strided=layout == "step")
            state = [out.clone(), a_ref.clone(), v_ref.clone()]
            R.av_delta_update_(state[0], a_new, state[1], v_new, state[2], idx)
            for check_index in (True, False):
                o, ar, vr = out.clone(), a_ref.clone(), v_ref.clone()
                impl.av_delta_update_(o, a_new, ar, v_new, vr, idx, check_index=check_index)
                torch.testing.assert_close(o, state[0], **MATMUL_TOL[dtype])
                assert_same(ar, state[1])
                assert_same(vr, state[2])


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_av_delta_update_unchecked_out_of_range_writes_nothing_outside(impl, dtype, idt):
    g = gen(23)
    B, H, N, D, M = 2, 2, 9, 24, 7
    inner = (slice(1, -1),) * 4
    a_new, _ = guarded((B, H, M, N), dtype, g, rand=True)
    v_new, _ = guarded((B, H, N, D), dtype, g)
    out, out_buf = guarded((B, H, M, D), dtype, g)
    a_ref, a_buf = guarded((B, H, M, N), dtype, g, rand=True)
    v_ref, v_buf = guarded((B, H, N, D), dtype, g)
    idx = index_with_empty(B, 6, N, idt, g, bad=(N, 2 * N + 3, -5, -1))
    want = [t.clone() for t in (out_buf, a_buf, v_buf)]
    R.av_delta_update_(want[0][inner], a_new, want[1][inner], v_new, want[2][inner], idx)
    impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, idx, check_index=False)
    torch.testing.assert_close(out_buf, want[0], **MATMUL_TOL[dtype])
    assert_same_guards(out_buf, want[0])
    assert_same(a_buf, want[1])
    assert_same(v_buf, want[2])


@over("triton", "interpreter")
def test_av_autotune_hooks_undo_a_trial_run(impl):
    """On a GPU the autotuner runs _av_delta_kernel once per config and repetition on the caller's tensors; its hooks
    must undo each run: ``out`` and (REFRESH_A) ``a_ref[..., S]``, which the kernel refreshes itself."""
    from eventful_kernels.triton import av_delta_update as A
    assert {"o_ptr", "ar_ptr", "idx_ptr", "N", "REFRESH_A"} <= set(A._av_delta_kernel.arg_names)
    g = gen(26)
    dev = impl.device
    out = randn((2, 2, 7, 16), torch.float32, g, dev)
    v_new, v_ref = (randn((2, 2, 9, 16), torch.float32, g, dev) for _ in range(2))
    a_new, a_ref = (torch.rand(2, 2, 7, 9, generator=g).to(dev) for _ in range(2))
    idx = torch.tensor([[1, -1, 8, 4], [-1, -1, -1, -1]], device=dev)
    nargs = {"o_ptr": out, "ar_ptr": a_ref, "idx_ptr": idx, "N": 9, "REFRESH_A": True}
    before = [out.clone(), a_ref.clone()]
    A._av_save_state(nargs)
    impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref.clone(), idx)  # a trial run
    assert not torch.equal(out, before[0]) and not torch.equal(a_ref, before[1])
    A._av_restore_state(nargs)
    assert_same(out, before[0])
    assert_same(a_ref, before[1])
    A._av_save_state(nargs, reset_only=True)  # the autotuner's call after tuning: nothing to save
    assert not A._AV_SAVED


# ---------------------------------------------------------------- bad input with exact messages: every backend

def _av_state():
    g = gen(10)
    f32 = torch.float32
    return {"out": randn((2, 2, 6, 16), f32, g), "a_new": torch.rand(2, 2, 6, 6, generator=g),
            "a_ref": torch.rand(2, 2, 6, 6, generator=g), "v_new": randn((2, 2, 6, 16), f32, g),
            "v_ref": randn((2, 2, 6, 16), f32, g)}


_OK = torch.tensor([[1, 4], [0, 5]])


def _av(index, **over_):
    def call(impl, s):
        a = {k: over_[k](s) if k in over_ else s[k] for k in ("out", "a_new", "a_ref", "v_new", "v_ref")}
        return impl.av_delta_update_(a["out"], a["a_new"], a["a_ref"], a["v_new"], a["v_ref"], index)
    return call


BAD = [  # (id, call(impl, state), exception, message fragment)
    ("dup", _av(torch.tensor([[1, 4], [3, 3]])), RuntimeError, "repeats token id 3 in row 1"),
    ("oob", _av(torch.tensor([[1, 4], [0, 6]])), IndexError, "'index' holds 6"),
    ("-2", _av(torch.tensor([[-1, 4], [0, -2]])), IndexError, "'index' holds -2 at [1, 1]"),
    ("v dtype", _av(_OK, v_ref=lambda s: s["v_ref"].half()), RuntimeError, "'v_ref' has dtype Half but 'a_new'"),
    ("a shape", _av(_OK, a_new=lambda s: s["a_new"][..., :5]), RuntimeError, "'a_ref' has size 6 at dim 3"),
    ("out d", _av(_OK, out=lambda s: s["out"][..., :8]), RuntimeError,
     "'v_new' has size 16 at dim 3 but the head dim of 'out' is 8"),
    ("out rank 3", _av(_OK, out=lambda s: s["out"][0]), RuntimeError, "'a_new' must have the rank of 'out' (3)"),
    ("index dtype", _av(_OK.to(torch.int16)), RuntimeError, "'index' must be int32 or int64, got Short"),
    ("a_ref overlap", _av(_OK, a_ref=lambda s: s["a_ref"][:, :, :1].expand(2, 2, 6, 6)), RuntimeError,
     "'a_ref' is written in place"),
    ("v_ref is v_new", _av(_OK, v_ref=lambda s: s["v_new"]), RuntimeError,
     "'v_ref' is written in place and must not share memory with 'v_new'"),
    ("out None", _av(_OK, out=lambda s: None), TypeError, "'out' must be a Tensor, got None"),
]


@over()
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exact_messages(impl, case):
    name, call, exc, fragment = case
    skip_meta_on_dispatcher(impl, name)
    run_bad_case(impl, _av_state, call, exc, fragment)
