"""`bncompile.bench.memory`: the probe runs as ``python -m bncompile.bench.memory`` in a fresh process;
importing the benchmark modules does not import TVM."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx

from bncompile.bench import memory
from helpers.bench import gemm_bn


def test_probe_entry_point_answers_one_json_line(tmp_path):
    onnx.save(gemm_bn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "f.npz", x=np.ones((2, 16), np.float32))
    spec = json.dumps({"variant": "ort-noopt", "model": str(tmp_path / "m.onnx"), "feeds": str(tmp_path / "f.npz"),
                       "threads": 1, "target": "llvm", "library": None})
    proc = subprocess.run([sys.executable, "-m", "bncompile.bench.memory", spec], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr      # no runpy warning either
    answer = json.loads(proc.stdout)
    assert answer["peak_kb"] >= 0 and answer["method"].startswith("subprocess")
    assert memory.probe_memory("ort", str(tmp_path / "m.onnx"), str(tmp_path / "f.npz"), threads=1,
                               target="llvm")["peak_kb"] >= 0


def test_bench_modules_do_not_import_tvm():
    code = ("import sys, bncompile.bench, bncompile.bench.kernels, bncompile.bench.memory, bncompile.cli.bench; "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
