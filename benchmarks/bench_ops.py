"""Op microbenchmarks, CPU or GPU: each fused op against the standard-PyTorch composition (compositions.py) and,
for the ops that move data, a plain copy of the bytes the op must move.

The implementations of one case run interleaved, round by round (fused, composition, copy, fused, ...), so load on
a shared machine hits them alike; each reports the median and the minimum of its rounds. Like is compared with
like: an op that returns a new tensor (gather_rows, gather_cols) is measured against a copy that allocates its
output too, an in-place op against a copy into a preallocated tensor. ``scatter_rows_residual_`` (a buffer patched
and added to the residual stream) is measured against the composition scatter + add, and against a copy of as many
bytes as it moves.

    python benchmarks/bench_ops.py --out benchmarks/results/ops_cpu.json            # CPU, 2 threads
    python benchmarks/bench_ops.py --device cuda --dtype fp16 --sizes 4096:256 --out results/ops_cuda.json
    python benchmarks/render.py                                                     # tables into README.md

Shapes (ViT-B): tokens D = 768, attention H = 12 heads of d = 64, B = 1, int64 index of K distinct sorted ids.
``fused_unchecked`` (GPU only) passes ``check_index=False``: no index value check, hence no host sync.
``triton`` (GPU only, for the ops the dispatcher sends to a C++ CUDA kernel): the Triton kernel of the same op,
called as ``fused_unchecked`` (as ``fused`` for the gates), so the two GPU implementations are measured side by side.
``one_launch`` / ``split`` (GPU only, gates served by C++ CUDA): the gate forced into one launch (a thread block
cluster per row) / into three (keys, selection, rows), by ``EVENTFUL_CUDA_GATE=fused`` / ``split`` set outside the
timed call, beside ``fused``, whichever of the two the cost model picks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compositions as comp  # noqa: E402
from machine import cpu_name  # noqa: E402

D, H, HD = 768, 12, 64
OPS = ["gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
       "token_gate_threshold", "token_delta_gate", "qk_update_", "qk_update_relpos_", "av_delta_update_"]
FUNCTION = {"qk_update_relpos_": "qk_update_"}  # case -> op name
GATES = {"token_gate", "token_gate_threshold", "token_delta_gate"}
TAKES_INDEX = {"gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "qk_update_",
               "qk_update_relpos_", "av_delta_update_"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SIZES = "196:12,196:49,1024:64,1024:256,4096:256,4096:1024"


class Case:
    """One op at one (N, K): ``args`` for the op and the composition, ``nbytes`` the op must move at least, and a
    ``copy`` of those bytes (None for ops that compute)."""

    def __init__(self, op: str, n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.op, self.n, self.k = op, n, k
        es = torch.tensor([], dtype=dtype).element_size()

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        idx = torch.randperm(n, generator=g)[:k].sort().values[None].to(device)
        self.copy: Optional[Callable] = None
        if op in ("gather_rows", "scatter_rows_"):
            x, src = rnd(1, n, D), rnd(1, k, D)
            self.args = (x, idx) if op == "gather_rows" else (x, idx, src)
            self.nbytes = 2 * k * D * es
            self.copy = (lambda: x[:, :k].clone()) if op == "gather_rows" else (lambda: x[:, :k].copy_(src))
        elif op == "scatter_rows_residual_":
            state, src, res = rnd(1, n, D), rnd(1, k, D), rnd(1, n, D)
            self.args = (state, idx, src, res)
            # read residual, the N - K kept rows of the state and src; write the K patched rows and y
            self.nbytes = (3 * n + k) * D * es
            half = (3 * n + k) * D // 2
            a, b = rnd(half), rnd(half)
            self.copy = lambda: a.copy_(b)
        elif op in ("gather_cols", "scatter_cols_"):
            a, src = rnd(1, H, n, n), rnd(1, H, n, k)
            self.args = (a, idx) if op == "gather_cols" else (a, idx, src)
            self.nbytes = 2 * H * n * k * es
            self.copy = (lambda: a[..., :k].clone()) if op == "gather_cols" else (lambda: a[..., :k].copy_(src))
        elif op.startswith("token_"):
            c = rnd(1, n, D)
            ref = c + 0.1 * rnd(1, n, D)
            if op == "token_gate_threshold":
                h = float((c - ref).float().norm(dim=-1).quantile(1 - k / n))
                self.args = (c, ref, h, k)
            else:
                self.args = (c, ref, k)
            self.nbytes = (2 * n * D + (5 if op == "token_delta_gate" else 3) * k * D) * es
        elif op in ("qk_update_", "qk_update_relpos_"):
            q, kk, logits = rnd(1, H, n, HD), rnd(1, H, n, HD), rnd(1, H, n, n)
            self.args = (logits, q, kk, idx, idx.clone(), HD ** -0.5)
            self.nbytes = (2 * H * n * HD + 2 * H * n * k) * es
            if op == "qk_update_relpos_":
                side = int(round(n ** 0.5))
                if side * side != n:
                    raise ValueError(f"{op} needs a square token grid, N = {n} is not one")
                self.args += (rnd(1, H, n, side), rnd(1, H, n, side))
                self.nbytes += 2 * H * n * side * es
        elif op == "av_delta_update_":
            out, vn, vr = rnd(1, H, n, HD), rnd(1, H, n, HD), rnd(1, H, n, HD)
            an, ar = torch.softmax(rnd(1, H, n, n), -1), torch.softmax(rnd(1, H, n, n), -1)
            self.args = (out, an, ar, vn, vr, idx)
            self.nbytes = (4 * H * n * k + 2 * H * n * HD + 4 * H * k * HD) * es
        else:
            raise KeyError(op)

    def implementations(self, device: str) -> Dict[str, Callable]:
        from eventful_kernels import ops

        fused = getattr(ops, FUNCTION.get(self.op, self.op))
        composition = getattr(comp, self.op)
        impls = {"fused": lambda: fused(*self.args), "composition": lambda: composition(*self.args)}
        if device != "cpu" and self.op in TAKES_INDEX:
            impls["fused_unchecked"] = lambda: fused(*self.args, check_index=False)
        name = FUNCTION.get(self.op, self.op)
        if device != "cpu" and name not in _triton_served():
            import eventful_kernels.triton as T

            kernel = getattr(T, name)
            impls["triton"] = ((lambda: kernel(*self.args, check_index=False)) if self.op in TAKES_INDEX
                               else (lambda: kernel(*self.args)))
        if device != "cpu" and name in GATES and name not in _triton_served():
            impls["one_launch"] = WithEnv(lambda: fused(*self.args), "EVENTFUL_CUDA_GATE", "fused")
            impls["split"] = WithEnv(lambda: fused(*self.args), "EVENTFUL_CUDA_GATE", "split")
        if self.copy is not None:
            impls["copy"] = self.copy
        return impls


class WithEnv:
    """A call timed with an environment variable set; ``enter``/``exit`` run outside the timed interval."""

    def __init__(self, fn: Callable, name: str, value: str):
        self.fn, self.name, self.value, self.saved = fn, name, value, None

    def enter(self) -> None:
        self.saved = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def exit(self) -> None:
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved

    def __call__(self):
        self.enter()
        try:
            return self.fn()
        finally:
            self.exit()


def _triton_served() -> set:
    """The ops Triton serves through the dispatcher on CUDA (all of them when triton is missing: no column)."""
    import eventful_kernels.triton as T

    return set(T.registered_ops()) if T.AVAILABLE else set(OPS) | set(FUNCTION.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(impls: Dict[str, Callable], device: str, rounds: int, budget_s: float) -> Dict[str, Dict]:
    """Run every implementation once per round, in turn; stop after ``rounds`` rounds or ``budget_s`` seconds
    (at least 3 rounds). Returns per implementation the median, min and 90th percentile in ms and the rounds."""
    for fn in impls.values():  # warm-up: allocator, autotuning, code paths
        for _ in range(2):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in impls}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in impls.items():
            call = fn.fn if isinstance(fn, WithEnv) else fn
            if call is not fn:
                fn.enter()
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            if call is not fn:
                fn.exit()
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t),
                   "p90_ms": sorted(t)[int(0.9 * (len(t) - 1))], "rounds": len(t)} for name, t in times.items()}


def _sizes(text: str) -> List[Tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, k = part.split(":")
        out.append((int(n), int(k)))
    return out


def _write(result: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def run(ops: List[str], sizes: List[Tuple[int, int]], dtype: str, device: str, rounds: int,
        budget_s: float, out: Optional[str] = None, log=print) -> Dict:
    """Measure every (op, N, K); the result is plain data (see render.py for the tables), written to ``out``
    after every case, so a run cut short keeps what it measured."""
    import eventful_kernels  # noqa: F401  (loads the ops)

    results: List[Dict] = []
    result = {
        "kind": "ops",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": dtype,
        "shape": {"D": D, "H": H, "d": HD, "B": 1},
        "command": "python benchmarks/bench_ops.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    for op in ops:
        for n, k in sizes:
            try:
                case = Case(op, n, k, DTYPES[dtype], device)
            except ValueError as e:
                log(f"skip {op} N={n} K={k}: {e}")
                continue
            timing = time_interleaved(case.implementations(device), device, rounds, budget_s)
            results.append({"op": op, "n": n, "k": k, "bytes": case.nbytes, "times": timing})
            fused, compo = timing["fused"]["median_ms"], timing["composition"]["median_ms"]
            extra = f", copy {timing['copy']['median_ms']:.3f}" if "copy" in timing else ""
            log(f"{op:22s} N={n:5d} K={k:5d}: fused {fused:.3f} ms, composition {compo:.3f}{extra} "
                f"({compo / fused:.2f}x)")
            del case
            if out:
                _write(result, out)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="N:K pairs, comma separated")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per case at most (after 3 rounds)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads torch uses (pinned)")
    p.add_argument("--out", help="JSON file to write")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be at least 1")
    torch.set_num_threads(a.threads)
    ops = [o for o in a.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"unknown --ops {unknown}; choose from {OPS}")
    run(ops, _sizes(a.sizes), a.dtype, a.device, a.rounds, a.budget, out=a.out)
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
