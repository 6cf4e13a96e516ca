"""The one result every bncompile pass returns: what it changed and what it left, entry by entry.

A :class:`RewriteResult` is an ``onnx_ir.passes.PassResult`` (``model``, ``modified``) with one
:class:`Entry` per node (or graph input) the pass looked at, in the order it looked at them. An
entry names the node (``op``, ``name``, ``label``), says what was done (``action``; ``"left"`` when
nothing was) and, for a node left, why (``reason``); ``detail`` holds what is particular to the pass
(the layer a BN was folded into, the shape given to an input...). ``node`` is the node object itself,
so that two passes' entries about one node can be matched by identity.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

__all__ = ["Entry", "RewriteResult", "LEFT"]

#: the action of an entry whose node the pass did not change
LEFT = "left"


@dataclasses.dataclass
class Entry:
    """One node (or graph input) a pass looked at."""

    op: str                          # op type, or "input" for a graph input
    name: str                        # "" when unnamed
    action: str                      # e.g. "folded", "decomposed", "inlined"; LEFT when unchanged
    reason: str | None = None        # why it was left (None when changed)
    detail: dict = dataclasses.field(default_factory=dict)
    node: ir.Node | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, node: ir.Node, action: str, reason: str | None = None, **detail) -> Entry:
        return cls(op=node.op_type, name=node.name or "", action=action, reason=reason,
                   detail=detail, node=node)

    @property
    def changed(self) -> bool:
        return self.action != LEFT

    @property
    def label(self) -> str:
        return f"{self.op} {self.name!r}" if self.name else f"{self.op} (unnamed)"


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """``PassResult`` plus the pass's entries (see the module docstring)."""

    pass_name: str = ""
    entries: list[Entry] = dataclasses.field(default_factory=list)
    detail: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: ir.Model, pass_: object, entries: list[Entry], *,
           modified: bool | None = None, **detail) -> RewriteResult:
        """The result of ``pass_``; ``modified`` defaults to "some entry changed"."""
        if modified is None:
            modified = any(e.changed for e in entries)
        return cls(model, modified, type(pass_).__name__, entries, detail)

    @property
    def changed(self) -> list[Entry]:
        return [e for e in self.entries if e.changed]

    @property
    def left(self) -> list[Entry]:
        return [e for e in self.entries if not e.changed]
