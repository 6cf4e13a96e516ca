"""`bncompile.bench`: the library API, the JSON schema, variants and their failures.

Tiny models (Conv+BN+Relu, Gemm+BN) and a few rounds keep this under a few seconds per test; the
peak-memory subprocesses run in one test only. The command line is tested in tests/cli/test_bench.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import onnx
import pytest

from bncompile import bench
from bncompile.bench import BenchReport, benchmark, load_schema, variants
from bncompile.errors import InputError
from helpers.bench import conv_bn_relu, gemm_bn, validate

FAST = dict(repeat=3, warmup=1, progress=False, memory=False)
ORT_VARIANTS = ["ort", "ort-noopt", "folded-ort", "folded-ort-noopt"]


@pytest.fixture
def conv_path(tmp_path):
    p = tmp_path / "conv.onnx"
    onnx.save(conv_bn_relu(), p)
    return p


# --------------------------------------------------------------------------- library

def test_schema_is_valid_draft_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _benchmark_in_fresh_process(tmp_path, model, **kw):
    """``benchmark(model, **kw)`` run in a new Python process, its BenchReport brought back (pickled).

    TVM sizes its thread pool once per process: a test that ran before in this process (e.g. a CLI test
    with threads=2) fixes it, and the benchmark then truthfully reports that pool, not the one asked."""
    out = tmp_path / "report.pkl"
    code = ("import pickle; from bncompile.bench import benchmark; "
            f"r = benchmark({str(model)!r}, **{kw!r}); "
            f"open({str(out)!r}, 'wb').write(pickle.dumps(r))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pickle

    return pickle.loads(out.read_bytes())


def test_benchmark_conv_structure_ratios_and_tvm(conv_path, tmp_path):
    report = _benchmark_in_fresh_process(tmp_path, conv_path, batches=(1, 2), **FAST)
    assert isinstance(report, BenchReport)
    assert report.variants[0] == "ort" and set(ORT_VARIANTS + ["tvm"]) <= set(report.variants)
    assert report.threads == bench.DEFAULT_THREADS
    for b in (1, 2):
        base = report.result("ort", b)
        assert base.status == "ok" and base.ratio == 1.0 and base.max_abs_err == 0.0
        for v in ORT_VARIANTS:
            r = report.result(v, b)
            assert r.status == "ok", r.reason
            assert r.samples == 3 and r.p10_ms <= r.median_ms <= r.p90_ms
            assert r.throughput == pytest.approx(b / (r.median_ms / 1e3))
            assert r.ratio > 0 and r.ratio_of_medians > 0
            assert r.max_rel_err < 1e-4          # folding keeps the numbers
            assert r.threads_used == report.threads     # the session's intra-op threads, read back
        tvm = report.result("tvm", b)
        assert tvm.status == "ok", tvm.reason          # TVM is a dependency: it must be measured
        assert tvm.samples == 3 and tvm.median_ms > 0 and tvm.max_rel_err < 1e-3
        assert tvm.threads_used == report.threads       # TVM's pool, sized from TVM_NUM_THREADS
        for v in report.variants:                      # CPU / wall time: one busy thread is about 1
            par = report.result(v, b).parallelism
            assert 0 < par < report.threads + 0.5, f"{v} batch {b}: parallelism {par} with {report.threads} threads"
    assert report.fold == {"folded": 1, "left": 0, "nodes_before": 3, "nodes_after": 2}
    data = report.to_dict()
    validate(data)
    json.dumps(data, allow_nan=False)
    table = report.table()
    for v in report.variants:
        assert v in table
    assert "vs ort" in table and " thr " in table and " par " in table


def test_two_threads_settled_rounds_by_default(conv_path, tmp_path):
    """threads > 1: settled rounds (each timed call starts once the other runtimes' workers sleep),
    the back-to-back call and each pool's spin reported; settle=False keeps plain rounds. In a fresh
    process: TVM sizes its pool once per process, and this one may have started it with 1 thread."""
    out = tmp_path / "r.json"
    code = ("import json, sys; from bncompile.bench import benchmark; "
            f"r = benchmark({str(conv_path)!r}, threads=2, variants=['tvm'], repeat=2, warmup=0, "
            "progress=False, memory=False); "
            f"open({str(out)!r}, 'w').write(json.dumps({{'d': r.to_dict(), 't': r.table()}}))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    data, table = got["d"], got["t"]
    validate(data)
    assert data["settle"] is True
    for r in data["results"]:
        assert r["status"] == "ok", r["reason"]
        assert r["threads_used"] == 2                  # onnxruntime's intra-op threads, TVM's pool
        assert r["samples"] == 2 and r["warm_median_ms"] > 0 and r["warm_ratio"] > 0
        assert r["spin_cpu_ms"] >= 0 and r["spin_wall_ms"] >= 0 and r["unsettled"] >= 0
        assert 1 <= r["threads_busy"] <= 2           # measured (a tiny model may keep one thread busy)
    assert {r["variant"]: r["warm_ratio"] for r in data["results"]}["ort"] == 1.0
    assert len(data["machine"]["loadavg_start"]) == 3 and len(data["machine"]["loadavg_end"]) == 3
    assert "b2b ms" in table and "settled rounds" in table

    plain = benchmark(conv_path, threads=2, variants=["ort"], settle=False, **FAST)
    assert plain.settle is False and plain.result("ort", 1).warm_median_ms is None
    assert "b2b ms" not in plain.table()
    validate(plain.to_dict())


def test_one_thread_plain_rounds_unless_asked(conv_path):
    assert benchmark(conv_path, variants=["ort"], **FAST).settle is False
    report = benchmark(conv_path, variants=["ort"], settle=True, **FAST)
    assert report.settle is True and report.result("ort", 1).warm_median_ms > 0


def test_benchmark_gemm_in_memory_with_memory_probe():
    report = benchmark(gemm_bn(), batches=(3,), variants=["ort-noopt", "folded-ort"], repeat=3,
                       warmup=1, progress=False, memory=True)
    assert report.variants == ["ort", "ort-noopt", "folded-ort"]
    assert report.fold["folded"] == 1
    for r in report.results:
        assert r.status == "ok" and r.batch == 3
        assert r.peak_rss_mb is not None and r.peak_rss_mb >= 0, r.memory_method
        assert "subprocess" in r.memory_method
    validate(report.to_dict())


def test_fixed_batch_used_as_is_and_contradiction_refused(tmp_path):
    model = conv_bn_relu(batch=2)
    report = benchmark(model, batches=None, variants=["ort"], **FAST)
    assert report.batches == [2] and report.results[0].batch == 2
    with pytest.raises(InputError, match="fixed to 2"):
        benchmark(model, batches=(1, 8), variants=["ort"], **FAST)


def test_resolve_shapes_free_batch_and_other_free_dims():
    batches, shapes = bench.resolve_shapes([("x", ["N", 3, "H", 5])], (1, 4), {"x": (1, 3, 7, 5)})
    assert batches == [1, 4] and shapes[4]["x"] == (4, 3, 7, 5)
    with pytest.raises(InputError, match="free dimension 'H'"):
        bench.resolve_shapes([("x", ["N", 3, "H", 5])], (1,))


@pytest.mark.parametrize("text", ["0", "a", "1,,2", "", "-1", "1,1", "2.5"])
def test_parse_batches_refuses(text):
    with pytest.raises(InputError, match="--batch"):
        bench.parse_batches(text)


def test_unknown_variant_refused(conv_path):
    with pytest.raises(InputError, match="unknown variant 'onnx'"):
        benchmark(conv_path, variants=["onnx"], **FAST)


def test_failed_compile_is_reported_not_raised(conv_path):
    report = benchmark(conv_path, variants=["tvm"], target="no-such-target", **FAST)
    r = report.result("tvm", 1)
    assert r.status == "unavailable" and "no-such-target" in r.reason and r.median_ms is None
    assert report.result("ort", 1).status == "ok"
    assert f"unavailable: {r.reason}" in report.table()
    validate(report.to_dict())


def test_cuda_variant_asked_for_without_cuda(conv_path, monkeypatch):
    monkeypatch.setattr(variants, "_cuda_ort_available", lambda: False)
    report = benchmark(conv_path, variants=["ort-cuda"], **FAST)
    r = report.result("ort-cuda", 1)
    assert r.status == "unavailable" and "CUDAExecutionProvider" in r.reason


def test_in_memory_model_with_external_data_refused(tmp_path):
    model = conv_bn_relu()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InputError, match="external data: pass the model's path"):
        benchmark(proto, variants=["ort"], **FAST)
    report = benchmark(tmp_path / "m.onnx", variants=["ort"], **FAST)      # the path works
    assert report.result("ort", 1).status == "ok"


def test_public_names_kept():
    for name in ("ALL_VARIANTS", "BASELINE", "BenchReport", "CPU_VARIANTS", "CUDA_VARIANTS", "DEFAULT_REPEAT",
                 "DEFAULT_THREADS", "DEFAULT_WARMUP", "PROBE_RUNS", "PROBE_TIMEOUT_S", "SCHEMA_VERSION",
                 "VariantResult", "benchmark", "load_schema", "parse_batches", "plot", "resolve_shapes",
                 "select_variants", "write_json"):
        assert hasattr(bench, name), name


def test_tvm_spin_count_not_at_default_is_said(monkeypatch, caplog):
    monkeypatch.setenv("TVM_NUM_THREADS", os.environ.get("TVM_NUM_THREADS", "1"))   # restored afterwards
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    with caplog.at_level("WARNING", logger="bncompile.bench.variants"):
        variants.pin_tvm_threads(int(os.environ["TVM_NUM_THREADS"]))
    assert "SPIN_COUNT" not in caplog.text
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "0")
    with caplog.at_level("WARNING", logger="bncompile.bench.variants"):
        variants.pin_tvm_threads(int(os.environ["TVM_NUM_THREADS"]))
    assert "TVM_THREAD_POOL_SPIN_COUNT=0" in caplog.text
    from bncompile.bench.report import machine_info
    assert machine_info(1)["tvm_thread_pool_spin_count"] == "0"
