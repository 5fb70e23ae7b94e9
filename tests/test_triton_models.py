"""Converted models (timm ViT and SAM, Hugging Face encoders; fp32/bf16/fp16; top-k and threshold budgets; both gate
placements; the published K/V pooling and 16-bit A·V) run on the Triton kernels as they will on a GPU, here through
the Triton interpreter on CPU tensors, and equal the same models on the C++ kernels frame by frame. The Triton
kernels replace the CPU kernels of torch.ops.eventful in a process of its own (tests/triton_models.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

# fp32: the two backends add the same products in another order (~1e-7 relative over the frames seen); 16-bit: both
# round once from float32, so they may differ where an accumulation-order difference flips a rounding: well below
# one bf16 ulp (2^-7 = 7.8e-3) in relative L2.
TOL = {"fp32": 1e-5, "16bit": 7.8e-3}
ATTENTION_OPS = {"scatter_rows_", "qk_update_", "av_delta_update_"}


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_models.py")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("case", ["vit", "vit-threshold", "vit-before-norm", "vit-bf16", "vit-fp16", "sam",
                                  "sam-threshold", "sam-published", "sam-bf16", "hf-dinov2-registers", "hf-siglip"])
def test_model_on_triton_kernels_equals_cpp(results, case):
    r = results[case]
    tol = TOL["16bit" if case.endswith(("bf16", "fp16")) else "fp32"]
    assert len(r["rel_dev"]) == 5 and max(r["rel_dev"]) <= tol, r["rel_dev"]
    served = set(r["served"])
    gate = "token_gate_threshold" if "threshold" in case else "token_gate"
    assert ATTENTION_OPS | {gate} <= served, served  # the steady frames really ran on the Triton kernels
    if case.startswith("sam"):
        assert "gather_rows" in served, served  # the windowed blocks' gathers
