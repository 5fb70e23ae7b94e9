"""benchmarks/bench_int8.py on a small model and few frames (timing values are not asserted, only their shape)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_int8  # noqa: E402
import render  # noqa: E402


def test_bench_int8_writes_and_renders(tmp_path):
    out = tmp_path / "int8_cpu.json"
    assert bench_int8.main(["--model", "vit_tiny_patch16_224", "--frames", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    e = data["end_to_end"]
    assert data["kind"] == "int8" and set(e["median_ms"]) == set(bench_int8.MODELS)
    assert all(len(v) == 3 for v in e["ms"].values())
    assert e["tokens"] == 197 and e["tokens_selected"] == 49
    dev = e["rel_deviation_last_frame_vs_dense_fp32"]
    assert dev["dense_fp32"] == 0.0 and dev["dense_packed_fp32"] < 1e-5
    assert 0 < dev["dense_int8"] < 0.2  # int8 rounding, no more
    table = render.render_file(str(out))
    assert "| eventful int8 |" in table and "| dense int8 |" in table
