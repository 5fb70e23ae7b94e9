"""Token gates (family ``token_gate``: token_gate, token_gate_threshold, token_delta_gate) on every backend
(tests/op_support.py) against eventful_kernels.reference.

Two oracles:
* integer-valued c and ref (exact in fp32/fp16/bf16): every difference, square and partial sum is an exact float32
  integer, so the score does not depend on summation order and the kernel must equal the reference bit for bit,
  including the tie rule (small integers give many exact ties);
* random float data: the kernel sums in a different order than torch, so near-ties may legitimately flip. The
  selection is checked against float64 scores with a tolerance, and against the reference exactly wherever the
  selection boundary is wider than that tolerance. Data movement (c_sel, e_sel, ref) is always checked exactly.
"""
from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eventful_kernels import reference as R

from op_support import (FLOATS, INDEX_DTYPES, assert_same, gen, guarded, index_with_empty, make_index, over, randn,
                        run_bad_case, skip_meta_on_dispatcher, strided, strided_index)

DTYPES = FLOATS
LAYOUTS = ["contig", "transposed", "sliced", "token_major"]
ERRORS = (RuntimeError, ValueError, IndexError)


# ---------------------------------------------------------------- inputs

def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``t [B, N, D]`` in a given memory layout (all but 'contig' are non-contiguous views)."""
    if kind == "contig":
        return t.clone()
    if kind == "transposed":  # feature stride N, not 1
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":  # strided slice of a larger buffer (token stride 2 rows, feature stride 2)
        b, n, d = t.shape
        big = torch.zeros(b, 2 * n + 1, 2 * d + 1, dtype=t.dtype)
        big[:, 1::2, 1::2] = t
        return big[:, 1::2, 1::2]
    if kind == "token_major":  # batch stride smaller than token stride
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(kind)


def make_pair(shape, dtype, integer: bool, seed: int):
    """(c, ref) contiguous. Integer data lies in [-4, 4] so scores are exact (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        return tuple(torch.randint(-4, 5, shape, generator=g).to(dtype) for _ in range(2))
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(2))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of shape, dtype and values, with NaN == NaN (torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def exact_scores(c: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (c.double() - ref.double()).pow(2).sum(-1).sqrt()


def score_tol(scores: torch.Tensor, d: int) -> float:
    # float32 summation of d squares: relative error <= d * 2^-24 for any order; 4x margin, plus sqrt rounding.
    return 4.0 * (d + 1) * 2.0**-24 * float(scores.max().clamp(min=1.0))


def rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for ids in [0, N) (other ids are empty slots: zero rows), computed by plain indexing."""
    out = torch.zeros(index.shape[0], index.shape[1], x.shape[2], dtype=x.dtype)
    for b in range(index.shape[0]):
        valid = (index[b] >= 0) & (index[b] < x.shape[1])
        out[b, valid] = x[b, index[b, valid]]
    return out


def expected_ref(ref_before: torch.Tensor, c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = ref_before.clone()
    for b in range(index.shape[0]):
        sel = index[b][(index[b] >= 0) & (index[b] < c.shape[1])]
        out[b, sel] = c[b, sel]
    return out


# ---------------------------------------------------------------- checkers

def check_movement(c, ref_before, ref_after, index, c_sel, e_sel=None):
    """Exact data movement for any selection: c_sel = c[index], ref updated only at index, e_sel in float."""
    assert index.dtype == torch.long
    assert c_sel.dtype == c.dtype and c_sel.is_contiguous()
    assert same(c_sel, rows_at(c, index))
    assert same(ref_after, expected_ref(ref_before, c, index))
    if e_sel is not None:
        assert e_sel.dtype == c.dtype
        want = (rows_at(c, index).float() - rows_at(ref_before, index).float()).to(c.dtype)
        assert same(e_sel, want)


def check_topk_selection(c, ref_before, index, k, ref_index):
    """Valid top-k under tolerance; equal to the reference wherever the k-th/(k+1)-th gap exceeds it."""
    b, n, d = c.shape
    assert index.shape == (b, k)
    s = exact_scores(c, ref_before)
    tol = score_tol(s, d)
    for i in range(b):
        row = index[i]
        assert torch.all(row[1:] > row[:-1]), "index must be strictly ascending"
        assert 0 <= k and (k == 0 or (row.min() >= 0 and row.max() < n))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[row] = True
        if 0 < k < n:
            assert s[i][mask].min() >= s[i][~mask].max() - tol
            top = torch.sort(s[i], descending=True).values
            if top[k - 1] - top[k] > 2 * tol:
                assert same(row, ref_index[i])


def run_both(impl, op_name, c, ref, *args, **kwargs):
    """Run the op on (c, ref) in place and the reference on contiguous clones; returns (out, ref_out, ref_ref)."""
    ref_before = ref.clone()
    r_ref = ref.clone()
    want = getattr(R, op_name)(c.clone(), r_ref, *args)
    got = getattr(impl, op_name)(c, ref, *args, **kwargs)
    return got, want, ref_before, r_ref


def assert_gate(impl, c, ref, k, integer):
    got, want, ref_before, r_ref = run_both(impl, "token_gate", c, ref, k)
    index, c_sel = got
    check_movement(c, ref_before, ref, index, c_sel)
    if integer:
        assert same(index, want[0]) and same(c_sel, want[1]) and same(ref, r_ref)
    else:
        check_topk_selection(c, ref_before, index, k, want[0])


def assert_delta_gate(impl, c, ref, k, integer, index=None, **kwargs):
    got, want, ref_before, r_ref = run_both(impl, "token_delta_gate", c, ref, k, index, **kwargs)
    idx, c_sel, e_sel = got
    check_movement(c, ref_before, ref, idx, c_sel, e_sel)
    if integer or index is not None:
        for g, w in zip(got, want):
            assert same(g, w)
        assert same(ref, r_ref)
    else:
        check_topk_selection(c, ref_before, idx, k, want[0])


def assert_threshold(impl, c, ref, thr, cap, integer):
    got, want, ref_before, r_ref = run_both(impl, "token_gate_threshold", c, ref, thr, cap)
    index, count, c_sel = got
    b, n, d = c.shape
    assert index.shape == (b, cap) and count.shape == (b,) and c_sel.shape == (b, cap, d)
    assert count.dtype == torch.long
    check_movement(c, ref_before, ref, index, c_sel)
    if integer:
        for g, w in zip(got, want):
            assert same(g, w)
        assert same(ref, r_ref)
        return
    s = exact_scores(c, ref_before)
    tol = score_tol(s, d)
    for i in range(b):
        m = int(count[i])
        sel, pad = index[i, :m], index[i, m:]
        assert torch.all(pad == -1) and torch.all(sel[1:] > sel[:-1]) and m <= min(cap, n)
        assert m == 0 or sel.min() >= 0
        mask = torch.zeros(n, dtype=torch.bool)
        mask[sel] = True
        assert torch.all(s[i][mask] > thr - tol)
        qualifying_unselected = s[i][~mask] > thr + tol
        if m < cap:  # room left: every clearly qualifying token was taken
            assert not qualifying_unselected.any()
        else:  # full: the kept ones are the largest of those passing
            rest = s[i][~mask & (s[i] > thr - tol)]
            if m > 0 and rest.numel() > 0:
                assert s[i][mask].min() >= rest.max() - tol
        near = ((s[i] - thr).abs() <= tol).any()
        top = torch.sort(s[i], descending=True).values
        clear_cut = m == 0 or m == n or top[m - 1] - top[m] > 2 * tol
        if not near and clear_cut:
            assert same(index[i], want[0][i]) and int(count[i]) == int(want[1][i])


# ---------------------------------------------------------------- parametrized against the reference

SHAPES = [(1, 1, 1), (1, 1, 8), (2, 7, 5), (3, 16, 33), (2, 40, 16), (1, 64, 70)]


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate(impl, dtype, shape, integer):
    impl.skip_unless_fast()
    n = shape[1]
    for k in sorted({0, min(1, n), n // 2, max(n - 1, 0), n}):
        c, ref = make_pair(shape, dtype, integer, seed=sum(shape) * 31 + k)
        assert_gate(impl, c, ref, k, integer)


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_c,layout_ref", [(a, b) for a in LAYOUTS for b in LAYOUTS if a != b or a != "contig"])
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate_strided(impl, dtype, layout_c, layout_ref, integer):
    impl.skip_unless_fast()
    c0, r0 = make_pair((2, 24, 21), dtype, integer, seed=7)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_gate(impl, c, ref, 9, integer)
    if layout_ref != "contig":  # the update went through the view into its buffer
        assert not ref.is_contiguous()


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_delta_gate_topk(impl, dtype, shape, integer):
    impl.skip_unless_fast()
    n = shape[1]
    for k in sorted({0, 1, n // 2, n}):
        c, ref = make_pair(shape, dtype, integer, seed=11 + k)
        assert_delta_gate(impl, c, ref, k, integer)


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 9, 17), (3, 32, 24)])
@pytest.mark.parametrize("k_arg", ["minus_one", "equal"])
def test_token_delta_gate_forced_index(impl, dtype, index_dtype, shape, k_arg):
    impl.skip_unless_fast()
    b, n, _ = shape
    g = torch.Generator().manual_seed(n)
    for kk in sorted({0, 1, n // 2, n}):
        # unsorted, distinct ids: the given order is kept
        given = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b)]).to(index_dtype)
        c, ref = make_pair(shape, dtype, integer=False, seed=kk)
        k = -1 if k_arg == "minus_one" else kk
        before = given.clone()
        assert_delta_gate(impl, c, ref, k, integer=False, index=given)
        assert same(given, before)


@over()
@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "sliced"), ("sliced", "token_major")])
def test_token_delta_gate_strided_and_strided_index(impl, layout_c, layout_ref):
    c0, r0 = make_pair((3, 20, 19), torch.float16, integer=True, seed=3)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_delta_gate(impl, c, ref, 6, integer=True)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    given = torch.tensor([[5, 2, 19, 0], [1, 3, 4, 7], [18, 17, 16, 15]], dtype=torch.int32).t().contiguous().t()
    assert not given.is_contiguous()
    assert_delta_gate(impl, c, ref, 4, integer=False, index=given)


def forced_index(b, n, kk, index_dtype, g, empty_frac, empty_row=None):
    """[b, kk] distinct ids in [0, n) (kk <= n), unsorted, with about `empty_frac` of the slots (random positions)
    and the whole of row `empty_row` set to -1."""
    index = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b)]).to(index_dtype)
    index[torch.rand(index.shape, generator=g) < empty_frac] = -1
    if empty_row is not None:
        index[empty_row] = -1
    return index


@over()
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 9, 17), (3, 32, 24)])
def test_token_delta_gate_empty_slots(impl, dtype, index_dtype, shape, check_index):
    """Forced index with -1 slots (repeated, a row of only -1 when B > 1): zero c_sel / e_sel rows there, ref
    untouched there, the rest exactly as the reference."""
    impl.skip_unless_fast()
    b, n, _ = shape
    g = torch.Generator().manual_seed(n + 100)
    for kk in sorted({0, 1, n // 2, n}):
        given = forced_index(b, n, kk, index_dtype, g, 0.4, empty_row=1 if b > 1 else None)
        if kk >= 2:
            given[0, :2] = -1
        c, ref = make_pair(shape, dtype, integer=False, seed=kk)
        before = given.clone()
        assert_delta_gate(impl, c, ref, -1, integer=False, index=given, check_index=check_index)
        assert same(given, before)
        _, c_sel, e_sel = impl.token_delta_gate(c, ref.clone(), kk, given, check_index=check_index)
        empty = (given < 0)[..., None].expand_as(c_sel)
        assert bool((c_sel[empty] == 0).all()) and bool((e_sel[empty] == 0).all())


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_token_delta_gate_unchecked_out_of_range_ids(impl, dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) are empty slots like -1."""
    impl.skip_unless_fast()
    g = torch.Generator().manual_seed(5)
    b, n, d = 3, 12, 10
    given = forced_index(b, n, 8, index_dtype, g, 0.0)
    bad = torch.tensor([n, 2 * n + 3, -5, torch.iinfo(index_dtype).max, -1], dtype=index_dtype)
    given[0, :5] = bad
    given[1, 3] = bad[1]
    given[2] = bad[torch.randint(0, 5, (8,), generator=g)]
    for integer in (True, False):
        c, ref = make_pair((b, n, d), dtype, integer, seed=3)
        assert_delta_gate(impl, c, ref, 8, integer, index=given, check_index=False)


@over()
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_delta_gate_unchecked_valid_ids_equal_checked(impl, dtype):
    impl.skip_unless_fast()
    g = torch.Generator().manual_seed(9)
    for kk in (0, 5, 16):
        given = forced_index(2, 16, kk, torch.int64, g, 0.0)
        c, ref = make_pair((2, 16, 12), dtype, integer=False, seed=kk)
        r1, r2 = ref.clone(), ref.clone()
        got1 = impl.token_delta_gate(c, r1, -1, given)
        got2 = impl.token_delta_gate(c, r2, -1, given, check_index=False)
        assert all(same(x, y) for x, y in zip(got1, got2)) and same(r1, r2)


@over()
def test_token_delta_gate_unchecked_duplicates(impl):
    """check_index=False with a repeated id: no crash; every copy of it gathers the same row and ref gets it."""
    c, ref = make_pair((1, 6, 4), torch.float32, integer=False, seed=2)
    given = torch.tensor([[4, 1, 4, -1]])
    ref_before = ref.clone()
    idx, c_sel, e_sel = impl.token_delta_gate(c, ref, -1, given, check_index=False)
    assert same(idx, given)
    assert same(c_sel, rows_at(c, given)) and same(ref, expected_ref(ref_before, c, given))
    assert same(e_sel, (rows_at(c, given) - rows_at(ref_before, given)))


@over()
@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "sliced"), ("sliced", "token_major")])
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
def test_token_delta_gate_empty_slots_strided(impl, layout_c, layout_ref, check_index):
    c0, r0 = make_pair((3, 20, 19), torch.bfloat16, integer=True, seed=4)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    given = torch.tensor([[5, -1, 19, -1], [-1, -1, -1, -1], [18, 17, -1, 15]], dtype=torch.int32).t().contiguous().t()
    if not check_index:
        given[2, 2] = 20
    assert not given.is_contiguous()
    assert_delta_gate(impl, c, ref, 4, integer=True, index=given, check_index=check_index)


@over()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate_threshold(impl, dtype, shape, integer):
    impl.skip_unless_fast()
    n, d = shape[1], shape[2]
    # thresholds below every score, at exact integer scores (strict '>' must exclude them), and in between
    thresholds = [-1e300, -1.0, 0.0, 2.0, 3.0, 0.75 * math.sqrt(2.0 * d), 1e6, 1e300]  # 1e300: beyond float32
    for cap in sorted({0, min(1, n), n // 2, n}):
        for thr in thresholds:
            c, ref = make_pair(shape, dtype, integer, seed=cap)
            assert_threshold(impl, c, ref, thr, cap, integer)


@over()
@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "contig"), ("sliced", "transposed")])
def test_token_gate_threshold_strided(impl, layout_c, layout_ref):
    c0, r0 = make_pair((2, 30, 12), torch.bfloat16, integer=True, seed=5)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_threshold(impl, c, ref, 4.0, 10, integer=True)


# ---------------------------------------------------------------- exact tie / special-value semantics

@over()
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_prefer_lower_id(impl, dtype):
    c = torch.zeros(2, 8, 5, dtype=dtype)
    ref = torch.ones(2, 8, 5, dtype=dtype)  # every score equal
    ref[1, 6] = 3  # row 1: token 6 strictly largest, others tied
    index, c_sel = impl.token_gate(c, ref.clone(), 3)
    assert index.tolist() == [[0, 1, 2], [0, 1, 6]]
    index, count, _ = impl.token_gate_threshold(c, ref.clone(), 0.5, 2)
    assert index.tolist() == [[0, 1], [0, 6]] and count.tolist() == [2, 2]


@over()
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_is_strict(impl, dtype):
    c = torch.zeros(2, 5, 3, dtype=dtype)
    ref = torch.zeros(2, 5, 3, dtype=dtype)
    ref[:, 1, 0], ref[:, 2, 1], ref[:, 3, 2], ref[:, 4, 0] = 1, 2, 3, -2  # scores [0, 1, 2, 3, 2], exact
    for thr, want in [(2.0, [3]), (0.0, [1, 2, 3, 4]), (1.999, [2, 3, 4]), (-0.5, [0, 1, 2, 3, 4]), (3.0, [])]:
        index, count, c_sel = impl.token_gate_threshold(c, ref.clone(), thr, 5)
        assert count.tolist() == [len(want)] * 2
        assert index.tolist() == [want + [-1] * (5 - len(want))] * 2
        assert_threshold(impl, c, ref.clone(), thr, 5, integer=True)


@over()
def test_nan_and_inf_scores_follow_reference(impl):
    c = torch.zeros(1, 6, 4)
    ref = torch.zeros(1, 6, 4)
    c[0, 4, 1] = float("nan")  # NaN score: ranks above everything in top-k (torch.sort), never passes a threshold
    c[0, 2, 0] = float("inf")
    c[0, 1, 3] = 2.0
    for k in range(7):
        assert_gate(impl, c.clone(), ref.clone(), k, integer=True)
    for cap in (0, 1, 2, 6):
        got = impl.token_gate_threshold(c.clone(), ref.clone(), 1.0, cap)
        want = R.token_gate_threshold(c.clone(), ref.clone(), 1.0, cap)
        for g, w in zip(got, want):
            assert same(g, w)


@over()
def test_aliased_c_and_ref(impl):
    x = torch.randn(2, 10, 6)
    before = x.clone()
    index, c_sel = impl.token_gate(x, x, 4)  # all scores 0 -> ids 0..3; ref (== c) unchanged
    assert index.tolist() == [[0, 1, 2, 3]] * 2
    assert same(x, before) and same(c_sel, before[:, :4])


@over()
def test_forced_index_output_is_a_fresh_tensor(impl):
    c, ref = make_pair((1, 5, 3), torch.float32, integer=False, seed=0)
    given = torch.tensor([[3, 1]])
    index, _, _ = impl.token_delta_gate(c, ref, -1, given)
    assert index.data_ptr() != given.data_ptr() and same(index, given)


# ---------------------------------------------------------------- hypothesis: random shapes / layouts / dtypes

shape_st = st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 40))
common = dict(
    dtype=st.sampled_from(DTYPES),
    lc=st.sampled_from(LAYOUTS),
    lr=st.sampled_from(LAYOUTS),
    integer=st.booleans(),
    seed=st.integers(0, 2**16),
)
hsettings = settings(max_examples=40, deadline=None)


@over()
@hsettings
@given(shape=shape_st, kfrac=st.floats(0, 1), **common)
def test_token_gate_random(impl, shape, kfrac, dtype, lc, lr, integer, seed):
    impl.skip_unless_fast()
    c0, r0 = make_pair(shape, dtype, integer, seed)
    assert_gate(impl, layout(c0, lc), layout(r0, lr), round(kfrac * shape[1]), integer)


@over()
@hsettings
@given(shape=shape_st, kfrac=st.floats(0, 1), forced=st.booleans(), idt=st.sampled_from([torch.int32, torch.int64]),
       empty=st.floats(0, 1), check_index=st.booleans(), **common)
def test_token_delta_gate_random(impl, shape, kfrac, forced, idt, empty, check_index, dtype, lc, lr, integer, seed):
    impl.skip_unless_fast()
    c0, r0 = make_pair(shape, dtype, integer, seed)
    k = round(kfrac * shape[1])
    index = None
    if forced:
        g = torch.Generator().manual_seed(seed)
        index = forced_index(shape[0], shape[1], k, idt, g, empty)
        if not check_index:  # any id outside [0, N) is an empty slot
            index = torch.where(index < 0, torch.tensor([-1, shape[1], -7], dtype=idt)[seed % 3], index)
    assert_delta_gate(impl, layout(c0, lc), layout(r0, lr), k, integer, index, check_index=check_index)


@over()
@hsettings
@given(shape=shape_st, cap=st.integers(0, 30), thr=st.floats(-1, 12) | st.integers(0, 6).map(float), **common)
def test_token_gate_threshold_random(impl, shape, cap, thr, dtype, lc, lr, integer, seed):
    impl.skip_unless_fast()
    c0, r0 = make_pair(shape, dtype, integer, seed)
    assert_threshold(impl, layout(c0, lc), layout(r0, lr), thr, min(cap, shape[1]), integer)


# ---------------------------------------------------------------- bad input: named argument, state untouched

def _pair(shape=(2, 6, 4), dtype=torch.float32):
    return make_pair(shape, dtype, integer=False, seed=1)


class _Late:
    """``impl.<op>`` of the backend under test, looked up at call time (the table is built at import)."""
    impl = None

    def __getattr__(self, name):
        return getattr(_Late.impl, name)


def _bad_cases():
    impl = _Late()
    c, ref = _pair()
    idx_ok = torch.tensor([[0, 1], [2, 3]])
    gate = lambda c, r, k=2: impl.token_gate(c, r, k)  # noqa: E731
    thr = lambda c, r, t=0.5, cap=2: impl.token_gate_threshold(c, r, t, cap)  # noqa: E731
    delta = lambda c, r, k=-1, i=idx_ok: impl.token_delta_gate(c, r, k, i)  # noqa: E731
    cases = []
    for name, op in [("gate", gate), ("thr", thr), ("delta", delta)]:
        cases += [
            (f"{name}-c-rank", op, c[0], ref[0], "'c'"),
            (f"{name}-ref-rank", op, c, ref[None], "'ref'"),
            (f"{name}-ref-tokens", op, c, _pair((2, 7, 4))[1], "'ref'"),
            (f"{name}-ref-features", op, c, _pair((2, 6, 5))[1], "'ref'"),
            (f"{name}-ref-batch", op, c, _pair((3, 6, 4))[1], "'ref'"),
            (f"{name}-ref-dtype", op, c, ref.half(), "'ref'"),
            (f"{name}-c-float64", op, c.double(), ref.double(), "'c'"),
            (f"{name}-ref-expanded", op, c, ref[:, :1].expand(2, 6, 4), "'ref'"),
        ]
    cases += [
        ("gate-k-neg", lambda c, r: gate(c, r, -1), c, ref, "'k'"),
        ("gate-k-big", lambda c, r: gate(c, r, 7), c, ref, "'k'"),
        ("thr-cap-neg", lambda c, r: thr(c, r, 0.5, -1), c, ref,
         re.escape("eventful: argument 'capacity' must satisfy 0 <= capacity <= N = 6 (tokens in 'c'), got -1")),
        ("thr-cap-big", lambda c, r: thr(c, r, 0.5, 7), c, ref,
         re.escape("0 <= capacity <= N = 6 (tokens in 'c'), got 7")),
        ("thr-cap-huge", lambda c, r: thr(c, r, 0.5, 10 ** 12), c, ref,
         "'capacity' must satisfy 0 <= capacity <= N = 6"),
        ("thr-ninf", lambda c, r: thr(c, r, float("-inf")), c, ref, re.escape("'threshold' must be finite, got -inf")),
        ("thr-nan", lambda c, r: thr(c, r, float("nan")), c, ref, "'threshold'"),
        ("thr-inf", lambda c, r: thr(c, r, float("inf")), c, ref, "'threshold'"),
        ("delta-k-neg", lambda c, r: impl.token_delta_gate(c, r, -1), c, ref, "'k'"),
        ("delta-k-big", lambda c, r: impl.token_delta_gate(c, r, 7), c, ref, "'k'"),
        ("delta-k-mismatch", lambda c, r: delta(c, r, 3), c, ref, "'k'"),
        ("delta-idx-range", lambda c, r: delta(c, r, -1, torch.tensor([[0, 6], [1, 2]])), c, ref, "'index'"),
        ("delta-idx-neg", lambda c, r: delta(c, r, -1, torch.tensor([[0, 1], [-2, 2]])), c, ref, "'index'"),
        ("delta-idx-dup", lambda c, r: delta(c, r, -1, torch.tensor([[0, 1], [4, 4]])), c, ref, "'index'"),
        ("delta-idx-dup-after-empty", lambda c, r: delta(c, r, -1, torch.tensor([[-1, -1, 3, 3], [0, 1, 2, -1]])), c,
         ref, re.escape("eventful: argument 'index' repeats token id 3 in row 0 (ids must be distinct)")),
        ("delta-idx-minus-two-after-empty", lambda c, r: delta(c, r, -1, torch.tensor([[-1, 2], [-1, -2]])), c, ref,
         re.escape("eventful: argument 'index' holds -2 at [1, 1], out of range [0, 6)")),
        ("delta-idx-n", lambda c, r: delta(c, r, -1, torch.tensor([[-1, 2], [6, -1]], dtype=torch.int32)), c, ref,
         re.escape("eventful: argument 'index' holds 6 at [1, 0], out of range [0, 6)")),
        ("delta-idx-int8", lambda c, r: delta(c, r, -1, idx_ok.to(torch.int8)), c, ref, "'index'"),
        ("delta-idx-float", lambda c, r: delta(c, r, -1, idx_ok.float()), c, ref, "'index'"),
        ("delta-idx-rank", lambda c, r: delta(c, r, -1, idx_ok[0]), c, ref, "'index'"),
        ("delta-idx-batch", lambda c, r: delta(c, r, -1, idx_ok[:1]), c, ref, "'index'"),
        ("delta-idx-too-many", lambda c, r: delta(c, r, -1, torch.zeros(2, 7, dtype=torch.long)), c, ref, "'index'"),
    ]
    return cases


@over()
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_and_leaves_state(impl, case):
    _Late.impl = impl
    _, fn, c, ref, name = case
    c_before, ref_before = c.clone(), ref.clone()
    with pytest.raises(ERRORS, match=name):
        fn(c, ref)
    assert same(c, c_before) and same(ref, ref_before)


@over()
def test_unchecked_index_still_checks_metadata(impl):
    """check_index=False skips only the index value scan: shapes, dtypes, k and overlap are still checked."""
    c, ref = _pair()
    idx = torch.tensor([[0, 9], [-5, 2]])  # values that would fail a check, never looked at here
    cases = [
        (lambda: impl.token_delta_gate(c, ref, 3, idx, check_index=False), "'k'"),
        (lambda: impl.token_delta_gate(c, ref[:, :5], -1, idx, check_index=False), "'ref'"),
        (lambda: impl.token_delta_gate(c, ref, -1, idx.float(), check_index=False), "'index'"),
        (lambda: impl.token_delta_gate(c, ref, -1, idx[:1], check_index=False), "'index'"),
        (lambda: impl.token_delta_gate(c, ref, -1, idx[0], check_index=False), "'index'"),
        (lambda: impl.token_delta_gate(c, ref[:, :1].expand(2, 6, 4), -1, idx, check_index=False), "'ref'"),
    ]
    for fn, name in cases:
        c_before, ref_before = c.clone(), ref.clone()
        with pytest.raises(ERRORS, match=name):
            fn()
        assert same(c, c_before) and same(ref, ref_before)


# ---------------------------------------------------------------- opcheck

@over("cpu", "cuda")
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(impl, dtype):
    c, ref = make_pair((2, 12, 9), dtype, integer=False, seed=4)
    c, ref = c.to(impl.device), ref.to(impl.device)
    gate = torch.ops.eventful
    torch.library.opcheck(gate.token_gate.default, (c, ref.clone(), 5))
    torch.library.opcheck(gate.token_gate_threshold.default, (c, ref.clone(), 3.0, 6))
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), 5, None))
    idx = torch.tensor([[3, 0, 7], [11, 2, 5]], dtype=torch.int32, device=impl.device)
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, idx))
    padded = torch.tensor([[3, -1, -1], [-1, -1, -1]], device=impl.device)
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, padded))
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, padded), {"check_index": False})
    stray = torch.tensor([[3, 12, -5], [40, 1, 0]], device=impl.device)
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, stray), {"check_index": False})
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), 5, None), {"check_index": False})


# ---------------------------------------------------------------- exact ties, long rows, NaN: every backend

def _between_scores(scores, q: float) -> float:
    """A threshold halfway between two adjacent distinct scores (at quantile q): a threshold equal to a score would
    make ``score > h`` depend on the last-ulp summation order, which differs between backends."""
    s = torch.unique(scores.float().flatten().cpu())
    i = min(int(q * (len(s) - 1)), len(s) - 2) if len(s) > 1 else 0
    return float((s[i] + s[min(i + 1, len(s) - 1)]) / 2)


def _gate_inputs(b, n, d, dtype, g, layout="contig"):
    """c, ref with exact ties: rows 1, 4, 6 share one difference; rows 2, 7 are unchanged (score exactly 0)."""
    c = torch.randn(b, n, d, generator=g)
    ref = torch.randn(b, n, d, generator=g)
    if n > 7:
        c[:, [4, 6]] = c[:, 1:2].clone()
        ref[:, [4, 6]] = ref[:, 1:2].clone()
        ref[:, [2, 7]] = c[:, [2, 7]]
    return strided(c.to(dtype), layout), strided(ref.to(dtype), layout)


def _exact_scores(c, ref):
    """float64 gate scores on the host (NaN ranks first, as +inf) -- the yardstick of the tie-tolerant check."""
    s = (c.detach().cpu().double() - ref.detach().cpu().double()).pow(2).sum(-1).sqrt()
    return torch.where(s.isnan(), torch.full_like(s, float("inf")), s)


def _assert_gate(exact, c, ref0, ref1, got, want, ref_want, kind, k=None, threshold=None, capacity=None):
    """A gate result ``got`` (``kind`` topk: (index, c_sel); threshold: (index, count, c_sel); delta: (index, c_sel,
    e_sel)) against the reference's ``want`` / ``ref_want`` from the same ``c`` and ``ref0`` (``ref1``: the gate's
    ``ref`` after the call).

    ``exact`` (a backend summing the scores in the reference's order): everything bit for bit. Otherwise the last bit
    of a score may differ and a near-tie at the k-th score may fall either way; the selection is then checked for
    what it must be: ids ascending and distinct, every selected score >= every eligible unselected one within fp32
    rounding of the score, the threshold respected within the same rounding, and c_sel / e_sel / ref exactly what
    the returned index implies."""
    if exact:
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ref1, ref_want, rtol=0, atol=0, equal_nan=True)
        return
    index = got[0].cpu()
    B, N, D = c.shape
    scores = _exact_scores(c, ref0)
    count = got[1].cpu() if kind == "threshold" else torch.full((B,), index.size(1))
    for b in range(B):
        n_sel = int(count[b])
        ids, pad = index[b, :n_sel], index[b, n_sel:]
        assert bool((pad == -1).all()), index[b]
        assert bool(((ids >= 0) & (ids < N)).all()) and bool((ids[1:] > ids[:-1]).all()), index[b]
        s = scores[b]
        finite = s[s.isfinite()]
        tol = max(D, 16) * 2.0 ** -23 * (float(finite.max()) if len(finite) else 0.0)
        chosen = torch.zeros(N, dtype=torch.bool)
        chosen[ids] = True
        eligible = ~chosen
        if kind == "threshold":
            assert n_sel <= min(capacity, N)
            assert bool((s[chosen] > threshold - tol).all()), (threshold, s[chosen])
            eligible &= s > threshold + tol
            if n_sel < min(capacity, N):
                assert not bool(eligible.any()), (threshold, s[eligible])
        else:
            assert n_sel == k
        if chosen.any() and eligible.any():
            assert float(s[chosen].min()) >= float(s[eligible].max()) - tol, (b, s[chosen].min(), s[eligible].max())
    rr = ref0.clone()
    _, c_sel, e_sel = R.token_delta_gate(c, rr, -1, got[0])
    torch.testing.assert_close(got[-1] if kind != "delta" else got[1], c_sel, rtol=0, atol=0, equal_nan=True)
    if kind == "delta":
        torch.testing.assert_close(got[2], e_sel, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ref1, rr, rtol=0, atol=0, equal_nan=True)


@over()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_gate_ties_layouts(impl, dtype):
    g = gen(2)
    for (b, n, d), lay in [((2, 12, 19), "contig"), ((3, 9, 150), "step"), ((1, 10, 8), "colmajor")]:
        for k in (0, 1, 5, n - 1, n):
            c, ref = _gate_inputs(b, n, d, dtype, g, lay)
            ref0, ref_r = ref.clone(), ref.clone()
            got = impl.token_gate(c, ref, k)
            _assert_gate(impl.exact_gates, c, ref0, ref, got, R.token_gate(c, ref_r, k), ref_r, "topk", k=k)


@over()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gates_long_rows_and_ties(impl, dtype):
    """N > the Triton select kernel's block: prefix sums and tie ranks must carry across blocks."""
    g = gen(3)
    b, n, d = 2, 2100, 4
    c = torch.randn(b, n, d, generator=g)
    ref = torch.randn(b, n, d, generator=g)
    tied = torch.arange(3, n, 97)  # one shared difference at ids spread over all blocks
    c[:, tied], ref[:, tied] = c[:, 3:4] * 4, ref[:, 3:4].clone()
    ref[:, 1000:1100] = c[:, 1000:1100]  # exact zeros
    c, ref = c.to(dtype), ref.to(dtype)
    scores = R.gate_scores(c, ref)
    n_above_tie = int((scores[0] > scores[0, 3]).sum())
    for k in (n_above_tie + 5, 1500, n):  # cut inside the tied group, then inside the zeros, then everything
        rc, rr = ref.clone(), ref.clone()
        got, want = impl.token_gate(c, rc, k), R.token_gate(c, rr, k)
        _assert_gate(impl.exact_gates, c, ref, rc, got, want, rr, "topk", k=k)
    for h, cap in ((_between_scores(scores[0, 3:4], 0.0) * 0.999, 40), (0.0, n), (_between_scores(scores, 0.5), 700)):
        rc, rr = ref.clone(), ref.clone()
        got, want = impl.token_gate_threshold(c, rc, h, cap), R.token_gate_threshold(c, rr, h, cap)
        _assert_gate(impl.exact_gates, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=cap)


@over()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_gate_threshold_ties_layouts(impl, dtype):
    g = gen(4)
    for (b, n, d), lay in [((3, 12, 19), "contig"), ((2, 9, 33), "step")]:
        c, ref = _gate_inputs(b, n, d, dtype, g, lay)
        med = _between_scores(R.gate_scores(c, ref), 0.5)
        # (threshold, capacity): some above / capacity cuts / capacity = N / none / all (h < 0) / zero capacity;
        # h = 0 excludes the unchanged tokens (strict >)
        for h, cap in ((med, n), (med, 2), (0.0, n), (1e9, 4), (-1.0, n), (-1.0, 3), (med, 0), (0.0, 1)):
            rc, rr = ref.clone(), ref.clone()
            got = impl.token_gate_threshold(c, rc, h, cap)
            want = R.token_gate_threshold(c, rr, h, cap)
            _assert_gate(impl.exact_gates, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=cap)


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_delta_gate_ties_layouts(impl, dtype, idt):
    g = gen(5)
    for (b, n, d), lay in [((2, 12, 19), "contig"), ((3, 8, 40), "step")]:
        for k in (0, 3, n):
            c, ref = _gate_inputs(b, n, d, dtype, g, lay)
            rc, rr = ref.clone(), ref.clone()
            got, want = impl.token_delta_gate(c, rc, k), R.token_delta_gate(c, rr, k)
            _assert_gate(impl.exact_gates, c, ref, rc, got, want, rr, "delta", k=k)
            # explicit (unsorted, strided) index forces the selection: bit-exact on every backend
            idx = strided_index(make_index(b, n, k, idt, g))
            for check_index in (True, False):
                rc, rr = ref.clone(), ref.clone()
                got = impl.token_delta_gate(c, rc, -1, idx, check_index=check_index)
                for x, y in zip(got, R.token_delta_gate(c, rr, -1, idx)):
                    assert_same(x, y)
                assert_same(rc, rr)
                assert got[0].dtype == torch.int64


@over()
@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_gate_empty_slots_and_unchecked_ids(impl, dtype, idt):
    """-1 slots, a row of only -1, K up to N + 2; check_index=False with ids N, 2N+3, -5 leaves everything outside
    ref untouched (ref is a view inside a guard buffer)."""
    g = gen(21)
    for (b, n, d), lay in [((3, 12, 19), "contig"), ((2, 8, 40), "step")]:
        for k in (0, 4, n, n + 2):
            c, ref = _gate_inputs(b, n, d, dtype, g, lay)
            idx = index_with_empty(b, k, n, idt, g, strided=lay == "step")
            rr = ref.clone()
            want = R.token_delta_gate(c, rr, -1, idx)
            for check_index in (True, False):
                rc = ref.clone()
                for x, y in zip(impl.token_delta_gate(c, rc, -1, idx, check_index=check_index), want):
                    assert_same(x, y)
                assert_same(rc, rr)
    B, N, D = 2, 9, 24
    c, _ = guarded((B, N, D), dtype, g)
    ref, buf = guarded((B, N, D), dtype, g)
    idx = index_with_empty(B, 6, N, idt, g, bad=(N, 2 * N + 3, -5, -1))
    buf_want = buf.clone()
    want = R.token_delta_gate(c, buf_want[1:-1, 1:-1, 1:-1], -1, idx)
    for x, y in zip(impl.token_delta_gate(c, ref, -1, idx, check_index=False), want):
        assert_same(x, y)
    assert_same(buf, buf_want)


@over()
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy (interpreter) computing inf - inf
def test_nan_scores_rank_first_like_torch_sort(impl):
    g = gen(8)
    c, ref = randn((2, 10, 6), torch.float32, g), randn((2, 10, 6), torch.float32, g)
    c[0, [2, 7, 8], 1] = float("nan")
    c[1, 4, 0] = float("inf")
    ref[1, 4, 0] = float("inf")  # inf - inf = nan
    for k in (2, 4, 10):
        rc, rr = ref.clone(), ref.clone()
        for x, y in zip(impl.token_gate(c, rc, k), R.token_gate(c, rr, k)):
            assert_same(x, y)
        assert_same(rc, rr)
    rc, rr = ref.clone(), ref.clone()  # threshold gate: NaN is never above a threshold
    got, want = impl.token_gate_threshold(c, rc, 0.5, 10), R.token_gate_threshold(c, rr, 0.5, 10)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


@over()
def test_nan_scores_and_exact_ties_fixed_ids(impl):
    """NaN ranks first (as torch.sort), +inf next; exact ties go to the lower id, in each batch row on its own."""
    B, N, D = 1, 10, 8
    ref = torch.zeros(B, N, D)
    c = torch.arange(N, dtype=torch.float32)[None, :, None].expand(B, N, D).contiguous()
    c[0, 7, 3] = float("nan")
    c[0, 2, 0] = float("nan")
    c[0, 4, 1] = float("inf")
    index, c_sel = impl.token_gate(c, ref, 4)
    assert index[0].tolist() == [2, 4, 7, 9]
    g = gen(9)
    ref = torch.randn(2, 40, 24, generator=g)
    c = ref.clone()
    delta = torch.randn(24, generator=g)
    for t in (5, 17, 30):  # row 0: tokens 5, 17, 30 tie exactly; token 8 changes more; the rest score 0
        ref[0, t] = ref[0, 5]
        c[0, t] = ref[0, 5] + delta
    c[0, 8] = ref[0, 8] + 3 * delta
    for k, want0 in [(1, [8]), (2, [5, 8]), (3, [5, 8, 17]), (6, [0, 1, 5, 8, 17, 30])]:
        index, _ = impl.token_gate(c, ref.clone(), k)
        assert index[0].tolist() == want0 and index[1].tolist() == list(range(k))


@over()
def test_token_gate_overlapping_c_and_ref(impl):
    """c and ref overlap with a one-token shift: the selection is read before ref is written (as the reference)."""
    g = gen(11)
    buf = torch.randn(2, 13, 16, generator=g)
    buf_ref = buf.clone()
    index, c_sel = impl.token_gate(buf[:, :12], buf[:, 1:], 5)
    r_index, r_sel = R.token_gate(buf_ref[:, :12], buf_ref[:, 1:], 5)
    assert torch.equal(index, r_index) and torch.equal(c_sel, r_sel) and torch.equal(buf, buf_ref)


@over()
def test_token_gate_many_tokens_grid_stride(impl):
    """300k one-feature tokens (more than one grid of the CUDA score kernel) and a block of 1001 exact ties that
    k = 1500 cuts through: they must go to the lower ids."""
    impl.skip_unless_fast()
    g = gen(14)
    c = torch.randn(1, 300_000, 1, generator=g)
    c[0, 5] = 3.0
    c[0, 1000:2000] = 3.0
    ref = torch.zeros_like(c)
    rc, rr = ref.clone(), ref.clone()
    got, want = impl.token_gate(c, rc, 1500), R.token_gate(c, rr, 1500)
    _assert_gate(impl.exact_gates, c, ref, rc, got, want, rr, "topk", k=1500)


# ---------------------------------------------------------------- the Triton select kernel itself

@over("triton", "interpreter")
@pytest.mark.parametrize("block", [None, 64])  # None: the row in registers (N <= block); 64: re-read per step
def test_select_kernel_matches_stable_sort(impl, block):
    """The bisection on the score keys against a stable sort: duplicates, zeros, NaN, +inf, tiny and huge values,
    k from 1 to N, B > 1."""
    TG = importlib.import_module("eventful_kernels.triton.token_gate")  # the package's `token_gate` is the op
    g = gen(16)
    n = 150
    s = torch.rand(4, n, generator=g) * 10
    s[0, ::3] = s[0, 1]  # many exact ties
    s[1] = torch.randint(0, 4, (n,), generator=g).float()  # few distinct values
    s[2, [5, 77, 140]] = float("nan")
    s[2, [6, 90]] = float("inf")
    s[3, :50] = torch.tensor([2.0 ** -149, 0.0, 3e38, 1e-30, 1.0] * 10)
    s = s.to(impl.device)
    ks = (1, 2, 3, 17, 49, 50, 51, 52, 99, 100, 148, 149, 150) if block is None else (1, 50, 52, 149, 150)
    for k in ks:  # the interpreter runs the 32 search steps slowly: cuts inside and at the edges of tie groups
        index, _ = TG._select(s, k, k, thresholded=False, block_n=block)
        assert_same(index, R.select_topk(s.cpu(), k))


@over("triton", "interpreter")
@pytest.mark.parametrize("block", [None, 64])
def test_select_kernel_threshold_rule(impl, block):
    """Thresholded selection (scores below the threshold come in as -1): count, -1 padding past it, capacity cut
    with ties -> lower id."""
    TG = importlib.import_module("eventful_kernels.triton.token_gate")  # the package's `token_gate` is the op
    g = gen(17)
    n = 130
    s = torch.rand(3, n, generator=g)
    s[0, ::4] = s[0, 2]
    s = torch.where(s > 0.6, s, torch.full_like(s, -1.0)).to(impl.device)
    for cap, width in ((1, 1), (7, 7), (40, 45), (n, n + 3)):
        index, count = TG._select(s, cap, width, thresholded=True, block_n=block)
        for b in range(3):
            hits = int((s[b] >= 0).sum())
            row = s[b].cpu()
            want = R.select_topk(torch.where(row >= 0, row, float("-inf"))[None], min(cap, hits))[0]
            assert int(count[b]) == min(cap, hits)
            assert_same(index[b, :len(want)], want)
            assert bool((index[b, len(want):] == -1).all())


@over("interpreter")
def test_tie_tolerant_gate_check_itself(impl):
    """The tie-tolerant branch of _assert_gate on exact results: it accepts them and rejects a selection that swaps
    a clearly larger score for a smaller one."""
    g = gen(18)
    c, ref = _gate_inputs(2, 12, 19, torch.float32, g)
    for k in (1, 5, 12):
        rc, rr = ref.clone(), ref.clone()
        got, want = impl.token_gate(c, rc, k), R.token_gate(c, rr, k)
        _assert_gate(False, c, ref, rc, got, want, rr, "topk", k=k)
    h = _between_scores(R.gate_scores(c, ref), 0.5)
    rc, rr = ref.clone(), ref.clone()
    got, want = impl.token_gate_threshold(c, rc, h, 4), R.token_gate_threshold(c, rr, h, 4)
    _assert_gate(False, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=4)
    rc, rr = ref.clone(), ref.clone()
    got, want = impl.token_delta_gate(c, rc, 5), R.token_delta_gate(c, rr, 5)
    _assert_gate(False, c, ref, rc, got, want, rr, "delta", k=5)
    scores = R.gate_scores(c, ref)[0]
    wrong = got[0].clone()
    wrong[0, 0] = int(scores.argmin())
    wrong[0] = wrong[0].sort().values
    rc = ref.clone()
    _, cs, es = R.token_delta_gate(c, rc, -1, wrong)
    with pytest.raises(AssertionError):
        _assert_gate(False, c, ref, rc, (wrong, cs, es), want, rr, "delta", k=5)


# ---------------------------------------------------------------- bad input with exact messages: every backend

def _gate_state():
    g = gen(10)
    return {"c": randn((2, 6, 4), torch.float32, g), "ref": randn((2, 6, 4), torch.float32, g)}


_DUP = torch.tensor([[1, 4], [3, 3]])
_OOB = torch.tensor([[1, 4], [0, 6]])
_NEG = torch.tensor([[-1, 4], [0, -2]])
BAD = [  # (id, call(impl, state), exception, message fragment)
    ("token_gate k", lambda i, s: i.token_gate(s["c"], s["ref"], 7), ValueError,
     "'k' must satisfy 0 <= k <= N = 6 (tokens in 'c'), got 7"),
    ("token_gate k<0", lambda i, s: i.token_gate(s["c"], s["ref"], -1), ValueError, "'k' must satisfy 0 <= k <= N = 6"),
    ("token_gate rank", lambda i, s: i.token_gate(s["c"][None], s["ref"][None], 1), RuntimeError,
     "'c' must have rank 3"),
    ("token_gate ref shape", lambda i, s: i.token_gate(s["c"], s["ref"][:, :5], 1), RuntimeError,
     "'ref' has size 5 at dim 1"),
    ("token_gate ref dtype", lambda i, s: i.token_gate(s["c"], s["ref"].half(), 1), RuntimeError,
     "'ref' has dtype Half"),
    ("token_gate ref device", lambda i, s: i.token_gate(s["c"], s["ref"].to("meta"), 1), RuntimeError,
     "'ref' is on meta"),
    ("token_gate ref overlap", lambda i, s: i.token_gate(s["c"], s["ref"][:, :1].expand(2, 6, 4), 1), RuntimeError,
     "'ref' is written in place"),
    ("token_gate ref None", lambda i, s: i.token_gate(s["c"], None, 1), TypeError, "'ref' must be a Tensor, got None"),
    ("threshold capacity", lambda i, s: i.token_gate_threshold(s["c"], s["ref"], 0.1, -1), ValueError,
     "'capacity' must satisfy 0 <= capacity <= N = 6 (tokens in 'c'), got -1"),
    ("threshold capacity > N", lambda i, s: i.token_gate_threshold(s["c"], s["ref"], 0.1, 10 ** 12), ValueError,
     "'capacity' must satisfy 0 <= capacity <= N = 6 (tokens in 'c'), got 1000000000000"),
    ("threshold nan", lambda i, s: i.token_gate_threshold(s["c"], s["ref"], float("nan"), 2), ValueError,
     "'threshold' must be finite, got nan"),
    ("threshold dtype", lambda i, s: i.token_gate_threshold(s["c"].double(), s["ref"].double(), 0.1, 2), RuntimeError,
     "'c' must be float32"),
    ("delta dup", lambda i, s: i.token_delta_gate(s["c"], s["ref"], -1, _DUP), RuntimeError,
     "repeats token id 3 in row 1"),
    ("delta oob", lambda i, s: i.token_delta_gate(s["c"], s["ref"], -1, _OOB), IndexError, "holds 6 at [1, 1]"),
    ("delta k", lambda i, s: i.token_delta_gate(s["c"], s["ref"], 9), ValueError, "'k' must satisfy 0 <= k <= N = 6"),
    ("delta k with index", lambda i, s: i.token_delta_gate(s["c"], s["ref"], 3, _OOB), ValueError,
     "'k' must be -1 or equal to the size of 'index' at dim 1 (2) when 'index' is given, got 3"),
    ("delta -2", lambda i, s: i.token_delta_gate(s["c"], s["ref"], -1, _NEG), IndexError, "'index' holds -2 at [1, 1]"),
    ("delta N", lambda i, s: i.token_delta_gate(s["c"], s["ref"], -1, torch.tensor([[-1, 6], [0, -1]])), IndexError,
     "'index' holds 6 at [0, 1]"),
    ("delta index batch", lambda i, s: i.token_delta_gate(s["c"], s["ref"], -1, _DUP[:, None]), RuntimeError,
     "'index' must have shape [B, K]"),
]


@over()
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exact_messages(impl, case):
    name, call, exc, fragment = case
    skip_meta_on_dispatcher(impl, name)
    run_bad_case(impl, _gate_state, call, exc, fragment)
