"""Reading the loop nests of a scheduled TIR script (``sch.mod.script()``) in tests."""

from __future__ import annotations

import re


def enclosing_loops(script: str, block: str) -> list[str]:
    """The ``for`` lines enclosing the first ``T.sblock(block)`` of a scheduled script, outermost first."""
    lines = script.splitlines()
    at = next(i for i, line in enumerate(lines) if f'T.sblock("{block}")' in line)
    indent, out = len(lines[at]) - len(lines[at].lstrip()), []
    for line in reversed(lines[:at]):
        ind = len(line) - len(line.lstrip())
        if ind < indent and line.lstrip().startswith("for "):
            out.append(line)
            indent = ind
    return out[::-1]


def loop_vars_of(script: str, block: str) -> list[str]:
    """The loop variables enclosing the first ``T.sblock(block)``, outermost first."""
    return [re.match(r"\s*for (.+?) in ", line).group(1) for line in enclosing_loops(script, block)]
