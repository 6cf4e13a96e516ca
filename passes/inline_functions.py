"""Inline model-local functions (bncompile's custom ops among them) into their bodies.

For runtimes and tools that read no model-local functions (TensorRT, TVM's ONNX frontend). The
rewrite is exact: every call of a function is replaced by its body with the call's attributes
substituted (onnx-ir's ``InlinePass``), so the output computes the same values. Afterwards the
functions and opset imports nothing uses any more are dropped.

Valid for any model; a model without functions is returned unchanged. Options:

* ``keep``: functions (``(domain, name)`` -> the reason) whose calls stay calls; each such call is
  reported as left, with that reason;
* ``drop_definitions``: also drop the definitions of the kept functions (compile's preparation: the
  lowering implements bncompile's custom ops itself and reads no function bodies).

``Constant(value_float=...)`` nodes that an attribute reference becomes are left to
:mod:`bncompile.passes.normalize_constants`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

from bncompile.passes._result import LEFT, Entry, RewriteResult

logger = logging.getLogger(__name__)

__all__ = ["InlineFunctionsPass"]


class InlineFunctionsPass(ir.passes.InPlacePass):
    """Inline every model-local function call (but those of ``keep``) and drop unused functions.

    Returns a :class:`~bncompile.passes._result.RewriteResult`: one entry per call in the model's
    graphs (action "inlined", or LEFT with the reason it was kept; detail ``function``) and
    ``detail["functions"]``, the sorted ``domain::name`` of every function the model defined.
    """

    def __init__(self, *, keep: Mapping[tuple[str, str], str] | None = None,
                 drop_definitions: bool = False):
        super().__init__()
        self.keep = dict(keep or {})
        self.drop_definitions = drop_definitions

    def call(self, model: ir.Model) -> RewriteResult:
        names = sorted(f"{d}::{n}" for (d, n, _o) in model.functions)
        entries = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if (node.domain, node.op_type, node.overload) not in model.functions:
                continue
            why = self.keep.get((node.domain, node.op_type))
            entries.append(Entry.of(node, LEFT if why else "inlined", why,
                                    function=f"{node.domain}::{node.op_type}"))
        InlinePass(criteria=lambda f: (f.domain, f.name) not in self.keep)(model)
        dropped = bool(self.drop_definitions and model.functions)
        if dropped:
            model.functions.clear()
        RemoveUnusedFunctionsPass()(model)
        RemoveUnusedOpsetsPass()(model)
        result = RewriteResult.of(model, self, entries, functions=names)
        result.modified = result.modified or dropped
        logger.info("inlined %d call(s) of %s", len(result.changed), ", ".join(names) or "no function")
        return result
