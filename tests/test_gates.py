"""CPU token gates (token_gate, token_gate_threshold, token_delta_gate) against eventful_kernels.reference.

Two oracles:
* integer-valued c and ref (exact in fp32/fp16/bf16): every difference, square and partial sum is an exact float32
  integer, so the score does not depend on summation order and the kernel must equal the reference bit for bit,
  including the tie rule (small integers give many exact ties);
* random float data: the kernel sums in a different order than torch, so near-ties may legitimately flip. The
  selection is checked against float64 scores with a tolerance, and against the reference exactly wherever the
  selection boundary is wider than that tolerance. Data movement (c_sel, e_sel, ref) is always checked exactly.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import ops
from eventful_kernels import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
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


def run_both(op_name, c, ref, *args, **kwargs):
    """Run the op on (c, ref) in place and the reference on contiguous clones; returns (out, ref_out, ref_ref)."""
    ref_before = ref.clone()
    r_ref = ref.clone()
    want = getattr(R, op_name)(c.clone(), r_ref, *args)
    got = getattr(torch.ops.eventful, op_name)(c, ref, *args, **kwargs)
    return got, want, ref_before, r_ref


def assert_gate(c, ref, k, integer):
    got, want, ref_before, r_ref = run_both("token_gate", c, ref, k)
    index, c_sel = got
    check_movement(c, ref_before, ref, index, c_sel)
    if integer:
        assert same(index, want[0]) and same(c_sel, want[1]) and same(ref, r_ref)
    else:
        check_topk_selection(c, ref_before, index, k, want[0])


def assert_delta_gate(c, ref, k, integer, index=None, **kwargs):
    got, want, ref_before, r_ref = run_both("token_delta_gate", c, ref, k, index, **kwargs)
    idx, c_sel, e_sel = got
    check_movement(c, ref_before, ref, idx, c_sel, e_sel)
    if integer or index is not None:
        for g, w in zip(got, want):
            assert same(g, w)
        assert same(ref, r_ref)
    else:
        check_topk_selection(c, ref_before, idx, k, want[0])


def assert_threshold(c, ref, thr, cap, integer):
    got, want, ref_before, r_ref = run_both("token_gate_threshold", c, ref, thr, cap)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate(dtype, shape, integer):
    n = shape[1]
    for k in sorted({0, min(1, n), n // 2, max(n - 1, 0), n}):
        c, ref = make_pair(shape, dtype, integer, seed=sum(shape) * 31 + k)
        assert_gate(c, ref, k, integer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_c,layout_ref", [(a, b) for a in LAYOUTS for b in LAYOUTS if a != b or a != "contig"])
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate_strided(dtype, layout_c, layout_ref, integer):
    c0, r0 = make_pair((2, 24, 21), dtype, integer, seed=7)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_gate(c, ref, 9, integer)
    if layout_ref != "contig":  # the update went through the view into its buffer
        assert not ref.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_delta_gate_topk(dtype, shape, integer):
    n = shape[1]
    for k in sorted({0, 1, n // 2, n}):
        c, ref = make_pair(shape, dtype, integer, seed=11 + k)
        assert_delta_gate(c, ref, k, integer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 9, 17), (3, 32, 24)])
@pytest.mark.parametrize("k_arg", ["minus_one", "equal"])
def test_token_delta_gate_forced_index(dtype, index_dtype, shape, k_arg):
    b, n, _ = shape
    g = torch.Generator().manual_seed(n)
    for kk in sorted({0, 1, n // 2, n}):
        # unsorted, distinct ids: the given order is kept
        given = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b)]).to(index_dtype)
        c, ref = make_pair(shape, dtype, integer=False, seed=kk)
        k = -1 if k_arg == "minus_one" else kk
        before = given.clone()
        assert_delta_gate(c, ref, k, integer=False, index=given)
        assert same(given, before)


@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "sliced"), ("sliced", "token_major")])
def test_token_delta_gate_strided_and_strided_index(layout_c, layout_ref):
    c0, r0 = make_pair((3, 20, 19), torch.float16, integer=True, seed=3)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_delta_gate(c, ref, 6, integer=True)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    given = torch.tensor([[5, 2, 19, 0], [1, 3, 4, 7], [18, 17, 16, 15]], dtype=torch.int32).t().contiguous().t()
    assert not given.is_contiguous()
    assert_delta_gate(c, ref, 4, integer=False, index=given)


def forced_index(b, n, kk, index_dtype, g, empty_frac, empty_row=None):
    """[b, kk] distinct ids in [0, n) (kk <= n), unsorted, with about `empty_frac` of the slots (random positions)
    and the whole of row `empty_row` set to -1."""
    index = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b)]).to(index_dtype)
    index[torch.rand(index.shape, generator=g) < empty_frac] = -1
    if empty_row is not None:
        index[empty_row] = -1
    return index


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 9, 17), (3, 32, 24)])
def test_token_delta_gate_empty_slots(dtype, index_dtype, shape, check_index):
    """Forced index with -1 slots (repeated, a row of only -1 when B > 1): zero c_sel / e_sel rows there, ref
    untouched there, the rest exactly as the reference."""
    b, n, _ = shape
    g = torch.Generator().manual_seed(n + 100)
    for kk in sorted({0, 1, n // 2, n}):
        given = forced_index(b, n, kk, index_dtype, g, 0.4, empty_row=1 if b > 1 else None)
        if kk >= 2:
            given[0, :2] = -1
        c, ref = make_pair(shape, dtype, integer=False, seed=kk)
        before = given.clone()
        assert_delta_gate(c, ref, -1, integer=False, index=given, check_index=check_index)
        assert same(given, before)
        _, c_sel, e_sel = ops.token_delta_gate(c, ref.clone(), kk, given, check_index=check_index)
        empty = (given < 0)[..., None].expand_as(c_sel)
        assert bool((c_sel[empty] == 0).all()) and bool((e_sel[empty] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_token_delta_gate_unchecked_out_of_range_ids(dtype, index_dtype):
    """check_index=False: ids outside [0, N) (N, 2N + 3, -5, the dtype's max) are empty slots like -1."""
    g = torch.Generator().manual_seed(5)
    b, n, d = 3, 12, 10
    given = forced_index(b, n, 8, index_dtype, g, 0.0)
    bad = torch.tensor([n, 2 * n + 3, -5, torch.iinfo(index_dtype).max, -1], dtype=index_dtype)
    given[0, :5] = bad
    given[1, 3] = bad[1]
    given[2] = bad[torch.randint(0, 5, (8,), generator=g)]
    for integer in (True, False):
        c, ref = make_pair((b, n, d), dtype, integer, seed=3)
        assert_delta_gate(c, ref, 8, integer, index=given, check_index=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_delta_gate_unchecked_valid_ids_equal_checked(dtype):
    g = torch.Generator().manual_seed(9)
    for kk in (0, 5, 16):
        given = forced_index(2, 16, kk, torch.int64, g, 0.0)
        c, ref = make_pair((2, 16, 12), dtype, integer=False, seed=kk)
        r1, r2 = ref.clone(), ref.clone()
        got1 = ops.token_delta_gate(c, r1, -1, given)
        got2 = ops.token_delta_gate(c, r2, -1, given, check_index=False)
        assert all(same(x, y) for x, y in zip(got1, got2)) and same(r1, r2)


def test_token_delta_gate_unchecked_duplicates():
    """check_index=False with a repeated id: no crash; every copy of it gathers the same row and ref gets it."""
    c, ref = make_pair((1, 6, 4), torch.float32, integer=False, seed=2)
    given = torch.tensor([[4, 1, 4, -1]])
    ref_before = ref.clone()
    idx, c_sel, e_sel = ops.token_delta_gate(c, ref, -1, given, check_index=False)
    assert same(idx, given)
    assert same(c_sel, rows_at(c, given)) and same(ref, expected_ref(ref_before, c, given))
    assert same(e_sel, (rows_at(c, given) - rows_at(ref_before, given)))


@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "sliced"), ("sliced", "token_major")])
@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
def test_token_delta_gate_empty_slots_strided(layout_c, layout_ref, check_index):
    c0, r0 = make_pair((3, 20, 19), torch.bfloat16, integer=True, seed=4)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    given = torch.tensor([[5, -1, 19, -1], [-1, -1, -1, -1], [18, 17, -1, 15]], dtype=torch.int32).t().contiguous().t()
    if not check_index:
        given[2, 2] = 20
    assert not given.is_contiguous()
    assert_delta_gate(c, ref, 4, integer=True, index=given, check_index=check_index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("integer", [True, False])
def test_token_gate_threshold(dtype, shape, integer):
    n, d = shape[1], shape[2]
    # thresholds below every score, at exact integer scores (strict '>' must exclude them), and in between
    thresholds = [-1e300, -1.0, 0.0, 2.0, 3.0, 0.75 * math.sqrt(2.0 * d), 1e6, 1e300]  # 1e300: beyond float32
    for cap in sorted({0, min(1, n), n // 2, n}):
        for thr in thresholds:
            c, ref = make_pair(shape, dtype, integer, seed=cap)
            assert_threshold(c, ref, thr, cap, integer)


@pytest.mark.parametrize("layout_c,layout_ref", [("transposed", "contig"), ("sliced", "transposed")])
def test_token_gate_threshold_strided(layout_c, layout_ref):
    c0, r0 = make_pair((2, 30, 12), torch.bfloat16, integer=True, seed=5)
    c, ref = layout(c0, layout_c), layout(r0, layout_ref)
    assert_threshold(c, ref, 4.0, 10, integer=True)


# ---------------------------------------------------------------- exact tie / special-value semantics

@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_prefer_lower_id(dtype):
    c = torch.zeros(2, 8, 5, dtype=dtype)
    ref = torch.ones(2, 8, 5, dtype=dtype)  # every score equal
    ref[1, 6] = 3  # row 1: token 6 strictly largest, others tied
    index, c_sel = ops.token_gate(c, ref.clone(), 3)
    assert index.tolist() == [[0, 1, 2], [0, 1, 6]]
    index, count, _ = ops.token_gate_threshold(c, ref.clone(), 0.5, 2)
    assert index.tolist() == [[0, 1], [0, 6]] and count.tolist() == [2, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_is_strict(dtype):
    c = torch.zeros(2, 5, 3, dtype=dtype)
    ref = torch.zeros(2, 5, 3, dtype=dtype)
    ref[:, 1, 0], ref[:, 2, 1], ref[:, 3, 2], ref[:, 4, 0] = 1, 2, 3, -2  # scores [0, 1, 2, 3, 2], exact
    for thr, want in [(2.0, [3]), (0.0, [1, 2, 3, 4]), (1.999, [2, 3, 4]), (-0.5, [0, 1, 2, 3, 4]), (3.0, [])]:
        index, count, c_sel = ops.token_gate_threshold(c, ref.clone(), thr, 5)
        assert count.tolist() == [len(want)] * 2
        assert index.tolist() == [want + [-1] * (5 - len(want))] * 2
        assert_threshold(c, ref.clone(), thr, 5, integer=True)


def test_nan_and_inf_scores_follow_reference():
    c = torch.zeros(1, 6, 4)
    ref = torch.zeros(1, 6, 4)
    c[0, 4, 1] = float("nan")  # NaN score: ranks above everything in top-k (torch.sort), never passes a threshold
    c[0, 2, 0] = float("inf")
    c[0, 1, 3] = 2.0
    for k in range(7):
        assert_gate(c.clone(), ref.clone(), k, integer=True)
    for cap in (0, 1, 2, 6):
        got = ops.token_gate_threshold(c.clone(), ref.clone(), 1.0, cap)
        want = R.token_gate_threshold(c.clone(), ref.clone(), 1.0, cap)
        for g, w in zip(got, want):
            assert same(g, w)


def test_aliased_c_and_ref():
    x = torch.randn(2, 10, 6)
    before = x.clone()
    index, c_sel = ops.token_gate(x, x, 4)  # all scores 0 -> ids 0..3; ref (== c) unchanged
    assert index.tolist() == [[0, 1, 2, 3]] * 2
    assert same(x, before) and same(c_sel, before[:, :4])


def test_forced_index_output_is_a_fresh_tensor():
    c, ref = make_pair((1, 5, 3), torch.float32, integer=False, seed=0)
    given = torch.tensor([[3, 1]])
    index, _, _ = ops.token_delta_gate(c, ref, -1, given)
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


@hsettings
@given(shape=shape_st, kfrac=st.floats(0, 1), **common)
def test_token_gate_random(shape, kfrac, dtype, lc, lr, integer, seed):
    c0, r0 = make_pair(shape, dtype, integer, seed)
    assert_gate(layout(c0, lc), layout(r0, lr), round(kfrac * shape[1]), integer)


@hsettings
@given(shape=shape_st, kfrac=st.floats(0, 1), forced=st.booleans(), idt=st.sampled_from([torch.int32, torch.int64]),
       empty=st.floats(0, 1), check_index=st.booleans(), **common)
def test_token_delta_gate_random(shape, kfrac, forced, idt, empty, check_index, dtype, lc, lr, integer, seed):
    c0, r0 = make_pair(shape, dtype, integer, seed)
    k = round(kfrac * shape[1])
    index = None
    if forced:
        g = torch.Generator().manual_seed(seed)
        index = forced_index(shape[0], shape[1], k, idt, g, empty)
        if not check_index:  # any id outside [0, N) is an empty slot
            index = torch.where(index < 0, torch.tensor([-1, shape[1], -7], dtype=idt)[seed % 3], index)
    assert_delta_gate(layout(c0, lc), layout(r0, lr), k, integer, index, check_index=check_index)


@hsettings
@given(shape=shape_st, cap=st.integers(0, 30), thr=st.floats(-1, 12) | st.integers(0, 6).map(float), **common)
def test_token_gate_threshold_random(shape, cap, thr, dtype, lc, lr, integer, seed):
    c0, r0 = make_pair(shape, dtype, integer, seed)
    assert_threshold(layout(c0, lc), layout(r0, lr), thr, min(cap, shape[1]), integer)


# ---------------------------------------------------------------- bad input: named argument, state untouched

def _pair(shape=(2, 6, 4), dtype=torch.float32):
    return make_pair(shape, dtype, integer=False, seed=1)


def _bad_cases():
    c, ref = _pair()
    idx_ok = torch.tensor([[0, 1], [2, 3]])
    gate = lambda c, r, k=2: ops.token_gate(c, r, k)  # noqa: E731
    thr = lambda c, r, t=0.5, cap=2: ops.token_gate_threshold(c, r, t, cap)  # noqa: E731
    delta = lambda c, r, k=-1, i=idx_ok: ops.token_delta_gate(c, r, k, i)  # noqa: E731
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
        ("delta-k-neg", lambda c, r: ops.token_delta_gate(c, r, -1), c, ref, "'k'"),
        ("delta-k-big", lambda c, r: ops.token_delta_gate(c, r, 7), c, ref, "'k'"),
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


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_and_leaves_state(case):
    _, fn, c, ref, name = case
    c_before, ref_before = c.clone(), ref.clone()
    with pytest.raises(ERRORS, match=name):
        fn(c, ref)
    assert same(c, c_before) and same(ref, ref_before)


def test_unchecked_index_still_checks_metadata():
    """check_index=False skips only the index value scan: shapes, dtypes, k and overlap are still checked."""
    c, ref = _pair()
    idx = torch.tensor([[0, 9], [-5, 2]])  # values that would fail a check, never looked at here
    cases = [
        (lambda: ops.token_delta_gate(c, ref, 3, idx, check_index=False), "'k'"),
        (lambda: ops.token_delta_gate(c, ref[:, :5], -1, idx, check_index=False), "'ref'"),
        (lambda: ops.token_delta_gate(c, ref, -1, idx.float(), check_index=False), "'index'"),
        (lambda: ops.token_delta_gate(c, ref, -1, idx[:1], check_index=False), "'index'"),
        (lambda: ops.token_delta_gate(c, ref, -1, idx[0], check_index=False), "'index'"),
        (lambda: ops.token_delta_gate(c, ref[:, :1].expand(2, 6, 4), -1, idx, check_index=False), "'ref'"),
    ]
    for fn, name in cases:
        c_before, ref_before = c.clone(), ref.clone()
        with pytest.raises(ERRORS, match=name):
            fn()
        assert same(c, c_before) and same(ref, ref_before)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    c, ref = make_pair((2, 12, 9), dtype, integer=False, seed=4)
    gate = torch.ops.eventful
    torch.library.opcheck(gate.token_gate.default, (c, ref.clone(), 5))
    torch.library.opcheck(gate.token_gate_threshold.default, (c, ref.clone(), 3.0, 6))
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), 5, None))
    idx = torch.tensor([[3, 0, 7], [11, 2, 5]], dtype=torch.int32)
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, idx))
    padded = torch.tensor([[3, -1, -1], [-1, -1, -1]])
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, padded))
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, padded), {"check_index": False})
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), -1, torch.tensor([[3, 12, -5], [40, 1, 0]])),
                          {"check_index": False})
    torch.library.opcheck(gate.token_delta_gate.default, (c, ref.clone(), 5, None), {"check_index": False})
