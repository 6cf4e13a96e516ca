"""Each foldable pattern: a positive model (folded, same outputs) and a negative one (left, why)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bncompile.folding import fold
from helpers.fold_graphs import (G, bn_count, conv_bn, convtranspose_bn, fold_and_check, gemm_bn,
                         matmul_bn, reshape_bn)


# ----------------------------------------------------------------------------- Conv
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_ranks(rank, bias):
    r = fold_and_check(conv_bn(rank=rank, bias=bias, seed=rank), folded=1, left=0)
    conv = [n for n in r.model.graph.node if n.op_type == "Conv"][0]
    assert len(conv.input) == 3  # a bias was added when absent


@pytest.mark.parametrize("group,c_in,c_out", [(2, 4, 6), (4, 4, 4), (4, 4, 8)])  # grouped, depthwise, multiplier
def test_conv_grouped_and_depthwise(group, c_in, c_out):
    fold_and_check(conv_bn(group=group, c_in=c_in, c_out=c_out, seed=group), folded=1)


@pytest.mark.parametrize("opset", [6, 7, 9, 14, 15])
def test_conv_bn_opsets(opset):
    m = conv_bn(opset=opset, seed=opset)
    if opset == 6:  # onnxruntime has no BatchNormalization-6 kernel: compare with the opset-7 twin
        r = fold(m, check=False)
        assert len(r.report.folded) == 1
        twin = onnx.ModelProto()
        twin.CopyFrom(m)
        twin.opset_import[0].version = 7
        for n in twin.graph.node:
            keep = [a for a in n.attribute if a.name != "is_test"]
            del n.attribute[:]
            n.attribute.extend(keep)
        folded = onnx.ModelProto()
        folded.CopyFrom(r.model)
        folded.opset_import[0].version = 7
        from helpers.fold_graphs import assert_equivalent
        assert_equivalent(twin, folded)
    else:
        fold_and_check(m, folded=1)


def test_opset6_is_test_0_left():
    g = G(seed=30, opset=6)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn", outputs=["y"]), shape=[1, 4, 5, 5])
    r = fold(g.model(), check=False)
    assert len(r.report.left) == 1 and "is_test=0" in r.report.left[0].reason


def test_conv_negative_weight_is_runtime_input():
    g = G(seed=3)
    x = g.input("x", [1, 3, 5, 5])
    w = g.input("w", [4, 3, 3, 3])
    y = g.node("Conv", [x, w], name="conv", pads=[1, 1, 1, 1])
    g.output(g.bn(y, 4, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), folded=0, left=1)
    assert "graph input" in r.report.left[0].reason


def test_conv_negative_not_a_layer():
    g = G(seed=4)
    x = g.input("x", [1, 3, 5, 5])
    y = g.node("Relu", [g.conv(x, 3, 4, name="conv")], name="relu")
    g.output(g.bn(y, 4, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), folded=0, left=1)
    assert "not a foldable layer" in r.report.left[0].reason


# ----------------------------------------------------------------------------- ConvTranspose
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose(rank, group):
    fold_and_check(convtranspose_bn(rank=rank, group=group, seed=rank + 10 * group), folded=1)


@pytest.mark.parametrize("bias", [True, False])
def test_convtranspose_output_padding_and_depthwise(bias):
    fold_and_check(convtranspose_bn(bias=bias, output_padding=True, seed=5), folded=1)
    fold_and_check(convtranspose_bn(group=4, c_in=4, c_out=8, bias=bias, seed=6), folded=1)


def test_convtranspose_negative_runtime_bias():
    g = G(seed=7)
    x = g.input("x", [1, 4, 3, 3])
    b = g.input("b", [6])
    y = g.node("ConvTranspose", [x, g.init(g.rand(4, 6, 3, 3)), b], name="convt")
    g.output(g.bn(y, 6, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), folded=0, left=1)
    assert "bias" in r.report.left[0].reason


# ----------------------------------------------------------------------------- Gemm
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", ["none", "scalar", "vector", "row", "full"])
def test_gemm(trans_a, trans_b, c_kind):
    r = fold_and_check(gemm_bn(trans_a=trans_a, trans_b=trans_b, alpha=0.7, beta=-1.3, c_kind=c_kind,
                               seed=trans_a + 2 * trans_b), folded=1)
    gemm = [n for n in r.model.graph.node if n.op_type == "Gemm"][0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == 1.0 and attrs["beta"] == 1.0


def test_gemm_negative_runtime_c():
    g = G(seed=8)
    x = g.input("x", [3, 5])
    c = g.input("c", [4])
    y = g.node("Gemm", [x, g.init(g.rand(5, 4)), c], name="gemm")
    g.output(g.bn(y, 4, name="bn", outputs=["y"]))
    r = fold_and_check(g.model(), folded=0, left=1)
    assert "C" in r.report.left[0].reason


# ----------------------------------------------------------------------------- MatMul
def test_matmul_2d_inserts_bias_add():
    r = fold_and_check(matmul_bn(seed=9), folded=1)
    assert [n.op_type for n in r.model.graph.node] == ["MatMul", "Add"]


def test_matmul_add_bias_updated():
    r = fold_and_check(matmul_bn(add_bias=True, seed=10), folded=1)
    assert [n.op_type for n in r.model.graph.node] == ["MatMul", "Add"]


def test_matmul_negative_3d_output_axis1_is_not_the_column():
    r = fold_and_check(matmul_bn(x_shape=(2, 3, 5), n=4, seed=11), folded=0, left=1)
    assert "rank 3" in r.report.left[0].reason


def test_matmul_add_negative_3d():
    fold_and_check(matmul_bn(x_shape=(2, 3, 5), n=4, add_bias=True, seed=12), folded=0, left=1)


def test_matmul_negative_runtime_weight():
    g = G(seed=13)
    x = g.input("x", [3, 5])
    w = g.input("w", [5, 4])
    y = g.node("MatMul", [x, w], name="mm")
    g.output(g.bn(y, 4, name="bn", outputs=["y"]))
    fold_and_check(g.model(), folded=0, left=1)


# ----------------------------------------------------------------------------- Reshape
@pytest.mark.parametrize("kind", ["Gemm", "MatMul", "Add"])
@pytest.mark.parametrize("target", [None, [-1, 3, 4], [0, 3, -1], [0, 0], [2, 3, -1], [2, 3, 2, 2]])
def test_reshape_of_dense(kind, target):
    c = 12 if target == [0, 0] else 3
    fold_and_check(reshape_bn(kind=kind, target=target, c=c, spatial=(2, 2) if c == 3 else (1,),
                              seed=14), folded=1)


def test_reshape_negative_batch_merged():
    # (2, 12) -> (4, 3, 2): rows are split, channel c is not one column block per row
    r = fold_and_check(reshape_bn(target=[4, 3, 2], seed=15), folded=0, left=1)
    assert "Reshape" in r.report.left[0].reason


def test_reshape_negative_runtime_shape():
    g = G(seed=16)
    x = g.input("x", [2, 5])
    s = g.input("s", [3], np.int64)
    y = g.node("Gemm", [x, g.init(g.rand(5, 12))], name="gemm")
    y = g.node("Reshape", [y, s], name="reshape")
    g.output(g.bn(y, 3, name="bn", outputs=["y"]), shape=[2, 3, 4])
    r = fold(g.model(), check=False)
    assert len(r.report.left) == 1 and "run time" in r.report.left[0].reason


# ----------------------------------------------------------------------------- chains, params
def test_chain_conv_bn_bn():
    g = G(seed=17)
    x = g.input("x", [2, 3, 6, 6])
    y = g.bn(g.bn(g.conv(x, 3, 5, name="conv"), 5, name="bn1"), 5, name="bn2", outputs=["y"])
    g.output(y)
    r = fold_and_check(g.model(), folded=2, left=0)
    assert [n.op_type for n in r.model.graph.node] == ["Conv"]


@pytest.mark.parametrize("via", ["constant", "identity"])
def test_params_via_constant_and_identity(via):
    r = fold_and_check(conv_bn(via=via, seed=18), folded=1)
    assert [n.op_type for n in r.model.graph.node] == ["Conv"]  # orphaned Constant/Identity removed


def test_params_computed_from_constants_are_constant_folded():
    g = G(seed=19)
    x = g.input("x", [2, 3, 5, 5])
    y = g.conv(x, 3, 4, name="conv")
    gamma, beta, mean, var = g.bn_params(4)
    shape = g.node("Shape", [g.init(var.astype(np.float64))], name="shape_of_const")
    ones = g.node("ConstantOfShape", [shape], name="cos",
                  value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.75]))
    var_c = g.node("Add", [ones, g.init(var)], name="var_add")
    mean_c = g.node("Expand", [g.init(np.array([0.3], np.float32)), g.init(np.array([4], np.int64))], name="expand")
    beta_c = g.node("Cast", [g.init(beta.astype(np.float64))], name="cast", to=onnx.TensorProto.FLOAT)
    y = g.node("BatchNormalization", [y, g.init(gamma), beta_c, mean_c, var_c], name="bn", outputs=["y"])
    g.output(y)
    r = fold_and_check(g.model(), folded=1)
    assert len(r.report.constants_folded) == 5
    assert [n.op_type for n in r.model.graph.node] == ["Conv"]


def test_weight_built_from_constants():
    g = G(seed=20)
    x = g.input("x", [2, 3, 5, 5])
    w = g.node("Cast", [g.init(g.rand(4, 3, 3, 3).astype(np.float64))], name="wcast", to=onnx.TensorProto.FLOAT)
    y = g.node("Conv", [x, w], name="conv", pads=[1, 1, 1, 1])
    g.output(g.bn(y, 4, name="bn", outputs=["y"]))
    fold_and_check(g.model(), folded=1)


def test_params_from_runtime_values_negative():
    g = G(seed=21)
    x = g.input("x", [2, 3, 5, 5])
    s = g.input("s", [4])
    y = g.conv(x, 3, 4, name="conv")
    gamma, beta, mean, var = g.bn_params(4)
    gam = g.node("Mul", [s, g.init(gamma)], name="runtime_gamma")
    y = g.node("BatchNormalization", [y, gam, g.init(beta), g.init(mean), g.init(var)], name="bn", outputs=["y"])
    g.output(y)
    r = fold_and_check(g.model(), folded=0, left=1)
    assert "run time" in r.report.left[0].reason


def test_random_ops_are_not_constant_folded():
    g = G(seed=22)
    x = g.input("x", [2, 3, 5, 5])
    y = g.conv(x, 3, 4, name="conv")
    gamma, beta, mean, var = g.bn_params(4)
    noise = g.node("RandomUniformLike", [g.init(mean)], name="rnd", seed=1.0)
    mean_r = g.node("Mul", [noise, g.init(np.zeros(4, np.float32))], name="zero_noise")
    y = g.node("BatchNormalization", [y, g.init(gamma), g.init(beta), mean_r, g.init(var)], name="bn", outputs=["y"])
    g.output(y)
    r = fold(g.model(), check=False)
    assert len(r.report.left) == 1
    assert not any(op == "RandomUniformLike" for op, _ in r.report.constants_folded)


# ----------------------------------------------------------------------------- trailing Mul / Add
def test_trailing_mul_add_absorbed():
    g = G(seed=23)
    x = g.input("x", [2, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn")
    y = g.node("Mul", [y, g.init(g.rand(4, 1, 1) + 1.0)], name="mul")
    y = g.node("Add", [g.init(g.rand(1, 4, 1, 1)), y], name="add", outputs=["y"])
    g.output(y)
    r = fold_and_check(g.model(), folded=1)
    assert r.report.folded[0].absorbed == ["Mul 'mul'", "Add 'add'"]
    assert [n.op_type for n in r.model.graph.node] == ["Conv"]
    assert len(r.model.graph.initializer) == 2  # weight and bias; BN params, Mul and Add constants gone


def test_trailing_mul_not_per_channel_kept():
    g = G(seed=24)
    x = g.input("x", [2, 3, 5, 4])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn")
    y = g.node("Mul", [y, g.init(g.rand(4) + 1.0)], name="mul", outputs=["y"])  # broadcasts along W
    g.output(y)
    r = fold_and_check(g.model(), folded=1)
    assert r.report.folded[0].absorbed == []
    assert [n.op_type for n in r.model.graph.node] == ["Conv", "Mul"]


# ----------------------------------------------------------------------------- subgraphs
def _branch(g: G, name: str, x: str, c_out: int, seed: int):
    sub = G(seed=seed, prefix=name + "_")
    y = sub.conv(x, 3, c_out, name=f"{name}_conv")
    y = sub.bn(y, c_out, name=f"{name}_bn", outputs=[f"{name}_y"])
    sub.outputs.append(helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, c_out, 5, 5]))
    return helper.make_graph(sub.nodes, name, [], sub.outputs, sub.inits)


def test_bn_inside_if_branches():
    g = G(seed=25)
    x = g.input("x", [1, 3, 5, 5])
    cond = g.input("cond", [], np.float32)
    c = g.node("Greater", [cond, g.init(np.array(0.0, np.float32))], name="gt")
    y = g.node("If", [c], name="if", outputs=["y"], then_branch=_branch(g, "then", x, 4, 1),
               else_branch=_branch(g, "else", x, 4, 2))
    g.output(y, shape=[1, 4, 5, 5])
    m = g.model()
    r = fold_and_check(m, folded=2, left=0)
    assert all(d.graph in ("then", "else") for d in r.report.folded)


def test_bn_inside_loop_body():
    g = G(seed=26)
    x = g.input("x", [1, 3, 5, 5])
    body = G(seed=27, prefix="body_")
    body.inputs = [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                   helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                   helper.make_tensor_value_info("acc", onnx.TensorProto.FLOAT, [1, 3, 5, 5])]
    y = body.conv("acc", 3, 3, name="body_conv")
    y = body.bn(y, 3, name="body_bn")
    y = body.node("Add", [y, x], name="body_add", outputs=["acc_out"])
    body.node("Identity", ["cond_in"], name="cond_id", outputs=["cond_out"])
    body.outputs = [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
                    helper.make_tensor_value_info("acc_out", onnx.TensorProto.FLOAT, [1, 3, 5, 5])]
    body_graph = helper.make_graph(body.nodes, "body", body.inputs, body.outputs, body.inits)
    trip = g.init(np.array(3, np.int64), "trip")
    cond = g.init(np.array(True), "cond")
    g.node("Loop", [trip, cond, x], name="loop", outputs=["y"], body=body_graph)
    g.output("y", shape=[1, 3, 5, 5])
    fold_and_check(g.model(), folded=1, left=0)


def test_bn_inside_scan_body():
    g = G(seed=28)
    x = g.input("x", [4, 2, 6])  # scan over axis 0: 4 steps of (2, 6)
    body = G(seed=29, prefix="body_")
    body.inputs = [helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2, 6]),
                   helper.make_tensor_value_info("xi", onnx.TensorProto.FLOAT, [2, 6])]
    h = body.node("Gemm", ["xi", body.init(body.rand(6, 6))], name="body_gemm")
    h = body.bn(h, 6, name="body_bn")
    body.node("Add", [h, "s"], name="body_add", outputs=["s_out"])
    body.node("Identity", ["s_out"], name="scan_id", outputs=["y_i"])
    body.outputs = [helper.make_tensor_value_info("s_out", onnx.TensorProto.FLOAT, [2, 6]),
                    helper.make_tensor_value_info("y_i", onnx.TensorProto.FLOAT, [2, 6])]
    body_graph = helper.make_graph(body.nodes, "scan_body", body.inputs, body.outputs, body.inits)
    s0 = g.init(g.rand(2, 6), "s0")
    g.node("Scan", [s0, x], n_out=2, name="scan", outputs=["s_final", "ys"], body=body_graph,
           num_scan_inputs=1)
    g.output("s_final", shape=[2, 6])
    g.output("ys", shape=[4, 2, 6])
    fold_and_check(g.model(), folded=1, left=0)


def test_main_graph_bn_count_helper():
    assert bn_count(conv_bn()) == 1


def test_unrelated_constant_subexpressions_untouched():
    g = G(seed=31)
    x = g.input("x", [2, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn")
    expo = g.node("Sqrt", [g.init(np.array(4.0, np.float32))], name="unrelated_sqrt")
    y = g.node("Pow", [g.node("Relu", [y], name="relu"), expo], name="pow", outputs=["y"])
    g.output(y)
    r = fold_and_check(g.model(), folded=1)
    assert r.report.constants_folded == []
    assert [n.op_type for n in r.model.graph.node] == ["Conv", "Sqrt", "Relu", "Pow"]


def test_bfloat16_gemm_with_float32_params_stays_bfloat16():
    import ml_dtypes

    g = G(seed=32)
    g.inputs.append(helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [3, 5]))
    y = g.node("Gemm", ["x", g.init(g.rand(5, 4).astype(ml_dtypes.bfloat16))], name="gemm")
    g.bn(y, 4, dtype=np.float32, name="bn", outputs=["y"])
    g.outputs.append(helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [3, 4]))
    m = g.model()
    r = fold(m, check=False)  # onnxruntime has no bfloat16 Gemm kernel on CPU: no numeric check
    assert len(r.report.folded) == 1
    onnx.checker.check_model(r.model, full_check=True)
    assert {t.data_type for t in r.model.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    # numbers: the folded Gemm in float64 against the unfolded formula
    from onnx import numpy_helper as nh
    inits = {t.name: nh.to_array(t).astype(np.float64) for t in m.graph.initializer}
    bn = m.graph.node[1]
    gamma, beta, mean, var = (inits[n] for n in bn.input[1:])
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    x = np.random.default_rng(0).standard_normal((3, 5))
    ref = (x @ inits[m.graph.node[0].input[1]] - mean) / np.sqrt(var + eps) * gamma + beta
    new = {t.name: nh.to_array(t).astype(np.float64) for t in r.model.graph.initializer}
    gemm = r.model.graph.node[0]
    got = x @ new[gemm.input[1]] + new[gemm.input[2]]
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.05 * np.abs(ref).max())
