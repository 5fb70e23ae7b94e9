"""The table and verdict ``eventful-video`` prints from its ``result.json`` dict."""
from __future__ import annotations

import os
from typing import Dict, List

from .overlay import gflops_text
from .timing import like_for_like

PLACEMENTS = {"after_norm": "gates after the LayerNorms", "before_norm": "gates before the LayerNorms"}


def table(result: Dict) -> str:
    """The printed table: dense rows, one row per budget, the schedule row; ``!`` marks a value that made the
    run noisy."""
    d = result["dense"]
    dp = result.get("dense_packed")
    check = result.get("noise_check", {})
    spreads = check.get("dense_spread", {})
    max_eff, max_spread = check.get("max_efficiency", float("inf")), check.get("max_spread", float("inf"))
    eventful = list(result["budgets"]) + ([result["schedule"]] if result.get("schedule") else [])
    has_top1 = any("top1_agreement" in s for s in eventful)
    cols = ["run", "tokens", "attention", "ms/frame", "GFLOPs/frame", "speedup"]
    cols += ["vs packed"] if dp is not None else []
    cols += ["ideal", "eff."]
    cols += ["eff. vs packed"] if dp is not None else []
    cols += ["rel. dev."] + (["top-1 agree"] if has_top1 else [])

    def ms(run: Dict, label: str) -> str:
        return f"{run['ms_median']:.1f}" + ("!" if spreads.get(label, 0.0) > max_spread else "")

    def row(**cells) -> List[str]:
        return [cells.get(c, "") for c in cols]

    dense = "dense " + result.get("framework", "timm")
    rows = [row(**{"run": dense, "tokens": str(result["tokens"]), "ms/frame": ms(d, dense),
                   "GFLOPs/frame": gflops_text(d["gflops_mean"]), "speedup": "1.00x", "ideal": "1.00x"})]
    if dp is not None:
        rows.append(row(**{"run": f"{dense}, packed linears", "tokens": str(result["tokens"]),
                           "ms/frame": ms(dp, f"{dense}, packed linears"),
                           "GFLOPs/frame": gflops_text(dp["gflops_mean"]),
                           "speedup": f"{d['ms_median'] / dp['ms_median']:.2f}x", "vs packed": "1.00x",
                           "ideal": "1.00x"}))
    for s in eventful:
        if "changes" in s:  # the schedule row
            name = "schedule " + ",".join(f"{k}:{v}" for k, v in s["changes"].items())
            tokens = f"~{s['tokens_mean']:.1f}"
        elif s["policy"].startswith("Threshold"):
            name, tokens = s["label"], f"~{s['tokens_mean']:.1f}"
        else:
            name, tokens = s["label"], str(s["tokens"])
        flag = "!" if like_for_like(s) > max_eff else ""
        cells = {"run": name, "tokens": tokens, "attention": s.get("attention", ""),
                 "ms/frame": f"{s['ms_median']:.1f}", "GFLOPs/frame": gflops_text(s["gflops_mean"]),
                 "speedup": f"{s['speedup']:.2f}x", "ideal": f"{s['ideal_speedup']:.2f}x",
                 "eff.": f"{s['efficiency']:.2f}" + ("" if dp else flag), "rel. dev.": f"{s['rel_error_mean']:.2e}"}
        if dp is not None:
            cells["vs packed"] = f"{s['speedup_vs_dense_packed']:.2f}x"
            cells["eff. vs packed"] = f"{s['efficiency_vs_dense_packed']:.2f}" + flag
        if "top1_agreement" in s:
            cells["top-1 agree"] = f"{s['top1_agreement']:.2f}"
        rows.append(row(**cells))
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(result: Dict) -> str:
    """The lines printed around the table."""
    check = result["noise_check"]
    head = (f"{result['model']} @ {result['input_size']}px, {result['tokens']} tokens/block, {result['frames']} frames "
            f"of {os.path.basename(result['video'])}; {result['device']} {result['dtype']}"
            f"{' (dynamic int8 linears)' if result.get('int8') else ''}, {result['threads']} "
            f"threads, backend={result['backend']}, attention strategy {result['strategy']}, "
            f"{PLACEMENTS[result['gate_placement']]} ({result['gate_placement']})")
    mode = f"timing {result['mode_description']}; ms = median of the steady-state frames (frame 0 left out)"
    spreads = ", ".join(f"{k} {v:.0%}" for k, v in check["dense_spread"].items())
    if result["noisy"]:
        verdict = ("NOISY RUN, do not trust these timings (rerun on an idle machine): " + "; ".join(check["reasons"])
                   + "  [! marks the values]")
    else:
        verdict = (f"timing check passed: dense frame-time spread {spreads} (limit {check['max_spread']:.0%}, "
                   f"(p90 - p10) / median); every efficiency {check['efficiency']} <= {check['max_efficiency']:g}")
    return "\n".join([head, mode, table(result), verdict])
