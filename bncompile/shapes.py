"""The one ``--input-shape`` grammar, shared by every command (re-exported by :mod:`bncompile.onnx_utils`).

A shape is dimensions separated by ``,`` (``x`` also separates numbers and dynamic words:
``8x32x32x16``); empty items are skipped, so ``x=`` is a scalar. A dimension is

* a non-negative integer;
* dynamic (``None``): ``?`` or ``-1``, and ``N``, ``n``, ``None``, ``batch`` where the command takes
  no named dimensions;
* named (a ``str``, compile only): any other word of letters, digits and ``_``, kept as the name of
  the dimension (``N`` and ``batch`` too).

:func:`parse_input_shapes` reads ``NAME=DIMS`` items (the name is what precedes the last ``=``);
:func:`parse_shape` reads DIMS alone (``bncompile build``). The flags ``dynamic`` and ``named`` say
what the command can take; everything else is refused with one line naming the problem and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bncompile.errors import InputError

#: words read as a dynamic dimension where named dimensions are not taken
DYNAMIC_WORDS = ("N", "n", "None", "batch")

_INT = re.compile(r"[+-]?[0-9]+")
_WORD = re.compile(r"[A-Za-z0-9_]+")
_DIM = r"(?:[0-9]+|-1|\?|N|n|None|batch)"
_X_SEPARATED = re.compile(rf"{_DIM}(?:x{_DIM})+")

_EXAMPLE = "e.g. x=1,3,224,224"

#: the largest dimension the grammar takes (ONNX runtimes index with int32 in places; larger is a typo)
MAX_DIM = 2**31 - 1


def _items(text: str) -> list[str]:
    items = []
    for item in text.split(","):
        item = item.strip()
        if _X_SEPARATED.fullmatch(item):
            items.extend(item.split("x"))
        elif item:
            items.append(item)
    return items


def parse_shape(text: str, *, dynamic: bool = True, named: bool = False, spec: str | None = None,
                example: str = "e.g. 8,32,32,16 or N,32,32,16") -> list[int | str | None]:
    """``"N,32,32,16"`` -> ``[None, 32, 32, 16]`` (see the module docstring for the grammar).

    ``dynamic``: ``?``, ``-1`` (and the dynamic words) are allowed, as ``None``; ``named``: other
    words are allowed, as ``str``. ``spec`` is the whole argument, named in errors.
    """
    spec = text if spec is None else spec
    dims: list[int | str | None] = []
    for item in _items(str(text)):
        if _INT.fullmatch(item):
            value = int(item)
            if value > MAX_DIM:
                raise InputError(f"--input-shape {spec!r}: dimension {value} is larger than 2^31-1: "
                                 f"give a real size, {example}")
            if value >= 0:
                dims.append(value)
                continue
            if value == -1 and dynamic:
                dims.append(None)
                continue
            fix = ("give a non-negative size, or -1, ? or N for a dynamic one" if dynamic
                   else "give a non-negative size")
            raise InputError(f"--input-shape {spec!r}: dimension {value} is negative: {fix}, {example}")
        if item == "?" and dynamic:
            dims.append(None)
        elif named and _WORD.fullmatch(item):
            dims.append(item)
        elif item in DYNAMIC_WORDS and dynamic:
            dims.append(None)
        elif not dynamic and (item == "?" or _WORD.fullmatch(item)):
            raise InputError(f"--input-shape {spec!r}: dimension {item!r} is not a number; this command "
                             f"needs every size, {example}")
        else:
            raise InputError(f"--input-shape {spec!r}: {item!r} is not a dimension; use {example}")
    return dims


def parse_input_shapes(specs: Sequence[str] | None, *, dynamic: bool = False, named: bool = False
                       ) -> dict[str, tuple]:
    """Parse ``["x=1,3,224,224", ...]`` into ``{"x": (1, 3, 224, 224)}``.

    By default every dimension must be a number (fold, bench); compile passes ``dynamic=True,
    named=True`` (``None`` for ``?``/``-1``, a ``str`` for a named dimension).
    """
    shapes: dict[str, tuple] = {}
    for spec in specs or ():
        name, sep, dims = str(spec).rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"--input-shape {spec!r}: expected NAME=D1,D2,..., {_EXAMPLE}")
        shapes[name] = tuple(parse_shape(dims, dynamic=dynamic, named=named, spec=spec, example=_EXAMPLE))
    return shapes


__all__ = ["DYNAMIC_WORDS", "parse_input_shapes", "parse_shape"]
