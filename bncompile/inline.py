"""``bncompile.inline``: a model with bncompile's custom ops -> the same model in standard ops only."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from bncompile.passes.inline_functions import InlineFunctionsPass


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every model-local function inlined (see the pass's docstring)."""
    irm = ir.serde.deserialize_model(model)
    InlineFunctionsPass()(irm)
    return ir.serde.serialize_model(irm)


def inline_with_report(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    irm = ir.serde.deserialize_model(model)
    p = InlineFunctionsPass()
    p(irm)
    return ir.serde.serialize_model(irm), p.report


from bncompile._callable_module import make_callable  # noqa: E402

make_callable(__name__, "inline")
