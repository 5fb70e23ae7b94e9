"""The op benchmark harness and the table renderer, on tiny shapes (timing values are not asserted)."""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import bench_ops  # noqa: E402
import render  # noqa: E402


def test_harness_writes_every_case_with_like_for_like_yardsticks(tmp_path):
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--ops", "gather_rows,scatter_rows_,scatter_rows_residual_,token_gate,qk_update_relpos_",
                           "--sizes", "16:4,15:15",
                           "--rounds", "3", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    cases = {(r["op"], r["n"], r["k"]) for r in data["results"]}
    # qk_update_relpos_ needs a square grid: N = 16 runs, N = 15 is skipped
    assert cases == {("gather_rows", 16, 4), ("gather_rows", 15, 15), ("scatter_rows_", 16, 4),
                     ("scatter_rows_", 15, 15), ("scatter_rows_residual_", 16, 4), ("scatter_rows_residual_", 15, 15),
                     ("token_gate", 16, 4), ("token_gate", 15, 15),
                     ("qk_update_relpos_", 16, 4)}
    for r in data["results"]:
        expect = {"fused", "composition"} | ({"copy"} if "rows" in r["op"] else set())
        assert set(r["times"]) == expect
        for t in r["times"].values():
            assert t["rounds"] == 3 and 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"]
        assert r["bytes"] > 0
    assert data["threads"] == 1 and data["kind"] == "ops" and data["dtype"] == "fp32"


def test_gpu_cases_measure_the_triton_kernel_of_ops_served_by_cpp_cuda(monkeypatch):
    """On a GPU, an op the dispatcher sends to a C++ CUDA kernel is also timed on its Triton kernel (run here on CPU
    tensors under the Triton interpreter); an op Triton already serves gets no duplicate column."""
    import torch
    import eventful_kernels.triton as T

    if not T.AVAILABLE:
        pytest.skip("triton not installed")
    monkeypatch.setattr(bench_ops, "_triton_served", lambda: {"qk_update_", "token_gate_threshold"})
    gate = bench_ops.Case("token_gate", 16, 4, torch.float32, "cpu")
    impls = gate.implementations("cuda")
    assert set(impls) == {"fused", "composition", "triton", "one_launch", "split"}
    assert (impls["one_launch"].value, impls["split"].value) == ("fused", "split")
    c = gate.args[0]
    index, c_sel = impls["triton"]()  # the Triton gate on the case's own tensors
    assert torch.equal(gate.args[1][0, index[0]], c[0, index[0]]) and c_sel.shape == (1, 4, c.shape[-1])
    rows = bench_ops.Case("gather_rows", 16, 4, torch.float32, "cpu").implementations("cuda")
    assert set(rows) == {"fused", "composition", "fused_unchecked", "triton", "copy"}
    assert torch.equal(rows["triton"](), rows["fused_unchecked"]())
    assert "triton" not in bench_ops.Case("qk_update_", 16, 4, torch.float32, "cpu").implementations("cuda")
    data = {"date": "d", "device_type": "cuda", "device": "GPU", "threads": 1, "torch": "t", "dtype": "fp16",
            "command": "c", "results": [{"op": "token_gate", "n": 16, "k": 4, "bytes": 1, "times": {
                name: {"median_ms": 1.0, "min_ms": 0.5} for name in ("fused", "composition", "triton")}}]}
    data["results"][0]["times"]["one_launch"] = {"median_ms": 1.0, "min_ms": 0.5}
    data["results"][0]["times"]["split"] = {"median_ms": 2.0, "min_ms": 1.5}
    table = render.ops_table(data)
    assert "| Triton kernel | gate in one launch | gate in three launches |" in table and "| token_gate | 16 | 4 | " \
        "1.000 (0.500) | 1.000 (0.500) | 1.00x | 1.000 (0.500) | 1.000 (0.500) | 2.000 (1.500) |" in table


def test_env_of_a_timed_variant_is_set_outside_the_timed_call(monkeypatch):
    """The three-launch gate variant runs with EVENTFUL_CUDA_GATE=split, set and restored around each call; the
    others see the environment as it was."""
    monkeypatch.delenv("EVENTFUL_CUDA_GATE", raising=False)
    seen = {"plain": [], "split": []}
    impls = {"plain": lambda: seen["plain"].append(os.environ.get("EVENTFUL_CUDA_GATE")),
             "split": bench_ops.WithEnv(lambda: seen["split"].append(os.environ.get("EVENTFUL_CUDA_GATE")),
                                        "EVENTFUL_CUDA_GATE", "split")}
    times = bench_ops.time_interleaved(impls, "cpu", rounds=3, budget_s=10)
    assert times["split"]["rounds"] == 3 and seen["split"] == ["split"] * 5  # 2 warm-up calls and 3 rounds
    assert seen["plain"] == [None] * 5 and "EVENTFUL_CUDA_GATE" not in os.environ


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        bench_ops.main(["--ops", "gather_rowz"])
    with pytest.raises(SystemExit):
        bench_ops.main(["--threads", "0"])


def test_render_fills_marked_blocks_only(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    bench_ops.main(["--ops", "gather_rows", "--sizes", "8:2", "--rounds", "3", "--threads", "1",
                    "--out", str(res / "ops_cpu.json")])
    text = "intro\n<!-- results:ops_cpu -->\nold table\n<!-- /results:ops_cpu -->\n<!-- results:gone -->\nkeep\n" \
           "<!-- /results:gone -->\n"
    new = render.render_readme(text, str(res))
    assert "old table" not in new and "| gather_rows | 8 | 2 |" in new and "keep" in new
    assert render.render_readme(new, str(res)) == new  # idempotent


def test_published_tables_are_rendered_from_the_committed_results():
    """benchmarks/README.md shows exactly what benchmarks/results/*.json render to."""
    assert render.main(["--check"]) == 0


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(HERE, "..", "benchmarks"))
                                          if f.startswith("bench_") and f.endswith(".py")))
def test_every_benchmark_script_starts(script):
    """Each benchmark script imports and parses its arguments (``--help``), so none is left broken by a change."""
    import subprocess

    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), "--help"], capture_output=True,
                          text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage" in proc.stdout.lower()
