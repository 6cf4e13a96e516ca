"""Helpers shared by the per-target schedule rules of the batch-normalization kernels."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from bncompile.lower import tvm as _tvm
from bncompile.lower.kernels.compute import KernelSpec

log = logging.getLogger(__name__)

Rule = Callable[[KernelSpec, object], object]

REDUCTIONS = ("sum", "sqsum")
CUDA_THREADS = 256
H100_SMS = 132


def _divisor(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is <= ``limit`` (1 when n is not a static int)."""
    if not isinstance(n, int):
        return 1
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


#: the narrowest whole vector register of float32 lanes (AVX2's; half of AVX-512's)
MIN_REGISTER_LANES = 8


def _vector_factor(n: int, lanes: int = 16) -> int:
    """A vector width for a loop of ``n``: a multiple of ``lanes`` dividing n when one exists, else the
    largest multiple of :data:`MIN_REGISTER_LANES` <= 2*lanes dividing n, else the largest divisor <= 2*lanes.
    (A ragged width costs a masked register per vector: (N, C) with C = 1000 walked 25-channel vectors at
    0.75x the speed of 8-channel ones, C = 200 at 0.59x; AMD EPYC znver4, AVX-512, training forward.)"""
    if not isinstance(n, int):
        return 1
    for f in (4 * lanes, 2 * lanes, lanes):
        if n % f == 0 and n >= f:
            return f
    whole = [f for f in range(MIN_REGISTER_LANES, 2 * lanes + 1, MIN_REGISTER_LANES) if n % f == 0]
    return whole[-1] if whole else _divisor(n, 2 * lanes)


def _blocks(sch) -> list[str]:
    """Names of the blocks of the function, in program order."""
    root = sch.get_sblock("root") if _has_block(sch, "root") else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    return [sch.get(b).name_hint for b in blocks]


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


def _sched(func):
    return _tvm.s_tir().Schedule(func)


def _inline_parameter_only(sch, names: list[str], keep=("shift",)) -> list[str]:
    """Inline the blocks that read only function inputs (``bias_c`` without renorm, ``renorm_inv_s``).

    Moved under a channel loop, such a block would be computed for every channel at each iteration
    (its region is not tied to the loop), dragging its consumers along. Returns the remaining names.
    """
    out = []
    for n in names:
        blk = sch.get_sblock(n)
        if n not in keep and not sch.get_producers(blk):
            try:
                sch.compute_inline(blk)
                continue
            except Exception:  # an output block: leave it
                pass
        out.append(n)
    return out


def vectorize_across_group(sch, blocks, group: int, depth: int = 2) -> None:
    """Vectorize each of ``blocks`` (per-statistic work under a task's loops: ``depth`` loops, e.g. the
    task's and ghost BN's group loop) across the task's ``group`` channels, their loop moved innermost.
    The loops below follow the block's iters, (c, g') or, for a lane reduction, (lane, c, g'): the channel
    loop is the last one of the group's extent (the lanes may have the same extent)."""
    for b in blocks:
        lps = sch.get_loops(b)[depth:]
        ext = [int(sch.get(lp).extent) for lp in lps]
        k = len(ext) - 1 - ext[::-1].index(group)
        sch.reorder(*[lp for i, lp in enumerate(lps) if i != k], lps[k])
        sch.vectorize(lps[k])


# --------------------------------------------------------------------------- CPU


PREFETCH_ANNOTATION = "bncompile_prefetch_x"   # a loop whose x (and dy) loads prefetch (cpu.prefetch_pass)
GHOST_STRIPE_MAX_FLOATS = 256      # a ghost stripe's row segment: at most 1 KB
GHOST_WALK_MAX_VALUES = 32         # the stripe walk's short groups: values per channel and group


def ghost_stripe_width(C: int, vec: int, cpus: int) -> int:
    """Channels per ghost stripe: the widest multiple of ``vec`` dividing ``C``, at most
    :data:`GHOST_STRIPE_MAX_FLOATS`, that still leaves two stripes per CPU (else ``vec``)."""
    best = vec
    for w in range(vec, min(C, GHOST_STRIPE_MAX_FLOATS) + 1, vec):
        if C % w == 0 and C // w >= 2 * cpus:
            best = w
    return best


def host_cpus() -> int:
    """The CPUs this process may run on (the parallel tasks a stripe split should at least cover)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ghost_stripe_schedule(spec: KernelSpec, func, lanes: int, per_group: Callable, over_groups: Sequence,
                          out: str, prefetch: str, *, cpus: int | None = None):
    """The schedule of :func:`ghost_stripe_walk` for ``func`` (``per_group(names)``: the per-group
    blocks among the remaining block names), or None where it does not apply (C not a multiple of the
    vector, or a block TVM will not move under the stripe: the caller's other rule then)."""
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    try:
        done = ghost_stripe_walk(sch, spec, names, per_group(names), [b for b in over_groups if b in names],
                                 out, lanes, cpus=cpus, prefetch=prefetch)
    except Exception as err:  # noqa: BLE001 - a block that cannot follow the stripe
        log.debug("ghost stripe walk not applied (%s)", str(err).splitlines()[0] if str(err) else err)
        return None
    return sch if done else None


def ghost_stripe_walk(sch, spec: KernelSpec, names: list, per_group: list, over_groups: list, out: str,
                      lanes: int, *, cpus: int | None = None, prefetch: str | None = None) -> bool:
    """Ghost BN channels-last (x viewed as (v, G, P, C, Q=1)), short groups: one parallel task per stripe
    of W contiguous channels walks every group in turn; per vector of the stripe's channels it computes
    the ``per_group`` blocks (the group's statistics, loops c, g | rows), the output ``out`` (x's loops)
    and adds the group's terms to the ``over_groups`` sums (loops c, g: reductions over the groups, here
    bound to the task's group loop: no partial sums to merge); the remaining blocks of ``names`` (the
    per-channel finish) follow in the task. The rows of a group are unrolled, so LLVM loads each x (and
    dy) row once and keeps the group's per-channel values in registers. ``prefetch``: a reduction block
    whose first loop gets the prefetch annotation of the next group's rows. False (nothing changed
    worth keeping: the caller starts over) when C is not a multiple of the vector.

    Why not a task per chunk of groups (whole rows, partial sums per chunk): with a free batch the
    chunk split is predicated, and TVM 0.27's reverse_compute_at then bounds the in-chunk index of the
    partial sums by the *last* chunk's (``g % S <= (G - 1) % S``), dropping groups of every chunk."""
    C = int(spec.channel_shape[0])
    vec = 2 * lanes if C % (2 * lanes) == 0 else lanes if C % lanes == 0 else None
    if vec is None or not all(b in names for b in over_groups):
        return False
    W = ghost_stripe_width(C, vec, cpus or host_cpus())
    c, g = sch.get_loops("shift")
    cs, cw = sch.split(c, [None, W])
    cv, ci = sch.split(cw, [None, vec])
    sch.reorder(cs, g, cv, ci)
    sch.parallel(cs)
    for b in list(per_group) + [out] + list(over_groups):
        sch.reverse_compute_at(sch.get_sblock(b), cv, preserve_unit_loops=True)
    for b in over_groups:
        sch.decompose_reduction(sch.get_sblock(b), g)
    for b in names:
        if b not in per_group and b not in over_groups and b not in ("shift", out):
            sch.reverse_compute_at(sch.get_sblock(b), cs, preserve_unit_loops=True)
    sch.vectorize(ci)
    cpos = spec.kinds.index("C")
    for b in list(per_group) + [out]:
        blk = sch.get_sblock(b)
        reduction = sch.get(blk).init is not None
        loops = sch.get_loops(blk)[3:]          # cs, g, cv | the block's own: its channel loop at cpos
        k = cpos if b == out else 0
        cl, others = loops[k], loops[:k] + loops[k + 1:]
        if others:
            sch.reorder(*others, cl)
        sch.vectorize(cl)
        if reduction:
            sch.decompose_reduction(blk, others[0] if others else cl)
        for lp in others:
            if int(sch.get(lp).extent) > 1:
                sch.unroll(lp)
    if prefetch:
        row = int(spec.shape[2]) * C * int(spec.shape[4])
        sch.annotate(sch.get_loops(prefetch + "_update")[3], PREFETCH_ANNOTATION, row)
    return True


def _channel_vectors_over_groups(sch, blocks, names, cv: int) -> None:
    """Reductions over the groups of a ghost batch (blocks with loops c, g, those of ``blocks`` present in
    ``names``) as parallel tasks of ``cv`` channels walking the groups, the channels innermost
    (vectorized: the per-group terms are stored group-major)."""
    for b in blocks:
        if b not in names:
            continue
        c, g = sch.get_loops(b)
        co, ci = sch.split(c, [None, cv])
        sch.reorder(co, g, ci)
        sch.parallel(co)
        sch.vectorize(ci)
        sch.decompose_reduction(sch.get_sblock(b), g)


def _per_sample_partials(sch, block, C: int, cv: int, *, row_major: bool = False) -> None:
    """Channels-last reduction ``block`` (loops c, n, p, q) as per-sample partial sums (rfactor over n),
    parallel over the samples, vectorized over ``cv`` contiguous channels. By default a sample's rows
    are walked once per stripe of ``cv`` channels; ``row_major`` walks them once, every stripe of a row
    in turn (memory order: a sample larger than the caches is read once, not once per stripe; the
    backward's choice, measured 20-30% faster on 2 threads for NHWC 32x56x56x64 on AVX2 and
    32x28x28x128 on AVX-512)."""
    c, n, p, q = sch.get_loops(block)
    rf = sch.rfactor(n, factor_axis=0)            # partial sums per sample: <block>_rf[n, c]
    c, n, p, q = sch.get_loops(rf)
    if cv < C:
        co, ci = sch.split(c, [None, cv])
        sch.reorder(*((n, p, q, co, ci) if row_major else (n, co, p, q, ci)))
    else:
        sch.reorder(n, p, q, c)
        ci = c
    sch.parallel(n)
    sch.vectorize(ci)
    sch.decompose_reduction(rf, sch.get_loops(rf)[1] if cv == C or row_major else sch.get_loops(rf)[2])


def _vectorize_channels(sch, c, q, C: int, cv: int) -> None:
    """Vectorize the contiguous channel loop ``c`` (of extent ``C``) by ``cv``, under the loop ``q``."""
    if cv < C:
        co, ci = sch.split(c, [None, cv])
        sch.reorder(co, q, ci)
    else:
        sch.reorder(q, c)
        ci = c
    sch.vectorize(ci)


def _rows_pass(sch, block: str, P: int, C: int, cv: int, task_bytes: int) -> None:
    """A channels-last element-wise pass ``block`` (loops n, p, c, q) parallel over blocks of rows (a
    divisor of P, so the split is exact even for a symbolic batch) of about ``task_bytes`` each,
    vectorized across the channels."""
    n, p, c, q = sch.get_loops(block)
    rows = sch.fuse(n, p)
    chunk = _divisor(P, max(1, task_bytes // (4 * C)))
    if chunk > 1:
        rows, _ = sch.split(rows, [None, chunk])
    sch.parallel(rows)
    _vectorize_channels(sch, c, q, C, cv)
