"""Prepacked (oneDNN) linears of the gated path against ``F.linear`` / the modules they wrap."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eventful_kernels.nn.linear import (
    PackedGroup, PackedLinear, PackedMlp, packed_linears, packing_enabled, repack, sample_runs, sampled_entries,
)

needs_packing = pytest.mark.skipif(not packing_enabled(), reason="oneDNN packing unavailable or disabled")

# Same-precision tolerances as the op tests: the packed kernel sums in a different order than MKL sgemm.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _linear(i, o, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype).eval()


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 7, 49, 197])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear(dtype, rows, bias):
    lin = _linear(96, 80, dtype, bias)
    x = torch.randn(2, rows, 96).to(dtype)
    packed = PackedLinear(lin)
    with torch.no_grad():
        y = packed(x)
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert packed.packed_weight(x) is not None, "CPU float32 (and bf16 where oneDNN has it) is packed"
        torch.testing.assert_close(y, lin(x), **TOL[dtype])
    assert y.shape == (2, rows, 80) and y.dtype == dtype


@needs_packing
def test_strided_input():
    lin = _linear(64, 32, torch.float32)
    x = torch.randn(3, 64, 10).transpose(1, 2)  # [3, 10, 64], non-contiguous
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(lin)(x), lin(x), **TOL[torch.float32])


@needs_packing
@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()])
def test_activation(act):
    lin = _linear(64, 48, torch.float32)
    x = torch.randn(5, 64) * 3
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(lin, act)(x), act(lin(x)), **TOL[torch.float32])


@needs_packing
def test_repacks_when_weights_change():
    lin = _linear(32, 16, torch.float32)
    packed = PackedLinear(lin)
    x = torch.randn(4, 32)
    with torch.no_grad():
        packed(x)
        first = packed.packed_weight(x)
        lin.weight.mul_(-2.0)  # in place: version bump
        torch.testing.assert_close(packed(x), lin(x), **TOL[torch.float32])
        lin.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
        torch.testing.assert_close(packed(x), lin(x), **TOL[torch.float32])
        lin.weight = nn.Parameter(torch.randn(16, 32))  # a new tensor
        torch.testing.assert_close(packed(x), lin(x), **TOL[torch.float32])
        lin.weight.data = torch.randn(16, 32)  # storage swapped under the same Parameter
        torch.testing.assert_close(packed(x), lin(x), **TOL[torch.float32])
    assert packed.packed_weight(x) is not first


def test_falls_back_where_packing_does_not_apply(monkeypatch):
    lin = _linear(32, 16, torch.float64)
    x = torch.randn(4, 32, dtype=torch.float64)
    packed = PackedLinear(lin, nn.GELU())
    with torch.no_grad():
        assert packed.packed_weight(x) is None  # float64
        torch.testing.assert_close(packed(x), F.gelu(lin(x)), rtol=0, atol=0)
    monkeypatch.setenv("EVENTFUL_PACKED_LINEAR", "0")
    lin32, x32 = _linear(32, 16, torch.float32), torch.randn(4, 32)
    with torch.no_grad():
        assert PackedLinear(lin32).packed_weight(x32) is None
        torch.testing.assert_close(PackedLinear(lin32)(x32), lin32(x32), rtol=0, atol=0)


def test_subclass_called_as_is():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    lin = Doubled(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(lin)(x), lin(x), rtol=0, atol=0)


def test_tensor_subclass_weight_not_packed():
    """A weight that is a tensor subclass (quantization libraries put int8 tensors there, reporting a float dtype)
    is never reordered into a float copy: the linear runs as its weight's subclass says."""
    calls = []

    class Tracked(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    lin = _linear(8, 4, torch.float32)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(Tracked), requires_grad=False)
    x = torch.randn(3, 8)
    packed = PackedLinear(lin)
    with torch.no_grad():
        assert packed.packed_weight(x) is None
        assert packed._key is None  # refused up front, not left to whatever the reorder op does with a subclass
        calls.clear()
        torch.testing.assert_close(packed(x).as_subclass(torch.Tensor), F.linear(x, lin.weight.as_subclass(
            torch.Tensor), lin.bias), rtol=0, atol=0)
    assert F.linear in calls  # the product went through the subclass


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        PackedLinear(nn.Conv1d(3, 3, 1))


@needs_packing
def test_packed_mlp_matches_timm_mlp():
    from eventful_kernels.models import import_timm

    Mlp = import_timm().layers.Mlp
    torch.manual_seed(0)
    mlp = Mlp(64, 256, norm_layer=nn.LayerNorm).eval()
    x = torch.randn(2, 9, 64)
    packed = PackedMlp(mlp)
    assert packed._plain
    with torch.no_grad():
        torch.testing.assert_close(packed(x), mlp(x), **TOL[torch.float32])


def test_packed_mlp_glu_variant_called_as_is():
    """GluMlp has fc1/act/fc2 too but gates half of fc1's output: it must not be taken for a plain Mlp."""
    from eventful_kernels.models import import_timm

    torch.manual_seed(0)
    mlp = import_timm().layers.GluMlp(16, 32, act_layer=nn.Sigmoid).eval()
    x = torch.randn(3, 16)
    packed = PackedMlp(mlp)
    assert not packed._plain
    with torch.no_grad():
        torch.testing.assert_close(packed(x), mlp(x), rtol=0, atol=0)


def test_packed_mlp_other_mlp_called_as_is():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(PackedMlp(mlp)(x), mlp(x), rtol=0, atol=0)


@needs_packing
def test_context_manager_patches_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    calls = []
    model[2].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        expected = model(x)
        with packed_linears(model):
            assert all("forward" in m.__dict__ for m in (model[0], model[2]))
            y = model(x)
        assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    assert len(calls) == 2, "forward hooks fire on the packed path too"


# ---- the fingerprint: writes that do not bump _version -----------------------------------------------------------
@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_through_data_repack(dtype):
    """``.data`` writes leave ``_version`` alone; the sampled entries show them."""
    lin = _linear(96, 80, dtype)
    packed = PackedLinear(lin)
    x = torch.randn(5, 96).to(dtype)
    with torch.no_grad():
        packed(x)
        if packed.packed_weight(x) is None:
            pytest.skip("no oneDNN support for this dtype on this CPU")
        version = lin.weight._version
        lin.weight.data.copy_(torch.randn(80, 96).to(dtype))  # a checkpoint copied in through .data
        torch.testing.assert_close(packed(x), lin(x), **TOL[dtype])
        ema = torch.randn(80, 96).to(dtype)
        lin.weight.data.mul_(0.9).add_(ema, alpha=0.1)  # an EMA update
        torch.testing.assert_close(packed(x), lin(x), **TOL[dtype])
    assert lin.weight._version == version


@needs_packing
def test_fingerprint_is_stable():
    """Unchanged weights are never repacked, NaN entries included (the sample compares bit patterns)."""
    lin = _linear(64, 32, torch.float32)
    with torch.no_grad():
        lin.weight[3, 5] = float("nan")
        lin.weight.view(-1)[sampled_entries(lin.weight)] = float("nan")
    packed = PackedLinear(lin)
    x = torch.randn(4, 64)
    with torch.no_grad():
        first = packed.packed_weight(x)
        for _ in range(3):
            packed(x)
        assert packed.packed_weight(x) is first


def _unsampled(lin):
    sampled = set(sampled_entries(lin.weight).tolist())
    return next(i for i in range(lin.weight.numel()) if i not in sampled)


@needs_packing
def test_unsampled_write_through_data_needs_repack():
    """The documented blind spot: one unsampled entry changed through ``.data``. ``repack`` fixes it."""
    lin = _linear(64, 48, torch.float32)
    model = nn.Sequential(lin)
    packed = PackedLinear(lin)
    x = torch.randn(4, 64)
    with torch.no_grad():
        packed(x)
        lin.weight.data.view(-1)[_unsampled(lin)] += 100.0
        assert not torch.allclose(packed(x), lin(x), **TOL[torch.float32])  # stale, as documented
        assert repack(model) is model
        torch.testing.assert_close(packed(x), lin(x), **TOL[torch.float32])


@needs_packing
def test_fingerprint_check_can_be_switched_off(monkeypatch):
    """The switch exists to measure what the comparison costs; with it off, ``.data`` writes go unseen."""
    lin = _linear(32, 16, torch.float32)
    packed = PackedLinear(lin)
    x = torch.randn(4, 32)
    monkeypatch.setattr(PackedLinear, "check_fingerprint", False)
    with torch.no_grad():
        packed(x)
        lin.weight.data.mul_(-1)
        assert not torch.allclose(packed(x), lin(x), **TOL[torch.float32])


@needs_packing
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_drop_the_packed_weight(how):
    lin = _linear(32, 16, torch.float32)
    model = nn.Sequential(lin, nn.GELU())
    packed = PackedLinear(lin, model[1])
    x = torch.randn(4, 32)
    with torch.no_grad():
        y = packed(x)
        cp = copy.deepcopy(packed) if how == "deepcopy" else pickle.loads(pickle.dumps(packed))
        assert cp._packed is None and cp.linear is not lin
        torch.testing.assert_close(cp(x), y, rtol=0, atol=0)
        assert cp.packed_weight(x) is not None
        cp.linear.weight.data.mul_(2)  # the copy's weights are its own
        torch.testing.assert_close(packed(x), y, rtol=0, atol=0)
        repack(cp.linear)


@needs_packing
def test_repack_reaches_the_context_manager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad(), packed_linears(model):
        model(x)
        model[0].weight.data.view(-1)[_unsampled(model[0])] += 50.0
        repack(model)
        y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), **TOL[torch.float32])


@needs_packing
def test_group_checks_its_linears_at_once():
    """A group compares the sampled bytes of all its linears in one go and repacks only the changed ones; while it
    is active its linears skip their own check (the owner checked before the batch)."""
    lins = [_linear(64, 48, torch.float32, seed=s) for s in range(3)]
    packed = [PackedLinear(lin) for lin in lins]
    group = PackedGroup()
    for p in packed:
        group.add(p)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for p in packed:
            p(x)
        first = [p.packed_weight(x) for p in packed]
        group.check()
        assert [p._packed for p in packed] == first  # nothing changed: nothing repacked
        lins[1].weight.data.mul_(-1)
        group.check()
        assert packed[0]._packed is first[0] and packed[2]._packed is first[2] and packed[1]._packed is None
        for p, lin in zip(packed, lins):
            torch.testing.assert_close(p(x), lin(x), **TOL[torch.float32])
        group.active = True
        lins[2].weight.data.mul_(-1)
        assert packed[2].packed_weight(x) is first[2]  # during the batch: as checked before it
        group.active = False
        torch.testing.assert_close(packed[2](x), lins[2](x), **TOL[torch.float32])  # after it: its own check


def test_sampled_runs():
    w = torch.arange(10_000, dtype=torch.float32).view(100, 100)
    view = sample_runs(w)
    assert view.shape == (16, 64) and view.dtype == torch.uint8
    assert view.data_ptr() % 64 == w.data_ptr() % 64  # line-aligned runs
    entries = sampled_entries(w)
    assert entries.numel() == 16 * 64 // 4 and torch.equal(sample_runs(w.clone()), view)  # fixed by the size
    small = torch.ones(3, 5)
    assert sample_runs(small).numel() == small.numel() * 4 and sampled_entries(small).numel() == 15


@needs_packing
def test_group_checks_small_and_large_weights_together():
    """A weight of at most FINGERPRINT_RUNS * FINGERPRINT_RUN_BYTES bytes is sampled whole ([1, nbytes]), a larger
    one in runs ([runs, bytes]): one group compares both kinds at once."""
    small, large = _linear(8, 8, torch.float32), _linear(96, 80, torch.float32, seed=1)
    group = PackedGroup()
    runners = [PackedLinear(small), PackedLinear(large)]
    for r in runners:
        group.add(r)
    x_small, x_large = torch.randn(3, 8), torch.randn(3, 96)
    with torch.no_grad():
        runners[0](x_small), runners[1](x_large)
        group.check()
        small.weight.data.mul_(2)  # no version bump: only the fingerprint sees it
        group.check()
        group.active = True
        try:
            torch.testing.assert_close(runners[0](x_small), small(x_small), **TOL[torch.float32])
        finally:
            group.active = False
