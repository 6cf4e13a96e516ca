"""Fold inference BatchNormalization into the layer that produces its input.

Equation. An inference BN is a per-channel affine map on axis 1::

    k = scale / sqrt(var + epsilon)        shift = B - mean * k        y = x * k + shift

A per-channel constant ``Mul`` by ``m`` and/or ``Add`` of ``d`` right after the BN (old converters
emit them) compose into the same map: ``k <- k*m, shift <- shift*m`` and ``shift <- shift + d``.
Folding the map into a linear layer ``x = W (*) input + b``::

    W' = W * k   (along W's output-channel axis)        b' = b * k + shift   (b = 0 when absent)

Output-channel axis per layer: Conv weight (O, I/g, k...) axis 0; ConvTranspose weight
(I, O/g, k...) axis 1 per group (output channel ``group*(O/g) + j``); Gemm ``B`` axis 1, or axis 0
with transB=1, with ``alpha`` folded into the weight scale (alpha -> 1) and ``beta*C`` into the bias
(beta -> 1); MatMul constant 2-D right operand axis 1 (a bias Add is inserted, or a following
constant Add bias is updated). Behind a ``Reshape (M, N) -> (M, C, d...)`` of a Gemm/MatMul output,
channel ``c`` is the contiguous column block ``[c*N/C, (c+1)*N/C)``, so ``k`` and ``shift`` are
repeated ``N/C`` times per channel. Values are computed in float64 and rounded once to the layer's
dtype (a float16 Conv stays float16 whatever the BN parameters' dtype).

Valid only when (one check each, each returning the reason shown in the report):

1. the BN is in inference mode: opset >= 14 ``training_mode=0``; no running-statistics outputs
   (opset < 14 "training" is the presence of the extra outputs); opset 6 ``is_test=1``; not
   opset 6/7 ``spatial=0``;
2. scale, B, mean and var are constants (initializers that are not overridable graph inputs —
   in IR 3 initializers listed as inputs are constants —, Constant nodes, or Identity of those),
   have one shape (C,), are finite, and ``var >= 0``, ``var + epsilon > 0``;
3. the BN input is produced by a node of the same graph, that value has exactly one use (the BN) and
   is not a graph output;
4. the producer is a foldable layer with constant float weight (and constant bias/C when present)
   whose output-channel count equals C; for MatMul, Gemm and Reshape targets the producer's output is
   2-D so that BN's axis 1 really is the column axis (a 3-D MatMul output normalized over axis 1 is
   a different channel);
5. a trailing Mul/Add is absorbed only when the BN output has exactly that one use, is not a graph
   output, and the other operand is a constant that broadcasts only along axis 1 (shape with 1 or C
   at axis 1 and 1 elsewhere after right alignment, rank <= the BN input's rank).

Through layout Transposes (tf2onnx's NHWC graphs: ``Conv -> Transpose(0,2,3,1) [-> Add(bias)] ->
Transpose(0,3,1,2) -> BN``): BN input axis ``a`` is axis ``perm[a]`` of each Transpose's input, so
the BN's channel is the layer's channel when the composed map sends axis 1 to axis 1; a per-channel
map commutes with any such Transpose. A constant bias ``Add`` of ``c`` between them (broadcasting only
along the channel's axis at that point) composes as ``shift <- shift + k*c`` and is removed. Valid
only when (checks 3a-3c):

3a. every Transpose has an explicit ``perm`` and every value in the chain has exactly one use and is
    not a graph output;
3b. the composed axis map sends the BN's axis 1 to the layer output's axis 1 (else the reason names
    the axis it reaches);
3c. a chain Add has one constant operand broadcasting only along the channel axis (else the walk
    stops there and the Add is the producer).

Into the next layer (forward: when the producer cannot take it). With ``x' = k*x + c`` read by
exactly one layer::

    Gemm (transA=0):  B' = alpha * diag(k) B (rows of the (K, N) view),  C' = beta*C + alpha * c^T B
    MatMul (2-D x):   W' = diag(k) W,  bias c^T W added to its constant bias Add (or a new Add)
    Conv (no padding): W'[o, j] = W[o, j] * k[g(o)*I/g + j],  b'[o] = b[o] + sum_{j,taps} W[o, j] c[g(o)*I/g + j]
    ConvTranspose 1x1, stride 1: W'[i] = W[i] * k[i],  b'[o] = b[o] + sum_{i in group(o)} W[i, o] c[i]

Valid only when (checks 4a-4d): 4a. the BN output has exactly one use, is not a graph output, and
that use is the layer's data input (input 0, not a weight); 4b. the layer's weights (and bias/C) are
constant floats and its input-channel count is C (Gemm: transA=0, opset >= 7; MatMul: the BN input
is 2-D, so axis 1 is the contraction axis); 4c. a Conv reads no padding (pads 0, auto_pad NOTSET or
VALID, or SAME with a 1x1 kernel): a padded border would see ``c`` where it saw zeros; 4d. a
ConvTranspose is 1x1 with stride 1 and no pads/output_padding/output_shape: each of its outputs sees
one kernel tap (or none), so ``c`` would need a bias per tap. A BN refused both ways reports the
backward reason, plus the forward one when the next layer was a candidate.

A weight or bias shared with other nodes is copied (the other nodes keep the original); an orphaned
original initializer (and in IR 3 its graph-input entry), Constant or Identity is removed. The BN's
output name, its graph-output slot, type and metadata move to the folded layer's output, so graph
inputs, outputs and their names do not change. Running the pass twice changes nothing the second time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bncompile.passes._common import (Constants, Names, add_initializer, array_tensor, attr_float,
                                      attr_int, batchnorm_mode, bn_affine, bypass, is_onnx_op,
                                      node_label, opset_of, rank_of, remove_orphans, value_label)
from bncompile.passes._result import LEFT, Entry, RewriteResult

log = logging.getLogger(__name__)

__all__ = ["FoldBatchNormPass"]


def _scaled(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w * scale`` computed in float64 and rounded once to ``w``'s dtype: the same bits as
    ``(w.astype(np.float64) * scale).astype(w.dtype)``, without the two float64 copies of ``w``
    (NumPy's float types; others, e.g. bfloat16, take that expression)."""
    if w.dtype not in (np.float16, np.float32, np.float64):
        return (w.astype(np.float64) * scale).astype(w.dtype)
    out = np.empty(np.broadcast_shapes(w.shape, scale.shape), dtype=w.dtype)
    np.multiply(w, scale, out=out, dtype=np.float64, casting="same_kind")
    return out


@dataclasses.dataclass
class _Target:
    """A producer the per-channel map can be folded into."""

    channels: int
    rank: int | None
    describe: str
    op_type: str
    output: ir.Value                                   # the value that replaces the BN output
    apply: Callable[[np.ndarray, np.ndarray], ir.Value | None]  # (k, shift) -> new output or None


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference BatchNormalization (and trailing per-channel Mul/Add) into Conv,
    ConvTranspose, Gemm, MatMul (+Add) and Reshape-of-Gemm/MatMul producers (also through layout
    Transposes), or forward into the Gemm/MatMul/unpadded Conv/1x1 ConvTranspose reading it.

    Returns a :class:`~bncompile.passes._result.RewriteResult` with one entry per BN node seen,
    action "folded" or "left" (with the reason); detail: ``graph`` ("main" or the subgraph's name),
    ``opset``, ``mode`` ("inference", "training", "spatial=0"), ``into`` (e.g. "Conv 'conv1'"),
    ``into_op``, ``absorbed`` (labels of the trailing Mul/Add folded with it) and ``direction``
    ("previous", "next" for a forward fold, None when left).
    """

    def __init__(self, *, absorb_affine: bool = True):
        super().__init__()
        self.absorb_affine = absorb_affine

    # ------------------------------------------------------------------ driver
    def call(self, model: ir.Model) -> RewriteResult:
        self._model = model
        self._consts = Constants(model)
        self._names = Names(model)
        self._orphans: list[ir.Value] = []
        entries: dict[ir.Node, Entry] = {}      # insertion order: the order BNs were first seen
        for _sweep in range(8):
            folded_this_sweep = False
            for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
                if not is_onnx_op(node, "BatchNormalization") or node.graph is None:
                    continue
                if node in entries and entries[node].changed:
                    continue
                entries[node] = entry = self._visit(node)
                folded_this_sweep = folded_this_sweep or entry.changed
            if not folded_this_sweep:
                break
        remove_orphans(self._orphans, model, self._consts)
        for e in entries.values():
            if e.changed:
                log.info("folded BatchNormalization %r into %s", e.name or "(unnamed)", e.detail["into"])
            else:
                log.info("left BatchNormalization %r: %s", e.name or "(unnamed)", e.reason)
        return RewriteResult.of(model, self, list(entries.values()))

    def _visit(self, bn: ir.Node) -> Entry:
        opset = opset_of(bn, self._model)
        graph_name = "main" if bn.graph is self._model.graph else (bn.graph.name or "subgraph")
        mode, why = batchnorm_mode(bn, opset)
        entry = Entry.of(bn, LEFT, graph=graph_name, opset=opset, mode=mode, into=None,
                         into_op=None, absorbed=[], direction=None)
        if why is None:
            why = self._try_fold(bn, entry.detail)
        if why is None:
            entry.action = "folded"
        entry.reason = why
        return entry

    # ------------------------------------------------------------------ checks + rewrite
    def _try_fold(self, bn: ir.Node, detail: dict) -> str | None:
        k, shift, why = bn_affine(bn, self._consts)
        if why is not None:
            return why
        if k.ndim != 1:
            return f"parameters have shape {k.shape}, expected (C,)"
        why = self._fold_previous(bn, detail, k, shift)
        if why is None:
            return None
        forward = self._fold_next(bn, detail, k, shift)
        if forward is None:
            return None
        return why if forward == "" else f"{why}; nor into the next layer: {forward}"

    def _fold_previous(self, bn: ir.Node, detail: dict, k: np.ndarray, shift: np.ndarray) -> str | None:
        x = bn.inputs[0]
        why = self._check_producer_output(bn, x)
        if why is not None:
            return why
        chain, value, csum, why = self._layout_chain(bn, x, k.shape[0])
        if why is not None:
            return why
        target, why = self._target(value.producer(), value, k.shape[0])
        if target is None:
            return why
        if target.channels != k.shape[0]:
            return (f"{target.describe} has {target.channels} output channels but the BN has "
                    f"{k.shape[0]}")
        chain_rank = next((len(perm) for _, perm in chain if perm is not None), None)
        if chain_rank is not None and target.rank is not None and target.rank != chain_rank:
            return f"{target.describe} output has rank {target.rank}, the Transposes {chain_rank}"
        shift = shift + k * csum          # y = (out + c) * k + shift
        final, absorbed = bn.outputs[0], []
        if self.absorb_affine and target.rank is not None:
            final, absorbed, k, shift = self._absorb_trailing(bn, target.rank, k, shift)
        new_out = target.apply(k, shift)
        if new_out is None:  # pragma: no cover - apply checks before mutating
            return f"{target.describe} could not be rewritten"
        if chain:
            farthest = chain[-1][0]
            if new_out is not value:
                farthest.replace_input_with(farthest.inputs.index(value), new_out)
            for node, perm in chain:
                if perm is None:  # a per-channel bias Add, now in the layer's bias
                    data = next(v for v in node.inputs if self._consts.get(v) is None)
                    self._orphans.extend(v for v in node.inputs if v is not data)
                    node.outputs[0].replace_all_uses_with(data)
                    node.graph.remove(node, safe=True)
            new_out = bn.inputs[0]
        bypass(final, new_out)
        doomed = [bn, *absorbed]
        for node in doomed:
            self._orphans.extend(inp for inp in node.inputs if inp is not None)
        bn.graph.remove(list(reversed(doomed)), safe=True)
        through = [node_label(n) for n, _ in chain]
        into = target.describe + (f" (through {', '.join(through)})" if through else "")
        detail.update(into=into, into_op=target.op_type, direction="previous",
                      absorbed=[node_label(n) for n in absorbed])
        return None

    def _layout_chain(self, bn: ir.Node, x: ir.Value, channels: int):
        """Walk from the BN input back through layout Transposes (and per-channel constant bias
        Adds between them, as tf2onnx writes a Keras Conv2D's BiasAdd in NHWC) to the layer.

        Returns (chain nearest-first as (node, perm or None for an Add), the layer's output value,
        the summed (C,) bias of the Adds, None) or (.., reason)."""
        chain: list[tuple[ir.Node, list[int] | None]] = []
        csum = np.zeros(channels)
        value, axis = x, 1
        rank = rank_of(x, self._consts)
        while True:
            node = value.producer()
            if node is None or node.domain not in ("", "ai.onnx") or len(chain) >= 16:
                break
            if node.op_type == "Transpose":
                perm = node.attributes.get("perm")
                if perm is None:
                    return chain, value, csum, (f"its input comes through {node_label(node)} "
                                                "without a perm attribute")
                perm = [int(p) for p in perm.value]
                rank = len(perm)
                chain.append((node, perm))
                axis = perm[axis]
                nxt = node.inputs[0]
            elif node.op_type == "Add" and len(node.inputs) == 2 and rank is not None:
                consts = [self._consts.get(v) for v in node.inputs]
                if (consts[0] is None) == (consts[1] is None):
                    break
                vec = _per_channel(consts[1] if consts[0] is None else consts[0], rank, channels,
                                   axis=axis)
                if vec is None:
                    break
                nxt = node.inputs[0] if consts[0] is None else node.inputs[1]
                if rank_of(nxt, self._consts) not in (None, rank):
                    break
                chain.append((node, None))
                csum = csum + vec
            else:
                break
            why = self._check_producer_output(node, nxt)
            if why is not None:
                return chain, nxt, csum, f"{why} (behind {node_label(chain[0][0])})"
            value = nxt
        if chain and not any(perm is not None for _, perm in chain):
            return [], x, np.zeros(channels), None   # a bias Add alone: the plain producer rules
        if axis != 1:
            source = node_label(value.producer()) if value.producer() else value_label(value)
            return chain, value, csum, (f"through {', '.join(node_label(n) for n, _ in chain)} its "
                                        f"channel is axis {axis} of the output of {source}, not "
                                        "its output-channel axis 1")
        return chain, value, csum, None

    # ------------------------------------------------------------------ forward: into the next layer
    def _fold_next(self, bn: ir.Node, detail: dict, k: np.ndarray, shift: np.ndarray) -> str | None:
        """Fold the BN into the one layer that reads its output; None when folded, "" when that
        reader is no candidate layer, else the reason."""
        y = bn.outputs[0]
        if y.is_graph_output() or len(y.uses()) != 1:
            return ""
        user, index = next(iter(y.uses()))
        if user.graph is not bn.graph or user.domain not in ("", "ai.onnx") \
                or user.op_type not in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
            return ""
        if index != 0:
            return f"{node_label(user)} reads it as input {index}, not as its data input"
        if any(v is y for i, v in enumerate(user.inputs) if i != 0):
            return f"{node_label(user)} also reads it as a weight"
        handler = {"Gemm": self._next_gemm, "MatMul": self._next_matmul, "Conv": self._next_conv,
                   "ConvTranspose": self._next_conv_transpose}[user.op_type]
        why = handler(bn, user, k, shift)
        if why is not None:
            return why
        x = bn.inputs[0]
        user.replace_input_with(0, x)
        self._orphans.extend(v for v in bn.inputs[1:] if v is not None)
        bn.graph.remove(bn, safe=True)
        detail.update(into=f"{node_label(user)} (the next layer)", into_op=user.op_type,
                      direction="next", absorbed=[])
        return None

    def _next_gemm(self, bn, node, k, shift) -> str | None:
        opset = opset_of(node, self._model)
        if opset < 7:
            return f"{node_label(node)} is Gemm opset {opset} (broadcast attribute): not handled"
        if attr_int(node, "transA", 0):
            return f"{node_label(node)} has transA=1: the BN's channel axis is not its contraction axis"
        w, why = self._weight(node, 1, "B")
        if w is None:
            return why
        if w.ndim != 2:
            return f"{node_label(node)} B has rank {w.ndim}"
        trans_b = attr_int(node, "transB", 0)
        kn = w.T.astype(np.float64) if trans_b else w.astype(np.float64)       # (K, N)
        if kn.shape[0] != k.shape[0]:
            return f"{node_label(node)} has {kn.shape[0]} input columns but the BN has {k.shape[0]} channels"
        n = kn.shape[1]
        c = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c, why = self._weight(node, 2, "C")
            if c is None:
                return why
            if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
                return f"{node_label(node)} C of shape {c.shape} does not broadcast to (M, {n})"
        alpha = attr_float(node, "alpha", 1.0)
        beta = attr_float(node, "beta", 1.0)
        new_kn = alpha * k[:, None] * kn
        c64 = np.zeros(n) if c is None else beta * c.astype(np.float64)
        new_c = c64 + alpha * (shift @ kn)
        wname = node.inputs[1].name or "B"
        self._write(node, 1, (new_kn.T if trans_b else new_kn).astype(w.dtype), f"{wname}_bnfold")
        self._write(node, 2, new_c.astype(w.dtype), f"{node.name or wname}_C_bnfold")
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return None

    def _next_matmul(self, bn, node, k, shift) -> str | None:
        w, why = self._matmul_weight(node)
        if w is None:
            return why
        rank = rank_of(bn.inputs[0], self._consts)
        if rank is None:
            rank = rank_of(bn.outputs[0], self._consts)
        if rank != 2:
            return (f"the BN's input has rank {rank}: only a 2-D input has the BN's channel axis "
                    f"as {node_label(node)}'s contraction axis")
        if w.shape[0] != k.shape[0]:
            return f"{node_label(node)} has {w.shape[0]} input rows but the BN has {k.shape[0]} channels"
        w64 = w.astype(np.float64)
        bias = shift @ w64                                    # (N,)
        wname = node.inputs[1].name or "W"
        out = node.outputs[0]
        add, add_index = None, None
        if not out.is_graph_output() and len(out.uses()) == 1:
            user, i = next(iter(out.uses()))
            if is_onnx_op(user, "Add") and len(user.inputs) == 2 and user.graph is node.graph:
                b = self._consts.get(user.inputs[1 - i])
                if b is not None and _is_float(b) and b.ndim <= 2 and (b.ndim == 0 or b.shape[-1] in (1, w.shape[1])) \
                        and (b.ndim < 2 or b.shape[0] == 1):
                    add, add_index = user, 1 - i
        self._write(node, 1, (w64 * k[:, None]).astype(w.dtype), f"{wname}_bnfold")
        if add is not None:
            b = self._consts.get(add.inputs[add_index]).astype(np.float64)
            self._write(add, add_index, (b + bias).astype(w.dtype), f"{add.name or wname}_bias_bnfold")
            return None
        const = add_initializer(node.graph, self._model, self._names,
                                f"{node.name or wname}_bias_bnfold", bias.astype(w.dtype))
        add_out = ir.Value(name=self._names.new(f"{out.name or 'matmul'}_bnfold"),
                           type=out.type, shape=out.shape)
        new = ir.Node("", "Add", [out, const], outputs=[add_out],
                      name=self._names.new(f"{node.name or 'MatMul'}_bias_add"))
        node.graph.insert_after(node, new)
        bypass(out, add_out)                  # also rewired the Add's own input: put it back
        new.replace_input_with(0, out)
        if out.name is None:
            out.name = self._names.new(f"{node.name or 'matmul'}_out")
        return None

    def _padding_reason(self, node, kernel, transpose: bool) -> str | None:
        """None when the layer reads no padding (and, for ConvTranspose, every output sees exactly
        one input position per kernel), else the reason."""
        pads = [int(p) for p in (node.attributes["pads"].value if "pads" in node.attributes else [])]
        auto = node.attributes["auto_pad"].value if "auto_pad" in node.attributes else "NOTSET"
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER") and not (not transpose and all(d == 1 for d in kernel)):
            return (f"{node_label(node)} pads its input (auto_pad={auto}): the padding would see the "
                    "BN's shift where it saw zeros")
        if any(pads):
            return (f"{node_label(node)} pads its input (pads={pads}): the padding would see the "
                    "BN's shift where it saw zeros")
        if transpose:
            strides = [int(v) for v in (node.attributes["strides"].value if "strides" in node.attributes
                                        else [1] * len(kernel))]
            dil = [int(v) for v in (node.attributes["dilations"].value if "dilations" in node.attributes
                                    else [1] * len(kernel))]
            extra = [int(v) for v in (node.attributes["output_padding"].value
                                      if "output_padding" in node.attributes else [])]
            if "output_shape" in node.attributes or any(extra):
                return (f"{node_label(node)} sets output_shape/output_padding: some outputs see no "
                        "input position, so the BN's shift is not a per-channel constant there")
            if any(d != 1 for d in kernel) or any(v != 1 for v in strides):
                return (f"{node_label(node)} has kernel {list(kernel)}, strides {strides}: each "
                        "output of a ConvTranspose sees one kernel tap (or none), so the BN's shift "
                        "would need a bias per tap; only a 1x1, stride-1 ConvTranspose takes it")
            del dil  # a 1x1 kernel reads no neighbours: dilation does not matter
        return None

    def _next_conv(self, bn, node, k, shift) -> str | None:
        w, b, why = self._conv_weights(node)
        if w is None:
            return why
        group = attr_int(node, "group", 1)
        o, ig = w.shape[0], w.shape[1]
        if group < 1 or o % group or ig * group != k.shape[0]:
            return (f"{node_label(node)} reads {ig * group} input channels (group={group}) but the "
                    f"BN has {k.shape[0]}")
        why = self._padding_reason(node, w.shape[2:], transpose=False)
        if why is not None:
            return why
        rank = rank_of(bn.inputs[0], self._consts)
        if rank is not None and rank != w.ndim:
            return f"the BN's input has rank {rank}, {node_label(node)} expects {w.ndim}"
        channel = (np.arange(o) // (o // group))[:, None] * ig + np.arange(ig)[None, :]   # (O, I/g)
        w64 = w.astype(np.float64)
        new_w = w64 * k[channel].reshape(channel.shape + (1,) * (w.ndim - 2))
        spatial = tuple(range(2, w.ndim))
        b64 = np.zeros(o) if b is None else b.astype(np.float64)
        new_b = b64 + (w64.sum(axis=spatial) * shift[channel]).sum(axis=1)
        wname = node.inputs[1].name or "W"
        self._write(node, 1, new_w.astype(w.dtype), f"{wname}_bnfold")
        self._write(node, 2, new_b.astype(w.dtype), f"{node.name or wname}_bias_bnfold")
        return None

    def _next_conv_transpose(self, bn, node, k, shift) -> str | None:
        w, b, why = self._conv_weights(node)
        if w is None:
            return why
        group = attr_int(node, "group", 1)
        i_ch, og = w.shape[0], w.shape[1]
        if i_ch != k.shape[0]:
            return f"{node_label(node)} reads {i_ch} input channels but the BN has {k.shape[0]}"
        if group < 1 or i_ch % group:
            return f"{node_label(node)} group={group} does not divide {i_ch} input channels"
        why = self._padding_reason(node, w.shape[2:], transpose=True)
        if why is not None:
            return why
        rank = rank_of(bn.inputs[0], self._consts)
        if rank is not None and rank != w.ndim:
            return f"the BN's input has rank {rank}, {node_label(node)} expects {w.ndim}"
        w64 = w.astype(np.float64)
        new_w = w64 * k.reshape((-1,) + (1,) * (w.ndim - 1))
        summed = w64.sum(axis=tuple(range(2, w.ndim))) * shift[:, None]      # (I, O/g)
        per_group = i_ch // group
        contrib = np.concatenate([summed[g * per_group:(g + 1) * per_group].sum(axis=0)
                                  for g in range(group)])                     # (O,)
        b64 = np.zeros(og * group) if b is None else b.astype(np.float64)
        wname = node.inputs[1].name or "W"
        self._write(node, 1, new_w.astype(w.dtype), f"{wname}_bnfold")
        self._write(node, 2, (b64 + contrib).astype(w.dtype), f"{node.name or wname}_bias_bnfold")
        return None

    def _check_producer_output(self, bn: ir.Node, x: ir.Value | None) -> str | None:
        if x is None:
            return "the BN has no input"
        producer = x.producer()
        if producer is None:
            return f"its input {value_label(x)} is a graph input or initializer: no layer to fold into"
        if producer.graph is not bn.graph:
            return f"its input comes from {node_label(producer)} in an enclosing graph"
        if x.is_graph_output():
            return f"the output {value_label(x)} of {node_label(producer)} is also a graph output"
        users = x.uses()
        if len(users) != 1:
            others = sorted({node_label(u.node) for u in users if u.node is not bn})
            return (f"the output {value_label(x)} of {node_label(producer)} has {len(users)} uses "
                    f"(also {', '.join(others) or 'the BN twice'}): folding would change them")
        return None

    def _absorb_trailing(self, bn, rank, k, shift):
        final, absorbed = bn.outputs[0], []
        channels = k.shape[0]
        while True:
            if final.is_graph_output() or len(final.uses()) != 1:
                break
            user, index = next(iter(final.uses()))
            if user.graph is not bn.graph or user.op_type not in ("Mul", "Add") or user.domain not in ("", "ai.onnx"):
                break
            if len(user.inputs) != 2 or user.inputs[0] is user.inputs[1]:
                break
            other = self._consts.get(user.inputs[1 - index])
            vec = _per_channel(other, rank, channels)
            if vec is None:
                break
            if user.op_type == "Mul":
                k, shift = k * vec, shift * vec
            else:
                shift = shift + vec
            absorbed.append(user)
            final = user.outputs[0]
        return final, absorbed, k, shift

    # ------------------------------------------------------------------ targets
    def _target(self, node: ir.Node, out: ir.Value, channels: int) -> tuple[_Target | None, str | None]:
        if node.domain not in ("", "ai.onnx"):
            return None, f"its producer {node_label(node)} is not a foldable layer"
        handler = {"Conv": self._conv, "ConvTranspose": self._conv_transpose, "Gemm": self._gemm,
                   "MatMul": self._matmul, "Add": self._matmul_add,
                   "Reshape": self._reshape}.get(node.op_type)
        if handler is None:
            return None, (f"its producer {node_label(node)} is not a foldable layer (Conv, "
                          "ConvTranspose, Gemm, MatMul, MatMul+Add, or Reshape of Gemm/MatMul)")
        return handler(node, out, channels)

    def _weight(self, node: ir.Node, index: int, what: str):
        value = node.inputs[index] if len(node.inputs) > index else None
        arr, why = self._consts.resolve(value)
        if arr is None:
            return None, f"{node_label(node)} {what} {why}"
        if not _is_float(arr):
            return None, f"{node_label(node)} {what} has non-float dtype {arr.dtype}"
        return arr, None

    def _write(self, node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
        """Set ``node.inputs[index]`` to a constant holding ``array`` (copy if shared)."""
        old = node.inputs[index] if len(node.inputs) > index else None
        graph = node.graph
        if (old is not None and old.is_initializer() and old.graph is graph
                and len(old.uses()) == 1 and not old.is_graph_output()
                and not self._consts.is_overridable(old)):
            tensor = array_tensor(array, name=old.name)
            old.const_value = tensor
            old.shape = ir.Shape(array.shape)
            old.type = ir.TensorType(tensor.dtype)
            return
        new = add_initializer(graph, self._model, self._names, base, array)
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)
        if old is not None:
            self._orphans.append(old)

    def _conv_weights(self, node):
        """(W, bias or None, None) of a Conv/ConvTranspose, or (None, None, reason)."""
        w, why = self._weight(node, 1, "weight")
        if w is None:
            return None, None, why
        if w.ndim < 3:
            return None, None, f"{node_label(node)} weight has rank {w.ndim}, expected >= 3"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b, why = self._weight(node, 2, "bias")
            return (w, b, None) if b is not None else (None, None, why)
        return w, None, None

    def _conv(self, node, out, channels):
        w, b, why = self._conv_weights(node)
        if w is None:
            return None, why
        wname = node.inputs[1].name or "W"

        def apply(k, shift):
            scale = k.reshape((-1,) + (1,) * (w.ndim - 1))
            new_w = _scaled(w, scale)
            b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
            new_b = (b64 * k + shift).astype(w.dtype)
            self._write(node, 1, new_w, f"{wname}_bnfold")
            self._write(node, 2, new_b, f"{node.name or wname}_bias_bnfold")
            return out

        return _Target(w.shape[0], w.ndim, node_label(node), "Conv", out, apply), None

    def _conv_transpose(self, node, out, channels):
        w, b, why = self._conv_weights(node)
        if w is None:
            return None, why
        group = attr_int(node, "group", 1)
        if group < 1 or w.shape[0] % group:
            return None, f"{node_label(node)} group={group} does not divide {w.shape[0]} input channels"
        per_group = w.shape[1]
        n_out = per_group * group
        wname = node.inputs[1].name or "W"

        def apply(k, shift):
            grp = np.arange(w.shape[0]) // (w.shape[0] // group)
            channel = grp[:, None] * per_group + np.arange(per_group)[None, :]   # (I, O/g)
            scale = k[channel].reshape(channel.shape + (1,) * (w.ndim - 2))
            new_w = _scaled(w, scale)
            b64 = np.zeros(n_out) if b is None else b.astype(np.float64)
            new_b = (b64 * k + shift).astype(w.dtype)
            self._write(node, 1, new_w, f"{wname}_bnfold")
            self._write(node, 2, new_b, f"{node.name or wname}_bias_bnfold")
            return out

        return _Target(n_out, w.ndim, node_label(node), "ConvTranspose", out, apply), None

    def _gemm(self, node, out, channels, *, repeat: int = 1, rank: int | None = 2):
        opset = opset_of(node, self._model)
        if opset < 7:
            return None, f"{node_label(node)} is Gemm opset {opset} (broadcast attribute): not handled"
        w, why = self._weight(node, 1, "B")
        if w is None:
            return None, why
        if w.ndim != 2:
            return None, f"{node_label(node)} B has rank {w.ndim}"
        trans_b = attr_int(node, "transB", 0)
        alpha = attr_float(node, "alpha", 1.0)
        beta = attr_float(node, "beta", 1.0)
        n = w.shape[0] if trans_b else w.shape[1]
        c = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c, why = self._weight(node, 2, "C")
            if c is None:
                return None, why
            if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
                return None, f"{node_label(node)} C of shape {c.shape} does not broadcast to (M, {n})"
        wname = node.inputs[1].name or "B"

        def apply(k, shift):
            k, shift = np.repeat(k, repeat), np.repeat(shift, repeat)
            col = alpha * k
            scale = col[:, None] if trans_b else col[None, :]
            new_w = _scaled(w, scale)
            c64 = np.zeros(n) if c is None else beta * c.astype(np.float64)
            new_c = (c64 * k + shift).astype(w.dtype)
            self._write(node, 1, new_w, f"{wname}_bnfold")
            self._write(node, 2, new_c, f"{node.name or wname}_C_bnfold")
            node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return out

        return _Target(n // repeat if repeat else n, rank, node_label(node), "Gemm", out, apply), None

    def _matmul_rank_check(self, node, out) -> str | None:
        rank = rank_of(out, self._consts)
        if rank is None:
            return (f"the rank of {node_label(node)}'s output is unknown, so BN's axis 1 cannot be "
                    "proven to be its column axis (add shapes to the model's inputs)")
        if rank != 2:
            return (f"{node_label(node)}'s output has rank {rank}: BN normalizes axis 1, not the "
                    "MatMul's last (column) axis")
        return None

    def _matmul_weight(self, node):
        """(the constant 2-D right operand of a MatMul, None), or (None, reason)."""
        w, why = self._weight(node, 1, "right operand")
        if w is not None and w.ndim != 2:
            return None, f"{node_label(node)} right operand has rank {w.ndim}, expected 2"
        return w, why

    def _matmul(self, node, out, channels, *, repeat: int = 1, rank: int | None = 2,
                check_rank: bool = True):
        w, why = self._matmul_weight(node)
        if w is None:
            return None, why
        if check_rank:
            why = self._matmul_rank_check(node, out)
            if why:
                return None, why
        wname = node.inputs[1].name or "W"
        n = w.shape[1]

        def apply(k, shift):
            k, shift = np.repeat(k, repeat), np.repeat(shift, repeat)
            new_w = _scaled(w, k[None, :])
            self._write(node, 1, new_w, f"{wname}_bnfold")
            bias = add_initializer(node.graph, self._model, self._names,
                                   f"{node.name or wname}_bias_bnfold", shift.astype(w.dtype))
            add_out = ir.Value(name=self._names.new(f"{out.name or 'matmul'}_bnfold"),
                               type=out.type, shape=out.shape)
            add = ir.Node("", "Add", [out, bias], outputs=[add_out],
                          name=self._names.new(f"{node.name or 'MatMul'}_bias_add"))
            node.graph.insert_after(node, add)
            return add_out

        return _Target(n // repeat, rank, node_label(node), "MatMul", out, apply), None

    def _matmul_add(self, node, out, channels, *, repeat: int = 1, rank: int | None = 2,
                    check_rank: bool = True):
        if len(node.inputs) != 2:
            return None, f"its producer {node_label(node)} is not a MatMul + bias Add"
        for i in (0, 1):
            mm_out = node.inputs[i]
            mm = mm_out.producer() if mm_out is not None else None
            if mm is not None and is_onnx_op(mm, "MatMul"):
                break
        else:
            return None, f"its producer {node_label(node)} is an Add that does not follow a MatMul"
        if mm.graph is not node.graph or mm_out.is_graph_output() or len(mm_out.uses()) != 1:
            return None, (f"{node_label(mm)}'s output has other uses or is a graph output: folding "
                          "would change them")
        b, why = self._weight(node, 1 - i, "bias")
        if b is None:
            return None, why
        w, why = self._matmul_weight(mm)
        if w is None:
            return None, why
        n = w.shape[1]
        if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n)):
            return None, f"{node_label(node)} bias of shape {b.shape} does not broadcast to (M, {n})"
        if check_rank:
            why = self._matmul_rank_check(mm, out)
            if why:
                return None, why
        wname = mm.inputs[1].name or "W"
        bias_index = 1 - i

        def apply(k, shift):
            k, shift = np.repeat(k, repeat), np.repeat(shift, repeat)
            new_w = _scaled(w, k[None, :])
            new_b = (b.astype(np.float64) * k + shift).astype(b.dtype)
            self._write(mm, 1, new_w, f"{wname}_bnfold")
            self._write(node, bias_index, new_b, f"{node.name or wname}_bias_bnfold")
            return out

        return _Target(n // repeat, rank, f"{node_label(mm)} + {node_label(node)}", "MatMul+Add",
                       out, apply), None

    def _reshape(self, node, out, channels):
        data = node.inputs[0]
        shape = self._consts.get(node.inputs[1] if len(node.inputs) > 1 else None)
        if shape is None:
            return None, f"its producer {node_label(node)} has a shape computed at run time"
        inner = data.producer() if data is not None else None
        if inner is None or inner.graph is not node.graph or inner.op_type not in ("Gemm", "MatMul", "Add") \
                or inner.domain not in ("", "ai.onnx"):
            return None, (f"its producer {node_label(node)} does not reshape a Gemm/MatMul output")
        if data.is_graph_output() or len(data.uses()) != 1:
            return None, f"the input of {node_label(node)} has other uses or is a graph output"
        if inner.op_type != "Gemm":
            rank = rank_of(data, self._consts)
            if rank != 2:
                return None, (f"{node_label(inner)} output rank is {rank}, expected 2 for a "
                              "Reshape to channel blocks")
        # the column count of the 2-D producer
        mm = None
        if inner.op_type == "Gemm":
            w = self._consts.get(inner.inputs[1])
            if w is None or w.ndim != 2:
                return None, f"{node_label(inner)} B is not a constant matrix"
            n = w.shape[0] if attr_int(inner, "transB", 0) else w.shape[1]
        else:
            mm = inner if inner.op_type == "MatMul" else next(
                (v.producer() for v in inner.inputs if v is not None and v.producer() is not None
                 and is_onnx_op(v.producer(), "MatMul")), None)
            w = self._consts.get(mm.inputs[1]) if mm is not None else None
            if w is None or w.ndim != 2:
                return None, f"{node_label(inner)} has no constant 2-D MatMul weight"
            n = w.shape[1]
        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        allowzero = attr_int(node, "allowzero", 0)
        why = _reshape_blocks(dims, allowzero, n, channels, _static_rows(data, inner, mm if inner.op_type != "Gemm" else None))
        if why:
            return None, f"{node_label(node)} {why}"
        repeat = n // channels
        kind = {"Gemm": self._gemm, "MatMul": self._matmul, "Add": self._matmul_add}[inner.op_type]
        kwargs = {} if inner.op_type == "Gemm" else {"check_rank": False}
        target, why = kind(inner, data, n, repeat=repeat, rank=len(dims), **kwargs)
        if target is None:
            return None, why

        def apply(k, shift):
            new_data = target.apply(k, shift)
            if new_data is not data:
                node.replace_input_with(0, new_data)
            return out

        return _Target(channels, len(dims), f"{target.describe} (through {node_label(node)})",
                       f"{target.op_type}+Reshape", out, apply), None


def _static_rows(data: ir.Value, inner: ir.Node, matmul: ir.Node | None) -> int | None:
    """M of a 2-D Gemm/MatMul output when it is static (declared, or from the left operand)."""
    if data.shape is not None and len(data.shape) == 2 and isinstance(data.shape[0], int):
        return data.shape[0]
    if inner.op_type == "Gemm":
        a = inner.inputs[0]
        if a is not None and a.shape is not None and len(a.shape) == 2:
            d = a.shape[1] if attr_int(inner, "transA", 0) else a.shape[0]
            return d if isinstance(d, int) else None
        return None
    a = matmul.inputs[0] if matmul is not None else None
    if a is not None and a.shape is not None and len(a.shape) == 2 and isinstance(a.shape[0], int):
        return a.shape[0]
    return None


def _reshape_blocks(dims: list[int], allowzero: int, n: int, channels: int, m_static: int | None) -> str | None:
    """None when Reshape (M, n) -> dims keeps axis 0 and puts channel c on columns
    [c*n/C, (c+1)*n/C); else the reason."""
    if len(dims) < 2:
        return f"reshapes to rank {len(dims)}"
    if channels <= 0 or n % channels:
        return f"{n} columns do not split into {channels} channels"
    if allowzero and 0 in dims:
        return "uses allowzero=1 with a 0 dimension"
    dims = list(dims)
    if dims[1] == 0:
        dims[1] = n
    rest = dims[1:]
    if any(d == 0 for d in rest[1:]):
        return "copies an input dimension beyond axis 1"
    if dims[0] == -1:
        if any(d < 0 for d in rest):
            return "has two -1 dimensions"
    elif dims[0] == 0 or (m_static is not None and dims[0] == m_static):
        if rest.count(-1) > 1:
            return "has two -1 dimensions"
        if -1 in rest:
            known = int(np.prod([d for d in rest if d != -1]))
            if known == 0 or n % known:
                return "has a -1 dimension that does not divide the columns"
            rest[rest.index(-1)] = n // known
    else:
        return f"target shape {dims} may not keep the batch axis (input batch {m_static})"
    if int(np.prod(rest)) != n:
        return f"target shape {dims} does not keep {n} columns per row"
    if rest[0] != channels:
        return f"puts {rest[0]} channels on axis 1, the BN has {channels}"
    return None


def _per_channel(arr: np.ndarray | None, rank: int, channels: int, *, axis: int = 1) -> np.ndarray | None:
    """The (C,) float64 vector of a constant that broadcasts only along ``axis`` of a rank-``rank``
    tensor, or None."""
    if arr is None or not _is_float(arr):
        return None
    if arr.ndim > rank or rank < 2:
        return None
    full = (1,) * (rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, channels):
        return None
    vec = np.asarray(arr, dtype=np.float64).reshape(-1)
    if not np.isfinite(vec).all():
        return None
    return np.broadcast_to(vec, (channels,)).copy()


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"
