"""Rewrite ``Constant`` nodes that hold a scalar or list attribute into the ``value`` tensor form.

Equation: ``Constant(value_float=f)`` is ``Constant(value=tensor(float32 f))``; likewise
``value_floats`` (float32, 1-D), ``value_int`` (int64 scalar) and ``value_ints`` (int64, 1-D).
Exact for every opset that has these attributes. Why: TVM's Constant converter reads only ``value``,
and inlining a function turns each attribute reference into one of these forms.

Valid when (one check each): the node is an ai.onnx ``Constant``; it holds one of the four attributes
(``value`` and the string/sparse forms are left as they are, and are not reported).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bncompile.passes._common import is_onnx_op
from bncompile.passes._result import Entry, RewriteResult

__all__ = ["NormalizeConstantsPass"]

_SCALAR_KINDS = {
    "value_float": np.float32, "value_floats": np.float32,
    "value_int": np.int64, "value_ints": np.int64,
}


class NormalizeConstantsPass(ir.passes.InPlacePass):
    """``Constant(value_float(s)/value_int(s))`` -> ``Constant(value=<tensor>)`` in every graph.

    Returns a :class:`~bncompile.passes._result.RewriteResult` with an entry (action "rewritten",
    detail ``attribute``) per Constant rewritten.
    """

    def call(self, model: ir.Model) -> RewriteResult:
        entries = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not is_onnx_op(node, "Constant"):
                continue
            for key, dtype in _SCALAR_KINDS.items():
                attr = node.attributes.get(key)
                if attr is None:
                    continue
                value = np.asarray(attr.value, dtype=dtype)
                del node.attributes[key]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(value))
                entries.append(Entry.of(node, "rewritten", attribute=key))
        return RewriteResult.of(model, self, entries)
