"""Shared by the op tests (tests/test_<family>.py): dtypes, index dtypes and makers, layouts, and the backends every
op test runs on. eventful_kernels.reference is the oracle of every test.

Backends (the ``impl`` fixture; each skipped where it cannot run):
- ``cpu``: the C++ CPU kernels through ``torch.ops.eventful`` (eventful_kernels.ops);
- ``cuda``: ``torch.ops.eventful`` on CUDA tensors: the C++ CUDA kernel where the build has one, else the Triton one;
- ``triton``: the Triton functions (eventful_kernels.triton) on CUDA tensors;
- ``interpreter``: the Triton functions on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set in
  tests/conftest.py before triton is imported; only without a GPU);
- ``cuda_emu``: the C++ CUDA kernels (csrc/cuda) on CPU tensors under the CUDA emulator (tests/cuda_emulator.py),
  built on first use; the ops that have no C++ CUDA kernel (Triton serves them on a GPU) skip there.
A test calls ``impl.<op>(...)`` with CPU tensors (or tensors already on ``impl.device``); a GPU backend moves each CPU
storage to the GPU once (views keep their offsets and strides, arguments sharing memory still share it), runs the op
there, copies every moved storage back into its CPU tensor (so in-place writes, and any stray write, show up where
the test looks) and returns outputs on the host, an in-place op's mutated argument as the caller's own tensor.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
from torch import Tensor

import cuda_emulator
import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import ops

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32: summation-order noise; fp16/bf16: one ulp of the output type (the same fp32 value rounded once)
MATMUL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2 ** -10, atol=1e-3),
              torch.bfloat16: dict(rtol=2 ** -7, atol=1e-2)}


def _triton():
    try:
        import eventful_kernels.triton as T
    except Exception:
        return None
    return T if T.AVAILABLE else None


T = _triton()
INTERPRETER = T is not None and not CUDA and T.INTERPRET


# ---------------------------------------------------------------- backends

def _move(t, device, storages):
    """``t`` as a view of the same shape, strides and offset into a device copy of its storage (one per storage)."""
    if not isinstance(t, Tensor) or t.device.type != "cpu" or device == "cpu":
        return t
    st = t.untyped_storage()
    key = (st.data_ptr(), st.nbytes())
    if key not in storages:
        storages[key] = (st, torch.UntypedStorage(st.nbytes(), device=device).copy_(st))
    return torch.empty(0, dtype=t.dtype, device=device).set_(storages[key][1], t.storage_offset(), t.shape, t.stride())


class Backend:
    """One implementation of every op: ``impl.gather_rows(...)`` etc. (see the module docstring)."""

    def __init__(self, name: str, device: str, module, exact_gates: bool, fast: bool, dispatcher: bool,
                 missing: str = ""):
        self.name, self.device, self._module = name, device, module
        self.missing = missing  # why an op the module lacks is skipped ("": every op is expected)
        self.exact_gates = exact_gates  # gate scores summed in the reference's order: bit-exact selections
        self.fast = fast  # large shapes and property-based tests are affordable (not the interpreter)
        self.dispatcher = dispatcher  # calls go through the dispatcher (a meta argument selects a fake kernel)

    def __repr__(self):
        return self.name

    @property
    def module(self):
        """The ops (a module, or built on first use by a callable)."""
        if callable(self._module):
            self._module = self._module()
        return self._module

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        if self.missing and op in ops.__all__ and op not in vars(self.module):
            pytest.skip(f"{self.missing}: {op}")
        fn = getattr(self.module, op)
        if self.device == "cpu":
            return fn

        def call(*args, **kwargs):
            storages = {}
            dev_args = [_move(a, self.device, storages) for a in args]
            dev_kwargs = {k: _move(v, self.device, storages) for k, v in kwargs.items()}
            try:
                out = fn(*dev_args, **dev_kwargs)
            finally:
                for cpu_st, dev_st in storages.values():
                    cpu_st.copy_(dev_st)
            return _host(out, args, dev_args)

        return call

    def skip_unless_fast(self):
        if not self.fast:
            pytest.skip("large shapes / property-based cases: too slow under the Triton interpreter")


def _host(out, args, dev_args):
    if isinstance(out, tuple):
        return tuple(_host(o, args, dev_args) for o in out)
    if isinstance(out, Tensor):
        for a, d in zip(args, dev_args):
            if out is d:
                return a
        return out.cpu()
    return out


BACKENDS = {
    "cpu": Backend("cpu", "cpu", ops, exact_gates=False, fast=True, dispatcher=True),
    "cuda": Backend("cuda", "cuda", ops, exact_gates=False, fast=True, dispatcher=True),
    "triton": Backend("triton", "cuda", T, exact_gates=False, fast=True, dispatcher=False),
    "interpreter": Backend("interpreter", "cpu", T, exact_gates=True, fast=False, dispatcher=False),
    "cuda_emu": Backend("cuda_emu", "cpu", lambda: cuda_emulator.ops_module(cuda_emulator.load()), exact_gates=False,
                        fast=True, dispatcher=True, missing="no C++ CUDA kernel (Triton serves it on a GPU)"),
}
_SKIP = {
    "cpu": None,
    "cuda": None if CUDA else "needs a CUDA GPU",
    "triton": None if CUDA and T is not None else "needs a CUDA GPU and triton",
    "cuda_emu": None if not CUDA else "a GPU runs the C++ CUDA kernels for real",
    "interpreter": None if INTERPRETER else ("a GPU runs the Triton kernels for real" if CUDA else
                                             "needs triton with TRITON_INTERPRET=1 set before its import"),
}


def backend_params(names=tuple(BACKENDS)):
    return [pytest.param(BACKENDS[n], id=n, marks=pytest.mark.skipif(_SKIP[n] is not None, reason=_SKIP[n] or ""))
            for n in names]


# ---------------------------------------------------------------- data

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    """A seed fixed by a test case's parameters (the same on every run and process)."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, dtype, g, device="cpu"):
    return torch.randn(tuple(shape), generator=g).to(dtype).to(device)


def clone_layout(t: Tensor) -> Tensor:
    """Copy of ``t`` in a fresh storage with the same offset and strides (clone() would compact a padded view)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage().clone(), t.storage_offset(),
                                                               t.shape, t.stride())


def strided(t: Tensor, how: str) -> Tensor:
    """A view holding ``t``'s values: 'contig' (t itself), 'step' (every other element of the last dim) or
    'colmajor' (last two dims transposed in memory)."""
    if how == "contig":
        return t
    if how == "step":
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        v = big[..., ::2]
    else:
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert v.numel() == 0 or min(t.shape[-2:]) <= 1 or not v.is_contiguous()
    return v


def guarded(shape, dtype, g, device="cpu", rand=False):
    """``(view, buffer)``: a ``shape`` view in the interior of a random buffer one element larger on each side of
    every dim, so a write outside the view shows up in the buffer."""
    big_shape = [n + 2 for n in shape]
    big = torch.rand(big_shape, generator=g).to(dtype).to(device) if rand else randn(big_shape, dtype, g, device)
    return big[tuple(slice(1, 1 + n) for n in shape)], big


def assert_same_guards(buf, want):
    """The guard elements of two ``guarded`` buffers (everything but the interior) are bit-identical."""
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[(slice(1, -1),) * buf.dim()] = False
    assert torch.equal(buf[outside].cpu(), want[outside].cpu())


def assert_same(a, b):
    """Same shape, dtype and values (NaN equal to NaN)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a, b) or (a.is_floating_point() and torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


# ---------------------------------------------------------------- indices

def make_index(b, n, k, dtype, g, unique=True, device="cpu"):
    """[b, k] ids in [0, n), distinct per row unless unique=False (then with repeats), unsorted."""
    if unique:
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]) if b else torch.empty(0, k)
    else:
        idx = torch.randint(0, max(n, 1), (b, k), generator=g)
    return idx.to(dtype).to(device)


def strided_index(idx: Tensor) -> Tensor:
    """The same ids in a non-contiguous [B, K] view (every other element of a wider buffer)."""
    b, k = idx.shape
    big = torch.zeros((b, 2 * k), dtype=idx.dtype, device=idx.device)
    big[:, ::2] = idx
    return big[:, ::2]


def index_with_empty(b, k, n, dtype, g, device="cpu", strided=False, bad=()):
    """[B, K] distinct ids, about a third of the slots -1 (empty slots, repeated), row 1 (if B > 1) only -1, and K
    may exceed N (the extra slots are -1). ``bad``: further ids (e.g. out of range) put into row 0."""
    rows = []
    for _ in range(b):
        row = torch.full((k,), -1, dtype=torch.long)
        take = min(k, n)
        row[:take] = torch.randperm(n, generator=g)[:take]
        row = row[torch.randperm(k, generator=g)]
        row[torch.rand(k, generator=g) < 0.35] = -1
        rows.append(row)
    idx = torch.stack(rows) if b else torch.empty((0, k), dtype=torch.long)
    if b > 1:
        idx[1] = -1
    for j, v in enumerate(bad):
        idx[0, j % max(k, 1)] = v
    idx = idx.to(dtype).to(device)
    return strided_index(idx) if strided else idx


def out_of_range_ids(shape, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Ids outside [0, n) of the given shape, drawn from -1, -5, n, 2n + 3 and the dtype's max."""
    bad = torch.tensor([-1, -5, n, 2 * n + 3, torch.iinfo(dtype).max], dtype=dtype)
    return bad[torch.randint(0, len(bad), tuple(shape), generator=g)]


def with_empty_slots(index: Tensor, g: torch.Generator, frac: float = 0.4, empty_rows=(), fill=-1):
    """``index`` with about ``frac`` of its entries (random positions) and every row in ``empty_rows`` set to
    ``fill``."""
    out = index.clone()
    out[torch.rand(index.shape, generator=g) < frac] = fill
    for b in empty_rows:
        out[b] = fill
    return out


def out_of_range(index: Tensor, n: int, g: torch.Generator, frac: float = 0.4) -> Tensor:
    """``index`` with about ``frac`` of its entries replaced by ids outside [0, n) (see ``out_of_range_ids``)."""
    pick = out_of_range_ids(index.shape, n, index.dtype, g)
    return torch.where(torch.rand(index.shape, generator=g) < frac, pick, index)


# ---------------------------------------------------------------- bad input

def run_bad_case(impl: Backend, make_state, call, exc, fragment):
    """``call(impl, state)`` raises ``exc`` whose message starts like every eventful check's and contains
    ``fragment``; no tensor of ``state`` changes."""
    state = make_state()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(exc) as info:
        call(impl, state)
    msg = str(info.value).split("\nException raised from")[0]
    assert msg.startswith("eventful: argument"), msg
    assert fragment in msg, msg
    for k, v in state.items():
        assert_same(v, before[k])


def over(*names):
    """Parametrize a test over the named backends (all by default) as its ``impl`` argument."""
    return pytest.mark.parametrize("impl", backend_params(names or tuple(BACKENDS)))


# ---------------------------------------------------------------- float32 accumulation tolerances

EPS32 = torch.finfo(torch.float32).eps
ULP_REL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ULP_MIN = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


def assert_within(actual, expected, delta, dtype):
    """|actual - expected| <= delta (float32 summation-order bound) + one ulp of `dtype` (final cast), elementwise."""
    a, e = actual.float(), expected.float()
    bound = 1.01 * delta + ULP_REL[dtype] * 1.01 * e.abs() + ULP_MIN[dtype]
    err = (a - e).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}, max err {err.max().item()}"


def valid_ids(row, n):
    """The ids of one index row that name a token of [0, n), as int64."""
    row = row.long()
    return row[(row >= 0) & (row < n)]


def opcheck(impl: Backend, op, args, kwargs=None):
    """torch.library.opcheck of ``op`` with the tensors of ``args`` on ``impl.device``."""
    torch.library.opcheck(op, tuple(a.to(impl.device) if isinstance(a, Tensor) else a for a in args), kwargs)


def skip_meta_on_dispatcher(impl: Backend, case_id: str):
    """Cases with a meta tensor ("... device") test the device check of a kernel called directly; through the
    dispatcher a meta argument selects the fake kernel instead."""
    if impl.dispatcher and "device" in case_id:
        pytest.skip("through torch.ops.eventful a meta tensor selects the fake kernel")
