"""ConvertFloat16Pass run directly: float32 -> float16 types and tensors, rounded once; one
negative test per check of its docstring."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bncompile import onnx_utils
from bncompile.errors import InputError
from bncompile.passes.convert_float16 import ConvertFloat16Pass
from helpers.fold_graphs import G, run_pass


def test_converts_tensors_types_constants_and_casts():
    g = G(seed=1)
    x = g.input("x", [2, 3])
    y = g.node("Mul", [x, g.init(g.rand(3))], name="mul")
    y = g.node("Add", [y, g.const(np.array([0.1, -0.2, 0.3], np.float32))], name="add")
    g.nodes.append(helper.make_node("Constant", [], ["s"], value_float=1.5, name="sf"))
    y = g.node("Mul", [y, "s"], name="mul2")
    y = g.node("Cast", [g.node("Cast", [y], to=TensorProto.DOUBLE)], to=TensorProto.FLOAT, name="back")
    g.output(g.node("Identity", [y], outputs=["y"]))
    m = g.model()
    out, r = run_pass(ConvertFloat16Pass(), m)
    assert r.modified and r.detail["tensors"] == 3
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    back = next(n for n in out.graph.node if n.name == "back")
    assert back.attribute[0].i == TensorProto.FLOAT16
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    assert np.array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), w.astype(np.float16))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    want = onnx_utils.make_session(m).run(None, feeds)[0]
    got = onnx_utils.make_session(out).run(None, {"x": feeds["x"].astype(np.float16)})[0]
    assert got.dtype == np.float16 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_refuses_a_constant_beyond_float16_range():
    g = G(seed=2)
    x = g.input("x", [2, 3])
    g.output(g.node("Mul", [x, g.init(np.array([1.0, 7e4, 2.0], np.float32), "big")], outputs=["y"]))
    with pytest.raises(InputError, match="'big' holds 70000.*beyond float16"):
        run_pass(ConvertFloat16Pass(), g.model())


def test_resize_scales_stay_float32():
    g = G(seed=3, opset=13)
    x = g.input("x", [1, 2, 3, 3])
    scales = g.init(np.array([1, 1, 2, 2], np.float32), "scales")
    g.output(g.node("Resize", [x, "", scales], outputs=["y"], mode="nearest"), shape=[1, 2, 6, 6])
    out, r = run_pass(ConvertFloat16Pass(), g.model())
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert types["scales"] == TensorProto.FLOAT and r.detail["kept_float32"] == ["scales"]


def test_refuses_run_time_resize_scales():
    g = G(seed=4, opset=13)
    x = g.input("x", [1, 2, 3, 3])
    s = g.node("Abs", [g.input("s", [4])], outputs=["s_abs"])
    g.output(g.node("Resize", [x, "", s], outputs=["y"], mode="nearest"), shape=[1, 2, 6, 6])
    with pytest.raises(InputError, match="float32-only input 's_abs' of Resize"):
        run_pass(ConvertFloat16Pass(), g.model(), check=False)


def test_refuses_a_float32_function_body():
    m = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 15, "lib" : 1]>
g (float[2] x) => (float[2] y) { y = lib.Twice (x) }
<domain: "lib", opset_import: ["" : 15]>
Twice (a) => (b) { two = Constant <value = float[1] {2.0}> () b = Mul (a, two) }
""")
    with pytest.raises(InputError, match="model-local function 'Twice'"):
        run_pass(ConvertFloat16Pass(), m, check=False)
