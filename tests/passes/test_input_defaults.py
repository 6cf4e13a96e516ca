"""InputDefaultsPass run directly: inputs with an initializer become inputs with a default value."""

from __future__ import annotations

import numpy as np
import onnx.parser

from bncompile.passes.input_defaults import InputDefaultsPass
from helpers import ort_run
from helpers.fold_graphs import G, run_pass


def _model():
    return onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,3] x, float[3] s, float[D] t) => (float[N,3] y)
          <float[3] s = {0.5, -2.0, 3.0}, float[3] t = {1.0, 2.0, 4.0}, float[3] w = {1.0, 1.0, 2.0}> {
          a = Mul (x, s)
          b = Mul (a, s)
          c = Add (b, t)
          y = Mul (c, w)
        }""")


def test_defaults_split_off_and_free_dims_pinned():
    m = _model()
    out, r = run_pass(InputDefaultsPass(), m)
    defaults = r.detail["defaults"]
    assert list(defaults) == ["s", "t"] and defaults["t"].tolist() == [1.0, 2.0, 4.0]
    assert [(e.name, e.action, e.detail["shape_pinned"]) for e in r.entries] == [
        ("s", "defaulted", None), ("t", "defaulted", [3])]
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert [i.name for i in out.graph.input] == ["x", "s", "t"]
    assert out.graph.input[2].type.tensor_type.shape.dim[0].dim_value == 3
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": x, **defaults})["y"], ort_run(m, {"x": x})["y"])


def test_an_input_whose_shape_was_given_is_not_pinned():
    _, r = run_pass(InputDefaultsPass(pinned={"t"}), _model())
    assert r.entries[1].detail["shape_pinned"] is None


def test_ir3_every_initializer_is_an_input_with_a_default():
    g = G(seed=1, ir_version=3, opset=8)
    x = g.input("x", [2, 3])
    g.node("Add", [g.node("Mul", [x, g.init(g.rand(3))]), g.init(g.rand(3))], outputs=["y"])
    g.output("y", shape=[2, 3])
    m = g.model()
    out, r = run_pass(InputDefaultsPass(), m)
    assert len(r.detail["defaults"]) == 2 and not out.graph.initializer
    xv = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": xv, **r.detail["defaults"]})["y"], ort_run(m, {"x": xv})["y"])


def test_a_model_without_input_initializers_is_unchanged():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Mul (x, w) }""")
    out, r = run_pass(InputDefaultsPass(), m)
    assert not r.modified and r.detail["defaults"] == {} and [t.name for t in out.graph.initializer] == ["w"]
