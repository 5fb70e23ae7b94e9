"""Microbenchmarks of the Triton ops (needs a CUDA GPU; skipped otherwise).

Each op at N=4096 tokens, D=768 features, K=N/16 selected (attention ops: H=12 heads, d=64) is timed as
- ``triton``: eventful_kernels.triton (argument + index value checks included: one host sync when an index is an
  input), ``triton_unchecked``: the same called with ``check_index=False`` (no value check, no host sync; for the
  gates that take no index it is the same call as ``triton``),
- ``torch``: the standard PyTorch composition (eventful_kernels.reference, as the method's reference code does it),
- ``copy``: a device copy moving the same number of bytes the op must move (``extra_info["bytes"]``), the
  memory-bandwidth yardstick; ``extra_info["GB/s"]`` is bytes / mean time.
Cases beyond the ops themselves: ``qk_update_relpos_`` (qk_update_ with SAM's decomposed rel-pos bias) and
``token_delta_gate_index`` (the delta gate with its selection given as an index, where the value check matters).
Run: ``pytest benchmarks/bench_triton.py --benchmark-json results/bench_triton.json``.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("Triton benchmarks need a CUDA GPU", allow_module_level=True)

import eventful_kernels  # noqa: E402,F401
import eventful_kernels.triton as T  # noqa: E402
from eventful_kernels import reference as R  # noqa: E402

if not T.AVAILABLE:
    pytest.skip(f"triton unavailable: {T.IMPORT_ERROR!r}", allow_module_level=True)

N, D, H, DH = 4096, 768, 12, 64
K = N // 16
DEV = "cuda"
IMPLS = ["triton", "triton_unchecked", "torch", "copy"]


def _index(b: int, k: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]).to(DEV)


def _setup(op: str, dtype: torch.dtype, b: int):
    """(args builder, bytes that must move, triton fn, torch fn)."""
    es = torch.tensor([], dtype=dtype).element_size()
    idx = _index(b, K, N)
    if op in ("gather_rows", "scatter_rows_"):
        x = torch.randn(b, N, D, device=DEV, dtype=dtype)
        src = torch.randn(b, K, D, device=DEV, dtype=dtype)
        args = (x, idx) if op == "gather_rows" else (x, idx, src)
        return args, 2 * b * K * D * es
    if op in ("gather_cols", "scatter_cols_"):
        a = torch.rand(b, H, N, N, device=DEV, dtype=dtype)
        src = torch.rand(b, H, N, K, device=DEV, dtype=dtype)
        args = (a, idx) if op == "gather_cols" else (a, idx, src)
        return args, 2 * b * H * N * K * es
    c = torch.randn(b, N, D, device=DEV, dtype=dtype)
    ref = c + 0.1 * torch.randn_like(c)
    if op == "token_gate":
        return (c, ref, K), (2 * N * D + 3 * K * D) * b * es
    if op == "token_gate_threshold":
        h = float(R.gate_scores(c, ref).quantile(1 - 1 / 16))
        return (c, ref, h, K), (2 * N * D + 3 * K * D) * b * es
    if op == "token_delta_gate":
        return (c, ref, K), (2 * N * D + 5 * K * D) * b * es
    if op == "token_delta_gate_index":  # the selection forced by a given index (e.g. another gate's)
        return (c, ref, -1, idx), 5 * K * D * b * es
    q = torch.randn(b, H, N, DH, device=DEV, dtype=dtype)
    kk = torch.randn(b, H, N, DH, device=DEV, dtype=dtype)
    if op == "qk_update_":
        logits = torch.randn(b, H, N, N, device=DEV, dtype=dtype)
        return (logits, q, kk, idx, idx.clone(), DH ** -0.5), (2 * H * N * DH + 2 * H * N * K) * b * es
    if op == "qk_update_relpos_":  # SAM global attention: N tokens on a square grid, decomposed rel-pos bias
        side = int(N ** 0.5)
        logits = torch.randn(b, H, N, N, device=DEV, dtype=dtype)
        rel_h = torch.randn(b, H, N, side, device=DEV, dtype=dtype)
        rel_w = torch.randn(b, H, N, side, device=DEV, dtype=dtype)
        args = (logits, q, kk, idx, idx.clone(), DH ** -0.5, rel_h, rel_w)
        return args, (2 * H * N * DH + 2 * H * N * K + 2 * H * N * side) * b * es
    if op == "av_delta_update_":
        a_new = torch.softmax(torch.randn(b, H, N, N, device=DEV, dtype=dtype), -1)
        a_ref = torch.softmax(torch.randn(b, H, N, N, device=DEV, dtype=dtype), -1)
        args = (q.clone(), a_new, a_ref, kk, kk + 0.1, idx)
        return args, (4 * H * N * K + 2 * H * N * DH + 4 * H * K * DH) * b * es
    raise ValueError(op)


OPS = ["gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "token_gate", "token_gate_threshold",
       "token_delta_gate", "token_delta_gate_index", "qk_update_", "qk_update_relpos_", "av_delta_update_"]
FUNCTION = {"qk_update_relpos_": "qk_update_", "token_delta_gate_index": "token_delta_gate"}  # case -> op name
TAKES_INDEX = {"gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "token_delta_gate_index", "qk_update_",
               "qk_update_relpos_", "av_delta_update_"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, dtype, impl):
    benchmark.group = f"{op} {str(dtype)[6:]} N={N} D={D} K={K}"
    args, nbytes = _setup(op, dtype, b=1)
    if impl == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        fn, fargs = dst.copy_, (src,)
    elif impl == "torch":
        fn, fargs = getattr(R, FUNCTION.get(op, op)), args
    else:
        fn, fargs = getattr(T, FUNCTION.get(op, op)), args
    kwargs = {"check_index": False} if impl == "triton_unchecked" and op in TAKES_INDEX else {}

    def run():
        fn(*fargs, **kwargs)
        torch.cuda.synchronize()

    for _ in range(3):  # compile / autotune outside the timing
        run()
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({"bytes": nbytes, "GB/s": nbytes / mean / 1e9, "op": op, "impl": impl})
