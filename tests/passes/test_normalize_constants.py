"""NormalizeConstantsPass run directly: the four scalar/list forms become ``value`` tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from bncompile.passes.normalize_constants import NormalizeConstantsPass
from helpers import ort_run
from helpers.fold_graphs import nodes, run_pass


@pytest.mark.parametrize("attr,text,want", [
    ("value_float", "value_float = 1.5", np.array(1.5, np.float32)),
    ("value_floats", "value_floats = [1.5, -2.0]", np.array([1.5, -2.0], np.float32)),
    ("value_int", "value_int = 7", np.array(7, np.int64)),
    ("value_ints", "value_ints = [3, -4]", np.array([3, -4], np.int64)),
])
def test_rewrites_each_form(attr, text, want):
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2] x) => (float[2] y) {{
          c = Constant <{text}> ()
          f = Cast <to = 1> (c)
          y = Mul (x, f)
        }}""")
    out, r = run_pass(NormalizeConstantsPass(), m)
    (e,) = r.entries
    assert e.action == "rewritten" and e.detail == {"attribute": attr} and r.modified
    (a,) = out.graph.node[0].attribute
    assert a.name == "value"
    got = numpy_helper.to_array(a.t)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    x = {"x": np.array([1.0, -0.5], np.float32)}
    np.testing.assert_array_equal(ort_run(out, x)["y"], x["x"] * want.astype(np.float32))


def test_one_constant_feeding_two_nodes_is_rewritten_once():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2] x) => (float[2] y) {
          c = Constant <value_floats = [0.5, 2.0]> ()
          a = Mul (x, c)
          y = Add (a, c)
        }""")
    out, r = run_pass(NormalizeConstantsPass(), m)
    assert len(r.entries) == 1 and [n.op_type for n in out.graph.node] == ["Constant", "Mul", "Add"]
    x = {"x": np.array([1.0, -3.0], np.float32)}
    np.testing.assert_array_equal(ort_run(out, x)["y"], ort_run(m, x)["y"])


def test_rewrites_inside_subgraphs():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (bool cond) => (float[1] y) {
          y = If (cond) <
            then_branch = t () => (float[1] a) { a = Constant <value_floats = [1.0]> () },
            else_branch = e () => (float[1] b) { b = Constant <value_floats = [2.0]> () }>
        }""")
    out, r = run_pass(NormalizeConstantsPass(), m)
    assert len(r.entries) == 2
    assert ort_run(out, {"cond": np.array(False)})["y"].tolist() == [2.0]


def test_leaves_value_tensors_alone():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2] x) => (float[2] y) {
          c = Constant <value = float[2] {1.0, 2.0}> ()
          y = Add (x, c)
        }""")
    out, r = run_pass(NormalizeConstantsPass(), m)
    assert r.entries == [] and not r.modified
    assert nodes(out) == nodes(m)
