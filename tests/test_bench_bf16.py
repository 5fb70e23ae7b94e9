"""benchmarks/bench_bf16.py on a small model and few rounds (timing values are not asserted, only their shape)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_bf16  # noqa: E402
import render  # noqa: E402


def test_bench_bf16_writes_and_renders(tmp_path, capsys):
    out = tmp_path / "bf16_cpu.json"
    assert bench_bf16.main(["--model", "vit_tiny_patch16_224", "--frames", "3", "--rounds", "1",
                            "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    e = data["end_to_end"]
    assert data["kind"] == "bf16" and set(e["median_ms"]) == set(bench_bf16.MODELS)
    assert all(len(v) == 3 for v in e["ms"].values())
    assert e["tokens"] == 197 and e["tokens_selected"] == 49
    # the eventful models approximate the dense one; bf16 adds its rounding but stays close
    assert e["rel_deviation_last_frame_vs_dense_fp32"]["dense_fp32"] == 0.0
    assert e["rel_deviation_last_frame_vs_dense_fp32"]["dense_bf16"] < 0.1
    assert len(data["linear"]) == 2 * len(bench_bf16.LINEAR_SHAPES)
    assert all(r["median_ms"]["linear_bf16"] > 0 for r in data["linear"])
    table = render.render_file(str(out))
    assert "| bf16 |" in table and "| 49 | 768 -> 2304 |" in table
