"""The end-to-end GPU benchmark script runs (on CPU, tiny model, few frames) and writes a complete result file."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytest.importorskip("av")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "benchmarks", "bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_smoke_on_cpu(tmp_path, capsys):
    bench = _bench_gpu()
    out = tmp_path / "e2e.json"
    rc = bench.main(["--device", "cpu", "--cases", "tiny_b2", "--budgets", "N/4", "--frames", "4", "--skip", "1",
                     "--dtype", "fp32", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    v = run["variants"]
    assert set(v) == {"dense", "reference", "eventful"}  # no graph variants without CUDA
    assert run["baseline"] == "dense" and run["tokens"] == 197 and run["tokens_selected"] == 49
    for name in ("reference", "eventful"):
        assert len(v[name]["ms_per_frame"]) == 4 and v[name]["ideal_speedup"] > 1.5
        assert 0 < v[name]["rel_deviation_mean"] < 1
        assert v[name]["attention_modes"] and set(v[name]["attention_modes"]) <= {"eventful", "dense"}
    assert v["reference"]["attention_modes"] == ["eventful"] * 12  # the published method
    assert v["eventful"]["vs_reference"] > 0
    # launches of one more frame: 12 blocks of LayerNorms, linears, attention, residual adds at least; the eventful
    # frame adds three gates and three buffer updates per block, well under twice the dense frame's count
    assert v["dense"]["launches"] >= 12 * 9
    assert v["dense"]["launches"] < v["eventful"]["launches"] < 2 * v["dense"]["launches"]
    assert result["launches"] == "dispatched computing operators per frame"
    table = bench.render(result)
    assert "| vit_tiny_patch16_224 B=2 | N/4 | dense (baseline) |" in table
    assert bench.main(["--report", str(out)]) == 0 and "eventful" in capsys.readouterr().out
