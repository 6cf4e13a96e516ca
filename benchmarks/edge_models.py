"""The networks people deploy to the edge, as ONNX graphs with seeded random weights (no downloads).

Each builder reproduces its torchvision namesake's op patterns and channel/stride plan, the way
``torch.onnx.export`` writes them at opset 15 with a free batch dimension ``N``: every convolution
without bias followed by an inference-mode BatchNormalization, then the activation (Relu, Clip 0..6 for
ReLU6, HardSwish, x*Sigmoid(x) for SiLU); squeeze-and-excitation as GlobalAveragePool -> 1x1 Conv
(bias) -> activation -> 1x1 Conv (bias) -> Sigmoid / HardSigmoid -> Mul; ShuffleNetV2's channel shuffle
as Reshape -> Transpose -> Reshape with the batch dimension read from ``Shape`` at run time; a
Flatten + Gemm classifier. Weights are He-scaled and BN statistics near (0, 1) so activations stay in
range and errors against onnxruntime mean something.

    from edge_models import NETWORKS
    model = NETWORKS["mobilenet_v2"](size=224)
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 15


def _div8(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class Net:
    """Collects nodes and initializers with unique names; every method returns its output's name."""

    def __init__(self, name: str, seed: int):
        self.name, self.rng = name, np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr, base: str = "c") -> str:
        name = self._name(base)
        arr = np.asarray(arr)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name))
        return name

    def op(self, op_type: str, inputs, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, group=1, bias=False, dilation=1) -> str:
        fan_in = cin // group * k * k
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(2.0 / fan_in), "W")
        ins = [x, w] + ([self.const(self.rng.normal(0, 0.05, cout), "B")] if bias else [])
        pad = (k - 1) // 2 * dilation
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group,
                       dilations=[dilation, dilation])

    def bn(self, x, c) -> str:
        params = [self.const(self.rng.uniform(0.6, 1.4, c), "gamma"), self.const(self.rng.normal(0, 0.1, c), "beta"),
                  self.const(self.rng.normal(0, 0.1, c), "mean"), self.const(self.rng.uniform(0.6, 1.4, c), "var")]
        return self.op("BatchNormalization", [x, *params], epsilon=1e-5, momentum=0.9)

    def act(self, x, kind: str | None) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.op("Relu", [x])
        if kind == "relu6":
            return self.op("Clip", [x, self.const(np.float32(0), "lo"), self.const(np.float32(6), "hi")])
        if kind == "hswish":
            return self.op("HardSwish", [x])
        if kind == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        raise ValueError(kind)

    def cba(self, x, cin, cout, k=1, stride=1, group=1, act="relu") -> str:
        """Conv (no bias) + BN + activation."""
        return self.act(self.bn(self.conv(x, cin, cout, k, stride, group), cout), act)

    def se(self, x, c, squeeze, inner="relu", gate="sigmoid") -> str:
        s = self.op("GlobalAveragePool", [x])
        s = self.act(self.conv(s, c, squeeze, 1, bias=True), inner)
        s = self.conv(s, squeeze, c, 1, bias=True)
        s = self.op("Sigmoid", [s]) if gate == "sigmoid" else self.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)
        return self.op("Mul", [x, s])

    def head(self, x, c, classes=1000, hidden=None, hidden_act=None) -> str:
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        if hidden:
            x = self.act(self.gemm(x, c, hidden), hidden_act)
            c = hidden
        return self.gemm(x, c, classes)

    def gemm(self, x, cin, cout) -> str:
        w = self.const(self.rng.standard_normal((cout, cin)) * math.sqrt(1.0 / cin), "fcW")
        return self.op("Gemm", [x, w, self.const(np.zeros(cout), "fcB")], transB=1)

    def model(self, x_in: str, out: str, size: int, classes: int = 1000) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["logits"], name="logits"))
        graph = helper.make_graph(
            self.nodes, self.name, [helper.make_tensor_value_info(x_in, TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="bncompile-benchmarks")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def mobilenet_v2(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("mobilenet_v2", seed)
    x, c = n.cba("input", 3, 32, 3, 2, act="relu6"), 32
    for t, cout, reps, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(reps):
            stride, hidden = (s if i == 0 else 1), c * t
            h = n.cba(x, c, hidden, 1, act="relu6") if t != 1 else x
            h = n.cba(h, hidden, hidden, 3, stride, group=hidden, act="relu6")
            h = n.bn(n.conv(h, hidden, cout, 1), cout)
            x = n.op("Add", [x, h]) if stride == 1 and c == cout else h
            c = cout
    x = n.cba(x, c, 1280, 1, act="relu6")
    return n.model("input", n.head(x, 1280), size)


def mobilenet_v3_large(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("mobilenet_v3_large", seed)
    x, c = n.cba("input", 3, 16, 3, 2, act="hswish"), 16
    plan = [(3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
            (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
            (3, 240, 80, False, "hswish", 2), (3, 200, 80, False, "hswish", 1), (3, 184, 80, False, "hswish", 1),
            (3, 184, 80, False, "hswish", 1), (3, 480, 112, True, "hswish", 1), (3, 672, 112, True, "hswish", 1),
            (5, 672, 160, True, "hswish", 2), (5, 960, 160, True, "hswish", 1), (5, 960, 160, True, "hswish", 1)]
    for k, exp, cout, se, act, s in plan:
        h = n.cba(x, c, exp, 1, act=act) if exp != c else x
        h = n.cba(h, exp, exp, k, s, group=exp, act=act)
        if se:
            h = n.se(h, exp, _div8(exp // 4), inner="relu", gate="hsigmoid")
        h = n.bn(n.conv(h, exp, cout, 1), cout)
        x = n.op("Add", [x, h]) if s == 1 and c == cout else h
        c = cout
    x = n.cba(x, c, 960, 1, act="hswish")
    return n.model("input", n.head(x, 960, hidden=1280, hidden_act="hswish"), size)


def efficientnet_b0(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("efficientnet_b0", seed)
    x, c = n.cba("input", 3, 32, 3, 2, act="silu"), 32
    for t, k, s, cout, reps in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)):
        for i in range(reps):
            stride, exp = (s if i == 0 else 1), c * t
            h = n.cba(x, c, exp, 1, act="silu") if t != 1 else x
            h = n.cba(h, exp, exp, k, stride, group=exp, act="silu")
            h = n.se(h, exp, max(1, c // 4), inner="silu", gate="sigmoid")
            h = n.bn(n.conv(h, exp, cout, 1), cout)
            x = n.op("Add", [x, h]) if stride == 1 and c == cout else h
            c = cout
    x = n.cba(x, c, 1280, 1, act="silu")
    return n.model("input", n.head(x, 1280), size)


def regnety_400mf(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("regnety_400mf", seed)
    x, c = n.cba("input", 3, 32, 3, 2), 32
    for width, depth in ((48, 1), (104, 3), (208, 6), (440, 6)):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            h = n.cba(x, c, width, 1)
            h = n.cba(h, width, width, 3, stride, group=width // 8)
            h = n.se(h, width, int(round(0.25 * c)), inner="relu", gate="sigmoid")
            h = n.bn(n.conv(h, width, width, 1), width)
            short = x if stride == 1 and c == width else n.bn(n.conv(x, c, width, 1, stride), width)
            x = n.op("Relu", [n.op("Add", [h, short])])
            c = width
    return n.model("input", n.head(x, c), size)


def shufflenet_v2(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("shufflenet_v2_x1_0", seed)
    x = n.cba("input", 3, 24, 3, 2)
    x = n.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 24

    def shuffle(t, ch):
        # as the legacy exporter writes it for a free batch: the batch dim read from Shape at run time
        batch = n.op("Slice", [n.op("Shape", [t]), n.const(np.array([0]), "s0"), n.const(np.array([1]), "s1")])
        hw = n.op("Slice", [n.op("Shape", [t]), n.const(np.array([2]), "s2"), n.const(np.array([4]), "s4")])
        split = n.op("Concat", [batch, n.const(np.array([2, ch // 2]), "g"), hw], axis=0)
        t = n.op("Transpose", [n.op("Reshape", [t, split])], perm=[0, 2, 1, 3, 4])
        merged = n.op("Concat", [batch, n.const(np.array([ch]), "ch"), hw], axis=0)
        return n.op("Reshape", [t, merged])

    for cout, reps in ((116, 4), (232, 8), (464, 4)):
        half = cout // 2
        for i in range(reps):
            if i == 0:
                b1 = n.bn(n.conv(x, c, c, 3, 2, group=c), c)
                b1 = n.cba(b1, c, half, 1)
                b2 = n.cba(x, c, half, 1)
            else:
                parts = [n._name("split_a"), n._name("split_b")]
                n.nodes.append(helper.make_node("Split", [x], parts, axis=1, name=parts[0]))
                b1, b2 = parts
                b2 = n.cba(b2, half, half, 1)
            stride = 2 if i == 0 else 1
            b2 = n.bn(n.conv(b2, half, half, 3, stride, group=half), half)
            b2 = n.cba(b2, half, half, 1)
            x = shuffle(n.op("Concat", [b1, b2], axis=1), cout)
            c = cout
    x = n.cba(x, c, 1024, 1)
    return n.model("input", n.head(x, 1024), size)


def resnet50(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("resnet50", seed)
    x = n.cba("input", 3, 64, 7, 2)
    x = n.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for width, reps, s in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(reps):
            stride, cout = (s if i == 0 else 1), width * 4
            h = n.cba(x, c, width, 1)
            h = n.cba(h, width, width, 3, stride)
            h = n.bn(n.conv(h, width, cout, 1), cout)
            short = x if i > 0 else n.bn(n.conv(x, c, cout, 1, stride), cout)
            x = n.op("Relu", [n.op("Add", [h, short])])
            c = cout
    return n.model("input", n.head(x, c), size)


def densenet121(*, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    n = Net("densenet121", seed)
    x = n.cba("input", 3, 64, 7, 2)
    x = n.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for bi, reps in enumerate((6, 12, 24, 16)):
        for _ in range(reps):                  # pre-activation: BN -> Relu -> Conv, on the concatenation
            h = n.conv(n.act(n.bn(x, c), "relu"), c, 128, 1)
            h = n.conv(n.act(n.bn(h, 128), "relu"), 128, 32, 3)
            x = n.op("Concat", [x, h], axis=1)
            c += 32
        if bi < 3:
            x = n.conv(n.act(n.bn(x, c), "relu"), c, c // 2, 1)
            x = n.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            c //= 2
    x = n.act(n.bn(x, c), "relu")
    return n.model("input", n.head(x, c), size)


NETWORKS = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "regnety_400mf": regnety_400mf,
    "shufflenet_v2": shufflenet_v2,
    "resnet50": resnet50,
    "densenet121": densenet121,
}
