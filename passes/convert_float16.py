"""Convert a float32 model to float16 (``fold --float16``: after the fold, so each weight is rounded
once, from the float32 value that already holds the BN).

Equation: every float32 tensor ``t`` of the model (initializers, ``Constant`` and
``ConstantOfShape`` values) becomes ``float16(t)``, rounded to nearest once; every float32 value type
(graph inputs and outputs included: the result is a float16 model, fed and read in float16) becomes
float16, and so do the float32 targets of ``Cast`` and the float32 ``dtype`` of
``RandomNormal``/``RandomUniform``/``EyeLike`` (``CastLike`` follows its target by itself). Nothing
else changes: no Cast is inserted, every node computes in float16 exactly as the unfolded float16
twin made by this same pass does.

Why our own pass and not onnxconverter-common's ``convert_float_to_float16``: that converter clips
constants to [1e-7, 1e4] by default (a changed weight, silently), inserts Casts around the ops of
its block list, and is one more dependency; this pass changes types only, and refuses instead of
clipping.

Valid only when (one check each; a failure raises :class:`bncompile.errors.InputError` and the
model is not converted):

1. every finite float32 constant stays finite in float16 (``|t| < 65520``, float16's largest value
   after rounding);
2. the inputs the spec types as ``tensor(float)`` only (``Resize`` scales, ``Upsample`` scales) are
   constants or graph inputs: they stay float32 (not computed by a node, whose type would change);
3. the model has no model-local functions with float32 bodies (their types are not rewritten).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bncompile.errors import InputError
from bncompile.passes._common import is_onnx_op, node_label, value_label
from bncompile.passes._result import Entry, RewriteResult

log = logging.getLogger(__name__)

__all__ = ["ConvertFloat16Pass"]

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
#: (op, input index) the spec types as tensor(float) only
_FLOAT32_ONLY = {("Resize", 2), ("Upsample", 1)}
_DTYPE_ATTRS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "EyeLike": "dtype"}


def _to_f16(arr: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = arr.astype(np.float16)
    overflow = np.isfinite(arr) & ~np.isfinite(out)
    if overflow.any():
        worst = float(np.abs(arr[overflow]).max())
        raise InputError(f"cannot convert to float16: {what} holds {worst:.6g}, beyond float16's "
                         "range (65504)")
    return out


class ConvertFloat16Pass(ir.passes.InPlacePass):
    """Make a float32 model float16 (see the module docstring).

    Returns a :class:`~bncompile.passes._result.RewriteResult` with one entry per node whose
    attribute changed (action "converted"); ``detail``: ``tensors`` (constants converted),
    ``values`` (value types changed), ``kept_float32`` (names of constants left float32).
    """

    def call(self, model: ir.Model) -> RewriteResult:
        for fn in model.functions.values():
            for node in fn:
                if any(o.dtype == F32 for o in node.outputs) or _float32_attr(node):
                    raise InputError(f"cannot convert to float16: model-local function "
                                     f"{fn.name!r} computes in float32")
        keep: set[ir.Value] = set()
        entries: list[Entry] = []
        tensors = values = 0
        for graph in model.graphs():
            for node in graph:
                for op_index in _FLOAT32_ONLY:
                    if is_onnx_op(node, op_index[0]) and len(node.inputs) > op_index[1]:
                        v = node.inputs[op_index[1]]
                        if v is None or v.name == "":
                            continue
                        if v.const_value is None and v.producer() is not None \
                                and not is_onnx_op(v.producer(), "Constant"):
                            raise InputError(f"cannot convert to float16: the float32-only "
                                             f"input {value_label(v)} of {node_label(node)} "
                                             "is computed at run time")
                        keep.add(v)
        for graph in model.graphs():
            for value in graph.initializers.values():
                if value in keep or value.const_value is None or value.const_value.dtype != F32:
                    continue
                arr = _to_f16(value.const_value.numpy(), f"initializer {value_label(value)}")
                value.const_value = ir.tensor(arr, name=value.name)
                tensors += 1
            for value in [*graph.inputs, *graph.initializers.values(),
                          *(o for n in graph for o in n.outputs)]:
                if value not in keep and isinstance(value.type, ir.TensorType) and value.dtype == F32:
                    value.type = ir.TensorType(F16)
                    values += 1
            for node in graph:
                if node.domain not in ("", "ai.onnx"):
                    continue
                changed = False
                if node.op_type in ("Constant", "ConstantOfShape") and not (
                        node.outputs and node.outputs[0] in keep):
                    changed = self._constant(node)
                    tensors += changed
                attr = _DTYPE_ATTRS.get(node.op_type)
                if attr and attr in node.attributes and node.attributes[attr].value == F32.value:
                    node.attributes[attr] = ir.AttrInt64(attr, F16.value)
                    changed = True
                if changed:
                    entries.append(Entry.of(node, "converted"))
        log.info("converted %d tensor(s) and %d value type(s) to float16", tensors, values)
        return RewriteResult.of(model, self, entries, modified=bool(tensors or values or entries),
                                tensors=tensors, values=values,
                                kept_float32=sorted(v.name or "" for v in keep))

    @staticmethod
    def _constant(node: ir.Node) -> bool:
        for name in ("value", "value_float", "value_floats"):
            attr = node.attributes.get(name)
            if attr is None:
                continue
            if name == "value":
                tensor = attr.as_tensor()
                if tensor.dtype != F32:
                    return False
                arr = tensor.numpy()
            else:
                arr = np.asarray(attr.value, dtype=np.float32)
            arr = _to_f16(arr, node_label(node))
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(arr))
            return True
        return False


def _float32_attr(node: ir.Node) -> bool:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F32:
            return True
        if attr.type == ir.AttributeType.FLOAT and node.op_type == "Constant":
            return True
    return False
