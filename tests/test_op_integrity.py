"""Integrity of every torch.ops.eventful op as a PyTorch op, on each backend available here: the C++ CPU kernels
("cpp") and the Triton kernels served through the dispatcher ("triton": registered for CPU tensors, run by the Triton
interpreter; the same Python registration path as their CUDA registration). eventful_kernels.reference is the oracle.

* inference-only: with grad mode on, a tensor argument that requires grad is refused (RuntimeError naming the first
  such argument, nothing written); under torch.no_grad() / torch.inference_mode() the ops run as before;
* in-place writes are visible: every call bumps the version counter of each mutated (``Tensor(a!)``) argument by
  exactly one and no other argument's; a failed call bumps nothing;
* small-case errors: None for a tensor argument (TypeError naming it), token_gate_threshold's capacity outside
  [0, N] and a non-finite threshold (ValueError naming it), identical on every backend, raised before any write;
* torch.compile(fullgraph=True) of in-place ops equals eager.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import reference as R

E = torch.ops.eventful
OPS = ("gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
       "token_gate_threshold", "token_delta_gate", "qk_update_", "av_delta_update_")
# the arguments each op writes in place (Tensor(a!) in csrc/ops.cpp)
MUTATED = {"gather_rows": (), "scatter_rows_": ("dst",), "scatter_rows_residual_": ("dst",), "gather_cols": (),
           "scatter_cols_": ("dst",), "token_gate": ("ref",), "token_gate_threshold": ("ref",),
           "token_delta_gate": ("ref",),
           "qk_update_": ("logits",), "av_delta_update_": ("out", "a_ref", "v_ref")}


def _triton_usable() -> bool:
    try:
        import eventful_kernels.triton as T
    except Exception:
        return False
    return T.AVAILABLE and (T.INTERPRET or torch.cuda.is_available())


BACKENDS = ["cpp"] + (["triton"] if _triton_usable() and not torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """torch.ops.eventful served on CPU by the C++ kernels, or by the Triton kernels (interpreter) for the test."""
    if request.param == "cpp":
        yield "cpp"
        return
    from eventful_kernels.triton import _register
    lib = torch.library.Library("eventful", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel" (the C++ CPU kernels)
        for name, fn in _register.KERNELS.items():
            lib.impl(name, fn, "CPU")
    yield "triton"
    lib._destroy()


# ---------------------------------------------------------------- samples: every argument in schema order

def _sample(name: str, seed: int = 0, variant: str = "") -> dict:
    """Valid arguments of ``name`` as {schema name: value}, in schema order (positional arguments only).
    variant: "relpos" (qk_update_ with rel_h/rel_w), "topk" (token_delta_gate without an index), "scaled"
    (scatter_rows_residual_ with a scale)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    idx = torch.tensor([[1, 4], [0, 5]])
    if name in ("gather_rows", "gather_cols"):
        return {"x": randn(2, 3, 6) if name == "gather_cols" else randn(2, 6, 4), "index": idx}
    if name == "scatter_rows_":
        return {"dst": randn(2, 6, 4), "index": idx, "src": randn(2, 2, 4)}
    if name == "scatter_rows_residual_":
        args = {"dst": randn(2, 6, 4), "index": idx, "src": randn(2, 2, 4), "residual": randn(2, 6, 4)}
        return {**args, "scale": randn(4) if variant == "scaled" else None}
    if name == "scatter_cols_":
        return {"dst": randn(2, 3, 6), "index": idx, "src": randn(2, 3, 2)}
    if name == "token_gate":
        return {"c": randn(2, 6, 4), "ref": randn(2, 6, 4), "k": 2}
    if name == "token_gate_threshold":
        return {"c": randn(2, 6, 4), "ref": randn(2, 6, 4), "threshold": 2.5, "capacity": 3}
    if name == "token_delta_gate":
        index = None if variant == "topk" else torch.tensor([[3, -1], [0, 5]])
        return {"c": randn(2, 6, 4), "ref": randn(2, 6, 4), "k": 2 if variant == "topk" else -1, "index": index}
    if name == "qk_update_":
        args = {"logits": randn(2, 2, 6, 6), "q": randn(2, 2, 6, 8), "k": randn(2, 2, 6, 8), "index_q": idx,
                "index_k": idx.flip(1).contiguous(), "scale": 0.5}
        if variant == "relpos":
            args.update(rel_h=randn(2, 2, 6, 2), rel_w=randn(2, 2, 6, 3))
        return args
    if name == "av_delta_update_":
        return {"out": randn(2, 2, 6, 8), "a_new": torch.rand(2, 2, 6, 6, generator=g),
                "a_ref": torch.rand(2, 2, 6, 6, generator=g), "v_new": randn(2, 2, 6, 8), "v_ref": randn(2, 2, 6, 8),
                "index": idx}
    raise ValueError(name)


SAMPLES = [(name, "") for name in OPS] + [("token_delta_gate", "topk"), ("qk_update_", "relpos"),
                                          ("scatter_rows_residual_", "scaled")]
SAMPLE_IDS = [f"{n}-{v}" if v else n for n, v in SAMPLES]


def _tensors(args: dict) -> dict:
    return {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}


def _float_names(args: dict) -> list:
    return [k for k, v in _tensors(args).items() if v.is_floating_point()]


def _snapshot(args: dict) -> dict:
    return {k: v.detach().clone() for k, v in _tensors(args).items()}


def _versions(args: dict) -> dict:
    return {k: v._version for k, v in _tensors(args).items()}


def _assert_unchanged(args: dict, before: dict) -> None:
    for k, v in before.items():
        assert torch.equal(args[k].detach(), v), f"argument '{k}' was written"


def _call(name: str, args: dict):
    return getattr(E, name)(*args.values())


def _reference(name: str, args: dict):
    """(outputs, mutated arguments) of the reference on detached clones of ``args``."""
    ref_args = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = getattr(R, name)(*ref_args.values())
    outs = out if isinstance(out, tuple) else (out,)
    if not getattr(E, name).default._schema.returns:  # the reference returns the mutated tensor; the op nothing
        outs = ()
    return list(outs), {k: ref_args[k] for k in MUTATED[name]}


def _outputs(got) -> list:
    return [] if got is None else list(got) if isinstance(got, tuple) else [got]


def _assert_matches(name: str, args: dict, got, want) -> None:
    """The outputs and the mutated arguments of one call equal the reference's (``want = _reference(...)``);
    matmul ops to float32 summation-order noise."""
    want_out, want_state = want
    for g, w in zip(_outputs(got), want_out, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for k, w in want_state.items():
        torch.testing.assert_close(args[k].detach(), w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the registration itself

LINEAR_OPS = ("linear_bf16_pack", "linear_bf16")  # CPU-only, no index: their integrity in tests/test_linear_bf16.py


def test_every_op_has_its_autograd_and_inplace_kernels():
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("eventful::"))
    every = OPS + LINEAR_OPS
    assert names == sorted(every + tuple("_check_" + n.rstrip("_") for n in every))
    for name in every:
        schema = getattr(E, name).default._schema
        mutated = tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
        assert mutated == MUTATED.get(name, ())
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "Autograd")
        has_inplace = torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "ADInplaceOrView")
        assert has_inplace == bool(mutated)


# ---------------------------------------------------------------- inference-only: requires grad is refused

def _grad_message(arg: str) -> str:
    return (f"eventful: argument '{arg}' requires grad, but eventful ops are inference-only (no autograd): "
            f"call it under torch.no_grad() or pass {arg}.detach()")


REQUIRES_GRAD_CASES = [(n, v, arg) for n, v in SAMPLES for arg in _float_names(_sample(n, variant=v))]


@pytest.mark.parametrize("name,variant,arg", REQUIRES_GRAD_CASES,
                         ids=[f"{n}{'-' + v if v else ''}-{a}" for n, v, a in REQUIRES_GRAD_CASES])
def test_requires_grad_is_refused(backend, name, variant, arg):
    args = _sample(name, variant=variant)
    args[arg].requires_grad_(True)
    before, versions = _snapshot(args), _versions(args)
    with pytest.raises(RuntimeError) as info:
        _call(name, args)
    assert str(info.value).split("\nException raised from")[0] == _grad_message(arg)
    _assert_unchanged(args, before)
    assert _versions(args) == versions


@pytest.mark.parametrize("name,variant", SAMPLES, ids=SAMPLE_IDS)
def test_requires_grad_names_the_first_such_argument(backend, name, variant):
    args = _sample(name, variant=variant)
    floats = _float_names(args)
    for k in floats:
        args[k].requires_grad_(True)
    with pytest.raises(RuntimeError, match=re.escape(_grad_message(floats[0]))):
        _call(name, args)
    # a non-leaf that requires grad (the output of a differentiable op) is refused the same way
    args = _sample(name, variant=variant)
    w = torch.ones((), requires_grad=True)
    last = floats[-1]
    args[last] = args[last] * w
    with pytest.raises(RuntimeError, match=re.escape(_grad_message(last))):
        _call(name, args)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,variant", SAMPLES, ids=SAMPLE_IDS)
def test_requires_grad_inputs_run_without_grad_mode(backend, name, variant, mode):
    args = _sample(name, variant=variant)
    want = _reference(name, args)
    for k in _float_names(args):
        args[k].requires_grad_(True)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        got = _call(name, args)
    assert not any(t.requires_grad for t in _outputs(got))
    _assert_matches(name, args, got, want)
    assert all(args[k].requires_grad for k in _float_names(args))  # the leaves are left as they were


def test_ops_wrappers_refuse_requires_grad_too():
    from eventful_kernels import ops
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=re.escape(_grad_message("x"))):
        ops.gather_rows(x, torch.tensor([[0], [1]]))
    with pytest.raises(RuntimeError, match=re.escape(_grad_message("x"))):
        ops.gather_rows(x, torch.tensor([[0], [1]]), check_index=False)


# ---------------------------------------------------------------- in-place writes bump the version counter

@pytest.mark.parametrize("name,variant", SAMPLES, ids=SAMPLE_IDS)
def test_version_bumps_once_per_call_for_each_mutated_argument(backend, name, variant):
    args = _sample(name, variant=variant)
    want = _reference(name, args)
    start = _versions(args)
    for calls in (1, 2):
        got = _call(name, args)
        assert _versions(args) == {k: v + (calls if k in MUTATED[name] else 0) for k, v in start.items()}
        if calls == 1:
            _assert_matches(name, args, got, want)
    with torch.no_grad():
        _call(name, args)
    assert _versions(args) == {k: v + (3 if k in MUTATED[name] else 0) for k, v in start.items()}
    with torch.inference_mode():  # normal tensors written inside inference mode are still bumped
        _call(name, args)
    assert _versions(args) == {k: v + (4 if k in MUTATED[name] else 0) for k, v in start.items()}


@pytest.mark.parametrize("name", [n for n in OPS if MUTATED[n]])
def test_failed_call_bumps_nothing(backend, name):
    args = _sample(name)
    for k in ("index", "index_q"):
        if k in args:
            args[k] = torch.tensor([[1, 9], [0, 2]])  # 9: out of range for every op
    if name in ("token_gate", "token_gate_threshold"):
        args["ref"] = args["ref"][:, :5]  # shape mismatch
    before, versions = _snapshot(args), _versions(args)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        _call(name, args)
    _assert_unchanged(args, before)
    assert _versions(args) == versions


def test_autograd_sees_a_write_into_a_saved_tensor(backend):
    """The point of the bump: a tensor saved for backward and then written by an op makes backward raise instead
    of silently using the new values."""
    args = _sample("scatter_rows_")
    w = torch.randn(2, 6, 4, requires_grad=True)
    loss = (w * args["dst"]).sum()  # mul saves dst for w's gradient
    with torch.no_grad():
        _call("scatter_rows_", args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_views_share_the_bump(backend):
    """Writing through a view bumps the base's counter (shared by all views), as PyTorch's in-place ops do."""
    base = torch.randn(2, 8, 4)
    args = _sample("scatter_rows_")
    args["dst"] = base[:, 1:7]
    v0 = base._version
    _call("scatter_rows_", args)
    assert base._version == v0 + 1 and args["dst"]._version == v0 + 1


def test_inference_tensor_written_outside_inference_mode_is_refused(backend):
    with torch.inference_mode():
        args = _sample("scatter_rows_")
        _call("scatter_rows_", args)  # inside inference mode: allowed
    before = _snapshot(args)
    with pytest.raises(RuntimeError, match=re.escape("eventful: argument 'dst' is an inference tensor and is "
                                                     "written in place")):
        _call("scatter_rows_", args)
    _assert_unchanged(args, before)
    with torch.inference_mode():
        gate = _sample("token_gate")
    out = _call("token_gate", {**gate, "ref": gate["ref"].clone()})  # only read as an inference tensor: fine
    assert out[0].shape == (2, 2)


# ---------------------------------------------------------------- None for a tensor argument

NONE_CASES = [(n, v, arg) for n, v in SAMPLES for arg in _tensors(_sample(n, variant=v))
              if not (n == "token_delta_gate" and arg == "index") and arg not in ("rel_h", "rel_w", "scale")]


@pytest.mark.parametrize("name,variant,arg", NONE_CASES,
                         ids=[f"{n}{'-' + v if v else ''}-{a}" for n, v, a in NONE_CASES])
def test_none_for_a_tensor_argument(backend, name, variant, arg):
    args = _sample(name, variant=variant)
    args[arg] = None
    before, versions = _snapshot(args), _versions(args)
    with pytest.raises(TypeError) as info:
        _call(name, args)
    want = f"eventful: argument '{arg}' must be a Tensor, got None"
    assert str(info.value).split("\nException raised from")[0] == want
    _assert_unchanged(args, before)
    assert _versions(args) == versions


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (interpreter)")
@pytest.mark.parametrize("name,variant,arg", NONE_CASES,
                         ids=[f"{n}{'-' + v if v else ''}-{a}" for n, v, a in NONE_CASES])
def test_none_for_a_tensor_argument_triton_functions(name, variant, arg):
    """The plain Triton functions (not through the dispatcher) give the same error."""
    import eventful_kernels.triton as T
    args = _sample(name, variant=variant)
    args[arg] = None
    before = _snapshot(args)
    with pytest.raises(TypeError, match=re.escape(f"eventful: argument '{arg}' must be a Tensor, got None")):
        getattr(T, name)(*args.values())
    _assert_unchanged(args, before)


# ---------------------------------------------------------------- token_gate_threshold: capacity and threshold

def _capacity_message(capacity: int, n: int = 6) -> str:
    return f"eventful: argument 'capacity' must satisfy 0 <= capacity <= N = {n} (tokens in 'c'), got {capacity}"


@pytest.mark.parametrize("capacity", [-1, 7, 10 ** 12])
def test_capacity_out_of_range_is_rejected(backend, capacity):
    args = _sample("token_gate_threshold")
    args["capacity"] = capacity
    before, versions = _snapshot(args), _versions(args)
    with pytest.raises(ValueError) as info:
        _call("token_gate_threshold", args)
    assert str(info.value).split("\nException raised from")[0] == _capacity_message(capacity)
    _assert_unchanged(args, before)
    assert _versions(args) == versions


@pytest.mark.parametrize("capacity", [0, 1, 6])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 2.5, 1e300])
def test_capacity_in_range_matches_reference(backend, capacity, threshold):
    args = _sample("token_gate_threshold", seed=capacity)
    args.update(capacity=capacity, threshold=threshold)
    want_out, want_state = _reference("token_gate_threshold", args)
    got = _call("token_gate_threshold", args)
    for g, w in zip(got, want_out, strict=True):
        assert torch.equal(g, w)
    assert torch.equal(args["ref"], want_state["ref"])


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_threshold_is_rejected(backend, threshold):
    args = _sample("token_gate_threshold")
    args["threshold"] = threshold
    before, versions = _snapshot(args), _versions(args)
    with pytest.raises(ValueError) as info:
        _call("token_gate_threshold", args)
    want = f"eventful: argument 'threshold' must be finite, got {threshold}"
    assert str(info.value).split("\nException raised from")[0] == want
    _assert_unchanged(args, before)
    assert _versions(args) == versions


def test_capacity_is_checked_before_threshold(backend):
    args = {**_sample("token_gate_threshold"), "threshold": math.nan, "capacity": 7}
    with pytest.raises(ValueError, match="'capacity'"):
        _call("token_gate_threshold", args)


def test_fake_kernel_checks_capacity_and_threshold():
    c = torch.empty(2, 6, 4, device="meta")
    ref = torch.empty(2, 6, 4, device="meta")
    for capacity in (-1, 7, 10 ** 12):
        with pytest.raises(ValueError, match=re.escape(_capacity_message(capacity))):
            E.token_gate_threshold(c, ref, 0.5, capacity)
    with pytest.raises(ValueError, match="'threshold' must be finite, got nan"):
        E.token_gate_threshold(c, ref, math.nan, 2)
    index, count, c_sel = E.token_gate_threshold(c, ref, 0.5, 6)
    assert index.shape == (2, 6) and count.shape == (2,) and c_sel.shape == (2, 6, 4)


# ---------------------------------------------------------------- torch.compile and opcheck

def _in_place_pair(dst, index, src, logits, q, k, index_q, index_k):
    E.scatter_rows_(dst, index, src)
    E.qk_update_(logits, q, k, index_q, index_k, 0.5)
    return dst * 2, logits + 1


@pytest.mark.parametrize("grad_mode", [True, False])
def test_compile_fullgraph_matches_eager(backend, grad_mode):
    rows, qk = _sample("scatter_rows_", seed=3), _sample("qk_update_", seed=4)
    args = (rows["dst"], rows["index"], rows["src"], qk["logits"], qk["q"], qk["k"], qk["index_q"], qk["index_k"])
    eager = [a.clone() for a in args]
    compiled = [a.clone() for a in args]
    versions = [a._version for a in compiled]
    torch._dynamo.reset()
    fn = torch.compile(_in_place_pair, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(grad_mode):
        want = _in_place_pair(*eager)
        got = fn(*compiled)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for g, w in zip(compiled, eager, strict=True):  # the in-place writes reached the compiled call's inputs
        assert torch.equal(g, w)
    assert compiled[0]._version > versions[0] and compiled[3]._version > versions[3]


@pytest.mark.parametrize("name,variant", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck(backend, name, variant):
    args = _sample(name, variant=variant)
    op = getattr(E, name).default
    torch.library.opcheck(op, tuple(args.values()))
    if any(a.name == "check_index" for a in op._schema.arguments):  # the keyword through the dispatcher
        torch.library.opcheck(op, tuple(_sample(name, variant=variant).values()), {"check_index": False})
