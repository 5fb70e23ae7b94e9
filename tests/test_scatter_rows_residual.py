"""scatter_rows_residual_ (family ``gather_scatter``) on every backend (tests/op_support.py) against
eventful_kernels.reference: ``dst[b, index[b, k]] = src[b, k]`` in place, ``y = residual + dst`` (``* scale``).

Every comparison is exact (torch.equal, NaN equal to NaN), for every dtype: each kernel computes in float32 with one
rounding (a fused multiply-add with a scale, as the reference's torch.addcmul) and rounds once to the element type.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from eventful_kernels import reference as R

from op_support import (FLOATS, INDEX_DTYPES, assert_same, assert_same_guards, clone_layout, gen, guarded,
                        index_with_empty, make_index, opcheck, out_of_range, over, randn, run_bad_case, seed_of,
                        strided, strided_index)


# (B, N, D, K)
SHAPES = [
    (1, 8, 5, 3),
    (3, 10, 4, 6),  # B > 1
    (2, 7, 3, 0),  # K = 0
    (2, 9, 6, 9),  # K = N
    (2, 197, 64, 49),  # several tiles per batch row, 16-byte rows
    (1, 70, 24, 70),  # K = N over several tiles
    (2, 33, 35, 17),  # odd D: element-wise accesses
]


def _operands(b, n, d, k, dtype, index_dtype, g, scaled):
    dst, src, res = randn((b, n, d), dtype, g), randn((b, k, d), dtype, g), randn((b, n, d), dtype, g)
    scale = randn((d,), dtype, g) if scaled else None
    return dst, make_index(b, n, k, index_dtype, g), src, res, scale


def check(impl, dst, index, src, residual, scale=None, **kwargs):
    """The op on a same-layout copy of dst equals the reference: dst everywhere (so nothing else is touched) and
    y; y is a new contiguous tensor; the read-only operands are unchanged."""
    ours = clone_layout(dst)
    want_dst = dst.clone()
    want_y = R.scatter_rows_residual_(want_dst, index, src, residual, scale)
    before = [t.clone() for t in (index, src, residual) + ((scale,) if scale is not None else ())]
    y = impl.scatter_rows_residual_(ours, index, src, residual, scale, **kwargs)
    assert y.shape == dst.shape and y.dtype == dst.dtype and y.is_contiguous()
    assert_same(ours, want_dst)
    assert_same(y, want_y)
    after = [index, src, residual] + ([scale] if scale is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    return y


@over()
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_matches_reference(impl, dtype, index_dtype, shape, scaled):
    if shape[1] > 100:
        impl.skip_unless_fast()
    g = gen(seed_of(shape, dtype, index_dtype, scaled))
    check(impl, *_operands(*shape, dtype, index_dtype, g, scaled))


@over()
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unchecked_matches_checked(impl, dtype, scaled):
    g = gen(seed_of("unchecked", dtype, scaled))
    dst, index, src, res, scale = _operands(2, 40, 16, 13, dtype, torch.int64, g, scaled)
    y = check(impl, dst, index, src, res, scale, check_index=False)
    assert_same(y, check(impl, dst, index, src, res, scale))


@over()
@pytest.mark.parametrize("layout", ["step", "colmajor"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_strided_operands(impl, dtype, layout):
    """Every operand a strided view (dst inside a guarded buffer: nothing around it is written)."""
    g = gen(seed_of("strided", dtype, layout))
    b, n, d, k = 2, 24, 16, 9
    view, buf = guarded((b, n, d), dtype, g)
    dst = strided(view.clone(), layout) if layout == "colmajor" else view
    src, res = strided(randn((b, k, d), dtype, g), layout), strided(randn((b, n, d), dtype, g), layout)
    scale = randn((2 * d,), dtype, g)[::2]
    index = strided_index(make_index(b, n, k, torch.int32, g))
    before = buf.clone()
    want_dst = dst.clone()
    want_y = R.scatter_rows_residual_(want_dst, index, src, res, scale)
    y = impl.scatter_rows_residual_(dst, index, src, res, scale)
    assert_same(dst, want_dst)
    assert_same(y, want_y)
    if layout == "step":
        assert_same_guards(buf, before)


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_slots(impl, dtype, check_index):
    """-1 slots write nothing (row 1: only -1, so dst is left alone and y = residual + dst there)."""
    g = gen(seed_of("empty", dtype, check_index))
    b, n, d, k = 3, 21, 8, 12
    dst, _, src, res, scale = _operands(b, n, d, k, dtype, torch.int64, g, True)
    index = index_with_empty(b, k, n, torch.int64, g)
    y = check(impl, dst, index, src, res, scale, check_index=check_index)
    assert_same(y[1], R.scatter_rows_residual_(dst[1:2].clone(), index[1:2], src[1:2], res[1:2], scale)[0])


@over()
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_unchecked_out_of_range_ids_are_empty_slots(impl, index_dtype):
    g = gen(seed_of("oob", index_dtype))
    b, n, d, k = 2, 30, 8, 10
    dst, index, src, res, _ = _operands(b, n, d, k, torch.float32, index_dtype, g, False)
    bad = out_of_range(index, n, g)
    empty = torch.where((bad.long() >= 0) & (bad.long() < n), bad, torch.full_like(bad, -1))
    ours = dst.clone()
    y = impl.scatter_rows_residual_(ours, bad, src, res, check_index=False)
    want_dst = dst.clone()
    assert_same(y, R.scatter_rows_residual_(want_dst, empty, src, res))
    assert_same(ours, want_dst)


@over()
def test_non_finite_values_pass_through(impl):
    """NaN and ±inf in any operand reach y as the reference's arithmetic makes them."""
    g = gen(3)
    dst, index, src, res, scale = _operands(2, 12, 8, 5, torch.float32, torch.int64, g, True)
    dst[0, 0, 0], src[1, 2, 3], res[0, 5, 1], scale[4] = float("nan"), float("inf"), float("-inf"), float("inf")
    check(impl, dst, index, src, res, scale)


@over("cpu", "cuda_emu")
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 300), d=st.integers(1, 40), frac=st.floats(0, 1),
       scaled=st.booleans(), dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(impl, b, n, d, frac, scaled, dtype, seed):
    g = gen(seed)
    k = int(round(frac * n))
    check(impl, *_operands(b, n, d, k, dtype, torch.int64, g, scaled), check_index=False)


@over("cpu", "cuda")
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_opcheck(impl, scaled):
    g = gen(4)
    dst, index, src, res, scale = _operands(2, 9, 8, 4, torch.float32, torch.int64, g, scaled)
    opcheck(impl, torch.ops.eventful.scatter_rows_residual_.default, (dst, index, src, res, scale))


# ---------------------------------------------------------------- bad input: a clear error, nothing written

def _state():
    g = gen(5)
    dst, src, res = randn((2, 6, 4), torch.float32, g), randn((2, 3, 4), torch.float32, g), \
        randn((2, 6, 4), torch.float32, g)
    return {"dst": dst, "index": torch.tensor([[0, 4, 2], [5, 1, 3]]), "src": src, "residual": res,
            "scale": randn((4,), torch.float32, g)}


def _call(impl, s, **changes):
    a = {**s, **changes}
    return impl.scatter_rows_residual_(a["dst"], a["index"], a["src"], a["residual"], a["scale"])


BAD = {  # name: (call, error type, message fragment)
    "dst_rank4": (lambda i, s: _call(i, s, dst=s["dst"][:, None], src=s["src"][:, None]), RuntimeError,
                  "'dst' must have rank 3"),
    "dst_int": (lambda i, s: _call(i, s, dst=s["dst"].int()), RuntimeError, "'dst'"),
    "dst_expanded": (lambda i, s: _call(i, s, dst=s["dst"][:1].expand(2, 6, 4)), RuntimeError, "'dst'"),
    "src_dtype": (lambda i, s: _call(i, s, src=s["src"].half()), RuntimeError, "'src'"),
    "src_k": (lambda i, s: _call(i, s, src=s["src"][:, :2]), RuntimeError, "'src'"),
    "src_d": (lambda i, s: _call(i, s, src=s["src"][..., :3]), RuntimeError, "'src'"),
    "index_float": (lambda i, s: _call(i, s, index=s["index"].float()), RuntimeError, "'index'"),
    "index_batch": (lambda i, s: _call(i, s, index=s["index"][:1]), RuntimeError, "'index'"),
    "index_range": (lambda i, s: _call(i, s, index=s["index"] + 3), IndexError, "'index' holds"),
    "index_duplicate": (lambda i, s: _call(i, s, index=torch.tensor([[0, 4, 2], [5, 1, 5]])), RuntimeError,
                        "'index' repeats token id 5 in row 1"),
    "residual_rank": (lambda i, s: _call(i, s, residual=s["residual"][0]), RuntimeError, "'residual'"),
    "residual_tokens": (lambda i, s: _call(i, s, residual=s["residual"][:, :5]), RuntimeError,
                        "'residual' has size 5 at dim 1 but the token count of 'dst' is 6"),
    "residual_dtype": (lambda i, s: _call(i, s, residual=s["residual"].double()), RuntimeError, "'residual'"),
    "residual_is_dst": (lambda i, s: _call(i, s, residual=s["dst"]), RuntimeError,
                        "'dst' is written in place and must not share memory with 'residual'"),
    "src_inside_dst": (lambda i, s: _call(i, s, src=s["dst"][:, :3]), RuntimeError, "'dst'"),
    "scale_size": (lambda i, s: _call(i, s, scale=s["scale"][:3]), RuntimeError, "'scale'"),
    "scale_rank": (lambda i, s: _call(i, s, scale=s["scale"][None]), RuntimeError, "'scale' must have rank 1"),
    "scale_dtype": (lambda i, s: _call(i, s, scale=s["scale"].half()), RuntimeError, "'scale'"),
    "residual_none": (lambda i, s: _call(i, s, residual=None), TypeError, "'residual' must be a Tensor, got None"),
}


@over()
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(impl, case):
    call, exc, fragment = BAD[case]
    run_bad_case(impl, _state, call, exc, fragment)
