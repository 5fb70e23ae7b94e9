"""Run a dense timm ViT and its eventful twin over the same video frames; per-frame time, compute, deviation.

Timing is wall time of the model call alone (frames are decoded and normalized beforehand). Frame 0 is the
flush for an eventful run and the warm-up for the dense run; steady-state statistics skip it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..models import EventfulModel, import_timm, load_checkpoint, make_policy, parse_budget
from ..models.macs import DenseMacCounter
from .decode import normalize

MODELS = ("vit_base_patch16_224", "vit_small_patch16_224", "samvit_base_patch16")


@dataclass
class Run:
    """Per-frame measurements of one pass over the frames."""

    label: str
    ms: List[float] = field(default_factory=list)
    gflops: List[float] = field(default_factory=list)
    budget: List[str] = field(default_factory=list)
    rel_error: List[float] = field(default_factory=list)
    top1_agree: List[float] = field(default_factory=list)
    outputs: List[torch.Tensor] = field(default_factory=list, repr=False)

    def steady(self, values: Sequence[float]) -> List[float]:
        return list(values[1:]) if len(values) > 1 else list(values)

    def summary(self) -> Dict[str, float]:
        ms, gf = self.steady(self.ms), self.steady(self.gflops)
        out = {
            "ms_median": statistics.median(ms),
            "ms_min": min(ms),
            "ms_mean": statistics.fmean(ms),
            "gflops_mean": statistics.fmean(gf),
        }
        if self.rel_error:
            out["rel_error_mean"] = statistics.fmean(self.steady(self.rel_error))
            out["rel_error_max"] = max(self.steady(self.rel_error))
        if self.top1_agree:
            out["top1_agreement"] = statistics.fmean(self.steady(self.top1_agree))
        return out

    def to_json(self) -> Dict:
        d = {"label": self.label, "ms_per_frame": self.ms, "gflops_per_frame": self.gflops}
        if self.budget:
            d["budget_per_frame"] = self.budget
        if self.rel_error:
            d["rel_error_per_frame"] = self.rel_error
        if self.top1_agree:
            d["top1_agreement_per_frame"] = self.top1_agree
        d.update(self.summary())
        return d


def is_hf(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face (transformers) model."""
    return type(model).__module__.startswith("transformers.")


def create_model(name: str, seed: int = 0, checkpoint: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """A timm model by name, randomly initialized with ``seed`` (no downloads), or loaded from ``checkpoint``;
    ``hf:<spec>`` names a Hugging Face encoder (:func:`eventful_kernels.models.hf_create.create_model`, ``kwargs``
    override its config)."""
    if name.startswith("hf:"):
        from ..models.hf_create import create_model as create_hf

        return create_hf(name[3:], seed, checkpoint, **kwargs)
    timm = import_timm()
    if name.startswith("samvit") and "global_pool" not in kwargs:
        kwargs["global_pool"] = ""  # SAM image encoder output: the neck feature map [B, C, H/16, W/16], not pooled
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def input_spec(model: torch.nn.Module):
    """(image size, mean, std) the model expects, from its timm pretrained config (or its Hugging Face config)."""
    if is_hf(model):
        from ..models.hf_create import input_spec as hf_input_spec

        return hf_input_spec(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = img_size[-1] if isinstance(img_size, (tuple, list)) else img_size
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return int(size), tuple(mean), tuple(std)


def _timed(fn, x):
    t0 = time.perf_counter()
    y = fn(x)
    if primary_output(y).is_cuda:
        torch.cuda.synchronize()
    return y, (time.perf_counter() - t0) * 1e3


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_dense(model, frames: torch.Tensor, mean, std, tick: Callable[[], None] = lambda: None,
              warmup: int = 0) -> Tuple[Run, int]:
    """Dense timm model over ``frames [T,3,H,W]`` uint8, one frame (B = 1) at a time, on the model's device.
    ``warmup`` untimed frames run first (the first frames of a fresh process also grow the heap: dense SAM at
    1024 px ran ~10.6 s per frame for its first frames and ~7 s once warm). Returns (run, tokens per block)."""
    device = _device(model)
    with torch.no_grad():
        for frame in frames[:warmup]:
            model(normalize(frame[None], mean, std).to(device))
    counter = DenseMacCounter(model)
    run = Run("dense")
    try:
        for frame in frames:
            _dense_step(model, counter, normalize(frame[None], mean, std).to(device), run)
            tick()
    finally:
        counter.remove()
    return run, counter.n_tokens


@torch.no_grad()
def _dense_step(model, counter: DenseMacCounter, x: torch.Tensor, run: Run) -> None:
    with counter.counting():
        y, ms = _timed(model, x)
    run.ms.append(ms)
    run.gflops.append(2 * counter.macs / 1e9)
    run.outputs.append(y)


def _eventful_step(ev: EventfulModel, x: torch.Tensor, run: Run, dense_out: Optional[torch.Tensor]) -> None:
    y, ms = _timed(ev, x)
    run.ms.append(ms)
    run.gflops.append(2 * ev.macs_last_frame() / 1e9)
    if dense_out is not None:
        _deviation(run, y, dense_out)


def run_lockstep(model, ev: EventfulModel, frames: torch.Tensor, mean, std, budget, label: str = "",
                 tick: Callable[[], None] = lambda: None) -> Tuple[Run, Run, int]:
    """Dense and eventful (at ``budget``, from a fresh state) on each frame in turn, so that both see the same
    machine conditions (fairer timing on a shared machine). Returns (dense run, eventful run, tokens per block)."""
    device = _device(model)
    counter = DenseMacCounter(model)
    dense, run = Run("dense"), Run(label)
    ev.reset()
    ev.set_budget(make_policy(budget))
    try:
        for frame in frames:
            x = normalize(frame[None], mean, std).to(device)
            _dense_step(model, counter, x, dense)
            _eventful_step(ev, x, run, dense.outputs[-1])
            run.budget.append(str(budget))
            dense.outputs[-1] = None  # the deviation is recorded; do not keep every output
            tick()
    finally:
        counter.remove()
    return dense, run, counter.n_tokens


def primary_output(out):
    """The tensor a run compares: the output itself, or ``last_hidden_state`` of a Hugging Face model output."""
    return out if isinstance(out, torch.Tensor) else out["last_hidden_state"]


def _deviation(run: Run, y, ref) -> None:
    y, ref = primary_output(y), primary_output(ref)
    run.rel_error.append(float((y - ref).norm() / ref.norm().clamp_min(1e-30)))
    if y.dim() == 2:  # classifier logits: does the top-1 class agree with the dense model?
        run.top1_agree.append(float((y.argmax(-1) == ref.argmax(-1)).float().mean()))


def run_eventful(
    ev: EventfulModel,
    frames: torch.Tensor,
    mean,
    std,
    schedule: Dict[int, object],
    dense: Optional[Run] = None,
    label: str = "",
    tick: Callable[[], None] = lambda: None,
) -> Run:
    """Eventful model over ``frames`` from a fresh state; ``schedule`` maps frame index -> budget set there."""
    ev.reset()
    run = Run(label)
    current = None
    device = _device(ev)
    for t, frame in enumerate(frames):
        if t in schedule:
            current = schedule[t]
            ev.set_budget(make_policy(current))
        x = normalize(frame[None], mean, std).to(device)
        _eventful_step(ev, x, run, dense.outputs[t] if dense is not None else None)
        run.budget.append(str(current))
        tick()
    return run


def parse_schedule(text: str) -> Dict[int, object]:
    """``"0:1.0,10:0.25"`` -> {0: 1.0, 10: 0.25}; budgets as in :func:`parse_budget`; frame 0 must be set."""
    sched = {}
    for part in text.split(","):
        frame, _, budget = part.partition(":")
        if not budget:
            raise ValueError(f"schedule: entry {part!r} is not FRAME:BUDGET")
        sched[int(frame)] = parse_budget(budget)
    if 0 not in sched:
        raise ValueError("schedule: the budget at frame 0 must be given (e.g. '0:1.0,10:0.25')")
    return dict(sorted(sched.items()))


def tokens_for(budget, n_tokens: int) -> int:
    """Tokens re-processed per block for a top-k budget."""
    return make_policy(budget).k(n_tokens)
