"""End-to-end GPU benchmark: dense timm vs eventful ViTs on a real video, frame by frame, interleaved.

    python benchmarks/bench_gpu.py [--cases sam_b1,vit_b32,vit_b1,vit_b8] [--budgets N/4,N/8] [--frames 20]
    python benchmarks/bench_gpu.py --report results/gpu_e2e.json       # the markdown table of a result file

Per case (model, batch B = B independent streams of the video, each starting at another frame) and budget, these
variants see the same frames, one frame at a time, in turn (so background load hits all of them alike), each
keeping its own state:

- ``dense``: the timm model (fused SDPA attention) in the chosen dtype, eager;
- ``dense_graph``: the same, replayed as a CUDA graph (``torch.compile(mode="max-autotune")`` with
  ``--compile-dense``); the faster of the two dense variants is the baseline;
- ``reference``: the eventful model on the ``reference`` backend with patched ("eventful") attention: the method as
  published, in standard PyTorch operators;
- ``eventful``: ours (fused ops, attention strategy ``auto``), eager;
- ``eventful_graph``: ours with every steady-state frame replayed as one CUDA graph.

Reported per variant: median ms per frame over the steady-state frames (the first ``--skip`` frames of each
variant are left out: the flush, the capture), synchronised before and after each frame; GFLOPs per frame from the
operation counts; the speedup over the baseline; the ideal speedup (dense GFLOPs / eventful GFLOPs) beside it;
the attention mode each global block ran; the relative deviation of the output from the dense model's; the kernels
one more steady-state frame launched (``launches``: on a GPU the CUDA kernels and copies the profiler saw, graph
replays included where it reports their kernels; on a CPU the dispatched operators that compute, i.e. views and
allocations left out). At small batches a GPU frame costs about its launches, whatever its FLOPs. The JSON
is rewritten after every case, so a run cut short keeps what finished. Weights are random (seeded); timing and
operation counts do not depend on them. Runs on CPU too (``--device cpu``: no graph variants), for a smoke test.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402
from eventful_kernels.models import convert  # noqa: E402
from eventful_kernels.video.budgets import parse_budget  # noqa: E402
from eventful_kernels.models.graphs import FrameGraphs  # noqa: E402
from eventful_kernels.models.macs import DenseMacCounter  # noqa: E402
from eventful_kernels.video import runner  # noqa: E402
from eventful_kernels.video.decode import normalize, read_frames, sample_video  # noqa: E402

CASES = {
    "vit_b1": ("vit_base_patch16_224", 1),
    "vit_b8": ("vit_base_patch16_224", 8),
    "vit_b32": ("vit_base_patch16_224", 32),
    "sam_b1": ("samvit_base_patch16", 1),
    "tiny_b2": ("vit_tiny_patch16_224", 2),  # smoke test
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "alias", "set_", "resize_"}


def count_launches(step: Callable, x: torch.Tensor, device: torch.device) -> Optional[int]:
    """Kernels one call ``step(x)`` launches (see the module docstring); None where they cannot be counted."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(x)
                torch.cuda.synchronize(device)
        except Exception as exc:  # e.g. no CUPTI in this build: the table goes on without the count
            print(f"bench_gpu: launches not counted ({exc})", file=sys.stderr)
            return None
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step(x)
    return Count.n


class Variant:
    """One model under test: ``step(x) -> y``, its per-frame times, GFLOPs and deviation from dense."""

    def __init__(self, name: str, step: Callable, macs: Callable[[], int], model=None):
        self.name, self.step, self.macs, self.model = name, step, macs, model
        self.ms: List[float] = []
        self.gflops: List[float] = []
        self.rel_dev: List[float] = []
        self.modes: Optional[list] = None
        self.launches: Optional[int] = None

    def run(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        _sync(device)
        t0 = time.perf_counter()
        y = self.step(x)
        _sync(device)
        self.ms.append((time.perf_counter() - t0) * 1e3)
        self.gflops.append(2 * self.macs() / 1e9)
        if self.model is not None:
            self.modes = self.model.attention_modes()
        return y

    def summary(self, skip: int) -> Dict:
        ms = self.ms[skip:] or self.ms
        out = {"ms_median": statistics.median(ms), "ms_min": min(ms), "gflops": statistics.fmean(self.gflops[skip:]
                                                                                                  or self.gflops),
               "ms_per_frame": [round(v, 4) for v in self.ms]}
        if self.rel_dev:
            out["rel_deviation_mean"] = statistics.fmean(self.rel_dev[skip:] or self.rel_dev)
        if self.modes is not None:
            out["attention_modes"] = self.modes
        if self.launches is not None:
            out["launches"] = self.launches
        return out


def _streams(video: torch.Tensor, frames: int, batch: int) -> torch.Tensor:
    """``[T, B, 3, S, S]``: stream b plays the video from frame 5*b (wrapping), so the streams differ."""
    t_total = video.shape[0]
    idx = torch.tensor([[(t + 5 * b) % t_total for b in range(batch)] for t in range(frames)])
    return video[idx]


@functools.lru_cache(maxsize=2)
def _load_video(source: str, size: int, frames: int) -> torch.Tensor:
    """``[T, 3, S, S]`` uint8 frames of ``source`` (a sample video name or a path); without a decodable video, a
    synthetic clip (a textured background with a square moving across it), and a warning."""
    try:
        path = source if os.path.exists(source) else sample_video(source)
        return read_frames(path, size, frames + 5 * 32)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        print(f"bench_gpu: no video ({exc}); using a synthetic clip", file=sys.stderr)
        SYNTHETIC.add(source)
        g = torch.Generator().manual_seed(0)
        background = torch.rand(3, size, size, generator=g) * 255
        clip = background.expand(frames + 5 * 32, 3, size, size).clone()
        side = size // 4
        for t in range(clip.shape[0]):
            pos = (7 * t) % (size - side)
            clip[t, :, pos:pos + side, pos:pos + side] = 255 - clip[t, :, pos:pos + side, pos:pos + side]
        return clip.to(torch.uint8)


SYNTHETIC: set = set()


def bench_case(name: str, batch: int, budget_text: str, frames: int, dtype: torch.dtype, device: torch.device,
               video: str, skip: int, compile_dense: bool) -> Dict:
    model = runner.create_model(name, seed=0).to(device=device, dtype=dtype)
    size, mean, std = runner.input_spec(model)
    clip = _streams(_load_video(video, size, frames), frames, batch)
    budget = parse_budget(budget_text)
    gpu = device.type == "cuda"

    dense_counter = DenseMacCounter(model)
    dense_macs = {"v": 0}

    def dense_step(x):
        with dense_counter.counting():
            y = model(x)
        dense_macs["v"] = dense_counter.macs
        return y

    variants = [Variant("dense", dense_step, lambda: dense_macs["v"])]
    if compile_dense:
        compiled = torch.compile(model, mode="max-autotune")
        variants.append(Variant("dense_compiled", compiled, lambda: dense_macs["v"]))
    if gpu:
        graphs = FrameGraphs(model)
        variants.append(Variant("dense_graph", lambda x: graphs(x, None), lambda: dense_macs["v"]))
    ref = convert(model, budget, backend="reference", strategy="eventful", cuda_graphs=False)
    ours = convert(model, budget, backend="ops", strategy="auto", cuda_graphs=False)
    variants.append(Variant("reference", ref, ref.macs_last_frame, ref))
    variants.append(Variant("eventful", ours, ours.macs_last_frame, ours))
    if gpu:
        ours_graph = convert(model, budget, backend="ops", strategy="auto", cuda_graphs=True)
        variants.append(Variant("eventful_graph", ours_graph, ours_graph.macs_last_frame, ours_graph))

    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(frames):
            x = normalize(clip[t], mean, std).to(device=device, dtype=dtype)
            dense_out = None
            for v in variants:
                y = v.run(x, device)
                if v.name == "dense":
                    dense_out = y.float()
                elif v.model is not None:
                    dev = (y.float() - dense_out).norm() / dense_out.norm().clamp_min(1e-30)
                    v.rel_dev.append(float(dev))
        x = normalize(clip[frames - 1], mean, std).to(device=device, dtype=dtype)
        for v in variants:  # one more steady-state frame each, counted
            v.launches = count_launches(v.step, x, device)
    dense_counter.remove()
    result = {"case": f"{name} B={batch}", "model": name, "batch": batch, "input_size": size, "budget": budget_text,
              "tokens_selected": runner.tokens_for(budget, dense_counter.n_tokens or 0),
              "tokens": dense_counter.n_tokens, "frames": frames, "skip": skip,
              "video": "synthetic" if video in SYNTHETIC else video,
              "wall_s": time.perf_counter() - t0, "variants": {v.name: v.summary(skip) for v in variants}}
    if gpu:
        result["captures"] = {"dense_graph": graphs.captures, "eventful_graph": ours_graph.graphs.captures,
                              "eventful_graph_failures": list(ours_graph.graphs.failures.values())}
    _ratios(result)
    return result


def _ratios(result: Dict) -> None:
    v = result["variants"]
    dense_names = [n for n in ("dense", "dense_graph", "dense_compiled") if n in v]
    base = min(dense_names, key=lambda n: v[n]["ms_median"])
    result["baseline"] = base
    for name, s in v.items():
        s["speedup"] = v[base]["ms_median"] / s["ms_median"]
        s["ideal_speedup"] = v["dense"]["gflops"] / s["gflops"] if s["gflops"] else float("inf")
    if "reference" in v:
        for name in ("eventful", "eventful_graph"):
            if name in v:
                v[name]["vs_reference"] = v["reference"]["ms_median"] / v[name]["ms_median"]


def render(result: Dict) -> str:
    """Markdown table of a result file (one row per case, budget and variant)."""
    lines = [f"{result.get('device_name', result['device'])}, {result['dtype']}, torch {result['torch']}, "
             f"{result['timing']}", "",
             "| case | r | variant | ms/frame | speedup | ideal | vs reference | GFLOPs | launches | attention "
             "| rel. dev. |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in result["runs"]:
        for name, s in r["variants"].items():
            modes = s.get("attention_modes")
            attn = "" if modes is None else ",".join(sorted(set(modes)))
            mark = " (baseline)" if name == r["baseline"] else ""
            vs_ref = f"{s['vs_reference']:.2f}x" if "vs_reference" in s else ""
            dev = f"{s['rel_deviation_mean']:.1e}" if "rel_deviation_mean" in s else ""
            launches = s.get("launches", "")
            lines.append(f"| {r['case']} | {r['budget']} | {name}{mark} | {s['ms_median']:.3f} | {s['speedup']:.2f}x "
                         f"| {s['ideal_speedup']:.2f}x | {vs_ref} | {s['gflops']:.1f} | {launches} | {attn} | {dev} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="sam_b1,vit_b32,vit_b1,vit_b8",
                   help=f"from {sorted(CASES)}, run in this order (a run cut short keeps the first)")
    p.add_argument("--budgets", default="N/4,N/8")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="first frames of each variant left out of the medians")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--video", default="bigbuckbunny", help="a sample video name or a path")
    p.add_argument("--compile-dense", action="store_true", help="also torch.compile(mode='max-autotune') dense")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: leave torch's default)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_e2e.json"))
    p.add_argument("--report", metavar="JSON", help="print the table of an existing result file and exit")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(render(json.load(f)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "kind": "gpu_e2e",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timing": f"median ms per frame, synchronised, variants interleaved frame by frame, first {args.skip} "
                  "frames left out",
        "launches": "CUDA kernels and copies per frame (torch.profiler)" if device.type == "cuda" else
                    "dispatched computing operators per frame",
        "runs": [],
    }
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            p.error(f"unknown case {case!r}; choose from {sorted(CASES)}")
        name, batch = CASES[case]
        for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
            r = bench_case(name, batch, budget, args.frames, DTYPES[args.dtype], device, args.video, args.skip,
                           args.compile_dense)
            result["runs"].append(r)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            v = r["variants"]
            print(f"{r['case']} r={budget}: " + ", ".join(
                f"{n} {s['ms_median']:.2f} ms ({s['speedup']:.2f}x, ideal {s['ideal_speedup']:.2f}x)"
                for n, s in v.items()), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(render(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
