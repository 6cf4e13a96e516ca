"""Seeded generator of small whole-network ONNX models (opset 15) for the compile tests.

Each builder returns an ``onnx.ModelProto`` with one input ``x`` and one output ``y``; every
convolution / Gemm is followed by an inference BatchNormalization and a Relu, the way exported CNNs
look before folding. ``batch=None`` gives a symbolic batch (``dim_param "N"``).

* ``resnet``: ResNet-18-style basic blocks (3x3 convs, a strided block with a 1x1 downsample, Add),
  global average pool, Gemm;
* ``mobilenet``: MobileNetV2-style inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project, Relu6 as Clip);
* ``unet``: a two-level U-Net (MaxPool down, ConvTranspose up, skip Concat);
* ``mlp``: Gemm + BN + Relu layers on (N, features).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 15


class _G:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, hint: str, a: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def node(self, op: str, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out + "_node", **attrs))
        return out

    def conv(self, x, cin, cout, k, *, stride=1, group=1, bias=False):
        fan = cin // group * k * k
        w = self.const("w", (self.rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(fan)).astype(np.float32))
        ins = [x, w]
        if bias:
            ins.append(self.const("b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def conv_t(self, x, cin, cout, k=2, stride=2):
        w = self.const("wt", (self.rng.normal(size=(cin, cout, k, k)) / np.sqrt(cin * k * k)).astype(np.float32))
        return self.node("ConvTranspose", [x, w], kernel_shape=[k, k], strides=[stride, stride])

    def gemm(self, x, fin, fout, *, transB=1):
        shape = (fout, fin) if transB else (fin, fout)
        w = self.const("gw", (self.rng.normal(size=shape) / np.sqrt(fin)).astype(np.float32))
        b = self.const("gb", self.rng.normal(0, 0.1, fout).astype(np.float32))
        return self.node("Gemm", [x, w, b], transB=transB)

    def bn(self, x, c):
        r = self.rng
        p = [self.const("gamma", r.uniform(0.5, 1.5, c).astype(np.float32)),
             self.const("beta", r.normal(0, 0.2, c).astype(np.float32)),
             self.const("mean", r.normal(0, 0.3, c).astype(np.float32)),
             self.const("var", r.uniform(0.5, 2.0, c).astype(np.float32))]
        return self.node("BatchNormalization", [x, *p], epsilon=1e-5, momentum=0.9)

    def relu(self, x):
        return self.node("Relu", [x])

    def relu6(self, x):
        lo = self.const("lo", np.array(0.0, np.float32))
        hi = self.const("hi", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi])

    def cbr(self, x, cin, cout, k=3, **kw):
        return self.relu(self.bn(self.conv(x, cin, cout, k, **kw), cout))

    def model(self, name, x_shape, y, y_shape=None) -> onnx.ModelProto:
        # rename the last value to "y"
        last = self.nodes[-1]
        for i, o in enumerate(last.output):
            if o == y:
                last.output[i] = "y"
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
        g = helper.make_graph(self.nodes, name, [inp], [out], initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compile_models")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def _b(batch):
    return "N" if batch is None else int(batch)


def resnet(batch=2, *, seed=0, width=8, size=16, classes=10) -> onnx.ModelProto:
    g = _G(seed)
    x = g.cbr("x", 3, width, 3)

    def block(x, cin, cout, stride):
        h = g.cbr(x, cin, cout, 3, stride=stride)
        h = g.bn(g.conv(h, cout, cout, 3), cout)
        sc = x if stride == 1 and cin == cout else g.bn(g.conv(x, cin, cout, 1, stride=stride), cout)
        return g.relu(g.node("Add", [h, sc]))

    x = block(x, width, width, 1)
    x = block(x, width, 2 * width, 2)
    x = block(x, 2 * width, 2 * width, 1)
    x = g.node("GlobalAveragePool", [x])
    x = g.node("Flatten", [x], axis=1)
    y = g.gemm(x, 2 * width, classes)
    return g.model("resnet_small", [_b(batch), 3, size, size], y, [_b(batch), classes])


def mobilenet(batch=2, *, seed=1, size=16, classes=10) -> onnx.ModelProto:
    g = _G(seed)
    x = g.relu6(g.bn(g.conv("x", 3, 8, 3, stride=2), 8))

    def inverted(x, cin, cout, expand, stride):
        hid = cin * expand
        h = g.relu6(g.bn(g.conv(x, cin, hid, 1), hid))
        h = g.relu6(g.bn(g.conv(h, hid, hid, 3, stride=stride, group=hid), hid))     # depthwise
        h = g.bn(g.conv(h, hid, cout, 1), cout)
        return g.node("Add", [h, x]) if stride == 1 and cin == cout else h

    x = inverted(x, 8, 8, 2, 1)
    x = inverted(x, 8, 12, 3, 2)
    x = inverted(x, 12, 12, 3, 1)
    x = g.relu6(g.bn(g.conv(x, 12, 24, 1), 24))
    x = g.node("GlobalAveragePool", [x])
    x = g.node("Flatten", [x], axis=1)
    y = g.gemm(x, 24, classes)
    return g.model("mobilenet_small", [_b(batch), 3, size, size], y, [_b(batch), classes])


def unet(batch=2, *, seed=2, size=16) -> onnx.ModelProto:
    g = _G(seed)
    e1 = g.cbr(g.cbr("x", 3, 8, 3), 8, 8, 3)
    d = g.node("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2])
    e2 = g.cbr(g.cbr(d, 8, 16, 3), 16, 16, 3)
    u = g.relu(g.bn(g.conv_t(e2, 16, 8), 8))
    c = g.node("Concat", [u, e1], axis=1)
    h = g.cbr(c, 16, 8, 3)
    y = g.conv(h, 8, 2, 1, bias=True)
    return g.model("unet_small", [_b(batch), 3, size, size], y, [_b(batch), 2, size, size])


def mlp(batch=4, *, seed=3, features=20, hidden=(32, 16), classes=4) -> onnx.ModelProto:
    g = _G(seed)
    x, fin = "x", features
    for k, h in enumerate(hidden):
        x = g.relu(g.bn(g.gemm(x, fin, h, transB=k % 2), h))
        fin = h
    y = g.gemm(x, fin, classes)
    return g.model("mlp_small", [_b(batch), features], y, [_b(batch), classes])


MODELS = {"resnet": resnet, "mobilenet": mobilenet, "unet": unet, "mlp": mlp}


def input_for(model: onnx.ModelProto, batch: int, *, seed: int = 0) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = batch
    return np.random.default_rng(seed).normal(size=dims).astype(np.float32)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list:
    """onnxruntime with every graph optimization off (its default fuses Conv+BN itself)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
