"""Load test of the Ray serving layer on this machine: N streams x M frames of the sample videos through R replicas.

    python benchmarks/bench_serve.py [--streams 8] [--frames 12] [--replicas 2] [--model vit_tiny_patch16_224]
                                     [--budget N/4] [--max-batch 4] [--max-wait-ms 100] [--max-seconds 120]
                                     [--out results/serve.json]

A local Ray (``num_cpus`` = replicas, loopback address only) runs ``--replicas`` actors, each owning the model
(random weights, seeded; one thread each). Stream ``i`` plays ``bigbuckbunny`` (even i) or ``bikes`` (odd i) from
frame ``(i // 2) * M`` on, fitted to the model's input size. Every stream sends its frames one at a time (closed
loop: the next frame after the previous answer), all streams concurrently. Two modes, each on its own replicas:
``eventful`` (the converted model at ``--budget``) and ``dense`` (the timm model served the same way, stateless),
interleaved: ``--rounds`` chunks of every stream's frames, the modes alternating chunk by chunk, only one mode
running at a time. Per mode: frames/s (frames over the summed wall time of its chunks), latency per frame as the
client sees it (p50/p99, all frames and steady frames only), frames by the batch size they ran in, streams per
replica. Afterwards
every answer is compared with a single-process run of the same stream (its own model, one stream per model): the
largest absolute difference is reported and must stay below ``--tolerance``.
Bounded: N x M requests per mode, and a stream stops sending once ``--max-seconds`` have passed since the first
chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on the loopback address only

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eventful_kernels.models import convert  # noqa: E402
from eventful_kernels.video.budgets import parse_budget  # noqa: E402
from eventful_kernels.video import runner  # noqa: E402
from eventful_kernels.video.decode import normalize, read_frames, sample_video  # noqa: E402


def stream_frames(streams: int, frames: int, size: int, mean, std) -> dict:
    """``{stream id: [M, 3, size, size] float}`` cut from the two sample videos."""
    need = {"bigbuckbunny": 0, "bikes": 0}
    for i in range(streams):
        name = "bigbuckbunny" if i % 2 == 0 else "bikes"
        need[name] = max(need[name], (i // 2 + 1) * frames)
    decoded = {name: read_frames(sample_video(name), size, max_frames=n) for name, n in need.items() if n}
    out = {}
    for i in range(streams):
        name = "bigbuckbunny" if i % 2 == 0 else "bikes"
        clip = decoded[name][(i // 2) * frames : (i // 2 + 1) * frames]
        if clip.shape[0] < frames:
            raise ValueError(f"--frames {frames}: {name}.mp4 has too few frames for {streams} streams")
        out[f"{name}-{i}"] = normalize(clip, mean, std)
    return out


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_chunk(server, clips: dict, start: int, stop: int, deadline: float):
    """Frames ``start:stop`` of every stream, all streams concurrently -> ({stream: [(result, ms)]}, wall s)."""
    async def one(stream, frames):
        out = []
        for f in frames:
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            r = await server.frame_async(stream, f)
            out.append((r, (time.perf_counter() - t0) * 1e3))
        return out

    async def main():
        return await asyncio.gather(*[one(s, c[start:stop]) for s, c in clips.items()])

    t0 = time.perf_counter()
    answers = dict(zip(clips, asyncio.run(main())))
    return answers, time.perf_counter() - t0


def summarize(answers: dict, wall: float, placement: dict) -> dict:
    lat = [ms for a in answers.values() for _, ms in a]
    steady = [ms for a in answers.values() for r, ms in a if r.phase in ("steady", "dense") and r.frame > 0]
    first = [ms for a in answers.values() for r, ms in a if r.frame == 0]
    batches: dict = {}
    for a in answers.values():
        for r, _ in a:
            batches[r.batch] = batches.get(r.batch, 0) + 1  # frames served in batches of each size
    per_replica: dict = {}
    for name in placement.values():
        per_replica[name] = per_replica.get(name, 0) + 1
    return {
        "frames": len(lat),
        "wall_s": wall,
        "frames_per_s": len(lat) / wall,
        "latency_ms_p50": percentile(lat, 50),
        "latency_ms_p99": percentile(lat, 99),
        "steady_frames": len(steady),
        "steady_latency_ms_p50": percentile(steady, 50) if steady else None,
        "steady_latency_ms_p99": percentile(steady, 99) if steady else None,
        "first_frame_latency_ms_p50": percentile(first, 50) if first else None,
        "latency_ms_mean": statistics.fmean(lat),
        "frames_by_batch_size": dict(sorted(batches.items())),
        "streams_per_replica": per_replica,
    }


def check(answers: dict, clips: dict, make_model, budget, dense: bool) -> float:
    """Largest |served - single-process| over every answer."""
    worst = 0.0
    for s, got in answers.items():
        model = make_model() if dense else convert(make_model(), budget, strategy="eventful")
        with torch.no_grad():
            for t, (r, _) in enumerate(got):
                assert r.frame == t
                ref = model(clips[s][t][None])[0]
                worst = max(worst, float((r.output - ref).abs().max()))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--budget", default="N/4")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=100.0)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--rounds", type=int, default=3, help="chunks per stream, modes alternating chunk by chunk")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "serve.json"))
    args = p.parse_args(argv)

    import ray

    from eventful_kernels.serve import StreamServer

    torch.set_num_threads(1)
    budget = parse_budget(args.budget)
    make_model = functools.partial(runner.create_model, args.model, seed=0)
    size, mean, std = runner.input_spec(make_model())
    clips = stream_frames(args.streams, args.frames, size, mean, std)
    # Both servers are up at once (2 x replicas actors, one thread each) but only one runs at a time.
    ray.init(num_cpus=2 * args.replicas, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    result = {
        "kind": "serve",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "modes": {},
    }
    modes = ("eventful", "dense")
    servers = {}
    try:
        for mode in modes:
            servers[mode] = StreamServer(make_model, replicas=args.replicas, max_streams=args.streams,
                                         convert_kwargs={"strategy": "eventful"}, max_batch=args.max_batch,
                                         max_wait_ms=args.max_wait_ms, dense=mode == "dense")
        for mode, server in servers.items():  # warm-up: one frame of a stream per replica, then closed
            for s, c in list(clips.items())[: args.replicas]:
                server.open(s, budget)
                server.frame(s, c[0])
                server.close(s)
        placement = {mode: {s: server.open(s, budget) for s in clips} for mode, server in servers.items()}
        answers = {mode: {s: [] for s in clips} for mode in modes}
        walls = dict.fromkeys(modes, 0.0)
        deadline = {mode: time.perf_counter() + args.max_seconds for mode in modes}
        step = max(1, -(-args.frames // args.rounds))
        for start in range(0, args.frames, step):  # the modes interleaved, chunk by chunk
            for mode in modes:
                chunk, wall = run_chunk(servers[mode], clips, start, start + step, deadline[mode])
                walls[mode] += wall
                for s, a in chunk.items():
                    answers[mode][s] += a
        for mode in modes:
            summary = summarize(answers[mode], walls[mode], placement[mode])
            summary["replica_stats"] = servers[mode].stats()
            summary["max_abs_diff_vs_single_process"] = check(answers[mode], clips, make_model, budget,
                                                              mode == "dense")
            result["modes"][mode] = summary
            print(mode, json.dumps(summary), flush=True)
    finally:
        for server in servers.values():
            server.shutdown()
        ray.shutdown()
    ev, de = result["modes"]["eventful"], result["modes"]["dense"]
    result["eventful_vs_dense_throughput"] = ev["frames_per_s"] / de["frames_per_s"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"eventful {ev['frames_per_s']:.1f} frames/s vs dense {de['frames_per_s']:.1f} "
          f"({result['eventful_vs_dense_throughput']:.2f}x); written to {args.out}")
    bad = [m for m, s in result["modes"].items() if not s["max_abs_diff_vs_single_process"] <= args.tolerance]
    if bad:
        print(f"answers differ from the single-process run beyond {args.tolerance}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
