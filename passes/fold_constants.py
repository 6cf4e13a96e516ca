"""Evaluate constant-only subexpressions into initializers.

Equation: a node ``y = op(c1, ..., cn)`` whose inputs are all constants (see
``bncompile.passes._common.Constants``) is replaced by an initializer holding ``op(c1, ..., cn)``,
named like ``y``. Runs in graph order, so chains such as ``Sqrt(Add(ConstantOfShape(Shape(W)), eps))``
fold completely; it makes BN parameters and layer weights built from constants visible to
:mod:`bncompile.passes.fold_batchnorm`.

By default (``only_feeding_layers=True``) only subexpressions that feed a BatchNormalization
parameter, a Conv/ConvTranspose/Gemm/MatMul weight or bias, a Mul/Add operand or a Reshape shape are
folded, so the rest of the model is not touched.

Valid only when (one check each; a node that fails one is left as it is):

1. the node is a standard ai.onnx operator with at least one input, not ``Constant`` or
   ``Identity`` (already resolvable), and has no subgraph attribute (If, Loop, Scan);
2. it is deterministic: not ``Random*``, ``Multinomial``, ``Bernoulli`` or ``Dropout``;
3. it is not ``BatchNormalization`` (``onnx.reference`` is wrong for opsets 7 and 9);
4. every input is a constant (no overridable graph input, nothing computed at run time), except
   the second input of ``CastLike``, of which only the element type is read: ``CastLike(c, x)``
   is a constant when ``c`` is and ``x``'s element type is declared (the dynamo exporter with
   ``optimize=False`` writes each absent Conv bias as ``Expand(CastLike(0, input), shape)``);
5. none of its outputs is a graph output (their producer stays visible);
6. evaluation with ``onnx.reference`` succeeds and each result has at most ``max_elements``
   elements and the output's declared dtype (when declared).

Idempotent: a second run finds no node whose inputs are all constants except the ones refused above.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from bncompile.passes._common import Constants, remove_orphans
from bncompile.passes._result import LEFT, Entry, RewriteResult

log = logging.getLogger(__name__)

__all__ = ["FoldConstantsPass"]

_NON_DETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
_NEVER = frozenset({"Constant", "Identity", "BatchNormalization"})


class FoldConstantsPass(ir.passes.InPlacePass):
    """Replace nodes whose inputs are all constants by initializers (see the module docstring).

    Returns a :class:`~bncompile.passes._result.RewriteResult` with an entry per node evaluated
    (action "folded") and per constant-input node refused (LEFT, with the reason).
    """

    def __init__(self, *, max_elements: int = 1 << 24, only_feeding_layers: bool = True):
        super().__init__()
        self.max_elements = max_elements
        self.only_feeding_layers = only_feeding_layers

    def call(self, model: ir.Model) -> RewriteResult:
        consts = Constants(model)
        orphans: list[ir.Value] = []
        entries: list[Entry] = []
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        wanted = _wanted_values(nodes) if self.only_feeding_layers else None
        for node in nodes:
            if node.graph is None:
                continue
            if wanted is not None and not any(o in wanted for o in node.outputs):
                continue
            why = self._refuse(node, consts)
            if why == "":
                continue  # not a candidate at all
            results = None
            if why is None:
                arrays = [None if v is None else consts.get(v) if _type_only(node, i) is None
                          else _type_only(node, i) for i, v in enumerate(node.inputs)]
                results, why = self._evaluate(node, arrays, model)
            if results is None:
                entries.append(Entry.of(node, LEFT, why))
                log.debug("constant folding skipped %s %r: %s", node.op_type, node.name, why)
                continue
            entries.append(Entry.of(node, "folded"))
            orphans.extend(v for v in node.inputs if v is not None)  # before removal clears them
            self._replace(node, results, model)
        remove_orphans(orphans, model, consts)
        result = RewriteResult.of(model, self, entries)
        if result.changed:
            log.info("constant-folded %d node(s)", len(result.changed))
        return result

    def _refuse(self, node: ir.Node, consts: Constants) -> str | None:
        """'' when the node is no candidate, a reason when it is refused, None to fold it."""
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER or not node.inputs:
            return ""
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values()):
            return ""
        for i, v in enumerate(node.inputs):
            if v is not None and consts.get(v) is None and _type_only(node, i) is None:
                return ""
        if node.op_type in _NON_DETERMINISTIC:
            return "not deterministic"
        if any(o.is_graph_output() for o in node.outputs):
            return "an output is a graph output"
        return None

    def _evaluate(self, node: ir.Node, arrays, model: ir.Model):
        from onnx.reference import ReferenceEvaluator

        proto = ir.serde.serialize_node(node)
        in_names = [f"i{i}" if a is not None else "" for i, a in enumerate(arrays)]
        out_names = [f"o{i}" if o.name else "" for i, o in enumerate(node.outputs)]
        del proto.input[:]
        proto.input.extend(in_names)
        del proto.output[:]
        proto.output.extend(out_names)
        try:
            inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                                         a.shape)
                      for n, a in zip(in_names, arrays) if a is not None]
            outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in out_names if n]
            graph = onnx.helper.make_graph([proto], "fold_constant", inputs, outputs)
            opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
            one = onnx.helper.make_model(graph, opset_imports=opsets)
            feeds = {n: a for n, a in zip(in_names, arrays) if a is not None}
            results = ReferenceEvaluator(one).run(None, feeds)
        except Exception as err:  # operator unsupported by onnx.reference, bad types...
            return None, f"evaluation failed ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
        out = []
        kept = [o for o in node.outputs if o.name]
        for value, arr in zip(kept, results):
            arr = np.asarray(arr)
            if arr.size > self.max_elements:
                return None, f"result has {arr.size} elements (limit {self.max_elements})"
            if value.dtype is not None:
                try:
                    want = value.dtype.numpy()
                except Exception:
                    want = None
                if want is not None and arr.dtype != want:
                    return None, f"result dtype {arr.dtype} differs from the declared {want}"
            out.append((value, arr))
        return out, None

    def _replace(self, node: ir.Node, results, model: ir.Model) -> None:
        graph = node.graph
        new_values = []
        for value, arr in results:
            tensor = ir.tensor(arr)
            new = ir.Value(shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype),
                           const_value=tensor)
            value.replace_all_uses_with(new)
            new_values.append((value.name, new))
        graph.remove(node, safe=True)
        for name, new in new_values:
            new.name = name
            new.const_value.name = name
            graph.register_initializer(new)
            if (model.ir_version or 0) < 4 and graph is model.graph:
                graph.inputs.append(new)


def _type_only(node: ir.Node, index: int) -> np.ndarray | None:
    """An empty array of the declared element type of an input only its type is read of
    (``CastLike``'s second), or None."""
    if index != 1 or node.op_type != "CastLike" or node.inputs[index].dtype is None:
        return None
    try:
        return np.zeros((0,), dtype=node.inputs[index].dtype.numpy())
    except Exception:  # a type without a NumPy dtype
        return None


#: inputs whose constant value the BN fold reads, per consumer op
_READS = {"BatchNormalization": slice(1, 5), "Conv": slice(1, 3), "ConvTranspose": slice(1, 3),
          "Gemm": slice(1, 3), "MatMul": slice(1, 2), "Add": slice(0, 2), "Mul": slice(0, 2),
          "Reshape": slice(1, 2)}


def _wanted_values(nodes: list[ir.Node]) -> set[ir.Value]:
    """The values that feed, through any chain of nodes, an input the BN fold reads."""
    wanted: set[ir.Value] = set()
    for node in nodes:
        sl = _READS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if sl is not None:
            wanted.update(v for v in node.inputs[sl] if v is not None)
    for node in reversed(nodes):
        if any(o in wanted for o in node.outputs):
            wanted.update(v for v in node.inputs if v is not None)
    return wanted
