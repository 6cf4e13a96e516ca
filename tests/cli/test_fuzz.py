"""Seeded fuzzing of the CLI (issue 12): mutated bytes of a shipped model through real
``python -m bncompile`` processes exit 0, 1 or 2 with no traceback and no hang. More cases:
``python benchmarks/fuzz_cli.py --count 200``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fuzz_cli", ROOT / "benchmarks" / "fuzz_cli.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

CASES = [("fold", s) for s in range(16)] + [("inspect", s) for s in range(100, 108)] + \
        [("inline", s) for s in range(200, 208)]


@pytest.mark.parametrize("command,seed", CASES)
def test_mutated_model_keeps_the_promise(command, seed):
    failure = fuzz.run_case(ROOT / "models" / "cnn_nhwc.onnx", command, seed, timeout=90)
    assert failure is None, failure
