"""Seeded generator of the example models in this folder (each well under 1 MB).

    python models/generate.py            # rewrites the .onnx files beside this script

* cnn_nchw.onnx   Conv+BN+Relu CNN, NCHW, dynamic batch, with a residual Add and a Gemm head
* cnn_nhwc.onnx   the channels-last variant as Keras/tf2onnx exports it (Transposes around NCHW convs,
                  a depthwise conv, BN fed by the conv)
* mlp_gemm.onnx   an MLP with Gemm+BN+Relu (transB=1, as PyTorch exports Linear)
* train_step.onnx a Keras BatchNormalization training step (NHWC, fused path) from bncompile.build_model
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SEED = 20261123


class _Net:
    def __init__(self, name: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.name, self.n = [], [], name, 0

    def w(self, shape, scale=None):
        self.n += 1
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        arr = self.rng.normal(0, scale or np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        name = f"w{self.n}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, arr):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def bn(self, x, c):
        r = self.rng
        params = [self.const(r.normal(1, 0.2, c)), self.const(r.normal(0, 0.1, c)),
                  self.const(r.normal(0, 0.1, c)), self.const(r.uniform(0.5, 1.5, c))]
        return self.node("BatchNormalization", [x] + params, epsilon=1e-3)

    def conv_bn_relu(self, x, cin, cout, k=3, stride=1, group=1, bias=False):
        ins = [x, self.w((cout, cin // group, k, k))]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.1, cout)))
        y = self.node("Conv", ins, pads=[k // 2] * 4, strides=[stride, stride], group=group)
        return self.node("Relu", [self.bn(y, cout)])

    def model(self, inputs, outputs, doc):
        g = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)], producer_name="bncompile-models",
                              doc_string=doc)
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def cnn_nchw() -> onnx.ModelProto:
    n = _Net("cnn_nchw", SEED)
    x = n.conv_bn_relu("x", 3, 16, bias=True)
    x = n.conv_bn_relu(x, 16, 32, stride=2)
    r = n.conv_bn_relu(x, 32, 32)
    r = n.node("BatchNormalization", [n.node("Conv", [r, n.w((32, 32, 3, 3))], pads=[1] * 4)] +
               [n.const(a) for a in (n.rng.normal(1, .2, 32), n.rng.normal(0, .1, 32), n.rng.normal(0, .1, 32),
                                     n.rng.uniform(.5, 1.5, 32))], epsilon=1e-3)
    x = n.node("Relu", [n.node("Add", [x, r])])
    x = n.conv_bn_relu(x, 32, 64, stride=2)
    x = n.node("GlobalAveragePool", [x])
    x = n.node("Flatten", [x])
    y = n.node("Gemm", [x, n.w((10, 64)), n.const(np.zeros(10))], transB=1)
    n.nodes.append(helper.make_node("Identity", [y], ["logits"]))
    return n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                   "Conv+BN+Relu CNN (NCHW) with a residual block; every BN is foldable.")


def cnn_nhwc() -> onnx.ModelProto:
    n = _Net("cnn_nhwc", SEED + 1)
    x = n.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    x = n.conv_bn_relu(x, 3, 24)
    x = n.conv_bn_relu(x, 24, 24, group=24)            # depthwise
    x = n.conv_bn_relu(x, 24, 48, k=1)
    x = n.node("Transpose", [x], perm=[0, 2, 3, 1])
    n.nodes.append(helper.make_node("Identity", [x], ["features"]))
    return n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24, 24, 3])],
                   [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 24, 24, 48])],
                   "Channels-last CNN as tf2onnx exports a Keras model: NHWC input, Transposes around NCHW "
                   "convs, a depthwise conv.")


def mlp_gemm() -> onnx.ModelProto:
    n = _Net("mlp_gemm", SEED + 2)
    x = "x"
    for cin, cout in ((64, 128), (128, 128), (128, 32)):
        y = n.node("Gemm", [x, n.w((cout, cin)), n.const(n.rng.normal(0, .1, cout))], transB=1)
        x = n.node("Relu", [n.bn(y, cout)])
    n.nodes.append(helper.make_node("Identity", [x], ["y"]))
    return n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                   "MLP: Gemm (transB=1, bias) + BN + Relu, three layers.")


def train_step() -> onnx.ModelProto:
    sys.path.insert(0, str(HERE.parent))
    from bncompile import BatchNormConfig, build_model
    rng = np.random.default_rng(SEED + 3)
    cfg = BatchNormConfig(axis=-1, momentum=0.99, epsilon=1e-3)
    w = {"gamma": rng.normal(1, .2, 16), "beta": rng.normal(0, .1, 16), "moving_mean": rng.normal(0, .1, 16),
         "moving_variance": rng.uniform(.5, 1.5, 16)}
    return build_model(cfg, [None, 8, 8, 16], training=True, weights=w)


MODELS = {"cnn_nchw.onnx": cnn_nchw, "cnn_nhwc.onnx": cnn_nhwc, "mlp_gemm.onnx": mlp_gemm,
          "train_step.onnx": train_step}


def main(out_dir: Path = HERE) -> None:
    for name, make in MODELS.items():
        path = Path(out_dir) / name
        onnx.save(make(), path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
