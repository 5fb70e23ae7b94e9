"""CPU gather_rows / scatter_rows_ / gather_cols / scatter_cols_ against eventful_kernels.reference.

These ops only move data, so every comparison is exact (torch.equal), for every dtype. Index entries -1 are empty
slots (zero rows / columns in a gather, no write in a scatter); with check_index=False every id outside [0, N) is one.
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


def make_index(b, n, k, dtype, gen, unique=True):
    """[b, k] ids in [0, n), distinct per row unless unique=False (then with repeats), unsorted."""
    if unique:
        rows = [torch.randperm(n, generator=gen)[:k] for _ in range(b)]
        return torch.stack(rows).to(dtype) if b else torch.empty(0, k, dtype=dtype)
    return torch.randint(0, n, (b, k), generator=gen).to(dtype)


def randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def clone_layout(t):
    """Copy of `t` in a fresh storage with the same offset and strides (clone() would compact a padded view)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride())


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_rows(shape, index_dtype, dtype):
    lead_dims, n, d, k, gen = _case(shape, dtype, index_dtype, "gr")
    x = randn((*lead_dims, n, d), dtype, gen)
    index = make_index(lead_dims[0], n, k, index_dtype, gen, unique=False)  # gather allows repeats
    y = ops.gather_rows(x, index)
    assert y.shape == (*lead_dims, k, d) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, reference.gather_rows(x, index))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_cols(shape, index_dtype, dtype):
    lead_dims, n, m, k, gen = _case(shape, dtype, index_dtype, "gc")
    x = randn((*lead_dims, m, n), dtype, gen)
    index = make_index(lead_dims[0], n, k, index_dtype, gen, unique=False)
    y = ops.gather_cols(x, index)
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_rows(shape, index_dtype, dtype):
    lead_dims, n, d, k, gen = _case(shape, dtype, index_dtype, "sr")
    dst, src = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, k, d), dtype, gen)
    check_scatter(ops.scatter_rows_, reference.scatter_rows_, dst, make_index(lead_dims[0], n, k, index_dtype, gen),
                  src)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_cols(shape, index_dtype, dtype):
    lead_dims, n, m, k, gen = _case(shape, dtype, index_dtype, "sc")
    dst, src = randn((*lead_dims, m, n), dtype, gen), randn((*lead_dims, m, k), dtype, gen)
    check_scatter(ops.scatter_cols_, reference.scatter_cols_, dst, make_index(lead_dims[0], n, k, index_dtype, gen),
                  src)


def strided_variants(t, gen):
    """`t`'s values in layouts with a non-unit last stride, a padded row stride and a permuted head dim."""
    yield t.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    wide = randn((*t.shape[:-1], t.shape[-1] + 3), t.dtype, gen)[..., : t.shape[-1]]
    yield wide.copy_(t)  # unit last stride, padded rows
    if t.dim() == 4:
        yield t.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory layout (qkv-style)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_strided_inputs_and_outputs(rank, dtype):
    gen = torch.Generator().manual_seed(seed_of(rank, dtype))
    lead_dims = (2,) if rank == 3 else (2, 3)
    n, d, k = 9, 6, 4
    index = make_index(2, n, k, torch.int64, gen).t().contiguous().t()  # non-contiguous index
    assert not index.is_contiguous()
    x = randn((*lead_dims, n, d), dtype, gen)
    for xs in strided_variants(x, gen):
        assert not xs.is_contiguous()
        assert torch.equal(ops.gather_rows(xs, index), reference.gather_rows(x, index))
        assert torch.equal(ops.gather_cols(xs, index[:, :3] % d), reference.gather_cols(x, index[:, :3] % d))
    xb = x[:1].expand(x.shape)  # broadcast (stride-0) input
    assert torch.equal(ops.gather_rows(xb, index), reference.gather_rows(xb.contiguous(), index))
    assert torch.equal(ops.gather_cols(xb, index[:, :3] % d), reference.gather_cols(xb.contiguous(), index[:, :3] % d))
    src_rows = randn((*lead_dims, k, d), dtype, gen)
    src_cols = randn((*lead_dims, n, k), dtype, gen)
    dst_cols_base = randn((*lead_dims, n, 2 * d), dtype, gen)
    for dst in strided_variants(x, gen):
        for src in strided_variants(src_rows, gen):
            check_scatter(ops.scatter_rows_, reference.scatter_rows_, dst, index, src)
    check_scatter(ops.scatter_rows_, reference.scatter_rows_, x, index, src_rows[:1].expand(src_rows.shape))
    check_scatter(ops.scatter_cols_, reference.scatter_cols_, dst_cols_base, index, src_cols[:1].expand(src_cols.shape))
    for dst in strided_variants(dst_cols_base, gen):
        for src in strided_variants(src_cols, gen):
            check_scatter(ops.scatter_cols_, reference.scatter_cols_, dst, index, src)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 3), h=st.one_of(st.none(), st.integers(1, 3)), n=st.integers(1, 16), d=st.integers(1, 9),
    frac=st.floats(0, 1), dtype=st.sampled_from(FLOATS), index_dtype=st.sampled_from(INDEX_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(b, h, n, d, frac, dtype, index_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lead_dims = (b,) if h is None else (b, h)
    k = round(frac * n)
    index = make_index(b, n, k, index_dtype, gen)
    x_rows, x_cols = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, d, n), dtype, gen)
    assert torch.equal(ops.gather_rows(x_rows, index), reference.gather_rows(x_rows, index))
    assert torch.equal(ops.gather_cols(x_cols, index), reference.gather_cols(x_cols, index))
    check_scatter(ops.scatter_rows_, reference.scatter_rows_, x_rows, index, randn((*lead_dims, k, d), dtype, gen))
    check_scatter(ops.scatter_cols_, reference.scatter_cols_, x_cols, index, randn((*lead_dims, d, k), dtype, gen))


@pytest.mark.parametrize("rank", [3, 4])
def test_opcheck(rank):
    gen = torch.Generator().manual_seed(rank)
    lead_dims = (2,) if rank == 3 else (2, 3)
    index = make_index(2, 7, 3, torch.int64, gen)
    x = randn((*lead_dims, 7, 5), torch.float32, gen)
    e = torch.ops.eventful
    torch.library.opcheck(e.gather_rows.default, (x, index))
    torch.library.opcheck(e.gather_cols.default, (x.transpose(-1, -2).contiguous(), index))
    torch.library.opcheck(e.scatter_rows_.default, (x.clone(), index, randn((*lead_dims, 3, 5), torch.float32, gen)))
    torch.library.opcheck(e.scatter_cols_.default, (x.clone(), index[:, :2] % 5,
                                                    randn((*lead_dims, 7, 2), torch.float32, gen)))


# ------------------------------------------------------------------------------------------- empty slots

OPS = {  # name: (op, reference, token dim of the indexed operand, True for a scatter)
    "gather_rows": (ops.gather_rows, reference.gather_rows, -2, False),
    "gather_cols": (ops.gather_cols, reference.gather_cols, -1, False),
    "scatter_rows_": (ops.scatter_rows_, reference.scatter_rows_, -2, True),
    "scatter_cols_": (ops.scatter_cols_, reference.scatter_cols_, -1, True),
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
    _, _, dim, scatter = OPS[name]
    shape = (*lead_dims, n, d) if dim == -2 else (*lead_dims, d, n)
    src_shape = (*lead_dims, k, d) if dim == -2 else (*lead_dims, d, k)
    return randn(shape, dtype, gen), randn(src_shape, dtype, gen) if scatter else None


def run_and_compare(name, x, index, src, **kwargs):
    op, ref_op, _, scatter = OPS[name]
    if scatter:
        check_scatter(op, ref_op, x, index, src, **kwargs)
        return
    y = op(x, index, **kwargs)
    assert y.is_contiguous() and y.dtype == x.dtype
    assert torch.equal(y, ref_op(x, index))


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_empty_slots(name, dtype, index_dtype, shape, check_index):
    lead_dims, n, d, k, empty_row = shape
    gen = torch.Generator().manual_seed(seed_of(name, shape, dtype, index_dtype))
    x, src = operands(name, lead_dims, n, d, k, dtype, gen)
    if n > 0:
        base = make_index(lead_dims[0], n, k, index_dtype, gen, unique=OPS[name][3])
    else:
        base = torch.zeros(lead_dims[0], k, dtype=index_dtype)
    index = with_empty_slots(base, gen, frac=0.4 if n > 0 else 1.0, empty_rows=(0,) if empty_row else ())
    if k > 1 and n > 0:
        index[-1, :2] = -1  # repeated -1 in one row (scatters too)
    run_and_compare(name, x, index, src, check_index=check_index)
    if name.startswith("gather") and k > 0:  # zero rows / columns exactly where the slots are empty
        y = OPS[name][0](x, index, check_index=check_index)
        empty = (index < 0)[(slice(None),) + (None,) * (len(lead_dims) - 1)]
        empty = empty[..., :, None] if OPS[name][2] == -2 else empty[..., None, :]
        assert bool((y == 0).logical_or(~empty).all())


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_unchecked_out_of_range_ids_are_empty_slots(name, dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) read and write nothing."""
    gen = torch.Generator().manual_seed(seed_of(name, dtype, index_dtype, "oor"))
    for lead_dims, n, d, k, _ in EMPTY_SHAPES[:-1]:
        x, src = operands(name, lead_dims, n, d, k, dtype, gen)
        index = out_of_range(make_index(lead_dims[0], n, k, index_dtype, gen, unique=OPS[name][3]), n, gen)
        run_and_compare(name, x, index, src, check_index=False)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_unchecked_valid_ids_equal_checked(name, index_dtype):
    gen = torch.Generator().manual_seed(seed_of(name, index_dtype, "same"))
    op, _, _, scatter = OPS[name]
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


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_empty_slots_strided(dtype, rank, check_index):
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
        assert torch.equal(ops.gather_rows(xs, index, check_index=check_index), reference.gather_rows(x, index))
        assert torch.equal(ops.gather_cols(xs, cols_index, check_index=check_index),
                           reference.gather_cols(x, cols_index))
    src_rows, src_cols = randn((*lead_dims, k, d), dtype, gen), randn((*lead_dims, n, k), dtype, gen)
    dst_cols = randn((*lead_dims, n, 2 * d), dtype, gen)
    for dst in strided_variants(x, gen):
        for src in strided_variants(src_rows, gen):
            check_scatter(ops.scatter_rows_, reference.scatter_rows_, dst, index, src, check_index=check_index)
    for dst in strided_variants(dst_cols, gen):
        for src in strided_variants(src_cols, gen):
            check_scatter(ops.scatter_cols_, reference.scatter_cols_, dst, index, src, check_index=check_index)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 3), h=st.one_of(st.none(), st.integers(1, 3)), n=st.integers(1, 16), d=st.integers(1, 9),
    frac=st.floats(0, 1), empty=st.floats(0, 1), check_index=st.booleans(), dtype=st.sampled_from(FLOATS),
    index_dtype=st.sampled_from(INDEX_DTYPES), seed=st.integers(0, 2**16),
)
def test_random_empty_slots(b, h, n, d, frac, empty, check_index, dtype, index_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lead_dims = (b,) if h is None else (b, h)
    k = round(frac * n)
    index = make_index(b, n, k, index_dtype, gen)
    index = with_empty_slots(index, gen, empty) if check_index else out_of_range(index, n, gen, empty)
    x_rows, x_cols = randn((*lead_dims, n, d), dtype, gen), randn((*lead_dims, d, n), dtype, gen)
    kw = dict(check_index=check_index)
    assert torch.equal(ops.gather_rows(x_rows, index, **kw), reference.gather_rows(x_rows, index))
    assert torch.equal(ops.gather_cols(x_cols, index, **kw), reference.gather_cols(x_cols, index))
    check_scatter(ops.scatter_rows_, reference.scatter_rows_, x_rows, index, randn((*lead_dims, k, d), dtype, gen),
                  **kw)
    check_scatter(ops.scatter_cols_, reference.scatter_cols_, x_cols, index, randn((*lead_dims, d, k), dtype, gen),
                  **kw)


def test_unchecked_duplicates_write_one_of_the_values():
    """check_index=False with a repeated id in a scatter: no crash, the target gets one of the written values and
    nothing else changes."""
    gen = torch.Generator().manual_seed(21)
    dst, src = randn((2, 3, 8, 5), torch.float32, gen), randn((2, 3, 4, 5), torch.float32, gen)
    index = torch.tensor([[2, 6, 2, 2], [0, 1, 7, 1]])
    out = dst.clone()
    ops.scatter_rows_(out, index, src, check_index=False)
    for b, rows in ((0, {6: [1], 2: [0, 2, 3]}), (1, {0: [0], 7: [2], 1: [1, 3]})):
        for tok, slots in rows.items():
            assert any(torch.equal(out[b, :, tok], src[b, :, j]) for j in slots)
    untouched = [t for t in range(8) if t not in (0, 1, 2, 6, 7)]
    assert torch.equal(out[:, :, untouched], dst[:, :, untouched])
    cols = dst.transpose(-1, -2).contiguous()  # [2, 3, 5, 8]
    out = cols.clone()
    ops.scatter_cols_(out, index, src.transpose(-1, -2).contiguous(), check_index=False)
    assert torch.equal(out[0, :, :, 6], src[0, :, 1]) and torch.equal(out[..., untouched], cols[..., untouched])
    assert any(torch.equal(out[0, :, :, 2], src[0, :, j]) for j in (0, 2, 3))


@pytest.mark.parametrize("rank", [3, 4])
def test_opcheck_empty_slots_and_unchecked(rank):
    gen = torch.Generator().manual_seed(rank + 10)
    lead_dims = (2,) if rank == 3 else (2, 3)
    index = torch.tensor([[3, -1, 0], [-1, -1, 6]])
    x = randn((*lead_dims, 7, 5), torch.float32, gen)
    xc = x.transpose(-1, -2).contiguous()
    src_rows, src_cols = randn((*lead_dims, 3, 5), torch.float32, gen), randn((*lead_dims, 5, 3), torch.float32, gen)
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


@pytest.mark.parametrize("op_name", ["gather_rows", "gather_cols"])
@pytest.mark.parametrize("case", sorted(GATHER_BAD))
def test_gather_bad_input(op_name, case):
    fix, exc, name = GATHER_BAD[case]
    a = _args()
    x = a["x"] if op_name == "gather_rows" else a["x"].transpose(-1, -2).contiguous()  # [2, 4, 6]: 6 columns
    x_bad, index = fix(x, a["index"])
    before = x_bad.clone()
    with pytest.raises(exc, match=name):
        getattr(ops, op_name)(x_bad, index)
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


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("case", sorted(SCATTER_BAD) + ["src_overlaps_dst"])
def test_scatter_bad_input(rows, case):
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
        (ops.scatter_rows_ if rows else ops.scatter_cols_)(dst, index, src)
    assert torch.equal(dst, before)
    assert torch.equal(src, src_before)


VALUE_CASES = {"index_range", "index_negative", "index_minus_two", "index_n", "index_n_after_empty",
               "index_duplicate", "index_duplicate_after_empty"}


@pytest.mark.parametrize("op_name", ["gather_rows", "gather_cols", "scatter_rows_", "scatter_cols_"])
def test_unchecked_still_checks_metadata(op_name):
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
            getattr(ops, op_name)(*args, check_index=False)
        assert all(torch.equal(t, b) for t, b in zip(args, before)), case
    if scatter:
        dst = a["x"] if rows else a["x"].transpose(-1, -2).contiguous()
        dst, index, src = _src_view_of_dst(dst, a["index"], a["src_rows"] if rows else a["src_cols"][:, :4], rows)
        with pytest.raises(RuntimeError, match="'dst'.*'src'"):
            getattr(ops, op_name)(dst, index, src, check_index=False)
