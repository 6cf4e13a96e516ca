"""``onnx.reference`` made right for the operators fold's verification meets in old opsets.

fold verifies in onnxruntime; onnxruntime has dropped some old kernels (``BatchNormalization(6)``,
``Mul(6)``, ``Add(6)``: NOT_IMPLEMENTED), so a model of those opsets is run here instead. The
reference evaluator is not right for them as it stands (peers.md):

* its ``BatchNormalization`` for opsets 7 and 9 uses the batch statistics (opset 7 has no
  ``is_test``; opset 9 fills ``momentum`` from the schema's default), and ignores ``spatial=0``;
* its ``Add``/``Sub``/``Mul``/``Div`` ignore opset-6 legacy broadcasting (``broadcast=1, axis=a``
  aligns the second operand at axis ``a``; numpy aligns it at the right).

:func:`session` replaces those five operators by implementations written from the spec
(inference BN ``y = (x - mean) / sqrt(var + epsilon) * scale + B``, per channel, or per element
for ``spatial=0``). :func:`unsupported` names what this still cannot run right: a BN in training mode
(fold never changes one, but the comparison would run it) and any other node with a legacy
``broadcast`` attribute (opset-6 Gemm, Pow...). A model with such a node is reported unverified.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

__all__ = ["session", "unsupported"]

_LEGACY_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": None}


def _align(b: np.ndarray, rank: int, broadcast, axis) -> np.ndarray:
    """``b`` reshaped so that numpy broadcasting does what opset-6 ``broadcast=1, axis`` means."""
    if not broadcast or axis is None:
        return b
    axis = axis + rank if axis < 0 else axis
    return b.reshape(b.shape + (1,) * (rank - axis - b.ndim))


def _binary(name: str):
    def _run(self, a, b, broadcast=None, axis=None, **_ignored):
        b = _align(b, a.ndim, broadcast, axis)
        if name == "Div":
            out = a // b if a.dtype.kind in "iu" else a / b
        else:
            out = _LEGACY_BINARY[name](a, b)
        return (np.asarray(out).astype(a.dtype, copy=False),)

    return type(name, (OpRun,), {"op_domain": "", "_run": _run})


class BatchNormalization(OpRun):
    """Inference BN per the spec, every opset (``unsupported`` keeps training-mode BN out)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, **_ignored):
        eps = 1e-5 if epsilon is None else float(epsilon)
        params = [np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var)]
        if params[0].ndim == 1:  # spatial=1: per channel, axis 1
            params = [p.reshape((-1,) + (1,) * (x.ndim - 2)) for p in params]
        gamma, beta, mu, sigma2 = params  # spatial=0: (C, D1..Dn) against (N, C, D1..Dn)
        y = (x.astype(np.float64) - mu) / np.sqrt(sigma2 + eps) * gamma + beta
        return (y.astype(x.dtype),)


_OVERRIDES = [BatchNormalization, *(_binary(n) for n in _LEGACY_BINARY)]


def unsupported(model: onnx.ModelProto) -> str | None:
    """Why the corrected evaluator would not run ``model`` right, or None when it would."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def walk(graph):
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                if (len([o for o in node.output if o]) > 1 or attrs.get("training_mode", 0)
                        or (opset < 7 and not attrs.get("is_test", 0))):
                    return f"BatchNormalization {node.name!r} is in training mode"
            elif "broadcast" in attrs and node.op_type not in _LEGACY_BINARY:
                return f"{node.op_type} {node.name!r} uses opset-6 legacy broadcasting"
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    why = walk(sub)
                    if why:
                        return why
        return None

    return walk(model.graph)


def session(model: onnx.ModelProto) -> ReferenceEvaluator:
    """A ReferenceEvaluator with the corrected operators (check :func:`unsupported` first)."""
    return ReferenceEvaluator(model, new_ops=_OVERRIDES)


class Session:
    """The corrected evaluator behind onnxruntime's session interface (``get_inputs``,
    ``get_outputs``, ``run``), so fold's verification can use either runtime for either model."""

    def __init__(self, model: onnx.ModelProto):
        from types import SimpleNamespace

        def describe(vi):
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in t.shape.dim]
            kind = onnx.TensorProto.DataType.Name(t.elem_type).lower()
            return SimpleNamespace(name=vi.name, shape=dims, type=f"tensor({kind})")

        inits = {t.name for t in model.graph.initializer}
        self._inputs = [describe(vi) for vi in model.graph.input if vi.name not in inits]
        self._outputs = [describe(vi) for vi in model.graph.output]
        self._evaluator = session(model)

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, _names, feeds):
        return [np.asarray(a) for a in self._evaluator.run(None, feeds)]
