"""bf16 against float32 on the CPU: the eventful ViT and the dense baselines in both dtypes, interleaved frame by
frame, and the bf16 linear kernel against oneDNN float32 and PyTorch's own bf16 linear.

    python benchmarks/bench_bf16.py [--model vit_base_patch16_224] [--frames 20] [--threads 2] [--out FILE.json]

End to end (Big Buck Bunny, r = N/4, gates after the norms): six models see every frame in turn (the order rotated
from frame to frame, so background load hits all alike): dense timm, dense timm on packed linears (and the patch
embedding as a packed linear, as the eventful model runs it), and the eventful model, each in float32 and in bf16.
Per-frame medians over the steady-state frames (frame 0, the flush, left out; the dense models get two untimed
warm-up frames), ratios of medians, and the median over frames of the per-frame ratio eventful bf16 / eventful
float32 (each frame's pair ran back to back). On a CPU without native bf16 the bf16 linears run
``torch.ops.eventful.linear_bf16`` (``eventful_kernels.nn.linear.bf16_kernel()``); timm's own bf16 layers run
PyTorch's kernels, which is what ``dense timm bf16`` measures.

``--sam-frames N``: also SAM ViT-B at 1024 px (4096 tokens), the eventful model only in both dtypes (a dense SAM
frame on PyTorch's bf16 kernels takes minutes on such a CPU).

Ops: ``linear_bf16`` against the oneDNN-packed float32 product and ``F.linear`` in bf16, at the ViT-B shapes (rows
49 = N/4 and 197 = N), the three interleaved round by round; medians in ms and GFLOP/s.
"""
from __future__ import annotations

import copy
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eventful_kernels import ops  # noqa: E402
from eventful_kernels.models import convert  # noqa: E402
from eventful_kernels.nn.linear import bf16_kernel, packing_enabled  # noqa: E402
from eventful_kernels.video import runner, timing  # noqa: E402
from eventful_kernels.video.decode import normalize, read_frames, sample_video  # noqa: E402
from machine import cpu_name, publish, show_report, video_parser  # noqa: E402

DENSE_WARMUP = 2
LINEAR_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of ViT-B's qkv, proj, fc1, fc2
MODELS = ("dense_fp32", "dense_bf16", "dense_packed_fp32", "dense_packed_bf16", "eventful_fp32", "eventful_bf16")


def _ms(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def _twins(name: str, frames_n: int, video: str):
    """The model in float32 and a bf16 copy, its input normalisation and ``frames_n`` frames of ``video`` at its
    input size."""
    dense32 = runner.create_model(name, seed=0)
    size, mean, std = runner.input_spec(dense32)
    frames = read_frames(video if video.endswith(".mp4") else sample_video(video), size, frames_n)
    return dense32, copy.deepcopy(dense32).to(torch.bfloat16), frames, mean, std


def _interleaved(fns: dict, frames, mean, std):
    """Every frame through every model of ``fns`` (name -> (callable, input dtype)) in turn, the order rotated from
    frame to frame: the per-model ms of every frame, and the outputs of the last frame."""
    ms = {k: [] for k in fns}
    outputs = {}
    order = list(fns)
    for t, frame in enumerate(frames):
        x = normalize(frame[None], mean, std)
        for k in order[t % len(order):] + order[:t % len(order)]:
            fn, dtype = fns[k]
            xin = x.to(dtype)
            t0 = time.perf_counter()
            outputs[k] = fn(xin)
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return ms, outputs


def measure(fns: dict, frames, mean, std):
    """Two untimed warm-up frames for the dense models of ``fns``, then :func:`_interleaved`. Returns the fields of
    a result (per-frame ``ms``, ``median_ms`` over the steady-state frames, the dense models' spread, the timing
    check's reasons to call the run noisy, each model's relative deviation from ``dense_fp32`` on the last frame)
    and the steady-state ms per model."""
    with torch.no_grad():
        x0 = normalize(frames[0][None], mean, std)
        for k, (fn, dtype) in fns.items():
            if k.startswith("dense"):
                for _ in range(DENSE_WARMUP):
                    fn(x0.to(dtype))
        ms, outputs = _interleaved(fns, frames, mean, std)
    steady = {k: v[1:] for k, v in ms.items()}
    dense_ms = {k: v for k, v in steady.items() if k.startswith("dense")}
    ref = outputs["dense_fp32"].float()
    fields = {"median_ms": {k: statistics.median(v) for k, v in steady.items()}, "ms": ms,
              "dense_spread": {k: timing.spread(v) for k, v in dense_ms.items()},
              "noisy_reasons": [f"{k} frame times spread {timing.spread(v):.0%} > {timing.MAX_SPREAD:.0%}"
                                for k, v in dense_ms.items() if timing.spread(v) > timing.MAX_SPREAD],
              "rel_deviation_last_frame_vs_dense_fp32": {k: float((o.float() - ref).norm() / ref.norm())
                                                         for k, o in outputs.items()}}
    return fields, steady


def case_fields(name: str, model, frames_n: int, budget: float, video: str) -> dict:
    """What a result says of the case: model name, frames, budget, tokens (all and selected), video."""
    tokens = runner.token_count(model)
    return {"model": name, "frames": frames_n, "budget": budget, "tokens": tokens,
            "tokens_selected": int(budget * tokens), "video": os.path.basename(video)}


def _bf16_over_fp32(steady: dict, med: dict) -> dict:
    """Eventful bf16 frame time over eventful float32: ratio of medians and median of the per-frame ratios."""
    return {"eventful_bf16_over_fp32": med["eventful_bf16"] / med["eventful_fp32"],
            "eventful_bf16_over_fp32_paired_median": statistics.median(
                b / f for b, f in zip(steady["eventful_bf16"], steady["eventful_fp32"]))}


def end_to_end(name: str, frames_n: int, budget: float, video: str) -> dict:
    dense32, dense16, frames, mean, std = _twins(name, frames_n, video)
    f32, bf16 = torch.float32, torch.bfloat16
    fns = {"dense_fp32": (dense32, f32), "dense_bf16": (dense16, bf16),
           "dense_packed_fp32": (runner.PackedDense(dense32), f32),
           "dense_packed_bf16": (runner.PackedDense(dense16), bf16),
           "eventful_fp32": (convert(dense32, budget), f32), "eventful_bf16": (convert(dense16, budget), bf16)}
    fields, steady = measure(fns, frames, mean, std)
    med = fields["median_ms"]
    return {
        **case_fields(name, dense32, frames_n, budget, video), **fields,
        "speedup_bf16_vs_dense_bf16": med["dense_bf16"] / med["eventful_bf16"],
        "speedup_bf16_vs_dense_packed_bf16": med["dense_packed_bf16"] / med["eventful_bf16"],
        "speedup_fp32_vs_dense_fp32": med["dense_fp32"] / med["eventful_fp32"],
        "speedup_fp32_vs_dense_packed_fp32": med["dense_packed_fp32"] / med["eventful_fp32"],
        **_bf16_over_fp32(steady, med),
        "gflops_eventful": 2 * fns["eventful_bf16"][0].macs_last_frame() / 1e9,
    }


def eventful_pair(name: str, frames_n: int, budget: float, video: str) -> dict:
    """The eventful model in float32 and in bf16 only (a dense 1024-px SAM frame in PyTorch's bf16 kernels takes
    minutes here), interleaved frame by frame, the order alternating."""
    dense32, dense16, frames, mean, std = _twins(name, frames_n, video)
    fns = {"eventful_fp32": (convert(dense32, budget), torch.float32),
           "eventful_bf16": (convert(dense16, budget), torch.bfloat16)}
    with torch.no_grad():
        ms, _ = _interleaved(fns, frames, mean, std)
    steady = {k: v[1:] for k, v in ms.items()}
    med = {k: statistics.median(v) for k, v in steady.items()}
    return {"model": name, "frames": frames_n, "tokens": runner.token_count(dense32), "budget": budget,
            "median_ms": med, "ms": ms, **_bf16_over_fp32(steady, med)}


def linear_ops(rounds: int) -> list:
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for m in (49, 197):
        for k, n in LINEAR_SHAPES:
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g) / k ** 0.5
            b = torch.randn(n, generator=g)
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            packed16 = ops.linear_bf16_pack(wb)
            impls = {"linear_bf16": lambda: ops.linear_bf16(xb, packed16, bb, n),
                     "torch_bf16": lambda: F.linear(xb, wb, bb)}
            if packing_enabled():
                packed32 = torch.ops.mkldnn._reorder_linear_weight(w)
                impls["onednn_packed_fp32"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed32, b, "none",
                                                                                          [], "")
            times = {name: [] for name in impls}
            for fn in impls.values():
                fn()
            for _ in range(rounds):
                for name, fn in impls.items():
                    times[name].append(_ms(fn))
            gflop = 2 * m * k * n / 1e9
            med = {name: statistics.median(v) for name, v in times.items()}
            rows_out.append({"rows": m, "in": k, "out": n, "median_ms": med,
                             "gflops_per_s": {name: gflop / (v / 1e3) for name, v in med.items()}})
    return rows_out


def render(data: dict) -> str:
    e = data["end_to_end"]
    med = e["median_ms"]
    out = [f"{data['date']}, {data['cpu']}, {data['threads']} threads, torch {data['torch']}, bf16 linears: "
           f"`{data['bf16_kernel']}`; {e['model']} r = {e['tokens_selected']} of {e['tokens']} tokens, "
           f"{e['frames']} frames of {e['video']}, the six models interleaved frame by frame; `{data['command']}`."
           + (" **Noisy**: " + "; ".join(e["noisy_reasons"]) + "." if e["noisy_reasons"] else ""), "",
           "| dtype | dense timm ms | dense packed ms | eventful ms | vs dense timm | vs dense packed | "
           "deviation from dense fp32 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for dt in ("fp32", "bf16"):
        ev = med[f"eventful_{dt}"]
        out.append(f"| {dt} | {med[f'dense_{dt}']:.1f} | {med[f'dense_packed_{dt}']:.1f} | {ev:.1f} | "
                   f"{med[f'dense_{dt}'] / ev:.2f}x | {med[f'dense_packed_{dt}'] / ev:.2f}x | "
                   f"{e['rel_deviation_last_frame_vs_dense_fp32'][f'eventful_{dt}']:.1e} |")
    out += ["", f"Eventful bf16 / eventful fp32 frame time: {e['eventful_bf16_over_fp32']:.2f} (ratio of medians), "
            f"{e['eventful_bf16_over_fp32_paired_median']:.2f} (median of per-frame ratios)."]
    sam = data.get("eventful_only")
    if sam:
        m = sam["median_ms"]
        out += ["", f"{sam['model']} ({sam['tokens']} tokens, r = N/4, {sam['frames']} frames, eventful only): "
                f"fp32 {m['eventful_fp32']:.0f} ms, bf16 {m['eventful_bf16']:.0f} ms per steady frame, bf16 / fp32 "
                f"{sam['eventful_bf16_over_fp32']:.2f} (median of per-frame ratios "
                f"{sam['eventful_bf16_over_fp32_paired_median']:.2f})."]
    out += ["",
            "| rows | in -> out | linear_bf16 ms | oneDNN packed fp32 ms | torch bf16 ms | linear_bf16 GFLOP/s | "
            "vs oneDNN fp32 |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["linear"]:
        m = r["median_ms"]
        fp32 = m.get("onednn_packed_fp32")
        vs = "–" if fp32 is None else f"{fp32 / m['linear_bf16']:.2f}x"
        out.append(f"| {r['rows']} | {r['in']} -> {r['out']} | {m['linear_bf16']:.3f} | "
                   f"{'–' if fp32 is None else f'{fp32:.3f}'} | {m['torch_bf16']:.3f} | "
                   f"{r['gflops_per_s']['linear_bf16']:.0f} | "
                   f"{vs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = video_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds of the op comparison")
    p.add_argument("--sam-frames", type=int, default=0,
                   help="also time eventful SAM ViT-B (1024 px) in float32 against bf16 over this many frames")
    a = p.parse_args(argv)
    if a.report:
        return show_report(a.report, render)
    torch.set_num_threads(a.threads)
    data = {"kind": "bf16", "date": datetime.date.today().isoformat(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "bf16_kernel": bf16_kernel(),
            "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "command": "python benchmarks/bench_bf16.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "linear": linear_ops(a.rounds)}
    data["end_to_end"] = end_to_end(a.model, a.frames, a.budget, a.video)
    if a.sam_frames:
        data["eventful_only"] = eventful_pair("samvit_base_patch16", a.sam_frames, a.budget, a.video)
    return publish(data, a.out, render)


if __name__ == "__main__":
    sys.exit(main())
