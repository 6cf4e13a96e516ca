"""`bncompile bench`: the library API, the JSON schema, the plot, --kernels and bad input (exit 2).

Tiny models (Conv+BN+Relu, Gemm+BN) and a few rounds keep this under a few seconds per test; the
peak-memory subprocesses run in one test only.
"""

from __future__ import annotations

import json
import sys
import types

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncompile import bench
from bncompile.bench import BenchReport, benchmark, load_schema
from bncompile.cli import main
from bncompile.errors import InputError

FAST = dict(repeat=3, warmup=1, progress=False, memory=False)
ORT_VARIANTS = ["ort", "ort-noopt", "folded-ort", "folded-ort-noopt"]


def _bn_inits(rng, f, prefix=""):
    return [numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "scale"),
            numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "bias"),
            numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "mean"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, f).astype(np.float32), prefix + "var")]


def conv_bn_relu(*, batch="N", c=3, f=8, hw=12, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, c, 3, 3)).astype(np.float32), "W"),
             *_bn_inits(rng, f)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    graph = helper.make_graph(nodes, "conv_bn_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, f, hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def gemm_bn(*, batch="N", k=16, f=10, seed=1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, k)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), "B"),
             *_bn_inits(rng, f)]
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1),
             helper.make_node("BatchNormalization", ["g", "scale", "bias", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "gemm_bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, f])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def conv_path(tmp_path):
    p = tmp_path / "conv.onnx"
    onnx.save(conv_bn_relu(), p)
    return p


def validate(data: dict) -> None:
    jsonschema.Draft202012Validator(load_schema()).validate(data)


# --------------------------------------------------------------------------- library

def test_schema_is_valid_draft_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_benchmark_conv_structure_ratios_and_tvm(conv_path):
    report = benchmark(conv_path, batches=(1, 2), **FAST)
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
        tvm = report.result("tvm", b)
        # TVM is optional: either measured like the others or marked unavailable with a reason
        if tvm.status == "ok":
            assert tvm.median_ms > 0 and tvm.max_rel_err < 1e-3
        else:
            assert tvm.status == "unavailable" and tvm.reason and tvm.median_ms is None
    assert report.fold == {"folded": 1, "left": 0, "nodes_before": 3, "nodes_after": 2}
    data = report.to_dict()
    validate(data)
    json.dumps(data, allow_nan=False)
    table = report.table()
    for v in report.variants:
        assert v in table
    assert "vs ort" in table


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


def test_unavailable_compiler_is_reported_not_raised(conv_path, monkeypatch):
    def broken():
        raise bench.UnsupportedError("no compiler in this test")
    monkeypatch.setattr(bench, "_compiler", broken)
    report = benchmark(conv_path, variants=["tvm"], **FAST)
    r = report.result("tvm", 1)
    assert r.status == "unavailable" and r.reason == "no compiler in this test"
    assert "unavailable: no compiler in this test" in report.table()
    validate(report.to_dict())


def test_cuda_variant_asked_for_without_cuda(conv_path, monkeypatch):
    monkeypatch.setattr(bench, "_cuda_ort_available", lambda: False)
    report = benchmark(conv_path, variants=["ort-cuda"], **FAST)
    r = report.result("ort-cuda", 1)
    assert r.status == "unavailable" and "CUDAExecutionProvider" in r.reason


# --------------------------------------------------------------------------- CLI

def test_cli_json_plot_table(conv_path, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", str(conv_path), "--batch", "1,2", "--repeat", "3", "--warmup", "1",
               "--variants", "ort-noopt,folded-ort", "--no-memory", "--no-progress",
               "--json", str(js), "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "folded-ort" in out and "median ms" in out
    data = json.loads(js.read_text())
    validate(data)
    assert data["batches"] == [1, 2] and len(data["results"]) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad(argv, capsys):
    rc = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", ["missing", "garbage", "directory", "batch", "fixed", "json_dir",
                                  "plot_dir", "threads", "repeat", "variant", "no_model"])
def test_cli_bad_input_one_line_exit_2_nothing_written(case, conv_path, tmp_path, capsys):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not onnx")
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_bn_relu(batch=1), fixed)
    model, extra = conv_path, []
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "garbage":
        model = garbage
    elif case == "directory":
        model = tmp_path
    elif case == "batch":
        extra = ["--batch", "1,x"]
    elif case == "fixed":
        model, extra = fixed, ["--batch", "1,8"]
    elif case == "json_dir":
        js = tmp_path / "no_such_dir" / "out.json"
    elif case == "plot_dir":
        png = tmp_path / "no_such_dir" / "out.png"
    elif case == "threads":
        extra = ["--threads", "0"]
    elif case == "repeat":
        extra = ["--repeat", "0"]
    elif case == "variant":
        extra = ["--variants", "ort,nope"]
    argv = ([] if case == "no_model" else [model]) + extra + [
        "--repeat" if case != "repeat" else "--warmup", "2", "--no-memory", "--no-progress",
        "--json", js, "--plot", png]
    rc, out, err = _bad(argv, capsys)
    assert rc == 2, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("bncompile bench: error:"), err
    assert not js.exists() and not png.exists()
    assert not list(tmp_path.glob(".out.*"))          # no temporary left behind


def test_cli_fixed_batch_message_names_the_input(tmp_path, capsys):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_bn_relu(batch=1), fixed)
    rc, _, err = _bad([fixed, "--batch", "8", "--no-progress"], capsys)
    assert rc == 2 and "'x'" in err and "fixed to 1" in err and "--batch 1" in err


# --------------------------------------------------------------------------- --kernels

def test_cli_kernels_delegates(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_run(shapes=None, *, repeat=30, json_path=None, threads=None, target="llvm"):
        calls.update(repeat=repeat, threads=threads, target=target)
        return {"machine": {"target": target}, "cases": [{"case": "NC"}]}

    fake = types.ModuleType("bncompile.kernels.bench")
    fake.run_kernel_benchmark = fake_run
    fake.format_table = lambda result: f"KERNEL TABLE {len(result['cases'])} case(s)"
    monkeypatch.setitem(sys.modules, "bncompile.kernels.bench", fake)
    js = tmp_path / "k.json"
    rc = main(["bench", "--kernels", "--repeat", "4", "--threads", "2", "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "KERNEL TABLE 1 case(s)" in out
    assert calls == {"repeat": 4, "threads": 2, "target": "llvm"}
    assert json.loads(js.read_text())["cases"] == [{"case": "NC"}]


def test_cli_kernels_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bncompile.kernels.bench", None)   # import raises ImportError
    rc, out, err = _bad(["--kernels"], capsys)
    assert rc == 2 and out == "" and "--kernels needs bncompile.kernels.bench" in err


def test_cli_kernels_refuses_model_and_model_flags(conv_path, capsys):
    rc, _, err = _bad([conv_path, "--kernels"], capsys)
    assert rc == 2 and "--kernels" in err
    rc, _, err = _bad(["--kernels", "--batch", "1"], capsys)
    assert rc == 2 and "--batch does not apply" in err
