"""Replace a Reshape target built from one run-time element count by the same target with -1.

Equation: ``Reshape(d, Concat(c1, P, c2, ...))`` where every part but one is a constant and the one
left is a ``ReduceProd`` (a 1-element product ``P``) -> ``Reshape(d, [c1..., -1, c2...])``. A Reshape
keeps the element count, so the one unknown entry can only be ``numel(d) / prod(constants)``, which
is what -1 means. The builder writes ``ReduceProd(Slice(Shape(x)))`` for a group of dimensions
holding the dynamic batch, and TVM's frontend cannot reduce a shape expression; with -1, Relax keeps
the batch symbolic. Nodes left unused afterwards are removed (onnx-ir's ``RemoveUnusedNodesPass``).

Valid only when (one check each; a Reshape of a Concat that fails one is left, with the reason):

1. the Reshape does not set ``allowzero``;
2. exactly one Concat part is not a constant (see ``bncompile.passes._common.Constants``);
3. every constant part is positive (a 0 or -1 among them would change the meaning);
4. the non-constant part is an ai.onnx ``ReduceProd`` of all axes of one input (no ``axes``,
   ``keepdims`` not 0), so it is one element.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bncompile.passes._common import Constants, attr_int, is_onnx_op, node_label
from bncompile.passes._result import LEFT, Entry, RewriteResult

__all__ = ["MinusOneReshapesPass"]


class MinusOneReshapesPass(ir.passes.InPlacePass):
    """Main graph Reshapes of ``Concat(consts, ReduceProd(...), consts)`` -> Reshapes of a constant
    with -1. Entries: each Reshape whose target is a Concat, action "rewritten" (detail ``shape``,
    the new target) or LEFT with the reason."""

    def call(self, model: ir.Model) -> RewriteResult:
        graph, consts = model.graph, Constants(model)
        entries = []
        for node in list(graph):
            if not is_onnx_op(node, "Reshape") or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            cat = node.inputs[1].producer()
            if cat is None or not is_onnx_op(cat, "Concat"):
                continue
            parts, why = self._check(node, cat, consts)
            if why is not None:
                entries.append(Entry.of(node, LEFT, why))
                continue
            name = f"{node.inputs[1].name}__bncompile_minus_one"
            target = graph.initializers.get(name)
            if target is None:
                target = ir.Value(name=name, shape=ir.Shape(parts.shape),
                                  type=ir.TensorType(ir.DataType.INT64),
                                  const_value=ir.tensor(parts, name=name))
                graph.register_initializer(target)
            node.replace_input_with(1, target)
            entries.append(Entry.of(node, "rewritten", shape=parts.tolist()))
        result = RewriteResult.of(model, self, entries)
        if result.modified:
            RemoveUnusedNodesPass()(model)
        return result

    @staticmethod
    def _check(node: ir.Node, cat: ir.Node, consts: Constants):
        if attr_int(node, "allowzero", 0):
            return None, "allowzero=1: a 0 in the target is a size, not a copy"
        arrays = [consts.get(v) for v in cat.inputs]
        dynamic = [i for i, a in enumerate(arrays) if a is None]
        if len(dynamic) != 1:
            return None, f"{node_label(cat)} has {len(dynamic)} parts computed at run time, not one"
        if any(a.size and (a <= 0).any() for a in arrays if a is not None):
            return None, f"{node_label(cat)} has a constant part that is not positive"
        prod = cat.inputs[dynamic[0]].producer()
        if prod is None or not is_onnx_op(prod, "ReduceProd") or len(prod.inputs) != 1 \
                or "axes" in prod.attributes or attr_int(prod, "keepdims", 1) == 0:
            return None, f"the run-time part of {node_label(cat)} is not a one-element ReduceProd"
        parts = [a.reshape(-1).astype(np.int64) if a is not None else np.array([-1], np.int64)
                 for a in arrays]
        return np.concatenate(parts), None
