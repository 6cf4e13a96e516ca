"""The configured linter (ruff, ``[tool.ruff]`` in pyproject.toml) passes on the whole checkout: pyflakes,
syntax errors, no bare ``passes`` import, no ``tvm`` import outside the shim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
