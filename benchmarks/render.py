"""Render the measurements in benchmarks/results/*.json as markdown tables into benchmarks/README.md.

Each result file ``results/NAME.json`` fills the block between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` in the README (blocks without a file are left as they are):

    python benchmarks/render.py              # rewrite the README's tables from the JSON files
    python benchmarks/render.py --check      # exit 1 if the README is not what the JSON files render to
    python benchmarks/render.py FILE.json    # print one file's table
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
RESULTS = os.path.join(HERE, "results")


def ops_table(data: dict) -> str:
    """One row per (op, N, K): fused and composition medians (min in brackets), speedup of the medians, on a GPU the
    unchecked call, the Triton kernel of an op served by C++ CUDA and a C++ CUDA gate forced into one launch and into
    three, the copy yardstick and the fused op's share of copy bandwidth where the op moves data."""
    head = (f"{data['date']}, {data['device_type'].upper()} ({data['device']}), {data['threads']} threads, "
            f"torch {data['torch']}, {data['dtype']}; `{data['command']}`. Times in ms: median (min) of "
            f"interleaved rounds.")
    unchecked = any("fused_unchecked" in r["times"] for r in data["results"])
    triton = any("triton" in r["times"] for r in data["results"])
    split = any("split" in r["times"] for r in data["results"])
    cols = ["op", "N", "K", "fused", "composition", "speedup"]
    if unchecked:
        cols += ["fused, no index check"]
    if triton:
        cols += ["Triton kernel"]
    if split:
        cols += ["gate in one launch", "gate in three launches"]
    cols += ["copy", "copy / fused bandwidth"]
    out = [head, "", "| " + " | ".join(cols) + " |", "| --- | ---: | ---: |" + " ---: |" * (len(cols) - 3)]
    for r in data["results"]:
        t = r["times"]

        def cell(name):
            return f"{t[name]['median_ms']:.3f} ({t[name]['min_ms']:.3f})" if name in t else "–"

        f, c = t["fused"]["median_ms"], t["composition"]["median_ms"]
        row = [r["op"], str(r["n"]), str(r["k"]), cell("fused"), cell("composition"), f"{c / f:.2f}x"]
        if unchecked:
            row.append(cell("fused_unchecked"))
        if triton:
            row.append(cell("triton"))
        if split:
            row += [cell("one_launch"), cell("split")]
        row.append(cell("copy"))
        row.append(f"{t['copy']['median_ms'] / f:.0%}" if "copy" in t else "–")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def video_table(data: dict) -> str:
    """bench_video.py: per model, dense timm, dense on packed linears and eventful, interleaved frame by frame."""
    head = (f"{data['date']}, CPU ({data.get('processor', '?')}), {data['threads']} threads, torch "
            f"{data['torch_version']}, {data['dtype']}, backend {data['backend']}, {data['mode']}; "
            f"`{data['command']}`. ms: median over the steady-state frames; *ideal*: dense / eventful operation "
            "count; *eff.*: speedup over the packed dense model / ideal.")
    out = [head, "", "| model | tokens | budget | gates | dense timm ms | dense packed ms | eventful ms | speedup "
                     "| vs packed | ideal | eff. | rel. deviation | timing check |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in data["models"]:
        placements = m.get("placements") or {m["gate_placement"]: dict(m, run=m["eventful"])}
        dense = m["dense"]["ms_median"]
        packed = m["dense_packed"]["ms_median"] if "dense_packed" in m else None
        check = "noisy: " + "; ".join(m["noisy_reasons"]) if m["noisy"] else "passed"
        for name, p in placements.items():
            ev = p["run"]["ms_median"]
            out.append(f"| {m['model']} | {m['tokens']} | {m['tokens_selected']} | {name} | {dense:.1f} | "
                       f"{'–' if packed is None else f'{packed:.1f}'} | {ev:.1f} | {dense / ev:.2f}x | "
                       f"{'–' if packed is None else f'{packed / ev:.2f}x'} | {p['ideal_speedup']:.2f}x | "
                       f"{p.get('efficiency_vs_dense_packed', p['efficiency']):.2f} | "
                       f"{p['run']['rel_error_mean']:.1e} | {check} |")
    return "\n".join(out)


def compile_table(data: dict) -> str:
    """bench_compile.py: torch.compile(model) against eager, frames interleaved."""
    med = data["median_ms"]
    return (f"{data['date']}, {data['threads']} threads, torch {data['torch']}, {data['model']} at budget "
            f"{data['budget']} ({data['tokens_selected']} tokens), linears in the graph: {data['graph_linears']}; "
            f"`{data['command']}`.\n\n| eager ms | compiled ms | compiled vs eager | compile s | max abs diff |\n"
            "| ---: | ---: | ---: | ---: | ---: |\n"
            f"| {med['eager']:.1f} | {med['compiled']:.1f} | {data['speedup_compiled_vs_eager']:.2f}x | "
            f"{data['compile_s']:.0f} | {data['max_abs_diff']:.1e} |")


def serve_table(data: dict) -> str:
    """bench_serve.py: streams through Ray replicas, eventful and dense."""
    cfg = data["config"]
    out = [f"{data['date'][:10]}, {data['machine']['cpus']} CPUs, Ray {data['machine']['ray']}, {cfg['model']}, "
           f"{cfg['streams']} streams x {cfg['frames']} frames, {cfg['replicas']} replicas; `{data['command']}`. "
           "Latency per frame (steady frames), every answer checked against a single-process run.", "",
           "| mode | frames/s | p50 ms | p99 ms | frames by batch size | max abs diff vs single process |",
           "| --- | ---: | ---: | ---: | --- | ---: |"]
    for mode, s in data["modes"].items():
        batches = ", ".join(f"{k}: {v}" for k, v in s["frames_by_batch_size"].items())
        out.append(f"| {mode} | {s['frames_per_s']:.2f} | {s['steady_latency_ms_p50']:.0f} | "
                   f"{s['steady_latency_ms_p99']:.0f} | {batches} | {s['max_abs_diff_vs_single_process']:.1e} |")
    return "\n".join(out)


RENDERERS = {"ops": ops_table, "video": video_table, "compile": compile_table, "serve": serve_table}


def render_file(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    kind = data.get("kind")
    if kind in RENDERERS:
        return RENDERERS[kind](data)
    if kind == "gpu_e2e":
        sys.path.insert(0, HERE)
        from bench_gpu import render

        return render(data)
    if kind == "bf16":
        sys.path.insert(0, HERE)
        from bench_bf16 import render

        return render(data)
    if kind == "int8":
        sys.path.insert(0, HERE)
        from bench_int8 import render

        return render(data)
    raise ValueError(f"{path}: unknown result kind {kind!r}")


def render_readme(text: str, results_dir: str = RESULTS) -> str:
    """``text`` with every results block whose JSON file exists re-rendered."""
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)",
                             re.S)
        text = pattern.sub(lambda m: m.group(1) + render_file(path) + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="print this result file's table instead")
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    if a.file:
        print(render_file(a.file))
        return 0
    with open(README) as f:
        old = f.read()
    new = render_readme(old)
    if a.check:
        if new != old:
            print("benchmarks/README.md is out of date: run python benchmarks/render.py")
            return 1
        return 0
    if new != old:
        with open(README, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
