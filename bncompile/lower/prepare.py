"""Compile's graph preparation, on the ONNX protobuf: ``prepare(model_proto, *, fold, input_shapes)``.

Steps 1-3 of :mod:`bncompile.lower.driver`: apply ``input_shapes`` to the graph inputs (a name -> dims; a
str dim stays free); fold inference BatchNormalization with :func:`bncompile.fold.fold` (``fold=True``; no
verification); inline model-local functions other than bncompile's custom ops (``ai.bncompile``),
rewriting the ``Constant(value_float=...)`` forms TVM's Constant converter cannot read; rewrite the
builder's ``ReduceProd(Slice(Shape))`` shape products TVM's frontend cannot reduce; graph inputs that also
have an initializer become real inputs (their initializer is kept as the default value ``run`` feeds).

Kept apart, behind the one entry :func:`prepare`, so that it can be replaced wholesale by the onnx-ir pass
pipeline (``bncompile.passes.pipeline.prepare_for_lowering``); the code is moved verbatim from the former
``bncompile/compiler.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bncompile.custom_ops import DOMAIN as CUSTOM_DOMAIN
from bncompile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["prepare"]


def prepare(model_proto: onnx.ModelProto, *, fold: bool, input_shapes: Mapping | None
            ) -> tuple[onnx.ModelProto, dict]:
    """The prepared model (ready for the TVM frontend) and ``{input name: default value}``; ``model_proto``
    may be modified in place."""
    return _prepare(model_proto, fold=fold, input_shapes=input_shapes)


def _dims(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _apply_input_shapes(model: onnx.ModelProto, input_shapes: Mapping | None) -> None:
    if not input_shapes:
        return
    inputs = {i.name: i for i in model.graph.input}
    unknown = sorted(set(input_shapes) - set(inputs))
    if unknown:
        raise InputError(f"input_shapes: no input named {', '.join(map(repr, unknown))}; "
                         f"the model's inputs are {', '.join(inputs)}")
    for name, shape in input_shapes.items():
        vi = inputs[name]
        old = _dims(vi)
        shape = list(shape)
        if old is not None and len(old) != len(shape):
            raise InputError(f"input_shapes: {name!r} has rank {len(old)} ({old}) but the shape given has "
                             f"rank {len(shape)} ({shape})")
        dims = []
        for i, d in enumerate(shape):
            if d is None or (isinstance(d, str) and d.strip() in ("", "?", "-1")) or (
                    isinstance(d, (int, np.integer)) and d < 0):
                prev = old[i] if old is not None else None
                dims.append(prev if isinstance(prev, str) else f"{name}_d{i}")
            elif isinstance(d, str) and not d.strip().lstrip("-").isdigit():
                dims.append(d.strip())
            else:
                v = int(d)
                if v == 0:
                    raise InputError(f"input_shapes: {name!r} dimension {i} must be positive, got 0")
                if old is not None and isinstance(old[i], int) and old[i] > 0 and old[i] != v:
                    raise InputError(f"input_shapes: {name!r} dimension {i} is {old[i]} in the model, "
                                     f"cannot set it to {v}")
                dims.append(v)
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        for d in dims:
            dim = tt.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d
    # stale shape annotations of intermediate values would contradict the new shapes
    del model.graph.value_info[:]


def _set_shape(vi, shape) -> None:
    tt = vi.type.tensor_type
    tt.ClearField("shape")
    for d in shape:
        tt.shape.dim.add().dim_value = int(d)


def _constant_to_value(node: onnx.NodeProto) -> None:
    """Rewrite ``Constant(value_float/value_floats/value_int/value_ints)`` as ``Constant(value=<tensor>)``."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return
    for a in list(node.attribute):
        if a.name == "value_float":
            t = numpy_helper.from_array(np.array(a.f, np.float32), node.output[0])
        elif a.name == "value_floats":
            t = numpy_helper.from_array(np.array(list(a.floats), np.float32), node.output[0])
        elif a.name == "value_int":
            t = numpy_helper.from_array(np.array(a.i, np.int64), node.output[0])
        elif a.name == "value_ints":
            t = numpy_helper.from_array(np.array(list(a.ints), np.int64), node.output[0])
        else:
            continue
        node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("value", t))


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for g in _subgraphs(n):
            yield from _all_nodes(g)


def _producers_and_constants(g: onnx.GraphProto):
    """{tensor: producing node} and {tensor: value} for initializers and ``Constant(value=...)`` nodes."""
    producer = {o: n for n in g.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return producer, consts


def _drop_single_dim_products(model: onnx.ModelProto) -> int:
    """``ReduceProd(Slice(Shape(x), [s], [s+1]))`` is its input: rewire its consumers to the Slice.

    TVM's frontend keeps ``Shape``/``Slice`` results as shape expressions (so a later Reshape keeps its
    symbolic dims) but refuses a ReduceProd of one; the builder writes this form for one dynamic dim.
    """
    g = model.graph
    producer, consts = _producers_and_constants(g)
    rename = {}
    for n in g.node:
        if n.op_type != "ReduceProd" or n.domain not in ("", "ai.onnx") or len(n.input) != 1:
            continue
        if any(a.name == "keepdims" and a.i == 0 for a in n.attribute):
            continue
        sl = producer.get(n.input[0])
        if sl is None or sl.op_type != "Slice" or len(sl.input) < 3 or len(sl.input) > 3:
            continue
        shp = producer.get(sl.input[0])
        s, e = consts.get(sl.input[1]), consts.get(sl.input[2])
        if shp is None or shp.op_type != "Shape" or s is None or e is None or s.size != 1 or e.size != 1:
            continue
        start, end = int(s.reshape(-1)[0]), int(e.reshape(-1)[0])
        if start >= 0 and end == start + 1:
            rename[n.output[0]] = n.input[0]
    if rename:
        for n in _all_nodes(g):
            for i, x in enumerate(n.input):
                if x in rename:
                    n.input[i] = rename[x]
        for o in g.output:
            if o.name in rename:       # keep graph outputs named: leave the node in place
                rename.pop(o.name)
        keep = [n for n in g.node if not (n.op_type == "ReduceProd" and n.output[0] in rename)]
        del g.node[:]
        g.node.extend(keep)
    return len(rename)


def _minus_one_reshapes(model: onnx.ModelProto) -> int:
    """``Reshape(d, Concat(c1, P, c2...))`` with every part constant but one 1-element product ``P``
    -> ``Reshape(d, [c1, -1, c2...])``.

    Valid whatever P is: a Reshape keeps the element count, so the one unknown entry can only be
    ``numel(d) / prod(constants)``, which is what -1 means (the constants must be positive). The builder
    writes ``ReduceProd(Slice(Shape(x)))`` for a group of dims holding the dynamic batch, and TVM's
    frontend cannot reduce a shape expression; with -1, Relax keeps the batch symbolic.
    """
    g = model.graph
    producer, consts = _producers_and_constants(g)
    changed = 0
    for n in list(g.node):
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        cat = producer.get(n.input[1])
        if cat is None or cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx"):
            continue
        dynamic = [i for i, x in enumerate(cat.input) if x not in consts]
        if len(dynamic) != 1:
            continue
        if any(consts[x].size and (consts[x] <= 0).any() for x in cat.input if x in consts):
            continue
        prod = producer.get(cat.input[dynamic[0]])
        if prod is None or prod.op_type != "ReduceProd" or len(prod.input) != 1 or any(
                a.name in ("keepdims", "axes") and (a.name == "axes" or a.i == 0) for a in prod.attribute):
            continue
        parts = [consts[x].reshape(-1).astype(np.int64) if x in consts else np.array([-1], np.int64)
                 for x in cat.input]
        name = f"{n.input[1]}__bncompile_minus_one"
        if name not in consts:
            g.initializer.append(numpy_helper.from_array(np.concatenate(parts), name))
            consts[name] = np.concatenate(parts)
        n.input[1] = name
        changed += 1
    if changed:
        _remove_dead_nodes(model)
    return changed


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    g = model.graph
    while True:
        used = {o.name for o in g.output}
        for n in _all_nodes(g):
            used.update(n.input)
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _prepare(model: onnx.ModelProto, *, fold: bool, input_shapes) -> tuple[onnx.ModelProto, dict]:
    """Steps 1-3 of the module docstring; returns the model and the default values of inputs."""
    from bncompile import custom_ops

    custom_ops.register_schemas()
    _apply_input_shapes(model, input_shapes)
    if fold:
        from bncompile.fold import fold as fold_bn

        t = time.perf_counter()
        model = fold_bn(model, check=False, validate=False).model
        log.info("folded inference BatchNormalization in %.3f s", time.perf_counter() - t)
    ours = [(f.domain, f.name) for f in model.functions if f.domain == CUSTOM_DOMAIN and f.name in custom_ops.OPS]
    if len(ours) < len(model.functions):
        import onnx.inliner

        model = onnx.inliner.inline_selected_functions(model, ours, exclude=True)
    del model.functions[:]
    for n in _all_nodes(model.graph):
        _constant_to_value(n)
    _minus_one_reshapes(model)
    _drop_single_dim_products(model)
    input_names = {i.name for i in model.graph.input}
    defaults = {}
    keep = []
    for t in model.graph.initializer:
        if t.name in input_names:
            defaults[t.name] = numpy_helper.to_array(t)
        else:
            keep.append(t)
    for vi in model.graph.input:          # an input with a default and free dims takes the default's shape
        d = _dims(vi)
        if vi.name in defaults and (d is None or any(not isinstance(x, int) or x <= 0 for x in d)) and not (
                input_shapes and vi.name in input_shapes):
            _set_shape(vi, defaults[vi.name].shape)
            log.info("input %s: free dims pinned to its default's shape %s", vi.name, defaults[vi.name].shape)
    if defaults:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model, defaults

