"""PNG plots of a video run (matplotlib, Agg backend): per-frame time/compute, speedup vs ideal, schedule."""
from __future__ import annotations

import os
from typing import Dict, List


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_frame(result: Dict, path: str) -> None:
    """Two panels over frame index: wall time per frame (ms) and GFLOPs per frame, dense and each budget."""
    plt = _plt()
    fig, (ax_t, ax_c) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    runs = [result["dense"]] + result["budgets"]
    for run in runs:
        style = "k--" if run["label"] == "dense" else "-"
        ax_t.plot(run["ms_per_frame"], style, label=run["label"])
        ax_c.plot(run["gflops_per_frame"], style, label=run["label"])
    ax_t.set_ylabel("ms / frame")
    ax_t.set_ylim(bottom=0)
    ax_c.set_ylabel("GFLOPs / frame")
    ax_c.set_ylim(bottom=0)
    ax_c.set_xlabel("frame (0 = flush / warm-up)")
    ax_t.set_title(f"{result['model']}, {result['threads']} threads, backend {result['backend']}")
    ax_t.legend(fontsize=8)
    ax_t.grid(alpha=0.3)
    ax_c.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup(result: Dict, path: str) -> None:
    """Measured speedup vs the ideal one (dense GFLOPs / eventful GFLOPs) per budget, and deviation from dense."""
    plt = _plt()
    budgets: List[Dict] = result["budgets"]
    labels = [b["label"] for b in budgets]
    xs = range(len(budgets))
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.5))
    w = 0.38
    ideal = ax_s.bar([x - w / 2 for x in xs], [b["ideal_speedup"] for b in budgets], w, label="ideal (GFLOP ratio)")
    meas = ax_s.bar([x + w / 2 for x in xs], [b["speedup"] for b in budgets], w, label="measured")
    ax_s.bar_label(ideal, fmt="%.2f", fontsize=7)
    ax_s.bar_label(meas, fmt="%.2f", fontsize=7)
    ax_s.axhline(1.0, color="k", lw=0.8)
    ax_s.set_xticks(list(xs), labels, rotation=20)
    ax_s.set_ylabel("speedup vs dense timm (steady state)")
    ax_s.legend()
    ax_s.grid(axis="y", alpha=0.3)
    ax_e.plot(list(xs), [b.get("rel_error_mean", 0.0) for b in budgets], "o-")
    ax_e.set_xticks(list(xs), labels, rotation=20)
    ax_e.set_ylabel("relative L2 deviation of output vs dense")
    ax_e.grid(alpha=0.3)
    fig.suptitle(f"{result['model']}: {result['tokens']} tokens/block, {result['frames']} frames")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def schedule(result: Dict, path: str) -> None:
    """Budget changes mid-video: per-frame time and GFLOPs with the budget switches marked."""
    plt = _plt()
    run = result["schedule"]
    fig, (ax_t, ax_c) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax_t.plot(run["ms_per_frame"], label="eventful")
    ax_t.plot(result["dense"]["ms_per_frame"], "k--", label="dense")
    ax_c.plot(run["gflops_per_frame"], label="eventful")
    ax_c.plot(result["dense"]["gflops_per_frame"], "k--", label="dense")
    for frame, budget in run["changes"].items():
        for ax in (ax_t, ax_c):
            ax.axvline(int(frame), color="r", alpha=0.4)
        ax_t.annotate(f"r={budget}", (int(frame), ax_t.get_ylim()[1]), fontsize=8, va="top")
    ax_t.set_ylabel("ms / frame")
    ax_c.set_ylabel("GFLOPs / frame")
    ax_c.set_xlabel("frame")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: Dict, out_dir: str) -> List[str]:
    paths = [os.path.join(out_dir, "per_frame.png"), os.path.join(out_dir, "speedup.png")]
    per_frame(result, paths[0])
    speedup(result, paths[1])
    if result.get("schedule"):
        paths.append(os.path.join(out_dir, "schedule.png"))
        schedule(result, paths[-1])
    return paths
