"""CUDA kernels (csrc/cuda) of gather_rows, scatter_rows_, gather_cols, scatter_cols_ and token_gate against
eventful_kernels/reference.py. Skipped without a CUDA GPU.

Gathers and scatters move data without arithmetic, so results must be bitwise equal to the reference (torch.equal)
for every dtype, also with empty index slots (-1; with check_index=False any id outside [0, N)). token_gate's scores
are float32 sums whose order differs from the reference's reduction; the selection must equal the reference's except
where two reference scores are within 1e-5 relative of each other at the top-k boundary (a near-tie decided by
rounding). Exact ties (identical rows, unchanged tokens) must follow the reference's rule: lower id first. c_sel and
ref are then checked bitwise against the kernel's own selection.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import ops
from eventful_kernels import reference as R

from index_slots import out_of_range_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDTYPES = [torch.int32, torch.int64]
LAYOUTS = ["contiguous", "last_strided", "misaligned", "permuted"]
# (B, H, N, D): D picks the copy unit (fp32 D=4 / fp16 D=8 -> 16 bytes, smaller D -> 8/4/2 bytes, D=33 -> element
# copies), D=768 / D=1030 exercise wide rows (whole-block rows, several units per thread).
ROW_SHAPES = [(1, 1, 1, 1), (2, 3, 7, 4), (3, 2, 64, 8), (2, 1, 33, 33), (1, 2, 17, 768), (2, 1, 5, 1030)]
# (B, H, M, N): columns are the last dim; N=40 > 32 gives several id tiles, M=1 the degenerate row walk.
COL_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 9, 40), (2, 1, 1, 64), (1, 2, 130, 33)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(shape, dtype, layout, gen):
    """Random tensor of `shape` on DEV with the given memory layout; also returns (base, view_fn) for aliasing
    checks."""
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
    base = torch.randn(base_shape, generator=gen).to(dtype).to(DEV)
    x = view(base)
    assert x.shape == shape
    return x, base, view


def rand_index(B, N, K, idtype, gen, unique, transposed=False):
    if unique:
        rows = [torch.randperm(N, generator=gen)[:K] for _ in range(B)]
        idx = torch.stack(rows) if B else torch.empty(0, K, dtype=torch.long)
    else:
        idx = torch.randint(0, max(N, 1), (B, K), generator=gen)
    idx = idx.to(idtype)
    if transposed:  # strides (1, B)
        idx = idx.t().contiguous().t()
    return idx.to(DEV)


def with_empty_slots(idx, gen, frac=0.4, fill=-1):
    """`idx` with about `frac` of its entries (random positions), the first two of the last batch row and, if B > 1,
    all of batch row 0 set to `fill` (-1, an empty slot, or a [B, K] tensor of ids outside [0, N))."""
    out = idx.cpu().clone()
    mask = torch.rand(out.shape, generator=gen) < frac
    if out.shape[0] > 1:
        mask[0] = True
    if out.shape[0] > 0:
        mask[-1, :2] = True
    fill = torch.as_tensor(fill, dtype=out.dtype).expand(out.shape)
    out[mask] = fill[mask]
    return out.to(DEV)


def ks_for(N, unique):
    ks = sorted({0, 1, max(1, N // 2), N})
    return ks if unique else ks + [N + 3]


def as_rank(shape, rank):
    B, H, N, D = shape
    return (B, N, D) if rank == 3 else (B, H, N, D)


@pytest.mark.skipif(os.environ.get("EVENTFUL_BACKEND_CUDA", "").lower() == "triton", reason="Triton serves CUDA")
@pytest.mark.parametrize("name", ["gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "token_gate"])
def test_cuda_kernel_is_the_cpp_one(name):
    # The tests below must exercise csrc/cuda: the extension has to be built with CUDA (setup.py does so when
    # torch has CUDA and nvcc exists, or with EVENTFUL_CUDA=1).
    dump = torch._C._dispatch_dump(f"eventful::{name}")
    cuda_line = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert cuda_line and "csrc/cuda/" in cuda_line[0], dump


# ---------------------------------------------------------------------------------------------------- gathers


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_matches_reference(dtype, idtype, layout, rank):
    gen = _gen(1)
    for shape in ROW_SHAPES:
        B, _, N, _ = shape
        x, _, _ = make(as_rank(shape, rank), dtype, layout, gen)
        for K in ks_for(N, unique=False):
            idx = rand_index(B, N, K, idtype, gen, unique=False, transposed=K % 2 == 1)
            y = ops.gather_rows(x, idx)
            expected = R.gather_rows(x, idx)
            assert y.is_contiguous() and y.device == x.device
            assert torch.equal(y, expected), (shape, K)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_cols_matches_reference(dtype, idtype, layout, rank):
    gen = _gen(2)
    for shape in COL_SHAPES:
        B, _, _, N = shape
        x, _, _ = make(as_rank(shape, rank), dtype, layout, gen)
        for K in ks_for(N, unique=False):
            idx = rand_index(B, N, K, idtype, gen, unique=False, transposed=K % 2 == 1)
            y = ops.gather_cols(x, idx)
            assert y.is_contiguous()
            assert torch.equal(y, R.gather_cols(x, idx)), (shape, K)


def test_gather_large_batch_uses_grid_stride():
    # More row tasks than the capped grid has threads: every row must still be written (grid-stride loops).
    gen = _gen(3)
    x = torch.randn(64, 512, 64, generator=gen).to(DEV)
    idx = torch.randint(0, 512, (64, 1024), generator=gen).to(DEV)
    assert torch.equal(ops.gather_rows(x, idx), R.gather_rows(x, idx))
    a = torch.randn(8, 4, 256, 512, generator=gen).to(DEV)
    ia = torch.randint(0, 512, (8, 300), generator=gen).to(DEV)
    assert torch.equal(ops.gather_cols(a, ia), R.gather_cols(a, ia))


# --------------------------------------------------------------------------------------------------- scatters


def _check_scatter(op, ref_op, dst, base, view, idx, src):
    """Runs op on dst (a view of base) and ref_op on a copy of base: the whole base must agree (gaps untouched)."""
    base_ref = base.clone()
    ref_op(view(base_ref), idx, src)
    idx_before, src_before = idx.clone(), src.clone()
    out = op(dst, idx, src)
    assert out is dst
    assert torch.equal(base, base_ref)
    assert torch.equal(idx, idx_before) and torch.equal(src, src_before)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_matches_reference(dtype, idtype, layout, rank):
    gen = _gen(4)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]  # src and dst layouts differ
    for shape in ROW_SHAPES:
        B, H, N, D = shape
        for K in ks_for(N, unique=True):
            dst, base, view = make(as_rank(shape, rank), dtype, layout, gen)
            src, _, _ = make(as_rank((B, H, K, D), rank), dtype, src_layout, gen)
            idx = rand_index(B, N, K, idtype, gen, unique=True, transposed=K % 2 == 1)
            _check_scatter(ops.scatter_rows_, R.scatter_rows_, dst, base, view, idx, src)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_cols_matches_reference(dtype, idtype, layout, rank):
    gen = _gen(5)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    for shape in COL_SHAPES:
        B, H, M, N = shape
        for K in ks_for(N, unique=True):
            dst, base, view = make(as_rank(shape, rank), dtype, layout, gen)
            src, _, _ = make(as_rank((B, H, M, K), rank), dtype, src_layout, gen)
            idx = rand_index(B, N, K, idtype, gen, unique=True, transposed=K % 2 == 1)
            _check_scatter(ops.scatter_cols_, R.scatter_cols_, dst, base, view, idx, src)


def test_scatter_then_gather_round_trip_large():
    gen = _gen(6)
    B, H, N, D, K = 4, 8, 1024, 64, 700
    dst = torch.randn(B, H, N, D, generator=gen).half().to(DEV)
    src = torch.randn(B, H, K, D, generator=gen).half().to(DEV)
    idx = rand_index(B, N, K, torch.int64, gen, unique=True)
    expected = R.scatter_rows_(dst.clone(), idx, src)
    ops.scatter_rows_(dst, idx, src)
    assert torch.equal(dst, expected)
    assert torch.equal(ops.gather_rows(dst, idx), src)


# ------------------------------------------------------------------------------------------------- token_gate


def _assert_selection(index, c, ref_before, k):
    """index must be the reference's selection, up to near-ties at the top-k boundary (see module docstring)."""
    expected = R.select_topk(R.gate_scores(c, ref_before), k)
    assert index.dtype == torch.int64 and index.shape == expected.shape
    if torch.equal(index, expected):
        return
    scores = R.gate_scores(c, ref_before).double()
    for b in range(index.shape[0]):
        got, want = set(index[b].tolist()), set(expected[b].tolist())
        assert torch.equal(index[b], index[b].sort().values), "ids must be ascending"
        assert len(got) == k, "ids must be distinct"
        if got == want:
            continue
        kth = scores[b, expected[b]].min()
        for t in got ^ want:
            assert torch.isclose(scores[b, t], kth, rtol=1e-5, atol=0), (b, t, scores[b, t].item(), kth.item())


def _check_gate(c, ref, k):
    ref_before = ref.clone()
    c_before = c.clone()
    index, c_sel = ops.token_gate(c, ref, k)
    B, N, D = c.shape
    assert index.shape == (B, k) and c_sel.shape == (B, k, D) and c_sel.dtype == c.dtype and c_sel.is_contiguous()
    _assert_selection(index, c_before, ref_before, k)
    # c_sel and the ref update, bitwise, for the kernel's own selection.
    assert torch.equal(c_sel, R.gather_rows(c_before, index))
    assert torch.equal(ref, R.scatter_rows_(ref_before.clone(), index, c_sel))
    return index, c_sel


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gate_matches_reference(dtype, layout):
    gen = _gen(7)
    ref_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    for B, N, D in [(1, 1, 1), (3, 50, 64), (2, 197, 768), (2, 33, 33), (1, 300, 8), (4, 16, 1030)]:
        for k in sorted({0, 1, N // 3, N - 1, N}):
            c, _, _ = make((B, N, D), dtype, layout, gen)
            ref, _, _ = make((B, N, D), dtype, ref_layout, gen)
            _check_gate(c, ref, k)


def test_token_gate_many_tokens_grid_stride():
    # 300k one-feature tokens: more than one grid of the score kernel (grid-stride loop), and many exactly equal
    # scores (repeated float values), which must go to the lower id.
    gen = _gen(14)
    c = torch.randn(1, 300_000, 1, generator=gen).to(DEV)
    c[0, 5] = 3.0
    c[0, 1000:2000] = 3.0  # ~800 tokens score above 3, so k = 1500 cuts through this block of 1001 exact ties
    _check_gate(c, torch.zeros_like(c), 1500)


def test_token_gate_k_equals_n_and_zero():
    gen = _gen(8)
    c = torch.randn(3, 20, 16, generator=gen).to(DEV)
    ref = torch.randn(3, 20, 16, generator=gen).to(DEV)
    ref0 = ref.clone()
    index, c_sel = ops.token_gate(c, ref, 0)
    assert index.shape == (3, 0) and c_sel.shape == (3, 0, 16)
    assert torch.equal(ref, ref0)
    index, c_sel = ops.token_gate(c, ref, 20)
    assert torch.equal(index, torch.arange(20, device=DEV).expand(3, 20))
    assert torch.equal(c_sel, c) and torch.equal(ref, c)


def test_token_gate_exact_ties_prefer_lower_ids():
    gen = _gen(9)
    B, N, D = 2, 40, 24
    ref = torch.randn(B, N, D, generator=gen).to(DEV)
    c = ref.clone()
    # row 0: tokens 5, 17, 30 get identical (ref, c) rows, so their scores tie exactly; token 8 changes more; the
    # rest are unchanged (score exactly 0)
    delta = torch.randn(D, generator=gen).to(DEV)
    for t in (5, 17, 30):
        ref[0, t] = ref[0, 5]
        c[0, t] = ref[0, 5] + delta
    c[0, 8] = ref[0, 8] + 3 * delta
    # row 1: nothing changed, every score is exactly 0
    for k, want0 in [(1, [8]), (2, [5, 8]), (3, [5, 8, 17]), (6, [0, 1, 5, 8, 17, 30])]:
        r = ref.clone()
        index, _ = _check_gate(c, r, k)
        assert index[0].tolist() == want0
        assert index[1].tolist() == list(range(k))
        assert torch.equal(index, R.token_gate(c.clone(), ref.clone(), k)[0])


def test_token_gate_nan_scores_rank_first():
    B, N, D = 1, 10, 8
    ref = torch.zeros(B, N, D, device=DEV)
    c = torch.arange(N, dtype=torch.float32, device=DEV)[None, :, None].expand(B, N, D).contiguous()
    c[0, 7, 3] = float("nan")
    c[0, 2, 0] = float("nan")
    c[0, 4, 1] = float("inf")
    index, c_sel = ops.token_gate(c, ref, 4)
    expected = R.select_topk(R.gate_scores(c, torch.zeros_like(ref)), 4)
    assert torch.equal(index, expected)
    assert index[0].tolist() == [2, 4, 7, 9]
    assert torch.equal(c_sel.isnan(), c[0, [2, 4, 7, 9]][None].isnan())


def test_token_gate_batch_rows_select_independently():
    gen = _gen(10)
    B, N, D, k = 5, 64, 32, 7
    c = torch.randn(B, N, D, generator=gen).to(DEV)
    ref = c.clone()
    picks = [torch.randperm(N, generator=gen)[:k].sort().values for _ in range(B)]
    for b in range(B):
        ref[b, picks[b]] += 1.0 + torch.rand(k, D, generator=gen).to(DEV)  # clearly largest scores
    index, _ = _check_gate(c, ref, k)
    assert index.cpu().tolist() == [p.tolist() for p in picks]


def test_token_gate_aliasing():
    gen = _gen(11)
    # ref is c: every score is 0, the first k tokens are selected, nothing changes.
    x = torch.randn(2, 12, 16, generator=gen).to(DEV)
    x0 = x.clone()
    index, c_sel = ops.token_gate(x, x, 5)
    assert torch.equal(index, torch.arange(5, device=DEV).expand(2, 5))
    assert torch.equal(c_sel, x0[:, :5]) and torch.equal(x, x0)
    # c and ref overlap with a one-token shift: the selection is read before ref is written (as the reference).
    buf = torch.randn(2, 13, 16, generator=gen).to(DEV)
    buf_ref = buf.clone()
    index, c_sel = ops.token_gate(buf[:, :12], buf[:, 1:], 5)
    r_index, r_sel = R.token_gate(buf_ref[:, :12], buf_ref[:, 1:], 5)
    assert torch.equal(index, r_index) and torch.equal(c_sel, r_sel) and torch.equal(buf, buf_ref)


# ------------------------------------------------------------------------------------------------- bad input


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(12)).to(dtype).to(DEV)


@pytest.mark.parametrize("op", [ops.gather_rows, ops.gather_cols])
def test_gather_bad_metadata(op):
    x, idx = _x(2, 8, 8), torch.zeros(2, 3, dtype=torch.long, device=DEV)
    cases = [
        (lambda: op(_x(8, 8), idx), RuntimeError, "'x'"),  # rank 2
        (lambda: op(x.long(), idx), RuntimeError, "'x'"),  # dtype
        (lambda: op(x, idx.float()), RuntimeError, "'index'"),  # index dtype
        (lambda: op(x, idx[0]), RuntimeError, "'index'"),  # index rank
        (lambda: op(x, torch.zeros(3, 3, dtype=torch.long, device=DEV)), RuntimeError, "'index'"),  # batch
        (lambda: op(x, idx.cpu()), RuntimeError, "'index'"),  # device
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("idtype", IDTYPES)
def test_scatter_bad_input_leaves_state_unchanged(cols, idtype):
    op = ops.scatter_cols_ if cols else ops.scatter_rows_
    B, H, N, D, K = 2, 3, 10, 6, 4
    dst = _x(B, H, D, N) if cols else _x(B, H, N, D)
    src = _x(B, H, D, K) if cols else _x(B, H, K, D)
    good = torch.tensor([[1, 3, 5, 7], [0, 2, 4, 9]], dtype=idtype, device=DEV)

    def idx_with(b, j, v):
        t = good.clone()
        t[b, j] = v
        return t

    cases = [
        (idx_with(1, 2, N), src, IndexError, r"'index' holds 10 at \[1, 2\], out of range \[0, 10\)"),
        (idx_with(0, 0, -2), src, IndexError, re.escape("eventful: argument 'index' holds -2 at [0, 0], out of range "
                                                        "[0, 10)")),
        (idx_with(1, 3, 2), src, RuntimeError, r"'index' repeats token id 2 in row 1"),
        (good, src.double(), RuntimeError, "'src'"),
        (good, src[:, :, :, :-1] if not cols else src[:, :, :-1], RuntimeError, "'src'"),
        (good, src[:, :2], RuntimeError, "'src'"),
        (good, src.cpu(), RuntimeError, "'src'"),
        (good.cpu(), src, RuntimeError, "'index'"),
        (good.float(), src, RuntimeError, "'index'"),
    ]
    for idx, s, exc, msg in cases:
        dst0, src0, idx0 = dst.clone(), s.clone(), idx.clone()
        with pytest.raises(exc, match=msg):
            op(dst, idx, s)
        assert torch.equal(dst, dst0) and torch.equal(s, src0) and torch.equal(idx, idx0)
    # an expanded dst cannot be written in place
    exp = _x(1, H, N, D).expand(B, H, N, D) if not cols else _x(1, H, D, N).expand(B, H, D, N)
    with pytest.raises(RuntimeError, match="'dst'"):
        op(exp, good, src)
    # the same call with a good index works (the checks above were not vacuous), also with repeated -1 slots
    op(dst, good, src)
    expected = (R.scatter_cols_ if cols else R.scatter_rows_)(dst0.clone(), good, src)
    assert torch.equal(dst, expected)
    padded = idx_with(1, 0, -1)
    padded[1, 2] = -1
    before = dst.clone()
    op(dst, padded, src)
    assert torch.equal(dst, (R.scatter_cols_ if cols else R.scatter_rows_)(before, padded, src))


def test_token_gate_bad_input_leaves_ref_unchanged():
    c, ref = _x(2, 10, 8), _x(2, 10, 8)
    cases = [
        (c, ref, 11, ValueError, "'k'"),
        (c, ref, -1, ValueError, "'k'"),
        (c, ref[:, :9], 3, RuntimeError, "'ref'"),
        (c, ref[..., :7], 3, RuntimeError, "'ref'"),
        (c, ref.half(), 3, RuntimeError, "'ref'"),
        (c, ref.cpu(), 3, RuntimeError, "'ref'"),
        (c[0], ref[0], 3, RuntimeError, "'c'"),
        (c.long(), ref.long(), 3, RuntimeError, "'c'"),
    ]
    for cc, rr, k, exc, msg in cases:
        c0, r0 = cc.clone(), rr.clone()
        with pytest.raises(exc, match=msg):
            ops.token_gate(cc, rr, k)
        assert torch.equal(cc, c0) and torch.equal(rr, r0)
    with pytest.raises(RuntimeError, match="'ref'"):
        ops.token_gate(c, _x(1, 10, 8).expand(2, 10, 8), 3)


@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("op", ["gather_rows", "gather_cols"])
def test_gather_checked_rejects_out_of_range(op, idtype):
    # check_index=True (the default): the ids are checked on the device and one flag read back; -1 is accepted.
    x = _x(2, 8, 8)
    for bad, msg in [([[0, 8], [1, 2]], "holds 8 at [0, 1], out of range [0, 8)"),
                     ([[-1, 3], [-2, -1]], "holds -2 at [1, 0], out of range [0, 8)")]:
        idx = torch.tensor(bad, dtype=idtype, device=DEV)
        with pytest.raises(IndexError, match=re.escape("eventful: argument 'index' " + msg)):
            getattr(ops, op)(x, idx)
    idx = torch.tensor([[-1, 7, -1], [-1, -1, -1]], dtype=idtype, device=DEV)
    assert torch.equal(getattr(ops, op)(x, idx), getattr(R, op)(x, idx))


# ------------------------------------------------------------------------------------------------ empty slots


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_empty_slots(dtype, idtype, layout, check_index):
    gen = _gen(15)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    scatter = lambda d, i, s: ops.scatter_rows_(d, i, s, check_index=check_index)  # noqa: E731
    for rank in (3, 4):
        for shape in ROW_SHAPES:
            B, H, N, D = shape
            x, _, _ = make(as_rank(shape, rank), dtype, layout, gen)
            for K in ks_for(N, unique=False):
                idx = with_empty_slots(rand_index(B, N, K, idtype, gen, unique=False), gen)
                assert torch.equal(ops.gather_rows(x, idx, check_index=check_index), R.gather_rows(x, idx)), (shape, K)
            for K in ks_for(N, unique=True):
                dst, base, view = make(as_rank(shape, rank), dtype, layout, gen)
                src, _, _ = make(as_rank((B, H, K, D), rank), dtype, src_layout, gen)
                idx = with_empty_slots(rand_index(B, N, K, idtype, gen, unique=True), gen)
                if K % 2 == 1:
                    idx = idx.t().contiguous().t()
                _check_scatter(scatter, R.scatter_rows_, dst, base, view, idx, src)


@pytest.mark.parametrize("check_index", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cols_with_empty_slots(dtype, idtype, layout, check_index):
    gen = _gen(16)
    src_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    scatter = lambda d, i, s: ops.scatter_cols_(d, i, s, check_index=check_index)  # noqa: E731
    for rank in (3, 4):
        for shape in COL_SHAPES:
            B, H, M, N = shape
            x, _, _ = make(as_rank(shape, rank), dtype, layout, gen)
            for K in ks_for(N, unique=False):
                idx = with_empty_slots(rand_index(B, N, K, idtype, gen, unique=False), gen)
                assert torch.equal(ops.gather_cols(x, idx, check_index=check_index), R.gather_cols(x, idx)), (shape, K)
            for K in ks_for(N, unique=True):
                dst, base, view = make(as_rank(shape, rank), dtype, layout, gen)
                src, _, _ = make(as_rank((B, H, M, K), rank), dtype, src_layout, gen)
                idx = with_empty_slots(rand_index(B, N, K, idtype, gen, unique=True), gen)
                if K % 2 == 1:
                    idx = idx.t().contiguous().t()
                _check_scatter(scatter, R.scatter_cols_, dst, base, view, idx, src)


@pytest.mark.parametrize("idtype", IDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unchecked_out_of_range_ids_are_empty_slots(dtype, idtype):
    # check_index=False: ids outside [0, N) are never read or written through (no device assert, no fault); gathers
    # give zeros there, scatters skip them, exactly as the reference.
    gen = _gen(17)
    scatter_rows = lambda d, i, s: ops.scatter_rows_(d, i, s, check_index=False)  # noqa: E731
    scatter_cols = lambda d, i, s: ops.scatter_cols_(d, i, s, check_index=False)  # noqa: E731
    for layout in LAYOUTS:
        for shape in ROW_SHAPES:
            B, H, N, D = shape
            x, base, view = make(shape, dtype, layout, gen)
            idx = rand_index(B, N, N + 3, idtype, gen, unique=False)
            idx = with_empty_slots(idx, gen, fill=out_of_range_ids(idx.shape, N, idtype, gen))
            assert torch.equal(ops.gather_rows(x, idx, check_index=False), R.gather_rows(x, idx))
            uidx = rand_index(B, N, N, idtype, gen, unique=True)
            uidx = with_empty_slots(uidx, gen, fill=out_of_range_ids(uidx.shape, N, idtype, gen))
            src, _, _ = make((B, H, N, D), dtype, "contiguous", gen)
            _check_scatter(scatter_rows, R.scatter_rows_, x, base, view, uidx, src)
        for shape in COL_SHAPES:
            B, H, M, N = shape
            a, base, view = make(shape, dtype, layout, gen)
            idx = rand_index(B, N, N + 3, idtype, gen, unique=False)
            idx = with_empty_slots(idx, gen, fill=out_of_range_ids(idx.shape, N, idtype, gen))
            assert torch.equal(ops.gather_cols(a, idx, check_index=False), R.gather_cols(a, idx))
            uidx = rand_index(B, N, N, idtype, gen, unique=True)
            uidx = with_empty_slots(uidx, gen, fill=out_of_range_ids(uidx.shape, N, idtype, gen))
            src, _, _ = make((B, H, M, N), dtype, "contiguous", gen)
            _check_scatter(scatter_cols, R.scatter_cols_, a, base, view, uidx, src)
    torch.cuda.synchronize()


@pytest.mark.parametrize("cols", [False, True])
def test_unchecked_valid_ids_equal_checked(cols):
    gen = _gen(18)
    gather, scatter = (ops.gather_cols, ops.scatter_cols_) if cols else (ops.gather_rows, ops.scatter_rows_)
    for shape in COL_SHAPES if cols else ROW_SHAPES:
        N = shape[3] if cols else shape[2]
        x, _, _ = make(shape, torch.float16, "misaligned", gen)
        idx = rand_index(shape[0], N, N, torch.int64, gen, unique=True)
        assert torch.equal(gather(x, idx), gather(x, idx, check_index=False))
        src = gather(x, idx.flip(1))
        a, b = x.clone(), x.clone()
        scatter(a, idx, src)
        scatter(b, idx, src, check_index=False)
        assert torch.equal(a, b)


def test_unchecked_ops_are_cuda_graph_capturable():
    # check_index=False launches kernels only (no flag read back, unlike the checked ops), so a frame's gathers and
    # scatters can be captured and replayed.
    gen = _gen(19)
    x = torch.randn(2, 3, 64, 32, generator=gen).to(DEV)
    a = torch.randn(2, 3, 16, 64, generator=gen).to(DEV)
    idx = torch.tensor([[5, -1, 63, 0, -1], [-1, -1, 7, 8, 9]], device=DEV)
    x_ref, a_ref = x.clone(), a.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        ops.gather_rows(x, idx, check_index=False)
        ops.gather_cols(a, idx, check_index=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows = ops.gather_rows(x, idx, check_index=False)
        ops.scatter_rows_(x, idx, rows * 2, check_index=False)
        cols = ops.gather_cols(a, idx, check_index=False)
        ops.scatter_cols_(a, idx, cols + 1, check_index=False)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        r = R.gather_rows(x_ref, idx)
        R.scatter_rows_(x_ref, idx, r * 2)
        c = R.gather_cols(a_ref, idx)
        R.scatter_cols_(a_ref, idx, c + 1)
        assert torch.equal(x, x_ref) and torch.equal(a, a_ref) and torch.equal(rows, r) and torch.equal(cols, c)


# ---------------------------------------------------------------------------------------------------- opcheck


def test_opcheck_cuda():
    gen = _gen(13)
    x = torch.randn(2, 3, 10, 8, generator=gen).half().to(DEV)
    idx = rand_index(2, 10, 4, torch.int64, gen, unique=True)
    idx32 = idx.int()
    a = torch.randn(2, 6, 10, generator=gen).to(DEV)
    torch.library.opcheck(torch.ops.eventful.gather_rows.default, (x, idx))
    torch.library.opcheck(torch.ops.eventful.gather_cols.default, (a, idx32))
    src_rows, src_cols = torch.randn(2, 3, 4, 8).half().to(DEV), torch.randn(2, 6, 4).to(DEV)
    torch.library.opcheck(torch.ops.eventful.scatter_rows_.default, (x.clone(), idx32, src_rows))
    torch.library.opcheck(torch.ops.eventful.scatter_cols_.default, (a.clone(), idx, src_cols))
    padded = torch.tensor([[3, -1, 0, -1], [-1, -1, -1, -1]], device=DEV)
    unchecked = {"check_index": False}
    for kwargs, p in (({}, padded), (unchecked, padded), (unchecked, torch.where(padded < 0, 10, padded))):
        torch.library.opcheck(torch.ops.eventful.gather_rows.default, (x, p), kwargs)
        torch.library.opcheck(torch.ops.eventful.gather_cols.default, (a, p.int()), kwargs)
        torch.library.opcheck(torch.ops.eventful.scatter_rows_.default, (x.clone(), p.int(), src_rows), kwargs)
        torch.library.opcheck(torch.ops.eventful.scatter_cols_.default, (a.clone(), p, src_cols), kwargs)
    c = torch.randn(2, 10, 16, generator=gen).bfloat16().to(DEV)
    torch.library.opcheck(torch.ops.eventful.token_gate.default, (c, torch.zeros_like(c), 3))
    torch.library.opcheck(torch.ops.eventful.token_gate.default, (c, torch.zeros_like(c), 0))


# ---------------------------------------------------------------------------------------------- memory check


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_kernels_clean_under_compute_sanitizer():
    # Every kernel on odd shapes and layouts (vector and element paths, K = 0 and N, empty slots, unchecked
    # out-of-range ids, rejected scatters) under
    # memcheck and racecheck: no out-of-bounds access, no hazard.
    code = textwrap.dedent(
        """
        import torch, eventful_kernels
        from eventful_kernels import ops
        g = torch.Generator().manual_seed(0)
        def r(*s): return torch.randn(*s, generator=g).cuda()
        for dt in (torch.float32, torch.float16):
            x = r(2, 3, 9, 33).to(dt)[..., 1:]
            for K in (0, 5, 9):
                idx = torch.stack([torch.randperm(9, generator=g)[:K] for _ in range(2)]).cuda()
                y = ops.gather_rows(x, idx); ops.scatter_rows_(x, idx, y)
                a = x.transpose(-1, -2)
                z = ops.gather_cols(a, idx); ops.scatter_cols_(a, idx, z)
                for bad in (-1, 9, -5, 2**40):  # empty slots: -1 (checked and not), other ids outside [0, 9) unchecked
                    pidx = idx.clone(); pidx[:, ::2] = bad
                    kw = dict(check_index=bad == -1 and K % 2 == 0)
                    y = ops.gather_rows(x, pidx, **kw); ops.scatter_rows_(x, pidx, y, **kw)
                    z = ops.gather_cols(a, pidx, **kw); ops.scatter_cols_(a, pidx, z, **kw)
            c = r(2, 50, 40).to(dt)
            for k in (0, 7, 50):
                ops.token_gate(c, r(2, 50, 40).to(dt), k)
            try:
                ops.scatter_rows_(x, torch.tensor([[0, 9], [1, 1]]).cuda(), r(2, 3, 2, 32).to(dt))
            except (IndexError, RuntimeError):
                pass
        torch.cuda.synchronize()
        print("DONE")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # exact allocation bounds for memcheck
    for tool in ("memcheck", "racecheck"):
        proc = subprocess.run(
            ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", code],
            capture_output=True, text=True, timeout=900, env=env,
        )
        assert proc.returncode == 0 and "DONE" in proc.stdout, (tool, proc.stdout[-4000:], proc.stderr[-4000:])
