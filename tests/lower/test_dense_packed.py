"""Matmuls by a constant matrix legalized to the packed dense
(:func:`bncompile.lower.graph_schedules.legalize_matmul`: the weight packed in blocks of V outputs, each
block's panel contiguous). ONNX Gemm (transB 0 and 1, with and without bias, alpha/beta), MatMul with a
constant right side and 1-, 2- and 3-D left sides, static and free batch, output counts a vector divides and
ones none does (TVM's legalization then), against onnxruntime with optimizations off. No timing."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import helpers.compile_models as M

pytestmark = pytest.mark.tvm

AVX2 = {"kind": "llvm", "mcpu": "haswell"}


def _model(node, x_shape, inits, out_rank):
    g = helper.make_graph([node], "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _check(compiler, model, shapes, target):
    cm = compiler.compile(model, target=target)
    for k, shape in enumerate(shapes):
        x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        got = cm.run({"x": x})["y"]
        want = M.ort_run(model, {"x": x})[0]
        assert got.shape == want.shape
        assert M.rel_err(got, want) < 1e-5, M.rel_err(got, want)
    return cm.info["cpu_schedules"]


@pytest.mark.parametrize("k,n", [(1280, 1000), (64, 40), (37, 96), (16, 13), (200, 8), (5, 24)])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("batch", [1, 3, "N"])
def test_gemm_constant_weight(compiler, k, n, trans_b, batch):
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)
    model = _model(node, [batch, k], inits, 2)
    rules = _check(compiler, model, [(1 if batch == "N" else batch, k)] + ([(4, k)] if batch == "N" else []), AVX2)
    packed = any(n % v == 0 for v in (8, 16, 24, 32, 4, 12, 20, 28))     # AVX2 blocks: multiples of 8 or 4
    assert ("dense_packed" in rules.values()) == packed, rules


@pytest.mark.parametrize("x_shape", [[24], [3, 24], [2, 5, 24], ["N", 7, 24]])
def test_matmul_constant_right_side(compiler, x_shape):
    rng = np.random.default_rng(len(x_shape))
    w = rng.standard_normal((24, 48)).astype(np.float32)
    model = _model(helper.make_node("MatMul", ["x", "w"], ["y"]), x_shape, [numpy_helper.from_array(w, "w")],
                   len(x_shape))
    shapes = [[2 if d == "N" else d for d in x_shape]]
    for target in (AVX2, "llvm"):
        rules = _check(compiler, model, shapes, target)
        assert "dense_packed" in rules.values(), rules


def test_dense_vector_divides():
    from bncompile.lower.graph_schedules import dense_vector

    assert dense_vector(1000, 16) == 40 and dense_vector(1280, 16) == 64 and dense_vector(13, 16) is None
    for lanes in (4, 8, 16):
        for n in range(1, 300):
            v = dense_vector(n, lanes)
            assert v is None or (n % v == 0 and v % 4 == 0 and v <= 4 * lanes)
