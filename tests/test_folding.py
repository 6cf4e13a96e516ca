"""`bncompile fold` on the command line: outputs, reports, external data, bad input (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bncompile import onnx_utils
from bncompile.cli import main
from bncompile.errors import InputError
from bncompile.folding import fold
from helpers.fold_graphs import G, assert_equivalent, bn_count, conv_bn


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "model.onnx"
    onnx.save(conv_bn(seed=1), p)
    return p


def run_cli(*args, capsys):
    rc = main(["fold", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_default_output_and_report(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc, out, err = run_cli(model_path, "--report", report, capsys=capsys)
    assert rc == 0, err
    folded = tmp_path / "model.folded.onnx"
    assert folded.exists()
    assert "folded      bn into Conv 'conv'" in out and "check: ok" in out and "nodes: 2 -> 1" in out
    data = json.loads(report.read_text())
    assert data["summary"] == {"batchnorms": 1, "folded": 1, "decomposed": 0, "left": 0}
    assert data["batchnorms"][0]["into"] == "Conv 'conv'"
    assert data["check"]["passed"] is True and data["check"]["max_rel"] < 1e-5
    assert data["nodes_before"] == 2 and data["nodes_after"] == 1 and "fold" in data["seconds"]
    assert_equivalent(onnx.load(model_path), onnx.load(folded))


def test_cli_subprocess_entry_point(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "bncompile", "fold", str(model_path), "-o", str(out),
                           "--check", "1", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and out.exists()


def test_cli_never_overwrites_input_without_in_place(model_path, capsys):
    before = model_path.read_bytes()
    rc, out, err = run_cli(model_path, "-o", model_path, capsys=capsys)
    assert rc == 2 and "--in-place" in err and len(err.strip().splitlines()) == 1
    assert model_path.read_bytes() == before
    rc, out, err = run_cli(model_path, "--in-place", capsys=capsys)
    assert rc == 0
    assert bn_count(onnx.load(model_path)) == 0


def test_cli_verification_failure_exit_1_nothing_written(model_path, tmp_path, capsys):
    out_path = tmp_path / "o.onnx"
    rc, out, err = run_cli(model_path, "-o", out_path, "--tolerance", "0", capsys=capsys)
    assert rc == 1
    assert "verification failed" in err and len(err.strip().splitlines()) == 1
    assert "FAILED" in out
    assert not out_path.exists()


def test_cli_no_check(model_path, tmp_path, capsys):
    rc, out, err = run_cli(model_path, "-o", tmp_path / "o.onnx", "--no-check", capsys=capsys)
    assert rc == 0 and "check: skipped" in out


def test_cli_input_shape_for_dynamic_dims(tmp_path, capsys):
    g = G(seed=2)
    x = g.input("x", ["N", 3, "H", "W"])
    g.output(g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn", outputs=["y"]), shape=["N", 4, "H", "W"])
    p = tmp_path / "dyn.onnx"
    onnx.save(g.model(), p)
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", capsys=capsys)
    assert rc == 2 and "--input-shape x=" in err
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--input-shape", "x=2,3,7,6", capsys=capsys)
    assert rc == 0, err
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--input-shape", "x=2,3", capsys=capsys)
    assert rc == 2 and "rank" in err


# ----------------------------------------------------------------------------- bad input
def _bad_files(tmp_path, model_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: len(model_path.read_bytes()) // 2])
    text = tmp_path / "text.onnx"
    text.write_text("this is not an onnx model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    invalid = tmp_path / "invalid.onnx"
    m = conv_bn(seed=3)
    m.graph.node[0].input[0] = "undefined_tensor"
    onnx.save(m, invalid)
    return {"missing": tmp_path / "missing.onnx", "directory": tmp_path, "truncated": truncated,
            "text": text, "empty": empty, "checker": invalid}


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "text", "empty", "checker"])
def test_cli_bad_input_exit_2_one_line_nothing_written(case, tmp_path, model_path, capsys):
    bad = _bad_files(tmp_path, model_path)[case]
    before = set(os.listdir(tmp_path))
    out_path = tmp_path / "out.onnx"
    rc, out, err = run_cli(bad, "-o", out_path, capsys=capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("bncompile fold: error:")
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("case", ["no_folder", "is_directory"])
def test_cli_unwritable_output_exit_2(case, tmp_path, model_path, capsys):
    target = tmp_path / "nope" / "o.onnx" if case == "no_folder" else tmp_path
    before = set(os.listdir(tmp_path))
    rc, out, err = run_cli(model_path, "-o", target, capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert set(os.listdir(tmp_path)) == before


def test_cli_bad_input_subprocess(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x08\x07garbage")
    proc = subprocess.run([sys.executable, "-m", "bncompile", "fold", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [p]


# ----------------------------------------------------------------------------- external data
def _save_external(model, path: Path, location: str | None = None):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model converts the proto it is given in place
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or (path.name + ".data"), size_threshold=0)


def test_external_data_written_beside_output_not_pointing_back(tmp_path, capsys):
    src = tmp_path / "src"
    dst = tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    m = conv_bn(seed=4, c_in=8, c_out=16)
    _save_external(m, src / "m.onnx", "weights.bin")
    rc, out, err = run_cli(src / "m.onnx", "-o", dst / "f.onnx", capsys=capsys)
    assert rc == 0, err
    assert (dst / "f.onnx.data").exists()
    proto = onnx.load(dst / "f.onnx", load_external_data=False)
    assert set(onnx_utils.external_data_locations(proto)) == {"f.onnx.data"}
    # the folded model works without the input's data file
    (src / "weights.bin").rename(tmp_path / "moved.bin")
    assert_equivalent(m, str(dst / "f.onnx"))


def test_external_data_in_place(tmp_path, capsys):
    g = G(seed=5)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn")
    g.output(g.conv(y, 4, 4, name="conv_kept", outputs=None))  # weights kept: read from the old data
    m = g.model()
    _save_external(m, tmp_path / "m.onnx")
    rc, out, err = run_cli(tmp_path / "m.onnx", "--in-place", capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "m.onnx.data").exists()
    assert_equivalent(m, str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_leaving_folder_refused(tmp_path, location, capsys):
    d = tmp_path / "models"
    d.mkdir()
    m = conv_bn(seed=6)
    _save_external(m, d / "m.onnx", "w.bin")
    proto = onnx.load(d / "m.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, d / "m.onnx")
    rc, out, err = run_cli(d / "m.onnx", "-o", tmp_path / "o.onnx", capsys=capsys)
    assert rc == 2 and "external data" in err
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(InputError):
        fold(d / "m.onnx")


def test_large_model_saved_with_external_data(tmp_path, monkeypatch):
    """Over the proto limit the model is written with external data (limit lowered for the test)."""
    monkeypatch.setattr(onnx_utils, "PROTO_LIMIT_BYTES", 1000)
    m = conv_bn(seed=7, c_in=8, c_out=16)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    r = fold(p, output=tmp_path / "o.onnx")
    assert r.report.check.passed
    assert (tmp_path / "o.onnx.data").exists()
    assert_equivalent(m, onnx.load(tmp_path / "o.onnx"))


@pytest.mark.skipif(os.environ.get("BNCOMPILE_SLOW") != "1", reason="writes 2.4 GB; set BNCOMPILE_SLOW=1")
def test_model_over_2gb(tmp_path):
    import onnx_ir as ir

    rng = np.random.default_rng(9)
    c, layers = 8192, 9                      # 9 x (8192 x 8192) float32 = 2.4 GB
    x = ir.Value(name="x", shape=ir.Shape([1, c, 1, 1]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 15}, name="big")
    y = x
    for i in range(layers):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor(
            (rng.standard_normal((c, c, 1, 1), dtype=np.float32) / np.float32(np.sqrt(c))), name=f"w{i}"))
        w.shape, w.type = ir.Shape([c, c, 1, 1]), ir.TensorType(ir.DataType.FLOAT)
        graph.register_initializer(w)
        conv = ir.Node("", "Conv", [y, w], name=f"conv{i}")
        graph.append(conv)
        params = []
        for j, arr in enumerate((rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c),
                                 rng.uniform(0.1, 2, c))):
            v = ir.Value(name=f"bn{i}_{j}", const_value=ir.tensor(arr.astype(np.float32), name=f"bn{i}_{j}"))
            v.shape, v.type = ir.Shape([c]), ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(v)
            params.append(v)
        bn = ir.Node("", "BatchNormalization", [conv.outputs[0], *params], name=f"bn{i}")
        graph.append(bn)
        y = bn.outputs[0]
    y.name, y.shape, y.type = "y", ir.Shape([1, c, 1, 1]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(y)
    model = ir.Model(graph, ir_version=8)
    src = tmp_path / "big.onnx"
    ir.save(model, src, external_data="big.onnx.data")
    del model, graph
    r = fold(src, output=tmp_path / "out.onnx", check_runs=1)
    assert len(r.report.folded) == layers and r.report.check.passed
    proto = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert set(onnx_utils.external_data_locations(proto)) == {"out.onnx.data"}


# ----------------------------------------------------------------------------- API
def test_api_accepts_path_and_proto(model_path):
    a = fold(model_path)
    b = fold(onnx.load(model_path))
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report.to_dict()["summary"]["folded"] == 1
    assert "1 folded" in repr(a)


def test_api_keyword_only(model_path):
    with pytest.raises(TypeError):
        fold(model_path, None)  # noqa


@pytest.mark.parametrize("ir_version", [3, 8])
def test_streaming_write_equals_full_serialization(tmp_path, ir_version):
    import onnx_ir as ir

    g = G(seed=10, opset=9 if ir_version == 3 else 15, ir_version=ir_version)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.node("Relu", [g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn")], name="relu", outputs=["y"]))
    model = ir.serde.deserialize_model(g.model())
    onnx_utils.write_model_streaming(model, tmp_path / "s.onnx")
    loaded = onnx.load(tmp_path / "s.onnx")
    assert loaded == onnx_utils.serialize_model(model)
    onnx.checker.check_model(loaded, full_check=True)


def test_fold_result_has_no_initializer_value_info():
    r = fold(conv_bn(seed=11), check=False)
    assert len(r.model.graph.value_info) == 0


def test_cli_decompose_and_left_reasons_in_json(tmp_path, capsys):
    g = G(seed=12)
    x = g.input("x", [2, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn_fold")
    y = g.bn(g.node("Relu", [y], name="relu"), 4, name="bn_after_relu", outputs=["y"])
    g.output(y)
    p = tmp_path / "m.onnx"
    onnx.save(g.model(), p)
    rc, out, err = run_cli(p, "-o", tmp_path / "plain.onnx", "--report", tmp_path / "plain.json", capsys=capsys)
    assert rc == 0, err
    assert "left        bn_after_relu: its producer Relu 'relu' is not a foldable layer" in out
    left = [b for b in json.loads((tmp_path / "plain.json").read_text())["batchnorms"] if b["action"] == "left"]
    assert left[0]["node"] == "bn_after_relu" and "Relu" in left[0]["reason"]
    rc, out, err = run_cli(p, "-o", tmp_path / "dec.onnx", "--decompose", capsys=capsys)
    assert rc == 0, err
    assert "decomposed  bn_after_relu into Mul + Add" in out
    assert bn_count(onnx.load(tmp_path / "dec.onnx")) == 0
    assert_equivalent(onnx.load(p), onnx.load(tmp_path / "dec.onnx"))


# ----------------------------------------------------------------------------- float16 policy
def _fp32_cnn(seed=30, layers=3, c=8):
    g = G(seed=seed)
    y = g.input("x", [2, c, 8, 8])
    for i in range(layers):
        y = g.node("Relu", [g.bn(g.conv(y, c, c, name=f"conv{i}"), c, name=f"bn{i}")], name=f"relu{i}")
    g.output(g.node("Identity", [y], outputs=["y"]))
    return g.model()


def test_float16_model_folded_by_default_and_both_errors_reported(tmp_path, capsys):
    m = conv_bn(dtype=np.float16, bn_dtype=np.float32, seed=31, c_in=8, c_out=16)
    p, report = tmp_path / "m16.onnx", tmp_path / "r.json"
    onnx.save(m, p)
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--report", report, capsys=capsys)
    assert rc == 0, err
    assert "float16 accuracy vs float32 twin (max rel error): unfolded" in out
    lp = json.loads(report.read_text())["check"]["low_precision"]
    assert lp["folded_vs_float32"] <= lp["limit"] and lp["unfolded_vs_float32"] > 0
    assert_equivalent(m, onnx.load(tmp_path / "o.onnx"), rtol=1e-2)


def _accuracy(model, reference, seeds=range(5)):
    """Mean over seeds of the RMS error (relative to the output range) against ``reference``."""
    s, ref = onnx_utils.make_session(model), onnx_utils.make_session(reference)
    errs = []
    for seed in seeds:
        feeds = onnx_utils.random_feeds(ref, seed=seed)
        want = ref.run(None, feeds)
        got = s.run(None, {k: v.astype(np.float16) for k, v in feeds.items()})
        errs.append(onnx_utils.compare_outputs(want, got)["rms_rel"])
    return float(np.mean(errs))


def test_fold_float16_is_no_less_accurate_than_the_unfolded_float16_twin():
    from bncompile.passes.convert_float16 import ConvertFloat16Pass
    from helpers.fold_graphs import run_pass

    m = _fp32_cnn()
    r = fold(m, float16=True, check=True, check_runs=3)
    out = r.model
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert bn_count(out) == 0 and r.report.float16 and r.report.check.passed
    lp = r.report.check.low_precision
    assert lp["folded_vs_float32"] <= lp["unfolded_vs_float32"] * 1.5
    twin16, _ = run_pass(ConvertFloat16Pass(), m)                 # the same converter, no fold
    assert _accuracy(out, m) <= _accuracy(twin16, m)


def test_cli_float16_flag_and_strict(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(_fp32_cnn(seed=32, layers=2), p)
    rc, out, err = run_cli(p, "-o", tmp_path / "o16.onnx", "--float16", "--strict-float16", capsys=capsys)
    assert rc == 0, err
    assert "converted to float16 after folding" in out and "vs the float32 original" in out
    assert onnx.load(tmp_path / "o16.onnx").graph.input[0].type.tensor_type.elem_type == 10


def test_cli_float16_flag_refuses_a_float16_model(tmp_path, capsys):
    p = tmp_path / "m16.onnx"
    onnx.save(conv_bn(dtype=np.float16, seed=33), p)
    rc, out, err = run_cli(p, "--float16", capsys=capsys)
    assert rc == 2 and "already has float16" in err


# ----------------------------------------------------------------------------- unchanged, old opsets
def test_unchanged_model_exits_0_without_onnxruntime(tmp_path, capsys, monkeypatch):
    g = G(seed=34)
    x = g.input("x", [2, 3, 4, 4])
    g.bn(g.node("Relu", [x]), 3, outputs=["y", "rm", "rv"], training_mode=1)
    g.output("y", shape=[2, 3, 4, 4])
    p, report = tmp_path / "train.onnx", tmp_path / "r.json"
    onnx.save(g.model(), p)

    def no_ort(*a, **k):
        raise AssertionError("onnxruntime must not be needed for an unchanged model")
    monkeypatch.setattr(onnx_utils, "make_session", no_ort)
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--report", report, capsys=capsys)
    assert rc == 0, err
    assert "unchanged: nothing to fold; check: not needed" in out
    data = json.loads(report.read_text())
    assert data["unchanged"] is True and data["check"] is None
    assert data["verification"] == "not needed (unchanged)"


def _opset6_conv_bn(seed=35, training_bn=False):
    g = G(seed=seed, opset=6, ir_version=3)
    x = g.input("x", [2, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn", is_test=1)
    if training_bn:
        y = g.bn(g.node("Relu", [y], name="relu"), 4, name="bn_train", is_test=0)
    g.output(g.node("Relu", [y], outputs=["y"]), shape=[2, 4, 5, 5])
    return g.model()


def test_opset6_model_verified_with_onnx_reference(tmp_path, capsys):
    p, report = tmp_path / "old.onnx", tmp_path / "r.json"
    m = _opset6_conv_bn()
    onnx.save(m, p)
    with pytest.raises(InputError, match="NOT_IMPLEMENTED|cannot load"):
        onnx_utils.make_session(m)                                # onnxruntime has no BN(6)
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--report", report, capsys=capsys)
    assert rc == 0, err
    data = json.loads(report.read_text())
    assert data["verification"] == "onnx.reference+onnxruntime" and data["check"]["passed"]
    assert data["check"]["runtimes"] == {"original": "onnx.reference", "folded": "onnxruntime"}
    assert "runtimes: original in onnx.reference" in out


def test_opset6_model_that_cannot_be_run_right_is_saved_unverified(tmp_path, capsys):
    p, report = tmp_path / "old.onnx", tmp_path / "r.json"
    onnx.save(_opset6_conv_bn(seed=36, training_bn=True), p)
    rc, out, err = run_cli(p, "-o", tmp_path / "o.onnx", "--report", report, capsys=capsys)
    assert rc == 0, err
    assert "check: UNVERIFIED" in out and "warning: the folded model is UNVERIFIED" in out
    assert "'bn_train' is in training mode" in out
    data = json.loads(report.read_text())
    assert data["verification"] == "unverified" and data["check"] is None and data["warnings"]
    assert (tmp_path / "o.onnx").exists()
    rc, out, err = run_cli(p, "-o", tmp_path / "q.onnx", "-q", capsys=capsys)
    assert rc == 0 and out == "" and "warning: the folded model is UNVERIFIED" in err


def test_opset6_decompose_is_valid_opset6_broadcasting(tmp_path, capsys):
    """--decompose at opset 6: (C,) operands with broadcast=1, axis=1; the full checker passes and
    the corrected onnx.reference matches a float64 NumPy evaluation of the BN."""
    from bncompile import reference_runtime

    g = G(seed=37, opset=6, ir_version=3)
    x = g.input("x", [2, 3, 4, 5])
    g.bn(g.node("Relu", [x], name="relu"), 3, name="bn", is_test=1, outputs=["y"])
    g.output("y", shape=[2, 3, 4, 5])
    m = g.model()
    r = fold(m, decompose=True, check=True)
    assert r.report.verification == "onnx.reference" and r.report.check.passed
    out = r.model
    onnx.checker.check_model(out, full_check=True)
    mul, add = out.graph.node[1:]
    for n in (mul, add):
        assert {a.name: a.i for a in n.attribute} == {"broadcast": 1, "axis": 1}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    gamma, beta, mean, var = (inits[n] for n in m.graph.node[1].input[1:])
    eps = m.graph.node[1].attribute[0].f
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    r64 = np.maximum(feeds["x"].astype(np.float64), 0)
    sh = (1, 3, 1, 1)
    want = (r64 - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * gamma.reshape(sh) + beta.reshape(sh)
    got = reference_runtime.Session(out).run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
