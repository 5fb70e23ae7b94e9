"""What the packed weights' fingerprint check costs per frame, on ViT-B (48 gated linears), CPU.

One process, steady-state frames of the eventful model with the check on and off in alternation
(``PackedLinear.check_fingerprint``). Timed inside every frame, where the weights are as cold as in use (the
products read the packed copies): the model's one check of all 48 weights before the frame (``PackedGroup.check``)
plus the 48 packed-weight lookups; the check's cost is the difference of their medians, on minus off. For
comparison the same with a check at every call instead (``--per-call``: no group). Whole frames are timed too; their
difference drowns in their noise.

Usage: ``python benchmarks/bench_weight_check.py [--frames 80] [--budget 0.25] [--threads 2] [--per-call]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from eventful_kernels.models import convert, import_timm
from eventful_kernels.nn.linear import PackedGroup, PackedLinear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--per-call", action="store_true", help="no group: every lookup checks its own weight")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ev = convert(import_timm().create_model("vit_base_patch16_224").eval(), args.budget)
    if args.per_call:
        for block in ev.eventful_blocks():
            block.packed_group = None
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 224, 224, generator=g)
    frames = [base + 0.1 * torch.randn(1, 3, 224, 224, generator=g) for _ in range(args.frames + 2)]

    spent, calls = [0.0], [0]

    def timed(fn, count):
        def wrapper(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            spent[0] += time.perf_counter() - t0
            calls[0] += count
            return out
        return wrapper

    lookup, check = PackedLinear.packed_weight, PackedGroup.check
    PackedLinear.packed_weight, PackedGroup.check = timed(lookup, 1), timed(check, 0)
    results = {True: ([], []), False: ([], [])}  # on/off -> (us per frame in checks and lookups, frame ms)
    try:
        with torch.no_grad():
            ev(frames[0])
            ev(frames[1])
            for i, f in enumerate(frames[2:]):
                on = (i % 4) in (0, 3)  # on off off on: neither setting always follows the other
                PackedLinear.check_fingerprint = on
                spent[0], calls[0] = 0.0, 0
                t0 = time.perf_counter()
                ev(f)
                results[on][1].append(1e3 * (time.perf_counter() - t0))
                results[on][0].append(1e6 * spent[0])
    finally:
        PackedLinear.packed_weight, PackedGroup.check = lookup, check
        PackedLinear.check_fingerprint = True
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in results.items()}
    frame = statistics.median(results[True][1] + results[False][1])
    cost = med[True][0] - med[False][0]
    mode = "a check at every lookup" if args.per_call else "one check of all weights before each frame"
    print(f"ViT-B, budget {args.budget}, {args.threads} threads, {calls[0]} packed-weight lookups per frame, "
          f"{mode}, {len(results[True][0])} + {len(results[False][0])} frames")
    print(f"check + lookups per frame (median): check on {med[True][0]:.0f} us, off {med[False][0]:.0f} us")
    print(f"the check: {cost:.0f} us per frame = {100 * cost / (1e3 * frame):.3f} % of a {frame:.1f} ms frame")
    print(f"frames (median): check on {med[True][1]:.1f} ms, off {med[False][1]:.1f} ms")


if __name__ == "__main__":
    main()
