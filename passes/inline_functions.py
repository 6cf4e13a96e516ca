"""Inline bncompile's custom ops (model-local functions) into standard ONNX ops.

For runtimes and tools that read no model-local functions (TensorRT, TVM's ONNX frontend). The
rewrite is exact: every call of a function is replaced by its body with the call's attributes
substituted (onnx-ir's ``InlinePass``), so the output computes the same values. Afterwards:

* ``Constant`` nodes with ``value_float(s)`` / ``value_int(s)`` (what an attribute reference becomes)
  are rewritten to an equivalent ``value`` tensor, because TVM's Constant converter reads only ``value``;
* functions and opset imports nothing uses any more are dropped.

Valid for any model; a model without functions is returned unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

logger = logging.getLogger(__name__)

_SCALAR_KINDS = {
    "value_float": np.float32, "value_floats": np.float32,
    "value_int": np.int64, "value_ints": np.int64,
}


class InlineFunctionsPass(ir.passes.InPlacePass):
    """Inline every model-local function call and normalize the Constants it leaves."""

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = sorted(f"{d}::{n}" for (d, n, _o) in model.functions)
        calls = sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph)
                    if (node.domain, node.op_type, node.overload) in model.functions)
        InlinePass()(model)
        rewritten = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for key, dtype in _SCALAR_KINDS.items():
                attr = node.attributes.get(key)
                if attr is None:
                    continue
                value = np.asarray(attr.value, dtype=dtype)
                del node.attributes[key]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(value))
                rewritten += 1
        RemoveUnusedFunctionsPass()(model)
        RemoveUnusedOpsetsPass()(model)
        self.report = {"functions": names, "calls_inlined": calls, "constants_rewritten": rewritten}
        logger.info("inlined %d call(s) of %s", calls, ", ".join(names) or "no function")
        return ir.passes.PassResult(model, modified=bool(calls or rewritten))
