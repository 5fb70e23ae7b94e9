"""The C++ API (<eventful/ops.h>, <eventful/checks.h>): a third-party extension (tests/cpp_api/client.cpp), built
with torch.utils.cpp_extension against eventful_kernels.get_include() only, calls every op from C++ through the
dispatcher. Its results and state writes equal the Python op's exactly (same kernels), on CPU and on CUDA where
present, with the same checks, autograd guard and version-counter bumps."""
import hashlib
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import eventful_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cpp_api", "client.cpp")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def client_library():
    """Builds (ninja, cached in the temp dir per checkout and torch) and loads the client; returns its path."""
    pytest.importorskip("ninja")
    from torch.utils import cpp_extension

    key = hashlib.sha1(f"{eventful_kernels.get_include()} {torch.__version__} {sys.version}".encode()).hexdigest()
    build = os.path.join(tempfile.gettempdir(), f"eventful-cpp-api-{key[:12]}")
    os.makedirs(build, exist_ok=True)
    cpp_extension.load(
        name="eventful_cpp_api_client",
        sources=[SOURCE],
        extra_include_paths=[eventful_kernels.get_include()],
        extra_cflags=["-O1"],
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    path = os.path.join(build, "eventful_cpp_api_client.so")
    assert os.path.exists(path)
    return path


def _index(rows, device, dtype=torch.int64):
    return torch.tensor(rows, dtype=dtype, device=device)


def _cases(device):
    """(op name, args, kwargs) covering every op, with empty slots, int32 indices, optionals and keywords."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, H, N, D = 2, 3, 6, 5
    idx = _index([[4, -1, 0], [5, 2, 1]], device)
    idx32 = _index([[1, 3, 0], [2, -1, 5]], device, torch.int32)
    c, ref = randn(B, N, D), randn(B, N, D)
    q, k = randn(B, H, N, D), randn(B, H, N, D)
    rel_h, rel_w = randn(B, H, N, 2), randn(B, H, N, 3)  # Gh * Gw = N
    a_ref, v_ref = randn(B, H, N, N), randn(B, H, N, D)
    linear = []
    if device == "cpu":  # linear_bf16 is a CPU kernel
        w = randn(20, D).bfloat16()
        packed = torch.ops.eventful.linear_bf16_pack(w)
        linear = [("linear_bf16_pack", (w,), {}),
                  ("linear_bf16", (randn(B, N, D).bfloat16(), packed, randn(20), 20), {"activation": "gelu"}),
                  ("linear_bf16", (randn(B, D).bfloat16(), packed, None, 20), {})]
    return linear + [
        ("gather_rows", (randn(B, H, N, D), idx), {}),
        ("gather_rows", (randn(B, N, D), idx32), {"check_index": False}),
        ("scatter_rows_", (randn(B, N, D), idx32, randn(B, 3, D)), {}),
        ("scatter_rows_residual_", (randn(B, N, D), idx, randn(B, 3, D), randn(B, N, D)), {}),
        ("scatter_rows_residual_", (randn(B, N, D), idx32, randn(B, 3, D), randn(B, N, D), randn(D)),
         {"check_index": False}),
        ("gather_cols", (randn(B, H, N, N), idx), {}),
        ("scatter_cols_", (randn(B, H, N, N), idx, randn(B, H, N, 3)), {"check_index": False}),
        ("token_gate", (c, ref, 3), {}),
        ("token_gate_threshold", (c, ref, 2.5, 4), {}),
        ("token_delta_gate", (c, ref, 2), {}),
        ("token_delta_gate", (c, ref, -1, idx), {"check_index": True}),
        ("qk_update_", (randn(B, H, N, N), q, k, idx, idx32, 0.5), {}),
        ("qk_update_", (randn(B, H, N, N), q, k, idx32, idx, 0.25, rel_h, rel_w), {}),
        ("av_delta_update_", (a_ref @ v_ref, randn(B, H, N, N), a_ref, randn(B, H, N, D), v_ref, idx), {}),
    ]


def _mutated(name):
    schema = getattr(torch.ops.eventful, name).default._schema
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_from_cpp_equals_the_python_op(client_library, device):
    for name, args, kwargs in _cases(device):
        py_args, cpp_args = _clone_args(args), _clone_args(args)
        with torch.no_grad():
            expected = getattr(torch.ops.eventful, name)(*py_args, **kwargs)
            got = getattr(torch.ops.eventful_client, name)(*cpp_args, **kwargs)
        if expected is None:
            assert got is None, name
        else:
            assert len(_as_tuple(got)) == len(_as_tuple(expected)), name
            for e, r in zip(_as_tuple(expected), _as_tuple(got)):
                assert e.dtype == r.dtype and e.device == r.device and torch.equal(e, r), name
        for i in _mutated(name):
            assert torch.equal(py_args[i], cpp_args[i]), f"{name}: argument {i} after the call"
            assert not torch.equal(py_args[i], args[i]), f"{name}: argument {i} was not written (a test that can fail)"


@pytest.mark.parametrize("device", DEVICES)
def test_cpp_calls_check_arguments_and_bump_versions(client_library, device):
    x = torch.randn(2, 6, 5, device=device)
    with pytest.raises(IndexError, match="argument 'index' holds 6"):
        torch.ops.eventful_client.gather_rows(x, _index([[6], [0]], device))
    src = torch.randn(2, 1, 5, device=device)
    dst = x.clone()
    before = dst._version
    torch.ops.eventful_client.scatter_rows_(dst, _index([[1], [2]], device), src)
    assert dst._version == before + 1
    assert torch.equal(dst[0, 1], src[0, 0]) and torch.equal(dst[1, 2], src[1, 0])
    with pytest.raises(RuntimeError, match="argument 'src' requires grad"):
        torch.ops.eventful_client.scatter_rows_(dst, _index([[1], [2]], device), src.requires_grad_())


def test_client_validates_with_eventful_checks(client_library):
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    index = _index([[3, 0], [1, 1]], "cpu")
    assert torch.equal(torch.ops.eventful_client.checked_rows(x, index), torch.ops.eventful.gather_rows(x, index))
    with pytest.raises(RuntimeError, match="argument 'x' must be float32, float16 or bfloat16, got Long"):
        torch.ops.eventful_client.checked_rows(x.long(), index)
    with pytest.raises(RuntimeError, match="argument 'index' has size 1 at dim 0 but the batch size of 'x' is 2"):
        torch.ops.eventful_client.checked_rows(x, index[:1])
    with pytest.raises(IndexError, match=r"argument 'index' holds 4 at \[1, 0\], out of range \[0, 4\)"):
        torch.ops.eventful_client.checked_rows(x, _index([[0, 0], [4, 0]], "cpu"))


def _run(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_cpp_api_without_python_package(client_library):
    """A C++-only user loads the library from get_library_path(); before that, a call names what is missing."""
    code = f"""
import torch
torch.ops.load_library({client_library!r})
x, index = torch.arange(12.).reshape(1, 4, 3), torch.tensor([[2, 0]])
try:
    torch.ops.eventful_client.gather_rows(x, index)
except RuntimeError as e:
    print("before:", str(e).splitlines()[0])
torch.ops.load_library({eventful_kernels.get_library_path()!r})
print("after:", torch.ops.eventful_client.gather_rows(x, index).flatten().tolist())
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("before: eventful: op eventful::gather_rows is not registered: import eventful_kernels")
    assert lines[1] == "after: [6.0, 7.0, 8.0, 0.0, 1.0, 2.0]"
