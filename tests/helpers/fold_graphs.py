"""Seeded builders of small ONNX graphs for the fold and pass tests (random data, never only 0/1), and
:func:`run_pass`, which runs one pass directly with the full checker before and after."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bncompile import onnx_utils
from bncompile.folding import fold

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64}


class G:
    """A tiny graph builder: inputs, random initializers, nodes, BN with random params."""

    def __init__(self, *, seed: int = 0, opset: int = 15, ir_version: int = 8, prefix: str = ""):
        self.prefix = prefix
        self.rng = np.random.default_rng(seed)
        self.opset, self.ir_version = opset, ir_version
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{self.prefix}{base}{self.count}"

    def input(self, name, shape, dtype=np.float32):
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def output(self, name, dtype=np.float32, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def init(self, arr, name=None):
        name = name or self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def const(self, arr, name=None):
        """A Constant node holding ``arr``."""
        name = name or self.name("c")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_node",
                                           value=numpy_helper.from_array(np.asarray(arr), name)))
        return name

    def rand(self, *shape, dtype=np.float32, scale=0.5):
        return (self.rng.standard_normal(shape) * scale).astype(dtype)

    def node(self, op, inputs, *, n_out=1, name=None, outputs=None, **attrs):
        name = name or self.name(op.lower() + "_")
        outputs = outputs or [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def bn_params(self, c, dtype=np.float32):
        gamma = self.rng.standard_normal(c) * 1.2  # includes negatives
        beta = self.rng.standard_normal(c)
        mean = self.rng.standard_normal(c) * 0.5
        var = self.rng.uniform(0.05, 2.0, c)
        return [a.astype(dtype) for a in (gamma, beta, mean, var)]

    def bn(self, x, c, *, dtype=np.float32, via="init", name=None, outputs=None, **attrs):
        """A BatchNormalization on ``x`` with ``c`` channels; params as initializers, Constant
        nodes or Identity of initializers."""
        names = []
        for arr in self.bn_params(c, dtype):
            if via == "init":
                names.append(self.init(arr))
            elif via == "constant":
                names.append(self.const(arr))
            elif via == "identity":
                names.append(self.node("Identity", [self.init(arr)]))
            else:
                raise ValueError(via)
        attrs.setdefault("epsilon", float(self.rng.uniform(1e-5, 1e-3)))
        return self.node("BatchNormalization", [x, *names], name=name or self.name("bn"),
                         outputs=outputs, **attrs)

    def conv(self, x, c_in, c_out, *, rank=2, k=3, group=1, bias=True, dtype=np.float32, name=None, **attrs):
        w = self.init(self.rand(c_out, c_in // group, *([k] * rank), dtype=dtype))
        ins = [x, w] + ([self.init(self.rand(c_out, dtype=dtype))] if bias else [])
        return self.node("Conv", ins, name=name, group=group, pads=[1] * (2 * rank) if k == 3 else [0] * (2 * rank), **attrs)

    def model(self, *, check: bool = True, opset_imports=None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=opset_imports or [helper.make_opsetid("", self.opset)],
                              producer_name="fold_graphs")
        m.ir_version = self.ir_version
        if self.ir_version < 4:  # IR 3: every initializer is also listed as a graph input
            for t in m.graph.initializer:
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        _fill_output_shapes(m)
        if check:
            onnx.checker.check_model(m, full_check=True)
        return m


def _fill_output_shapes(m: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the shape onnx infers (the checker wants one)."""
    missing = [o for o in m.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    inferred = onnx.shape_inference.infer_shapes(m)
    known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.output)}
    for o in missing:
        vi = known.get(o.name)
        if vi is not None and vi.type.tensor_type.HasField("shape"):
            o.type.tensor_type.shape.CopyFrom(vi.type.tensor_type.shape)
        else:
            raise ValueError(f"cannot infer the shape of output {o.name!r}: declare it")


# ------------------------------------------------------------------------- patterns

def conv_bn(*, rank=2, group=1, c_in=4, c_out=6, bias=True, seed=0, dtype=np.float32, opset=15,
            via="init", bn_dtype=None):
    g = G(seed=seed, opset=opset)
    spatial = [5, 6, 4][:rank]
    x = g.input("x", [2, c_in, *spatial], dtype)
    y = g.conv(x, c_in, c_out, rank=rank, group=group, bias=bias, dtype=dtype, name="conv")
    extra = {"is_test": 1} if opset < 7 else {}
    y = g.bn(y, c_out, dtype=bn_dtype or dtype, via=via, name="bn", outputs=["y"], **extra)
    g.output(y, dtype)
    return g.model()


def convtranspose_bn(*, rank=2, group=1, c_in=4, c_out=6, bias=True, output_padding=False, seed=0):
    g = G(seed=seed)
    spatial = [4, 3, 3][:rank]
    x = g.input("x", [2, c_in, *spatial])
    w = g.init(g.rand(c_in, c_out // group, *([3] * rank)))
    ins = [x, w] + ([g.init(g.rand(c_out))] if bias else [])
    attrs = {"group": group}
    if output_padding:
        attrs.update(strides=[2] * rank, output_padding=[1] * rank)
    y = g.node("ConvTranspose", ins, name="convt", **attrs)
    g.output(g.bn(y, c_out, name="bn", outputs=["y"]))
    return g.model()


def gemm_bn(*, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_kind="vector", m=3, k=5, n=4, seed=0):
    g = G(seed=seed)
    x = g.input("x", [k, m] if trans_a else [m, k])
    b = g.init(g.rand(n, k) if trans_b else g.rand(k, n))
    ins = [x, b]
    if c_kind == "scalar":
        ins.append(g.init(g.rand(1)))
    elif c_kind == "vector":
        ins.append(g.init(g.rand(n)))
    elif c_kind == "row":
        ins.append(g.init(g.rand(1, n)))
    elif c_kind == "full":
        ins.append(g.init(g.rand(m, n)))
    y = g.node("Gemm", ins, name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    g.output(g.bn(y, n, name="bn", outputs=["y"]))
    return g.model()


def matmul_bn(*, x_shape=(3, 5), n=4, add_bias=False, seed=0, channels=None):
    g = G(seed=seed)
    x = g.input("x", list(x_shape))
    y = g.node("MatMul", [x, g.init(g.rand(x_shape[-1], n))], name="matmul")
    if add_bias:
        y = g.node("Add", [y, g.init(g.rand(n))], name="bias_add")
    c = channels if channels is not None else (n if len(x_shape) == 2 else x_shape[1])
    g.output(g.bn(y, c, name="bn", outputs=["y"]))
    return g.model()


def reshape_bn(*, kind="Gemm", m=2, c=3, spatial=(2, 2), target=None, seed=0):
    g = G(seed=seed)
    n = c * int(np.prod(spatial))
    x = g.input("x", [m, 5])
    if kind == "Gemm":
        y = g.node("Gemm", [x, g.init(g.rand(n, 5)), g.init(g.rand(n))], name="gemm", transB=1, alpha=0.7)
    elif kind == "MatMul":
        y = g.node("MatMul", [x, g.init(g.rand(5, n))], name="matmul")
    else:  # MatMul + Add
        y = g.node("MatMul", [x, g.init(g.rand(5, n))], name="matmul")
        y = g.node("Add", [y, g.init(g.rand(n))], name="bias_add")
    shape = target if target is not None else [0, c, *spatial]
    y = g.node("Reshape", [y, g.init(np.array(shape, dtype=np.int64), "shape")], name="reshape")
    g.output(g.bn(y, c, name="bn", outputs=["y"]))
    return g.model()


# ------------------------------------------------------------------------- checking helpers

def run_ort(model, feeds):
    return onnx_utils.make_session(model).run(None, feeds)


def feeds_for(model, *, seed=0, input_shapes=None):
    return onnx_utils.random_feeds(onnx_utils.make_session(model), seed=seed, input_shapes=input_shapes)


def bn_count(model: onnx.ModelProto) -> int:
    def count(graph):
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                if a.HasField("g"):
                    n += count(a.g)
                for sub in a.graphs:
                    n += count(sub)
        return n
    return count(model.graph)


def _ort_fused_session(model):
    """onnxruntime at its default level: it fuses Conv+BN itself, a second float32 evaluation order."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def assert_equivalent(original, folded, *, rtol=1e-5, seeds=(0, 1), input_shapes=None, noise_floor=False):
    """Both models give the same outputs in ORT (optimizations off) within ``rtol`` relative to the
    output range, and the folded one passes the full checker.

    With ``noise_floor``, an ill-conditioned network (outputs much smaller than the values they are
    computed from, where float32 rounding alone exceeds ``rtol`` of the output range) may differ by up to
    twice what onnxruntime's own Conv+BN fusion changes in the same model: rounding, not a wrong fold.
    """
    onnx.checker.check_model(folded, full_check=True)
    s_o, s_f = onnx_utils.make_session(original), onnx_utils.make_session(folded)
    assert [i.name for i in s_o.get_inputs()] == [i.name for i in s_f.get_inputs()]
    assert [o.name for o in s_o.get_outputs()] == [o.name for o in s_f.get_outputs()]
    worst = 0.0
    for seed in seeds:
        feeds = onnx_utils.random_feeds(s_o, seed=seed, input_shapes=input_shapes)
        reference = s_o.run(None, feeds)
        err = onnx_utils.compare_outputs(reference, s_f.run(None, feeds))
        bound = rtol
        if noise_floor and err["max_rel"] > rtol:
            noise = onnx_utils.compare_outputs(reference, _ort_fused_session(original).run(None, feeds))
            bound = max(rtol, 2 * noise["max_rel"])
            err["ort_fusion_noise"] = noise["max_rel"]
        assert err["max_rel"] <= bound, err
        worst = max(worst, err["max_rel"])
    return worst


def fold_and_check(model, *, folded=None, left=None, rtol=1e-5, **options):
    """Fold (without the built-in check), then assert equivalence and BN counts."""
    options.setdefault("check", False)
    result = fold(model, **options)
    out = result.model
    assert_equivalent(model, out, rtol=rtol, input_shapes=options.get("input_shapes"))
    if folded is not None:
        assert len(result.report.folded) == folded, result.report.summary()
    if left is not None:
        assert len(result.report.left) == left, result.report.summary()
    assert bn_count(out) == len(result.report.left), result.report.summary()
    assert unused_initializers(out) <= unused_initializers(model), "fold left orphaned constants"
    return result


def unused_initializers(model: onnx.ModelProto) -> set[str]:
    """Names of main-graph initializers no node (in any graph) reads and no output returns."""
    used = {o.name for o in model.graph.output}

    def walk(graph):
        for node in graph.node:
            used.update(node.input)
            for a in node.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)
    walk(model.graph)
    return {t.name for t in model.graph.initializer} - used


def run_pass(pass_, model: onnx.ModelProto, *, check: bool = True):
    """Run one onnx-ir pass directly on a copy of ``model``; the full ONNX checker runs before and
    after. Returns (the rewritten ModelProto, the pass's result)."""
    import copy

    import onnx_ir as ir

    if check:
        onnx.checker.check_model(model, full_check=True)
    irm = ir.serde.deserialize_model(copy.deepcopy(model))
    result = pass_(irm)
    out = onnx_utils.serialize_model(irm)
    if check:
        onnx.checker.check_model(out, full_check=True)
    return out, result


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def nodes(model: onnx.ModelProto) -> list[tuple]:
    """The main graph's nodes as (op, inputs, outputs, attributes), to compare graphs that went
    through onnx-ir (which may reorder a proto's fields)."""
    return [(n.domain, n.op_type, list(n.input), list(n.output),
             sorted((a.name, a.SerializeToString()) for a in n.attribute)) for n in model.graph.node]


#: a model calling a foreign model-local function twice, both calls fed by one Constant; the body
#: turns its attribute into ``Constant(value_float=@alpha)``
FOREIGN = """
<ir_version: 8, opset_import: ["" : 15, "mylib" : 1]>
g (float[2,3] x) => (float[2,3] y) {
  c = Constant <value = float[3] {0.5, -1.25, 2.0}> ()
  a = mylib.ScaleShift <alpha = 1.5> (x, c)
  y = mylib.ScaleShift <alpha = -0.75> (a, c)
}
<domain: "mylib", opset_import: ["" : 15]>
ScaleShift <alpha> (x, b) => (y) {
  s = Constant <value_float: float = @alpha> ()
  m = Mul (x, s)
  y = Add (m, b)
}
"""


# ------------------------------------------------------------------------- exporters' patterns

def tf2onnx_conv_bn(*, bias_add=True, seed=0, c_in=4, c=6, pad=1, blocks=1, extra_use=False,
                    perms=((0, 2, 3, 1), (0, 3, 1, 2))):
    """A Keras Conv2D (+ BiasAdd) + BatchNormalization + ReLU in NHWC as tf2onnx writes it with its
    optimizers off: the Conv runs in NCHW between layout Transposes, the BiasAdd is an Add of a (C,)
    vector in NHWC, and the BN runs in NCHW between its own Transposes."""
    g = G(seed=seed, opset=13)
    y = g.input("x", [2, 5, 6, c_in])
    for b in range(blocks):
        t = g.node("Transpose", [y], perm=[0, 3, 1, 2], name=f"conv{b}_in")
        cin = c_in if b == 0 else c
        conv = g.node("Conv", [t, g.init(g.rand(c, cin, 3, 3))], name=f"conv{b}",
                      pads=[pad] * 4, kernel_shape=[3, 3])
        t = g.node("Transpose", [conv], perm=list(perms[0]), name=f"conv{b}_out")
        if bias_add:
            t = g.node("Add", [t, g.init(g.rand(c))], name=f"bias{b}")
        t = g.node("Transpose", [t], perm=list(perms[1]), name=f"bn{b}_in")
        bn = g.bn(t, c, name=f"bn{b}")
        t = g.node("Transpose", [bn], perm=[0, 2, 3, 1], name=f"bn{b}_out")
        y = g.node("Relu", [t], name=f"relu{b}")
    if extra_use:
        g.node("Identity", ["conv0_out_out" if not bias_add else "bias1_out"], outputs=["side"])
        g.output("side")
    g.output(g.node("Identity", [y], outputs=["y"]))
    return g.model()


def dynamo_conv_bn(*, seed=0, c_in=3, c=5, opset=18):
    """A torch Conv2d(bias=False) + BatchNorm2d as the dynamo exporter writes them with
    ``optimize=False``: the absent bias is ``Expand(CastLike(0.0, input), Expand(Shape(W)[0:1], [1]))``."""
    g = G(seed=seed, opset=opset)
    x = g.input("x", [2, c_in, 6, 6])
    w = g.init(g.rand(c, c_in, 3, 3), "weight")
    zero = g.const(np.array(0.0, np.float32))
    like = g.node("CastLike", [zero, x], name="castlike")
    dim0 = g.node("Shape", [w], start=0, end=1, name="shape")
    shape = g.node("Expand", [dim0, g.const(np.array([1], np.int64))], name="bias_shape")
    bias = g.node("Expand", [like, shape], name="bias")
    y = g.node("Conv", [x, w, bias], name="conv", pads=[1, 1, 1, 1])
    g.output(g.bn(y, c, name="bn", outputs=["y"]))
    return g.model()
