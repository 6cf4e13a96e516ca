"""Give graph inputs the shapes the caller names (compile's ``input_shapes`` / ``--input-shape``).

Each given shape replaces the input's declared one, dimension by dimension: an int fixes the
dimension; ``None``, ``"?"``, ``"-1"``, ``""`` or a negative int leaves it free (keeping its
symbolic name, or naming it ``<input>_d<i>``); any other string names a symbolic dimension. The
shape annotations of the main graph's intermediate values are dropped, since they could contradict
the new input shapes.

Valid when (one check each; a failure raises :class:`bncompile.errors.InputError`): every name is a
graph input; the rank matches the declared rank; no dimension is 0; a fixed dimension is not given a
different positive size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from bncompile.errors import InputError
from bncompile.passes._result import Entry, RewriteResult

__all__ = ["ApplyInputShapesPass"]


def _dims(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or None) for d in value.shape]


class ApplyInputShapesPass(ir.passes.InPlacePass):
    """Set the shapes of named graph inputs; returns an entry (action "shaped", detail ``shape``)
    per input given."""

    def __init__(self, input_shapes: Mapping | None):
        super().__init__()
        self.input_shapes = dict(input_shapes or {})

    def call(self, model: ir.Model) -> RewriteResult:
        if not self.input_shapes:
            return RewriteResult.of(model, self, [])
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        unknown = sorted(set(self.input_shapes) - set(inputs))
        if unknown:
            raise InputError(f"input_shapes: no input named {', '.join(map(repr, unknown))}; "
                             f"the model's inputs are {', '.join(inputs)}")
        entries = []
        for name, shape in self.input_shapes.items():
            dims = _new_dims(name, _dims(inputs[name]), list(shape))
            inputs[name].shape = ir.Shape(dims)
            entries.append(Entry(op="input", name=name, action="shaped", detail={"shape": dims}))
        # stale shape annotations of intermediate values would contradict the new shapes
        for node in graph:
            for out in node.outputs:
                if not out.is_graph_output():
                    out.type, out.shape = None, None
        return RewriteResult.of(model, self, entries)


def _new_dims(name: str, old: list | None, shape: list) -> list:
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
    return dims
