"""The repository passes its lint configuration (ruff, pyproject.toml: line length 120, pycodestyle + pyflakes)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(ruff):
        ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (install.sh installs it from requirements.txt)")
    proc = subprocess.run([ruff, "check", "--output-format", "concise", ROOT], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
