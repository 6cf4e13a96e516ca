"""Rewrite inference BatchNormalization that could not be folded into Mul + Add.

Equation: ``y = x * k + shift`` with ``k = scale / sqrt(var + epsilon)`` and
``shift = B - mean * k``, precomputed in float64 and rounded once to X's dtype. For ``spatial=1``
(all opsets' default) the constants have shape (C, 1, ..., 1) (rank of X minus one, so they
broadcast along axis 1); for opset 6/7 ``spatial=0`` they keep the parameters' (C, D1..Dn) shape,
which broadcasts against X's (N, C, D1..Dn) directly. Before opset 7, Mul and Add broadcast only
when asked (``broadcast=1``), aligning the second operand at ``axis``: there the constants keep the
parameters' shape ((C,), or (C, D1..Dn) for spatial=0) and the Mul and Add carry ``broadcast=1,
axis=1``, which is the same per-channel map.

Valid only when (one check each; a BN that fails one is left and reported):

1. the BN is in inference mode (no training_mode=1, no running-statistics outputs);
2. scale, B, mean, var are constants of one shape, finite, with ``var >= 0`` and ``var + eps > 0``;
3. X's rank is known (declared shape or inferable from its producer), and for spatial=0 equals
   1 + the parameters' rank;
4. X's element type is known (declared on X or the BN output, or equal to the parameters' type
   before opset 15) and is a float type.

The BN output's name and graph-output slot move to the Add's output.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from bncompile.passes._common import (FLOAT_DTYPES, Constants, Names, add_initializer, batchnorm_mode,
                                      bn_affine, bypass, is_onnx_op, node_label, opset_of, rank_of,
                                      remove_orphans)
from bncompile.passes._result import LEFT, Entry, RewriteResult

log = logging.getLogger(__name__)

__all__ = ["DecomposeBatchNormPass"]


class DecomposeBatchNormPass(ir.passes.InPlacePass):
    """Replace each inference BatchNormalization by Mul + Add with per-channel constants.

    Returns a :class:`~bncompile.passes._result.RewriteResult` with one entry per BN node seen,
    action "decomposed" or "left" (with the reason).
    """

    def call(self, model: ir.Model) -> RewriteResult:
        consts, names = Constants(model), Names(model)
        orphans: list[ir.Value] = []
        entries: list[Entry] = []
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if not is_onnx_op(node, "BatchNormalization") or node.graph is None:
                continue
            params = [v for v in node.inputs[1:] if v is not None]
            why = self._decompose(node, model, consts, names)
            entries.append(Entry.of(node, LEFT if why else "decomposed", why))
            if why is None:
                orphans.extend(params)
                log.info("decomposed %s into Mul + Add", node_label(node))
            else:
                log.info("left %s: %s", node_label(node), why)
        remove_orphans(orphans, model, consts)
        return RewriteResult.of(model, self, entries)

    def _decompose(self, bn: ir.Node, model: ir.Model, consts: Constants, names: Names) -> str | None:
        opset = opset_of(bn, model)
        mode, why = batchnorm_mode(bn, opset)
        if mode == "training":
            return why
        k, shift, why = bn_affine(bn, consts)
        if why is not None:
            return why
        x, y = bn.inputs[0], bn.outputs[0]
        rank = rank_of(x, consts)
        if rank is None:
            rank = rank_of(y, consts)
        if rank is None:
            return "the rank of X is unknown, so the broadcast shape of the constants is unknown"
        legacy = {"broadcast": 1, "axis": 1} if opset < 7 else {}
        if mode == "spatial=0":
            if rank != 1 + k.ndim:
                return f"spatial=0 parameters of rank {k.ndim} do not match X of rank {rank}"
            shape = k.shape
        elif legacy:
            if k.ndim != 1 or rank < 2:
                return f"parameters of shape {k.shape} for X of rank {rank}"
            shape = k.shape
        else:
            if k.ndim != 1 or rank < 2:
                return f"parameters of shape {k.shape} for X of rank {rank}"
            shape = (k.shape[0],) + (1,) * (rank - 2)
        dtype = x.dtype or y.dtype
        if dtype is None and opset < 15:
            scale = consts.get(bn.inputs[1])
            dtype = ir.DataType.from_numpy(scale.dtype)
        if dtype is None:
            return "the element type of X is unknown"
        if dtype not in FLOAT_DTYPES:
            return f"X has non-float type {dtype}"
        np_dtype = dtype.numpy()
        graph = bn.graph
        base = bn.name or "bn"
        k_val = add_initializer(graph, model, names, f"{base}_scale_k", k.reshape(shape).astype(np_dtype))
        s_val = add_initializer(graph, model, names, f"{base}_shift", shift.reshape(shape).astype(np_dtype))
        mul_out = ir.Value(name=names.new(f"{base}_mul"), type=y.type, shape=y.shape)
        add_out = ir.Value(name=names.new(f"{base}_add"), type=y.type, shape=y.shape)
        attrs = [ir.AttrInt64(key, value) for key, value in legacy.items()]
        mul = ir.Node("", "Mul", [x, k_val], outputs=[mul_out], name=names.new(f"{base}_Mul"),
                      attributes=attrs)
        add = ir.Node("", "Add", [mul_out, s_val], outputs=[add_out], name=names.new(f"{base}_Add"),
                      attributes=attrs)
        graph.insert_before(bn, [mul, add])
        bypass(y, add_out)
        graph.remove(bn, safe=True)
        return None
