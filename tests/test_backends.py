"""Which implementation serves each op, and what every backend must share: the Triton registration rule and its
EVENTFUL_BACKEND_CUDA switch, the import guard without triton, one argument-check op per op with the op's own
arguments, every op sync-free and CUDA-graph capturable with check_index=False (GPU), the C++ CUDA kernels under
compute-sanitizer (GPU), and the Triton kernels compiling for sm_90 (no GPU needed). The ops' results are tested per
op family, on every backend, in tests/test_<family>.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import eventful_kernels  # noqa: F401  (registers torch.ops.eventful)

from op_support import CUDA, ROOT, T

OPS = ("gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
       "token_gate_threshold", "token_delta_gate", "qk_update_", "av_delta_update_")
needs_triton = pytest.mark.skipif(T is None, reason="needs triton")


def _run_python(code: str, **env) -> str:
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_check_op_with_its_arguments(name):
    """_check_<op> (csrc/ops.cpp derives it from the op's schema): the same arguments, defaults and keywords, no
    alias annotations, no returns; registered for every device at once."""
    op = getattr(torch.ops.eventful, name).default._schema
    check = getattr(torch.ops.eventful, "_check_" + name.rstrip("_")).default._schema
    assert [(a.name, str(a.type), a.default_value, a.kwarg_only) for a in check.arguments] == \
        [(a.name, str(a.type), a.default_value, a.kwarg_only) for a in op.arguments]
    assert all(a.alias_info is None for a in check.arguments) and not check.returns
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::_check_{name.rstrip('_')}",
                                                          "CompositeImplicitAutograd")


def test_check_ops_read_metadata_only_on_meta_tensors():
    """Metadata checks need no data: meta tensors pass or fail exactly as real ones (index values unchecked)."""
    x = torch.empty(2, 6, 4, device="meta")
    idx = torch.empty(2, 3, dtype=torch.long, device="meta")
    torch.ops.eventful._check_gather_rows(x, idx, check_index=False)
    with pytest.raises(RuntimeError, match="eventful: argument 'index' has size 3 at dim 0 but the batch size"):
        torch.ops.eventful._check_gather_rows(x, torch.empty(3, 3, dtype=torch.long, device="meta"), check_index=False)


@needs_triton
def test_registration_rule():
    from eventful_kernels.triton import _register
    assert _register.should_register("auto", has_cpp_cuda_kernel=False)
    assert not _register.should_register("auto", has_cpp_cuda_kernel=True)
    assert _register.should_register("triton", has_cpp_cuda_kernel=True)
    assert not _register.should_register("cuda", has_cpp_cuda_kernel=False)
    assert set(_register.KERNELS) == set(T.OPS) == set(OPS)
    if not CUDA:
        return  # nothing is registered without a GPU
    backend = _register.backend_from_env()
    cpp = _register.cpp_cuda_kernels()
    usable = backend != "auto" or _register.cpp_cuda_covers_devices()
    assert T.registered_ops() == [n for n in T.OPS if _register.should_register(backend, cpp[n] and usable)]
    for name in T.registered_ops():  # a CUDA kernel now exists for every op Triton took
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eventful::{name}", "CUDA")


@needs_triton
def test_cuda_arch_coverage_rule():
    """A binary sm_XY runs on X.Y and later minors of X, PTX compute_XY on X.Y and later, sm_XYa on X.Y only."""
    from eventful_kernels.triton._register import arch_covers
    default = ["sm_80", "sm_90", "compute_90"]  # setup.py's DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
    assert arch_covers(default, (8, 0)) and arch_covers(default, (8, 6)) and arch_covers(default, (8, 9))
    assert arch_covers(default, (9, 0)) and arch_covers(default, (10, 0)) and arch_covers(default, (12, 0))
    assert not arch_covers(default, (7, 5)) and not arch_covers(default, (7, 0))
    assert not arch_covers(["sm_90"], (10, 0)) and not arch_covers(["sm_90"], (8, 9))
    assert arch_covers(["sm_100"], (10, 3)) and not arch_covers(["sm_100"], (12, 0))
    assert arch_covers(["sm_90a"], (9, 0)) and not arch_covers(["sm_90a"], (10, 0))
    assert not arch_covers(["compute_90a"], (10, 0)) and not arch_covers([], (9, 0))
    assert arch_covers(["lto_90"], (7, 0))  # a form it does not know: never refuse on a guess


_FAKE_NVML = r"""
/* libnvidia-ml.so.1 stand-in: two GPUs, capabilities 9.0 and 7.5 (device 1 fails when FAKE_NVML_FAIL is set) */
#include <stdlib.h>
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned int* n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void** h) { *h = (void*)(long)(i + 1); return 0; }
int nvmlDeviceGetCudaComputeCapability(void* h, int* major, int* minor) {
  if ((long)h == 2 && getenv("FAKE_NVML_FAIL")) return 999;
  *major = (long)h == 1 ? 9 : 7; *minor = (long)h == 1 ? 0 : 5; return 0;
}
"""


@needs_triton
def test_import_on_a_cuda_machine_registers_triton():
    """``import eventful_kernels`` where CUDA is available registers the Triton kernels while the package is still
    being imported (no GPU needed to register them): everything that path calls must work on a half-imported
    package."""
    out = _run_python("import json, torch; torch.cuda.is_available = lambda: True\n"
                      "import eventful_kernels, eventful_kernels.triton as t\n"
                      "print(json.dumps([t.AVAILABLE, t.registered_ops(), t._register.cpp_cuda_kernels(),\n"
                      "                  t._register.cpp_cuda_covers_devices()]))", EVENTFUL_BACKEND_CUDA="auto")
    available, registered, cpp, covers = json.loads(out.strip().splitlines()[-1])
    assert available and covers and sorted(cpp) == sorted(OPS)
    assert sorted(registered) == sorted(n for n, has in cpp.items() if not has)  # auto: Triton fills the gaps
    assert set(registered) >= {"qk_update_", "av_delta_update_"}  # no C++ CUDA kernel in any build


@needs_triton
def test_gpu_capabilities_read_through_nvml(tmp_path):
    """The capabilities come from NVML through ctypes (no CUDA context at import); any NVML error means unknown."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "nvml.c").write_text(_FAKE_NVML)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libnvidia-ml.so.1"), str(tmp_path / "nvml.c")],
                   check=True)
    code = "from eventful_kernels.triton import _register as r; print(r._nvml_capabilities())"
    env = {"LD_LIBRARY_PATH": str(tmp_path) + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")}
    assert _run_python(code, **env).strip().splitlines()[-1] == "[(9, 0), (7, 5)]"
    assert _run_python(code, FAKE_NVML_FAIL="1", **env).strip().splitlines()[-1] == "None"


@needs_triton
def test_cpp_cuda_kernels_set_aside_on_an_uncovered_gpu(monkeypatch):
    """Under EVENTFUL_BACKEND_CUDA=auto the C++ CUDA kernels serve a GPU only if compiled for it; when the library
    or the devices do not say, they are trusted (as before the library recorded its targets)."""
    from eventful_kernels.triton import _register
    monkeypatch.setattr(_register, "library_cuda_archs", lambda: ["sm_80", "sm_90", "compute_90"])
    for caps, covered in (([(9, 0)], True), ([(8, 6), (9, 0)], True), ([(9, 0), (7, 5)], False), (None, True)):
        monkeypatch.setattr(_register, "device_capabilities", lambda caps=caps: caps)
        assert _register.cpp_cuda_covers_devices() == covered, caps
    monkeypatch.setattr(_register, "device_capabilities", lambda: [(7, 5)])
    for archs, covered in (([], True), (None, True), (["sm_75"], True), (["sm_80"], False)):
        monkeypatch.setattr(_register, "library_cuda_archs", lambda archs=archs: archs)
        assert _register.cpp_cuda_covers_devices() == covered, archs


def test_import_without_triton_never_fails():
    out = _run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, eventful_kernels.triton as T\n"
        "assert not T.AVAILABLE and isinstance(T.IMPORT_ERROR, ImportError) and T.registered_ops() == []\n"
        "try:\n    T.gather_rows\nexcept ImportError as e:\n    print('guarded:', e)\n")
    assert "guarded: eventful_kernels.triton.gather_rows: triton is not available" in out


@needs_triton
@pytest.mark.skipif(not CUDA, reason="the Triton kernels register for CUDA only")
def test_backend_flag_cuda_registers_nothing_and_bad_value_raises():
    out = _run_python("import eventful_kernels.triton as T; print(T.registered_ops())", EVENTFUL_BACKEND_CUDA="cuda")
    assert out.strip() == "[]"
    out = _run_python("import eventful_kernels.triton as T; print(len(T.registered_ops()))",
                      EVENTFUL_BACKEND_CUDA="triton")
    assert out.strip() == str(len(T.OPS))
    with pytest.raises(AssertionError, match="EVENTFUL_BACKEND_CUDA must be one of"):
        _run_python("import eventful_kernels.triton", EVENTFUL_BACKEND_CUDA="tritonn")


@needs_triton
@pytest.mark.skipif(CUDA, reason="CPU-only check")
def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    from eventful_kernels.triton import _runtime
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _runtime.require_launchable(torch.randn(1, 3, 2))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("EVENTFUL_BACKEND_CUDA", "").lower() == "triton", reason="Triton serves CUDA")
@pytest.mark.parametrize("name", ["gather_rows", "scatter_rows_", "gather_cols", "scatter_cols_", "token_gate"])
def test_cuda_kernel_is_the_cpp_one(name):
    """The extension is built with its CUDA kernels (setup.py does so when torch has CUDA and nvcc exists)."""
    dump = torch._C._dispatch_dump(f"eventful::{name}")
    cuda_line = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert cuda_line and "csrc/cuda/" in cuda_line[0], dump


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_cuda_kernels_clean_under_compute_sanitizer():
    """Every C++ CUDA kernel on odd shapes and layouts (vector and element paths, K = 0 and N, empty slots, unchecked
    out-of-range ids, rejected scatters) under memcheck and racecheck: no out-of-bounds access, no hazard."""
    code = textwrap.dedent(
        """
        import torch, eventful_kernels
        from eventful_kernels import ops
        g = torch.Generator().manual_seed(0)
        def r(*s): return torch.randn(*s, generator=g).cuda()
        for dt in (torch.float32, torch.float16):
            x = r(2, 3, 9, 33).to(dt)[..., 1:]
            for K in (0, 5, 9):
                idx = torch.stack([torch.randperm(9, generator=g)[:K] for _ in range(2)]).cuda()
                y = ops.gather_rows(x, idx); ops.scatter_rows_(x, idx, y)
                a = x.transpose(-1, -2)
                z = ops.gather_cols(a, idx); ops.scatter_cols_(a, idx, z)
                for bad in (-1, 9, -5, 2**40):
                    pidx = idx.clone(); pidx[:, ::2] = bad
                    kw = dict(check_index=bad == -1 and K % 2 == 0)
                    y = ops.gather_rows(x, pidx, **kw); ops.scatter_rows_(x, pidx, y, **kw)
                    z = ops.gather_cols(a, pidx, **kw); ops.scatter_cols_(a, pidx, z, **kw)
            c = r(2, 50, 40).to(dt)
            for k in (0, 7, 50):
                ops.token_gate(c, r(2, 50, 40).to(dt), k)
            try:
                ops.scatter_rows_(x, torch.tensor([[0, 9], [1, 1]]).cuda(), r(2, 3, 2, 32).to(dt))
            except (IndexError, RuntimeError):
                pass
        torch.cuda.synchronize()
        print("DONE")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # exact allocation bounds for memcheck
    for tool in ("memcheck", "racecheck"):
        proc = subprocess.run(
            ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", code],
            capture_output=True, text=True, timeout=900, env=env,
        )
        assert proc.returncode == 0 and "DONE" in proc.stdout, (tool, proc.stdout[-4000:], proc.stderr[-4000:])


@needs_triton
@pytest.mark.skipif(CUDA, reason="on a GPU the kernels compile for real in the op tests")
def test_every_triton_kernel_compiles_for_sm90():
    """Runs tests/triton_compile_check.py (real compiler, ptxas, sm_90 target) in a process without the
    interpreter: first config of each autotuned kernel here; `--all-configs` in the slow variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_compile_check.py")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout


def _unchecked_state():
    g = torch.Generator().manual_seed(25)
    idx = torch.stack([torch.randperm(64, generator=g)[:16] for _ in range(2)]).cuda()
    idx[0, :3] = -1
    t = {"x": torch.randn(2, 64, 32, generator=g).half().cuda(), "idx": idx,
         "a": torch.rand(2, 2, 64, 64, generator=g).half().cuda(),
         "q": torch.randn(2, 2, 64, 64, generator=g).half().cuda(),
         "k": torch.randn(2, 2, 64, 64, generator=g).half().cuda()}
    t.update(dst=t["x"].clone(), ref=t["x"] + 1, a_ref=t["a"].flip(-1).contiguous(),
             logits=torch.randn(2, 2, 64, 64, generator=g).half().cuda(), out=t["q"].clone(), v_ref=t["k"] * 2)
    return t


def _unchecked_step(ops_, t):
    """One call of every op with check_index=False (and the gates, which take no index); returns the outputs."""
    y = ops_.gather_rows(t["x"], t["idx"], check_index=False)
    ops_.scatter_rows_(t["dst"], t["idx"], y, check_index=False)
    z = ops_.gather_cols(t["a"], t["idx"], check_index=False)
    ops_.scatter_cols_(t["a_ref"], t["idx"], z, check_index=False)
    gate = ops_.token_gate(t["x"], t["ref"], 8)
    thr = ops_.token_gate_threshold(t["x"], t["ref"], 1.0, 16)
    delta = ops_.token_delta_gate(t["x"], t["ref"], -1, t["idx"], check_index=False)
    ops_.qk_update_(t["logits"], t["q"], t["k"], t["idx"], t["idx"], 0.125, check_index=False)
    ops_.av_delta_update_(t["out"], t["a"], t["a_ref"], t["k"], t["v_ref"], t["idx"], check_index=False)
    return [y, z, *gate, *thr, *delta]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["ops", "triton"])
def test_unchecked_ops_need_no_host_sync_and_capture_in_a_cuda_graph(which):
    """check_index=False makes every op sync-free and CUDA-graph capturable: a replayed graph gives the eager
    results. ``ops``: torch.ops.eventful (C++ CUDA or Triton kernels); ``triton``: the Triton functions."""
    if which == "triton" and T is None:
        pytest.skip("needs triton")
    from eventful_kernels import ops
    ops_ = ops if which == "ops" else T
    t = _unchecked_state()
    _unchecked_step(ops_, {k: v.clone() for k, v in t.items()})  # warm up (compile, autotune)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _unchecked_step(ops_, {k: v.clone() for k, v in t.items()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_state = {k: v.clone() for k, v in t.items()}
    eager = _unchecked_step(ops_, eager_state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs asks
        _unchecked_step(ops_, {k: v.clone() for k, v in t.items()})
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _unchecked_step(ops_, t)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager, strict=True):
        assert torch.equal(x, y)
    for k in t:
        assert torch.equal(t[k], eager_state[k])
