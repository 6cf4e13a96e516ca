"""DecomposeBatchNormPass run directly: inference BN -> Mul + Add, or left with the reason."""

from __future__ import annotations

import numpy as np
import onnx

from bncompile.passes.decompose_batchnorm import DecomposeBatchNormPass
from helpers.fold_graphs import G, assert_equivalent, bn_count, ops, run_pass, unused_initializers


def _relu_bn(seed=0, **bn):
    g = G(seed=seed)
    x = g.input("x", [2, 3, 4, 4])
    g.bn(g.node("Relu", [x]), 3, name="bn", outputs=["y"], **bn)
    g.output("y", shape=[2, 3, 4, 4])
    return g.model()


def test_decomposes_an_inference_bn():
    m = _relu_bn(seed=1)
    out, r = run_pass(DecomposeBatchNormPass(), m)
    (e,) = r.entries
    assert r.modified and e.action == "decomposed" and e.name == "bn" and e.reason is None
    assert ops(out) == ["Relu", "Mul", "Add"] and out.graph.output[0].name == "y"
    assert not unused_initializers(out)
    assert_equivalent(m, out)


def test_leaves_a_training_bn():
    g = G(seed=2)
    x = g.input("x", [2, 3, 4, 4])
    g.bn(x, 3, outputs=["y", "rm", "rv"], training_mode=1)
    g.output("y", shape=[2, 3, 4, 4])
    out, r = run_pass(DecomposeBatchNormPass(), g.model())
    assert not r.modified and "training_mode=1" in r.left[0].reason and bn_count(out) == 1


def test_leaves_a_bn_whose_parameters_are_inputs():
    g = G(seed=3)
    x = g.input("x", [2, 3, 4, 4])
    s = g.input("s", [3])
    _, b, mean, var = g.bn_params(3)
    g.node("BatchNormalization", [x, s, g.init(b), g.init(mean), g.init(var)], outputs=["y"])
    g.output("y", shape=[2, 3, 4, 4])
    _, r = run_pass(DecomposeBatchNormPass(), g.model())
    assert "parameter scale" in r.left[0].reason and "graph input" in r.left[0].reason


def test_leaves_a_bn_whose_input_rank_is_unknown():
    g = G(seed=4)
    x = g.input("x", [2, 3, 4, 4])
    tiled = g.node("Tile", [x, g.init(np.array([1, 1, 1, 2], np.int64))])  # no declared shape
    g.node("Relu", [g.bn(tiled, 3)], outputs=["y"])
    g.output("y", shape=[2, 3, 4, 8])
    _, r = run_pass(DecomposeBatchNormPass(), g.model())
    assert "rank of X is unknown" in r.left[0].reason


def test_one_constant_feeding_two_decomposed_bns():
    """Issue 13.1: four parameters shared by two BNs (Constant nodes); each removed once."""
    g = G(seed=5)
    x = g.input("x", [2, 3, 4, 4])
    params = [g.const(a) for a in g.bn_params(3)]
    y = g.node("BatchNormalization", [g.node("Relu", [x]), *params], epsilon=1e-3)
    y = g.node("BatchNormalization", [g.node("Relu", [y]), *params], epsilon=1e-3)
    g.output(y, shape=[2, 3, 4, 4])
    m = onnx.shape_inference.infer_shapes(g.model())  # X's element type is declared
    out, r = run_pass(DecomposeBatchNormPass(), m)
    assert [e.action for e in r.entries] == ["decomposed", "decomposed"]
    assert "Constant" not in ops(out) and bn_count(out) == 0
    assert_equivalent(m, out)


def test_float64_model_keeps_its_dtype():
    g = G(seed=6)
    x = g.input("x", [2, 3, 4], np.float64)
    g.bn(g.node("Relu", [x]), 3, dtype=np.float64, outputs=["y"])
    g.output("y", np.float64, shape=[2, 3, 4])
    m = g.model()
    out, _ = run_pass(DecomposeBatchNormPass(), m)
    assert {t.data_type for t in out.graph.initializer} == {11}
    assert_equivalent(m, out, rtol=1e-12)
