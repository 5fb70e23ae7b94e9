"""Compile-check of the CUDA sources with nvcc (tools/check_cuda_compile.py), so csrc/cuda cannot rot on CPU-only CI.

Needs nvcc, not a GPU: a CPU build of torch ships the headers the kernels use. Skips only when nvcc is absent.
"""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "check_cuda_compile.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import check_cuda_compile  # noqa: E402

NVCC = check_cuda_compile.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set NVCC/CUDA_HOME)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=1500)


@needs_nvcc
def test_every_cuda_source_compiles():
    units = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert units, "no csrc/cuda/*.cu found"
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for unit in units + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))):
        assert f"ok   {os.path.relpath(unit, ROOT)}" in proc.stdout, proc.stdout


@needs_nvcc
def test_checker_reports_a_broken_unit(tmp_path):
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* p) { p[0] = undefined_name; }\n")
    proc = _run(str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "undefined_name" in proc.stdout
