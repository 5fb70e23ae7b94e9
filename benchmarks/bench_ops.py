"""Op microbenchmarks (CPU): each fused op vs the standard-PyTorch composition, plus a plain copy of the same bytes
for the data-movement ops. ViT-B shapes: D = 768 (tokens), H = 12 heads of d = 64 (attention), N in {196, 1024,
4096}, K in {N/16, N/4}, float32, int64 index, B = 1.

    python -m pytest benchmarks/bench_ops.py --benchmark-json results/ops.json
    python benchmarks/report.py results/ops.json      # markdown table with ratios
"""
import pytest
import torch

from eventful_kernels import ops

import compositions as comp

D, H, HD = 768, 12, 64
SIZES = [(n, k) for n in (196, 1024, 4096) for k in (n // 16, n // 4)]


def _index(n, k, b=1):
    return torch.stack([torch.randperm(n)[:k].sort().values for _ in range(b)])


def _case(op, n, k):
    """(args builder, fused fn, composition fn, copy fn or None)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    idx = _index(n, k)
    if op == "gather_rows":
        x, y = rnd(1, n, D), torch.empty(1, k, D)
        return (x, idx), ops.gather_rows, comp.gather_rows, lambda: y.copy_(x[:, :k])
    if op == "scatter_rows_":
        dst, src = rnd(1, n, D), rnd(1, k, D)
        return (dst, idx, src), ops.scatter_rows_, comp.scatter_rows_, lambda: dst[:, :k].copy_(src)
    if op == "gather_cols":
        x, y = rnd(1, H, n, n), torch.empty(1, H, n, k)
        return (x, idx), ops.gather_cols, comp.gather_cols, lambda: y.copy_(x[..., :k])
    if op == "scatter_cols_":
        dst, src = rnd(1, H, n, n), rnd(1, H, n, k)
        return (dst, idx, src), ops.scatter_cols_, comp.scatter_cols_, lambda: dst[..., :k].copy_(src)
    if op == "token_gate":
        return (rnd(1, n, D), rnd(1, n, D), k), ops.token_gate, comp.token_gate, None
    if op == "token_gate_threshold":
        c, ref = rnd(1, n, D), rnd(1, n, D)
        h = float((c - ref).norm(dim=-1).quantile(1 - k / n))
        return (c, ref, h, k), ops.token_gate_threshold, comp.token_gate_threshold, None
    if op == "token_delta_gate":
        return (rnd(1, n, D), rnd(1, n, D), k), ops.token_delta_gate, comp.token_delta_gate, None
    if op == "qk_update_":
        q, kk = rnd(1, H, n, HD), rnd(1, H, n, HD)
        logits = rnd(1, H, n, n)
        return (logits, q, kk, idx, idx, HD**-0.5), ops.qk_update_, comp.qk_update_, None
    if op == "qk_update_relpos_":  # SAM global attention: N = Gh*Gw tokens on a square grid
        side = int(n**0.5)
        if side * side != n:
            return None
        q, kk = rnd(1, H, n, HD), rnd(1, H, n, HD)
        logits, rel_h, rel_w = rnd(1, H, n, n), rnd(1, H, n, side), rnd(1, H, n, side)
        args = (logits, q, kk, idx, idx, HD**-0.5, rel_h, rel_w)
        return args, ops.qk_update_, comp.qk_update_relpos_, None
    if op == "av_delta_update_":
        out, vn, vr = rnd(1, H, n, HD), rnd(1, H, n, HD), rnd(1, H, n, HD)
        an, ar = rnd(1, H, n, n), rnd(1, H, n, n)
        return (out, an, ar, vn, vr, idx), ops.av_delta_update_, comp.av_delta_update_, None
    raise KeyError(op)


OPS = [
    "gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "token_gate", "token_gate_threshold",
    "token_delta_gate", "qk_update_", "qk_update_relpos_", "av_delta_update_",
]


@pytest.mark.parametrize("impl", ["fused", "composition", "copy"])
@pytest.mark.parametrize("n,k", SIZES, ids=[f"N{n}-K{k}" for n, k in SIZES])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, n, k, impl):
    case = _case(op, n, k)
    if case is None:
        pytest.skip(f"{op} needs a square token grid, N = {n} is not one")
    args, fused, composition, copy = case
    if impl == "copy" and copy is None:
        pytest.skip("copy yardstick only for data-movement ops")
    fn = {"fused": lambda: fused(*args), "composition": lambda: composition(*args), "copy": copy}[impl]
    benchmark.group = f"{op} N={n} K={k}"
    benchmark.extra_info.update(op=op, n=n, k=k, impl=impl, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
