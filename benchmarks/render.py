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
    """One row per (op, N, K): fused and composition medians (min in brackets), speedup of the medians, the copy
    yardstick and the fused op's share of copy bandwidth where the op moves data."""
    head = (f"{data['date']}, {data['device_type'].upper()} ({data['device']}), {data['threads']} threads, "
            f"torch {data['torch']}, {data['dtype']}; `{data['command']}`. Times in ms: median (min) of "
            f"interleaved rounds.")
    unchecked = any("fused_unchecked" in r["times"] for r in data["results"])
    cols = ["op", "N", "K", "fused", "composition", "speedup"]
    if unchecked:
        cols += ["fused, no index check"]
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
        row.append(cell("copy"))
        row.append(f"{t['copy']['median_ms'] / f:.0%}" if "copy" in t else "–")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def render_file(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    kind = data.get("kind")
    if kind == "ops":
        return ops_table(data)
    if kind == "gpu_e2e":
        sys.path.insert(0, HERE)
        from bench_gpu import render

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
