"""``torch.compile(model)`` against eager on a converted ViT-B/16 at 224 px (197 tokens), CPU.

    python benchmarks/bench_compile.py [--frames 20] [--budget N/4] [--threads 2] [--backend inductor]
                                       [--graph-linears packed|plain] [--out benchmarks/results/compile_cpu.json]

Two converted models share one dense timm model (random seeded weights: timing does not depend on the values):
one runs eagerly (packed oneDNN linears, fused ops), the other through ``torch.compile(model)`` (default options:
inductor; inside the graph the gated linears are the packed custom op, or ``F.linear`` with
``--graph-linears plain``). Both flush on frame 0; the compiled model's first
steady-state frame compiles (its wall time is reported as the compile time); then every frame goes through both,
the order alternating frame by frame, and the medians of the per-frame wall times are compared. The outputs are
compared too (max abs difference). Frames: a fixed random background with per-frame noise and a moving bright
square (as tests/tiny_timm.video), so the gates select a changing set of tokens.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eventful_kernels.models import convert, import_timm  # noqa: E402
from eventful_kernels.video.budgets import parse_budget  # noqa: E402
from eventful_kernels.nn.linear import PackedLinear  # noqa: E402


def frames(n: int, size: int = 224, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(1, 3, size, size, generator=g)
    side = size // 4
    for t in range(n):
        x = bg + 0.02 * torch.randn(1, 3, size, size, generator=g)
        pos = (7 * t) % (size - side)
        x[:, :, pos : pos + side, pos : pos + side] += 2.0
        yield x


def timed(fn, x):
    t0 = time.perf_counter()
    out = fn(x)
    return out, (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--frames", type=int, default=20, help="timed steady-state frames (each through both models)")
    ap.add_argument("--budget", default="N/4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--strategy", default=None, help="attention strategy of the global blocks (default: auto)")
    ap.add_argument("--graph-linears", choices=["packed", "plain"], default="packed",
                    help="gated linears inside the compiled graph: the packed custom op or F.linear")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    PackedLinear.in_graph = args.graph_linears == "packed"
    torch.manual_seed(0)
    dense = import_timm().create_model(args.model).eval()
    budget = parse_budget(args.budget)
    eager = convert(dense, budget, strategy=args.strategy)
    ev = convert(dense, budget, strategy=args.strategy)
    compiled = torch.compile(ev, backend=args.backend)
    video = list(frames(args.frames + 2))
    eager(video[0])
    compiled(video[0])  # the flush: eager in both (compiles an empty pass-through graph)
    _, eager_first = timed(eager, video[1])
    out, compile_ms = timed(compiled, video[1])  # first steady frame: compiles the steady graph
    ms = {"eager": [], "compiled": []}
    worst = 0.0
    for t, x in enumerate(video[2:]):
        order = [("eager", eager), ("compiled", compiled)]
        if t % 2:
            order.reverse()
        outs = {}
        for name, fn in order:
            outs[name], dt = timed(fn, x)
            ms[name].append(dt)
        worst = max(worst, float((outs["eager"] - outs["compiled"]).abs().max()))
    med = {k: statistics.median(v) for k, v in ms.items()}
    result = {
        "kind": "compile",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "budget": args.budget,
        "tokens_selected": eager.eventful_blocks()[0].policy.k(197),
        "attention_modes": eager.attention_modes(),
        "backend": args.backend,
        "graph_linears": args.graph_linears,
        "load_average": os.getloadavg(),
        "frames": args.frames,
        "compile_s": compile_ms / 1e3,
        "median_ms": med,
        "speedup_compiled_vs_eager": med["eager"] / med["compiled"],
        "max_abs_diff": worst,
        "ms": ms,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "ms"}, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
