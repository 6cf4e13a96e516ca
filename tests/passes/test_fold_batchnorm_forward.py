"""Forward folding: a BN whose producer cannot take it folds into the one layer reading its output
(Gemm, MatMul with a constant right operand, unpadded Conv, 1x1 stride-1 ConvTranspose):
``W(k*x + c) + b = (W diag k) x + (W c + b)``. Each fold is compared with the original in
onnxruntime (optimizations off) on random inputs; each refusal has its negative test."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.fold_graphs import G, bn_count, fold_and_check, ops


def _head(layer, *, x_shape=(3, 6), pre="Relu", seed=0, **kw):
    g = G(seed=seed)
    x = g.input("x", list(x_shape))
    y = g.node(pre, [x], name="pre") if pre else x
    c = x_shape[1]
    y = g.bn(y, c, name="bn")
    layer(g, y, c, **kw)
    return g.model()


def _gemm(g, y, c, *, trans_b=0, alpha=1.0, beta=1.0, bias=True, trans_a=0):
    b = g.rand(4, c) if trans_b else g.rand(c, 4)
    ins = [y, g.init(b)] + ([g.init(g.rand(4))] if bias else [])
    g.output(g.node("Gemm", ins, name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta,
                    outputs=["out"]))


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(0, 1.0, 1.0, True), (1, 0.7, 1.3, True),
                                                      (1, 1.0, 1.0, False)])
def test_forward_into_gemm(trans_b, alpha, beta, bias):
    m = _head(_gemm, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias, seed=trans_b + 1)
    r = fold_and_check(m, folded=1, left=0)
    d = r.report.batchnorms[0]
    assert d.direction == "next" and d.into == "Gemm 'fc' (the next layer)" and d.into_op == "Gemm"
    assert ops(r.model) == ["Relu", "Gemm"]


def test_forward_from_a_graph_input_into_gemm():
    fold_and_check(_head(_gemm, pre=None, seed=4), folded=1)


def test_gemm_with_trans_a_is_left():
    r = fold_and_check(_head(lambda g, y, c: g.output(g.node(
        "Gemm", [y, g.init(g.rand(3, 4))], transA=1, name="fc", outputs=["out"])), seed=5), left=1)
    assert "nor into the next layer: Gemm 'fc' has transA=1" in r.report.left[0].reason


def _matmul(g, y, c, *, add=True, graph_output=False):
    z = g.node("MatMul", [y, g.init(g.rand(c, 4))], name="mm")
    if add:
        z = g.node("Add", [z, g.init(g.rand(4))], name="bias")
    g.output(g.node("Relu", [z], outputs=["out"]))
    if graph_output:
        g.output(z)


@pytest.mark.parametrize("add", [True, False])
def test_forward_into_matmul(add):
    r = fold_and_check(_head(_matmul, add=add, seed=6), folded=1)
    assert ops(r.model) == ["Relu", "MatMul", "Add", "Relu"]   # the bias Add updated, or inserted


def test_forward_into_matmul_whose_output_is_a_graph_output():
    m = _head(_matmul, add=False, graph_output=True, seed=7)
    r = fold_and_check(m, folded=1)
    assert [o.name for o in r.model.graph.output] == [o.name for o in m.graph.output]


def test_matmul_on_a_3d_input_is_left():
    r = fold_and_check(_head(lambda g, y, c: g.output(g.node(
        "MatMul", [y, g.init(g.rand(5, 4))], name="mm", outputs=["out"])), x_shape=(2, 3, 5), seed=8),
        left=1)
    assert "rank 3" in r.report.left[0].reason and "contraction axis" in r.report.left[0].reason


def _conv(g, y, c, *, k=1, pads=0, group=1, auto_pad=None):
    attrs = {"pads": [pads] * 4} if auto_pad is None else {"auto_pad": auto_pad}
    g.output(g.node("Conv", [y, g.init(g.rand(6, c // group, k, k)), g.init(g.rand(6))], name="conv",
                    group=group, outputs=["out"], **attrs))


@pytest.mark.parametrize("k,group,auto_pad", [(1, 1, None), (3, 1, None), (3, 2, None),
                                               (1, 1, "SAME_UPPER"), (3, 1, "VALID")])
def test_forward_into_unpadded_conv(k, group, auto_pad):
    m = _head(_conv, x_shape=(2, 4, 7, 7), k=k, group=group, auto_pad=auto_pad, seed=9 + k + group)
    r = fold_and_check(m, folded=1)
    assert r.report.batchnorms[0].into == "Conv 'conv' (the next layer)"


def test_forward_from_concat_into_1x1_conv_without_bias():
    g = G(seed=12)
    a, b = g.input("a", [2, 2, 5, 5]), g.input("b", [2, 3, 5, 5])
    y = g.bn(g.node("Concat", [a, b], axis=1, name="cat"), 5, name="bn")
    g.output(g.node("Conv", [y, g.init(g.rand(4, 5, 1, 1))], name="conv", outputs=["out"]))
    fold_and_check(g.model(), folded=1)


@pytest.mark.parametrize("attrs", [{"pads": [1] * 4}, {"auto_pad": "SAME_UPPER"}])
def test_padded_conv_is_left_with_the_reason(attrs):
    g = G(seed=13)
    y = g.bn(g.node("Relu", [g.input("x", [2, 4, 6, 6])], name="relu"), 4, name="bn")
    g.output(g.node("Conv", [y, g.init(g.rand(5, 4, 3, 3))], name="conv", outputs=["out"], **attrs))
    r = fold_and_check(g.model(), left=1)
    why = r.report.left[0].reason
    assert "its producer Relu 'relu' is not a foldable layer" in why
    assert "nor into the next layer: Conv 'conv' pads its input" in why and "where it saw zeros" in why


def _convt(g, y, c, *, k=2, stride=2, group=1, **attrs):
    g.output(g.node("ConvTranspose", [y, g.init(g.rand(c, 6 // group, k, k)), g.init(g.rand(6))],
                    name="convt", group=group, strides=[stride, stride], outputs=["out"], **attrs))


@pytest.mark.parametrize("group", [1, 2])
def test_forward_into_1x1_conv_transpose(group):
    fold_and_check(_head(_convt, x_shape=(2, 4, 3, 3), k=1, stride=1, group=group, seed=14 + group),
                   folded=1)


@pytest.mark.parametrize("k,stride,extra", [(3, 1, {}), (1, 2, {}), (2, 2, {}),
                                            (1, 1, {"output_padding": [0, 0], "pads": [0, 0, 0, 0],
                                                    "output_shape": [3, 3]}),
                                            (2, 2, {"pads": [1, 1, 1, 1]})])
def test_conv_transpose_with_taps_or_padding_is_left(k, stride, extra):
    """Each output of a ConvTranspose sees one kernel tap (kernel == strides: the shift would need
    a bias per tap), overlapping taps (3, stride 1: borders see fewer) or gaps (stride 2)."""
    r = fold_and_check(_head(_convt, x_shape=(2, 4, 3, 3), k=k, stride=stride, seed=20, **extra), left=1)
    assert "nor into the next layer: ConvTranspose 'convt'" in r.report.left[0].reason


def test_bn_output_with_two_readers_is_left():
    g = G(seed=21)
    y = g.bn(g.node("Relu", [g.input("x", [3, 5])], name="relu"), 5, name="bn")
    g.output(g.node("Gemm", [y, g.init(g.rand(5, 4))], name="fc", outputs=["out"]))
    g.output(g.node("Sigmoid", [y], outputs=["side"]))
    r = fold_and_check(g.model(), left=1)
    assert r.report.left[0].reason == "its producer Relu 'relu' is not a foldable layer (Conv, " \
        "ConvTranspose, Gemm, MatMul, MatMul+Add, or Reshape of Gemm/MatMul)"


def test_bn_read_as_a_weight_is_left():
    g = G(seed=22)
    y = g.bn(g.node("Relu", [g.input("x", [5, 5])], name="relu"), 5, name="bn")
    g.output(g.node("MatMul", [g.input("a", [3, 5]), y], name="mm", outputs=["out"]))
    r = fold_and_check(g.model(), left=1)
    assert "reads it as input 1" in r.report.left[0].reason


def test_forward_and_backward_into_one_conv():
    """Relu -> BN1 -> Conv(1x1) -> BN2: BN1 into the conv's input side, BN2 into its output side."""
    g = G(seed=23)
    y = g.bn(g.node("Relu", [g.input("x", [2, 4, 5, 5])], name="relu"), 4, name="bn1")
    y = g.node("Conv", [y, g.init(g.rand(6, 4, 1, 1))], name="conv")
    g.output(g.bn(y, 6, name="bn2", outputs=["out"]))
    r = fold_and_check(g.model(), folded=2)
    assert [d.direction for d in r.report.batchnorms] == ["next", "previous"]
    assert bn_count(r.model) == 0 and ops(r.model) == ["Relu", "Conv"]


def test_float16_forward_fold_keeps_the_dtype():
    g = G(seed=24)
    y = g.bn(g.node("Relu", [g.input("x", [3, 6], np.float16)], name="relu"), 6, name="bn",
             dtype=np.float32)
    g.output(g.node("Gemm", [y, g.init(g.rand(6, 4, dtype=np.float16)), g.init(g.rand(4, dtype=np.float16))],
                    name="fc", outputs=["out"]), np.float16)
    r = fold_and_check(g.model(), folded=1, rtol=1e-2)
    assert {t.data_type for t in r.model.graph.initializer} == {10}
