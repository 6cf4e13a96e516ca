"""Helpers shared by bncompile's onnx-ir passes: constants, ranks, BN modes, names, cleanup.

Not a pass. A value is a *constant* when its content cannot change at run time: an initializer
that is not a graph input (IR >= 4; in IR 3 every main-graph initializer is also listed as an input
and still a constant), the output of a ``Constant`` node, or an ``Identity`` of a constant.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

FLOAT_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16,
                          ir.DataType.BFLOAT16})

_SAME_RANK_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "HardSigmoid", "HardSwish",
    "Softplus", "Neg", "Abs", "Exp", "Log", "Sqrt", "Identity", "Cast", "CastLike", "Dropout",
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "Softmax", "LogSoftmax",
    "Transpose", "Erf", "Gelu", "Mish", "PRelu", "Reciprocal", "Floor", "Ceil", "Round",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "LRN", "Pad",
    "Conv", "ConvTranspose", "Concat", "Resize", "Upsample", "Slice",
})
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Where"})


def is_onnx_op(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def node_label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (unnamed)"


def value_label(value: ir.Value | None) -> str:
    return repr(value.name) if value is not None and value.name else "(unnamed)"


def opset_of(node: ir.Node, model: ir.Model) -> int:
    """The ai.onnx opset the node runs under."""
    if node.version is not None:
        return int(node.version)
    graph = node.graph
    while graph is not None:
        if "" in graph.opset_imports:
            return int(graph.opset_imports[""])
        parent = getattr(graph, "parent", None)
        graph = parent.graph if isinstance(parent, ir.Node) else None
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


class Constants:
    """Resolves values to constant numpy arrays (see the module docstring for what counts)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.ir3 = (model.ir_version or 0) < 4

    def is_overridable(self, value: ir.Value) -> bool:
        """A graph input whose value the caller may supply (not a constant)."""
        if not value.is_graph_input():
            return False
        if self.ir3 and value.is_initializer() and value.graph is self.model.graph:
            return False
        return True

    def resolve(self, value: ir.Value | None) -> tuple[np.ndarray | None, str | None]:
        """(array, None) for a constant, else (None, reason)."""
        seen = 0
        while True:
            if value is None:
                return None, "the input is absent"
            if self.is_overridable(value):
                return None, f"{value_label(value)} is a graph input (overridable at run time)"
            producer = value.producer()
            if producer is None:
                if value.const_value is not None:
                    try:
                        return value.const_value.numpy(), None
                    except Exception as err:  # external data missing, unsupported dtype
                        return None, f"{value_label(value)} cannot be read ({err})"
                return None, f"{value_label(value)} has no constant value"
            if is_onnx_op(producer, "Constant"):
                arr = constant_node_value(producer)
                if arr is None:
                    return None, f"Constant {producer.name!r} has no tensor value"
                return arr, None
            if is_onnx_op(producer, "Identity") and seen < 64:
                value = producer.inputs[0]
                seen += 1
                continue
            return None, (f"{value_label(value)} is computed at run time by "
                          f"{node_label(producer)}")

    def get(self, value: ir.Value | None) -> np.ndarray | None:
        return self.resolve(value)[0]


def constant_node_value(node: ir.Node) -> np.ndarray | None:
    """The array held by a Constant node's attribute (any of its forms)."""
    if len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if name == "value":
        return attr.as_tensor().numpy()
    if name == "value_float":
        return np.array(attr.as_float(), dtype=np.float32)
    if name == "value_floats":
        return np.array(attr.as_floats(), dtype=np.float32)
    if name == "value_int":
        return np.array(attr.as_int(), dtype=np.int64)
    if name == "value_ints":
        return np.array(attr.as_ints(), dtype=np.int64)
    return None


def rank_of(value: ir.Value | None, consts: Constants | None = None, _depth: int = 0) -> int | None:
    """The rank of a value from its declared shape or, failing that, from its producer."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    if value.const_value is not None:
        return len(value.const_value.shape)
    node = value.producer()
    if node is None or _depth > 200 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] is not None:
        return rank_of(node.inputs[1], consts, _depth + 1)
    if op in ("Gemm", "Flatten"):
        return 2
    if op == "Constant":
        arr = constant_node_value(node)
        return None if arr is None else arr.ndim
    if op == "MatMul":
        ra, rb = (rank_of(v, consts, _depth + 1) for v in node.inputs[:2])
        if ra is None or rb is None:
            return None
        if ra == 1 or rb == 1:
            return max(ra, rb) - 1
        return max(ra, rb)
    if op == "Reshape" and consts is not None:
        shape = consts.get(node.inputs[1])
        return None if shape is None else int(np.asarray(shape).size)
    if op in _SAME_RANK_OPS and node.inputs and value.index() == 0:
        return rank_of(node.inputs[0], consts, _depth + 1)
    if op in _BROADCAST_OPS:
        ranks = [rank_of(v, consts, _depth + 1) for v in node.inputs if v is not None]
        return None if not ranks or None in ranks else max(ranks)
    return None


def batchnorm_mode(node: ir.Node, opset: int) -> tuple[str, str | None]:
    """('inference', None), ('training', reason) or ('spatial=0', reason) for a BN node."""
    extra = [o for o in node.outputs[1:] if o.name]
    if opset >= 14 and attr_int(node, "training_mode", 0) != 0:
        return "training", "training_mode=1: the output uses the batch statistics"
    if extra:
        return "training", (f"training mode: the node has {len(extra)} extra output(s) "
                            f"({', '.join(repr(o.name) for o in extra)}) with running statistics")
    if opset < 7 and attr_int(node, "is_test", 0) == 0:
        return "training", ("opset 6 is_test=0 (the default): the node is declared to use the batch "
                            "statistics; only is_test=1 is inference")
    if opset < 9 and attr_int(node, "spatial", 1) == 0:
        return "spatial=0", "spatial=0: per-element (C, D1..Dn) parameters, not per channel"
    return "inference", None


def bn_affine(node: ir.Node, consts: Constants) -> tuple[np.ndarray, np.ndarray, None] | tuple[None, None, str]:
    """(k, shift, None) with ``y = x*k + shift`` in float64, or (None, None, reason)."""
    arrays = []
    for i, label in zip(range(1, 5), ("scale", "B", "mean", "var")):
        arr, why = consts.resolve(node.inputs[i] if len(node.inputs) > i else None)
        if arr is None:
            return None, None, f"parameter {label} {why}"
        arrays.append(np.asarray(arr).astype(np.float64))
    gamma, beta, mean, var = arrays
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        return None, None, f"parameter shapes differ: {[a.shape for a in arrays]}"
    if not all(np.isfinite(a).all() for a in arrays):
        bad = [lbl for lbl, a in zip(("scale", "B", "mean", "var"), arrays) if not np.isfinite(a).all()]
        return None, None, f"non-finite values in parameter(s) {', '.join(bad)}"
    eps = attr_float(node, "epsilon", 1e-5)
    if (var < 0).any():
        return None, None, f"negative variance (min {var.min():.3g})"
    if not (var + eps > 0).all() or not math.isfinite(eps):
        return None, None, f"var + epsilon is not positive (epsilon {eps!r})"
    k = gamma / np.sqrt(var + eps)
    return k, beta - mean * k, None


class Names:
    """Unique value/node names across a model's graphs."""

    def __init__(self, model: ir.Model):
        self.used: set[str] = set()
        for graph in model.graphs():
            for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
                if v.name:
                    self.used.add(v.name)
            for node in graph:
                if node.name:
                    self.used.add(node.name)
                for o in node.outputs:
                    if o.name:
                        self.used.add(o.name)

    def new(self, base: str) -> str:
        base = base or "bncompile"
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def array_tensor(array, name: str | None = None):
    """``ir.tensor(array, name=name)``: for a NumPy array, the same ``ir.Tensor`` built directly
    (``ir.tensor`` first tries runtime protocol checks that cost more than the rest of a small fold)."""
    if isinstance(array, (np.ndarray, np.generic)):
        return ir.Tensor(array, name=name)
    return ir.tensor(array, name=name)


def add_initializer(graph: ir.Graph, model: ir.Model, names: Names, base: str,
                    array: np.ndarray) -> ir.Value:
    """Register a new initializer (also listed as a graph input in an IR-3 main graph)."""
    name = names.new(base)
    tensor = array_tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    if (model.ir_version or 0) < 4 and graph is model.graph:
        graph.inputs.append(value)
    return value


def remove_orphans(values, model: ir.Model, consts: Constants) -> int:
    """Remove the constants among ``values`` that nothing uses any more (initializer, Constant or
    Identity chain); returns the nodes removed.

    A pass collects the inputs of every node it replaces, so one constant feeding several rewritten
    nodes is listed several times: each value is visited once, and a value whose producer an earlier
    chain already removed is skipped.
    """
    removed = 0
    for value in dict.fromkeys(v for v in values if v is not None):
        removed += _remove_if_unused(value, model, consts)
    return removed


def _remove_if_unused(value: ir.Value | None, model: ir.Model, consts: Constants) -> int:
    removed = 0
    while value is not None and not value.uses() and not value.is_graph_output():
        graph = value.graph
        if value.is_initializer():
            if consts.is_overridable(value):
                return removed
            if value.is_graph_input():  # IR 3: the initializer is listed as an input too
                graph.inputs.remove(value)
            graph.initializers.pop(value.name, None)
            return removed
        node = value.producer()
        if node is None or node.graph is None:  # no producer, or already removed
            return removed
        if not (is_onnx_op(node, "Constant") or is_onnx_op(node, "Identity")):
            return removed
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            return removed
        upstream = node.inputs[0] if is_onnx_op(node, "Identity") else None
        node.graph.remove(node, safe=True)
        removed += 1
        value = upstream
    return removed


def bypass(final: ir.Value, replacement: ir.Value) -> None:
    """Make every use of ``final`` (and its graph-output slot and name) use ``replacement``."""
    if final.is_graph_output():
        name = final.name
        final.replace_all_uses_with(replacement, replace_graph_outputs=True)
        final.name = None
        replacement.name = name
        if final.type is not None:
            replacement.type = final.type
        if final.shape is not None:
            replacement.shape = final.shape
        replacement.doc_string = final.doc_string or replacement.doc_string
        for k, v in final.metadata_props.items():
            replacement.metadata_props[k] = v
    else:
        final.replace_all_uses_with(replacement)
