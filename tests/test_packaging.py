"""Packaging: the wheel holds the library, the public headers and metadata that accepts any tested torch; installed
(extracted) outside the checkout it imports, runs the ops and reports itself; a source checkout without a built
library (Python started in it after a non-editable install) uses the installed copy's library."""
import glob
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile

import pytest
import torch

import eventful_kernels
from eventful_kernels import _load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = """
import os, sys, torch, eventful_kernels as ek
from eventful_kernels import ops
x, i = torch.arange(24.).reshape(2, 4, 3), torch.tensor([[3, -1], [0, 2]])
assert ops.gather_rows(x, i).tolist() == [[[9., 10., 11.], [0., 0., 0.]], [[12., 13., 14.], [18., 19., 20.]]]
cols = torch.tensor([[2, -1], [0, 1]])
assert ops.gather_cols(x, cols[:, :1]).flatten().tolist() == [2., 5., 8., 11., 12., 15., 18., 21.]
assert ops.scatter_rows_(x.clone(), i, torch.ones(2, 2, 3))[0, 3].tolist() == [1., 1., 1.]
assert ops.scatter_cols_(x.clone(), cols, torch.ones(2, 4, 2))[1, :, :2].eq(1).all()
ref = torch.zeros_like(x)
idx, c_sel = ops.token_gate(x, ref.clone(), 1)
assert idx.tolist() == [[3], [3]] and torch.equal(c_sel[:, 0], x[:, 3])
assert ops.token_gate_threshold(x, ref.clone(), 20.0, 4)[1].tolist() == [0, 4]
assert ops.token_delta_gate(x, ref.clone(), 2)[0].tolist() == [[2, 3], [2, 3]]
q = torch.randn(2, 1, 4, 3)
logits = torch.zeros(2, 1, 4, 4)
ops.qk_update_(logits, q, q, torch.tensor([[0, 1, 2, 3]] * 2), torch.tensor([[0, 1, 2, 3]] * 2), 1.0)
assert torch.allclose(logits, q @ q.transpose(-1, -2))
out, a_ref, v_ref = torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3)
ops.av_delta_update_(out, logits, a_ref, q, v_ref, torch.tensor([[0, 1, 2, 3]] * 2))
assert torch.allclose(out, logits @ q, atol=1e-5)
d = ek.info(as_dict=True)
ek.info()
print("package", os.path.dirname(ek.__file__))
print("library", ek.get_library_path())
print("include", ek.get_include())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds the wheel as `pip install --no-build-isolation .` does it, into a temporary folder. This compiles the
    library unless build/ holds the objects of an earlier non-editable build (then ~30 s): 8 min on a busy 2-core
    machine after install.sh, whose editable build compiles in a temporary folder."""
    out = tmp_path_factory.mktemp("wheel")
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), ROOT],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"wheel built in {time.perf_counter() - t0:.1f} s")
    (path,) = glob.glob(str(out / "eventful_kernels-*.whl"))
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    """The wheel installed as pip installs a wheel without scripts: extracted into a folder on the path."""
    folder = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder)
    return str(folder)


def _python(code, cwd, pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def _paths(stdout):
    return dict(line.split(" ", 1) for line in stdout.splitlines() if line.split(" ", 1)[0] in
                ("package", "library", "include"))


@pytest.mark.slow
def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(re.fullmatch(r"eventful_kernels/_C\..*\.so", n) for n in names)
    for header in glob.glob(os.path.join(ROOT, "csrc", "include", "eventful", "*.h")):
        assert f"eventful_kernels/include/eventful/{os.path.basename(header)}" in names
    assert {"eventful_kernels/include/eventful/ops.h", "eventful_kernels/include/eventful/checks.h"} <= names
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "eventful_kernels", "**", "*.py"),
                                                           recursive=True)}
    assert sources <= names and "eventful_kernels/__main__.py" in names
    assert not any(n.startswith(("tests/", "csrc/", "benchmarks/")) for n in names)
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    assert "torch>=2.11" in requires and not any(r.startswith("torch==") for r in requires)
    assert "eventful-video = eventful_kernels.cli:main" in entry_points


def test_build_requires_no_torch():
    """An isolated build must never download torch (a CUDA build from PyPI): the build uses the installed one."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    requires = re.search(r"^requires = \[(.*)\]$", text, re.M).group(1)
    assert "torch" not in requires and "setuptools" in requires


@pytest.mark.slow
def test_installed_wheel_outside_checkout(site, tmp_path):
    result = _python(SMOKE, cwd=str(tmp_path), pythonpath=site)
    assert result.returncode == 0, result.stderr
    paths = _paths(result.stdout)
    assert paths["package"] == os.path.join(site, "eventful_kernels")
    assert paths["library"].startswith(paths["package"] + os.sep)
    assert paths["include"] == os.path.join(site, "eventful_kernels", "include")
    assert "cpu_gate_path: " in result.stdout


@pytest.mark.slow
def test_checkout_without_library_uses_installed_copy(site, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "eventful_kernels"), checkout / "eventful_kernels",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc", "include"), checkout / "csrc" / "include")
    result = _python(SMOKE, cwd=str(checkout), pythonpath=site)
    assert result.returncode == 0, result.stderr
    paths = _paths(result.stdout)
    assert paths["package"] == str(checkout / "eventful_kernels")  # the checkout's package is the one imported
    assert paths["library"].startswith(os.path.join(site, "eventful_kernels") + os.sep)
    assert paths["include"] == str(checkout / "csrc" / "include")
    alone = _python("import eventful_kernels", cwd=str(checkout), pythonpath=None)
    assert alone.returncode != 0 and "compiled library _C not found" in alone.stderr


def test_library_built_for_another_torch(tmp_path, monkeypatch):
    """A library that cannot load, or was built against another torch minor version, is reported as such."""
    built = _load.library_facts(eventful_kernels.get_library_path())["torch_built_against"]
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu130")
    with pytest.warns(RuntimeWarning, match=rf"built against torch {re.escape(built)} but torch 2.99.0\+cu130"):
        _load.load_native()
    monkeypatch.setattr(torch, "__version__", built + ".post1+cu130")  # same minor version: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load.load_native()

    package = tmp_path / "eventful_kernels"
    shutil.copytree(os.path.join(ROOT, "eventful_kernels"), package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (package / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a shared library")
    result = _python("import eventful_kernels", cwd=str(tmp_path), pythonpath=None)
    assert result.returncode != 0
    assert "ImportError: eventful_kernels: cannot load" in result.stderr and "rebuild it" in result.stderr
