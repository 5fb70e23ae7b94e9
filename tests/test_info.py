"""eventful_kernels.info(): the report a bug report needs, checked against independent sources (the schemas in
csrc/ops.cpp, pyproject.toml, /proc/cpuinfo, the installed torch and triton)."""
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys

import torch

import eventful_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_versions_library_and_ops():
    d = eventful_kernels.info(as_dict=True)
    json.dumps(d)  # plain values only
    version = re.search(r'^version = "([^"]+)"', _read("pyproject.toml"), re.M).group(1)
    ek = d["eventful_kernels"]
    assert ek["version"] == version == eventful_kernels.__version__
    assert ek["library"] == eventful_kernels.get_library_path() and os.path.isfile(ek["library"])
    assert os.path.isfile(os.path.join(ek["include"], "eventful", "ops.h"))
    assert ek["ops"] == sorted(re.findall(r'define\(m,\s*"(\w+)\(', _read("csrc/ops.cpp")))
    assert d["torch"]["version"] == torch.__version__ and d["torch"]["cuda"] == torch.version.cuda
    assert d["build"]["torch_built_against"] == torch.__version__.split("+")[0]
    assert d["python"]["version"] == platform.python_version()


def test_cpu_gate_paths():
    build = eventful_kernels.info(as_dict=True)["build"]
    if platform.machine() != "x86_64":
        assert build["cpu_gate_paths"] == ["generic"] and build["cpu_gate_path"] == "generic"
        return
    assert build["cpu_gate_paths"] == ["avx2", "generic"]
    flags = set(re.search(r"^flags\s*:(.*)$", _read("/proc/cpuinfo"), re.M).group(1).split())
    assert build["cpu_gate_path"] == ("avx2" if {"avx2", "fma", "f16c"} <= flags else "generic")


def test_cuda_and_triton():
    d = eventful_kernels.info(as_dict=True)
    assert d["cuda"]["available"] == torch.cuda.is_available()
    assert len(d["cuda"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(d["cuda"]["cpp_kernels"]) <= set(d["eventful_kernels"]["ops"])
    if torch.version.cuda is None:
        assert d["cuda"]["cpp_kernels"] == []
    archs = d["build"]["cuda_archs"]  # the nvcc targets recorded at build time; none in a CPU-only build
    assert (archs == []) == (d["cuda"]["cpp_kernels"] == [])
    assert all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in archs)
    assert d["cuda"]["cpp_kernels_cover_devices"] in ((None,) if not torch.cuda.is_available() else (True, False))
    triton = d["triton"]
    try:
        assert triton["version"] == importlib.metadata.version("triton") and triton["installed"]
    except importlib.metadata.PackageNotFoundError:
        assert triton["version"] is None
    loaded = sys.modules.get("eventful_kernels.triton")
    if loaded is None:
        assert triton["interpreter"] == (os.environ.get("TRITON_INTERPRET") == "1")
        assert triton["serves_cuda_ops"] == []
    else:
        assert triton["interpreter"] == loaded.INTERPRET
        assert triton["serves_cuda_ops"] == sorted(loaded.registered_ops())


def test_env_variables(monkeypatch):
    monkeypatch.setenv("EVENTFUL_BACKEND_CUDA", "triton")
    monkeypatch.delenv("EVENTFUL_PACKED_LINEAR", raising=False)
    env = eventful_kernels.info(as_dict=True)["env"]
    assert env["EVENTFUL_BACKEND_CUDA"] == "triton" and "EVENTFUL_PACKED_LINEAR" not in env


def test_printed_report(capsys):
    assert eventful_kernels.info() is None
    text = capsys.readouterr().out
    d = eventful_kernels.info(as_dict=True)
    assert f"  version: {eventful_kernels.__version__}" in text
    assert f"  library: {eventful_kernels.get_library_path()}" in text
    assert f"  cpu_gate_path: {d['build']['cpu_gate_path']}" in text
    assert f"  version: {torch.__version__}" in text
    assert "  ops: " + ", ".join(d["eventful_kernels"]["ops"]) in text


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "eventful_kernels"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("eventful_kernels:\n")
    assert f"  library: {eventful_kernels.get_library_path()}" in out.stdout
    assert "triton:\n" in out.stdout and "cpu_gate_path: " in out.stdout
