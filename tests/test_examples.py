"""The runnable examples in python/ run as a user would run them and print what they promise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", name), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_call_ops():
    out = run_example("call_ops.py")
    for op in ("token_gate", "scatter_rows_", "qk_update_", "av_delta_update_"):
        assert op in out


def test_change_budget():
    out = run_example("change_budget.py")
    assert out.count("-- budget now") == 3 and "frame 15" in out


@pytest.mark.slow
def test_stream_video():
    out = run_example("stream_video.py", "--frames", "3", "--model", "vit_small_patch16_224")
    lines = [line for line in out.splitlines() if line.startswith("frame")]
    assert len(lines) == 3
    assert "1.00x fewer" in lines[0] and "deviation from dense 0.000" in lines[0]  # the flush frame is dense
    assert "1.00x fewer" not in lines[1]
