#!/usr/bin/env python
"""Check the CUDA gates on this GPU against the reference, in one launch (fused) and in three (split).

Each path is forced (``EVENTFUL_CUDA_GATE=fused`` / ``split``), whatever the cost model would pick for the shape.

For each gate (token_gate, token_gate_threshold, token_delta_gate), model-sized shapes (ViT-B at batch 1 and 8,
SAM ViT-B's 4096 tokens, a narrow D) and float32 / float16 / bfloat16, with integer-valued c and ref in [-4, 4]:
every score is then an exact float32 value whatever the summation order, so index, count, c_sel, e_sel and the
refreshed ref must equal the reference's bit for bit, ties included. One line per failure; a few seconds on a GPU.

    python tools/check_gates.py     # exit 0: both paths pass; 1: the fused gate fails; 2: only the split one fails
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eventful_kernels import reference as R  # noqa: E402

SHAPES = [(1, 197, 768, 49), (8, 197, 768, 24), (1, 4096, 768, 256), (3, 1000, 16, 333)]  # B, N, D, k
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENV = "EVENTFUL_CUDA_GATE"


def _calls(k: int):
    """(name, call(module, c, ref)) per gate; the threshold sits at a score many tokens share (ties at the edge)."""
    return [
        ("token_gate", lambda m, c, ref: m.token_gate(c, ref, k)),
        ("token_gate_threshold", lambda m, c, ref: m.token_gate_threshold(c, ref, 12.0, k)),
        ("token_delta_gate", lambda m, c, ref: m.token_delta_gate(c, ref, k)),
    ]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def check(ops, device: str, shapes=SHAPES, dtypes=DTYPES) -> List[str]:
    """Failures of ``ops`` (a module with the gates' signatures) against the reference; empty if none."""
    failures = []
    for b, n, d, k in shapes:
        g = torch.Generator().manual_seed(n * 31 + d)
        for dtype in dtypes:
            c = torch.randint(-4, 5, (b, n, d), generator=g).to(dtype).to(device)
            base = torch.randint(-4, 5, (b, n, d), generator=g).to(dtype).to(device)
            base[:, ::3] = c[:, ::3]  # a third of the tokens score exactly 0: ties below the selection
            for name, call in _calls(k):
                got_ref, want_ref = base.clone(), base.clone()
                try:
                    got = call(ops, c, got_ref)
                except Exception as exc:  # report the failure and go on with the other cases
                    failures.append(f"{name} B={b} N={n} D={d} k={k} {dtype}: {type(exc).__name__}: {exc}")
                    continue
                want = call(R, c, want_ref)
                bad = [i for i, (x, y) in enumerate(zip(got, want)) if not _same(x, y)]
                if not _same(got_ref, want_ref):
                    bad.append("ref")
                if bad:
                    failures.append(f"{name} B={b} N={n} D={d} k={k} {dtype}: outputs {bad} differ from the reference")
    return failures


def run_paths(ops, device: str, log: Callable[[str], None] = print, **kwargs) -> int:
    """Checks the fused path and the split one; returns the exit status described above."""
    status = 0
    for path, code in (("fused", 1), ("split", 2)):
        with mock.patch.dict(os.environ, {ENV: path}):
            failures = check(ops, device, **kwargs)
        for f in failures:
            log(f"FAIL [{path}] {f}")
        log(f"gates [{path}]: {'FAILED' if failures else 'passed'}")
        if failures and not status:
            status = code
    return status


def main() -> int:
    if not torch.cuda.is_available():
        print("check_gates: no CUDA device")
        return 3
    from eventful_kernels import ops

    return run_paths(ops, "cuda")


if __name__ == "__main__":
    sys.exit(main())
