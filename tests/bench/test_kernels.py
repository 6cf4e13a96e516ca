"""`bncompile.bench.kernels`: the kernel benchmark runs end to end on a tiny case and reports every figure."""

from __future__ import annotations

import json

import numpy as np

import pytest

pytestmark = pytest.mark.tvm


def test_benchmark_small_case(tmp_path):
    from bncompile.bench.kernels import format_table, run_kernel_benchmark

    path = tmp_path / "bench.json"
    res = run_kernel_benchmark([((4, 8, 6, 6), 1), ((4, 8, 6, 6), 1, "renorm"), ((2, 5, 5, 16), -1)],
                               repeat=3, json_path=str(path))
    assert len(res["cases"]) == 3
    for row in res["cases"]:
        assert set(row["ms"]) == {"tvm", "tvm_infer", "ort_train", "ort_infer", "numpy"}
        assert all(v > 0 for v in row["ms"].values())
    assert "vs_plain_training" in res["cases"][1]
    assert json.loads(path.read_text())["cases"][0]["schedule"] == "cpu_channel_first"
    table = format_table(res)
    assert "tvm ms" in table and "NHWC" in table


def test_benchmark_cuda_skips_without_gpu():
    from bncompile.lower import tvm as _tvm
    from bncompile.bench.kernels import format_table, run_kernel_benchmark

    if _tvm.cuda_available():
        pytest.skip("a GPU is present")
    res = run_kernel_benchmark([((4, 8), 1)], repeat=1, target="cuda")
    assert res["cases"] == [] and "skipped" in format_table(res)


def test_backward_benchmark_small_case():
    from bncompile.bench.kernels import format_backward_table, run_backward_benchmark

    res = run_backward_benchmark([((4, 8, 6, 6), 1), ((4, 8, 6, 6), 1, "ghost"), ((2, 5, 5, 16), -1),
                                  ((8, 5, 16), -1, "ghost"), ((4, 24), 1, "adjust"), ((4, 24), 1, "renorm")],
                                 repeat=3, threads=1, target="llvm:haswell")
    assert len(res["cases"]) == 6
    for row in res["cases"]:
        assert set(row["ms"]) == {"fwd", "bwd", "ort_infer"}
        assert row["floor_ms"] == pytest.approx(1.5 * row["ms"]["ort_infer"])
        lo, hi = row["bwd_vs_floor_iqr"]
        assert lo <= row["bwd_vs_floor"] <= hi
        assert row["schedule"].startswith("bwd_cpu_") and row["input_sets"] >= 3
        assert row["schedule"] != "bwd_cpu_generic", row       # every default layout has its own rule
    m = res["machine"]
    assert m["lanes"] == 8 and m["target_mcpu"] == "haswell" and m["target"] == "llvm:haswell"
    assert m["cpu"] and m["l2"] > 0 and m["threads"] == 1
    table = format_backward_table(res)
    assert "bwd/floor" in table and "(iqr)" in table and "f32 vectors" in table and "L2" in table
    assert "mcpu=haswell" in table or m["cpu"] == "haswell"
    assert "adjust" in table and "ghost" in table


def test_backward_benchmark_refuses_an_unknown_variant():
    from bncompile.bench.kernels import run_backward_benchmark

    with pytest.raises(ValueError, match="variant"):
        run_backward_benchmark([((4, 8), 1, "fancy")], repeat=1)

def test_ort_runner_outputs_are_mapped_before_timing():
    """Each pre-bound ORT call ran once when bound (as Kernel.bind does): its first timed call writes y
    without a page fault per 4 KB page (256 for this 1 MB y), which made ORT's floor 5-7x slow."""
    resource = pytest.importorskip("resource")
    pytest.importorskip("onnxruntime")
    from bncompile.bench.kernels import Rotation, _aligned_copy, _ort_runner

    shape = (256, 1024)
    xs = [_aligned_copy(np.ones(shape, np.float32)) for _ in range(3)]
    params = {n: np.ones(shape[1], np.float32) for n in ("scale", "B", "mean", "var")}
    run = _ort_runner(shape, {"x": xs[0], **params}, training=False, threads=1, copies=xs, rot=Rotation(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        run()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 64


@pytest.mark.parametrize("script,args", [("bench_kernels.py", ["--json", "{missing}/out.json"]),
                                         ("bench_edge.py", ["--json", "{missing}/out.json"]),
                                         ("bench_models.py", ["--plot", "{folder}"]),
                                         ("bench_models.py", ["--json", "{missing}/out.json"])])
def test_benchmark_scripts_refuse_unwritable_outputs_first(tmp_path, script, args):
    """A --json/--plot that cannot be written is refused before the long run: one line, exit 2, nothing
    written."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = [a.format(missing=tmp_path / "missing", folder=tmp_path) for a in args]
    before = sorted(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and "--" in lines[0], proc.stderr
    assert sorted(tmp_path.iterdir()) == before
