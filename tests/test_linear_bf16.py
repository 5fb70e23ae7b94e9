"""linear_bf16_pack / linear_bf16 (CPU) against eventful_kernels.reference, and the layers that use them: packed
bf16 linears (PackedLinear on a CPU without native bf16) and the patch embedding as a packed linear
(PackedConv)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)
from eventful_kernels import ops
from eventful_kernels import reference as R
from eventful_kernels.nn import linear as L

E = torch.ops.eventful
BF16 = torch.bfloat16
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def _assert_bf16_close(got, want):
    """One rounding to bf16 of float32 values that differ by summation order / the activation's approximation:
    one bf16 ulp (2^-8 relative), plus 1e-6 absolute for gelu_tanh's far negative tail, which the kernel evaluates
    as v * sigmoid(2u) (it keeps values like -3.5e-12 that the reference's 0.5 v (1 + tanh u) cancels to 0)."""
    assert got.dtype == want.dtype == BF16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def _data(lead, k, n, seed=0, bias_dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(BF16)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(BF16)
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, w, b


@pytest.mark.parametrize("n,k", [(16, 8), (33, 40), (2304, 768), (768, 3072), (5, 1), (1, 17), (0, 8)])
def test_pack_matches_reference(n, k):
    _, w, _ = _data((1,), k, n)
    packed = ops.linear_bf16_pack(w)
    assert torch.equal(packed, R.linear_bf16_pack(w))
    assert packed.shape == (-(-n // 16), k, 16)
    assert torch.equal(R.linear_bf16_unpack(packed, n), w)


def test_pack_reads_strided_weights():
    _, w, _ = _data((1,), 48, 40)
    wt = w.t().contiguous().t()  # column-major
    assert torch.equal(ops.linear_bf16_pack(wt), R.linear_bf16_pack(w))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,n", [((49,), 768, 2304), ((2, 197), 64, 96), ((3, 5), 40, 33), ((1,), 3072, 40),
                                      ((7,), 1, 17), ((97,), 24, 16), ((2, 3, 4), 16, 31)])
@pytest.mark.parametrize("bias_dtype", [BF16, torch.float32, None])
def test_matches_reference(lead, k, n, activation, bias_dtype):
    x, w, b = _data(lead, k, n, bias_dtype=bias_dtype)
    packed = ops.linear_bf16_pack(w)
    got = ops.linear_bf16(x, packed, b, n, activation)
    _assert_bf16_close(got, R.linear_bf16(x, packed, b, n, activation))
    assert got.shape == (*lead, n)


@pytest.mark.parametrize("lead,k,n", [((0,), 8, 16), ((4,), 8, 0), ((4,), 0, 20), ((2, 0, 3), 8, 5)])
def test_empty_dims(lead, k, n):
    """No rows, no outputs, or no inputs (then y = act(bias))."""
    x, w, b = _data(lead, k, n)
    packed = ops.linear_bf16_pack(w)
    for act in ACTIVATIONS:
        got = ops.linear_bf16(x, packed, b, n, act)
        assert got.shape == (*lead, n)
        _assert_bf16_close(got, R.linear_bf16(x, packed, b, n, act))


@pytest.mark.parametrize("layout", ["step", "rows", "transposed"])
def test_strided_input(layout):
    x, w, b = _data((6, 40), 32, 48)
    if layout == "step":  # every other element of the last dim: copied to unit stride
        big = torch.zeros(6, 40, 64, dtype=BF16)
        big[..., ::2] = x
        xs = big[..., ::2]
    elif layout == "rows":  # padded rows: read in place through the row stride
        big = torch.zeros(6, 40, 50, dtype=BF16)
        big[..., :32] = x
        xs = big[..., :32]
    else:
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xs.is_contiguous()
    packed = ops.linear_bf16_pack(w)
    _assert_bf16_close(ops.linear_bf16(xs, packed, b, 48, "gelu"), R.linear_bf16(x, packed, b, 48, "gelu"))


def test_special_values():
    """inf/NaN inputs give what float32 arithmetic gives, rounded: NaN stays NaN, overflow is inf."""
    x = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3e38, 3e38]]).to(BF16)
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).to(BF16)
    packed = ops.linear_bf16_pack(w)
    got = ops.linear_bf16(x, packed, None, 2).float()
    assert got[0].tolist() == [3.0, -1.0]
    assert got[1].isnan().all()
    assert got[2, 0] == float("inf") and got[2, 1] == 0.0


@pytest.mark.parametrize("case,error,match", [
    ("x_fp32", RuntimeError, "argument 'x' must be bfloat16, got Float"),
    ("packed_fp32", RuntimeError, "argument 'packed' must be bfloat16"),
    ("packed_shape", RuntimeError, "argument 'packed' must be a contiguous \\[ceil\\(out/16\\), in, 16\\]"),
    ("in_features", RuntimeError, "argument 'packed' has size 32 at dim 1 but the input features of 'x'"),
    ("out_features", ValueError, "argument 'out_features' \\(60\\) does not fit 'packed' \\(3 panels"),
    ("bias_shape", RuntimeError, "argument 'bias' must have shape \\[48\\] \\(out_features\\), got \\[47\\]"),
    ("bias_dtype", RuntimeError, "argument 'bias' must be bfloat16 or float32, got Half"),
    ("activation", ValueError, "argument 'activation' must be 'none', 'relu', 'gelu' or 'gelu_tanh', got 'silu'"),
    ("x_none", TypeError, "argument 'x' must be a Tensor, got None"),
    ("x_scalar", RuntimeError, "argument 'x' must have at least one dim"),
])
def test_bad_input_is_refused(case, error, match):
    x, w, b = _data((4,), 32, 48)
    packed = ops.linear_bf16_pack(w)
    args = dict(x=x, packed=packed, bias=b, out_features=48, activation="none")
    if case == "x_fp32":
        args["x"] = x.float()
    elif case == "packed_fp32":
        args["packed"] = packed.float()
    elif case == "packed_shape":
        args["packed"] = packed.reshape(3, 16, 32)
    elif case == "in_features":
        args["x"] = torch.zeros(4, 31, dtype=BF16)
    elif case == "out_features":
        args["out_features"] = 60
    elif case == "bias_shape":
        args["bias"] = b[:47]
    elif case == "bias_dtype":
        args["bias"] = b.half()
    elif case == "activation":
        args["activation"] = "silu"
    elif case == "x_none":
        args["x"] = None
    elif case == "x_scalar":
        args["x"] = torch.tensor(1.0, dtype=BF16)
    with pytest.raises(error, match=match):
        E.linear_bf16(*args.values())
    with pytest.raises(error, match=match):  # the check op says the same
        E._check_linear_bf16(*args.values())


def test_pack_refuses_bad_weights():
    with pytest.raises(RuntimeError, match="argument 'weight' must be bfloat16, got Float"):
        ops.linear_bf16_pack(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="argument 'weight' must have rank 2"):
        ops.linear_bf16_pack(torch.zeros(4, dtype=BF16))


def test_requires_grad_is_refused():
    x, w, b = _data((4,), 32, 48)
    packed = ops.linear_bf16_pack(w)
    with pytest.raises(RuntimeError, match="argument 'x' requires grad, but eventful ops are inference-only"):
        ops.linear_bf16(x.requires_grad_(), packed, b, 48)
    with torch.no_grad():
        ops.linear_bf16(x, packed, b, 48)


def test_opcheck():
    x, w, b = _data((3, 5), 32, 40)
    packed = ops.linear_bf16_pack(w)
    torch.library.opcheck(E.linear_bf16_pack.default, (w,))
    torch.library.opcheck(E.linear_bf16.default, (x, packed, b, 40, "gelu"))


def test_compiles_fullgraph():
    x, w, b = _data((3, 5), 32, 40)
    packed = ops.linear_bf16_pack(w)
    fn = torch.compile(lambda x: ops.linear_bf16(x, packed, b, 40, "relu") * 2, fullgraph=True, backend="eager")
    assert torch.equal(fn(x), ops.linear_bf16(x, packed, b, 40, "relu") * 2)


def test_threads_do_not_change_the_result():
    x, w, b = _data((197,), 96, 200)
    packed = ops.linear_bf16_pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_bf16(x, packed, b, 200, "gelu")
        torch.set_num_threads(2)
        two = ops.linear_bf16(x, packed, b, 200, "gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ---------------------------------------------------------------- the layers that use it

needs_eventful_bf16 = pytest.mark.skipif(L.bf16_kernel() != "eventful" or not L.packing_enabled(),
                                         reason="this CPU runs bf16 linears on oneDNN (native bf16)")


def test_kernel_choice(monkeypatch):
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "eventful")
    assert L.bf16_kernel() == "eventful"
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "onednn")
    assert L.bf16_kernel() == "onednn"
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "fast")
    with pytest.raises(ValueError, match="EVENTFUL_BF16_LINEAR must be auto, onednn or eventful, got 'fast'"):
        L.bf16_kernel()
    monkeypatch.delenv("EVENTFUL_BF16_LINEAR")
    want = "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "eventful"
    assert L.bf16_kernel() == want


@pytest.mark.parametrize("act", [None, nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU()])
def test_packed_linear_runs_linear_bf16(monkeypatch, act):
    if not L.packing_enabled():
        pytest.skip("packing disabled")
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "eventful")
    torch.manual_seed(0)
    lin = nn.Linear(64, 72).to(BF16).eval()
    runner = L.PackedLinear(lin, act)
    x = torch.randn(2, 49, 64).to(BF16)
    with torch.no_grad():
        got = runner(x)
        assert runner._bf16 and runner.packed_weight(x).shape == (5, 64, 16)
        name = L._ACTIVATION_NAMES[runner._post_op]
        want = R.linear_bf16(x, R.linear_bf16_pack(lin.weight), lin.bias, 72, name)
    _assert_bf16_close(got, want)
    with torch.no_grad():  # a weight write repacks
        lin.weight.mul_(-1)
        _assert_bf16_close(runner(x), R.linear_bf16(x, R.linear_bf16_pack(lin.weight), lin.bias, 72, name))


def _patch_conv(dtype=BF16, bias=True):
    torch.manual_seed(0)
    return nn.Conv2d(3, 48, kernel_size=16, stride=16, bias=bias).to(dtype).eval()


@needs_eventful_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_packed_patch_conv_matches_conv(bias):
    conv = _patch_conv(bias=bias)
    x = torch.randn(2, 3, 64, 48).to(BF16)
    runner = L.PackedConv(conv)
    with torch.no_grad():
        got = runner(x)
        want = F.conv2d(x.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(), stride=16)
    assert got.shape == (2, 48, 4, 3) and runner.linear._bf16
    _assert_bf16_close(got, want.to(BF16))


@needs_eventful_bf16
def test_packed_patch_conv_follows_the_weights():
    conv = _patch_conv()
    x = torch.randn(1, 3, 32, 32).to(BF16)
    runner = L.PackedConv(conv)
    with torch.no_grad():
        runner(x)
        conv.weight.data.mul_(2)  # through .data: no version bump, seen by the fingerprint
        want = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=16).to(BF16)
        _assert_bf16_close(runner(x), want)
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))  # a new Parameter
        want = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=16).to(BF16)
        _assert_bf16_close(runner(x), want)


def test_packed_patch_conv_calls_the_conv_elsewhere():
    """float32, an input the patches do not tile and channels-last weights are the conv's own business."""
    conv = _patch_conv(torch.float32)
    runner = L.PackedConv(conv)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(runner(x), conv(x))
        odd = torch.randn(1, 3, 33, 32).to(BF16)
        conv16 = _patch_conv()
        assert torch.equal(L.PackedConv(conv16)(odd), conv16(odd))
        conv_cl = _patch_conv().to(memory_format=torch.channels_last)  # its weight too: left to the conv
        x16 = torch.randn(1, 3, 32, 32).to(BF16)
        assert torch.equal(L.PackedConv(conv_cl)(x16), conv_cl(x16))
    assert not L.is_patchify_conv(nn.Conv2d(3, 8, 3, stride=1, padding=1))
    assert not L.is_patchify_conv(nn.Conv2d(3, 8, 4, stride=4, groups=1, dilation=2))
    assert L.is_plain_conv(nn.Conv2d(3, 8, 3, stride=1, padding=1)) and L.is_plain_conv(nn.Conv2d(3, 8, 1))
    for conv in (nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(3, 8, 3, padding="same"),
                 nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")):
        assert not L.is_plain_conv(conv)
    with pytest.raises(TypeError, match="ConvLinear needs an nn.Conv2d with one group"):
        L.ConvLinear(nn.Conv2d(4, 8, 3, groups=2))


@needs_eventful_bf16
@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", [
    (3, 1, 1, 1, False), (1, 1, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 2, 2, True), ((3, 1), (1, 2), (1, 0), 1, True),
    (2, 1, "valid", 1, True),
])
def test_packed_conv_matches_conv(kernel, stride, padding, dilation, bias):
    """Convs that are not patchify (SAM's neck: 1x1 and 3x3 padded) unfold their input and run linear_bf16 over it,
    reading the transposed patches in place."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).to(BF16).eval()
    runner = L.PackedConv(conv)
    assert runner.patchify == (kernel == 1)  # a 1x1 conv of stride 1 unfolds by a reshape too
    x = torch.randn(2, 12, 11, 9).to(BF16)
    with torch.no_grad():
        got = runner(x)
        want = F.conv2d(x.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(), stride,
                        padding, dilation)
    assert got.shape == want.shape and runner.linear._bf16
    _assert_bf16_close(got, want.to(BF16))


def test_transposed_rows_are_read_in_place():
    """x [M, K] with strides (1, M) (a transposed view, as unfolded conv patches are) gives what its copy gives."""
    x, w, b = _data((48,), 40, 24)
    xt = x.t().contiguous().t()
    assert xt.stride() == (1, 48)
    packed = ops.linear_bf16_pack(w)
    assert torch.equal(ops.linear_bf16(xt, packed, b, 24, "gelu"), ops.linear_bf16(x, packed, b, 24, "gelu"))
    xe = x[:1].expand(5, 40)  # zero row stride
    assert torch.equal(ops.linear_bf16(xe, packed, b, 24), ops.linear_bf16(x[:1].repeat(5, 1), packed, b, 24))


def test_with_packed_conv_leaves_the_original():
    owner = nn.Module()
    owner.proj = _patch_conv()
    twin = L.copy_module(owner)
    runner = L.with_packed_conv(twin, "proj")
    assert runner is not None and twin.proj is not owner.proj
    assert twin.proj.weight is owner.proj.weight and "forward" not in owner.proj.__dict__
    assert list(twin.state_dict()) == list(owner.state_dict())
    seen = []
    twin.proj.register_forward_hook(lambda *a: seen.append("twin"))
    with torch.no_grad():
        owner.proj(torch.randn(1, 3, 16, 16).to(BF16))
    assert seen == []  # own hook tables
    assert L.with_packed_conv(twin, "missing") is None


def test_deepcopy_keeps_the_patch_conv_runner():
    owner = nn.Module()
    owner.proj = _patch_conv()
    L.with_packed_conv(owner, "proj")
    clone = copy.deepcopy(owner)
    runner = clone.proj.__dict__["forward"]
    assert isinstance(runner, L.PackedConv) and runner.conv is clone.proj
    x = torch.randn(1, 3, 32, 32).to(BF16)
    with torch.no_grad():
        assert torch.equal(clone.proj(x), owner.proj(x))


@pytest.mark.parametrize("family", ["vit", "sam"])
def test_converted_timm_model_runs_its_convs_packed(family):
    """convert() gives the eventful model its own patch embedding and SAM neck (parameters shared, state-dict names
    unchanged) whose convs run as packed linears; the dense model keeps its convs. r = N in bf16 stays within bf16
    rounding of the dense bf16 model, frame after frame."""
    from eventful_kernels.models import convert
    from tiny_timm import tiny_sam, tiny_vit, video

    dense = (tiny_vit() if family == "vit" else tiny_sam()).to(BF16)
    ev = convert(dense, 1.0)
    assert ev.model.patch_embed is not dense.patch_embed and ev.model.patch_embed.proj.weight is \
        dense.patch_embed.proj.weight
    assert isinstance(ev.model.patch_embed.proj.__dict__.get("forward"), L.PackedConv)
    assert "forward" not in dense.patch_embed.proj.__dict__
    if family == "sam":  # the neck's 1x1 and 3x3 convs too, on a copy of the neck
        assert ev.model.neck is not dense.neck
        convs = [m for m in ev.model.neck if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2 and all(isinstance(m.__dict__.get("forward"), L.PackedConv) for m in convs)
        assert not any("forward" in m.__dict__ for m in dense.neck)
    outside = [k for k in dense.state_dict() if not k.startswith("blocks.")]  # eventful blocks wrap theirs
    assert [k for k in ev.model.state_dict() if not k.startswith("blocks.")] == outside
    size = 32 if family == "vit" else 64
    with torch.no_grad():
        for x in video(3, size, batch=2):
            x = x.to(BF16)
            got, want = ev(x).float(), dense(x).float()
            assert float((got - want).norm() / want.norm()) < 2e-2  # bf16 rounding, summed in another order


def test_product_dtype(monkeypatch):
    x16, x32 = torch.zeros(2, dtype=BF16), torch.zeros(2)
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "eventful")
    assert L.product_dtype(x16) == torch.float32 and L.product_dtype(x32) == torch.float32
    assert L.product_dtype(torch.zeros(2, dtype=torch.float16)) == torch.float16
    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "onednn")
    assert L.product_dtype(x16) == BF16


def test_attention_flush_products_round_once_in_bf16(monkeypatch):
    """On a CPU without native bf16 the flush products of the attention state (q kᵀ, A·V) run in float32 and are
    rounded to bf16 once."""
    from eventful_kernels.nn.matmul import MatmulBuffer, MatmulDeltaAccumulator

    monkeypatch.setenv("EVENTFUL_BF16_LINEAR", "eventful")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g).to(BF16) for _ in range(3))
    logits = MatmulBuffer()(q, k, None, None, 0.125)
    assert torch.equal(logits, (q.float() @ k.float().transpose(-1, -2) * 0.125).to(BF16))
    a = torch.softmax(logits.float(), -1).to(BF16)
    out = MatmulDeltaAccumulator()(a, v)
    assert torch.equal(out, (a.float() @ v.float()).to(BF16))
