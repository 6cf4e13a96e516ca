"""CPU (``llvm``) schedule rules of the backward kernels (:mod:`bncompile.lower.kernels.backward`).

A rule is ``rule(spec, func) -> Schedule | None`` like the forward's; the dispatch
(:func:`bncompile.lower.kernels.schedules.schedule_backward`) calls it inside the target's scope, so
the vector width comes from the target (:func:`bncompile.lower.graph_schedules.vector_lanes`), and the
cache sizes from the OS (:func:`cache_sizes`, the forward rules' machine model). The backward reads x and dy once for its reductions
(one pass, four compensated sums per channel) and once for dx; the rules keep the second read in cache
where the cache allows:

* ``bwd_cpu_channel_first`` (x viewed as (N, P, C, Q) with Q > 1, e.g. NCHW; ghost too): one parallel
  task per channel reduces the channel's slab, computes its scalars and writes its dx. A slab (x and dy)
  that fits L2 is read from memory once; a larger one is re-read, but the reduction walks the batch
  backwards (backward.py), so the dx pass starts on the part L2 still holds. Vectorized along Q:
  when Q has a vector factor L >= 8, through the blocked reduction (backward.py ``stat_lanes = L``:
  plain lane sums over M <= 64 elements per lane in registers, folded into compensated per-lane
  totals once per block; ~5 vector ops per L elements instead of ~20 for four compensated sums);
  else per-lane compensated partial sums through rfactor.
* ``bwd_cpu_channels_last`` (Q == 1, e.g. NHWC, (N, C)): when a stripe of channels over every row (x
  and dy) fits half of L2, one parallel task per stripe reduces it and writes its dx while cached;
  one row per sample ((N, C), at least 4 vectors of channels) otherwise: row blocks
  (:func:`_channels_last_row_blocks`: plain sums of 32-row blocks read in memory order, a serial
  combine, dx parallel over the same rows); a sample of few rows (also with a symbolic batch:
  per-sample partials would outweigh x): stripes; otherwise per-sample partial sums (parallel over the batch, each sample's rows walked once in
  memory order, every channel stripe of a row in turn), a serial combine, and a dx pass
  parallel over row blocks (x and dy are then read twice: the reductions must end before any dx).
  Vectorized across the contiguous channels.
  Ghost BN channels-last (x viewed as (v, G, P, C, 1)): short groups without renorm (at most
  GHOST_WALK_MAX_VALUES values per channel and group) one parallel task per stripe of channels walking
  every group (:func:`_ghost_stripe_walk`; NC 256x1024 v = 4 on AVX2: 0.79 of the next schedule's time);
  otherwise one parallel task per group and stripe of
  channels (its v*P rows: dx from cache where they fit L2, else x and dy read twice; with renorm, whose
  r and d need every group, the dx pass is a second set of tasks). A group of at most LANE_BLOCK values
  (ghost (N, C): v values) sums them in plain float32 (backward.py, ``stat_plain_m2``): four compensated
  sums of four values cost more than everything else (AVX2 NC 256x1024 ghost: bwd/floor 1.14 -> 0.77).
* ``bwd_cpu_generic`` (axis lists, inference): the outer loop of every block in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from bncompile.lower.kernels.backward import LANE_BLOCK
from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules.machine import cpu_machine
from bncompile.lower.kernels.schedules._common import (GHOST_WALK_MAX_VALUES, _channel_vectors_over_groups, _per_sample_partials, ghost_stripe_schedule, _rows_pass, _blocks, _inline_parameter_only, _sched,
                                                      _vector_factor, _vectorize_channels, vectorize_across_group)

Y_TASK_BYTES = 128 * 1024
PARTIALS_MIN_ROWS = 64          # channels-last: below this many rows per sample, stripes beat per-sample partials


@functools.lru_cache(maxsize=None)
def cache_sizes() -> dict[int, int]:
    """``{level: bytes}`` of the data caches one thread can count on: the forward rules' machine model
    (:func:`bncompile.lower.kernels.schedules.machine.cpu_machine`: the OS's sizes, the
    ``BNCOMPILE_CPU_CACHES`` override, or safe defaults)."""
    m = cpu_machine()
    return {1: m.l1d, 2: m.l2, 3: m.l3}


def l2_bytes() -> int:
    return cpu_machine().l2


def lanes() -> int:
    """float32 lanes of the current target's vectors (inside ``with target``)."""
    from bncompile.lower.graph_schedules import vector_lanes

    return vector_lanes()[0]


def _itemsize(spec: KernelSpec) -> int:
    return 4 if spec.dtype == "float32" else 2


def _move_all_under(sch, loop, names, skip=()):
    for b in names:
        if b in skip:
            continue
        sch.reverse_compute_at(sch.get_sblock(b), loop, preserve_unit_loops=True)


def bwd_cpu_channel_first(spec: KernelSpec, func):
    if not spec.training or not spec.single_channel_run or spec.shape[-1] == 1:
        return None
    q = int(spec.shape[-1])
    vec = _vector_factor(q, lanes())
    from bncompile.lower.kernels.schedules.cpu import channel_group, ragged_stat_lanes, y_run_lanes

    mach = dataclasses.replace(cpu_machine(), lanes=lanes())     # the target's lanes (inside ``with target``)
    stat = (BWD_RAGGED_LANES and (BWD_GHOST_LANES or not spec.ghost) and ragged_stat_lanes(q, mach)) or vec
    if stat >= 8:
        from bncompile.lower.kernels.backward import backward_prim_func
        from bncompile.lower.kernels.compute import SYMBOLIC

        bspec = dataclasses.replace(spec, stat_block=1, stat_lanes=stat)
        group = 1
        if BWD_CHANNEL_GROUPS and (BWD_GHOST_LANES or not spec.ghost):
            if spec.ghost:          # (v, G, P, C, Q): a channel's slabs hold the whole batch
                v, G, P, C, Q = spec.shape
                N = SYMBOLIC if G == SYMBOLIC else v * G
            else:
                N, P, C, Q = spec.shape
            group = channel_group(int(C), int(P) * int(Q), N, mach)
        run = BWD_DX_RUNS and y_run_lanes(spec, group, vec, mach)
        if run:
            bspec = dataclasses.replace(bspec, y_expand=True)
        return _channel_first_blocked(bspec, backward_prim_func(bspec), group=group, dx_lanes=run or vec)
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nstat = 2 if spec.ghost else 1
    if vec > 1:
        _, qi = sch.split(sch.get_loops("red")[-1], [None, vec])
        sch.rfactor(qi, factor_axis=nstat)
    c = sch.get_loops("shift")[0]
    movers = (["red_rf"] if vec > 1 else []) + [n for n in names if n != "shift"]
    _move_all_under(sch, c, movers)
    sch.parallel(c)
    rf = "red_rf" if vec > 1 else "red"
    loops = sch.get_loops(rf)
    if vec > 1:
        # after the move the loops follow the block iters: c | q_inner, c', [g'], reduce...
        sch.reorder(*loops[2:], loops[1])
        loops = sch.get_loops(rf)
        sch.vectorize(loops[-1])
    sch.decompose_reduction(sch.get_sblock(rf), loops[1 + nstat])
    if vec > 1:
        _, di = sch.split(sch.get_loops("dx")[-1], [None, vec])
        sch.vectorize(di)
    return sch


# tasks of several adjacent channels for rows under 3 KB, as the forward (cpu.channel_group; its L2 bound
# counts x's slabs, dx re-reads x's and dy's). Measured (bench_kernels' backward, 20 settled rounds, AMD
# EPYC znver4, AVX-512, two runs each): NCHW 64x256x14x14 3.73-4.00 -> 2.08-2.11 ms (2.4 -> 1.34-1.44x
# the floor), 32x128x17x17 1.34-1.37 -> 1.08-1.11 ms
BWD_CHANNEL_GROUPS = True
# ragged statistics lanes as the forward's (cpu.ragged_stat_lanes; backward.py's _blocked_red): 64x512x7x7
# 1.77 -> 1.20 ms (2.0 -> 1.48x the floor), 64x256x14x14 2.15 -> 1.88 ms (same rounds as above)
BWD_RAGGED_LANES = True
# ghost BN as plain BN (ragged lanes, channel groups) with the group loop outside each group's statistics
# and, without renorm, its dx (_channel_first_blocked). Measured (run_backward_benchmark, 15 settled rounds,
# AMD EPYC znver4, AVX-512), ghost (v = 4) backward / floor, before -> after: NCHW 64x256x14x14 2.68-3.44 ->
# 1.70 (plain 1.43-1.47), 64x512x7x7 3.38 -> 1.65 (plain 1.50), 32x64x56x56 1.06 -> 1.02, 64x128x28x28
# 1.19 -> 1.07; without the group loop 14x14 1.87, 7x7 2.78; without the vectors across channels 1.80, 1.88
BWD_GHOST_LANES = True
# dx of channel groups in runs across the group's rows, as the forward's y (cpu.y_run_lanes). Measured
# (run_backward_benchmark, 15 settled rounds, znver4), backward / floor before -> after: NCHW 64x512x7x7 plain
# 1.54 -> 1.13, ghost 1.78 -> 1.46; 64x256x14x14 plain 1.32 -> 0.95, ghost 1.31 -> 1.09
BWD_DX_RUNS = True


def _channel_first_blocked(spec: KernelSpec, func, *, group: int = 1, dx_lanes: int = 0):
    """bwd_cpu_channel_first on the blocked reduction (backward.py, ``stat_lanes = L``): per channel
    (one parallel task), each row chunk of M*L elements gets its plain lane sums in registers (block
    ``bsum``, vectorized over the L lanes, FMAs), folded into the compensated per-lane totals
    (``red_rf``, vectorized over the lanes) once per chunk; then the channel's scalars and its dx,
    while the slab is in L2. ``group`` > 1: a task per ``group`` adjacent channels whose statistics
    walk each sample's rows of the group in one run (``cpu.channel_group``). Ghost BN: a loop over the
    groups under the task holds each group's blocks, scalars and (without renorm) dx."""
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nstat = 2 if spec.ghost else 1
    sch.rfactor(sch.get_loops("red")[-1], factor_axis=nstat)      # red_rf[s..., l]
    sch.compute_inline(sch.get_sblock("shift"))  # one load of x[0, .., c, 0] where it is used
    loops = sch.get_loops("red_rf")       # c, [g], lead..., qb, l  (l spatial)
    sch.compute_at(sch.get_sblock("bsum"), loops[-2], preserve_unit_loops=True)
    c = loops[0]
    g = loops[1] if spec.ghost else None
    if group > 1:
        loops = sch.get_loops("red_rf")   # c, [g], lead..., qb, l
        c, ci = sch.split(c, [None, group])
        sch.reorder(*loops[1:-2], ci)
    movers = [n for n in names if n not in ("shift", "bsum")]
    under_g = []
    if g is not None and BWD_GHOST_LANES:
        # ghost: a group's statistics, coefficients and, without renorm (r, d from every group), its dx and
        # share of dgamma / dbeta under the group loop: the task's buffers are sized by its channels
        per_group = {"red", "mean64", "mean", "var", "inv", "suxc", "batch_mean64", "batch_var"}
        if not spec.renorm:
            per_group |= {"coef_a", "coef_b", "coef_c", "dx_terms", "dx", "dgamma64", "dbeta64"}
        else:
            per_group |= {"dbeta64"}
        for b in movers:
            if b in per_group:
                sch.reverse_compute_at(sch.get_sblock(b), g, preserve_unit_loops=True)
                under_g.append(b)
            else:
                sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    else:
        _move_all_under(sch, c, movers)
    sch.parallel(c)
    if group > 1:   # ghost: a group's per-statistic work in vectors across the task's channels
        vectorize_across_group(sch, [b for b in under_g if b not in ("dx", "dx_terms")], group)
    sch.vectorize(sch.get_loops("red_rf")[-1])
    bl = sch.get_loops("bsum")            # ... qb | l, j
    sch.reorder(bl[-1], bl[-2])
    bl = sch.get_loops("bsum")
    sch.vectorize(bl[-1])
    sch.decompose_reduction(sch.get_sblock("bsum"), bl[-2])
    loops = sch.get_loops("red_rf")
    sch.decompose_reduction(sch.get_sblock("red_rf"), loops[nstat])
    dl = sch.get_loops("dx")
    if spec.y_expand:       # each sample's run of the task's group x Q values (contiguous), dx_lanes at a time
        _, di = sch.split(sch.fuse(dl[-2], dl[-1]), [None, dx_lanes])
    else:
        _, di = sch.split(dl[-1], [None, dx_lanes or int(spec.stat_lanes)])
    sch.vectorize(di)
    return sch


def bwd_cpu_channels_last(spec: KernelSpec, func):
    if not spec.training or not spec.single_channel_run or spec.shape[-1] != 1:
        return None
    C = int(spec.channel_shape[0])
    lw = lanes()
    cv = C if C <= 4 * lw else _vector_factor(C, lw)
    if spec.ghost:
        # whole rows per task where they fit 8 vectors (memory order: measured 25% faster on AVX2, C=64,
        # than two 32-channel stripes each walking the group's rows)
        return _ghost_channels_last_stripes(spec, func, C if C <= 8 * lw else cv)
    N, P = spec.shape[0], int(spec.shape[1])
    # stripes of cv channels over every row, one parallel task each: when a stripe (x and dy) fits half of
    # L2 (dx is then written from cache), or when per-sample partial sums (eight floats per channel and
    # sample) would outweigh a sample's rows and the channels give every core a task
    fits = isinstance(N, int) and 2 * N * P * cv * _itemsize(spec) <= l2_bytes() // 2
    if not fits and spec.kinds == "RRCR" and P * int(spec.shape[3]) == 1 and C >= 4 * lw:
        return _channels_last_row_blocks(spec, _vector_factor(C, lw))
    if fits or (P < PARTIALS_MIN_ROWS and C // cv >= (os.cpu_count() or 1)):
        return _channels_last_stripes(spec, func, cv)
    return _channels_last_partials(spec, func, cv)


ROW_BLOCK = 32          # samples per row block of _channels_last_row_blocks (plain sums: <= LANE_BLOCK values)


def _channels_last_row_blocks(spec: KernelSpec, cv: int):
    """Channels-last with one value per sample and channel ((N, C)) on row blocks (backward.py
    ``stat_rows``): parallel over blocks of :data:`ROW_BLOCK` samples, each block's plain sums taken
    row by row in memory order (vectorized across the channels, ``cv`` at a time; the block's sums stay
    in L1), a serial combine of the blocks (compensated) and of the per-channel scalars, then dx parallel
    over the rows: the runtime splits both parallel loops in contiguous halves, so a task re-reads the
    rows it reduced (from its own L2 where they fit). One launch (the merged pipeline,
    :func:`nt_dx_pipeline`). Replaces stripes of channels over every row, whose column sweeps read
    rows 4 KB apart from memory with four compensated sums per element (measured on AMD EPYC znver4, 2
    cores, NC 256x1024, bwd/floor interleaved with onnxruntime: AVX2 1.2-1.5 -> 1.0-1.3, AVX-512 about
    even)."""
    import dataclasses

    from bncompile.lower.kernels.backward import backward_prim_func

    C = int(spec.channel_shape[0])
    bspec = dataclasses.replace(spec, stat_rows=ROW_BLOCK)
    sch = _sched(backward_prim_func(bspec))
    names = _inline_parameter_only(sch, _blocks(sch))
    nb, c, ri, rp, rq = sch.get_loops("bsum")
    co, ci = sch.split(c, [None, cv]) if cv < C else (None, c)
    sch.reorder(nb, ri, *([co] if co is not None else []), rp, rq, ci)
    sch.parallel(nb)
    sch.vectorize(ci)
    sch.decompose_reduction(sch.get_sblock("bsum"), ri)
    for b in names:
        if b in ("bsum", "dx"):
            continue
        loops = sch.get_loops(b)
        c, rest = loops[0], loops[1:]
        if cv < C:
            _, c = sch.split(c, [None, cv])
        if rest:
            sch.reorder(*rest, c)
        sch.vectorize(c)
        if b == "red":
            sch.decompose_reduction(sch.get_sblock(b), rest[0])
    n, p, c, q = sch.get_loops("dx")
    sch.parallel(sch.fuse(n, p))    # no split: a symbolic batch would need a predicate
    _vectorize_channels(sch, c, q, C, cv)
    return sch


def _channels_last_stripes(spec: KernelSpec, func, stripe: int):
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    co, _ = sch.split(sch.get_loops("shift")[0], [None, stripe])
    _move_all_under(sch, co, [n for n in names if n != "shift"])
    sch.parallel(co)
    loops = sch.get_loops("red")          # co | c_inner, n, p, q
    sch.reorder(*loops[2:], loops[1])
    loops = sch.get_loops("red")
    sch.vectorize(loops[-1])
    sch.decompose_reduction(sch.get_sblock("red"), loops[1])
    yl = sch.get_loops("dx")              # co | n, p, c_inner, q
    inner = yl[1:]
    cin = inner[2]
    sch.reorder(*[lp for lp in inner if not lp.same_as(cin)], cin)
    sch.vectorize(cin)
    return sch


_GROUP_SUMS = ("dgamma64", "dgamma", "dbeta64", "dbeta")    # sums over the groups: after every task
_OUTPUTS = ("dx", "dgamma", "dbeta")


def _ghost_channels_last_stripes(spec: KernelSpec, func, stripe: int):
    """Ghost BN channels-last, x viewed as (v, G, P, C, 1): one parallel task per (group, stripe of
    channels) reduces the group's v*P rows of its channels (vectorized across them) and writes their dx
    (from cache where the slab fits it; a group's rows must all be reduced before any of its dx, so a
    larger slab is read twice); then dgamma and dbeta sum the per-group terms. The tasks are the
    groups times the stripes, so a symbolic batch (G = N/v) still splits exactly. With renorm, r and d
    come from every group's statistics: the reductions run as those tasks, r and d per channel, then
    dx in tasks of its own (x and dy read twice)."""
    v, _, P, _, Q = spec.shape
    if v * P * Q <= LANE_BLOCK:       # short groups: plain group sums (backward.py)
        import dataclasses

        from bncompile.lower.kernels.backward import backward_prim_func

        func = backward_prim_func(dataclasses.replace(spec, stat_plain_m2=True))
    if GHOST_WALK and v * P * Q <= GHOST_WALK_MAX_VALUES and not spec.renorm:
        sch = _ghost_stripe_walk(spec, func)
        if sch is not None:
            return sch
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    for b in names:         # per-(channel, group) scalars stored group-major: a stripe's are contiguous
        blk = sch.get_sblock(b)
        for k, buf in enumerate(sch.get(blk).writes):
            if len(buf.region) == 2 and b not in _OUTPUTS:
                sch.transform_layout(blk, ("write", k), lambda c, g: (g, c))
    c, g = sch.get_loops("shift")
    co, ci = sch.split(c, [None, stripe])
    sch.reorder(g, co, ci)
    task = sch.fuse(g, co)
    per_group = [n for n in ("red", "mean64", "mean", "sqc", "var", "inv", "suxc") if n in names] if spec.renorm \
        else [n for n in names if n != "shift" and n not in _GROUP_SUMS]
    _move_all_under(sch, task, per_group)
    sch.parallel(task)
    sch.vectorize(ci)           # the shift of the stripe's channels (a scalar loop per task otherwise)
    for b in [b for b in ("red", "sqc") if b in names]:       # sqc: the centred pass of short groups
        loops = sch.get_loops(b)          # task | c_inner, g', v, p, q
        sch.reorder(*loops[2:], loops[1])
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[1])
    if spec.renorm:
        v, g, p, c, q = sch.get_loops("dx")
        co, ci = sch.split(c, [None, stripe])
        sch.reorder(g, co, v, p, q, ci)
        task2 = sch.fuse(g, co)
        sch.parallel(task2)
        sch.vectorize(ci)
        for b in ("coef_c", "coef_b", "coef_a"):
            sch.compute_at(sch.get_sblock(b), task2, preserve_unit_loops=True)
        return sch
    yl = sch.get_loops("dx")              # task | v, g', p, c_inner, q
    inner = yl[1:]
    cin = inner[3]
    sch.reorder(*[lp for lp in inner if not lp.same_as(cin)], cin)
    sch.vectorize(cin)
    _vectorize_stripe_scalars(sch, [n for n in per_group if n not in ("red", "sqc", "dx")], stripe)
    _group_sums_by_stripe(sch, names, stripe)
    return sch


GHOST_WALK = True      # short ghost groups without renorm: a task per stripe of channels walks every group


def _ghost_stripe_walk(spec: KernelSpec, func):
    """Ghost BN backward, channels last, short groups: a task per stripe of channels walks every group;
    per vector of channels the group's sums, its coefficients, its dx and its terms of dgamma and dbeta
    (:func:`~bncompile.lower.kernels.schedules._common.ghost_stripe_walk`). None where it does not apply."""
    def per_group(names):
        return [n for n in names if n not in ("shift", "dx") and n not in _GROUP_SUMS]

    return ghost_stripe_schedule(spec, func, lanes(), per_group, ("dgamma64", "dbeta64"), "dx", "red")


def _group_sums_by_stripe(sch, names, stripe: int) -> None:
    """dgamma and dbeta's sums over the groups (loops c, g) as stripe tasks walking the groups, the
    stripe's channels innermost (vectorized): the per-group terms are stored group-major."""
    _channel_vectors_over_groups(sch, ("dgamma64", "dbeta64"), names, stripe)


def _vectorize_stripe_scalars(sch, names, stripe: int) -> None:
    """Vectorize the per-(channel, group) scalar blocks moved under a stripe task across the stripe's
    channels (their loops: task | c_inner, g' with g' of extent 1): with few rows per group (ghost
    (N, C)) they are as many as a quarter of the elements."""
    for b in names:
        loops = sch.get_loops(b)[1:]
        cin = [lp for lp in loops if int(sch.get(lp).extent) == stripe]
        if len(cin) != 1:
            continue
        sch.reorder(*[lp for lp in loops if not lp.same_as(cin[0])], cin[0])
        sch.vectorize(cin[0])


def _channels_last_partials(spec: KernelSpec, func, cv: int):
    P, C = int(spec.shape[1]), int(spec.channel_shape[0])
    sch = _sched(func)
    _inline_parameter_only(sch, _blocks(sch))
    _per_sample_partials(sch, "red", C, cv, row_major=True)
    _rows_pass(sch, "dx", P, C, cv, Y_TASK_BYTES)
    return sch


STREAMING_RULES = ("bwd_cpu_channel_first", "bwd_cpu_channels_last")
NT_PIPELINE = "bncompile_nt_stores_dx"


def nt_dx_pipeline() -> str:
    """Register (once) and return the TIR pipeline writing dx with streaming stores (the forward's
    :func:`~bncompile.lower.kernels.schedules.cpu.nt_store_pass` on ``dx``): dx is written once, and an
    ordinary store would first read each line of it from memory and evict the slab of x and dy that the
    dx pass re-reads from cache (measured on NCHW/NHWC 32x64x56x56: 25-50% faster). Then the forward's
    :func:`~bncompile.lower.kernels.schedules.cpu.merge_parallel_pass`: a kernel's parallel loops run in
    one launch of the thread pool (one wake-up of a sleeping worker, ~14 us measured here, per call
    instead of one per loop); then its :func:`~bncompile.lower.kernels.schedules.cpu.stack_buffers_pass`."""
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.schedules.cpu import (merge_parallel_pass, nt_store_pass, prefetch_pass,
                                                       stack_buffers_pass)

    tvm = _tvm.tvm()
    cp = _tvm.submodule("tvm.tirx.compilation_pipeline")
    if NT_PIPELINE not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            base, fin_host, fin_dev = cp.get_tir_pipeline("s_tir", **kwargs)
            passes = [base, prefetch_pass(("x", "dy")), nt_store_pass(("dx",)), merge_parallel_pass(),
                      stack_buffers_pass()]
            return tvm.transform.Sequential(passes), fin_host, fin_dev

        tvm.tirx.register_tir_pipeline(NT_PIPELINE, factory)
    return NT_PIPELINE


CPU_PIPELINE = "bncompile_cpu_backward"


def cpu_pipeline() -> str:
    """Register (once) and return the TIR pipeline of the CPU backward kernels whose dx is stored
    normally (dx smaller than ``STREAMING_MIN_BYTES``, stays in cache for its reader):
    :func:`nt_dx_pipeline` without the streaming stores, so the kernel's parallel loops still run in one
    launch (before, only the streaming variant merged them: NC 256x1024 paid two wake-ups of a
    sleeping worker per call) and a schedule's prefetch annotations take effect."""
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.schedules.cpu import merge_parallel_pass, prefetch_pass, stack_buffers_pass

    tvm = _tvm.tvm()
    cp = _tvm.submodule("tvm.tirx.compilation_pipeline")
    if CPU_PIPELINE not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            base, fin_host, fin_dev = cp.get_tir_pipeline("s_tir", **kwargs)
            passes = [base, prefetch_pass(("x", "dy")), merge_parallel_pass(), stack_buffers_pass()]
            return tvm.transform.Sequential(passes), fin_host, fin_dev

        tvm.tirx.register_tir_pipeline(CPU_PIPELINE, factory)
    return CPU_PIPELINE


def bwd_cpu_generic(spec: KernelSpec, func):
    sch = _sched(func)
    for b in _blocks(sch):
        loops = sch.get_loops(b)
        blk = sch.get(sch.get_sblock(b))
        if loops and blk.iter_vars and int(blk.iter_vars[0].iter_type) == 0:
            sch.parallel(loops[0])
    return sch


RULES = [("bwd_cpu_channel_first", bwd_cpu_channel_first), ("bwd_cpu_channels_last", bwd_cpu_channels_last),
         ("bwd_cpu_generic", bwd_cpu_generic)]

__all__ = ["RULES", "STREAMING_RULES", "NT_PIPELINE", "nt_dx_pipeline", "cache_sizes", "l2_bytes", "lanes", "bwd_cpu_channel_first", "bwd_cpu_channels_last",
           "bwd_cpu_generic"]
