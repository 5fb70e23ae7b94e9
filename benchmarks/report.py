"""Turn a pytest-benchmark JSON from bench_ops.py into a markdown table of speedups (median times).

For the column ops a second table compares bandwidths: a column gather/scatter of K random columns must move every
64-byte line that holds a selected column, not just the K elements, so the bytes that must move are the touched lines
(expected fraction ``1 - C(N-16, K) / C(N, K)`` of each float32 row) plus the K-column side; the copy moves the
K-column side twice (read + write).
"""
import json
import math
import sys
from collections import defaultdict

H, ELEM, LINE = 12, 4, 64  # bench_ops.py: [1, 12, N, N] float32 maps


def touched_fraction(n: int, k: int, per_line: int = LINE // ELEM) -> float:
    """Expected fraction of a row's cache lines holding at least one of k distinct random columns out of n."""
    if k == 0:
        return 0.0
    if n - per_line < k:
        return 1.0
    log_miss = (math.lgamma(n - per_line + 1) - math.lgamma(n - per_line - k + 1)
                - math.lgamma(n + 1) + math.lgamma(n - k + 1))
    return 1.0 - math.exp(log_miss)


def bandwidth_table(rows) -> str:
    out = ["| op | N | K | lines touched | fused GB/s (touched lines) | copy GB/s | fused / copy bandwidth |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (op, n, k), t in rows.items():
        f, cp = t.get("fused"), t.get("copy")
        if op not in ("gather_cols", "scatter_cols_") or not f or not cp:
            continue
        frac = touched_fraction(n, k)
        side = H * n * k * ELEM
        must = H * n * n * ELEM * frac * (1 if op == "gather_cols" else 2) + side  # scatter: read + write lines
        fused_bw, copy_bw = must / (f * 1e-3) / 1e9, 2 * side / (cp * 1e-3) / 1e9
        out.append(f"| {op} | {n} | {k} | {frac:.0%} | {fused_bw:.1f} | {copy_bw:.1f} | {fused_bw / copy_bw:.2f} |")
    return "\n".join(out)


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
    bw = bandwidth_table(rows)
    if bw.count("\n") > 1:
        out += ["", bw]
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
