"""Converter fixes over TVM 0.27's ONNX frontend, found by a random differential run of 5,570 CNN-op graphs
against onnxruntime (2026-11-30):

* ConvTranspose's ``output_shape`` attribute was ignored (the natural size came back: 11x11 for 10x10);
  now turned into the spec's pads (``frontend.conv_transpose_pads``);
* Resize computed its coordinates from out / in instead of the given scale, which differs wherever
  in * scale is not whole (0.5 on an odd size: silently wrong values); now refused there with the fix.
References: onnxruntime (all graph optimizations off) and ``onnx.reference``."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import helpers.compile_models as M

pytestmark = pytest.mark.tvm


def _model(node, shape, inits=(), opset=15):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


CT_CASES = [  # x (N, C, H, W), weight (C, O/g, kh, kw), strides, dilations, output_padding, output_shape, auto_pad, group
    ((1, 2, 5, 5), (2, 3, 3, 3), (2, 2), (1, 1), (0, 0), (10, 10), None, 1),
    ((1, 2, 5, 5), (2, 3, 3, 3), (2, 2), (1, 1), (0, 0), (9, 9), None, 1),
    ((2, 2, 5, 6), (2, 3, 3, 3), (2, 2), (1, 1), (0, 0), (10, 11), "SAME_UPPER", 1),
    ((1, 4, 7, 4), (4, 1, 4, 3), (3, 2), (2, 1), (1, 0), (20, 8), None, 2),
    ((1, 3, 6, 6), (3, 2, 5, 5), (1, 1), (1, 1), (0, 0), (8, 9), "SAME_LOWER", 1),
]


@pytest.mark.parametrize("xs,ws,strides,dil,opad,out,auto_pad,group", CT_CASES)
def test_conv_transpose_output_shape(compiler, xs, ws, strides, dil, opad, out, auto_pad, group):
    rng = np.random.default_rng(sum(xs) + sum(out))
    w = numpy_helper.from_array(rng.standard_normal((ws[0], ws[1], *ws[2:])).astype(np.float32), "w")
    attrs = dict(kernel_shape=list(ws[2:]), strides=list(strides), dilations=list(dil), output_padding=list(opad),
                 output_shape=list(out), group=group)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    model = _model(helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs), list(xs), [w])
    x = rng.standard_normal(xs).astype(np.float32)
    got = compiler.compile(model, target="llvm").run({"x": x})["y"]
    # onnxruntime; with auto_pad, onnx.reference too (its col2im refuses some of the plain cases)
    want = M.ort_run(model, {"x": x})[0]
    assert got.shape == want.shape == (xs[0], ws[1] * group, *out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if auto_pad:
        np.testing.assert_allclose(ReferenceEvaluator(model).run(None, {"x": x})[0], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


def test_conv_transpose_output_shape_past_the_natural_size(compiler):
    from bncompile.errors import UnsupportedError

    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], output_shape=[12, 12])
    with pytest.raises(UnsupportedError, match="output_shape 12 exceeds the natural size 11; use output_padding"):
        compiler.compile(_model(node, [1, 2, 5, 5], [w]), target="llvm")


def test_conv_transpose_pads_formula():
    from bncompile.lower.frontend import conv_transpose_pads

    # 2 * (5 - 1) + 0 + 3 - 10 = 1: the odd one at the beginning unless SAME_UPPER
    assert conv_transpose_pads([5], [3], [2], [1], [0], [10], "NOTSET") == [1, 0]
    assert conv_transpose_pads([5], [3], [2], [1], [0], [10], "SAME_UPPER") == [0, 1]


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("hw,scales", [((4, 7), (1.0, 0.5)), ((6, 5), (1.3, 1.0)), ((5, 5), (0.6, 2.5))])
def test_resize_fractional_scales_refused(compiler, mode, hw, scales):
    from bncompile.errors import UnsupportedError

    s = numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "s")
    model = _model(helper.make_node("Resize", ["x", "", "s"], ["y"], mode=mode), [1, 2, *hw], [s], opset=13)
    with pytest.raises(UnsupportedError, match=r"\(Resize\): scale .* gives .* pixels; .*give the 'sizes' input"):
        compiler.compile(model, target="llvm")


@pytest.mark.parametrize("mode,coord", [("linear", "half_pixel"), ("nearest", "asymmetric"),
                                        ("linear", "align_corners"), ("cubic", "pytorch_half_pixel")])
@pytest.mark.parametrize("hw,scales", [((4, 6), (0.5, 0.5)), ((3, 5), (2.0, 3.0)), ((6, 4), (1.5, 0.75))])
def test_resize_whole_scales_match(compiler, mode, coord, hw, scales):
    s = numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "s")
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode=coord)
    model = _model(node, [1, 2, *hw], [s], opset=13)
    x = np.random.default_rng(sum(hw)).standard_normal((1, 2, *hw)).astype(np.float32)
    got = compiler.compile(model, target="llvm").run({"x": x})["y"]
    want = M.ort_run(model, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
