"""InlineFunctionsPass run directly: calls inlined, kept calls left with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from bncompile import BatchNormConfig, custom_ops
from bncompile.builder import build_model
from bncompile.passes.inline_functions import InlineFunctionsPass
from helpers import ort_run
from helpers.fold_graphs import FOREIGN, nodes, run_pass



def _foreign():
    return onnx.parser.parse_model(FOREIGN)


def _feeds():
    return {"x": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)}


def test_inlines_every_call_fed_by_one_constant():
    m = _foreign()
    out, r = run_pass(InlineFunctionsPass(), m)
    assert [(e.op, e.action, e.detail["function"]) for e in r.entries] == [
        ("ScaleShift", "inlined", "mylib::ScaleShift")] * 2
    assert r.detail["functions"] == ["mylib::ScaleShift"] and r.modified
    assert not out.functions and {o.domain for o in out.opset_import} == {""}
    assert [n.op_type for n in out.graph.node].count("Mul") == 2
    np.testing.assert_allclose(ort_run(out, _feeds())["y"], ort_run(m, _feeds())["y"], rtol=1e-6)


def test_keep_leaves_the_calls_with_the_reason():
    m = _foreign()
    out, r = run_pass(InlineFunctionsPass(keep={("mylib", "ScaleShift"): "kept for the test"}), m)
    assert [(e.action, e.reason) for e in r.entries] == [("left", "kept for the test")] * 2
    assert not r.modified and len(out.functions) == 1
    np.testing.assert_allclose(ort_run(out, _feeds())["y"], ort_run(m, _feeds())["y"], rtol=1e-6)


def test_drop_definitions_keeps_custom_op_calls_without_bodies():
    custom_ops.register_schemas()
    m = build_model(BatchNormConfig(virtual_batch_size=2), [4, 3], training=True)
    assert m.functions
    keep = {(custom_ops.DOMAIN, name): "lowered by bncompile" for name in custom_ops.OPS}
    out, r = run_pass(InlineFunctionsPass(keep=keep, drop_definitions=True), m)
    assert r.modified and not out.functions
    assert [(e.op, e.action, e.reason) for e in r.entries] == [
        ("GhostBatchNormalization", "left", "lowered by bncompile")]
    assert any(n.domain == custom_ops.DOMAIN for n in out.graph.node)


def test_custom_ops_inline_to_standard_ops():
    custom_ops.register_schemas()
    m = build_model(BatchNormConfig(virtual_batch_size=2), [4, 3], training=True)
    out, r = run_pass(InlineFunctionsPass(), m)
    assert r.changed and not out.functions
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)


def test_model_without_functions_is_unchanged():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2] x) => (float[2] y) { y = Relu (x) }""")
    out, r = run_pass(InlineFunctionsPass(), m)
    assert not r.modified and r.entries == [] and r.detail["functions"] == []
    assert nodes(out) == nodes(m)
