"""Dynamic int8 against float32 on the CPU: the eventful ViT on PyTorch's dynamic int8 linears against the dense
models, interleaved frame by frame.

    python benchmarks/bench_int8.py [--model vit_base_patch16_224] [--frames 20] [--threads 2] [--out FILE.json]

The int8 model is ``eventful_kernels.models.quantize_int8(model)`` (``torch.ao.quantization.quantize_dynamic`` of
its linears): int8 weights, activations quantized per call, everything else float32. Five models see every frame in
turn (the order rotated from frame to frame, so background load hits all alike): dense timm float32, dense timm on
packed float32 linears, dense int8, eventful float32 and eventful int8 (r = N/4 by default, gates after the norms).
Per-frame medians over the steady-state frames (frame 0, the flush, left out; the dense models get two untimed
warm-up frames), ratios of medians, the median of the per-frame ratio eventful int8 / eventful float32, and each
model's relative deviation from dense float32 on the last frame.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_bf16 import case_fields, measure  # noqa: E402
from eventful_kernels.models import convert, quantize_int8  # noqa: E402
from eventful_kernels.video import runner  # noqa: E402
from eventful_kernels.video.decode import read_frames, sample_video  # noqa: E402
from machine import cpu_name, publish, show_report, video_parser  # noqa: E402

MODELS = ("dense_fp32", "dense_packed_fp32", "dense_int8", "eventful_fp32", "eventful_int8")


def end_to_end(name: str, frames_n: int, budget: float, video: str) -> dict:
    dense32 = runner.create_model(name, seed=0)
    dense8 = quantize_int8(dense32)
    size, mean, std = runner.input_spec(dense32)
    frames = read_frames(video if video.endswith(".mp4") else sample_video(video), size, frames_n)
    f32 = torch.float32
    fns = {"dense_fp32": (dense32, f32), "dense_packed_fp32": (runner.PackedDense(dense32), f32),
           "dense_int8": (dense8, f32), "eventful_fp32": (convert(dense32, budget), f32),
           "eventful_int8": (convert(dense8, budget), f32)}
    fields, steady = measure(fns, frames, mean, std)
    med = fields["median_ms"]
    return {
        **case_fields(name, dense32, frames_n, budget, video), **fields,
        "speedup_int8_vs_dense_fp32": med["dense_fp32"] / med["eventful_int8"],
        "speedup_int8_vs_dense_packed_fp32": med["dense_packed_fp32"] / med["eventful_int8"],
        "speedup_int8_vs_dense_int8": med["dense_int8"] / med["eventful_int8"],
        "speedup_fp32_vs_dense_fp32": med["dense_fp32"] / med["eventful_fp32"],
        "eventful_int8_over_fp32": med["eventful_int8"] / med["eventful_fp32"],
        "eventful_int8_over_fp32_paired_median": statistics.median(
            a / b for a, b in zip(steady["eventful_int8"], steady["eventful_fp32"])),
        "gflops_eventful": 2 * fns["eventful_int8"][0].macs_last_frame() / 1e9,
    }


def render(data: dict) -> str:
    e = data["end_to_end"]
    med = e["median_ms"]
    dev = e["rel_deviation_last_frame_vs_dense_fp32"]
    out = [f"{data['date']}, {data['cpu']}, {data['threads']} threads, torch {data['torch']}, quantized engine "
           f"`{data['quantized_engine']}`; {e['model']} r = {e['tokens_selected']} of {e['tokens']} tokens, "
           f"{e['frames']} frames of {e['video']}, the five models interleaved frame by frame; `{data['command']}`."
           + (" **Noisy**: " + "; ".join(e["noisy_reasons"]) + "." if e["noisy_reasons"] else ""), "",
           "| model | ms per frame | eventful int8 faster by | deviation from dense fp32 |",
           "| --- | ---: | ---: | ---: |"]
    names = {"dense_fp32": "dense timm fp32", "dense_packed_fp32": "dense, packed fp32 linears",
             "dense_int8": "dense int8", "eventful_fp32": "eventful fp32", "eventful_int8": "eventful int8"}
    for k, label in names.items():
        faster = "–" if k == "eventful_int8" else f"{med[k] / med['eventful_int8']:.2f}x"
        out.append(f"| {label} | {med[k]:.1f} | {faster} | {dev[k]:.1e} |")
    out += ["", f"Eventful int8 / eventful fp32 frame time: {e['eventful_int8_over_fp32']:.2f} (ratio of medians), "
            f"{e['eventful_int8_over_fp32_paired_median']:.2f} (median of per-frame ratios)."]
    return "\n".join(out)


def main(argv=None) -> int:
    p = video_parser(__doc__.split("\n\n")[0])
    a = p.parse_args(argv)
    if a.report:
        return show_report(a.report, render)
    torch.set_num_threads(a.threads)
    data = {"kind": "int8", "date": datetime.date.today().isoformat(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "quantized_engine": torch.backends.quantized.engine,
            "command": "python benchmarks/bench_int8.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    data["end_to_end"] = end_to_end(a.model, a.frames, a.budget, a.video)
    return publish(data, a.out, render)


if __name__ == "__main__":
    sys.exit(main())
