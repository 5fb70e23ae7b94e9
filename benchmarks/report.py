"""Turn a pytest-benchmark JSON from bench_ops.py into a markdown table of speedups (median times)."""
import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    data = json.load(open(path))
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows[(info["op"], info["n"], info["k"])][info["impl"]] = b["stats"]["median"] * 1e3
    threads = data.get("torch_threads", "?")
    out = [
        f"threads = {threads}, times are medians in ms",
        "",
        "| op | N | K | fused ms | composition ms | speedup | copy ms | fused / copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (op, n, k), t in rows.items():
        f, c, cp = t.get("fused"), t.get("composition"), t.get("copy")
        fmt = lambda v: f"{v:.3f}" if v is not None else "–"  # noqa: E731
        speed = f"{c / f:.2f}x" if f and c else "–"
        vs_copy = f"{f / cp:.2f}" if f and cp else "–"
        out.append(f"| {op} | {n} | {k} | {fmt(f)} | {fmt(c)} | {speed} | {fmt(cp)} | {vs_copy} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
