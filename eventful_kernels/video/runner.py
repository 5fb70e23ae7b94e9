"""Run a dense timm ViT and its eventful twin over the same video frames; per-frame time, compute, deviation.

Timing is wall time of the model call alone (frames are decoded and normalized beforehand). Frame 0 is the
flush for an eventful run and the warm-up for the dense run; steady-state statistics skip it. :func:`compare` runs
the dense model(s) and one eventful model per budget interleaved frame by frame (or, for models too big to hold
several eventful states, one after the other).
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..models import EventfulModel, convert, import_timm, load_checkpoint
from ..nn.policies import as_policy
from ..models.macs import DenseMacCounter
from ..nn.linear import PackedConv, PackedGroup, PackedLinear, is_plain_conv
from . import budgets
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
    tokens: List[float] = field(default_factory=list)  # tokens re-processed per block (mean over blocks)
    attention: List[Tuple[str, ...]] = field(default_factory=list)  # each global block's attention mode
    gate_placement: Optional[str] = None  # eventful runs: "after_norm" or "before_norm"

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
        if self.tokens:
            out["tokens_mean"] = statistics.fmean(self.steady(self.tokens))
        return out

    def to_json(self) -> Dict:
        d = {"label": self.label, "ms_per_frame": self.ms, "gflops_per_frame": self.gflops}
        if self.budget:
            d["budget_per_frame"] = self.budget
        if self.rel_error:
            d["rel_error_per_frame"] = self.rel_error
        if self.top1_agree:
            d["top1_agreement_per_frame"] = self.top1_agree
        if self.tokens:
            d["tokens_per_frame"] = self.tokens
        if self.gate_placement is not None:
            d["gate_placement"] = self.gate_placement
        if self.attention:
            d["attention"] = attention_summary(self.attention)
            d["attention_modes"] = list(self.attention[-1])  # each global block, last frame
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


def patch_grid(model: torch.nn.Module) -> Tuple[int, int]:
    """The patch grid ``(rows, cols)`` of a timm ViT / SAM model or a Hugging Face encoder."""
    if is_hf(model):
        cfg = model.config
        side = int(cfg.image_size) // int(cfg.patch_size)
        return side, side
    rows, cols = model.patch_embed.grid_size
    return int(rows), int(cols)


def token_count(model: torch.nn.Module) -> int:
    """Tokens per stream entering the first block: the patch grid plus the class / prefix tokens (SAM, SigLIP:
    none)."""
    rows, cols = patch_grid(model)
    if is_hf(model):
        from ..models.hf import hf_family, hf_pool_geometry

        return rows * cols + hf_pool_geometry(model, hf_family(model))["prefix_tokens"]
    return rows * cols + int(getattr(model, "num_prefix_tokens", 0) or 0)


def block_count(model: torch.nn.Module) -> int:
    """Transformer blocks of a timm model or layers of a Hugging Face encoder."""
    if is_hf(model):
        from ..models.hf import dense_layers

        return len(dense_layers(model))
    return len(model.blocks)


def _timed(fn, x):
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(x)
    if primary_output(y).is_cuda:
        torch.cuda.synchronize()
    return y, (time.perf_counter() - t0) * 1e3


def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def attention_summary(modes_per_frame: Sequence[Sequence[str]]) -> str:
    """One word for the attention modes the global blocks ran over the steady-state frames (frame 0, the flush,
    left out): ``eventful``, ``dense``, ``mixed (eventful 75%, dense 25%)`` (shares of block-frames), or ``-`` (no
    global blocks)."""
    frames = list(modes_per_frame[1:]) or list(modes_per_frame)
    counts = Counter(m for modes in frames for m in modes)
    if not counts:
        return "-"
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return "mixed (" + ", ".join(f"{m} {c / total:.0%}" for m, c in counts.most_common()) + ")"


class PackedDense:
    """The dense model with its plain ``nn.Linear`` layers on prepacked weights and its convs as packed linears
    (:class:`~eventful_kernels.nn.linear.PackedConv`), the same kernels the eventful model uses
    (like :func:`eventful_kernels.nn.linear.packed_linears`, but the packed copies are made once and
    kept from call to call, and their fingerprints are checked once per frame as an eventful model does)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.group = PackedGroup()
        self._runners = []
        for m in model.modules():
            if type(m) is torch.nn.Linear and "forward" not in m.__dict__:
                runner = PackedLinear(m)
            elif is_plain_conv(m):  # the patch embedding and SAM's neck, as the eventful model runs them
                runner = PackedConv(m)
            else:
                continue
            self.group.add(runner)
            self._runners.append((m, runner))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.group.check()
        self.group.active = True
        for m, runner in self._runners:
            m.forward = runner
        try:
            return self.model(x)
        finally:
            self.group.active = False
            for m, _ in self._runners:
                m.__dict__.pop("forward", None)


class _Dense:
    """One dense baseline (plain, or on packed linears) in a comparison."""

    def __init__(self, fn, counter: DenseMacCounter, label: str):
        self.fn, self.counter, self.run = fn, counter, Run(label)

    @torch.no_grad()
    def warm_up(self, x: torch.Tensor, n: int) -> None:
        for _ in range(n):
            self.fn(x)

    @torch.no_grad()
    def step(self, t: int, x: torch.Tensor) -> torch.Tensor:
        with self.counter.counting():
            y, ms = _timed(self.fn, x)
        self.run.ms.append(ms)
        self.run.gflops.append(2 * self.counter.macs / 1e9)
        return y


class _Eventful:
    """One eventful model run from a fresh state, its budget set at the frames of ``schedule``."""

    def __init__(self, ev: EventfulModel, label: str, schedule: Dict[int, object]):
        self.ev, self.schedule = ev, schedule
        self.run = Run(label, gate_placement=ev.eventful_blocks()[0].gate_placement if ev.eventful_blocks() else None)
        self.current = None
        self._hooks: list = []
        self._k: List[int] = []
        self._n: Optional[int] = None

    def _gate_hook(self, module, args, out) -> None:
        self._n = args[0].shape[1]
        self._k.append(out[0].shape[1])  # slots (a trimming threshold: the largest count); no host read

    def start(self) -> None:
        self.ev.reset()
        self._hooks = [b.qkv_gate.register_forward_hook(self._gate_hook) for b in self.ev.eventful_blocks()]

    def finish(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def step(self, t: int, x: torch.Tensor) -> torch.Tensor:
        if t in self.schedule:
            self.current = self.schedule[t]
            self.ev.set_budget(as_policy(budgets.fresh(self.current)))
        self._k = []
        y, ms = _timed(self.ev, x)
        run = self.run
        run.ms.append(ms)
        run.gflops.append(2 * self.ev.macs_last_frame() / 1e9)
        run.budget.append(budgets.budget_text(self.current))
        if self._k:
            run.tokens.append(sum(self._k) / len(self._k))
        else:  # a replayed CUDA graph runs no hooks: the slots the policy asks for
            run.tokens.append(float(budgets.tokens_for(self.current, self._n or 0)))
        run.attention.append(tuple(self.ev.attention_modes()))
        return y


@dataclass
class Comparison:
    """Dense baseline(s) and eventful runs over the same frames. ``mode``: ``"interleaved"`` or
    ``"sequential"``."""

    dense: Run
    dense_packed: Optional[Run]
    runs: List[Run]
    schedule: Optional[Run]
    n_tokens: int
    mode: str


MODES = {
    "interleaved": "interleaved: each frame runs through every model in turn (order rotated from frame to frame), "
    "one eventful model per budget with its own state, so background load hits all runs alike",
    "sequential": "sequential: all frames through the dense model(s), then through the eventful model at each "
    "budget in turn (one eventful model at a time; the runs are timed at different moments)",
}


def compare(
    model: torch.nn.Module,
    frames: torch.Tensor,
    mean,
    std,
    budget_list: Sequence[Tuple[str, object]],
    schedule: Optional[Dict[int, object]] = None,
    *,
    backend: str = "ops",
    strategy: Optional[str] = None,
    packed_baseline: bool = False,
    sequential: bool = False,
    gate_placement: str = "after_norm",
    warmup: int = 1,
    tick: Callable[[], None] = lambda: None,
    phase: Callable[[str], None] = lambda label: None,
) -> Comparison:
    """Dense timm ``model`` (and, with ``packed_baseline``, the same model on prepacked linears) against its eventful
    twin at each ``(label, budget)`` or ``(label, budget, gate_placement)`` of ``budget_list`` (the placement defaults
    to ``gate_placement``, see :func:`eventful_kernels.models.convert`; and with the budget ``schedule``, frame ->
    budget, as one more run labelled ``schedule``) over ``frames [T,3,H,W]`` uint8, one frame (B = 1) at a time, on the
    model's device and dtype. Every run records per-frame wall time, GFLOPs and (eventful) tokens, attention modes and
    deviation from the dense output of the same frame. ``warmup`` untimed dense frames run first (the first frames of a
    process also grow the heap; an eventful run's flush frame 0 is its warm-up).

    Interleaved (default): one converted model per budget (weights shared), every frame through every model in
    turn, the order rotated by one from frame to frame. ``sequential``: dense runs first, then one eventful model
    goes through the budgets one after the other (memory for one eventful state only: SAM at 1024 px holds ~10 GB
    per model on CPU). ``tick`` is called after each model-frame, ``phase`` with the label of each sequential pass.
    """
    p = _param(model)
    device, dtype = p.device, p.dtype

    def prep(frame: torch.Tensor) -> torch.Tensor:
        return normalize(frame[None], mean, std).to(device=device, dtype=dtype)

    counter = DenseMacCounter(model)
    dense = _Dense(model, counter, "dense")
    baselines = [dense]
    if packed_baseline:
        baselines.append(_Dense(PackedDense(model), counter, "dense packed"))
    plan = [(entry[0], {0: entry[1]}, entry[2] if len(entry) > 2 else gate_placement) for entry in budget_list]
    if schedule:
        plan.append(("schedule", dict(schedule), gate_placement))
    entrants: List[_Eventful] = []
    try:
        if sequential:
            outputs = []
            for base in baselines:
                phase(base.run.label)
                base.warm_up(prep(frames[0]), warmup)
                for t, frame in enumerate(frames):
                    y = base.step(t, prep(frame))
                    if base is dense:
                        outputs.append(y)
                    tick()
            models: Dict[str, EventfulModel] = {}  # one per placement (fixed at construction)
            for label, sched, placement in plan:
                phase(label)
                if placement not in models:
                    models.clear()  # one eventful state in memory at a time
                    models[placement] = convert(model, 1.0, backend=backend, strategy=strategy,
                                                gate_placement=placement)
                e = _Eventful(models[placement], label, sched)
                entrants.append(e)
                e.start()
                for t, frame in enumerate(frames):
                    _deviation(e.run, e.step(t, prep(frame)), outputs[t])
                    tick()
                e.finish()
                e.ev = None  # the run is kept, not the model
        else:
            for label, sched, placement in plan:
                ev = convert(model, budgets.fresh(sched[0]), backend=backend, strategy=strategy,
                             gate_placement=placement)
                entrants.append(_Eventful(ev, label, sched))
            for e in entrants:
                e.start()
            x0 = prep(frames[0])
            for base in baselines:
                base.warm_up(x0, warmup)
            everyone = baselines + entrants
            for t, frame in enumerate(frames):
                x = prep(frame)
                k = t % len(everyone)
                outs = {}
                for who in everyone[k:] + everyone[:k]:
                    outs[id(who)] = who.step(t, x)
                    tick()
                ref = outs[id(dense)]
                for e in entrants:
                    _deviation(e.run, outs[id(e)], ref)
    finally:
        counter.remove()
        for e in entrants:
            e.finish()
    runs = [e.run for e in entrants]
    sched_run = runs.pop() if schedule else None
    return Comparison(
        dense=dense.run,
        dense_packed=baselines[1].run if packed_baseline else None,
        runs=runs,
        schedule=sched_run,
        n_tokens=counter.n_tokens,
        mode="sequential" if sequential else "interleaved",
    )


def primary_output(out):
    """The tensor a run compares: the output itself, or ``last_hidden_state`` of a Hugging Face model output."""
    return out if isinstance(out, torch.Tensor) else out["last_hidden_state"]


def _deviation(run: Run, y, ref) -> None:
    y, ref = primary_output(y).float(), primary_output(ref).float()
    run.rel_error.append(float((y - ref).norm() / ref.norm().clamp_min(1e-30)))
    if y.dim() == 2:  # classifier logits: does the top-1 class agree with the dense model?
        run.top1_agree.append(float((y.argmax(-1) == ref.argmax(-1)).float().mean()))


def parse_schedule(text: str) -> Dict[int, object]:
    """``"0:1.0,10:0.25"`` -> {0: 1.0, 10: 0.25}; budgets as in :func:`eventful_kernels.video.budgets.parse_budget`
    (``"0:N,10:t0.5:49"`` sets ``Threshold(0.5, 49)`` at frame 10); frame 0 must be set."""
    sched = {}
    for part in text.split(","):
        part = part.strip()
        frame, _, budget = part.partition(":")
        if not budget:
            raise ValueError(f"schedule: entry {part!r} is not FRAME:BUDGET")
        try:
            t = int(frame)
        except ValueError:
            raise ValueError(f"schedule: entry {part!r}: the frame must be an integer >= 0") from None
        if t < 0:
            raise ValueError(f"schedule: entry {part!r}: the frame must be an integer >= 0")
        if t in sched:
            raise ValueError(f"schedule: frame {t} is given twice")
        try:
            sched[t] = budgets.parse_budget(budget)
        except ValueError as e:
            raise ValueError(f"schedule: entry {part!r}: {e}") from None
    if 0 not in sched:
        raise ValueError("schedule: the budget at frame 0 must be given (e.g. '0:1.0,10:0.25')")
    return dict(sorted(sched.items()))


tokens_for = budgets.tokens_for
