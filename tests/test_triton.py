"""Triton kernels (eventful_kernels.triton) against eventful_kernels.reference.

Without a GPU every kernel runs on small CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set here
before triton is imported); with a GPU the same checks run on CUDA tensors, and TestCudaDispatch repeats them
through torch.ops.eventful plus opcheck. Shapes are deliberately small and odd (masking of partial tiles).

Tolerances: data-movement ops and gates are compared bit for bit (they copy values, or compute one fp32 difference
and one rounding exactly as the reference does). Exception: on CUDA torch sums the reference's gate scores in
another order than the kernel, so a near-tie at the k-th score may be selected either way; there a gate's selection
is checked tie-tolerantly (_assert_gate) and everything the returned index implies bit for bit.
qk_update_/av_delta_update_ accumulate fp32 dot products in a different order than torch.matmul: fp32 results agree
to ~1e-6 relative; fp16/bf16 results are the same fp32 value rounded once, so they may differ by one unit in the
last place of the output type (2^-10 / 2^-7 relative).

Index contract: -1 is an empty slot every op skips; ``check_index=False`` skips the value check and treats every id
outside [0, N) as an empty slot (the reference's reading of any such id).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton's jit kernels

pytest.importorskip("triton")

import eventful_kernels  # noqa: E402
import eventful_kernels.triton as T  # noqa: E402
from eventful_kernels import ops  # noqa: E402
from eventful_kernels import reference as R  # noqa: E402
from eventful_kernels.triton import _register, _runtime  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not T.INTERPRET:
    pytest.skip("eventful_kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one ulp of the output type (see module docstring); fp32: summation-order noise only
MATMUL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2 ** -10, atol=1e-3),
              torch.bfloat16: dict(rtol=2 ** -7, atol=1e-2)}


# ---------------------------------------------------------------- data helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g, device=DEVICE):
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous view holding t's values: 'step' (every other element of the last dim) or 'colmajor'."""
    if how == "contig":
        return t
    if how == "step":
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        v = big[..., ::2]
    else:
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert v.numel() == 0 or min(t.shape[-2:]) <= 1 or not v.is_contiguous()
    return v


def _index(b, k, n, dtype, g, device=DEVICE, strided=False):
    """[B, K] distinct, unsorted ids per row."""
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]).to(dtype).to(device)
    if strided:
        big = torch.zeros((b, 2 * k), dtype=dtype, device=device)
        big[:, ::2] = idx
        idx = big[:, ::2]
    return idx


def _index_with_empty(b, k, n, dtype, g, device=DEVICE, strided=False, bad=()):
    """[B, K] like _index, but about a third of the slots are -1 (empty slots, repeated), row 1 (if B > 1) holds only
    -1, and K may exceed N (the extra slots are -1). ``bad``: further ids (e.g. out of range) put into row 0."""
    rows = []
    for _ in range(b):
        row = torch.full((k,), -1, dtype=torch.long)
        take = min(k, n)
        row[:take] = torch.randperm(n, generator=g)[:take]
        row = row[torch.randperm(k, generator=g)]
        row[torch.rand(k, generator=g) < 0.35] = -1
        rows.append(row)
    idx = torch.stack(rows) if b else torch.empty((0, k), dtype=torch.long)
    if b > 1:
        idx[1] = -1
    for j, v in enumerate(bad):
        idx[0, j % max(k, 1)] = v
    idx = idx.to(dtype).to(device)
    if strided:
        big = torch.zeros((b, 2 * k), dtype=dtype, device=device)
        big[:, ::2] = idx
        idx = big[:, ::2]
    return idx


def _guarded(shape, dtype, g, device=DEVICE, rand=False):
    """``(view, buffer)``: a ``shape`` view in the interior of a random buffer one element larger on each side of
    every dim, so a write outside the view shows up in the buffer."""
    big_shape = [n + 2 for n in shape]
    big = torch.rand(big_shape, generator=g).to(dtype).to(device) if rand else _randn(big_shape, dtype, g, device)
    return big[tuple(slice(1, 1 + n) for n in shape)], big


def _assert_same_guards(buf, want):
    """The guard elements of two _guarded buffers (everything but the interior) are bit-identical."""
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[(slice(1, -1),) * buf.dim()] = False
    assert torch.equal(buf[outside].cpu(), want[outside].cpu())


def _assert_same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(a.cpu(), b.cpu())


# ---------------------------------------------------------------- shared checks (impl = triton module or ops)

def check_gather_scatter_rows(impl, device, dtype, idt, seed=0):
    g = _gen(seed)
    for shape, layout in [((2, 13, 19), "contig"), ((3, 2, 11, 600), "step"), ((2, 3, 9, 16), "colmajor")]:
        n = shape[-2]
        for k in (0, 4, n):
            x = _strided(_randn(shape, dtype, g, device), layout)
            idx = _index(shape[0], k, n, idt, g, device, strided=layout != "contig")
            y = impl.gather_rows(x, idx)
            _assert_same(y, R.gather_rows(x, idx))
            assert y.is_contiguous()
            dst, dst_ref = _strided(_randn(shape, dtype, g, device), layout), None
            dst_ref = dst.clone()
            src = _strided(_randn((*shape[:-2], k, shape[-1]), dtype, g, device), layout)
            out = impl.scatter_rows_(dst, idx, src)
            assert out is dst
            _assert_same(dst, R.scatter_rows_(dst_ref, idx, src))


def check_gather_scatter_cols(impl, device, dtype, idt, seed=1):
    g = _gen(seed)
    for shape, layout in [((2, 10, 21), "contig"), ((2, 3, 7, 40), "step"), ((3, 2, 12, 9), "colmajor")]:
        n = shape[-1]
        for k in (0, 5, n):
            x = _strided(_randn(shape, dtype, g, device), layout)
            idx = _index(shape[0], k, n, idt, g, device, strided=layout == "step")
            y = impl.gather_cols(x, idx)
            _assert_same(y, R.gather_cols(x, idx))
            dst = _strided(_randn(shape, dtype, g, device), layout)
            dst_ref = dst.clone()
            src = _strided(_randn((*shape[:-1], k), dtype, g, device), layout) if k > 1 else \
                _randn((*shape[:-1], k), dtype, g, device)
            impl.scatter_cols_(dst, idx, src)
            _assert_same(dst, R.scatter_cols_(dst_ref, idx, src))


def check_empty_slots_rows_cols(impl, device, dtype, idt, seed=20):
    """-1 slots at random positions, a row of only -1, K = 0 / N / N + 2, B > 1, strided operands; checked and
    unchecked calls agree with the reference bit for bit."""
    g = _gen(seed)
    for shape, layout in [((3, 11, 24), "contig"), ((2, 2, 9, 40), "step"), ((3, 2, 7, 16), "colmajor")]:
        for cols in (False, True):
            n = shape[-1] if cols else shape[-2]
            gather, scatter = (impl.gather_cols, impl.scatter_cols_) if cols else (impl.gather_rows, impl.scatter_rows_)
            r_gather, r_scatter = (R.gather_cols, R.scatter_cols_) if cols else (R.gather_rows, R.scatter_rows_)
            for k in (0, 5, n, n + 2):
                x = _strided(_randn(shape, dtype, g, device), layout)
                idx = _index_with_empty(shape[0], k, n, idt, g, device, strided=layout == "step")
                src_shape = (*shape[:-1], k) if cols else (*shape[:-2], k, shape[-1])
                src = _strided(_randn(src_shape, dtype, g, device), layout) if k > 1 else _randn(src_shape, dtype, g,
                                                                                                 device)
                dst0 = _strided(_randn(shape, dtype, g, device), layout)
                want_y, want_dst = r_gather(x, idx), r_scatter(dst0.clone(), idx, src)
                for check_index in (True, False):
                    _assert_same(gather(x, idx, check_index=check_index), want_y)
                    dst = dst0.clone()
                    scatter(dst, idx, src, check_index=check_index)
                    _assert_same(dst, want_dst)


def check_empty_slots_delta_gate(impl, device, dtype, idt, seed=21):
    g = _gen(seed)
    for (b, n, d), layout in [((3, 12, 19), "contig"), ((2, 8, 40), "step")]:
        for k in (0, 4, n, n + 2):
            c, ref = _gate_inputs(b, n, d, dtype, g, device, layout)
            idx = _index_with_empty(b, k, n, idt, g, device, strided=layout == "step")
            rr = ref.clone()
            want = R.token_delta_gate(c, rr, -1, idx)
            for check_index in (True, False):
                rc = ref.clone()
                got = impl.token_delta_gate(c, rc, -1, idx, check_index=check_index)
                for x, y in zip(got, want):
                    _assert_same(x, y)
                _assert_same(rc, rr)


def check_empty_slots_attention(impl, device, dtype, idt, seed=22):
    g = _gen(seed)
    for (b, h, nq, nk, d), layout in [((3, 2, 9, 11, 16), "contig"), ((2, None, 10, 7, 24), "step")]:
        lead = (b,) if h is None else (b, h)
        for kq, kk in ((0, 4), (4, 0), (nq, nk + 2), (3, 5)):
            q = _strided(_randn((*lead, nq, d), dtype, g, device), layout)
            kt = _strided(_randn((*lead, nk, d), dtype, g, device), layout)
            logits0 = _strided(_randn((*lead, nq, nk), dtype, g, device), layout)
            iq = _index_with_empty(b, kq, nq, idt, g, device, strided=layout == "step")
            ik = _index_with_empty(b, kk, nk, idt, g, device)
            want = R.qk_update_(logits0.clone(), q, kt, iq, ik, 0.37)
            for check_index in (True, False):
                logits = logits0.clone()
                impl.qk_update_(logits, q, kt, iq, ik, 0.37, check_index=check_index)
                torch.testing.assert_close(logits, want, **MATMUL_TOL[dtype])
                _assert_untouched(logits, want, iq, ik)
        m = nq
        for k in (0, 4, nk, nk + 2):
            a_new = _strided(torch.rand((*lead, m, nk), generator=g).to(dtype).to(device), layout)
            a_ref = _strided(torch.rand((*lead, m, nk), generator=g).to(dtype).to(device), layout)
            v_new = _strided(_randn((*lead, nk, d), dtype, g, device), layout)
            v_ref = _strided(_randn((*lead, nk, d), dtype, g, device), layout)
            out = _strided(_randn((*lead, m, d), dtype, g, device), layout)
            idx = _index_with_empty(b, k, nk, idt, g, device, strided=layout == "step")
            state = [out.clone(), a_ref.clone(), v_ref.clone()]
            R.av_delta_update_(state[0], a_new, state[1], v_new, state[2], idx)
            for check_index in (True, False):
                o, ar, vr = out.clone(), a_ref.clone(), v_ref.clone()
                impl.av_delta_update_(o, a_new, ar, v_new, vr, idx, check_index=check_index)
                torch.testing.assert_close(o, state[0], **MATMUL_TOL[dtype])
                _assert_same(ar, state[1])
                _assert_same(vr, state[2])


def check_unchecked_out_of_range(impl, device, dtype, idt, seed=23):
    """check_index=False with ids N, 2N+3, -5 (and -1) among valid ones: the reference's result with those slots
    empty, and nothing outside the operands is touched (each written tensor is a view inside a guard buffer)."""
    g = _gen(seed)
    B, H, N, D, M = 2, 2, 9, 24, 7

    def bad(n):
        return (n, 2 * n + 3, -5, -1)

    # rows / columns
    for cols in (False, True):
        shape = (B, H, M, N) if cols else (B, H, N, D)
        gather, scatter = (impl.gather_cols, impl.scatter_cols_) if cols else (impl.gather_rows, impl.scatter_rows_)
        r_gather, r_scatter = (R.gather_cols, R.scatter_cols_) if cols else (R.gather_rows, R.scatter_rows_)
        idx = _index_with_empty(B, 6, N, idt, g, device, bad=bad(N))
        x, _ = _guarded(shape, dtype, g, device)
        _assert_same(gather(x, idx, check_index=False), r_gather(x, idx))
        dst, buf = _guarded(shape, dtype, g, device)
        buf_want = buf.clone()
        src = _randn((B, H, M, 6) if cols else (B, H, 6, D), dtype, g, device)
        scatter(dst, idx, src, check_index=False)
        r_scatter(buf_want[tuple(slice(1, 1 + n) for n in shape)], idx, src)
        _assert_same(buf, buf_want)
    # delta gate with an explicit index (returned as given, as int64)
    c, _ = _guarded((B, N, D), dtype, g, device)
    ref, buf = _guarded((B, N, D), dtype, g, device)
    idx = _index_with_empty(B, 6, N, idt, g, device, bad=bad(N))
    buf_want = buf.clone()
    want = R.token_delta_gate(c, buf_want[1:-1, 1:-1, 1:-1], -1, idx)
    got = impl.token_delta_gate(c, ref, -1, idx, check_index=False)
    for x, y in zip(got, want):
        _assert_same(x, y)
    _assert_same(buf, buf_want)
    # qk_update_ / av_delta_update_
    q, _ = _guarded((B, H, N, D), dtype, g, device)
    kt, _ = _guarded((B, H, N + 2, D), dtype, g, device)
    logits, buf = _guarded((B, H, N, N + 2), dtype, g, device)
    iq = _index_with_empty(B, 5, N, idt, g, device, bad=bad(N))
    ik = _index_with_empty(B, 5, N + 2, idt, g, device, bad=bad(N + 2))
    buf_want = buf.clone()
    R.qk_update_(buf_want[1:-1, 1:-1, 1:-1, 1:-1], q, kt, iq, ik, 0.37)
    impl.qk_update_(logits, q, kt, iq, ik, 0.37, check_index=False)
    inner = (slice(1, -1),) * 4
    torch.testing.assert_close(buf, buf_want, **MATMUL_TOL[dtype])
    _assert_same_guards(buf, buf_want)
    _assert_untouched(logits, buf_want[inner], iq, ik)
    a_new, _ = _guarded((B, H, M, N), dtype, g, device, rand=True)
    v_new, _ = _guarded((B, H, N, D), dtype, g, device)
    out, out_buf = _guarded((B, H, M, D), dtype, g, device)
    a_ref, a_buf = _guarded((B, H, M, N), dtype, g, device, rand=True)
    v_ref, v_buf = _guarded((B, H, N, D), dtype, g, device)
    idx = _index_with_empty(B, 6, N, idt, g, device, bad=bad(N))
    want = [t.clone() for t in (out_buf, a_buf, v_buf)]
    R.av_delta_update_(want[0][inner], a_new, want[1][inner], v_new, want[2][inner], idx)
    impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, idx, check_index=False)
    torch.testing.assert_close(out_buf, want[0], **MATMUL_TOL[dtype])
    _assert_same_guards(out_buf, want[0])
    _assert_same(a_buf, want[1])
    _assert_same(v_buf, want[2])


def _between_scores(scores, q: float) -> float:
    """A threshold halfway between two adjacent distinct scores (at quantile q): a threshold equal to a score would
    make ``score > h`` depend on the last-ulp summation order, which differs between backends."""
    s = torch.unique(scores.float().flatten().cpu())
    i = min(int(q * (len(s) - 1)), len(s) - 2) if len(s) > 1 else 0
    return float((s[i] + s[min(i + 1, len(s) - 1)]) / 2)


def _gate_inputs(b, n, d, dtype, g, device, layout="contig"):
    """c, ref with exact ties: rows 1, 4, 6 share one difference; rows 2, 7 are unchanged (score exactly 0)."""
    c = torch.randn(b, n, d, generator=g)
    ref = torch.randn(b, n, d, generator=g)
    if n > 7:
        c[:, [4, 6]] = c[:, 1:2].clone()
        ref[:, [4, 6]] = ref[:, 1:2].clone()
        ref[:, [2, 7]] = c[:, [2, 7]]
    c, ref = c.to(dtype).to(device), ref.to(dtype).to(device)
    return _strided(c, layout), _strided(ref, layout)


def _exact_scores(c, ref):
    """float64 gate scores on the host (NaN ranks first, as +inf) -- the yardstick of the tie-tolerant check."""
    s = (c.detach().cpu().double() - ref.detach().cpu().double()).pow(2).sum(-1).sqrt()
    return torch.where(s.isnan(), torch.full_like(s, float("inf")), s)


def _assert_gate(device, c, ref0, ref1, got, want, ref_want, kind, k=None, threshold=None, capacity=None, exact=None):
    """A gate result ``got`` (``kind`` topk: (index, c_sel); threshold: (index, count, c_sel); delta: (index, c_sel,
    e_sel)) against the reference's ``want`` / ``ref_want`` from the same ``c`` and ``ref0`` (``ref1``: the gate's
    ``ref`` after the call).

    Under the interpreter the scores are summed in the reference's order, so everything must match bit for bit. On
    CUDA torch reduces the reference scores in another order, so their last bit may differ from the kernel's and a
    near-tie at the k-th score may fall either way; there the selection is checked for what it must be: ids
    ascending and distinct, every selected score >= every eligible unselected one within fp32 rounding of the score,
    the threshold respected within the same rounding, and c_sel / e_sel / ref exactly what the returned index
    implies. ``exact`` overrides the choice (tests of this check itself)."""
    if device == "cpu" if exact is None else exact:
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


def check_token_gate(impl, device, dtype, seed=2):
    g = _gen(seed)
    for (b, n, d), layout in [((2, 12, 19), "contig"), ((3, 9, 150), "step"), ((1, 10, 8), "colmajor")]:
        for k in (0, 1, 5, n - 1, n):
            c, ref = _gate_inputs(b, n, d, dtype, g, device, layout)
            ref0, ref_r = ref.clone(), ref.clone()
            got = impl.token_gate(c, ref, k)
            want = R.token_gate(c, ref_r, k)
            _assert_gate(device, c, ref0, ref, got, want, ref_r, "topk", k=k)


def check_token_gate_ties_long_rows(impl, device, dtype, seed=3):
    """N > the select kernel's block: prefix sums and tie ranks must carry across blocks."""
    g = _gen(seed)
    b, n, d = 2, 2100, 4
    c = torch.randn(b, n, d, generator=g)
    ref = torch.randn(b, n, d, generator=g)
    tied = torch.arange(3, n, 97)  # one shared difference at ids spread over all blocks
    c[:, tied], ref[:, tied] = c[:, 3:4] * 4, ref[:, 3:4].clone()
    ref[:, 1000:1100] = c[:, 1000:1100]  # exact zeros
    c, ref = c.to(dtype).to(device), ref.to(dtype).to(device)
    scores = R.gate_scores(c, ref)
    n_above_tie = int((scores[0] > scores[0, 3]).sum())
    for k in (n_above_tie + 5, 1500, n):  # cut inside the tied group, then inside the zeros, then everything
        rc, rr = ref.clone(), ref.clone()
        got, want = impl.token_gate(c, rc, k), R.token_gate(c, rr, k)
        _assert_gate(device, c, ref, rc, got, want, rr, "topk", k=k)
    for h, cap in ((_between_scores(scores[0, 3:4], 0.0) * 0.999, 40), (0.0, n), (_between_scores(scores, 0.5), 700)):
        rc, rr = ref.clone(), ref.clone()
        got, want = impl.token_gate_threshold(c, rc, h, cap), R.token_gate_threshold(c, rr, h, cap)
        _assert_gate(device, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=cap)


def check_token_gate_threshold(impl, device, dtype, seed=4):
    g = _gen(seed)
    for (b, n, d), layout in [((3, 12, 19), "contig"), ((2, 9, 33), "step")]:
        c, ref = _gate_inputs(b, n, d, dtype, g, device, layout)
        med = _between_scores(R.gate_scores(c, ref), 0.5)
        # (threshold, capacity): some above / capacity cuts / capacity = N / none / all (h < 0) / zero capacity;
        # h = 0 excludes the unchanged tokens (strict >)
        for h, cap in ((med, n), (med, 2), (0.0, n), (1e9, 4), (-1.0, n), (-1.0, 3), (med, 0), (0.0, 1)):
            rc = ref.clone()
            rr = ref.clone()
            got = impl.token_gate_threshold(c, rc, h, cap)
            want = R.token_gate_threshold(c, rr, h, cap)
            _assert_gate(device, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=cap)


def check_token_delta_gate(impl, device, dtype, idt, seed=5):
    g = _gen(seed)
    for (b, n, d), layout in [((2, 12, 19), "contig"), ((3, 8, 40), "step")]:
        for k in (0, 3, n):
            c, ref = _gate_inputs(b, n, d, dtype, g, device, layout)
            rc, rr = ref.clone(), ref.clone()
            got, want = impl.token_delta_gate(c, rc, k), R.token_delta_gate(c, rr, k)
            _assert_gate(device, c, ref, rc, got, want, rr, "delta", k=k)
            # explicit (unsorted, strided) index forces the selection; k is ignored: bit-exact on every device
            idx = _index(b, k, n, idt, g, device, strided=True)
            for check_index in (True, False):
                rc, rr = ref.clone(), ref.clone()
                got = impl.token_delta_gate(c, rc, -1, idx, check_index=check_index)
                want = R.token_delta_gate(c, rr, -1, idx)
                for x, y in zip(got, want):
                    _assert_same(x, y)
                _assert_same(rc, rr)
                assert got[0].dtype == torch.int64 and (k == 0 or got[0].data_ptr() != idx.data_ptr())


def check_qk_update(impl, device, dtype, idt, seed=6):
    g = _gen(seed)
    cases = [((2, 2, 13, 17, 24), "contig", dtype), ((1, 3, 40, 35, 136), "step", dtype),
             ((2, 0, 9, 11, 16), "contig", dtype), ((2, None, 10, 12, 32), "colmajor", torch.float32)]
    for (b, h, nq, nk, d), layout, ldt in cases:
        lead = (b,) if h is None else (b, h)  # h None: rank-3 tensors (one head)
        for kq, kk in ((0, 0), (3, 5), (nq, 0), (0, nk), (nq, nk), (1, 2)):
            q = _strided(_randn((*lead, nq, d), dtype, g, device), layout)
            kt = _strided(_randn((*lead, nk, d), dtype, g, device), layout)
            logits = _strided(_randn((*lead, nq, nk), ldt, g, device), layout)  # logits may be another float type
            want = logits.clone()
            iq = _index(b, kq, nq, idt, g, device, strided=layout == "step")
            ik = _index(b, kk, nk, idt, g, device)
            impl.qk_update_(logits, q, kt, iq, ik, 0.37)
            R.qk_update_(want, q, kt, iq, ik, 0.37)
            torch.testing.assert_close(logits, want, **MATMUL_TOL[ldt])
            _assert_untouched(logits, want, iq, ik)


def _assert_untouched(logits, want, iq, ik):
    """Entries outside rows iq and columns ik (empty slots and other ids out of range excluded) must be
    bit-identical (never written)."""
    mask = torch.ones_like(want, dtype=torch.bool)
    nq, nk = want.shape[-2:]
    for bi in range(want.size(0)):
        rows, cols = iq[bi].long(), ik[bi].long()
        mask[bi, ..., rows[(rows >= 0) & (rows < nq)], :] = False
        mask[bi, ..., cols[(cols >= 0) & (cols < nk)]] = False
    assert torch.equal(logits[mask], want[mask])


def _rel_view(shape, dtype, g, device, how):
    """A rel-pos table [..., Nq, G] as a contiguous tensor or a strided view: 'transposed' (a [..., G, Nq] tensor
    transposed), 'step' (every other column), 'sliced' (an interior window of a bigger buffer: offset, padded rows
    and heads)."""
    if how == "transposed":
        return _randn((*shape[:-2], shape[-1], shape[-2]), dtype, g, device).transpose(-1, -2)
    if how == "sliced":
        big = _randn([n + 3 for n in shape], dtype, g, device)
        return big[tuple(slice(1, 1 + n) for n in shape[:-2]) + (slice(2, 2 + shape[-2]), slice(1, 1 + shape[-1]))]
    return _strided(_randn(shape, dtype, g, device), how)


def check_qk_update_relpos(impl, device, dtype, idt, seed=14):
    """qk_update_ with the decomposed rel-pos bias (rel_h [..,Nq,Gh], rel_w [..,Nq,Gw], Gh*Gw = Nk, Gh != Gw)."""
    g = _gen(seed)
    # (b, h, nq, (gh, gw), d), layout of logits/q/k, layout of rel_h, layout of rel_w, logits dtype
    cases = [((2, 2, 9, (3, 4), 16), "contig", "contig", "contig", dtype),
             ((1, 2, 10, (5, 7), 24), "step", "transposed", "sliced", dtype),
             ((2, None, 8, (4, 3), 16), "contig", "sliced", "step", dtype),
             ((2, None, 7, (1, 5), 16), "colmajor", "step", "transposed", torch.float32),
             ((2, 0, 5, (2, 3), 16), "contig", "contig", "contig", dtype)]
    for (b, h, nq, (gh, gw), d), layout, lh, lw, ldt in cases:
        nk = gh * gw
        lead = (b,) if h is None else (b, h)  # h None: rank-3 tensors (one head)
        for kq, kk in ((0, 0), (3, 5), (nq, 0), (0, nk), (nq, nk), (1, 2)):
            q = _strided(_randn((*lead, nq, d), dtype, g, device), layout)
            kt = _strided(_randn((*lead, nk, d), dtype, g, device), layout)
            rel_h = _rel_view((*lead, nq, gh), dtype, g, device, lh)
            rel_w = _rel_view((*lead, nq, gw), dtype, g, device, lw)
            assert rel_h.shape == (*lead, nq, gh) and rel_w.shape == (*lead, nq, gw)
            logits = _strided(_randn((*lead, nq, nk), ldt, g, device), layout)
            want = logits.clone()
            iq = _index(b, kq, nq, idt, g, device, strided=layout == "step")
            ik = _index(b, kk, nk, idt, g, device)
            impl.qk_update_(logits, q, kt, iq, ik, 0.37, rel_h, rel_w)
            R.qk_update_(want, q, kt, iq, ik, 0.37, rel_h, rel_w)
            torch.testing.assert_close(logits, want, **MATMUL_TOL[ldt])
            _assert_untouched(logits, want, iq, ik)
            if kq == nq and kk == 0 and logits.numel() > 0:  # the bias really is added (not a no-op)
                plain = logits.clone()
                impl.qk_update_(plain, q, kt, iq, ik, 0.37)
                assert not torch.equal(plain, logits)


def check_av_delta_update(impl, device, dtype, idt, seed=7):
    g = _gen(seed)
    cases = [((2, 2, 13, 17, 24), "contig", dtype), ((1, 3, 40, 45, 136), "step", dtype),
             ((2, None, 9, 11, 16), "colmajor", dtype), ((1, 2, 8, 10, 16), "contig", torch.float32)]
    for (b, h, m, n, d), layout, odt in cases:
        lead = (b,) if h is None else (b, h)
        for k in (0, 4, 33 if n > 33 else n - 1, n):
            a_new = _strided(torch.rand((*lead, m, n), generator=g).to(dtype).to(device), layout)
            a_ref = _strided(torch.rand((*lead, m, n), generator=g).to(dtype).to(device), layout)
            v_new = _strided(_randn((*lead, n, d), dtype, g, device), layout)
            v_ref = _strided(_randn((*lead, n, d), dtype, g, device), layout)
            out = _strided(_randn((*lead, m, d), odt, g, device), layout)  # out may be another float type
            idx = _index(b, k, n, idt, g, device, strided=layout == "step")
            state = [out.clone(), a_ref.clone(), v_ref.clone()]
            res = impl.av_delta_update_(out, a_new, a_ref, v_new, v_ref, idx)
            R.av_delta_update_(state[0], a_new, state[1], v_new, state[2], idx)
            assert res is None or res is out
            torch.testing.assert_close(out, state[0], **MATMUL_TOL[odt])
            _assert_same(a_ref, state[1])
            _assert_same(v_ref, state[2])


# ---------------------------------------------------------------- the plain functions (interpreter on CPU)

@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_scatter_rows(dtype, idt):
    check_gather_scatter_rows(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gather_scatter_cols(dtype, idt):
    check_gather_scatter_cols(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_token_gate(dtype):
    check_token_gate(T, DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gates_long_rows_and_ties(dtype):
    check_token_gate_ties_long_rows(T, DEVICE, dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_token_gate_threshold(dtype):
    check_token_gate_threshold(T, DEVICE, dtype)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_token_delta_gate(dtype, idt):
    check_token_delta_gate(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update(dtype, idt):
    check_qk_update(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_qk_update_relpos(dtype, idt):
    check_qk_update_relpos(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_av_delta_update(dtype, idt):
    check_av_delta_update(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_slots_rows_cols(dtype, idt):
    check_empty_slots_rows_cols(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_slots_delta_gate(dtype, idt):
    check_empty_slots_delta_gate(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_empty_slots_attention(dtype, idt):
    check_empty_slots_attention(T, DEVICE, dtype, idt)


@pytest.mark.parametrize("idt", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unchecked_out_of_range_ids_are_empty_slots(dtype, idt):
    check_unchecked_out_of_range(T, DEVICE, dtype, idt)


def _select_reference(scores, k):
    """torch.sort's order (NaN first, stable) on a copy: the rule the select kernel implements."""
    return R.select_topk(scores.cpu(), k)


@pytest.mark.parametrize("block", [None, 64])  # None: the row in registers (N <= block); 64: re-read per step
def test_select_kernel_matches_stable_sort(block):
    """The bisection on the score keys against a stable sort: duplicates, zeros, NaN, +inf, tiny and huge values,
    k from 1 to N, B > 1."""
    g = _gen(16)
    n = 150
    s = torch.rand(4, n, generator=g) * 10
    s[0, ::3] = s[0, 1]  # many exact ties
    s[1] = torch.randint(0, 4, (n,), generator=g).float()  # few distinct values
    s[2, [5, 77, 140]] = float("nan")
    s[2, [6, 90]] = float("inf")
    s[3, :50] = torch.tensor([2.0 ** -149, 0.0, 3e38, 1e-30, 1.0] * 10)
    s = s.to(DEVICE)
    from eventful_kernels.triton import gates
    ks = (1, 2, 3, 17, 49, 50, 51, 52, 99, 100, 148, 149, 150) if block is None else (1, 50, 52, 149, 150)
    for k in ks:  # the interpreter runs the 32 search steps slowly: cuts inside and at the edges of tie groups
        index, _ = gates._select(s, k, k, thresholded=False, block_n=block)
        _assert_same(index, _select_reference(s, k).to(DEVICE))


@pytest.mark.parametrize("block", [None, 64])
def test_select_kernel_threshold_rule(block):
    """Thresholded selection (scores below the threshold come in as -1): count, -1 padding past it, capacity cut
    with ties -> lower id."""
    g = _gen(17)
    n = 130
    s = torch.rand(3, n, generator=g)
    s[0, ::4] = s[0, 2]
    s = torch.where(s > 0.6, s, torch.full_like(s, -1.0)).to(DEVICE)
    from eventful_kernels.triton import gates
    for cap, width in ((1, 1), (7, 7), (40, 45), (n, n + 3)):
        index, count = gates._select(s, cap, width, thresholded=True, block_n=block)
        for b in range(3):
            hits = int((s[b] >= 0).sum())
            want = _select_reference(torch.where(s[b] >= 0, s[b], float("-inf"))[None], min(cap, hits))[0]
            assert int(count[b]) == min(cap, hits)
            _assert_same(index[b, :len(want)], want.to(DEVICE))
            assert bool((index[b, len(want):] == -1).all())


def test_tie_tolerant_gate_check_itself():
    """The CUDA-side check of _assert_gate on interpreter results: it accepts the kernel's selection and rejects a
    selection that swaps a clearly larger score for a smaller one."""
    g = _gen(18)
    c, ref = _gate_inputs(2, 12, 19, torch.float32, g, DEVICE)
    for k in (1, 5, 12):
        rc, rr = ref.clone(), ref.clone()
        got, want = T.token_gate(c, rc, k), R.token_gate(c, rr, k)
        _assert_gate(DEVICE, c, ref, rc, got, want, rr, "topk", k=k, exact=False)
    h = _between_scores(R.gate_scores(c, ref), 0.5)
    rc, rr = ref.clone(), ref.clone()
    got, want = T.token_gate_threshold(c, rc, h, 4), R.token_gate_threshold(c, rr, h, 4)
    _assert_gate(DEVICE, c, ref, rc, got, want, rr, "threshold", threshold=h, capacity=4, exact=False)
    rc, rr = ref.clone(), ref.clone()
    got, want = T.token_delta_gate(c, rc, 5), R.token_delta_gate(c, rr, 5)
    _assert_gate(DEVICE, c, ref, rc, got, want, rr, "delta", k=5, exact=False)
    scores = R.gate_scores(c, ref)[0].cpu()
    worst = int(scores.argmin())
    wrong = got[0].clone()
    wrong[0, 0] = worst
    wrong[0] = wrong[0].sort().values
    rc = ref.clone()
    _, cs, es = R.token_delta_gate(c, rc, -1, wrong)
    with pytest.raises(AssertionError):
        _assert_gate(DEVICE, c, ref, rc, (wrong, cs, es), want, rr, "delta", k=5, exact=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy (interpreter) computing inf - inf
def test_nan_scores_rank_first_like_torch_sort():
    g = _gen(8)
    c, ref = _randn((2, 10, 6), torch.float32, g), _randn((2, 10, 6), torch.float32, g)
    c[0, [2, 7, 8], 1] = float("nan")
    c[1, 4, 0] = float("inf")
    ref[1, 4, 0] = float("inf")  # inf - inf = nan
    for k in (2, 4, 10):
        rc, rr = ref.clone(), ref.clone()
        got, want = T.token_gate(c, rc, k), R.token_gate(c, rr, k)
        for x, y in zip(got, want):
            assert torch.equal(x, y) or torch.allclose(x, y, equal_nan=True)
        assert torch.allclose(rc, rr, equal_nan=True)
    rc, rr = ref.clone(), ref.clone()  # threshold gate: NaN is never above a threshold
    got, want = T.token_gate_threshold(c, rc, 0.5, 10), R.token_gate_threshold(c, rr, 0.5, 10)
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])


def test_unchecked_index_never_writes_out_of_bounds():
    """check_index=False skips the value check (no host sync); the kernels still mask bad ids."""
    g = _gen(9)
    buf = _randn((2, 12, 8), torch.float32, g)
    dst = buf[:, 1:-1]  # 10 rows with a guard row on each side
    before = buf.clone()
    idx = torch.tensor([[-1, 3, 10], [9, 12, 0]], device=DEVICE)
    src = _randn((2, 3, 8), torch.float32, g)
    T.scatter_rows_(dst, idx, src, check_index=False)
    assert torch.equal(buf[:, 0], before[:, 0]) and torch.equal(buf[:, -1], before[:, -1])
    assert torch.equal(dst[0, 3], src[0, 1]) and torch.equal(dst[1, 9], src[1, 0]) and torch.equal(dst[1, 0], src[1, 2])
    y = T.gather_rows(dst, idx, check_index=False)
    assert torch.equal(y[0, 0], torch.zeros(8, device=DEVICE)) and torch.equal(y[0, 1], dst[0, 3])


def test_checked_mode_accepts_repeated_empty_slots():
    """check_index=True: -1 passes the range check and is left out of the uniqueness check of writing ops."""
    g = _gen(19)
    idx = torch.tensor([[-1, 3, -1, 0], [-1, -1, -1, -1]], device=DEVICE)
    x = _randn((2, 6, 4), torch.float32, g)
    _assert_same(T.gather_rows(x, idx), R.gather_rows(x, idx))
    _assert_same(T.gather_cols(x, idx), R.gather_cols(x, idx))  # ids < 4, the column count
    src = _randn((2, 4, 4), torch.float32, g)
    _assert_same(T.scatter_rows_(x.clone(), idx, src), R.scatter_rows_(x.clone(), idx, src))
    src = _randn((2, 6, 4), torch.float32, g)
    _assert_same(T.scatter_cols_(x.clone(), idx, src), R.scatter_cols_(x.clone(), idx, src))
    c, ref = _randn((2, 6, 4), torch.float32, g), _randn((2, 6, 4), torch.float32, g)
    rc, rr = ref.clone(), ref.clone()
    for a, b in zip(T.token_delta_gate(c, rc, -1, idx), R.token_delta_gate(c, rr, -1, idx)):
        _assert_same(a, b)
    _assert_same(rc, rr)
    q, k = _randn((2, 2, 6, 16), torch.float32, g), _randn((2, 2, 6, 16), torch.float32, g)
    logits = _randn((2, 2, 6, 6), torch.float32, g)
    want = R.qk_update_(logits.clone(), q, k, idx, idx.flip(1), 0.5)
    torch.testing.assert_close(T.qk_update_(logits, q, k, idx, idx.flip(1), 0.5), want, **MATMUL_TOL[torch.float32])
    a_new, a_ref = torch.rand(2, 2, 6, 6, generator=g).to(DEVICE), torch.rand(2, 2, 6, 6, generator=g).to(DEVICE)
    out, v_ref = _randn((2, 2, 6, 16), torch.float32, g), _randn((2, 2, 6, 16), torch.float32, g)
    state = [out.clone(), a_ref.clone(), v_ref.clone()]
    R.av_delta_update_(state[0], a_new, state[1], q, state[2], idx)
    T.av_delta_update_(out, a_new, a_ref, q, v_ref, idx)
    torch.testing.assert_close(out, state[0], **MATMUL_TOL[torch.float32])
    _assert_same(a_ref, state[1])
    _assert_same(v_ref, state[2])


# ---------------------------------------------------------------- bad input: raises, names the argument, no writes

def _bad_cases(device):
    """(op, callable(state) -> None, exception, message fragment, state builder)."""
    g = _gen(10)
    f32, f64 = torch.float32, torch.float64

    def rows_state():
        return {"dst": _randn((2, 6, 4), f32, g, device), "src": _randn((2, 2, 4), f32, g, device),
                "src_cols": _randn((2, 6, 2), f32, g, device)}

    def gate_state():
        return {"c": _randn((2, 6, 4), f32, g, device), "ref": _randn((2, 6, 4), f32, g, device)}

    def attn_state():
        return {"logits": _randn((2, 2, 6, 6), f32, g, device), "q": _randn((2, 2, 6, 16), f32, g, device),
                "k": _randn((2, 2, 6, 16), f32, g, device), "out": _randn((2, 2, 6, 16), f32, g, device),
                "a_new": torch.rand(2, 2, 6, 6, generator=g).to(device),
                "a_ref": torch.rand(2, 2, 6, 6, generator=g).to(device),
                "v_new": _randn((2, 2, 6, 16), f32, g, device), "v_ref": _randn((2, 2, 6, 16), f32, g, device),
                "rel_h": _randn((2, 2, 6, 2), f32, g, device), "rel_w": _randn((2, 2, 6, 3), f32, g, device)}

    ok = torch.tensor([[1, 4], [0, 5]], device=device)
    dup = torch.tensor([[1, 4], [3, 3]], device=device)
    oob = torch.tensor([[1, 4], [0, 6]], device=device)
    neg = torch.tensor([[-1, 4], [0, -2]], device=device)  # -1: an empty slot, accepted; -2: out of range
    pads = torch.tensor([[-1, -1], [-5, -1]], device=device)

    def av(s, index, **over):
        args = {k: s[k] for k in ("out", "a_new", "a_ref", "v_new", "v_ref")}
        args.update(over)
        return lambda: T.av_delta_update_(args["out"], args["a_new"], args["a_ref"], args["v_new"], args["v_ref"],
                                          index)

    def qk(s, iq, ik, **over):
        args = {k: s[k] for k in ("logits", "q", "k")}
        args.update(over)
        return lambda: T.qk_update_(args["logits"], args["q"], args["k"], iq, ik, 0.5, args.get("rel_h"),
                                    args.get("rel_w"))

    def qkr(s, **over):  # qk_update_ with the rel-pos bias (Nk = 6 = Gh 2 x Gw 3), valid indices
        return qk(s, ok, ok, **{"rel_h": s["rel_h"], "rel_w": s["rel_w"], **over})

    return [
        ("gather_rows rank", rows_state, lambda s: T.gather_rows(s["dst"][0, 0], ok), RuntimeError, "'x' must have rank 3 or 4"),
        ("gather_rows dtype", rows_state, lambda s: T.gather_rows(s["dst"].to(f64), ok), RuntimeError, "'x' must be float32"),
        ("gather_rows index dtype", rows_state, lambda s: T.gather_rows(s["dst"], ok.float()), RuntimeError, "'index' must be int32 or int64"),
        ("gather_rows index batch", rows_state, lambda s: T.gather_rows(s["dst"], ok[:1]), RuntimeError, "'index' has size 1 at dim 0"),
        ("gather_rows index device", rows_state, lambda s: T.gather_rows(s["dst"], ok.to("meta")), RuntimeError, "'index' is on meta"),
        ("gather_rows oob", rows_state, lambda s: T.gather_rows(s["dst"], oob), IndexError, "'index' holds 6 at [1, 1], out of range [0, 6)"),
        ("gather_rows negative", rows_state, lambda s: T.gather_rows(s["dst"], neg), IndexError,
         "'index' holds -2 at [1, 1], out of range [0, 6)"),
        ("scatter_rows negative", rows_state, lambda s: T.scatter_rows_(s["dst"], pads, s["src"]), IndexError,
         "'index' holds -5 at [1, 0], out of range [0, 6)"),
        ("scatter_rows N after -1", rows_state,
         lambda s: T.scatter_rows_(s["dst"], torch.tensor([[-1, -1], [-1, 6]], device=device), s["src"]), IndexError,
         "'index' holds 6 at [1, 1]"),
        ("scatter_cols -3", rows_state,
         lambda s: T.scatter_cols_(s["dst"], torch.tensor([[-1, 3], [0, -3]], device=device), s["src_cols"]),
         IndexError, "'index' holds -3 at [1, 1], out of range [0, 4)"),
        ("scatter_rows dup", rows_state, lambda s: T.scatter_rows_(s["dst"], dup, s["src"]), RuntimeError, "'index' repeats token id 3 in row 1"),
        ("scatter_rows oob", rows_state, lambda s: T.scatter_rows_(s["dst"], oob, s["src"]), IndexError, "'index' holds 6"),
        ("scatter_rows src dtype", rows_state, lambda s: T.scatter_rows_(s["dst"], ok, s["src"].half()), RuntimeError, "'src' has dtype Half but 'dst' has dtype Float"),
        ("scatter_rows src K", rows_state, lambda s: T.scatter_rows_(s["dst"], ok[:, :1], s["src"]), RuntimeError, "'src' has size 2 at dim 2 but K"),
        ("scatter_rows src D", rows_state, lambda s: T.scatter_rows_(s["dst"], ok, s["src"][..., :3]), RuntimeError, "the feature size of 'dst'"),
        ("scatter_rows overlap", rows_state, lambda s: T.scatter_rows_(s["dst"][:, :1].expand(2, 6, 4), ok, s["src"]), RuntimeError, "'dst' is written in place"),
        ("gather_cols oob", rows_state, lambda s: T.gather_cols(s["dst"], ok), IndexError, "'index' holds 4 at [0, 1], out of range [0, 4)"),
        ("scatter_cols dup", rows_state, lambda s: T.scatter_cols_(s["dst"], torch.tensor([[1, 1], [0, 2]], device=device), s["src_cols"]), RuntimeError, "repeats token id 1 in row 0"),
        ("scatter_cols src rows", rows_state, lambda s: T.scatter_cols_(s["dst"], ok[:, :2] % 4, s["src"]), RuntimeError, "'src' has size 2 at dim 2 but the row count of 'dst'"),
        ("token_gate k", gate_state, lambda s: T.token_gate(s["c"], s["ref"], 7), ValueError,
         "'k' must satisfy 0 <= k <= N = 6 (tokens in 'c'), got 7"),
        ("token_gate k<0", gate_state, lambda s: T.token_gate(s["c"], s["ref"], -1), ValueError,
         "'k' must satisfy 0 <= k <= N = 6"),
        ("token_gate rank", gate_state, lambda s: T.token_gate(s["c"][None], s["ref"][None], 1), RuntimeError, "'c' must have rank 3"),
        ("token_gate ref shape", gate_state, lambda s: T.token_gate(s["c"], s["ref"][:, :5], 1), RuntimeError, "'ref' has size 5 at dim 1"),
        ("token_gate ref dtype", gate_state, lambda s: T.token_gate(s["c"], s["ref"].half(), 1), RuntimeError, "'ref' has dtype Half"),
        ("token_gate ref overlap", gate_state, lambda s: T.token_gate(s["c"], s["ref"][:, :1].expand(2, 6, 4), 1), RuntimeError, "'ref' is written in place"),
        ("threshold capacity", gate_state, lambda s: T.token_gate_threshold(s["c"], s["ref"], 0.1, -1), ValueError,
         "'capacity' must satisfy 0 <= capacity <= N = 6 (tokens in 'c'), got -1"),
        ("threshold capacity > N", gate_state, lambda s: T.token_gate_threshold(s["c"], s["ref"], 0.1, 10 ** 12),
         ValueError, "'capacity' must satisfy 0 <= capacity <= N = 6 (tokens in 'c'), got 1000000000000"),
        ("threshold nan", gate_state, lambda s: T.token_gate_threshold(s["c"], s["ref"], float("nan"), 2), ValueError,
         "'threshold' must be finite, got nan"),
        ("threshold dtype", gate_state, lambda s: T.token_gate_threshold(s["c"].double(), s["ref"].double(), 0.1, 2), RuntimeError, "'c' must be float32"),
        ("delta dup", gate_state, lambda s: T.token_delta_gate(s["c"], s["ref"], -1, dup), RuntimeError, "repeats token id 3 in row 1"),
        ("delta oob", gate_state, lambda s: T.token_delta_gate(s["c"], s["ref"], -1, oob), IndexError, "holds 6 at [1, 1]"),
        ("delta k", gate_state, lambda s: T.token_delta_gate(s["c"], s["ref"], 9), ValueError,
         "'k' must satisfy 0 <= k <= N = 6"),
        ("delta -2", gate_state, lambda s: T.token_delta_gate(s["c"], s["ref"], -1, neg), IndexError,
         "'index' holds -2 at [1, 1]"),
        ("delta N", gate_state,
         lambda s: T.token_delta_gate(s["c"], s["ref"], -1, torch.tensor([[-1, 6], [0, -1]], device=device)),
         IndexError, "'index' holds 6 at [0, 1]"),
        ("delta index batch", gate_state, lambda s: T.token_delta_gate(s["c"], s["ref"], -1, ok[:, None]), RuntimeError, "'index' must have shape [B, K]"),
        ("qk oob q", attn_state, lambda s: qk(s, oob, ok)(), IndexError, "'index_q' holds 6"),
        ("qk oob k", attn_state, lambda s: qk(s, ok, neg)(), IndexError, "'index_k' holds -2 at [1, 1]"),
        ("qk both oob", attn_state, lambda s: qk(s, oob, neg)(), IndexError, "'index_q' holds 6"),
        ("qk head dim", attn_state, lambda s: qk(s, ok, ok, k=s["k"][..., :8])(), RuntimeError, "'k' has size 8 at dim 3 but the head dim of 'q' is 16"),
        ("qk k dtype", attn_state, lambda s: qk(s, ok, ok, k=s["k"].half())(), RuntimeError, "'k' has dtype Half but 'q'"),
        ("qk rank", attn_state, lambda s: qk(s, ok, ok, q=s["q"][:, 0])(), RuntimeError, "'q' must have the rank of 'logits'"),
        ("qk heads", attn_state, lambda s: qk(s, ok, ok, q=s["q"][:, :1])(), RuntimeError, "'q' has size 1 at dim 1"),
        ("qk logits overlap", attn_state, lambda s: qk(s, ok, ok, logits=s["logits"][:, :, :1].expand(2, 2, 6, 6))(), RuntimeError, "'logits' is written in place"),
        ("qk rel_h without rel_w", attn_state, lambda s: qkr(s, rel_w=None)(), ValueError, "'rel_w' is None but 'rel_h' is given"),
        ("qk rel_w without rel_h", attn_state, lambda s: qkr(s, rel_h=None)(), ValueError, "'rel_h' is None but 'rel_w' is given"),
        ("qk rel_h rank", attn_state, lambda s: qkr(s, rel_h=s["rel_h"][:, 0])(), RuntimeError, "'rel_h' must have the rank of 'logits' (4)"),
        ("qk rel_w rank", attn_state, lambda s: qkr(s, rel_w=s["rel_w"][None])(), RuntimeError, "'rel_w' must have the rank of 'logits' (4)"),
        ("qk rel_h dtype", attn_state, lambda s: qkr(s, rel_h=s["rel_h"].half())(), RuntimeError, "'rel_h' has dtype Half but 'q' has dtype Float"),
        ("qk rel_w dtype", attn_state, lambda s: qkr(s, rel_w=s["rel_w"].double())(), RuntimeError, "'rel_w' has dtype Double but 'q' has dtype Float"),
        ("qk rel_h batch", attn_state, lambda s: qkr(s, rel_h=s["rel_h"][:1])(), RuntimeError, "'rel_h' has size 1 at dim 0 but the batch size of 'logits' is 2"),
        ("qk rel_w heads", attn_state, lambda s: qkr(s, rel_w=s["rel_w"][:, :1])(), RuntimeError, "'rel_w' has size 1 at dim 1 but the head count of 'logits' is 2"),
        ("qk rel_h rows", attn_state, lambda s: qkr(s, rel_h=s["rel_h"][:, :, :5])(), RuntimeError, "'rel_h' has size 5 at dim 2 but the row count (Nq) of 'logits' is 6"),
        ("qk rel_w rows", attn_state, lambda s: qkr(s, rel_w=s["rel_w"][:, :, 1:])(), RuntimeError, "'rel_w' has size 5 at dim 2 but the row count (Nq) of 'logits' is 6"),
        ("qk rel Gh*Gw", attn_state, lambda s: qkr(s, rel_w=s["rel_w"][..., :2])(), RuntimeError, "'rel_h' has Gh = 2 columns and 'rel_w' has Gw = 2, but Gh*Gw must equal Nk = 6"),
        ("qk rel Gh*Gw swapped", attn_state, lambda s: qkr(s, rel_h=s["rel_w"], rel_w=s["rel_w"])(), RuntimeError, "Gh*Gw must equal Nk = 6"),
        ("qk rel_h device", attn_state, lambda s: qkr(s, rel_h=s["rel_h"].to("meta"))(), RuntimeError, "'rel_h' is on meta but 'logits' is on"),
        ("qk rel before index", attn_state, lambda s: qk(s, oob, ok, rel_h=s["rel_h"], rel_w=s["rel_w"][..., :1])(), RuntimeError, "Gh*Gw must equal Nk"),
        ("av dup", attn_state, lambda s: av(s, dup)(), RuntimeError, "repeats token id 3 in row 1"),
        ("av oob", attn_state, lambda s: av(s, oob)(), IndexError, "'index' holds 6"),
        ("av -2", attn_state, lambda s: av(s, neg)(), IndexError, "'index' holds -2 at [1, 1]"),
        ("av v dtype", attn_state, lambda s: av(s, ok, v_ref=s["v_ref"].half())(), RuntimeError, "'v_ref' has dtype Half but 'a_new'"),
        ("av a shape", attn_state, lambda s: av(s, ok, a_new=s["a_new"][..., :5])(), RuntimeError, "'a_new' has size 5 at dim 3"),
        ("av out d", attn_state, lambda s: av(s, ok, out=s["out"][..., :8])(), RuntimeError, "'v_new' has size 16 at dim 3 but the head dim of 'out' is 8"),
        ("av index dtype", attn_state, lambda s: av(s, ok.to(torch.int16))(), RuntimeError, "'index' must be int32 or int64, got Short"),
        ("av a_ref overlap", attn_state, lambda s: av(s, ok, a_ref=s["a_ref"][:, :, :1].expand(2, 2, 6, 6))(), RuntimeError, "'a_ref' is written in place"),
    ]


BAD = _bad_cases(DEVICE)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_and_leaves_state_unchanged(case):
    _, make_state, call, exc, fragment = case
    state = make_state()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(exc) as info:
        call(state)
    assert fragment in str(info.value), str(info.value)
    assert str(info.value).startswith("eventful: argument '")
    for k, v in state.items():
        _assert_same(v, before[k])


def test_duplicate_far_apart_in_a_long_index_is_caught():
    """K > the check kernel's block (1024): the repeat is seen across programs through the shared scratch."""
    g = _gen(13)
    dst = _randn((1, 3000, 2), torch.float32, g)
    before = dst.clone()
    idx = torch.randperm(3000, generator=g)[:2500]
    idx[2400] = idx[5]
    with pytest.raises(RuntimeError, match=f"repeats token id {int(idx[5])} in row 0"):
        T.scatter_rows_(dst, idx[None].to(DEVICE), _randn((1, 2500, 2), torch.float32, g))
    _assert_same(dst, before)


def _native_has_check_index() -> bool:
    """Whether the loaded _C library declares the check_index keyword (and with it the -1 empty-slot contract)."""
    return "check_index" in str(torch.ops.eventful.gather_rows.default._schema)


@pytest.mark.parametrize("name", ["gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_"])
def test_messages_match_cpp_checks(name):
    """Same bad input, same message (or, where both accept it, the same result) from the Triton path on DEVICE and
    the C++ CPU kernels (checks.h). The C++ side gets CPU tensors only; the Triton side gets copies on DEVICE."""
    g = _gen(11)
    x = _randn((2, 6, 4), torch.float32, g, "cpu")
    src = _randn((2, 2, 4), torch.float32, g, "cpu") if name == "scatter_rows_" else \
        _randn((2, 6, 2), torch.float32, g, "cpu")
    dup = torch.tensor([[1, 3], [2, 2]])
    bad = [torch.tensor([[1, 3], [0, 6]]), dup, torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[1, 2]]),
           torch.tensor([[-3, 1], [0, 1]])]
    calls = [{}]
    if _native_has_check_index():  # the -1 contract: accepted (also repeated), -2 still rejected; unchecked ids
        bad += [torch.tensor([[-1, 3], [-1, -1]]), torch.tensor([[-1, -2], [0, 1]])]
        calls += [{"check_index": False}]
    gather = name.startswith("gather")
    for idx in bad:
        for args_cpu in ([x, idx] if gather else [x.clone(), idx, src],
                         [x.double(), idx] if gather else [x.clone(), idx, src.half()]):
            for kwargs in calls:
                if kwargs and idx is dup and not gather:  # unchecked duplicate writes: unspecified winner
                    continue
                args = [a.to(DEVICE) if a is not args_cpu[0] else a.clone().to(DEVICE) for a in args_cpu]
                try:
                    want = getattr(torch.ops.eventful, name)(*args_cpu, **kwargs)
                except (RuntimeError, IndexError) as exc:
                    with pytest.raises(type(exc)) as got:
                        getattr(T, name)(*args, **kwargs)
                    assert str(got.value) == str(exc).split("\nException raised from")[0]
                    _assert_same(args[0], args_cpu[0])
                else:  # e.g. repeated ids are fine for a gather: the same result, compared on the host
                    out = getattr(T, name)(*args, **kwargs)
                    if gather:
                        _assert_same(out.cpu(), want)
                    else:
                        _assert_same(args[0].cpu(), args_cpu[0])


# ---------------------------------------------------------------- registration and import guard

def test_registration_rule():
    assert _register.should_register("auto", has_cpp_cuda_kernel=False)
    assert not _register.should_register("auto", has_cpp_cuda_kernel=True)
    assert _register.should_register("triton", has_cpp_cuda_kernel=True)
    assert not _register.should_register("cuda", has_cpp_cuda_kernel=False)
    backend = _register.backend_from_env()
    cpp = _register.cpp_cuda_kernels()
    assert set(cpp) == set(T.OPS)
    assert T.registered_ops() == [n for n in T.OPS if _register.should_register(backend, cpp[n])]
    for name in T.registered_ops():  # a CUDA kernel now exists for every op Triton took
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "CUDA")


def _run_python(code: str, **env) -> str:
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_without_triton_never_fails():
    out = _run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, eventful_kernels.triton as T\n"
        "assert not T.AVAILABLE and isinstance(T.IMPORT_ERROR, ImportError) and T.registered_ops() == []\n"
        "try:\n    T.gather_rows\nexcept ImportError as e:\n    print('guarded:', e)\n")
    assert "guarded: eventful_kernels.triton.gather_rows: triton is not available" in out


def test_backend_flag_cuda_registers_nothing_and_bad_value_raises():
    out = _run_python("import eventful_kernels.triton as T; print(T.registered_ops())", EVENTFUL_BACKEND_CUDA="cuda")
    assert out.strip() == "[]"
    out = _run_python("import eventful_kernels.triton as T; print(len(T.registered_ops()))",
                      EVENTFUL_BACKEND_CUDA="triton")
    assert out.strip() == str(len(T.OPS))
    with pytest.raises(AssertionError, match="EVENTFUL_BACKEND_CUDA must be one of"):
        _run_python("import eventful_kernels.triton", EVENTFUL_BACKEND_CUDA="tritonn")


# ---------------------------------------------------------------- opcheck through torch.ops.eventful

def _opcheck_samples(device, dtype=torch.float32):
    g = _gen(12)
    x = _randn((2, 9, 5), dtype, g, device)
    idx = torch.tensor([[1, 4, 8], [0, 8, 2]], device=device)
    q, k = _randn((2, 2, 9, 16), dtype, g, device), _randn((2, 2, 9, 16), dtype, g, device)
    a = torch.rand(2, 2, 9, 9, generator=g).to(dtype).to(device)
    return {
        "gather_rows": (x, idx),
        "scatter_rows_": (x.clone(), idx, _randn((2, 3, 5), dtype, g, device)),
        "gather_cols": (x, idx % 5),
        "scatter_cols_": (x.clone(), torch.tensor([[1, 4, 0], [3, 2, 0]], device=device),
                          _randn((2, 9, 3), dtype, g, device)),
        "token_gate": (x, x.flip(1).clone(), 3),
        "token_gate_threshold": (x, x.flip(1).clone(), 0.5, 4),
        "token_delta_gate": (x, x.flip(1).clone(), 3, None),
        "qk_update_": (_randn((2, 2, 9, 9), dtype, g, device), q, k, idx, idx.flip(1).contiguous(), 0.25),
        "av_delta_update_": (q.clone(), a, a.flip(-1).contiguous(), k, q.clone(), idx),
    }


@pytest.fixture
def triton_as_cpu_kernels():
    """Serve torch.ops.eventful on CPU with the Triton kernels (interpreter) for the test, then restore."""
    lib = torch.library.Library("eventful", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel" (the C++ CPU kernels)
        for name, fn in _register.KERNELS.items():
            lib.impl(name, fn, "CPU")
    yield
    lib._destroy()


@pytest.mark.skipif(CUDA, reason="CPU opcheck runs the kernels under the interpreter; TestCudaDispatch covers GPUs")
def test_opcheck_interpreted_through_dispatcher(triton_as_cpu_kernels):
    for name, args in _opcheck_samples("cpu").items():
        torch.library.opcheck(getattr(torch.ops.eventful, name).default, args)
    if _native_qk_has_relpos():  # the rebuilt _C library: the optional rel-pos arguments through eventful::
        torch.library.opcheck(torch.ops.eventful.qk_update_.default, _qk_relpos_sample("cpu"))
    # also proves the registered kernels are the Triton ones: a token_delta_gate with an explicit index
    c = torch.randn(1, 4, 3)
    out = torch.ops.eventful.token_delta_gate(c, torch.zeros_like(c), -1, torch.tensor([[2, 0]], dtype=torch.int32))
    assert out[0].tolist() == [[2, 0]]


_CONTRACT_SCHEMAS = {  # torch.ops.eventful's schemas with the check_index keyword (csrc/ops.cpp, once rebuilt)
    "gather_rows": "gather_rows(Tensor x, Tensor index, *, bool check_index=True) -> Tensor",
    "scatter_rows_": "scatter_rows_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()",
    "gather_cols": "gather_cols(Tensor x, Tensor index, *, bool check_index=True) -> Tensor",
    "scatter_cols_": "scatter_cols_(Tensor(a!) dst, Tensor index, Tensor src, *, bool check_index=True) -> ()",
    "token_delta_gate": "token_delta_gate(Tensor c, Tensor(a!) ref, int k, Tensor? index=None, *, "
                        "bool check_index=True) -> (Tensor, Tensor, Tensor)",
    "qk_update_": "qk_update_(Tensor(a!) logits, Tensor q, Tensor k, Tensor index_q, Tensor index_k, float scale, "
                  "Tensor? rel_h=None, Tensor? rel_w=None, *, bool check_index=True) -> ()",
    "av_delta_update_": "av_delta_update_(Tensor(a!) out, Tensor a_new, Tensor(b!) a_ref, Tensor v_new, "
                        "Tensor(c!) v_ref, Tensor index, *, bool check_index=True) -> ()",
}


@pytest.fixture
def contract_ops():
    """The registered Triton kernels (_register.KERNELS) served on DEVICE under a test-only namespace whose schemas
    carry ``*, bool check_index=True``, with the fake kernels of eventful_kernels.ops: the dispatcher path of the
    keyword, tested even while the loaded _C library still declares the old schemas."""
    lib = torch.library.Library("eventful_contract_test", "FRAGMENT")
    for name, schema in _CONTRACT_SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _register.KERNELS[name], "CUDA" if CUDA else "CPU")
        torch.library.register_fake(f"eventful_contract_test::{name}", getattr(ops, f"_{name.rstrip('_')}_fake"),
                                    lib=lib)
    yield torch.ops.eventful_contract_test
    lib._destroy()


def _contract_samples(device, index):
    """Arguments of every index-taking op, all driven by ``index`` [2, 3] (ids < 5)."""
    g = _gen(24)
    x = _randn((2, 9, 5), torch.float32, g, device)
    q, k = _randn((2, 2, 9, 16), torch.float32, g, device), _randn((2, 2, 9, 16), torch.float32, g, device)
    a = torch.rand(2, 2, 9, 9, generator=g).to(device)
    return {
        "gather_rows": (x, index),
        "scatter_rows_": (x.clone(), index, _randn((2, 3, 5), torch.float32, g, device)),
        "gather_cols": (x, index),
        "scatter_cols_": (x.clone(), index, _randn((2, 9, 3), torch.float32, g, device)),
        "token_delta_gate": (x, x.flip(1).clone(), -1, index),
        "qk_update_": (_randn((2, 2, 9, 9), torch.float32, g, device), q, k, index, index.flip(1), 0.25),
        "av_delta_update_": (q.clone(), a, a.flip(-1).contiguous(), k, q.clone(), index),
    }


_MUTATED = {"gather_rows": (), "scatter_rows_": (0,), "gather_cols": (), "scatter_cols_": (0,),
            "token_delta_gate": (1,), "qk_update_": (0,), "av_delta_update_": (0, 2, 4)}


def _run_and_state(name, op, args, kwargs):
    """The outputs of one call and then the arguments it mutates, as host tensors (the inputs are left alone)."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*args, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    return [t.cpu() for t in out if t is not None and name in ("gather_rows", "gather_cols", "token_delta_gate")] + \
        [args[i].cpu() for i in _MUTATED[name]]


def test_check_index_keyword_through_dispatcher(contract_ops):
    """check_index reaches the Triton functions through the dispatcher (the _none wrappers pass keywords on):
    empty slots accepted either way, ids out of range rejected when checked and skipped when not, opcheck clean."""
    empty = torch.tensor([[1, -1, 4], [-1, -1, -1]], device=DEVICE)
    wild = torch.tensor([[1, 9, 4], [-5, 3, 12]], device=DEVICE)  # 9, 12 >= N (5 or 9); -5
    wild_as_empty = torch.tensor([[1, -1, 4], [-1, 3, -1]], device=DEVICE)
    for name in _CONTRACT_SCHEMAS:
        op, ref_fn = getattr(contract_ops, name), getattr(R, name)
        args = _contract_samples(DEVICE, empty)[name]
        want = _run_and_state(name, ref_fn, args, {})
        for kwargs in ({}, {"check_index": True}, {"check_index": False}):
            for x, y in zip(_run_and_state(name, op, args, kwargs), want, strict=True):
                torch.testing.assert_close(x, y, **MATMUL_TOL[torch.float32])
        args = _contract_samples(DEVICE, wild)[name]
        state = [a.clone() for a in args if isinstance(a, torch.Tensor)]
        with pytest.raises(IndexError, match="out of range"):
            op(*args)
        for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], state):
            _assert_same(a, b)
        got = _run_and_state(name, op, args, {"check_index": False})
        want = _run_and_state(name, ref_fn, _contract_samples(DEVICE, wild_as_empty)[name], {})
        if name == "token_delta_gate":  # the returned index keeps the given ids
            _assert_same(got.pop(0), wild.cpu())
            want.pop(0)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, **MATMUL_TOL[torch.float32])
        torch.library.opcheck(op.default, _contract_samples(DEVICE, empty)[name], {"check_index": False})


_QK_SCHEMA = ("qk_update_(Tensor(a!) logits, Tensor q, Tensor k, Tensor index_q, Tensor index_k, float scale, "
              "Tensor? rel_h=None, Tensor? rel_w=None) -> ()")


def _native_qk_has_relpos() -> bool:
    """Whether the loaded _C library already declares qk_update_ with rel_h/rel_w (csrc/ops.cpp, once rebuilt)."""
    return "rel_h" in str(torch.ops.eventful.qk_update_.default._schema)


def _qk_relpos_sample(device, dtype=torch.float32, rank=4):
    g = _gen(15)
    lead = (2, 2) if rank == 4 else (2,)
    rel_h = _randn((*lead, 3, 7), dtype, g, device).transpose(-1, -2)  # strided view [.., Nq=7, Gh=3]
    return (_randn((*lead, 7, 12), dtype, g, device), _randn((*lead, 7, 16), dtype, g, device),
            _randn((*lead, 12, 16), dtype, g, device), torch.tensor([[1, 6], [0, 3]], device=device),
            torch.tensor([[2, 11, 5], [0, 7, 4]], device=device), 0.25, rel_h, _randn((*lead, 7, 4), dtype, g, device))


@pytest.fixture
def qk_relpos_test_op():
    """The registered Triton qk_update_ kernel (_register.KERNELS, as torch.ops.eventful gets it) served on DEVICE
    under a test-only namespace with the new schema, so the dispatcher path of the optional rel_h/rel_w arguments is
    tested even while the loaded _C library still declares the old schema."""
    lib = torch.library.Library("eventful_triton_test", "FRAGMENT")
    lib.define(_QK_SCHEMA)
    lib.impl("qk_update_", _register.KERNELS["qk_update_"], "CUDA" if CUDA else "CPU")
    torch.library.register_fake("eventful_triton_test::qk_update_", lambda *args: None, lib=lib)
    yield torch.ops.eventful_triton_test.qk_update_
    lib._destroy()


@pytest.mark.parametrize("rank", [4, 3])
def test_qk_update_relpos_through_dispatcher(qk_relpos_test_op, rank):
    logits, q, k, iq, ik, scale, rel_h, rel_w = _qk_relpos_sample(DEVICE, rank=rank)
    want = R.qk_update_(logits.clone(), q, k, iq, ik, scale, rel_h, rel_w)
    for call in (lambda t: qk_relpos_test_op(t, q, k, iq, ik, scale, rel_h, rel_w),  # positional
                 lambda t: qk_relpos_test_op(t, q, k, iq, ik, scale, rel_h=rel_h, rel_w=rel_w)):  # keywords
        got = logits.clone()
        assert call(got) is None
        torch.testing.assert_close(got, want, **MATMUL_TOL[torch.float32])
        _assert_untouched(got, want, iq, ik)
    got = logits.clone()  # omitted optional arguments: no bias
    qk_relpos_test_op(got, q, k, iq, ik, scale)
    torch.testing.assert_close(got, R.qk_update_(logits.clone(), q, k, iq, ik, scale), **MATMUL_TOL[torch.float32])
    got = logits.clone()
    with pytest.raises(ValueError, match="'rel_w' is None but 'rel_h' is given"):
        qk_relpos_test_op(got, q, k, iq, ik, scale, rel_h=rel_h)
    _assert_same(got, logits)
    torch.library.opcheck(qk_relpos_test_op.default, (logits.clone(), q, k, iq, ik, scale, rel_h, rel_w))


def test_av_autotune_hooks_undo_a_trial_run():
    """On a GPU the autotuner runs _av_delta_kernel once per config and repetition on the caller's tensors; its hooks
    must undo each run: ``out`` and (REFRESH_A) ``a_ref[..., S]``, which the kernel refreshes itself."""
    from eventful_kernels.triton import attention as A
    assert {"o_ptr", "ar_ptr", "idx_ptr", "N", "REFRESH_A"} <= set(A._av_delta_kernel.arg_names)
    g = _gen(26)
    out = _randn((2, 2, 7, 16), torch.float32, g)
    v_new, v_ref = (_randn((2, 2, 9, 16), torch.float32, g) for _ in range(2))
    a_new, a_ref = (torch.rand(2, 2, 7, 9, generator=g).to(DEVICE) for _ in range(2))
    idx = torch.tensor([[1, -1, 8, 4], [-1, -1, -1, -1]], device=DEVICE)
    nargs = {"o_ptr": out, "ar_ptr": a_ref, "idx_ptr": idx, "N": 9, "REFRESH_A": True}
    before = [out.clone(), a_ref.clone()]
    A._av_save_state(nargs)
    T.av_delta_update_(out, a_new, a_ref, v_new, v_ref.clone(), idx)  # a trial run
    assert not torch.equal(out, before[0]) and not torch.equal(a_ref, before[1])
    A._av_restore_state(nargs)
    _assert_same(out, before[0])
    _assert_same(a_ref, before[1])
    A._av_save_state(nargs, reset_only=True)  # the autotuner's call after tuning: nothing to save
    assert not A._AV_SAVED


@pytest.mark.skipif(CUDA, reason="CPU-only check")
def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        T.gather_rows(torch.randn(1, 3, 2), torch.tensor([[0]]))


# ---------------------------------------------------------------- CUDA: the same checks through torch.ops.eventful

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestCudaDispatch:
    """torch.ops.eventful on CUDA tensors: the registered kernel (Triton, or C++ where the rule keeps it). The calls
    with ``check_index`` need the _C library built with the keyword in its schemas."""

    @pytest.mark.parametrize("dtype", FLOATS, ids=str)
    def test_ops(self, dtype):
        for idt in INDEX_DTYPES:
            check_gather_scatter_rows(ops, "cuda", dtype, idt)
            check_gather_scatter_cols(ops, "cuda", dtype, idt)
            check_token_delta_gate(ops, "cuda", dtype, idt)
            check_qk_update(ops, "cuda", dtype, idt)
            check_qk_update_relpos(ops, "cuda", dtype, idt)
            check_av_delta_update(ops, "cuda", dtype, idt)
        check_token_gate(ops, "cuda", dtype)
        check_token_gate_threshold(ops, "cuda", dtype)
        check_token_gate_ties_long_rows(ops, "cuda", dtype)

    @pytest.mark.parametrize("dtype", FLOATS, ids=str)
    def test_empty_slots_and_unchecked_ids(self, dtype):
        for idt in INDEX_DTYPES:
            check_empty_slots_rows_cols(ops, "cuda", dtype, idt)
            check_empty_slots_delta_gate(ops, "cuda", dtype, idt)
            check_empty_slots_attention(ops, "cuda", dtype, idt)
            check_unchecked_out_of_range(ops, "cuda", dtype, idt)

    @pytest.mark.parametrize("dtype", FLOATS, ids=str)
    def test_opcheck(self, dtype):
        for name, args in _opcheck_samples("cuda", dtype).items():
            torch.library.opcheck(getattr(torch.ops.eventful, name).default, args)
            if name in _MUTATED:  # the ops that take an index: also unchecked
                torch.library.opcheck(getattr(torch.ops.eventful, name).default, args, {"check_index": False})
        for rank in (4, 3):
            torch.library.opcheck(torch.ops.eventful.qk_update_.default, _qk_relpos_sample("cuda", dtype, rank))

    def test_every_op_has_a_cuda_kernel(self):
        for name in T.OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "CUDA"), name

    @staticmethod
    def _unchecked_step(t):
        """One call of every op with check_index=False (and the gates, which take no index) on the tensors of
        ``t``; returns the outputs. Ids: -1 slots and valid ones."""
        y = T.gather_rows(t["x"], t["idx"], check_index=False)
        T.scatter_rows_(t["dst"], t["idx"], y, check_index=False)
        z = T.gather_cols(t["a"], t["idx"], check_index=False)
        T.scatter_cols_(t["a_ref"], t["idx"], z, check_index=False)
        gate = T.token_gate(t["x"], t["ref"], 8)
        thr = T.token_gate_threshold(t["x"], t["ref"], 1.0, 16)
        delta = T.token_delta_gate(t["x"], t["ref"], -1, t["idx"], check_index=False)
        T.qk_update_(t["logits"], t["q"], t["k"], t["idx"], t["idx"], 0.125, check_index=False)
        T.av_delta_update_(t["out"], t["a"], t["a_ref"], t["k"], t["v_ref"], t["idx"], check_index=False)
        return [y, z, *gate, *thr, *delta]

    def _unchecked_state(self):
        g = _gen(25)
        idx = _index(2, 16, 64, torch.int64, g, "cuda")
        idx[0, :3] = -1
        t = {"x": _randn((2, 64, 32), torch.float16, g, "cuda"), "idx": idx,
             "a": torch.rand(2, 2, 64, 64, generator=g).half().cuda(), "q": _randn((2, 2, 64, 64), torch.float16, g),
             "k": _randn((2, 2, 64, 64), torch.float16, g, "cuda")}
        t.update(dst=t["x"].clone(), ref=t["x"] + 1, a_ref=t["a"].flip(-1).contiguous(),
                 logits=_randn((2, 2, 64, 64), torch.float16, g, "cuda"), out=t["q"].clone(), v_ref=t["k"] * 2)
        return t

    def test_unchecked_ops_need_no_host_sync(self):
        t = self._unchecked_state()
        self._unchecked_step({k: v.clone() for k, v in t.items()})  # warm up (compile, autotune)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._unchecked_step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_unchecked_ops_capture_in_a_cuda_graph(self):
        """check_index=False makes every op CUDA-graph capturable: a replayed graph gives the eager results."""
        t = self._unchecked_state()
        eager_state = {k: v.clone() for k, v in t.items()}
        eager = self._unchecked_step(eager_state)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs asks
            self._unchecked_step({k: v.clone() for k, v in t.items()})
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = self._unchecked_step(t)
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(captured, eager, strict=True):
            _assert_same(x, y)
        for k in t:
            _assert_same(t[k], eager_state[k])


# ---------------------------------------------------------------- GPU compile check without a GPU

@pytest.mark.skipif(CUDA, reason="on a GPU the kernels compile for real in the tests above")
def test_every_kernel_compiles_for_sm90():
    """Runs tests/triton_compile_check.py (real compiler, ptxas, sm_90 target) in a process without the
    interpreter: first config of each autotuned kernel here; `--all-configs` in the slow variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_compile_check.py")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout
