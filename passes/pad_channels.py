"""Zero-pad the channels of a conv-to-conv region up to a whole vector block (compile's preparation).

A CPU target carries activations in ``NCHW{B}c`` blocks of B channels (B = the vector lanes:
``bncompile.lower.graph_schedules.channel_blocked``), and only where B divides the channels: on AVX-512
MobileNetV3's 72, 120, 184 and 200 stayed in NCHW, so their depthwise convs and squeeze-and-excitation
pools ran per plane. onnxruntime's NCHWc layout pads such channels with zeros (72 -> 80); this pass does
the same on the ONNX graph, before TVM imports it.

A *region* is a set of tensors of C channels (axis 1, rank 4) closed under the operators between convs:

* **sources**: Conv with one group and a constant weight whose output is in the region: the weight gets
  C' - C zero filters (and zero biases), so the new channels are 0;
* **inside**: depthwise Conv (``group`` = C, constant ``[C, 1, kh, kw]`` weight: zero filters, ``group``
  C'), Relu, LeakyRelu, Clip, HardSigmoid, HardSwish, Sigmoid, Tanh, GlobalAveragePool, and Add, Sub, Mul
  of two region tensors or of one and a constant that is a scalar or per channel (padded with zeros);
* **sinks**: Conv with one group and a constant weight reading a region tensor as its input: the weight
  gets C' - C zero input channels, so whatever the new channels hold is multiplied by 0. A C -> C conv
  whose output is in the region too is both (padded on both weight axes).

Exact: every operator inside maps finite values to finite values (a sigmoid gate of the zero channels is
0.5, times 0), so each sink adds 0 x finite = 0 for the new channels, and its output is the same sum up to
the order its terms are added in (a backend may block a longer reduction differently). A region that reaches anything else (a graph input or output,
a Concat, a Reshape, a BatchNormalization, a grouped conv...) is left as it is. Only regions with a
depthwise conv are padded (that is where blocks pay: a padded 1x1 conv is only more work), and only
where the new channels are at most :data:`MAX_WASTE` of C.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bncompile.passes._common import (Constants, Names, add_initializer, attr_int, is_onnx_op, node_label,
                                      remove_orphans)
from bncompile.passes._result import LEFT, Entry, RewriteResult

__all__ = ["PadChannelsPass", "MAX_WASTE"]

#: the most zero channels a region may get, as a fraction of its channels (72 -> 80 on blocks of 16: 1/9)
MAX_WASTE = 0.125

_UNARY = frozenset({"Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh",
                    "GlobalAveragePool"})
_BINARY = frozenset({"Add", "Sub", "Mul"})


class _Region:
    """A region grown from one source conv (see the module docstring)."""

    def __init__(self, channels: int):
        self.c = channels
        self.values: set[ir.Value] = set()
        self.sources: set[ir.Node] = set()
        self.sinks: set[ir.Node] = set()
        self.depthwise: set[ir.Node] = set()
        self.constants: list[tuple[ir.Node, int]] = []      # (binary op, input index) of a per-channel constant
        self.nodes: set[ir.Node] = set()


class PadChannelsPass(ir.passes.InPlacePass):
    """Pad the channels of conv-to-conv regions to a multiple of ``block`` (see the module docstring).
    Entries: one per region that has a depthwise conv, at its first source conv: "padded" (detail
    ``channels``: [C, C'], ``convs``) or LEFT with the reason."""

    def __init__(self, block: int):
        super().__init__()
        self.block = int(block)

    def call(self, model: ir.Model) -> RewriteResult:
        consts = Constants(model)
        entries: list[Entry] = []
        seen: set[ir.Value] = set()
        regions = []
        for node in list(model.graph):
            w = self._conv_weight(node, consts)
            if w is None or attr_int(node, "group", 1) != 1 or node.outputs[0] in seen:
                continue
            c = w.shape[0]
            if c % self.block == 0:
                continue
            region, why = self._grow(node, c, consts)
            seen |= region.values
            if not region.depthwise:
                continue
            padded = -(-c // self.block) * self.block
            if why is None and padded - c > MAX_WASTE * c:
                why = f"{c} -> {padded} channels adds more than {MAX_WASTE:.0%} of them"
            if why is not None:
                entries.append(Entry.of(node, LEFT, why, channels=[c, padded]))
                continue
            regions.append((node, region, padded))
        names = Names(model)
        for node, region, padded in regions:
            self._pad(model, region, padded, consts, names)
            entries.append(Entry.of(node, "padded", channels=[region.c, padded],
                                    convs=len(region.sources | region.sinks | region.depthwise)))
        return RewriteResult.of(model, self, entries)

    # ---- finding a region
    @staticmethod
    def _conv_weight(node: ir.Node, consts: Constants) -> np.ndarray | None:
        """The constant rank-4 weight of a Conv (None when it is not one or the weight is computed)."""
        if not is_onnx_op(node, "Conv") or len(node.inputs) < 2:
            return None
        w = consts.get(node.inputs[1])
        if w is None or w.ndim != 4 or (len(node.inputs) > 2 and node.inputs[2] is not None
                                       and consts.get(node.inputs[2]) is None):
            return None
        return w

    def _is_depthwise(self, node: ir.Node, c: int, consts: Constants) -> bool:
        w = self._conv_weight(node, consts)
        return w is not None and attr_int(node, "group", 1) == c and w.shape[:2] == (c, 1)

    def _grow(self, start: ir.Node, c: int, consts: Constants) -> tuple[_Region, str | None]:
        """The region of ``start``'s output, and why it cannot be padded (None when it can)."""
        region = _Region(c)
        region.sources.add(start)
        todo = [start.outputs[0]]
        why = None
        while todo:
            v = todo.pop()
            if v in region.values:
                continue
            region.values.add(v)
            if why is not None:
                continue               # keep collecting the tensors (so no other source re-grows them)
            if v.is_graph_output():
                why = f"{v.name!r} is a graph output"
                continue
            p = v.producer()
            why = self._enter(p, v, c, consts, region, todo) if p is not None else f"{v.name!r} is a graph input"
            for use in list(v.uses()) if why is None else ():
                why = self._enter(use.node, v, c, consts, region, todo, index=use.idx)
                if why is not None:
                    break
        return region, why

    def _enter(self, node: ir.Node, v: ir.Value, c: int, consts: Constants, region: _Region, todo: list,
               index: int | None = None) -> str | None:
        """Add ``node`` (the producer of ``v``, or with ``index`` a consumer reading it there) to the region,
        queueing the region tensors it touches; the reason it cannot be in one, else None."""
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op == "Conv" and not self._is_depthwise(node, c, consts):
            # a conv with one group is a source (it writes the region), a sink (it reads it), or both (a
            # C -> C conv inside the region: padded on both weight axes)
            w = self._conv_weight(node, consts)
            if w is None:
                return f"{node_label(node)} has a weight computed at run time"
            if attr_int(node, "group", 1) != 1:
                return f"{node_label(node)} is a grouped conv"
            if index is None:
                if w.shape[0] != c:
                    return f"{node_label(node)} has {w.shape[0]} filters, not {c}"
                region.sources.add(node)
            else:
                if index != 0 or w.shape[1] != c:
                    return f"{node_label(node)} reads a region tensor as something other than its {c}-channel input"
                region.sinks.add(node)
            return None
        if node in region.nodes:
            return None
        if op == "Conv":                              # depthwise
            if index not in (None, 0):
                return f"{node_label(node)} reads a region tensor as its weight"
            region.depthwise.add(node)
            region.nodes.add(node)
            todo.append(node.inputs[0])
            todo.append(node.outputs[0])
            return None
        if op in _UNARY:
            if index not in (None, 0):
                return f"{node_label(node)} reads a region tensor as a parameter"
            region.nodes.add(node)
            todo.append(node.inputs[0])
            todo.append(node.outputs[0])
            return None
        if op in _BINARY:
            for k, inp in enumerate(node.inputs[:2]):
                if inp is None:
                    return f"{node_label(node)} has a missing input"
                arr = consts.get(inp)                  # None: computed, so a region tensor too
                if arr is None:
                    todo.append(inp)
                    continue
                if arr.ndim > 4 or any(d != 1 for d in arr.shape[:-3]) or \
                        any(d != 1 for d in arr.shape[-2:]) or (arr.ndim >= 3 and arr.shape[-3] not in (1, c)):
                    return f"{node_label(node)} has a constant {list(arr.shape)} that is not per channel"
                if arr.ndim >= 3 and arr.shape[-3] == c:
                    region.constants.append((node, k))
            region.nodes.add(node)
            todo.append(node.outputs[0])
            return None
        return f"{node_label(node)} is not a conv or an element-wise operator"

    # ---- padding it
    def _pad(self, model: ir.Model, region: _Region, padded: int, consts: Constants, names: Names) -> None:
        graph, extra = model.graph, padded - region.c
        old: list[ir.Value] = []

        def replace(node: ir.Node, k: int, arr: np.ndarray, base: str) -> None:
            old.append(node.inputs[k])
            value = add_initializer(graph, model, names, f"{base}_padded", np.ascontiguousarray(arr))
            node.replace_input_with(k, value)

        for node in region.sources | region.sinks | region.depthwise:
            w = consts.get(node.inputs[1])
            pads = [(0, 0)] * 4
            if node in region.sources or node in region.depthwise:
                pads[0] = (0, extra)
            if node in region.sinks:
                pads[1] = (0, extra)
            replace(node, 1, np.pad(w, pads), node.inputs[1].name or "w")
            if pads[0][1] and len(node.inputs) > 2 and node.inputs[2] is not None:
                replace(node, 2, np.pad(consts.get(node.inputs[2]), (0, extra)), node.inputs[2].name or "b")
            if node in region.depthwise:
                node.attributes["group"] = ir.AttrInt64("group", padded)
        for node, k in region.constants:
            arr = consts.get(node.inputs[k])
            pads = [(0, 0)] * arr.ndim
            pads[arr.ndim - 3] = (0, extra)
            replace(node, k, np.pad(arr, pads), node.inputs[k].name or "const")
        for v in region.values:                          # their channel count changed: let TVM infer it
            v.shape = None
        remove_orphans(old, model, consts)
