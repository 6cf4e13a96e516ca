"""BN behind layout Transposes (tf2onnx's NHWC graphs) and dynamo's Expand(CastLike(...)) biases:
folded, compared with the original in onnxruntime (optimizations off); and the negative cases."""

from __future__ import annotations

import numpy as np

from helpers.fold_graphs import G, bn_count, dynamo_conv_bn, fold_and_check, ops, tf2onnx_conv_bn


def test_tf2onnx_nhwc_conv_biasadd_bn_folds_through_the_transposes():
    m = tf2onnx_conv_bn(blocks=2, seed=1)
    r = fold_and_check(m, folded=2, left=0)
    d = r.report.batchnorms[0]
    assert d.direction == "previous" and d.into.startswith("Conv 'conv0' (through Transpose 'bn0_in'")
    assert "Add 'bias0'" in d.into
    assert "Add" not in ops(r.model) and bn_count(r.model) == 0   # the BiasAdd went into the bias


def test_tf2onnx_nhwc_without_biasadd():
    fold_and_check(tf2onnx_conv_bn(bias_add=False, seed=2), folded=1, left=0)


def test_transposes_that_move_the_channel_are_refused():
    """Conv -> Transpose(0,2,3,1) -> Transpose(0,1,3,2) -> BN: BN's axis 1 is the conv's H axis."""
    m = tf2onnx_conv_bn(bias_add=False, seed=3, c=5, perms=((0, 2, 3, 1), (0, 1, 3, 2)))
    r = fold_and_check(m, left=1)
    assert "its channel is axis 2 of the output of Conv 'conv0'" in r.report.left[0].reason


def test_a_transpose_output_with_another_use_is_refused():
    g = G(seed=4)
    x = g.input("x", [2, 4, 5, 5])
    c = g.node("Conv", [x, g.init(g.rand(3, 4, 1, 1))], name="conv")
    t = g.node("Transpose", [c], perm=[0, 2, 3, 1], name="t1")
    g.output(g.node("Relu", [t], outputs=["side"]))
    t2 = g.node("Transpose", [t], perm=[0, 3, 1, 2], name="t2")
    g.output(g.bn(t2, 3, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), left=1)
    assert "2 uses" in r.report.left[0].reason and "behind Transpose 't2'" in r.report.left[0].reason


def test_an_add_that_is_not_per_channel_stops_the_walk():
    g = G(seed=5)
    x = g.input("x", [2, 4, 5, 5])
    c = g.node("Conv", [x, g.init(g.rand(3, 4, 1, 1))], name="conv")
    t = g.node("Transpose", [c], perm=[0, 2, 3, 1], name="t1")
    t = g.node("Add", [t, g.init(g.rand(5, 3))], name="add")       # varies along W too
    t = g.node("Transpose", [t], perm=[0, 3, 1, 2], name="t2")
    g.output(g.bn(t, 3, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), left=1)
    assert "its channel is axis 3 of the output of Add 'add'" in r.report.left[0].reason


def test_dynamo_expand_castlike_bias_folds():
    m = dynamo_conv_bn(seed=6)
    r = fold_and_check(m, folded=1, left=0)
    assert ops(r.model) == ["Conv"]
    assert sorted(op for op, _ in r.report.constants_folded) == ["CastLike", "Expand", "Expand", "Shape"]


def test_castlike_of_an_untyped_value_is_left():
    """CastLike's target type must be declared: without it the constant's type is unknown."""
    from bncompile.passes.fold_constants import _type_only

    m = dynamo_conv_bn(seed=7)
    import onnx_ir as ir
    irm = ir.serde.deserialize_model(m)
    node = next(n for n in irm.graph if n.op_type == "CastLike")
    assert _type_only(node, 1).dtype == np.float32
    node.inputs[1].type = None
    assert _type_only(node, 1) is None
