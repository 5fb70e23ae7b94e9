"""tools/gpu_check.sh, checked without a GPU: valid bash, every test file it names exists, and its step limits fit the
8 minutes it promises (a GPU slot is short; a run cut short keeps only what finished)."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def _text() -> str:
    with open(SCRIPT) as f:
        return f.read()


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_torch_version_check_is_valid_bash():
    """tools/check_torch_version.sh, the check against the GPU image's torch/triton pair run before a GPU slot."""
    subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "check_torch_version.sh")], check=True)


def test_named_test_files_exist_and_limits_fit():
    text = _text()
    specs = re.findall(r'"(test_[a-z_]+\.py):(\d+):([^"]*)"', text)
    assert specs, "no test specs found"
    for file, _, _ in specs:
        assert os.path.exists(os.path.join(ROOT, "tests", file)), file
    steps = [int(s) for s in re.findall(r"_TIMEOUT:-(\d+)", text)]  # build, gate check, end-to-end, ops
    assert len(steps) == 4
    total = sum(steps) + sum(int(limit) for _, limit, _ in specs)
    assert total <= 8 * 60, f"step limits add up to {total} s"


def test_op_table_names_every_benchmarked_op_once():
    """The GPU op table lists its ops (targets first); a new op of benchmarks/bench_ops.py must not be left out."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_ops

    joined = _text().replace("\\\n", "")  # bash line continuations
    listed = re.search(r"--ops (\S+)", joined).group(1).split(",")
    assert sorted(listed) == sorted(bench_ops.OPS)
    assert listed[:3] == ["token_gate", "token_gate_threshold", "token_delta_gate"]
