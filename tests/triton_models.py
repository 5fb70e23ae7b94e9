"""Converted models on the Triton kernels, on CPU: every ``torch.ops.eventful`` op's CPU kernel is replaced by the
Triton function (run by the Triton interpreter) in this process, and each case's outputs over a short video are
compared with the same model on the C++ kernels. Run by tests/test_triton_models.py in a process of its own (the
override would reach every later test otherwise). Prints one JSON object: per case the relative L2 deviation of
each frame and the ops the Triton kernels served.

    python tests/triton_models.py
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_hf  # noqa: E402
import tiny_timm  # noqa: E402
from eventful_kernels.models import convert  # noqa: E402
from eventful_kernels.nn.policies import Threshold  # noqa: E402
from eventful_kernels.triton._register import KERNELS  # noqa: E402

FRAMES = 5
# name: (model factory, frame size, dtype, convert keywords); the global blocks run the eventful attention ops.
CASES = {
    "vit": (tiny_timm.tiny_vit, 32, torch.float32, dict(policy=0.5)),
    "vit-threshold": (tiny_timm.tiny_vit, 32, torch.float32, dict(policy=Threshold(0.3, capacity=8))),
    "vit-before-norm": (tiny_timm.tiny_vit, 32, torch.float32, dict(policy=0.5, gate_placement="before_norm")),
    "vit-bf16": (tiny_timm.tiny_vit, 32, torch.bfloat16, dict(policy=0.5)),
    "vit-fp16": (tiny_timm.tiny_vit, 32, torch.float16, dict(policy=0.5)),
    "sam": (tiny_timm.tiny_sam, 64, torch.float32, dict(policy=0.5)),
    "sam-threshold": (tiny_timm.tiny_sam, 64, torch.float32, dict(policy=Threshold(0.3, capacity=20))),
    "sam-published": (tiny_timm.tiny_sam, 64, torch.float32, dict(policy=0.5, kv_pool=2, av_dtype=torch.float16)),
    "sam-bf16": (tiny_timm.tiny_sam, 64, torch.bfloat16, dict(policy=0.5)),
    "hf-dinov2-registers": (tiny_hf.tiny_dinov2_registers, tiny_hf.SIZE, torch.float32, dict(policy=0.5)),
    "hf-siglip": (tiny_hf.tiny_siglip, tiny_hf.SIZE, torch.float32, dict(policy=0.5)),
}


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (getattr(out, "last_hidden_state", None), getattr(out, "pooler_output", None)) if t is not None]


def run(name: str) -> list:
    make, size, dtype, kwargs = CASES[name]
    kwargs = dict(kwargs)
    model = convert(make().to(dtype), kwargs.pop("policy"), strategy="eventful", **kwargs)
    frames = tiny_timm.video(FRAMES, size, batch=2).to(dtype)
    return [[t.float() for t in _tensors(model(x))] for x in frames]


def main() -> None:
    warnings.simplefilter("ignore")  # the kernel override warns once per op
    want = {name: run(name) for name in CASES}
    served = collections.Counter()

    def counted(op, fn):
        def kernel(*args, **kwargs):
            served[op] += 1
            return fn(*args, **kwargs)
        return kernel

    lib = torch.library.Library("eventful", "IMPL")
    for op, fn in KERNELS.items():
        lib.impl(op, counted(op, fn), "CPU", allow_override=True)
    result = {}
    for name in CASES:
        served.clear()
        got = run(name)
        result[name] = {
            "rel_dev": [max(((g - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(gs, ws))
                        for gs, ws in zip(got, want[name])],
            "served": dict(served),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
