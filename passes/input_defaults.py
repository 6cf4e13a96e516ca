"""Turn graph inputs that also have an initializer into plain inputs with a default value.

An ONNX graph input with an initializer of the same name is an input the caller may override, whose
initializer is only its default (in IR 3 every initializer is listed as an input, and is one). The
lowering treats every initializer as a constant, so each such initializer is taken out of the graph
and handed back as the input's default (``result.detail["defaults"]``: name -> array, in initializer
order); the runtime feeds it when the caller does not. An input with free or unknown dimensions takes
its default's shape, unless its shape was given by the caller (``pinned``).

Exact: the inputs, their names and element types do not change; only where the default lives does.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir

from bncompile.passes._result import Entry, RewriteResult

__all__ = ["InputDefaultsPass"]


class InputDefaultsPass(ir.passes.InPlacePass):
    """Entries: each main-graph input with an initializer, action "defaulted" (detail
    ``shape_pinned``: the default's shape when the input's free dims were set to it, else None)."""

    def __init__(self, *, pinned: Collection[str] = ()):
        super().__init__()
        self.pinned = frozenset(pinned)

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        defaults, entries = {}, []
        for value in list(graph.initializers.values()):
            if not value.is_graph_input():
                continue
            array = value.const_value.numpy()
            defaults[value.name] = array
            graph.initializers.pop(value.name)
            value.const_value = None
            pinned = None
            dims = value.shape
            if (dims is None or any(not isinstance(d, int) or d <= 0 for d in dims)) \
                    and value.name not in self.pinned:
                value.shape = ir.Shape(array.shape)
                pinned = list(array.shape)
            entries.append(Entry(op="input", name=value.name, action="defaulted",
                                 detail={"shape_pinned": pinned}))
        return RewriteResult.of(model, self, entries, defaults=defaults)
