"""Evaluate the shape computations of an ONNX graph ahead of time (compile's preparation, no TVM).

Exporters write a Reshape's target shape as a small integer program over ``Shape``: ShuffleNet's channel
shuffle as ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [2], Unsqueeze(Div(Gather(Shape(x), 1), 2)),
...))``, with torch's integer floor division spelled ``Div, Mul, Sub, Less, Xor, Equal, Not, And, Where``
(or a float ``Cast, Div, Floor, Cast``). TVM's ONNX frontend keeps only the simplest of these as shape
expressions; the others become tensors, and a Reshape to a tensor-valued shape has no static shape, so the
next operator fails (``emit_te now only supports Tensor that has ShapeExpr shape``, or the frontend
refuses ``Where``/``Floor`` of a shape value).

:func:`fold_shape_values` interprets those programs on *shape values*: small arrays whose elements are
numbers or :class:`Dim` symbols (a free dimension, e.g. the batch ``N``). The graph's value shapes come
from ONNX shape inference. Then:

1. every operator of a Reshape's target program whose outputs are all known numbers becomes an
   initializer (the program collapses to constants wherever it does not depend on a free dimension;
   programs feeding other operators, e.g. an Expand's shape, are left to TVM's frontend);
2. ``Reshape(data, s)`` whose ``s`` is known but for free dimensions gets a constant ``s'``:
   an unknown entry at position ``i`` that is the same symbol as ``data``'s dimension ``i`` becomes
   ``0`` (ONNX: copy that dimension; valid with ``allowzero=0``), and ONE remaining unknown entry becomes
   ``-1`` (valid because a Reshape keeps the element count, so the one unknown entry can only be
   ``numel(data) / prod(the others)``; requires the known entries to be positive or 0 and no -1 among
   them). A Reshape with more unknown entries is left as it is.

Conditions, checked once each: operator outputs are only replaced when every output is known and is not a
graph output; values are only tracked up to :data:`MAX_ELEMENTS` elements; an operator the interpreter
does not know makes its outputs unknown (never wrong, only less folded). The symbols are integers >= 0
(dimensions), which is all the comparisons below assume (``Less(N, 0)`` is false).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

__all__ = ["fold_shape_values", "Dim"]

MAX_ELEMENTS = 1024          # larger integer tensors are not shape programs; never tracked


class Dim:
    """A free dimension (``dim_param`` name, or a fresh token): an unknown integer >= 0. Equal symbols
    are the same value; arithmetic on a symbol gives a fresh symbol unless it is an identity."""

    _fresh = itertools.count()

    def __init__(self, key=None):
        self.key = key if key is not None else ("?", next(Dim._fresh))

    def __eq__(self, other):
        return isinstance(other, Dim) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"Dim({self.key!r})"


def _known(arr) -> bool:
    return not any(isinstance(v, Dim) for v in arr.flat)


# --------------------------------------------------------------------------- element-wise semantics

def _idiv(a, b):
    """ONNX integer Div: truncation toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _arith(op, integer: bool):
    def f(a, b):
        if isinstance(a, Dim) or isinstance(b, Dim):
            if op in ("Add", "Sub") and not isinstance(b, Dim) and b == 0:
                return a
            if op == "Add" and not isinstance(a, Dim) and a == 0:
                return b
            if op in ("Mul", "Div") and not isinstance(b, Dim) and b == 1:
                return a
            if op == "Mul" and not isinstance(a, Dim) and a == 1:
                return b
            if op == "Mul" and (0 in [x for x in (a, b) if not isinstance(x, Dim)]):
                return 0
            if op in ("Max", "Min") and a == b:
                return a
            return Dim()
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        if op == "Mul":
            return a * b
        if op == "Div":
            return _idiv(a, b) if integer else a / b
        if op == "Max":
            return max(a, b)
        if op == "Min":
            return min(a, b)
        raise KeyError(op)
    return f


def _compare(op):
    def f(a, b):
        if isinstance(a, Dim) or isinstance(b, Dim):
            if op == "Equal" and a == b:
                return True
            # a dimension is >= 0
            if isinstance(a, Dim) and not isinstance(b, Dim) and b <= 0:
                if op == "Less":
                    return False
                if op == "GreaterOrEqual":
                    return True
            if isinstance(b, Dim) and not isinstance(a, Dim) and a <= 0:
                if op == "Greater":
                    return False
                if op == "LessOrEqual":
                    return True
            return Dim()
        return {"Equal": a == b, "Less": a < b, "LessOrEqual": a <= b, "Greater": a > b,
                "GreaterOrEqual": a >= b}[op]
    return f


def _logic(op):
    def f(a, b=None):
        if op == "Not":
            return Dim() if isinstance(a, Dim) else (not a)
        if op == "And" and (a is False or b is False):
            return False
        if op == "Or" and (a is True or b is True):
            return True
        if isinstance(a, Dim) or isinstance(b, Dim):
            return Dim()
        return {"And": a and b, "Or": a or b, "Xor": a != b}[op]
    return f


def _unary(op):
    def f(a):
        if isinstance(a, Dim):
            return a if op in ("Floor", "Ceil", "Identity") else Dim()   # symbols are integers
        return {"Floor": np.floor, "Ceil": np.ceil, "Neg": np.negative, "Abs": np.abs}[op](a)
    return f


BINARY = {**{op: _arith for op in ("Add", "Sub", "Mul", "Div", "Max", "Min")},
          **{op: None for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")},
          **{op: None for op in ("And", "Or", "Xor")}}


def _elementwise(fn, *arrays):
    out = np.frompyfunc(fn, len(arrays), 1)(*arrays)
    return np.asarray(out, dtype=object)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# --------------------------------------------------------------------------- the interpreter

class _Value:
    """A shape value: an object array (numbers / Dim) and its numpy dtype."""

    __slots__ = ("arr", "dtype")

    def __init__(self, arr, dtype):
        self.arr = np.asarray(arr, dtype=object)
        self.dtype = np.dtype(dtype)

    def numpy(self) -> np.ndarray:
        return np.asarray(self.arr.tolist(), dtype=self.dtype).reshape(self.arr.shape)


def _as_value(a: np.ndarray) -> _Value | None:
    if a.size > MAX_ELEMENTS or a.dtype.kind not in "iubf":
        return None
    if a.dtype.kind == "f" and a.size > 16:
        return None
    obj = np.empty(a.shape, dtype=object)
    flat = obj.reshape(-1)
    for i, v in enumerate(a.reshape(-1).tolist()):
        flat[i] = v
    return _Value(obj, a.dtype)


def _ints(v: _Value | None) -> list[int] | None:
    if v is None or not _known(v.arr):
        return None
    return [int(x) for x in v.arr.reshape(-1)]


def _eval(node, ins: list, shapes: dict) -> list | None:
    """Outputs (list of _Value) of ``node`` given its input shape values (None where untracked), or None."""
    op = node.op_type
    if op == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None:
            return None
        r = len(dims)
        start, end = _attr(node, "start", 0), _attr(node, "end", r)
        start, end = (max(0, min(r, s + r if s < 0 else s)) for s in (start, end))
        return [_Value(np.array(dims[start:end] if end > start else [], dtype=object), np.int64)]
    if op == "Size":
        dims = shapes.get(node.input[0])
        if dims is None or any(isinstance(d, Dim) for d in dims):
            return None
        return [_Value(np.array(int(np.prod(dims)), dtype=object), np.int64)]
    if any(x is None for x, name in zip(ins, node.input) if name) or not ins or ins[0] is None:
        return None
    x = ins[0]
    if op == "Identity":
        return [x]
    if op == "Cast":
        to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
        if not _known(x.arr) and to.kind not in "iuf":
            return None
        arr = x.arr if not _known(x.arr) else _as_value(x.numpy().astype(to)).arr
        return [_Value(arr, to)]
    if op in ("Floor", "Ceil", "Neg", "Abs"):
        return [_Value(_elementwise(_unary(op), x.arr), x.dtype)]
    if op == "Not":
        return [_Value(_elementwise(_logic("Not"), x.arr), np.bool_)]
    if op in BINARY and len(ins) == 2:
        a, b = ins
        if op in ("And", "Or", "Xor"):
            return [_Value(_elementwise(_logic(op), a.arr, b.arr), np.bool_)]
        if op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
            return [_Value(_elementwise(_compare(op), a.arr, b.arr), np.bool_)]
        if op == "Div" and _known(b.arr) and a.dtype.kind in "iu" and any(v == 0 for v in b.arr.flat):
            return None
        return [_Value(_elementwise(_arith(op, a.dtype.kind in "iu"), a.arr, b.arr), a.dtype)]
    if op in ("Max", "Min"):
        out = ins[0].arr
        for b in ins[1:]:
            out = _elementwise(_arith(op, True), out, b.arr)
        return [_Value(out, x.dtype)]
    if op == "Where":
        c, a, b = ins
        if not _known(c.arr):
            return None
        return [_Value(np.where(c.numpy().astype(bool), a.arr, b.arr), a.dtype)]
    if op == "Gather":
        idx = ins[1].numpy() if _known(ins[1].arr) else None
        if idx is None:
            return None
        return [_Value(np.take(x.arr, idx, axis=_attr(node, "axis", 0)), x.dtype)]
    if op == "Concat":
        return [_Value(np.concatenate([v.arr for v in ins], axis=_attr(node, "axis", 0)), x.dtype)]
    if op in ("Unsqueeze", "Squeeze"):
        axes = _ints(ins[1]) if len(ins) > 1 else _attr(node, "axes")
        if op == "Unsqueeze":
            if axes is None:
                return None
            out = x.arr
            r = x.arr.ndim + len(axes)
            for a in sorted(a + r if a < 0 else a for a in axes):
                out = np.expand_dims(out, a)
            return [_Value(out, x.dtype)]
        out = np.squeeze(x.arr, axis=None if axes is None else tuple(axes))
        return [_Value(out, x.dtype)]
    if op == "Slice":
        if x.arr.ndim != 1 or len(ins) < 3:
            return None
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
        if None in (starts, ends, axes, steps) or axes not in ([0], [-1]) or len(starts) != 1:
            return None
        return [_Value(x.arr[slice(*slice(starts[0], ends[0], steps[0]).indices(x.arr.shape[0]))], x.dtype)]
    if op in ("ReduceProd", "ReduceSum"):
        if x.arr.ndim != 1 or (len(ins) > 1) or _attr(node, "axes") not in (None, [0], [-1]):
            return None
        if not _known(x.arr):
            return None
        fn = np.prod if op == "ReduceProd" else np.sum
        val = np.asarray(fn(x.numpy()), dtype=x.dtype)
        if _attr(node, "keepdims", 1):
            val = val.reshape(1)
        return [_as_value(val)]
    if op == "Reshape" and _known(ins[1].arr):
        shape = _ints(ins[1])
        if any(s == 0 for s in shape):
            return None
        try:
            return [_Value(x.arr.reshape(shape), x.dtype)]
        except ValueError:
            return None
    return None


def _inferred_shapes(model: onnx.ModelProto) -> dict:
    """{value name: [int | Dim]} from ONNX shape inference (free dims as :class:`Dim` of their name)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as err:  # noqa: BLE001 - without inference, only the graph's own annotations
        log.debug("shape inference failed: %s", err)
        inferred = model
    g = inferred.graph
    out = {}
    for vi in itertools.chain(g.input, g.value_info, g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(Dim(d.dim_param or (vi.name, i)))
        out[vi.name] = dims
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def fold_shape_values(model: onnx.ModelProto) -> dict:
    """Rewrite ``model`` in place (see the module docstring); returns ``{"constants": n, "reshapes": m}``:
    how many operator outputs became initializers and how many Reshape targets became constants."""
    g = model.graph
    shapes = _inferred_shapes(model)
    vals: dict[str, _Value] = {}
    inputs = {i.name for i in g.input}
    for t in g.initializer:
        if t.name in inputs:       # an input with a default: the caller may feed another value
            continue
        v = _as_value(numpy_helper.to_array(t))
        if v is not None:
            vals[t.name] = v
    graph_outputs = {o.name for o in g.output}
    feeds_reshape = _reshape_target_programs(g)
    replace: dict[str, np.ndarray] = {}          # node output -> constant
    fixed_nodes = set()
    reshapes = 0
    for k, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            a = _attr(node, "value")
            if a is not None:
                v = _as_value(numpy_helper.to_array(a))
                if v is not None:
                    vals[node.output[0]] = v
            continue
        if node.op_type == "Reshape" and len(node.input) > 1:
            if _fix_reshape(node, vals.get(node.input[1]), shapes.get(node.input[0]), g, replace):
                reshapes += 1
            continue
        ins = [vals.get(n) if n else None for n in node.input]
        try:
            outs = _eval(node, ins, shapes)
        except Exception as err:  # noqa: BLE001 - an unexpected form: untracked, never wrong
            log.debug("%s %s: not evaluated (%s)", node.op_type, node.name, err)
            outs = None
        if not outs:
            continue
        for name, v in zip(node.output, outs):
            if v is not None and v.arr.size <= MAX_ELEMENTS:
                vals[name] = v
        if (all(v is not None and _known(v.arr) for v in outs) and not graph_outputs & set(node.output)
                and feeds_reshape & set(node.output)):
            for name, v in zip(node.output, outs):
                replace[name] = v.numpy()
            fixed_nodes.add(k)
    if not replace:
        return {"constants": 0, "reshapes": reshapes}
    # the evaluated operators become initializers; their (now unused) inputs are removed as dead code
    keep = [n for k, n in enumerate(g.node) if k not in fixed_nodes]
    n_const = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(keep)
    have = {t.name for t in g.initializer}
    for name, arr in replace.items():
        if name not in have:
            g.initializer.append(numpy_helper.from_array(arr, name))
    _remove_unused(model)
    log.info("shape programs: %d operators evaluated to constants, %d Reshape targets made constant",
             n_const, reshapes)
    return {"constants": n_const, "reshapes": reshapes}


def _reshape_target_programs(g) -> set:
    """Names of the values a Reshape's target is computed from (its target and, transitively, the inputs
    of their producers): the only programs rewritten (others, e.g. an Expand's shape, TVM's frontend
    reads as they are)."""
    producer = {o: n for n in g.node for o in n.output}
    todo = [n.input[1] for n in g.node if n.op_type == "Reshape" and len(n.input) > 1]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        p = producer.get(name)
        if p is not None:
            todo.extend(x for x in p.input if x)
    return seen


def _fix_reshape(node, target: _Value | None, data_dims, g, replace: dict) -> bool:
    """Give a Reshape whose target is known up to free dimensions a constant target (0 / -1); True when
    it did (see the module docstring for the two rules and their conditions)."""
    if target is None or target.arr.ndim != 1 or _known(target.arr) or _attr(node, "allowzero", 0):
        return False            # (a known target: its producers are replaced by constants already)
    out = []
    unknown = 0
    for i, v in enumerate(target.arr.tolist()):
        if isinstance(v, Dim):
            if data_dims is not None and i < len(data_dims) and data_dims[i] == v:
                out.append(0)
            else:
                out.append(-1)
                unknown += 1
        else:
            if int(v) < 0:
                return False
            out.append(int(v))
    if unknown > 1:
        return False
    name = f"{node.input[1]}__bncompile_shape"
    if name not in replace:
        replace[name] = np.asarray(out, dtype=np.int64)
    node.input[1] = name
    return True


def _remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no one reads (the shape programs' remains)."""
    g = model.graph

    def used_names():
        used = {o.name for o in g.output}
        stack = [g]
        while stack:
            graph = stack.pop()
            for n in graph.node:
                used.update(n.input)
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        stack.append(a.g)
                    elif a.type == onnx.AttributeProto.GRAPHS:
                        stack.extend(a.graphs)
        return used

    while True:
        used = used_names()
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = used_names()
    inputs = {i.name for i in g.input}
    keep_init = [t for t in g.initializer if t.name in used or t.name in inputs]
    if len(keep_init) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_init)
