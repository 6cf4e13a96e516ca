"""`bncompile.compile` on chains of element-wise ops whose lowered blocks read their input many times.

TVM's float32 sigmoid goes through ``fast_exp``, whose expression reads its input about 30 times; inlining
such blocks one into the next copies the whole chain into every read (k**depth growth). Before the
bound (:data:`bncompile.lower.graph_schedules.INLINE_MAX_SIZE`), 4 chained sigmoids took 15-45 s to
compile and 8 exhausted memory (std::bad_alloc in dlight's trial inlining); branches that join again
(``x + relu(x)``, chained) doubled per level the same way (18 took 2 minutes, 22 exhausted memory);
tanh's lowering copies its argument (7 chained ``x * tanh(x) - x``: 49 s to build) and nested index
conditionals slow TVM's simplifier exponentially (5 chained reflect pads with slices: 80 s).
Found by trying a chain of 60 sigmoids. Every chain here compiles in seconds and matches onnxruntime.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.tvm


def _chain(ops, shape, *, conv: bool = False):
    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    out_shape = list(shape)
    if conv:
        c = shape[1]
        inits.append(numpy_helper.from_array((0.2 * rng.standard_normal((c, c, 3, 3))).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1]))
        prev = "c0"
    for i, op in enumerate(ops):
        if op == "SiLU":
            nodes.append(helper.make_node("Sigmoid", [prev], [f"s{i}"]))
            nodes.append(helper.make_node("Mul", [prev, f"s{i}"], [f"t{i}"]))
        elif op == "ResidualRelu":          # x + relu(x): two branches that join again
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            nodes.append(helper.make_node("Add", [prev, f"r{i}"], [f"t{i}"]))
        elif op == "TanhDiamond":           # x * tanh(x) - x: tanh's lowering reads its argument often
            nodes.append(helper.make_node("Tanh", [prev], [f"a{i}"]))
            nodes.append(helper.make_node("Mul", [prev, f"a{i}"], [f"b{i}"]))
            nodes.append(helper.make_node("Sub", [f"b{i}", prev], [f"t{i}"]))
        elif op == "ReflectPadSlice":       # index conditionals nested in index conditionals
            if not inits or inits[-1].name != "ax":
                inits += [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                          numpy_helper.from_array(np.array([1, 1], np.int64), "st"),
                          numpy_helper.from_array(np.array([shape[2] + 1, shape[3] + 1], np.int64), "en"),
                          numpy_helper.from_array(np.array([2, 3], np.int64), "ax")]
            nodes.append(helper.make_node("Pad", [prev, "pads"], [f"p{i}"], mode="reflect"))
            nodes.append(helper.make_node("Slice", [f"p{i}", "st", "en", "ax"], [f"t{i}"]))
        else:
            nodes.append(helper.make_node(op, [prev], [f"t{i}"]))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, out_shape)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("ops,shape,conv", [
    (["Sigmoid"] * 12, (1, 16), False),
    (["Sigmoid", "Tanh", "Softplus", "Sigmoid"] * 4, (2, 3, 5), False),
    (["SiLU"] * 20, (1, 8, 6, 6), False),
    (["ResidualRelu"] * 30, (1, 8, 6, 6), False),
    (["TanhDiamond"] * 12, (1, 8, 6, 6), False),
    (["ReflectPadSlice"] * 12, (1, 4, 9, 7), False),
    (["Sigmoid"] * 8, (1, 16, 14, 14), True),
])
def test_long_element_wise_chains_compile_quickly(ops, shape, conv):
    import onnxruntime as ort

    import bncompile

    model = _chain(ops, shape, conv=conv)
    t0 = time.perf_counter()
    cm = bncompile.compile(model)
    seconds = time.perf_counter() - t0
    # a loose bound against the exponential blow-up (minutes, or out of memory), not a speed test
    assert seconds < 60, f"compile took {seconds:.0f} s"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = next(iter(cm.run({"x": x}).values()))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_inline_size_estimate():
    """The estimate that keeps dlight's rules off such functions: a chain of sigmoids past it, one
    sigmoid within it."""
    from bncompile.lower import graph_schedules as G
    from bncompile.lower.tuning import fused_module

    def funcs(model):
        from bncompile.lower.tvm import tvm

        fused, _ = fused_module(model)
        return [f for f in fused.functions.values() if isinstance(f, tvm().tirx.PrimFunc)]

    assert any(G.inline_would_blow_up(f) for f in funcs(_chain(["Sigmoid"] * 6, (1, 16))))
    assert not any(G.inline_would_blow_up(f) for f in funcs(_chain(["Sigmoid"], (1, 16))))
