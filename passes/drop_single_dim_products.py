"""Bypass a ``ReduceProd`` of one dimension of a shape: the product of one number is that number.

Equation: ``ReduceProd(Slice(Shape(x), [s], [s+1]))`` (keepdims, the default) is the 1-element
``Slice(Shape(x), [s], [s+1])`` itself; its consumers read the Slice instead and the ReduceProd is
removed. Why: TVM's frontend keeps ``Shape``/``Slice`` results as shape expressions (so a later
Reshape keeps its symbolic dims) but refuses a ReduceProd of one; the builder writes this form for
one dynamic dim.

Valid only when (one check each; a ReduceProd of a Slice that fails one is left, with the reason):

1. the ReduceProd has one input (no ``axes`` input) and does not set ``keepdims=0``;
2. the Slice has exactly data, starts, ends (no axes/steps) and slices a ``Shape``;
3. starts and ends are 1-element constants with ``0 <= start`` and ``end == start + 1``.

A ReduceProd whose output is a graph output keeps its node (the output stays named), its other
consumers are rewired. Main graph only.
"""

from __future__ import annotations

import onnx_ir as ir

from bncompile.passes._common import Constants, attr_int, is_onnx_op, node_label
from bncompile.passes._result import LEFT, Entry, RewriteResult

__all__ = ["DropSingleDimProductsPass"]


class DropSingleDimProductsPass(ir.passes.InPlacePass):
    """Entries: each ReduceProd of a Slice, action "bypassed" or LEFT with the reason."""

    def call(self, model: ir.Model) -> RewriteResult:
        graph, consts = model.graph, Constants(model)
        entries = []
        for node in list(graph):
            if not is_onnx_op(node, "ReduceProd") or not node.inputs or node.inputs[0] is None:
                continue
            sl = node.inputs[0].producer()
            if sl is None or not is_onnx_op(sl, "Slice"):
                continue
            why = self._check(node, sl, consts)
            if why is not None:
                entries.append(Entry.of(node, LEFT, why))
                continue
            out = node.outputs[0]
            for user, index in list(out.uses()):
                user.replace_input_with(index, node.inputs[0])
            if not out.is_graph_output():       # keep graph outputs named: leave the node in place
                graph.remove(node, safe=True)
            entries.append(Entry.of(node, "bypassed"))
        return RewriteResult.of(model, self, entries)

    @staticmethod
    def _check(node: ir.Node, sl: ir.Node, consts: Constants) -> str | None:
        if len(node.inputs) != 1:
            return "it has an axes input"
        if attr_int(node, "keepdims", 1) == 0:
            return "keepdims=0: the result is a scalar, not the 1-element slice"
        if len(sl.inputs) != 3:
            return f"{node_label(sl)} has axes or steps"
        shape = sl.inputs[0].producer() if sl.inputs[0] is not None else None
        if shape is None or not is_onnx_op(shape, "Shape"):
            return f"{node_label(sl)} does not slice a Shape"
        s, e = consts.get(sl.inputs[1]), consts.get(sl.inputs[2])
        if s is None or e is None or s.size != 1 or e.size != 1:
            return f"{node_label(sl)} starts/ends are not 1-element constants"
        start, end = int(s.reshape(-1)[0]), int(e.reshape(-1)[0])
        if not (start >= 0 and end == start + 1):
            return f"{node_label(sl)} takes [{start}, {end}), not one dimension"
        return None
