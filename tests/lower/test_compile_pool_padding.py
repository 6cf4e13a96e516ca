"""MaxPool / AveragePool with ``auto_pad`` SAME_UPPER / SAME_LOWER (found by a random differential run of
13,427 depthwise and pool graphs, 2026-11-30): TVM 0.27's Pool converter computed SAME_LOWER's output as
floor(size / stride) (one row or column short), left a negative total pad (kernel < stride) unclamped, which
shifted every window silently, and read the batch dim as an int (a free batch failed). bncompile's
converter turns SAME_* into the spec's explicit pads (``frontend.same_pads``). References: onnxruntime
where it follows the spec, and a brute-force NumPy pool written from the spec's text where it does not
(dilated SAME, kernel < stride: onnxruntime refuses negative pads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

import helpers.compile_models as M

pytestmark = pytest.mark.tvm


def _pool_model(op, shape, opset=15, **attrs):
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _spec_pool(x, op, kernel, strides, dilations, mode, count_include_pad=0):
    """The ONNX spec's SAME pooling, brute force: output ceil(n / s) per spatial axis, the total pad
    (out - 1) * s + (k - 1) * d + 1 - n (never below 0) split with the odd one at the end (SAME_UPPER) or
    the start (SAME_LOWER); a window's padded positions are ignored (max) or counted per
    count_include_pad (average)."""
    n, c, *sizes = x.shape
    outs, begins = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        begins.append(total // 2 if mode == "SAME_UPPER" else total - total // 2)
        outs.append(out)
    y = np.zeros((n, c, *outs), np.float64)
    for idx in np.ndindex(*outs):
        taps = []
        for off in np.ndindex(*kernel):
            pos = [i * s - b + o * d for i, s, b, o, d in zip(idx, strides, begins, off, dilations)]
            taps.append(pos)
        vals = [x[(slice(None), slice(None), *p)] for p in taps if all(0 <= q < m for q, m in zip(p, sizes))]
        if op == "MaxPool":
            y[(slice(None), slice(None), *idx)] = np.max(vals, axis=0)
        else:
            count = len(taps) if count_include_pad else len(vals)
            y[(slice(None), slice(None), *idx)] = np.sum(vals, axis=0) / count
    return y


CASES = [  # op, (H, W), kernel, strides, dilations
    ("MaxPool", (5, 5), (3, 3), (3, 3), (1, 1)),     # SAME_LOWER: 2x2, not 1x1
    ("MaxPool", (97, 97), (3, 3), (2, 2), (1, 1)),   # 49x49, not 48x48
    ("MaxPool", (35, 3), (3, 3), (1, 3), (1, 3)),    # dilated
    ("MaxPool", (19, 19), (3, 7), (2, 2), (2, 3)),
    ("MaxPool", (12, 8), (1, 1), (3, 3), (1, 1)),    # kernel < stride: the total pad clamps to 0
    ("MaxPool", (16, 15), (2, 4), (3, 3), (1, 1)),
    ("MaxPool", (2, 2), (1, 4), (3, 3), (1, 1)),     # tiny input: a negative pad failed to compile
    ("AveragePool", (14, 13), (3, 3), (2, 2), (1, 1)),
    ("AveragePool", (9, 10), (2, 2), (3, 3), (1, 1)),
    ("AveragePool", (17, 12), (5, 4), (2, 3), (1, 1)),
]


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("op,hw,kernel,strides,dil", CASES, ids=[f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-d{c[4]}" for c in CASES])
def test_same_auto_pad_follows_the_spec(compiler, op, hw, kernel, strides, dil, mode):
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), auto_pad=mode)
    if dil != (1, 1):
        attrs["dilations"] = list(dil)
    c = 3
    x = np.random.default_rng(sum(hw) + sum(kernel)).standard_normal((2, c, *hw)).astype(np.float32)
    want = _spec_pool(x.astype(np.float64), op, kernel, strides, dil, mode)
    cm = compiler.compile(_pool_model(op, [2, c, *hw], **attrs), target="llvm")
    got = cm.run({"x": x})["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # onnxruntime, where it accepts the model and follows the spec (no dilation, a non-negative pad)
    if dil == (1, 1) and all(k >= s for k, s in zip(kernel, strides)):
        np.testing.assert_allclose(M.ort_run(_pool_model(op, [2, c, *hw], **attrs), {"x": x})[0], want,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_same_auto_pad_with_a_free_batch(compiler, op):
    attrs = dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER")
    cm = compiler.compile(_pool_model(op, ["N", 4, 11, 10], **attrs), target="llvm")
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 11, 10)).astype(np.float32)
        got = cm.run({"x": x})["y"]
        np.testing.assert_allclose(got, _spec_pool(x.astype(np.float64), op, (3, 2), (2, 2), (1, 1), "SAME_LOWER"),
                                   rtol=1e-6, atol=1e-6)


def test_same_auto_pad_needs_static_spatial_dims(compiler):
    from bncompile.errors import UnsupportedError

    model = _pool_model("MaxPool", [1, 3, "H", "W"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    with pytest.raises(UnsupportedError, match="auto_pad=SAME_UPPER needs static spatial dims"):
        compiler.compile(model, target="llvm")


def test_same_pads_formula():
    from bncompile.lower.frontend import same_pads

    assert same_pads([5, 5], [3, 3], [3, 3], [1, 1], "SAME_LOWER") == [1, 1, 0, 0]
    assert same_pads([5, 5], [3, 3], [3, 3], [1, 1], "SAME_UPPER") == [0, 0, 1, 1]
    assert same_pads([12], [1], [3], [1], "SAME_UPPER") == [0, 0]          # would be -2: clamped
    assert same_pads([35], [3], [1], [3], "SAME_LOWER") == [3, 3]          # dilation 3: window 7
