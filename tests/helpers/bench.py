"""Tiny models for the benchmark tests and a check of a report against bench.schema.json."""

from __future__ import annotations

import jsonschema
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bncompile.bench import load_schema


def _bn_inits(rng, f, prefix=""):
    return [numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "scale"),
            numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "bias"),
            numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), prefix + "mean"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, f).astype(np.float32), prefix + "var")]


def conv_bn_relu(*, batch="N", c=3, f=8, hw=12, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, c, 3, 3)).astype(np.float32), "W"),
             *_bn_inits(rng, f)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    graph = helper.make_graph(nodes, "conv_bn_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, f, hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def gemm_bn(*, batch="N", k=16, f=10, seed=1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((f, k)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), "B"),
             *_bn_inits(rng, f)]
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1),
             helper.make_node("BatchNormalization", ["g", "scale", "bias", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "gemm_bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, f])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def validate(data: dict) -> None:
    jsonschema.Draft202012Validator(load_schema()).validate(data)
