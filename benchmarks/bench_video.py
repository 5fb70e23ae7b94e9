"""End-to-end video benchmark: dense timm ViT vs its eventful twin on a real video, steady state, 2 threads.

    python benchmarks/bench_video.py [--models vit_base_patch16_224,samvit_base_patch16] [--profile] [--sequential]
                                     [--gate-placement after_norm,before_norm]

Per model: decode the sample video (Big Buck Bunny) at the model input size (224 for ViT-B, 1024 = 64x64 = 4096
tokens for SAM ViT-B); run dense timm, dense timm with packed linears and the eventful model at r = N/4 over the
same frames, one frame at a time, *interleaved*: each frame goes through the three models in turn (the order rotated
from frame to frame), so load from elsewhere on the machine hits all of them alike. ``--sequential`` runs all
frames dense, then all frames with packed linears, then all eventful (each pass in the other's heap aftermath less,
but at different moments). Reported: the median wall time per frame over steady-state frames (frame 0 = flush /
warm-up left out; the dense models get two untimed warm-up frames first), GFLOPs per frame from the operation
counts, measured speedup, ideal speedup (GFLOP ratio) and their ratio (efficiency). The eventful blocks run their
linears on oneDNN-prepacked weights (eventful_kernels/nn/linear.py); the dense model with its linears packed the
same way is the like-for-like baseline (``dense_packed``, ``speedup_vs_dense_packed``). Dense SAM frames that
page-fault fresh heap run 1-3 s longer than fault-free ones, so the ratio against the fastest dense frame of the
run (``speedup_vs_dense_fastest``) is reported as the conservative figure.

A result is flagged ``noisy`` (with ``noisy_reasons``) when the like-for-like efficiency exceeds 1.1 or a dense
model's frame times spread more than 30 % ((p90 - p10) / median, eventful_kernels/video/timing.py). Also reported:
the attention mode each global block ran (``attention_modes``), the threads, the dtype and the gate placement
(``gate_placement``). ``--gate-placement after_norm,before_norm`` runs one eventful model per placement in the same
interleaved pass and reports each (``placements``: its figures and the median over frames of its frame time over
the first placement's).
Targets: speedup >= 2.5x and efficiency >= 0.7. ``--profile`` adds a torch.profiler table of eventful frames.
glibc is told to keep freed memory (``eventful_kernels/video/malloc.py``) unless ``--system-malloc``.
Weights are random (seeded): timing and operation counts do not depend on the values.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eventful_kernels.models import convert  # noqa: E402
from eventful_kernels.nn.blocks import GATE_PLACEMENTS  # noqa: E402
from eventful_kernels.nn.linear import packing_enabled  # noqa: E402
from eventful_kernels.video import budgets, runner, timing  # noqa: E402
from eventful_kernels.video.decode import normalize, read_frames, sample_video  # noqa: E402
from eventful_kernels.video.malloc import keep_freed_memory  # noqa: E402
from machine import cpu_name  # noqa: E402

TARGET_SPEEDUP = 2.5
TARGET_EFFICIENCY = 0.7
DENSE_WARMUP = 2  # untimed dense frames before each dense run (the eventful run's flush frame is its warm-up)


def profile_eventful(ev, frames, mean, std, budget, n: int = 3, rows: int = 25) -> str:
    """torch.profiler table (self CPU time) over ``n`` steady-state eventful frames."""
    from torch.profiler import ProfilerActivity, profile

    ev.reset()
    ev.set_budget(budget)
    dtype = next(ev.parameters()).dtype
    ev(normalize(frames[0][None], mean, std).to(dtype))  # flush, not profiled
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for frame in frames[1 : 1 + n]:
            ev(normalize(frame[None], mean, std).to(dtype))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_model(name: str, frames_n: int, budget_text: str, backend: str, video: str, profile: bool,
                sequential: bool = False, dtype: str = "float32", strategy=None, model_kwargs=None,
                placements=("after_norm",)) -> dict:
    """One model: dense, dense on packed linears and the eventful model at ``budget_text`` with each gate placement
    of ``placements``; the top-level figures are those of the first placement."""
    torch_dtype = getattr(torch, dtype)
    model = runner.create_model(name, seed=0, **(model_kwargs or {})).to(torch_dtype)
    size, mean, std = runner.input_spec(model)
    frames = read_frames(sample_video(video), size, frames_n)
    budget = budgets.parse_budget(budget_text)
    label = budgets.budget_label(budget_text, budget)
    labels = [label if len(placements) == 1 else f"{label} {p}" for p in placements]
    t0 = time.perf_counter()
    entries = [(lb, budgets.fresh(budget), p) for lb, p in zip(labels, placements)]
    cmp = runner.compare(model, frames, mean, std, entries,
                         backend=backend, strategy=strategy, packed_baseline=backend == "ops" and packing_enabled(),
                         sequential=sequential, warmup=DENSE_WARMUP)
    dense, run, dense_packed = cmp.dense, cmp.runs[0], cmp.dense_packed
    d, e = dense.summary(), run.summary()
    dp = dense_packed.summary() if dense_packed is not None else None
    out = {
        "model": name,
        "input_size": size,
        "tokens": cmp.n_tokens,
        "budget": budget_text,
        "tokens_selected": budgets.tokens_for(budget, cmp.n_tokens),
        "frames": int(frames.shape[0]),
        "mode": cmp.mode,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "gate_placement": placements[0],
        "attention_modes": run.attention[-1] if run.attention else [],
        "attention": runner.attention_summary(run.attention),
        "dense": dense.to_json(),
        "eventful": run.to_json(),
        # conservative: the fastest dense frame of the run (dense SAM frames that page-fault new heap take longer)
        "speedup_vs_dense_fastest": d["ms_min"] / e["ms_median"],
        "wall_s": time.perf_counter() - t0,
    }
    out.update(timing.rates(e, d, dp))
    if dense_packed is not None:
        out["dense_packed"] = dense_packed.to_json()
    out["meets_speedup_target"] = out["speedup"] >= TARGET_SPEEDUP
    out["meets_efficiency_target"] = out["efficiency"] >= TARGET_EFFICIENCY
    efficiencies = {}
    if len(placements) > 1:
        out["placements"] = {}
        for p, r in zip(placements, cmp.runs):
            s = r.summary()
            entry = {"ms_median": s["ms_median"], "gflops_mean": s["gflops_mean"],
                     "rel_error_mean": s["rel_error_mean"], **timing.rates(s, d, dp),
                     # same frames, same moment: each frame's time over the first placement's
                     "ms_ratio_to_first_paired_median": statistics.median(
                         a / b for a, b in zip(r.steady(r.ms), run.steady(run.ms))),
                     "run": r.to_json()}
            out["placements"][p] = entry
            efficiencies[r.label] = timing.like_for_like(entry)
    else:
        efficiencies[label] = timing.like_for_like(out)
    dense_ms = {"dense": dense.steady(dense.ms)}
    if dense_packed is not None:
        dense_ms["dense packed"] = dense_packed.steady(dense_packed.ms)
    check = timing.noise_check(dense_ms, efficiencies)
    out["noisy"], out["noisy_reasons"], out["noise_check"] = check["noisy"], check["reasons"], check
    if profile:
        ev = convert(model, budgets.fresh(budget), backend=backend, strategy=strategy, gate_placement=placements[0])
        out["profile"] = profile_eventful(ev, frames, mean, std, budgets.fresh(budget))
        del ev
    del dense, dense_packed, run, cmp
    return out


def _bench_in_subprocess(name: str, argv) -> dict:
    """Run this script for one model in a child process (same options) and return its result entry."""
    import subprocess
    import tempfile

    drop = {"--models", "--out"}
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif a.split("=", 1)[0] not in drop:
            rest.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "one.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--models", name, "--out", out, *rest], check=True)
        with open(out) as f:
            return json.load(f)["models"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_base_patch16_224,samvit_base_patch16")
    p.add_argument("--frames", type=int, default=16, help="frames for 224px models")
    p.add_argument("--sam-frames", type=int, default=5, help="frames for samvit (1024px, ~1 TFLOP per dense frame)")
    p.add_argument("--budget", default="N/4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="ops", choices=("ops", "reference"))
    p.add_argument("--video", default="bigbuckbunny")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sequential", action="store_true", help="all frames dense, then dense with packed linears, then "
                   "eventful (default: interleaved frame by frame, so all see the same load on a shared machine; "
                   "each then runs in the others' cache / heap aftermath)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model-kwargs", default="{}", help="JSON dict for timm.create_model (e.g. a tiny test config)")
    p.add_argument("--strategy", default=None, choices=("auto", "eventful", "dense"),
                   help="attention of the global blocks (default: EVENTFUL_ATTENTION, else auto)")
    p.add_argument("--gate-placement", default="after_norm", help="after_norm (default) or before_norm, or both "
                   "as a comma list (after_norm,before_norm): one eventful model per placement, interleaved")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc malloc at its defaults (by default "
                   "freed memory is kept for reuse, see eventful_kernels/video/malloc.py)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_video.json"))
    args = p.parse_args(argv)
    placements = tuple(x.strip() for x in args.gate_placement.split(",") if x.strip())
    bad = [x for x in placements if x not in GATE_PLACEMENTS]
    if bad or not placements or len(set(placements)) != len(placements):
        p.error(f"--gate-placement: expected distinct values of {', '.join(GATE_PLACEMENTS)}, "
                f"got {args.gate_placement}")

    torch.set_num_threads(args.threads)
    result = {
        "kind": "video",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_video.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "processor": cpu_name(),
        "malloc_keep_freed": False if args.system_malloc else keep_freed_memory(),
        "threads": args.threads,
        "backend": args.backend,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "timing": "median wall ms per frame over frames 1.. (frame 0 = flush / warm-up excluded), batch 1",
        "mode": "sequential" if args.sequential else "interleaved",
        "dtype": args.dtype,
        "gate_placements": list(placements),
        "targets": {"speedup": TARGET_SPEEDUP, "efficiency": TARGET_EFFICIENCY},
        "models": [],
    }
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if len(names) > 1:  # each model in a fresh process (it prints its own line): the heap one model leaves
            # behind slows the next (SAM dense measured 7.6 s per frame alone, 10.5 s after ViT-B in one process)
            result["models"].append(_bench_in_subprocess(name, argv if argv is not None else sys.argv[1:]))
        else:
            n = args.sam_frames if name.startswith("samvit") else args.frames
            r = bench_model(name, n, args.budget, args.backend, args.video, args.profile, args.sequential, args.dtype,
                            args.strategy, json.loads(args.model_kwargs), placements)
            result["models"].append(r)
            _print_result(r, args.profile)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def _print_result(r: dict, profile: bool) -> None:
    name = r["model"]
    line = (f"{name} @ {r['input_size']}px N={r['tokens']} r={r['budget']} ({r['tokens_selected']} tokens), "
            f"{r['frames']} frames, {r['mode']}, {r['threads']} threads, {r['dtype']}, gates {r['gate_placement']}, "
            f"attention {r['attention']}: "
            f"dense {r['dense']['ms_median']:.1f} ms ({r['dense']['gflops_mean']:.1f} GFLOPs), "
            f"eventful {r['eventful']['ms_median']:.1f} ms ({r['eventful']['gflops_mean']:.1f} GFLOPs), "
            f"speedup {r['speedup']:.2f}x, ideal {r['ideal_speedup']:.2f}x, efficiency {r['efficiency']:.2f}, "
            f"rel. dev. {r['eventful']['rel_error_mean']:.3e}")
    if "dense_packed" in r:
        line += (f"; dense with packed linears {r['dense_packed']['ms_median']:.1f} ms -> speedup "
                 f"{r['speedup_vs_dense_packed']:.2f}x, efficiency {r['efficiency_vs_dense_packed']:.2f}")
    line += f"; fastest dense frame {r['dense']['ms_min']:.1f} ms -> speedup {r['speedup_vs_dense_fastest']:.2f}x"
    print(line, flush=True)
    for p, entry in r.get("placements", {}).items():
        print(f"  gates {p}: {entry['ms_median']:.1f} ms, {entry['gflops_mean']:.2f} GFLOPs, speedup "
              f"{entry['speedup']:.2f}x" + (f" ({entry['speedup_vs_dense_packed']:.2f}x vs packed)"
                                            if "speedup_vs_dense_packed" in entry else "")
              + f", per-frame time vs {r['gate_placement']} {entry['ms_ratio_to_first_paired_median']:.3f}, "
              f"rel. dev. {entry['rel_error_mean']:.3e}", flush=True)
    if r["noisy"]:
        print("  NOISY: " + "; ".join(r["noisy_reasons"]), flush=True)
    if profile:
        print(r["profile"])


if __name__ == "__main__":
    sys.exit(main())
