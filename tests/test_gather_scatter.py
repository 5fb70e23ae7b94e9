"""gather_rows / scatter_rows_ / gather_cols / scatter_cols_ (family ``gather_scatter``) on every backend
(tests/op_support.py) against eventful_kernels.reference.

These ops only move data, so every comparison is exact (torch.equal), for every dtype. Index entries -1 are empty
slots (zero rows / columns in a gather, no write in a scatter); with check_index=False every id outside [0, N) is one.
One bad-input table per kind of op (GATHER_BAD, SCATTER_BAD, BAD) runs against every backend.
"""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from eventful_kernels import reference
from eventful_kernels import reference as R

from op_support import (FLOATS, INDEX_DTYPES, assert_same, assert_same_guards, clone_layout, gen,
                        guarded, index_with_empty, make_index, out_of_range, out_of_range_ids, over, randn,
                        run_bad_case, seed_of, skip_meta_on_dispatcher, strided, strided_index, with_empty_slots)


# Shapes: leading dims (B,) or (B, H), then N (token / column count), D (feature or row count), K.
SHAPES = [
    ((1,), 8, 5, 3),
    ((3,), 10, 4, 6),  # B > 1
    ((2,), 7, 3, 0),  # K = 0
    ((2,), 9, 6, 9),  # K = N
    ((2, 3), 11, 4, 5),  # rank 4, H > 1
    ((2, 2), 6, 7, 6),  # rank 4, K = N
    ((1, 2), 5, 3, 0),  # rank 4, K = 0
    ((2,), 300, 70, 130),  # several parallel chunks
    ((1,), 300, 301, 130),  # parallel chunks that start mid-row
]


def _case(shape, dtype, index_dtype, salt):
    lead_dims, n, d, k = shape
    gen = torch.Generator().manual_seed(seed_of(shape, dtype, index_dtype, salt))
    return lead_dims, n, d, k, gen


@over()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_rows(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    lead_dims, n, d, k, gen = _case(shape, dtype, index_dtype, "gr")
    x = randn((*lead_dims, n, d), dtype, gen)
    index = make_index(lead_dims[0], n, k, index_dtype, gen, unique=False)  # gather allows repeats
    y = impl.gather_rows(x, index)
    assert y.shape == (*lead_dims, k, d) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, reference.gather_rows(x, index))


@over()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_cols(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    lead_dims, n, m, k, gen = _case(shape, dtype, index_dtype, "gc")
    x = randn((*lead_dims, m, n), dtype, gen)
    index = make_index(lead_dims[0], n, k, index_dtype, gen, unique=False)
    y = impl.gather_cols(x, index)
    assert y.shape == (*lead_dims, m, k) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, reference.gather_cols(x, index))


def check_scatter(op, ref_op, dst, index, src, **kwargs):
    """The op on a same-layout copy of dst equals the reference everywhere (so nothing else is touched)."""
    ours = clone_layout(dst)
    expected = ref_op(dst.clone(), index, src)
    src_before, index_before = src.clone(), index.clone()
    assert op(ours, index, src, **kwargs) is ours
    assert torch.equal(ours, expected)
    assert torch.equal(src, src_before) and torch.equal(index, index_before)


@over()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_rows(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    lead_dims, n, d, k, gen = _case(shape, dtype, index_dtype, "sr")
    dst, src = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, k, d), dtype, gen)
    check_scatter(impl.scatter_rows_, reference.scatter_rows_, dst, make_index(lead_dims[0], n, k, index_dtype, gen),
                  src)


@over()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_cols(impl, shape, index_dtype, dtype):
    impl.skip_unless_fast()
    lead_dims, n, m, k, gen = _case(shape, dtype, index_dtype, "sc")
    dst, src = randn((*lead_dims, m, n), dtype, gen), randn((*lead_dims, m, k), dtype, gen)
    check_scatter(impl.scatter_cols_, reference.scatter_cols_, dst, make_index(lead_dims[0], n, k, index_dtype, gen),
                  src)


def strided_variants(t, gen):
    """`t`'s values in layouts with a non-unit last stride, a padded row stride and a permuted head dim."""
    yield t.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    wide = randn((*t.shape[:-1], t.shape[-1] + 3), t.dtype, gen)[..., : t.shape[-1]]
    yield wide.copy_(t)  # unit last stride, padded rows
    if t.dim() == 4:
        yield t.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory layout (qkv-style)


@over()
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_strided_inputs_and_outputs(impl, rank, dtype):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed_of(rank, dtype))
    lead_dims = (2,) if rank == 3 else (2, 3)
    n, d, k = 9, 6, 4
    index = make_index(2, n, k, torch.int64, gen).t().contiguous().t()  # non-contiguous index
    assert not index.is_contiguous()
    x = randn((*lead_dims, n, d), dtype, gen)
    for xs in strided_variants(x, gen):
        assert not xs.is_contiguous()
        assert torch.equal(impl.gather_rows(xs, index), reference.gather_rows(x, index))
        assert torch.equal(impl.gather_cols(xs, index[:, :3] % d), reference.gather_cols(x, index[:, :3] % d))
    xb = x[:1].expand(x.shape)  # broadcast (stride-0) input
    assert torch.equal(impl.gather_rows(xb, index), reference.gather_rows(xb.contiguous(), index))
    assert torch.equal(impl.gather_cols(xb, index[:, :3] % d), reference.gather_cols(xb.contiguous(), index[:, :3] % d))
    src_rows = randn((*lead_dims, k, d), dtype, gen)
    src_cols = randn((*lead_dims, n, k), dtype, gen)
    dst_cols_base = randn((*lead_dims, n, 2 * d), dtype, gen)
    for dst in strided_variants(x, gen):
        for src in strided_variants(src_rows, gen):
            check_scatter(impl.scatter_rows_, reference.scatter_rows_, dst, index, src)
    check_scatter(impl.scatter_rows_, reference.scatter_rows_, x, index, src_rows[:1].expand(src_rows.shape))
    check_scatter(impl.scatter_cols_, reference.scatter_cols_, dst_cols_base, index,
                  src_cols[:1].expand(src_cols.shape))
    for dst in strided_variants(dst_cols_base, gen):
        for src in strided_variants(src_cols, gen):
            check_scatter(impl.scatter_cols_, reference.scatter_cols_, dst, index, src)


@over()
@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 3), h=st.one_of(st.none(), st.integers(1, 3)), n=st.integers(1, 16), d=st.integers(1, 9),
    frac=st.floats(0, 1), dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(impl, b, h, n, d, frac, dtype, index_dtype, seed):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed)
    lead_dims = (b,) if h is None else (b, h)
    k = round(frac * n)
    index = make_index(b, n, k, index_dtype, gen)
    x_rows, x_cols = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, d, n), dtype, gen)
    assert torch.equal(impl.gather_rows(x_rows, index), reference.gather_rows(x_rows, index))
    assert torch.equal(impl.gather_cols(x_cols, index), reference.gather_cols(x_cols, index))
    check_scatter(impl.scatter_rows_, reference.scatter_rows_, x_rows, index, randn((*lead_dims, k, d), dtype, gen))
    check_scatter(impl.scatter_cols_, reference.scatter_cols_, x_cols, index, randn((*lead_dims, d, k), dtype, gen))


@over("cpu", "cuda")
@pytest.mark.parametrize("rank", [3, 4])
def test_opcheck(impl, rank):
    gen = torch.Generator().manual_seed(rank)
    lead_dims = (2,) if rank == 3 else (2, 3)
    index = make_index(2, 7, 3, torch.int64, gen)
    x = randn((*lead_dims, 7, 5), torch.float32, gen, impl.device)
    index = index.to(impl.device)
    e = torch.ops.eventful
    torch.library.opcheck(e.gather_rows.default, (x, index))
    torch.library.opcheck(e.gather_cols.default, (x.transpose(-1, -2).contiguous(), index))
    torch.library.opcheck(e.scatter_rows_.default, (x.clone(), index,
                                                    randn((*lead_dims, 3, 5), torch.float32, gen, impl.device)))
    torch.library.opcheck(e.scatter_cols_.default, (x.clone(), index[:, :2] % 5,
                                                    randn((*lead_dims, 7, 2), torch.float32, gen, impl.device)))


# ------------------------------------------------------------------------------------------- empty slots

OPS = {  # name: (reference, token dim of the indexed operand, True for a scatter)
    "gather_rows": (reference.gather_rows, -2, False),
    "gather_cols": (reference.gather_cols, -1, False),
    "scatter_rows_": (reference.scatter_rows_, -2, True),
    "scatter_cols_": (reference.scatter_cols_, -1, True),
}

# As SHAPES, plus whether batch row 0 holds only empty slots.
EMPTY_SHAPES = [
    ((1,), 8, 5, 3, False),
    ((3,), 10, 4, 6, True),  # B > 1, one row of only -1
    ((2,), 7, 3, 0, False),  # K = 0
    ((2,), 9, 6, 9, False),  # K = N, some slots empty
    ((2, 3), 11, 4, 5, True),  # rank 4
    ((1, 2), 6, 7, 6, True),  # rank 4, K = N, all empty
    ((2,), 300, 70, 130, False),  # several parallel chunks
    ((2,), 0, 3, 4, False),  # N = 0: only empty slots exist
]


def operands(name, lead_dims, n, d, k, dtype, gen):
    """(x or dst, src or None) for op `name` with n tokens (rows, or columns for the *_cols ops)."""
    _, dim, scatter = OPS[name]
    shape = (*lead_dims, n, d) if dim == -2 else (*lead_dims, d, n)
    src_shape = (*lead_dims, k, d) if dim == -2 else (*lead_dims, d, k)
    return randn(shape, dtype, gen), randn(src_shape, dtype, gen) if scatter else None


def run_and_compare(impl, name, x, index, src, **kwargs):
    op, (ref_op, _, scatter) = getattr(impl, name), OPS[name]
    if scatter:
        check_scatter(op, ref_op, x, index, src, **kwargs)
        return
    y = op(x, index, **kwargs)
    assert y.is_contiguous() and y.dtype == x.dtype
    assert torch.equal(y, ref_op(x, index))


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_empty_slots(impl, name, dtype, index_dtype, shape, check_index):
    impl.skip_unless_fast()
    lead_dims, n, d, k, empty_row = shape
    gen = torch.Generator().manual_seed(seed_of(name, shape, dtype, index_dtype))
    x, src = operands(name, lead_dims, n, d, k, dtype, gen)
    if n > 0:
        base = make_index(lead_dims[0], n, k, index_dtype, gen, unique=OPS[name][2])
    else:
        base = torch.zeros(lead_dims[0], k, dtype=index_dtype)
    index = with_empty_slots(base, gen, frac=0.4 if n > 0 else 1.0, empty_rows=(0,) if empty_row else ())
    if k > 1 and n > 0:
        index[-1, :2] = -1  # repeated -1 in one row (scatters too)
    run_and_compare(impl, name, x, index, src, check_index=check_index)
    if name.startswith("gather") and k > 0:  # zero rows / columns exactly where the slots are empty
        y = getattr(impl, name)(x, index, check_index=check_index)
        empty = (index < 0)[(slice(None),) + (None,) * (len(lead_dims) - 1)]
        empty = empty[..., :, None] if OPS[name][1] == -2 else empty[..., None, :]
        assert bool((y == 0).logical_or(~empty).all())


@over()
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_unchecked_out_of_range_ids_are_empty_slots(impl, name, dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) read and write nothing."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed_of(name, dtype, index_dtype, "oor"))
    for lead_dims, n, d, k, _ in EMPTY_SHAPES[:-1]:
        x, src = operands(name, lead_dims, n, d, k, dtype, gen)
        index = out_of_range(make_index(lead_dims[0], n, k, index_dtype, gen, unique=OPS[name][2]), n, gen)
        run_and_compare(impl, name, x, index, src, check_index=False)


@over()
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_unchecked_valid_ids_equal_checked(impl, name, index_dtype):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed_of(name, index_dtype, "same"))
    op, scatter = getattr(impl, name), OPS[name][2]
    for lead_dims, n, d, k in SHAPES:
        x, src = operands(name, lead_dims, n, d, k, torch.float32, gen)
        index = make_index(lead_dims[0], n, k, index_dtype, gen, unique=scatter)
        if scatter:
            checked, unchecked = x.clone(), x.clone()
            op(checked, index, src, check_index=True)
            op(unchecked, index, src, check_index=False)
        else:
            checked, unchecked = op(x, index, check_index=True), op(x, index, check_index=False)
        assert torch.equal(checked, unchecked)


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_empty_slots_strided(impl, dtype, rank, check_index):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed_of(rank, dtype, "empty-strided"))
    lead_dims = (2,) if rank == 3 else (2, 3)
    n, d, k = 9, 6, 5
    index = torch.tensor([[4, -1, 0, -1, 8], [-1, -1, -1, -1, -1]]).t().contiguous().t()  # strided, one row empty
    if not check_index:
        index[0, 1] = n + 2
    assert not index.is_contiguous()
    x = randn((*lead_dims, n, d), dtype, gen)
    cols_index = torch.where(index < d, index, -1)
    for xs in strided_variants(x, gen):
        assert torch.equal(impl.gather_rows(xs, index, check_index=check_index), reference.gather_rows(x, index))
        assert torch.equal(impl.gather_cols(xs, cols_index, check_index=check_index),
                           reference.gather_cols(x, cols_index))
    src_rows, src_cols = randn((*lead_dims, k, d), dtype, gen), randn((*lead_dims, n, k), dtype, gen)
    dst_cols = randn((*lead_dims, n, 2 * d), dtype, gen)
    for dst in strided_variants(x, gen):
        for src in strided_variants(src_rows, gen):
            check_scatter(impl.scatter_rows_, reference.scatter_rows_, dst, index, src, check_index=check_index)
    for dst in strided_variants(dst_cols, gen):
        for src in strided_variants(src_cols, gen):
            check_scatter(impl.scatter_cols_, reference.scatter_cols_, dst, index, src, check_index=check_index)


@over()
@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 3), h=st.one_of(st.none(), st.integers(1, 3)), n=st.integers(1, 16), d=st.integers(1, 9),
    frac=st.floats(0, 1), empty=st.floats(0, 1), check_index=st.booleans(), dtype=st.sampled_from(FLOATS),
    index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_random_empty_slots(impl, b, h, n, d, frac, empty, check_index, dtype, index_dtype, seed):
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(seed)
    lead_dims = (b,) if h is None else (b, h)
    k = round(frac * n)
    index = make_index(b, n, k, index_dtype, gen)
    index = with_empty_slots(index, gen, empty) if check_index else out_of_range(index, n, gen, empty)
    x_rows, x_cols = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, d, n), dtype, gen)
    kw = dict(check_index=check_index)
    assert torch.equal(impl.gather_rows(x_rows, index, **kw), reference.gather_rows(x_rows, index))
    assert torch.equal(impl.gather_cols(x_cols, index, **kw), reference.gather_cols(x_cols, index))
    check_scatter(impl.scatter_rows_, reference.scatter_rows_, x_rows, index, randn((*lead_dims, k, d), dtype, gen),
                  **kw)
    check_scatter(impl.scatter_cols_, reference.scatter_cols_, x_cols, index, randn((*lead_dims, d, k), dtype, gen),
                  **kw)


@over()
def test_unchecked_duplicates_write_one_of_the_values(impl):
    """check_index=False with a repeated id in a scatter: no crash, the target gets one of the written values and
    nothing else changes."""
    impl.skip_unless_fast()
    gen = torch.Generator().manual_seed(21)
    dst, src = randn((2, 3, 8, 5), torch.float32, gen), randn((2, 3, 4, 5), torch.float32, gen)
    index = torch.tensor([[2, 6, 2, 2], [0, 1, 7, 1]])
    out = dst.clone()
    impl.scatter_rows_(out, index, src, check_index=False)
    for b, rows in ((0, {6: [1], 2: [0, 2, 3]}), (1, {0: [0], 7: [2], 1: [1, 3]})):
        for tok, slots in rows.items():
            assert any(torch.equal(out[b, :, tok], src[b, :, j]) for j in slots)
    untouched = [t for t in range(8) if t not in (0, 1, 2, 6, 7)]
    assert torch.equal(out[:, :, untouched], dst[:, :, untouched])
    cols = dst.transpose(-1, -2).contiguous()  # [2, 3, 5, 8]
    out = cols.clone()
    impl.scatter_cols_(out, index, src.transpose(-1, -2).contiguous(), check_index=False)
    assert torch.equal(out[0, :, :, 6], src[0, :, 1]) and torch.equal(out[..., untouched], cols[..., untouched])
    assert any(torch.equal(out[0, :, :, 2], src[0, :, j]) for j in (0, 2, 3))


@over("cpu", "cuda")
@pytest.mark.parametrize("rank", [3, 4])
def test_opcheck_empty_slots_and_unchecked(impl, rank):
    gen = torch.Generator().manual_seed(rank + 10)
    lead_dims = (2,) if rank == 3 else (2, 3)
    index = torch.tensor([[3, -1, 0], [-1, -1, 6]], device=impl.device)
    x = randn((*lead_dims, 7, 5), torch.float32, gen, impl.device)
    xc = x.transpose(-1, -2).contiguous()
    src_rows = randn((*lead_dims, 3, 5), torch.float32, gen, impl.device)
    src_cols = randn((*lead_dims, 5, 3), torch.float32, gen, impl.device)
    e = torch.ops.eventful
    unchecked = {"check_index": False}
    for kwargs, idx in (({}, index), (unchecked, index), (unchecked, torch.where(index < 0, 7, index))):
        torch.library.opcheck(e.gather_rows.default, (x, idx), kwargs)
        torch.library.opcheck(e.gather_cols.default, (xc, idx), kwargs)
        torch.library.opcheck(e.scatter_rows_.default, (x.clone(), idx, src_rows), kwargs)
        torch.library.opcheck(e.scatter_cols_.default, (xc.clone(), idx, src_cols), kwargs)


# ------------------------------------------------------------------------------------------------ bad input

def _dup(index):
    index = index.clone()
    index[1, 1] = index[1, 0]
    return index


def _put(index, b, j, v):
    index = index.clone()
    index[b, j] = v
    return index


def _args():
    gen = torch.Generator().manual_seed(11)
    return dict(x=randn((2, 6, 4), torch.float32, gen), index=make_index(2, 6, 3, torch.int64, gen),
                src_rows=randn((2, 3, 4), torch.float32, gen), src_cols=randn((2, 6, 3), torch.float32, gen))


GATHER_BAD = {  # name: (x, index) -> (x, index), error type, argument named in the message
    "x_rank2": (lambda x, i: (x[0], i), RuntimeError, "'x'"),
    "x_rank5": (lambda x, i: (x[:, None, None], i), RuntimeError, "'x'"),
    "x_int": (lambda x, i: (x.int(), i), RuntimeError, "'x'"),
    "x_double": (lambda x, i: (x.double(), i), RuntimeError, "'x'"),
    "index_float": (lambda x, i: (x, i.float()), RuntimeError, "'index'"),
    "index_int16": (lambda x, i: (x, i.short()), RuntimeError, "'index'"),
    "index_rank1": (lambda x, i: (x, i[0]), RuntimeError, "'index'"),
    "index_rank3": (lambda x, i: (x, i[:, None]), RuntimeError, "'index'"),
    "index_batch": (lambda x, i: (x, i[:1]), RuntimeError, "'index'"),
    "index_range": (lambda x, i: (x, i + 6 - i.max()), IndexError, "'index'"),
    "index_negative": (lambda x, i: (x, i - 1 - i.max()), IndexError, "'index'"),
    "index_minus_two": (lambda x, i: (x, _put(i, 0, 1, -2)), IndexError,
                        re.escape("eventful: argument 'index' holds -2 at [0, 1], out of range [0, 6)")),
    "index_n_after_empty": (lambda x, i: (x, _put(_put(i, 1, 0, -1), 1, 2, 6)), IndexError,
                            re.escape("eventful: argument 'index' holds 6 at [1, 2], out of range [0, 6)")),
}


@over()
@pytest.mark.parametrize("op_name", ["gather_rows", "gather_cols"])
@pytest.mark.parametrize("case", sorted(GATHER_BAD))
def test_gather_bad_input(impl, op_name, case):
    fix, exc, name = GATHER_BAD[case]
    a = _args()
    x = a["x"] if op_name == "gather_rows" else a["x"].transpose(-1, -2).contiguous()  # [2, 4, 6]: 6 columns
    x_bad, index = fix(x, a["index"])
    before = x_bad.clone()
    with pytest.raises(exc, match=name):
        getattr(impl, op_name)(x_bad, index)
    assert torch.equal(x_bad, before)


SCATTER_BAD = {  # name: (dst, index, src) -> (dst, index, src), error type, argument named in the message
    "dst_rank2": (lambda d, i, s: (d[0], i, s[0]), RuntimeError, "'dst'"),
    "dst_int": (lambda d, i, s: (d.int(), i, s.int()), RuntimeError, "'dst'"),
    "src_dtype": (lambda d, i, s: (d, i, s.half()), RuntimeError, "'src'"),
    "src_rank": (lambda d, i, s: (d, i, s[:, None]), RuntimeError, "'src'"),
    "src_batch": (lambda d, i, s: (d, i, s[:1]), RuntimeError, "'src'"),
    "src_k": (lambda d, i, s: (d, i[:, :2], s), RuntimeError, "'src'"),
    "src_other_dim": (lambda d, i, s: (d, i, torch.cat([s, s], 1 if s.shape[2] == 3 else 2)), RuntimeError, "'src'"),
    "index_float": (lambda d, i, s: (d, i.float(), s), RuntimeError, "'index'"),
    "index_rank1": (lambda d, i, s: (d, i[0], s), RuntimeError, "'index'"),
    "index_batch": (lambda d, i, s: (d, i[:1], s), RuntimeError, "'index'"),
    "index_range": (lambda d, i, s: (d, i + 6 - i.max(), s), IndexError, "'index'"),
    "index_negative": (lambda d, i, s: (d, i - 1 - i.max(), s), IndexError, "'index'"),
    "index_duplicate": (lambda d, i, s: (d, _dup(i), s), RuntimeError, "'index'"),
    "index_duplicate_after_empty": (lambda d, i, s: (d, _dup(_put(i, 1, 2, -1)), s), RuntimeError,
                                    r"^eventful: argument 'index' repeats token id \d+ in row 1 "
                                    r"\(ids must be distinct\)$"),
    "index_minus_two": (lambda d, i, s: (d, _put(_put(i, 0, 0, -1), 0, 2, -2), s), IndexError,
                        re.escape("eventful: argument 'index' holds -2 at [0, 2], out of range [0, 6)")),
    "index_n": (lambda d, i, s: (d, _put(i, 1, 1, 6), s), IndexError,
                re.escape("eventful: argument 'index' holds 6 at [1, 1], out of range [0, 6)")),
    "dst_expanded": (lambda d, i, s: (d[:1].expand(d.shape), i, s), RuntimeError, "'dst'"),
}


def _src_view_of_dst(dst, index, src, rows):
    """src as a view into dst's own memory (same shape as src)."""
    view = dst[:, : src.shape[1]] if rows else dst[:, :, : src.shape[2]]
    return dst, index, view


@over()
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("case", sorted(SCATTER_BAD) + ["src_overlaps_dst"])
def test_scatter_bad_input(impl, rows, case):
    a = _args()
    # rows: dst [2, 6, 4], src [2, 3, 4]; cols: dst [2, 4, 6] (6 columns), src [2, 4, 3]
    dst = a["x"] if rows else a["x"].transpose(-1, -2).contiguous()
    src = a["src_rows"] if rows else a["src_cols"][:, :4]
    if case == "src_overlaps_dst":
        dst, index, src = _src_view_of_dst(dst, a["index"], src, rows)
        exc, name = RuntimeError, "'dst'.*'src'"
    else:
        fix, exc, name = SCATTER_BAD[case]
        dst, index, src = fix(dst, a["index"], src)
    before, src_before = dst.clone(), src.clone()
    with pytest.raises(exc, match=name):
        (impl.scatter_rows_ if rows else impl.scatter_cols_)(dst, index, src)
    assert torch.equal(dst, before)
    assert torch.equal(src, src_before)


VALUE_CASES = {"index_range", "index_negative", "index_minus_two", "index_n", "index_n_after_empty",
               "index_duplicate", "index_duplicate_after_empty"}


@over()
@pytest.mark.parametrize("op_name", ["gather_rows", "gather_cols", "scatter_rows_", "scatter_cols_"])
def test_unchecked_still_checks_metadata(impl, op_name):
    """check_index=False skips only the index value scan: every other check raises as before, state unchanged."""
    scatter = op_name.startswith("scatter")
    table = SCATTER_BAD if scatter else GATHER_BAD
    cases = [c for c in sorted(table) if c not in VALUE_CASES]
    assert len(cases) >= 9
    for case in cases:
        fix, exc, name = table[case]
        a = _args()
        rows = op_name.endswith("rows") or op_name.endswith("rows_")
        x = a["x"] if rows else a["x"].transpose(-1, -2).contiguous()
        if scatter:
            args = fix(x, a["index"], a["src_rows"] if rows else a["src_cols"][:, :4])
        else:
            args = fix(x, a["index"])
        before = [t.clone() for t in args]
        with pytest.raises(exc, match=name):
            getattr(impl, op_name)(*args, check_index=False)
        assert all(torch.equal(t, b) for t, b in zip(args, before)), case
    if scatter:
        dst = a["x"] if rows else a["x"].transpose(-1, -2).contiguous()
        dst, index, src = _src_view_of_dst(dst, a["index"], a["src_rows"] if rows else a["src_cols"][:, :4], rows)
        with pytest.raises(RuntimeError, match="'dst'.*'src'"):
            getattr(impl, op_name)(dst, index, src, check_index=False)


# ---------------------------------------------------------------- small odd shapes, every layout and backend

def _assert_gather(impl, name, x, idx, **kw):
    y = getattr(impl, name)(x, idx, **kw)
    assert_same(y, getattr(R, name)(x, idx))
    assert y.is_contiguous()


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_scatter_rows_layouts(impl, dtype, idt):
    g = gen(0)
    for shape, layout in [((2, 13, 19), "contig"), ((3, 2, 11, 600), "step"), ((2, 3, 9, 16), "colmajor")]:
        n = shape[-2]
        for k in (0, 4, n):
            x = strided(randn(shape, dtype, g), layout)
            idx = make_index(shape[0], n, k, idt, g)
            if layout != "contig":
                idx = strided_index(idx)
            _assert_gather(impl, "gather_rows", x, idx)
            dst = strided(randn(shape, dtype, g), layout)
            dst_ref = dst.clone()
            src = strided(randn((*shape[:-2], k, shape[-1]), dtype, g), layout)
            assert impl.scatter_rows_(dst, idx, src) is dst
            assert_same(dst, R.scatter_rows_(dst_ref, idx, src))


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_scatter_cols_layouts(impl, dtype, idt):
    g = gen(1)
    for shape, layout in [((2, 10, 21), "contig"), ((2, 3, 7, 40), "step"), ((3, 2, 12, 9), "colmajor")]:
        n = shape[-1]
        for k in (0, 5, n):
            x = strided(randn(shape, dtype, g), layout)
            idx = make_index(shape[0], n, k, idt, g)
            if layout == "step":
                idx = strided_index(idx)
            _assert_gather(impl, "gather_cols", x, idx)
            dst = strided(randn(shape, dtype, g), layout)
            dst_ref = dst.clone()
            src = strided(randn((*shape[:-1], k), dtype, g), layout) if k > 1 else randn((*shape[:-1], k), dtype, g)
            impl.scatter_cols_(dst, idx, src)
            assert_same(dst, R.scatter_cols_(dst_ref, idx, src))


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_slots_layouts(impl, dtype, idt):
    """-1 slots at random positions, a row of only -1, K = 0 / N / N + 2, B > 1, strided operands; checked and
    unchecked calls agree with the reference bit for bit."""
    g = gen(20)
    for shape, layout in [((3, 11, 24), "contig"), ((2, 2, 9, 40), "step"), ((3, 2, 7, 16), "colmajor")]:
        for cols in (False, True):
            n = shape[-1] if cols else shape[-2]
            gather, scatter = ("gather_cols", "scatter_cols_") if cols else ("gather_rows", "scatter_rows_")
            for k in (0, 5, n, n + 2):
                x = strided(randn(shape, dtype, g), layout)
                idx = index_with_empty(shape[0], k, n, idt, g, strided=layout == "step")
                src_shape = (*shape[:-1], k) if cols else (*shape[:-2], k, shape[-1])
                src = strided(randn(src_shape, dtype, g), layout) if k > 1 else randn(src_shape, dtype, g)
                dst0 = strided(randn(shape, dtype, g), layout)
                want_dst = getattr(R, scatter)(dst0.clone(), idx, src)
                for check_index in (True, False):
                    _assert_gather(impl, gather, x, idx, check_index=check_index)
                    dst = dst0.clone()
                    getattr(impl, scatter)(dst, idx, src, check_index=check_index)
                    assert_same(dst, want_dst)


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unchecked_out_of_range_writes_nothing_outside(impl, dtype, idt):
    """check_index=False with ids N, 2N+3, -5 (and -1) among valid ones: the reference's result with those slots
    empty, and nothing outside the operands is touched (each written tensor is a view inside a guard buffer)."""
    g = gen(23)
    B, H, N, D, M = 2, 2, 9, 24, 7
    for cols in (False, True):
        shape = (B, H, M, N) if cols else (B, H, N, D)
        gather, scatter = ("gather_cols", "scatter_cols_") if cols else ("gather_rows", "scatter_rows_")
        idx = index_with_empty(B, 6, N, idt, g, bad=(N, 2 * N + 3, -5, -1))
        x, _ = guarded(shape, dtype, g)
        assert_same(getattr(impl, gather)(x, idx, check_index=False), getattr(R, gather)(x, idx))
        dst, buf = guarded(shape, dtype, g)
        buf_want = buf.clone()
        src = randn((B, H, M, 6) if cols else (B, H, 6, D), dtype, g)
        getattr(impl, scatter)(dst, idx, src, check_index=False)
        getattr(R, scatter)(buf_want[tuple(slice(1, 1 + n) for n in shape)], idx, src)
        assert_same(buf, buf_want)
        assert_same_guards(buf, buf_want)


@over()
def test_unchecked_index_never_writes_out_of_bounds(impl):
    g = gen(9)
    buf = randn((2, 12, 8), torch.float32, g)
    dst = buf[:, 1:-1]  # 10 rows with a guard row on each side
    before = buf.clone()
    idx = torch.tensor([[-1, 3, 10], [9, 12, 0]])
    src = randn((2, 3, 8), torch.float32, g)
    impl.scatter_rows_(dst, idx, src, check_index=False)
    assert torch.equal(buf[:, 0], before[:, 0]) and torch.equal(buf[:, -1], before[:, -1])
    assert torch.equal(dst[0, 3], src[0, 1]) and torch.equal(dst[1, 9], src[1, 0]) and torch.equal(dst[1, 0], src[1, 2])
    y = impl.gather_rows(dst, idx, check_index=False)
    assert torch.equal(y[0, 0], torch.zeros(8)) and torch.equal(y[0, 1], dst[0, 3])


@over()
def test_checked_mode_accepts_repeated_empty_slots(impl):
    """check_index=True: -1 passes the range check and is left out of the uniqueness check of the scatters."""
    g = gen(19)
    idx = torch.tensor([[-1, 3, -1, 0], [-1, -1, -1, -1]])
    x = randn((2, 6, 4), torch.float32, g)
    assert_same(impl.gather_rows(x, idx), R.gather_rows(x, idx))
    assert_same(impl.gather_cols(x, idx), R.gather_cols(x, idx))  # ids < 4, the column count
    src = randn((2, 4, 4), torch.float32, g)
    assert_same(impl.scatter_rows_(x.clone(), idx, src), R.scatter_rows_(x.clone(), idx, src))
    src = randn((2, 6, 4), torch.float32, g)
    assert_same(impl.scatter_cols_(x.clone(), idx, src), R.scatter_cols_(x.clone(), idx, src))


@over()
def test_duplicate_far_apart_in_a_long_index_is_caught(impl):
    """K > 1024: a repeat far apart in one row is still seen."""
    g = gen(13)
    dst = randn((1, 3000, 2), torch.float32, g)
    before = dst.clone()
    idx = torch.randperm(3000, generator=g)[:2500]
    idx[2400] = idx[5]
    with pytest.raises(RuntimeError, match=f"repeats token id {int(idx[5])} in row 0"):
        impl.scatter_rows_(dst, idx[None], randn((1, 2500, 2), torch.float32, g))
    assert_same(dst, before)


# ---------------------------------------------------------------- layouts of the CUDA kernels' copy paths

LAYOUTS = ["contiguous", "last_strided", "misaligned", "permuted"]
# (B, H, N, D): D picks the CUDA copy unit (fp32 D=4 / fp16 D=8 -> 16 bytes, smaller D -> 8/4/2 bytes, D=33 ->
# element copies), D=768 / D=1030 exercise wide rows (whole-block rows, several units per thread).
ROW_SHAPES = [(1, 1, 1, 1), (2, 3, 7, 4), (3, 2, 64, 8), (2, 1, 33, 33), (1, 2, 17, 768), (2, 1, 5, 1030)]
# (B, H, M, N): columns are the last dim; N=40 > 32 gives several id tiles, M=1 the degenerate row walk.
COL_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 9, 40), (2, 1, 1, 64), (1, 2, 130, 33)]


def make(shape, dtype, layout, g):
    """Random tensor of `shape` with the given memory layout; also returns (base, view_fn) for aliasing checks."""
    shape = tuple(shape)
    if layout == "contiguous":
        base_shape, view = shape, lambda t: t
    elif layout == "last_strided":  # last-dim stride 2
        base_shape, view = (*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
    elif layout == "misaligned":  # unit last stride, but base offset and row stride of D+1 elements
        base_shape, view = (*shape[:-1], shape[-1] + 1), lambda t: t[..., 1:]
    elif layout == "permuted":  # last dim contiguous, token dim outermost in memory
        base_shape, view = (shape[-2], *shape[:-2], shape[-1]), lambda t: t.movedim(0, -2)
    else:
        raise ValueError(layout)
    base = torch.randn(base_shape, generator=g).to(dtype)
    x = view(base)
    assert x.shape == shape
    return x, base, view


def rand_index(B, N, K, idtype, g, unique, transposed=False):
    idx = make_index(B, N, K, idtype, g, unique=unique)
    return idx.t().contiguous().t() if transposed else idx  # transposed: strides (1, B)


def with_empty_rows(idx, g, frac=0.4, fill=-1):
    """``idx`` with about ``frac`` of its entries (random positions), the first two of the last batch row and, if
    B > 1, all of batch row 0 set to ``fill`` (-1, an empty slot, or a [B, K] tensor of ids outside [0, N))."""
    out = idx.clone()
    mask = torch.rand(out.shape, generator=g) < frac
    if out.shape[0] > 1:
        mask[0] = True
    if out.shape[0] > 0:
        mask[-1, :2] = True
    out[mask] = torch.as_tensor(fill, dtype=out.dtype).expand(out.shape)[mask]
    return out


def ks_for(N, unique):
    ks = sorted({0, 1, max(1, N // 2), N})
    return ks if unique else ks + [N + 3]


def as_rank(shape, rank):
    B, H, N, D = shape
    return (B, N, D) if rank == 3 else (B, H, N, D)


def _check_scatter_base(op, ref_op, dst, base, view, idx, src):
    """Runs op on dst (a view of base) and ref_op on a copy of base: the whole base must agree (gaps untouched)."""
    base_ref = base.clone()
    ref_op(view(base_ref), idx, src)
    idx_before, src_before = idx.clone(), src.clone()
    assert op(dst, idx, src) is dst
    assert torch.equal(base, base_ref)
    assert torch.equal(idx, idx_before) and torch.equal(src, src_before)


@over()
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_rows_copy_layouts(impl, dtype, idtype, layout, rank):
    impl.skip_unless_fast()
    g = gen(1)
    for shape in ROW_SHAPES:
        B, _, N, _ = shape
        x, _, _ = make(as_rank(shape, rank), dtype, layout, g)
        for K in ks_for(N, unique=False):
            idx = rand_index(B, N, K, idtype, g, unique=False, transposed=K % 2 == 1)
            _assert_gather(impl, "gather_rows", x, idx)


@over()
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_cols_copy_layouts(impl, dtype, idtype, layout, rank):
    impl.skip_unless_fast()
    g = gen(2)
    for shape in COL_SHAPES:
        B, _, _, N = shape
        x, _, _ = make(as_rank(shape, rank), dtype, layout, g)
        for K in ks_for(N, unique=False):
            idx = rand_index(B, N, K, idtype, g, unique=False, transposed=K % 2 == 1)
            _assert_gather(impl, "gather_cols", x, idx)


@over()
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_rows_copy_layouts(impl, dtype, idtype, layout, rank):
    impl.skip_unless_fast()
    g = gen(4)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]  # src and dst layouts differ
    for shape in ROW_SHAPES:
        B, H, N, D = shape
        for K in ks_for(N, unique=True):
            dst, base, view = make(as_rank(shape, rank), dtype, layout, g)
            src, _, _ = make(as_rank((B, H, K, D), rank), dtype, src_layout, g)
            idx = rand_index(B, N, K, idtype, g, unique=True, transposed=K % 2 == 1)
            _check_scatter_base(impl.scatter_rows_, R.scatter_rows_, dst, base, view, idx, src)


@over()
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_cols_copy_layouts(impl, dtype, idtype, layout, rank):
    impl.skip_unless_fast()
    g = gen(5)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    for shape in COL_SHAPES:
        B, H, M, N = shape
        for K in ks_for(N, unique=True):
            dst, base, view = make(as_rank(shape, rank), dtype, layout, g)
            src, _, _ = make(as_rank((B, H, M, K), rank), dtype, src_layout, g)
            idx = rand_index(B, N, K, idtype, g, unique=True, transposed=K % 2 == 1)
            _check_scatter_base(impl.scatter_cols_, R.scatter_cols_, dst, base, view, idx, src)


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_empty_slots_copy_layouts(impl, dtype, idtype, layout, check_index):
    impl.skip_unless_fast()
    g = gen(15)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    for cols, shapes in ((False, ROW_SHAPES), (True, COL_SHAPES)):
        gather, scatter = ("gather_cols", "scatter_cols_") if cols else ("gather_rows", "scatter_rows_")
        op = getattr(impl, scatter)

        def scatter_fn(d, i, s):
            return op(d, i, s, check_index=check_index)

        for rank in (3, 4):
            for shape in shapes:
                B, H, R1, R2 = shape
                N = R2 if cols else R1
                x, _, _ = make(as_rank(shape, rank), dtype, layout, g)
                for K in ks_for(N, unique=False):
                    idx = with_empty_rows(rand_index(B, N, K, idtype, g, unique=False), g)
                    _assert_gather(impl, gather, x, idx, check_index=check_index)
                for K in ks_for(N, unique=True):
                    dst, base, view = make(as_rank(shape, rank), dtype, layout, g)
                    src, _, _ = make(as_rank((B, H, R1, K) if cols else (B, H, K, R2), rank), dtype, src_layout, g)
                    idx = with_empty_rows(rand_index(B, N, K, idtype, g, unique=True), g)
                    if K % 2 == 1:
                        idx = idx.t().contiguous().t()
                    _check_scatter_base(scatter_fn, getattr(R, scatter), dst, base, view, idx, src)


@over()
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_unchecked_out_of_range_copy_layouts(impl, dtype, idtype):
    impl.skip_unless_fast()
    g = gen(17)
    for layout in LAYOUTS:
        for cols, shapes in ((False, ROW_SHAPES), (True, COL_SHAPES)):
            gather, scatter = ("gather_cols", "scatter_cols_") if cols else ("gather_rows", "scatter_rows_")
            op = getattr(impl, scatter)
            for shape in shapes:
                B, N = shape[0], shape[3] if cols else shape[2]
                x, base, view = make(shape, dtype, layout, g)
                idx = rand_index(B, N, N + 3, idtype, g, unique=False)
                idx = with_empty_rows(idx, g, fill=out_of_range_ids(idx.shape, N, idtype, g))
                _assert_gather(impl, gather, x, idx, check_index=False)
                uidx = rand_index(B, N, N, idtype, g, unique=True)
                uidx = with_empty_rows(uidx, g, fill=out_of_range_ids(uidx.shape, N, idtype, g))
                src, _, _ = make(shape, dtype, "contiguous", g)
                _check_scatter_base(lambda d, i, s: op(d, i, s, check_index=False), getattr(R, scatter), x, base,
                                    view, uidx, src)


@over()
def test_large_batch_grid_stride_and_round_trip(impl):
    """More row tasks than a capped CUDA grid has threads (grid-stride loops); a large scatter then gather."""
    impl.skip_unless_fast()
    g = gen(3)
    x = torch.randn(64, 512, 64, generator=g)
    idx = torch.randint(0, 512, (64, 1024), generator=g)
    assert torch.equal(impl.gather_rows(x, idx), R.gather_rows(x, idx))
    a = torch.randn(8, 4, 256, 512, generator=g)
    ia = torch.randint(0, 512, (8, 300), generator=g)
    assert torch.equal(impl.gather_cols(a, ia), R.gather_cols(a, ia))
    dst = torch.randn(4, 8, 1024, 64, generator=g).half()
    src = torch.randn(4, 8, 700, 64, generator=g).half()
    idx = make_index(4, 1024, 700, torch.int64, g)
    expected = R.scatter_rows_(dst.clone(), idx, src)
    impl.scatter_rows_(dst, idx, src)
    assert torch.equal(dst, expected)
    assert torch.equal(impl.gather_rows(dst, idx), src)


# ---------------------------------------------------------------- bad input: every backend, same words

def _rows_state():
    g = gen(10)
    return {"dst": randn((2, 6, 4), torch.float32, g), "src": randn((2, 2, 4), torch.float32, g),
            "src_cols": randn((2, 6, 2), torch.float32, g)}


_OK = torch.tensor([[1, 4], [0, 5]])
_DUP = torch.tensor([[1, 4], [3, 3]])
_OOB = torch.tensor([[1, 4], [0, 6]])
_NEG = torch.tensor([[-1, 4], [0, -2]])  # -1: an empty slot, accepted; -2: out of range
_PADS = torch.tensor([[-1, -1], [-5, -1]])
BAD = [  # (id, call(impl, state), exception, message fragment)
    ("gather_rows rank", lambda i, s: i.gather_rows(s["dst"][0, 0], _OK), RuntimeError, "'x' must have rank 3 or 4"),
    ("gather_rows dtype", lambda i, s: i.gather_rows(s["dst"].double(), _OK), RuntimeError, "'x' must be float32"),
    ("gather_rows index dtype", lambda i, s: i.gather_rows(s["dst"], _OK.float()), RuntimeError,
     "'index' must be int32 or int64"),
    ("gather_rows index batch", lambda i, s: i.gather_rows(s["dst"], _OK[:1]), RuntimeError,
     "'index' has size 1 at dim 0"),
    ("gather_rows index device", lambda i, s: i.gather_rows(s["dst"], _OK.to("meta")), RuntimeError,
     "'index' is on meta"),
    ("gather_rows oob", lambda i, s: i.gather_rows(s["dst"], _OOB), IndexError,
     "'index' holds 6 at [1, 1], out of range [0, 6)"),
    ("gather_rows negative", lambda i, s: i.gather_rows(s["dst"], _NEG), IndexError,
     "'index' holds -2 at [1, 1], out of range [0, 6)"),
    ("scatter_rows negative", lambda i, s: i.scatter_rows_(s["dst"], _PADS, s["src"]), IndexError,
     "'index' holds -5 at [1, 0], out of range [0, 6)"),
    ("scatter_rows N after -1", lambda i, s: i.scatter_rows_(s["dst"], torch.tensor([[-1, -1], [-1, 6]]), s["src"]),
     IndexError, "'index' holds 6 at [1, 1]"),
    ("scatter_cols -3", lambda i, s: i.scatter_cols_(s["dst"], torch.tensor([[-1, 3], [0, -3]]), s["src_cols"]),
     IndexError, "'index' holds -3 at [1, 1], out of range [0, 4)"),
    ("scatter_rows dup", lambda i, s: i.scatter_rows_(s["dst"], _DUP, s["src"]), RuntimeError,
     "'index' repeats token id 3 in row 1"),
    ("scatter_rows oob", lambda i, s: i.scatter_rows_(s["dst"], _OOB, s["src"]), IndexError, "'index' holds 6"),
    ("scatter_rows src dtype", lambda i, s: i.scatter_rows_(s["dst"], _OK, s["src"].half()), RuntimeError,
     "'src' has dtype Half but 'dst' has dtype Float"),
    ("scatter_rows src K", lambda i, s: i.scatter_rows_(s["dst"], _OK[:, :1], s["src"]), RuntimeError,
     "'src' has size 2 at dim 2 but K"),
    ("scatter_rows src D", lambda i, s: i.scatter_rows_(s["dst"], _OK, s["src"][..., :3]), RuntimeError,
     "the feature size of 'dst'"),
    ("scatter_rows overlap", lambda i, s: i.scatter_rows_(s["dst"][:, :1].expand(2, 6, 4), _OK, s["src"]),
     RuntimeError, "'dst' is written in place"),
    ("scatter_rows src in dst", lambda i, s: i.scatter_rows_(s["dst"], _OK, s["dst"][:, :2]), RuntimeError,
     "'dst' is written in place and must not share memory with 'src'"),
    ("gather_cols oob", lambda i, s: i.gather_cols(s["dst"], _OK), IndexError,
     "'index' holds 4 at [0, 1], out of range [0, 4)"),
    ("scatter_cols dup", lambda i, s: i.scatter_cols_(s["dst"], torch.tensor([[1, 1], [0, 2]]), s["src_cols"]),
     RuntimeError, "repeats token id 1 in row 0"),
    ("scatter_cols src rows", lambda i, s: i.scatter_cols_(s["dst"], _OK[:, :2] % 4, s["src"]), RuntimeError,
     "'src' has size 2 at dim 2 but the row count of 'dst'"),
    ("gather_rows x None", lambda i, s: i.gather_rows(None, _OK), TypeError, "'x' must be a Tensor, got None"),
    ("scatter_cols src None", lambda i, s: i.scatter_cols_(s["dst"], _OK, None), TypeError,
     "'src' must be a Tensor, got None"),
]


@over()
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_and_leaves_state_unchanged(impl, case):
    name, call, exc, fragment = case
    skip_meta_on_dispatcher(impl, name)
    run_bad_case(impl, _rows_state, call, exc, fragment)


@over()
@pytest.mark.parametrize("name", ["gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_"])
def test_messages_equal_the_cpu_backends(impl, name):
    """Same bad input, same exception type and message (or, where both accept it, the same result) as the C++ CPU
    kernels, checked and unchecked."""
    from op_support import BACKENDS
    cpu = BACKENDS["cpu"]
    g = gen(11)
    x = randn((2, 6, 4), torch.float32, g)
    src = randn((2, 2, 4), torch.float32, g) if name == "scatter_rows_" else randn((2, 6, 2), torch.float32, g)
    dup = torch.tensor([[1, 3], [2, 2]])
    bad = [torch.tensor([[1, 3], [0, 6]]), dup, torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[1, 2]]),
           torch.tensor([[-3, 1], [0, 1]]), torch.tensor([[-1, 3], [-1, -1]]), torch.tensor([[-1, -2], [0, 1]])]
    gather = name.startswith("gather")
    for idx in bad:
        for args in ([x, idx] if gather else [x, idx, src], [x.double(), idx] if gather else [x, idx, src.half()]):
            for kwargs in ({}, {"check_index": False}):
                if kwargs and idx is dup and not gather:  # unchecked duplicate writes: unspecified winner
                    continue
                ours, theirs = [a.clone() for a in args], [a.clone() for a in args]
                try:
                    want = getattr(cpu, name)(*theirs, **kwargs)
                except (RuntimeError, IndexError, TypeError, ValueError) as exc:
                    with pytest.raises(type(exc)) as got:
                        getattr(impl, name)(*ours, **kwargs)
                    assert str(got.value).split("\nException raised from")[0] == \
                        str(exc).split("\nException raised from")[0]
                    assert_same(ours[0], args[0])
                else:
                    out = getattr(impl, name)(*ours, **kwargs)
                    assert_same(out if gather else ours[0], want if gather else theirs[0])


# ---------------------------------------------------------------- GPU only

@over("cuda", "triton")
def test_unchecked_ops_are_cuda_graph_capturable(impl):
    """check_index=False launches kernels only (no flag read back), so a frame's gathers and scatters can be captured
    and replayed."""
    g = gen(19)
    x = torch.randn(2, 3, 64, 32, generator=g).cuda()
    a = torch.randn(2, 3, 16, 64, generator=g).cuda()
    idx = torch.tensor([[5, -1, 63, 0, -1], [-1, -1, 7, 8, 9]], device="cuda")
    x_ref, a_ref = x.clone(), a.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        impl.gather_rows(x, idx, check_index=False)
        impl.gather_cols(a, idx, check_index=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows = impl.gather_rows(x, idx, check_index=False)
        impl.scatter_rows_(x, idx, rows * 2, check_index=False)
        cols = impl.gather_cols(a, idx, check_index=False)
        impl.scatter_cols_(a, idx, cols + 1, check_index=False)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        r = R.gather_rows(x_ref, idx)
        R.scatter_rows_(x_ref, idx, r * 2)
        c = R.gather_cols(a_ref, idx)
        R.scatter_cols_(a_ref, idx, c + 1)
        assert torch.equal(x, x_ref) and torch.equal(a, a_ref) and torch.equal(rows, r) and torch.equal(cols, c)
