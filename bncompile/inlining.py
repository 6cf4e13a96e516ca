"""``bncompile.inline``: a model with bncompile's custom ops -> the same model in standard ops only."""

from __future__ import annotations

import onnx
import onnx_ir as ir

__all__ = ["inline", "inline_with_report"]


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every model-local function inlined (see
    :mod:`bncompile.passes.inline_functions` and :mod:`bncompile.passes.normalize_constants`)."""
    return inline_with_report(model)[0]


def inline_with_report(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The inlined copy and ``{"functions", "calls_inlined", "constants_rewritten"}``."""
    from bncompile.passes.inline_functions import InlineFunctionsPass
    from bncompile.passes.normalize_constants import NormalizeConstantsPass
    from bncompile.passes.pipeline import Pipeline, inline_passes

    irm = ir.serde.deserialize_model(model)
    pipeline = Pipeline(inline_passes())
    pipeline(irm)
    inlined = pipeline.result_of(InlineFunctionsPass)
    report = {"functions": inlined.detail["functions"], "calls_inlined": len(inlined.changed),
              "constants_rewritten": len(pipeline.result_of(NormalizeConstantsPass).changed)}
    return ir.serde.serialize_model(irm), report
