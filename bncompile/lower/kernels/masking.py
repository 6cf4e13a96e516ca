"""A value blended to a fill outside a condition, its load kept at its clamped (in-bounds) address.

The kernels read a border or a ragged tail as a load at a clamped index, always inside the buffer, blended
to zero (or another fill) where the true index falls outside: one basic block, no branch per load. Written
as ``Select(inside, x[clamped], fill)`` that is unsafe in TVM: its simplifier rewrites a Select's true value
under the Select's condition (``IRMutatorWithAnalyzer``), where the clamp is provably the identity, so the
clamp is dropped and the load reads outside the buffer (a Select evaluates both values). Found by placing a
depthwise conv's input right after an unreadable page: the 112x112 stride-2 conv of MobileNetV2 (AVX2 build)
read 3.6 KB before its input and crashed (tests/lower/test_guarded_reads.py). :func:`keep_where` blends with a
bit mask made from the condition by a cast instead: no Select, so nothing is simplified under the condition.
(Where the Select's lanes were a vector, batch norm's channels, TVM kept the clamp; one blend serves all.)
"""

from __future__ import annotations

import math

from bncompile.lower import tvm as _tvm


def keep_where(inside, value, fill=None):
    """``value`` where ``inside`` holds, else ``fill`` (zero when None), bit for bit, for a float ``value``
    whose loads are in bounds whatever ``inside`` is: the bits of ``value`` and'ed with ``-int(inside)``
    (all ones or zero), the fill's with its complement. Vectorizes to an and (and an or) per vector.
    ``inside``: a bool, or an integer of the value's width that is 0 or 1."""
    tvm = _tvm.tvm()
    tirx = tvm.tirx
    dtype = str(value.dtype if hasattr(value, "dtype") else value.ty)     # a TE slice / a PrimExpr (0.27)
    bits = tvm.DataType(dtype).bits
    itype = f"int{bits}"
    one = tirx.const(1, itype)
    # 1 or 0; an integer ``inside`` (0 or 1) is taken as it is: a comparison that varies across the lanes
    # of a vectorized loop is a bool vector, which TVM 0.27's host passes fail to bind (IntImm of boolx16)
    idtype = str(inside.dtype if hasattr(inside, "dtype") else inside.ty)
    keep = inside if idtype == itype else tirx.Cast(itype, inside)
    ones = tirx.const(0, itype) - keep                    # all ones inside, zero outside
    kept = tirx.reinterpret(itype, value) & ones
    if fill is None:
        return tirx.reinterpret(dtype, kept)
    if isinstance(fill, tirx.FloatImm):
        fill = float(fill.value)
    if isinstance(fill, (int, float)):
        if fill == 0 and math.copysign(1.0, fill) > 0:
            return tirx.reinterpret(dtype, kept)
        fill = tirx.const(fill, dtype)
    return tirx.reinterpret(dtype, kept | (tirx.reinterpret(itype, fill) & (keep - one)))
