"""CPU (``llvm``) schedule rules of the batch-normalization kernels, and x86 streaming stores of y
(see :mod:`bncompile.lower.kernels.schedules` for the rule contract and the list)."""

from __future__ import annotations

from bncompile.lower import tvm as _tvm
from bncompile.lower.kernels.compute import PLAIN_GROUP_MAX, PLAIN_M2_MAX, KernelSpec
from bncompile.lower.kernels.schedules._common import (PREFETCH_ANNOTATION, GHOST_WALK_MAX_VALUES, _channel_vectors_over_groups, _per_sample_partials, ghost_stripe_schedule, host_cpus, vectorize_across_group, _rows_pass, _vectorize_channels, REDUCTIONS, _blocks, _divisor, _inline_parameter_only, _sched,
                                                       _vector_factor, log, MIN_REGISTER_LANES)
from bncompile.lower.kernels.schedules.machine import CpuMachine, cpu_machine

# Every blocking constant below is derived from a CpuMachine (the target's vector lanes, the host's
# cache sizes; schedules/machine.py), never from one CPU:
#   * channel-first lane blocks of 4 x lanes floats (64 on AVX-512, 32 on AVX2, 16 on SSE/NEON): four
#     registers of independent accumulators per reduction (mcpu=haswell: 32 lanes were 24% faster than
#     64 on NCHW 32x64x56x56); vectors across channels (channels-last) of min(64, 8 x lanes) floats;
#   * channels-last statistics blocks of L2/4 bytes (two passes while the block is in L2): blocks of rows
#     of a sample (NHWC) or of whole samples ((N, C): sample blocks, vectors of 4 registers per channel
#     vector: 64 floats on AVX-512, 32 on AVX2, where 8 AVX2 registers spilled);
#   * channels-last y tasks of L2/8 bytes;
#   * channel-first: a channel's slab (N*P*Q floats) is reduced and normalised by one task while it
#     is in L2 when it fits in L2 (N <= L2 / (4*P*Q)); the next channel's rows are prefetched into L2
#     while its second statistics pass runs and y is written (rows of >= PREFETCH_MIN_ROW_BYTES), so the
#     statistics pass of that channel reads L2 instead of waiting on memory.
PREFETCH_MIN_ROW_BYTES = 1024


def _machine(machine: CpuMachine | None) -> CpuMachine:
    return machine if machine is not None else cpu_machine()


def _row_lanes(mach: CpuMachine) -> int:
    """The ``lanes`` argument of _vector_factor for vectors across channels (channels-last): vectors of
    min(64, 8 x lanes) floats, 8 registers on AVX2 and 4 on AVX-512 (measured with mcpu=haswell: 4 AVX2
    registers per row were 11-29% slower than 8 on NC 256x1024 and NHWC 32x56x56x64)."""
    return min(64, 8 * mach.lanes) // 4


def stat_block_floats(machine: CpuMachine | None = None) -> int:
    """Floats of x per channels-last statistics block: L2/4 bytes (65536 for a 1 MB L2)."""
    return max(1024, _machine(machine).l2 // 16)


def y_task_bytes(machine: CpuMachine | None = None) -> int:
    """Bytes of y per parallel task of the channels-last y pass: L2/8 (128 KB for a 1 MB L2)."""
    return max(16 * 1024, _machine(machine).l2 // 8)


def cpu_channel_first(spec: KernelSpec, func, machine: CpuMachine | None = None):
    if not spec.training or not spec.single_channel_run or spec.shape[-1] == 1:
        return None
    if spec.adjustment == "full" and spec.ghost:
        return None
    mach = _machine(machine)
    q = int(spec.shape[-1])
    vec = _vector_factor(q, mach.lanes)
    stat = ragged_stat_lanes(q, mach) or vec
    if (spec.kinds == "RRCR" or (spec.kinds == "RGRCR" and GHOST_LANES)) and stat >= 8:
        import dataclasses

        from bncompile.lower.kernels.compute import SYMBOLIC, prim_func

        if spec.ghost:              # (v, G, P, C, Q): the channel's slab holds the whole batch
            v, G, P, C, Q = spec.shape
            N = SYMBOLIC if G == SYMBOLIC else v * G
        else:
            N, P, C, Q = spec.shape
        plain = -(-Q // stat) <= PLAIN_M2_MAX
        bspec = dataclasses.replace(spec, stat_block=1, stat_lanes=stat, stat_plain_m2=plain)
        slab = 4 * int(P) * int(Q)                  # bytes of one sample of one channel
        if isinstance(N, int) and N * slab > mach.l2:
            log.info("cpu_channel_first: a channel's slab (%d KB) exceeds L2 (%d KB): y re-reads x from L3/memory",
                     N * slab >> 10, mach.l2 >> 10)
        group = channel_group(int(C), int(P) * int(Q), N, mach)
        y_run = y_run_lanes(spec, group, vec, mach)
        if y_run:
            bspec = dataclasses.replace(bspec, y_expand=True)
        return _channel_first_lanes(bspec, prim_func(bspec), prefetch=group * slab >= PREFETCH_MIN_ROW_BYTES,
                                    y_lanes=y_run or vec, group=group)
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nstat = 2 if spec.ghost else 1          # stat loops: (c) or (c, g)
    for b in REDUCTIONS:
        loops = sch.get_loops(b)
        if vec > 1:
            _, qi = sch.split(loops[-1], [None, vec])
            sch.rfactor(qi, factor_axis=nstat)
    c = sch.get_loops("shift")[0]
    movers = (["sum_rf"] if vec > 1 else []) + ["sum", "mean64", "mean"] + (["sqsum_rf"] if vec > 1 else []) + ["sqsum"]
    movers = [b for b in movers if b in names or b.endswith("_rf")]     # mean64: not with a power-of-two count
    movers += [n for n in names if n not in movers and n not in ("shift", "sum_rf", "sqsum_rf")]
    for b in movers:
        sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    rfs = ["sum_rf", "sqsum_rf"] if vec > 1 else list(REDUCTIONS)
    grouped = spec.ghost and GHOST_GROUP_PASSES
    if grouped:
        _ghost_group_passes(sch, names, vec > 1)
    sch.parallel(c)
    lead = 2 if grouped else 1                      # c [, g] | ...
    for rf in rfs:
        loops = sch.get_loops(rf)
        if vec > 1:
            # after reverse_compute_at the loops follow the block iters: c [g] | q_inner, c', [g'], reduce...
            qi = loops[lead]
            sch.reorder(*loops[lead + 1:], qi)
            loops = sch.get_loops(rf)
            sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(rf), loops[lead + nstat])
    yl = sch.get_loops("y")
    if vec > 1:
        yo, yi = sch.split(yl[-1], [None, vec])
        sch.vectorize(yi)
        if GHOST_PREFETCH and spec.ghost and 4 * q >= PREFETCH_MIN_ROW_BYTES:
            sch.annotate(yo, PREFETCH_ANNOTATION, q)     # the next channel's rows into L2, as _channel_first_lanes
            if GHOST_STATS_PREFETCH:
                sch.annotate(sch.get_loops("sqsum_rf_update")[lead + nstat], PREFETCH_ANNOTATION, q)
    return sch


# ghost BN channel first (A/B switches, measured in one process against plain, znver4, load 1.6-3.5; figures in
# the commit messages): a group's passes under the group loop, and the next channel's rows prefetched by y
# and by the second statistics pass (without any prefetch, each channel's first pass waited on memory)
GHOST_GROUP_PASSES = True
GHOST_PREFETCH = True
GHOST_STATS_PREFETCH = True
GHOST_ROW_PREFETCH = True
# ghost BN channel first on _channel_first_lanes (lane blocks, ragged lanes, channel groups, the group loop
# outside each group's statistics) wherever it applies to plain BN; else the generic rule below. Measured
# (2 threads, AMD EPYC znver4, AVX-512, L2 1 MB), ghost (v = 4) / plain: bench_kernels' settled rounds, inputs
# rotated, NCHW 64x256x14x14 1.58 -> 0.95-0.97, 64x512x7x7 1.67-1.80 -> 0.99-1.20; in-process A/B, x in
# cache, 16x512x7x7 free batch 1.72 -> 1.04-1.06 (with the group loop inside the task's statistics: 2.0,
# every per-group buffer a workspace allocation sized by the batch); 32x64x56x56, 64x128x28x28 unchanged
GHOST_LANES = True
GHOST_CHUNK_GROUPS = 8     # ghost channels-last: groups per partial sum of the averages (0: one sum over all)
GHOST_PLAIN_SUMS = True    # ghost channels-last: groups of at most PLAIN_GROUP_MAX (4) values summed in plain float32


def _ghost_group_passes(sch, names: list, rf: bool) -> None:
    """Ghost BN, channel first: under the channel loop, one iteration of the group loop g computes
    the group's statistics (sum, mean, centred sum of squares, scale) and, when y needs nothing from
    other groups (no renorm), the group's y: a group of one channel is v rows (v x Q floats, in L1
    for v = 4 and Q = 784), so its second statistics pass and y re-read L1 instead of the channel's
    whole slab from L2."""
    g = sch.get_loops("shift")[1]
    per_group = (["sum_rf"] if rf else []) + ["sum", "mean64", "mean"] + (["sqsum_rf"] if rf else []) \
        + ["sqsum", "var", "scale_c"]
    for b in [b for b in per_group if b in names or b.endswith("_rf")]:
        try:
            sch.reverse_compute_at(sch.get_sblock(b), g, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - reads values of every group (renorm's r): stays under c
            break
    try:
        sch.reverse_compute_at(sch.get_sblock("y"), g, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - y reads values of every group (renorm)
        pass


# ragged statistics lanes (ragged_stat_lanes). Measured side by side (2 threads, inputs rotated, AMD EPYC
# znver4, AVX-512, per-round ratios), ragged / divisor lanes: NCHW 8x256x14x14 in cache 0.81 (28-lane
# vectors before), from memory 64x256x14x14 0.91-0.92. With the channel groups (channel_group) too:
# 64x512x7x7 (49 = 3 x 16 + 1) 0.72-0.73, in cache 0.90 (alone, one channel per task: 1.33); AVX2 code
# (8 lanes) 64x512x7x7 0.86, 64x256x14x14 0.97, in cache 0.88 on both
RAGGED_LANES = True
RAGGED_LANES_MIN = 8                  # the target's lanes, at least
RAGGED_LANES_MAX_WASTE = 0.25         # masked lanes, at most this fraction of the row's vectors


def ragged_stat_lanes(q: int, mach: CpuMachine) -> int:
    """The target's lanes as the statistics lanes of :func:`_channel_first_lanes` for rows of ``q`` values
    that no multiple of the lanes divides (14 x 14 = 196, 7 x 7, 17 x 17, 35 x 35): whole registers, the row's
    last vector its last L values with the lanes the vector before counted masked (compute.py's ragged
    lanes), instead of a divisor (28 for 196: a register and a masked remainder per vector; 7 for 49). Only
    with at least :data:`RAGGED_LANES_MIN` lanes and at most :data:`RAGGED_LANES_MAX_WASTE` of the lanes
    masked, where the divisor is not whole 8-lane registers; 0 otherwise."""
    lanes = mach.lanes
    if not RAGGED_LANES or lanes < RAGGED_LANES_MIN or not q % lanes or q < 2 * lanes \
            or _vector_factor(q, lanes) % MIN_REGISTER_LANES == 0:
        return 0            # whole registers anyway (120: vectors of 24, a register and a half)
    padded = -(-q // lanes) * lanes
    return lanes if padded - q <= RAGGED_LANES_MAX_WASTE * padded else 0


# channels per task of _channel_first_lanes for short rows (channel_group). Measured side by side (2 threads,
# inputs rotated, AMD EPYC znver4, AVX-512, L2 1 MB; grouped / one channel per task): NCHW 64x256x14x14
# 0.75-0.85 (groups of 4: rows of 3136 B), AVX2 code 0.94, 32x128x17x17 0.78, 8x256x14x14 in cache 0.87;
# groups reaching 6 or 12 KB measured the same as 3 KB
CHANNEL_GROUP_MIN_BYTES = 3072


def channel_group(C: int, row: int, N, mach: CpuMachine) -> int:
    """Channels per parallel task of :func:`_channel_first_lanes`: 1, or where a sample's row of one channel
    (``row`` floats: its P x Q values) is under :data:`CHANNEL_GROUP_MIN_BYTES`, the fewest channels dividing
    C whose rows together reach it (adjacent in memory: a task reads runs of that length, and prefetches
    the next group's), while there are tasks for two per CPU and, for a static batch, a task's slabs stay
    within L2/2 (y re-reads them from there). A free batch is not bounded (the slabs of a group of 4 14x14
    channels pass L2/2 of a 1 MB L2 from a batch of 168; y then re-reads part of them from L3)."""
    if not CHANNEL_GROUP_MIN_BYTES or 4 * row >= CHANNEL_GROUP_MIN_BYTES:
        return 1
    for g in range(2, C + 1):
        if C % g:
            continue
        if C // g < 2 * host_cpus() or (isinstance(N, int) and g * N * 4 * row > mach.l2 // 2):
            return 1
        if 4 * row * g >= CHANNEL_GROUP_MIN_BYTES:
            return g
    return 1


def _channel_first_lanes(spec: KernelSpec, func, *, prefetch: bool = False, y_lanes: int = 0, group: int = 1):
    """cpu_channel_first with statistics from lane blocks (compute.py's blocked statistics, B = 1,
    L = stat_lanes): per channel (one parallel task), each row of Q gets the L lane sums, then the L
    lane sums of squares about the lane means while the row is in L1 (one vector loop each, no
    horizontal reduction per row); the channel combines its rows' lanes (vectorized over the lanes)
    and writes y from its slice, still in L2. x comes from memory once, like the two-pass schedule,
    but its second statistics pass reads L1 instead of L2. With ``prefetch`` the y loop and the second
    statistics pass prefetch the next channel's row (``x[n, p, c+1, q]``, Q floats on) into L2
    (:func:`prefetch_pass`): memory reads of channel c+1 overlap the arithmetic and the streaming stores
    of channel c, and the footprint stays about two slabs. ``group`` > 1 (:func:`channel_group`): a task
    per ``group`` adjacent channels, the statistics of a sample's rows of the group in one pass over
    them, the prefetch a group ahead. ``y_lanes``: y's vector (default the statistics lanes; ragged
    statistics lanes do not divide Q). Ghost BN ((v, G, P, C, Q), statistics per (c, g)): under the task, a
    loop over the groups holds each group's lane blocks (its v samples' rows), statistics, share of the
    averages over the groups and, without renorm, its y."""
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))      # one load of x[0, 0, c, 0] where it is used
    ghost = spec.ghost
    if ghost:                                        # statistics (c, g): the v rows of group g's samples
        c, g, n, pb, j, bi, bq = sch.get_loops("bsum")
    else:
        c, n, pb, j, bi, bq = sch.get_loops("bsum")
    sch.reorder(bi, bq, j)
    sch.reverse_compute_at(sch.get_sblock("bm2"), pb, preserve_unit_loops=True)
    loops = sch.get_loops("bm2")                     # c, [g,] n, pb | c', [g',] n', pb', j, ci, cq
    sch.reorder(loops[-2], loops[-1], loops[-3])
    for b in REDUCTIONS:                             # sum / sqsum over (n, p, lane): partials per lane
        sch.rfactor(sch.get_loops(b)[-1], factor_axis=1)
    if group > 1:
        # a task per group of channels (channel_group); its rows' statistics walk the group's channels
        # innermost, so each sample's rows of the group are read as one contiguous run
        c, ci = sch.split(c, [None, group])
        sch.reorder(g, n, pb, ci) if ghost else sch.reorder(n, pb, ci)
    movers = [b for b in ("sum_rf", "sum", "mean64", "mean", "sqsum_rf", "sqsum") if b in names or b.endswith("_rf")]
    movers += [b for b in names if b not in movers and b not in ("shift", "bsum", "bm2")]
    # ghost BN: one group's statistics, its share of the averages over the groups and (without renorm,
    # whose r reads every group's variance) its scale and y under the group loop: every buffer a task
    # allocates is then sized by the channels (static: on the task's stack, also for a free batch) and the
    # per-group work runs on vectors across the task's channels
    per_group = ("sum_rf", "sum", "mean64", "mean", "sqsum_rf", "sqsum", "var", "batch_offset",
                 "batch_var") + (() if spec.renorm else ("scale_c", "y_terms", "y"))
    under_g = []
    for b in movers:
        if ghost and b in per_group:
            sch.reverse_compute_at(sch.get_sblock(b), g, preserve_unit_loops=True)
            under_g.append(b)
        else:
            sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    sch.parallel(c)
    for b in ("bsum", "bm2"):
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[-3])
    for b in ("sum_rf", "sqsum_rf"):
        d = 2 if ghost else 1
        loops = sch.get_loops(b)                     # c, [g] | lane, c', [g',] n, p  (block-iter order)
        sch.reorder(*loops[d + 1:], loops[d])
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[d + 1])
    if group > 1:   # ghost: a group's per-statistic work in vectors across the task's channels
        vectorize_across_group(sch, [b for b in under_g if not b.endswith("_rf") and b not in ("y", "y_terms")], group)
    yl = sch.get_loops("y")
    if spec.y_expand:
        # y over each sample's run of the task's group x Q values (contiguous), in vectors of y_lanes
        run = sch.fuse(yl[-2], yl[-1])
        yo, yi = sch.split(run, [None, y_lanes])
    else:
        yo, yi = sch.split(yl[-1], [None, y_lanes or int(spec.stat_lanes)])
    sch.vectorize(yi)
    if prefetch:
        ahead = group * int(spec.shape[-1])
        sch.annotate(yo, PREFETCH_ANNOTATION, ahead)
        if STATS_PREFETCH:      # and the second statistics pass of each row (from L1) prefetches its row of c+1
            sch.annotate(sch.get_loops("bm2_update")[3 + (group > 1) + ghost], PREFETCH_ANNOTATION, ahead)
    return sch


# y of channel groups in runs (y_run_lanes). Measured side by side (abnc-style settled rounds, 2 threads, inputs
# rotated, AMD EPYC znver4, AVX-512), runs / rows: NCHW 64x512x7x7 0.77 (1.71 -> 1.23x the floor), 64x256x14x14
# 0.71 (1.24 -> 0.88x); back-to-back calls: from memory the same, in cache (16x512x7x7) 0.90
Y_RUNS = True
Y_RUNS_GHOST = True


def y_run_lanes(spec: KernelSpec, group: int, vec: int, mach: CpuMachine) -> int:
    """The vector of y over runs of channels (:func:`_channel_first_lanes` with ``KernelSpec.y_expand``), or
    0: for tasks of several channels (``group`` > 1) whose rows are no multiple of the target's lanes
    (``vec``, y's divisor vector, is not whole registers: 7 for 7x7, 28 for 14x14) but whose run of a
    sample's ``group`` rows is: each sample's group x Q values (contiguous) in whole registers, every lane
    loading its own channel's terms from per-(c, q) copies the task writes once; ghost BN without renorm
    too (y and the copies per group, under the group loop)."""
    q = int(spec.shape[-1])
    if not Y_RUNS or (spec.ghost and (spec.renorm or not Y_RUNS_GHOST)) or group < 2 or spec.adjustment == "full":
        return 0
    if vec % mach.lanes == 0 or (group * q) % mach.lanes:
        return 0
    return mach.lanes


# _channel_first_lanes also prefetches the next channel in its second statistics pass: the memory reads of
# channel c+1 then spread over the whole task of channel c instead of bursting during y (A/B, same rounds,
# znver4, load ~3.7: plain NCHW 64x128x28x28 -5.5% AVX-512, -15% AVX2; 32x64x56x56 -6%, -11%)
STATS_PREFETCH = True


MIN_SAMPLE_BLOCK = 8       # fewest samples per statistics block worth the sample-block schedule
ROW_GROUP = 4              # rows of a sample block reduced together, one channel vector at a time
PREFETCH_NEXT_BLOCK = True
# how far ahead the first statistics pass of a sample block prefetches x (cpu_channels_last; 0: off).
# Measured side by side (warm TVM pool, 2 threads, inputs rotated; AMD EPYC znver4, AVX-512, L2 1 MB):
# NC 256x1024 102 vs 123 us (onnxruntime's inference BN 96 us), 1024x256 98 vs 126, 64x4096 130 vs 149,
# 4096x128 169 vs 201; AVX2 code on the same CPU 1024x256 110 vs 142 us, 4096x128 197 vs 225. 32 and
# 64 KB ahead measured the same or slower than 16 KB
STATS_PREFETCH_BYTES = 16 * 1024


def sample_block_rows(spec: KernelSpec, machine: CpuMachine | None = None) -> int:
    """Samples per statistics block of :func:`cpu_channels_last` (x of (N, P, C, 1)): as many as fit in
    :func:`stat_block_floats` (L2/4 bytes), a multiple of ROW_GROUP, at most a static batch rounded up
    to one (a block far longer than a static batch is masked work; and one of 2728 rows for a batch of 8
    crashed under qemu-aarch64); 0 when fewer than :data:`MIN_SAMPLE_BLOCK` fit (a very wide row:
    channel stripes instead)."""
    P, C = int(spec.shape[1]), int(spec.channel_shape[0])
    R = stat_block_floats(machine) // (P * C)
    N = spec.shape[0]
    if isinstance(N, int):
        R = min(R, -(-N // ROW_GROUP) * ROW_GROUP)
    R -= R % ROW_GROUP                      # whole row groups (the batch's tail is masked, not split)
    return R if R >= MIN_SAMPLE_BLOCK else 0


def stats_prefetch_rows(row_floats: int) -> int:
    """Rows of ``row_floats`` float32 values that :data:`STATS_PREFETCH_BYTES` spans (rounded up; 0 when off)."""
    return -(-STATS_PREFETCH_BYTES // (4 * row_floats)) if STATS_PREFETCH_BYTES > 0 else 0


def _channels_last_applies(spec: KernelSpec) -> bool:
    return spec.training and spec.single_channel_run and spec.shape[-1] == 1 and not spec.ghost


def channel_stripe_width(C: int, machine: CpuMachine | None = None) -> tuple[int, int]:
    """``(ci, vi)`` of :func:`cpu_channel_stripes`: channels per stripe (one parallel task) and per
    vector of its reductions (vi < ci: the stripe is walked one vector of channels at a time)."""
    lanes = _row_lanes(_machine(machine))
    V = 4 * lanes
    ci = _vector_factor(C, lanes) if C > V else C
    if C > V and ci < 4:
        ci = C if C <= 4 * V else max(ci, _divisor(C, V))
    vi = ci
    if ci == V and C % (2 * V) == 0 and C >= 4 * V:
        ci = 2 * V    # stripes of two vectors per row (AVX-512: 128 channels, rows of 512 B; measured: -13%)
    return ci, vi


# the channel stripes beat the sample blocks (cpu_channels_last) while a stripe of the whole batch stays in
# L2 (its three passes read it from there) and its vectors fit in registers. Measured side by side (same
# rounds, 2 threads, inputs rotated; AMD EPYC znver5, AVX-512, L2 1 MB): stripes / blocks 0.86-0.97 on NC
# 256x1024 and 1024x256, 0.70 on 64x4096, about 1 on 2048x1024 (a 1 MB stripe), 1.10 on 8192x1024 and
# 16384x256 (past L2); AVX2 code on the same CPU (64-channel vectors of 8 registers, spilled): 1.07-1.44.
# On znver4 (L1d 32 KB, the same 1 MB L2) the blocks took 0.85-0.95 of the stripes' time on 256x1024 and
# 1024x256 and 1.05-1.09 on 512x512 and 64x4096; nothing the OS reports tells the two CPUs apart: left.
STRIPE_L2_SHARE = 2              # a stripe of the batch at most L2 / this
STRIPE_MAX_VECTOR_REGISTERS = 4
STRIPE_LINE_BYTES = 64         # a stripe's row segment: whole cache lines


def stripe_batch_max(spec: KernelSpec, machine: CpuMachine | None = None) -> int:
    """The largest batch for which :func:`cpu_channel_stripes` is preferred over the sample blocks of
    :func:`cpu_channels_last` (0: never): the batch's stripe (N x P x ci floats) within
    L2/:data:`STRIPE_L2_SHARE`, a vector of the walk of whole registers, at most
    :data:`STRIPE_MAX_VECTOR_REGISTERS` of the target, a stripe's row of whole cache lines, and at least a
    stripe per CPU. A kernel with a symbolic batch picks its rule per call
    with it (:class:`bncompile.lower.kernels.Kernel`)."""
    if not _channels_last_applies(spec) or spec.kinds != "RRCR" or not isinstance(spec.shape[1], int):
        return 0
    mach = _machine(machine)
    ci, vi = channel_stripe_width(int(spec.channel_shape[0]), mach)
    if vi > STRIPE_MAX_VECTOR_REGISTERS * mach.lanes or vi % mach.lanes or (4 * ci) % STRIPE_LINE_BYTES \
            or int(spec.channel_shape[0]) // ci < host_cpus():
        # spilled vectors; a ragged vector or a stripe of part of a cache line (C = 1000 on AVX-512: stripes
        # of 25 channels, each row's 100 bytes read alone: 1.8x the blocks' time); or fewer stripes than
        # CPUs (the blocks split the batch instead)
        return 0
    return mach.l2 // STRIPE_L2_SHARE // (4 * ci * int(spec.shape[1]))


def cpu_channels_last(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """Channels-last with few rows per sample (e.g. (N, C)), statistics over *sample blocks*.

    When a block of at least :data:`MIN_SAMPLE_BLOCK` samples fits in L2/4 (:func:`sample_block_rows`):
    blocked statistics over sample blocks (compute.py, ``stat_rows = R``): each block of R samples
    gets its sum and centred sum of squares in two passes while it is in cache, parallel over blocks
    (contiguous memory: a task streams its rows), vectorized across channels; the blocks combine exactly,
    parallel over channel vectors; y is parallel over the rows with the same contiguous split, so a
    task normalizes the rows it reduced, from its own L2. Declines (for :func:`cpu_channel_stripes`)
    when no block fits, and (unless asked for by name: ``when_named``) for a static batch of at most
    :func:`stripe_batch_max`.
    """
    return _sample_blocks_rule(spec, func, machine, prefer_stripes=True)


def _sample_blocks_rule(spec: KernelSpec, func, machine: CpuMachine | None, *, prefer_stripes: bool):
    if not _channels_last_applies(spec):
        return None
    mach = _machine(machine)
    N = spec.shape[0]
    if prefer_stripes and isinstance(N, int) and spec.stat_rows <= 1 and N <= stripe_batch_max(spec, mach):
        return None
    if spec.kinds == "RRCR" and spec.adjustment != "full" and isinstance(spec.shape[1], int):
        R = spec.stat_rows if spec.stat_rows > 1 else sample_block_rows(spec, mach)
        if R > 1:
            import dataclasses

            from bncompile.lower.kernels.compute import prim_func

            P = int(spec.shape[1])
            bspec = dataclasses.replace(spec, stat_block=P, stat_rows=R, stat_plain_m2=R * P <= PLAIN_M2_MAX)
            return _channels_last_sample_blocks(bspec, prim_func(bspec), mach)
    return None


def _cpu_channels_last_named(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """``cpu_channels_last`` asked for by name: the sample blocks whatever the batch; where no block
    applies (rows too wide, a static batch under MIN_SAMPLE_BLOCK, a full-shape adjustment) the stripes, as
    the rule did before the stripes were a rule of their own."""
    sch = _sample_blocks_rule(spec, func, machine, prefer_stripes=False)
    return sch if sch is not None else cpu_channel_stripes(spec, func, machine)


cpu_channels_last.when_named = _cpu_channels_last_named


def cpu_channel_stripes(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """Channels-last with few rows per sample: parallel over stripes of channels
    (:func:`channel_stripe_width`), one task per stripe doing its shift, both statistics passes, the
    per-channel values and y, so the stripe comes from memory once and is re-read from L2 (one phase,
    no barrier). Taken where :func:`cpu_channels_last` declines: rows too wide for sample blocks, a
    static batch of at most :func:`stripe_batch_max`, or a kernel's per-call choice for such a batch.
    """
    if not _channels_last_applies(spec):
        return None
    mach = _machine(machine)
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    C = int(spec.channel_shape[0])
    ci, vi = channel_stripe_width(C, mach)
    co, _ = sch.split(sch.get_loops("shift")[0], [None, ci])
    stats = ("sum", "mean64", "mean", "sqsum")
    # mean64 is not there when nothing reads it (momentum 1: the moving mean keeps its value, and a
    # power-of-two count finalizes the mean in float32)
    movers = [b for b in stats if b in names] + [n for n in names if n not in ("shift", "y") + stats] + ["y"]
    for b in movers:
        sch.reverse_compute_at(sch.get_sblock(b), co, preserve_unit_loops=True)
    sch.parallel(co)
    for b in REDUCTIONS:
        loops = sch.get_loops(b)     # co | c_inner, n, p, q  (block-iter order after the move)
        if vi < ci:
            sch.split(loops[1], [None, vi])
            loops = sch.get_loops(b)     # co | c_o, c_i, n, p, q
            sch.reorder(loops[1], *loops[3:], loops[2])
            loops = sch.get_loops(b)
            sch.vectorize(loops[-1])
            sch.decompose_reduction(sch.get_sblock(b), loops[2])
            continue
        sch.reorder(*loops[2:], loops[1])
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[1])
    # y under co: loops (co, n, p, c_inner, q=1) -> make c_inner innermost and vectorize it
    yl = sch.get_loops("y")
    inner = yl[1:]
    cin = inner[2]
    sch.reorder(*[l for l in inner if not l.same_as(cin)], cin)
    if vi < ci:
        _, cin = sch.split(cin, [None, vi])
    sch.vectorize(cin)
    return sch


STAT_BLOCK_FLOATS = 65536          # stat_block_floats() of a 1 MB L2 (256 KB blocks: in L2 for the second pass)
Y_TASK_BYTES = 128 * 1024          # y_task_bytes() of a 1 MB L2


def cpu_channels_last_rows(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """Channels-last with many rows per sample (NHWC, NDHWC): blocked statistics, parallel over blocks.

    x is read from memory once for the statistics: the kernel is recompiled with
    ``spec.stat_block = B`` (compute.py's blocked statistics), blocks of B rows (<= 256 KB) each get their
    sum and their centered sum of squares in two passes while the block is in cache (parallel over
    blocks, vectorized across the contiguous channels), and a small serial pass combines the blocks.
    Blocks are L2/4 bytes (:func:`stat_block_floats`; with a 1 MB L2, ~256 KB blocks measured ~7% faster
    than ~128 KB on NHWC 32x56x56x64).
    The blocks walk the batch backwards, so y's forward pass starts on the part of x the caches still
    hold. y is parallel over blocks of rows, vectorized over channels. When P has no divisor that makes
    useful blocks, per-sample partial sums (rfactor over the batch) are used instead.
    """
    if not spec.training or not spec.single_channel_run or spec.shape[-1] != 1 or spec.ghost:
        return None
    P, C = spec.shape[1], int(spec.channel_shape[0])
    if not isinstance(P, int) or P < 8 or P * C < 1024:
        return None
    mach = _machine(machine)
    B = spec.stat_block or _divisor(P, max(1, stat_block_floats(mach) // C))
    if B >= 8 and spec.kinds == "RRCR":
        import dataclasses

        from bncompile.lower.kernels.compute import prim_func

        bspec = spec if spec.stat_block == B else dataclasses.replace(spec, stat_block=B)
        return _channels_last_blocked(bspec, prim_func(bspec), mach)
    return _channels_last_rfactor(spec, func, mach)


def _channels_last_vector(sch, block: str, lead: int, C: int, cv: int):
    """Loops ``lead.. | c, r...`` of ``block`` -> ``r..., [co,] ci``; returns the vector loop ci."""
    loops = sch.get_loops(block)[lead:]
    c, rest = loops[0], loops[1:]
    if cv < C:
        co, ci = sch.split(c, [None, cv])
        sch.reorder(co, *rest, ci)
        return ci
    sch.reorder(*rest, c)
    return c


def _channels_last_y(sch, P: int, C: int, cv: int, mach: CpuMachine):
    # a task streams ~L2/8 of y (1 MB L2: ~100 KB measured better than 28 KB or 450 KB; amortizes the
    # streaming fence)
    _rows_pass(sch, "y", P, C, cv, y_task_bytes(mach))


def _channels_last_blocked(spec: KernelSpec, func, mach: CpuMachine):
    P, C = spec.shape[1], int(spec.channel_shape[0])
    lanes = _row_lanes(mach)
    cv = C if C <= 4 * lanes else _vector_factor(C, lanes)
    sch = _sched(func)
    _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))      # one load of x[0, 0, c, 0] where it is used
    for b in ("bsum", "bm2"):                         # block statistics with the channels contiguous
        for k in (0, 1):                              # the sums and their compensations
            sch.transform_layout(sch.get_sblock(b), ("write", k), lambda c, n, pb, j: (n, pb, j, c))
    c, n, pb, j, _, _ = sch.get_loops("bsum")          # j: the one lane (Q = 1)
    sch.reorder(n, pb, j, c)
    blk = sch.fuse(n, pb, j)
    sch.reverse_compute_at(sch.get_sblock("bm2"), blk, preserve_unit_loops=True)
    vec = {b: _channels_last_vector(sch, b, 1, C, cv) for b in ("bsum", "bm2")}
    sch.parallel(blk)
    for b in ("bsum", "bm2"):
        sch.vectorize(vec[b])
        sch.decompose_reduction(sch.get_sblock(b), sch.get_loops(b)[1])
    _channels_last_y(sch, P, C, cv, mach)
    return sch


def _channels_last_sample_blocks(spec: KernelSpec, func, mach: CpuMachine):
    """cpu_channels_last on sample blocks (see there): loops of the block statistics
    ``blk | [co,] rows, ci`` (ci: a vector of channels), the combine and the per-channel values
    ``[co,] [blocks,] ci``, y over rows."""
    P, C = int(spec.shape[1]), int(spec.channel_shape[0])
    # a channel vector of 4 registers: the compensated sum holds 2 of them per vector plus the shift, 12
    # of the 16 AVX2 registers (8-register vectors spilled: measured 20% slower on NC 256x1024, haswell)
    lanes = mach.lanes
    cv = C if C <= 4 * lanes else _vector_factor(C, lanes)
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))      # one load of x[0, 0, c, 0] where it is used
    for b in ("bsum", "bm2"):                         # block statistics with the channels contiguous
        for k in range(len(sch.get(sch.get_sblock(b)).writes)):
            sch.transform_layout(sch.get_sblock(b), ("write", k), lambda c, n, pb, j: (n, pb, j, c))
    c, nb, pb, j = sch.get_loops("bsum")[:4]
    sch.reorder(nb, pb, j, c)
    blk = sch.fuse(nb, pb, j)
    sch.reverse_compute_at(sch.get_sblock("bm2"), blk, preserve_unit_loops=True)
    vec = {}
    for b in ("bsum", "bm2"):
        vec[b] = _channels_last_vector(sch, b, 1, C, cv)
        if cv < C:
            # rows in groups: blk | co, rows, ci -> blk | row group, co, rows of the group, ci. A sweep of
            # one channel vector down every row of the block reads lines 4 KB apart for a 4 KB row, all in
            # the same L1 set (its ways cannot hold them): groups of ROW_GROUP rows keep that sweep within
            # the ways, and x is read as ROW_GROUP sequential streams.
            loops = sch.get_loops(b)                 # blk, co, ri, bi, bq, ci
            rows = sch.fuse(*loops[2:-1])
            rg, rr = sch.split(rows, [None, ROW_GROUP])
            sch.reorder(rg, loops[1], rr)
    sch.parallel(blk)
    ahead = stats_prefetch_rows(P * C)
    if ahead:
        # the first pass prefetches x a few rows ahead of its reads: a row group's streams each end at a
        # row (a 4 KB page for C = 1024), where the hardware prefetchers stop, so without it every row
        # starts with a demand miss to memory. It runs on into the next block, so that block needs no
        # prefetch of its own from the second pass (see STATS_PREFETCH_BYTES)
        sch.annotate(sch.get_loops("bsum")[1], PREFETCH_ANNOTATION, ahead * P * C)
    elif PREFETCH_NEXT_BLOCK:
        # the second pass (over the block in cache) prefetches the next block into L2: its memory reads
        # overlap this block's arithmetic instead of stalling the first pass of the next block
        sch.annotate(sch.get_loops("bm2")[1], PREFETCH_ANNOTATION, int(spec.stat_rows) * P * C)
    for b in ("bsum", "bm2"):
        sch.vectorize(vec[b])
        sch.decompose_reduction(sch.get_sblock(b), sch.get_loops(b)[1])
    # the exact combine of the blocks and every per-channel value: O(C x blocks) work, serial (one task
    # while the others wait at a barrier: cheaper than a barrier per block), vectorized across channels
    for b in [b for b in names if b not in ("shift", "bsum", "bm2", "y")]:
        loops = sch.get_loops(b)                     # c, [reduce...]
        c, rest = loops[0], loops[1:]
        if cv < C:
            co, c = sch.split(c, [None, cv])
        if rest:
            sch.reorder(*rest, c)
        sch.vectorize(c)
        if b in REDUCTIONS:
            sch.decompose_reduction(sch.get_sblock(b), rest[0])
    _channels_last_y(sch, P, C, cv, mach)
    return sch


def _channels_last_rfactor(spec: KernelSpec, func, mach: CpuMachine):
    """Each reduction rfactored over the batch loop (partials of shape (N, C), no split, so the symbolic
    batch needs no predicate), parallel over samples, vectorized across the contiguous channels of a row;
    a small serial pass adds the N partials."""
    P, C = spec.shape[1], int(spec.channel_shape[0])
    sch = _sched(func)
    _inline_parameter_only(sch, _blocks(sch))
    lanes = _row_lanes(mach)
    cv = C if C <= 4 * lanes else _vector_factor(C, lanes)
    for b in REDUCTIONS:
        _per_sample_partials(sch, b, C, cv)
    _channels_last_y(sch, P, C, cv, mach)
    return sch


# ghost BN channels-last, short groups (at most GHOST_WALK_MAX_VALUES values per channel and group, e.g.
# (N, C) with v = 4): parallel over stripes of channels instead of groups (_ghost_channel_stripes)
GHOST_STRIPES = True


def _ghost_channel_stripes(spec: KernelSpec, func, mach: CpuMachine, cpus: int | None = None):
    """Ghost BN, channels last, short groups: a task per stripe of channels walking every group
    (:func:`~bncompile.lower.kernels.schedules._common.ghost_stripe_walk`): per vector of channels the
    group's statistics, its y and its terms of the averages over the groups, then the stripe's batch
    statistics; one phase, nothing per group kept past the vector. Measured on 2-core znver3 (AVX2),
    (256, 1024), v = 4: 0.75-0.80 of the task-per-group schedule's time (0.55 with x in cache); the
    next group's rows prefetched was 8-10% of that. None where it does not apply."""
    def per_group(names):
        return [b for b in ("sum", "mean64", "mean", "sqsum", "var", "scale_c") if b in names]

    return ghost_stripe_schedule(spec, func, mach.lanes, per_group, ("batch_shift", "batch_offset", "batch_var"),
                                 "y", "sum", cpus=cpus)


def cpu_channels_last_ghost(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """Ghost BN, channels last (x viewed as (v, G, P, C, 1), e.g. NHWC). Short groups without renorm
    (at most ``GHOST_WALK_MAX_VALUES`` values per channel and group): :func:`_ghost_channel_stripes`.
    Otherwise one parallel task per group g
    computes the group's statistics (sum, then centred sum of squares, vectorized across the contiguous
    channels; the group's slab is re-read from L2/L3, not memory, when it fits there) and, when y needs
    nothing from other groups (no renorm), normalizes the group in the same task; else y is its own
    parallel pass over (v, g) rows. The per-channel averages over the groups (O(C*G) work: with v = 4
    and (N, C), the per-group terms they read are as many bytes as x) are partial sums over chunks of
    :data:`GHOST_CHUNK_GROUPS` consecutive groups, parallel over the chunks (each task reads the terms
    its own core wrote), then a sum over the chunks' partials, parallel over channel vectors."""
    if not spec.training or spec.kinds != "RGRCR" or spec.shape[-1] != 1 or spec.adjustment == "full":
        return None
    lanes = _row_lanes(_machine(machine))
    C = int(spec.channel_shape[0])
    cv = C if C <= 4 * lanes else _vector_factor(C, lanes)
    m = int(spec.shape[0]) * int(spec.shape[2]) * int(spec.shape[4])     # values per (channel, group)
    if GHOST_PLAIN_SUMS and not spec.stat_plain_m2 and m <= PLAIN_GROUP_MAX:
        # short groups (e.g. (N, C) with v = 4): plain float32 sums (compute.py's accuracy argument);
        # a compensated sum of four values cost as much as the rest of the group's statistics
        import dataclasses

        from bncompile.lower.kernels.compute import prim_func

        spec = dataclasses.replace(spec, stat_plain_m2=True)
        func = prim_func(spec)
    if GHOST_STRIPES and m <= GHOST_WALK_MAX_VALUES and not spec.renorm:
        sch = _ghost_channel_stripes(spec, func, _machine(machine))
        if sch is not None:
            return sch
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    # the per-(channel, group) statistics stored group-major, (G, C): a group's task writes contiguous
    # vectors, and the averages over the groups read them (in (C, G) both were strided gathers/scatters)
    for b in ("shift", "sum", "mean64", "mean", "sqsum", "var", "scale_c"):
        if b in names:
            for k in range(len(sch.get(sch.get_sblock(b)).writes)):
                sch.transform_layout(sch.get_sblock(b), ("write", k), lambda c, g: (g, c))
    c, g = sch.get_loops("shift")
    sch.reorder(g, c)
    G = spec.shape[1]
    S = GHOST_CHUNK_GROUPS
    over_groups = ("batch_shift", "batch_offset", "batch_var")
    chunked = S > 0 and (not isinstance(G, int) or G > S) and all(b in names for b in over_groups)
    moved = []
    for b in ("sum", "mean64", "mean", "sqsum", "var", "scale_c"):
        if b not in names:
            continue
        try:
            sch.reverse_compute_at(sch.get_sblock(b), g, preserve_unit_loops=True)
            moved.append(b)
        except Exception:  # noqa: BLE001 - reads statistics of every group (renorm): stays outside
            continue
    fused_y = False
    if "scale_c" in moved:
        try:
            sch.reverse_compute_at(sch.get_sblock("y"), g, preserve_unit_loops=True)
            fused_y = True
        except Exception:  # noqa: BLE001 - y reads per-channel values of every group
            fused_y = False
    sch.parallel(g)
    if chunked:
        # the averages' sums over the groups as partial sums over chunks of S consecutive groups, parallel
        # over the chunks, the chunk's groups walked with the channels contiguous: the pool splits the
        # group loop and the chunk loops alike (static, contiguous), so a task re-reads the per-group
        # statistics its own core wrote, not rows the other core holds. (A split into a fixed number of
        # chunks would make the chunk size symbolic with a free batch: not an affine binding, and the
        # partials' initialization could not be taken out of the predicated loop.)
        for b in over_groups:
            cb, gb = sch.get_loops(b)
            gbo, _ = sch.split(gb, [None, S])
            rf = sch.rfactor(gbo, factor_axis=0)
            cl, ko, gl = sch.get_loops(rf)          # channel, chunk (now spatial), group in the chunk
            sch.reorder(ko, gl, cl)
            if cv < C:
                _, cl = sch.split(cl, [None, cv])
            sch.vectorize(cl)
            sch.parallel(ko)
            sch.decompose_reduction(rf, gl)
    for b in REDUCTIONS:
        vec = _channels_last_vector(sch, b, 1, C, cv)
        sch.vectorize(vec)
        loops = sch.get_loops(b)
        sch.decompose_reduction(sch.get_sblock(b), loops[1] if cv == C else loops[2])
    row = int(spec.shape[2]) * C * int(spec.shape[4])       # the floats of one sample in a group's slab
    if GHOST_ROW_PREFETCH and isinstance(spec.shape[2], int) and 4 * row <= STATS_PREFETCH_BYTES:
        # short rows (e.g. (N, C)): a group's v samples lie G rows apart, each its own short stream that
        # the hardware prefetchers barely start on; its first pass prefetches the next group's (the rows
        # right after, in memory: the same task's next group, or the next task's)
        sch.annotate(sch.get_loops("sum_update")[1], PREFETCH_ANNOTATION, row)
    if fused_y:
        v, _, p, cc, q = sch.get_loops("y")[1:]      # g | v, g (unit), p, c, q
    else:
        v, gg, p, cc, q = sch.get_loops("y")
        sch.parallel(sch.fuse(v, gg))
    _vectorize_channels(sch, cc, q, C, cv)
    # the group's per-channel scalars (float64 finalization) as vectors across the channels
    for b in ["shift"] + [b for b in moved if b not in REDUCTIONS]:
        loops = sch.get_loops(b)                    # g | c [, unit g']
        cl = loops[1]
        if cv < C:
            _, cl = sch.split(cl, [None, cv])
        if len(loops) > 2:
            sch.reorder(*loops[2:], cl)
        sch.vectorize(cl)
    # the averages over the groups (over the chunks' partials when chunked): parallel over channel
    # vectors, the groups inner
    _channel_vectors_over_groups(sch, over_groups, names, cv)
    # the per-channel values after them (batch mean and variance, moving statistics, renorm's r and d):
    # vectors across the channels (else scalar loops of C float64 divisions, serial while the other
    # threads wait at the launch's barrier)
    for b in names:
        if b in over_groups or b in moved or b in ("shift", "y") or b in REDUCTIONS:
            continue
        loops = sch.get_loops(b)
        if len(loops) != 1 or int(sch.get(loops[0]).extent) != C:
            continue
        c = loops[0]
        if cv < C:
            _, c = sch.split(c, [None, cv])
        sch.vectorize(c)
    return sch


def cpu_generic(spec: KernelSpec, func, machine: CpuMachine | None = None):
    sch = _sched(func)
    if not spec.training:
        return None
    loops = sch.get_loops("y")
    sch.parallel(loops[0])
    for b in ("sum", "sqsum"):
        sch.parallel(sch.get_loops(b)[0])
    return sch


def cpu_inference(spec: KernelSpec, func, machine: CpuMachine | None = None):
    """Inference: one streaming pass, parallel over rows, vectorized along the contiguous axis."""
    if spec.training:
        return None
    lanes = _machine(machine).lanes
    sch = _sched(func)
    loops = sch.get_loops("y")
    if spec.kinds == "RRCR" and spec.shape[-1] != 1:
        n, p, c, q = loops
        sch.parallel(sch.fuse(n, p, c))
        vec = _vector_factor(int(spec.shape[-1]), lanes)
        if vec > 1:
            _, qi = sch.split(q, [None, vec])
            sch.vectorize(qi)
    elif spec.kinds == "RRCR":
        n, p, c, q = loops
        sch.parallel(sch.fuse(n, p))
        C = int(spec.channel_shape[0])
        cv = C if C <= 4 * lanes else _vector_factor(C, lanes)
        co, ci = sch.split(sch.fuse(c, q), [None, cv])
        sch.vectorize(ci)
    else:
        sch.parallel(loops[0])
    return sch


# --------------------------------------------------------------------------- x86: streaming stores of y

NT_PIPELINE = "bncompile_nt_stores"
_NT_LANES = (8, 16, 32, 64)
NT_MIN_TASK_BYTES = 16 * 1024     # bytes of y one parallel iteration must stream (amortizes its sfence)
# the rules whose y pass gains from streaming stores (measured; cpu_channels_last re-reads y's stripe)
STREAMING_RULES = ("cpu_channel_first", "cpu_channels_last_rows", "cpu_channels_last_ghost")


def _nt_helper_ir(lanes: set) -> str:
    """LLVM IR of the helpers the rewritten stores call (inlined by LLVM: ``alwaysinline``).

    ``bnc_ntstore_f32xL(p, v)`` stores a float32 vector with a non-temporal (streaming) store when
    ``p`` is 32-byte aligned, else with an ordinary store (so any alignment is correct);
    ``bnc_sfence()`` orders the streaming stores before the task that wrote them ends.
    """
    parts = []
    for n in sorted(lanes):
        parts.append(f"""
define void @bnc_ntstore_f32x{n}(ptr %p, <{n} x float> %v) #0 {{
entry:
  %a = ptrtoint ptr %p to i64
  %m = and i64 %a, 31
  %ok = icmp eq i64 %m, 0
  br i1 %ok, label %nt, label %plain
nt:
  store <{n} x float> %v, ptr %p, align 32, !nontemporal !0
  ret void
plain:
  store <{n} x float> %v, ptr %p, align 4
  ret void
}}""")
    parts.append("""
declare void @llvm.x86.sse.sfence()
define void @bnc_sfence() #0 {
entry:
  call void @llvm.x86.sse.sfence()
  ret void
}
attributes #0 = { alwaysinline nounwind }
!0 = !{i32 1}
""")
    return "\n".join(parts)


def nt_store_pass(names=("y",)):
    """A TIR pass (run after the default lowering, once loops are vectorized) that turns the contiguous
    float32 vector stores into the output buffers ``names`` into streaming (non-temporal) stores.

    Why: y is written once and never read back by the kernel, yet an ordinary store first reads each
    line of y from memory (read-for-ownership) and fills the cache with it, evicting the channel slice
    of x the schedule re-reads from cache. Each rewritten store becomes a call to an inlined helper
    (``pragma_import_llvm``); every parallel task that streamed ends with an ``sfence`` (and so does an
    outermost serial loop that streamed). Stores it does not recognize are left as they are, and so are
    stores in a parallel iteration that writes less than ``NT_MIN_TASK_BYTES`` (the fence would cost
    more than the streaming saves).
    """
    import re

    tvm = _tvm.tvm()
    tirx = tvm.tirx
    alts = "|".join(re.escape(n) for n in names)
    pat = re.compile(rf"^({alts})(_\d+)?$")

    def fence():
        return tirx.Evaluate(tirx.call_extern("void", "bnc_sfence"))

    @tirx.transform.prim_func_pass(opt_level=0)
    def _pass(func, mod, ctx):
        lanes_used: set = set()

        def store(stmt, mult):
            v = stmt.value
            dt = getattr(getattr(v, "ty", None), "dtype", None)
            idx = stmt.indices
            if dt is None or not pat.match(stmt.buffer.name) or len(idx) != 1:
                return stmt, False
            ramp = idx[0]
            dt = tvm.DataType(str(dt))
            if (not isinstance(ramp, tirx.Ramp) or dt.type_code != tvm.DataTypeCode.FLOAT or dt.bits != 32
                    or int(dt.lanes) not in _NT_LANES or not isinstance(ramp.stride, tirx.IntImm)
                    or int(ramp.stride) != 1 or int(ramp.lanes) != int(dt.lanes)):
                return stmt, False
            n = int(dt.lanes)
            if mult * n * 4 < NT_MIN_TASK_BYTES:
                return stmt, False
            lanes_used.add(n)
            addr = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(stmt.buffer, [ramp.base]))
            return tirx.Evaluate(tirx.call_extern("void", f"bnc_ntstore_f32x{n}", addr, v)), True

        def visit(stmt, in_loop, mult=1):
            """(new stmt, changed); ``mult``: iterations of the serial loops since the last parallel one."""
            if isinstance(stmt, tirx.BufferStore):
                return store(stmt, mult)
            if isinstance(stmt, tirx.SeqStmt):
                res = [visit(x, in_loop, mult) for x in stmt.seq]
                if not any(r[1] for r in res):
                    return stmt, False
                return tirx.SeqStmt([r[0] for r in res]), True
            if isinstance(stmt, tirx.For):
                par = stmt.kind == tirx.ForKind.PARALLEL
                ext = stmt.extent
                inner = 1 if par else mult * (int(ext) if isinstance(ext, tirx.IntImm) else 1 << 20)
                body, changed = visit(stmt.body, True, inner)
                if not changed:
                    return stmt, False
                if par:
                    body = tirx.SeqStmt([body, fence()])
                loop = tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                                stmt.annotations, stmt.step)
                if not in_loop and not par:
                    return tirx.SeqStmt([loop, fence()]), True
                return loop, True
            if isinstance(stmt, tirx.AttrStmt):
                body, changed = visit(stmt.body, in_loop, mult)
                if not changed:
                    return stmt, False
                return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body), True
            if isinstance(stmt, tirx.IfThenElse):
                t, c1 = visit(stmt.then_case, in_loop, mult)
                e, c2 = visit(stmt.else_case, in_loop, mult) if stmt.else_case is not None else (None, False)
                if not (c1 or c2):
                    return stmt, False
                return tirx.IfThenElse(stmt.condition, t, e), True
            return stmt, False

        body, changed = visit(func.body, False)
        if not changed:
            return func
        body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", tvm.ir.StringImm(_nt_helper_ir(lanes_used)),
                             body)
        return func.with_body(body)

    return _pass



_PREFETCH_IR = """
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
define void @bnc_prefetch(ptr %p) #0 {
entry:
  call void @llvm.prefetch.p0(ptr %p, i32 0, i32 2, i32 1)
  ret void
}
attributes #0 = { alwaysinline nounwind }
"""


def _walk_expr(node, fn, depth=0):
    """Call ``fn`` on every sub-expression of ``node`` (the TIR node fields this pass meets)."""
    if node is None or depth > 64:
        return
    fn(node)
    for attr in ("a", "b", "value", "args", "true_value", "false_value", "condition", "body"):
        try:
            child = getattr(node, attr)
        except Exception:  # noqa: BLE001 - a node without that field
            continue
        if isinstance(child, (str, int, float)):
            continue
        if type(child).__name__ == "Array" or isinstance(child, (list, tuple)):
            for c in child:
                _walk_expr(c, fn, depth + 1)
        else:
            _walk_expr(child, fn, depth + 1)


def prefetch_pass(buffer="x"):
    """A TIR pass (after the default lowering) for the loops a schedule annotated with
    ``PREFETCH_ANNOTATION = offset``: before each statement in the loop that reads ``buffer`` (a name,
    or a tuple of names) with a contiguous vector load at flat index ``i``, prefetch (into L2:
    ``prefetcht1`` on x86) the lines of ``buffer[i + offset]``, i.e. the data the same loop reads
    ``offset`` elements later.

    Why: :func:`cpu_channel_first` reads a channel's slab from memory in its statistics pass, then
    writes y from L2; a core does one, then the other. Prefetching channel c+1 while y of channel c is
    written overlaps the two (measured on a 1-core run of NCHW 32x64x56x56: -8%; prefetching into L1
    instead was slower, and so was prefetching the next row inside the statistics pass).
    A prefetch is a hint: an address past the end of ``buffer`` (the last channel's) does not fault.
    """
    tvm = _tvm.tvm()
    tirx = tvm.tirx
    names = (buffer,) if isinstance(buffer, str) else tuple(buffer)

    @tirx.transform.prim_func_pass(opt_level=0)
    def _pass(func, mod, ctx):
        used = [False]

        def loads(expr):
            out = []

            def fn(node):
                if type(node).__name__ in ("BufferLoad", "TensorLoad") and getattr(node, "source", None) is not None \
                        and node.source.name in names and len(node.indices) == 1:
                    idx = node.indices[0]
                    lanes = int(idx.lanes) if isinstance(idx, tirx.Ramp) else 1
                    if isinstance(idx, tirx.Ramp) and isinstance(idx.stride, tirx.IntImm) and int(idx.stride) == 1:
                        out.append((node.source, idx.base, lanes))
            _walk_expr(expr, fn)
            return out

        def visit(stmt, offset, seen):
            if offset is not None and type(stmt).__name__ in ("BufferStore", "Bind", "Evaluate"):
                pfs = []
                for src, base, lanes in loads(stmt.value):
                    key = str(base)
                    if key in seen:
                        continue
                    seen.add(key)
                    for k in range(0, max(1, lanes * 4 // 64)):
                        addr = tirx.call_intrin("handle", "tirx.address_of",
                                                tirx.BufferLoad(src, [base + offset + k * 16]))
                        pfs.append(tirx.Evaluate(tirx.call_extern("void", "bnc_prefetch", addr)))
                if not pfs:
                    return stmt
                used[0] = True
                return tirx.SeqStmt(pfs + [stmt])
            if isinstance(stmt, tirx.SeqStmt):
                return tirx.SeqStmt([visit(x, offset, seen) for x in stmt.seq])
            if isinstance(stmt, tirx.For):
                ann = stmt.annotations.get(PREFETCH_ANNOTATION) if stmt.annotations else None
                if ann is not None:
                    offset, seen = int(ann), set()
                body = visit(stmt.body, offset, seen if offset is not None else seen)
                if offset is not None and ann is None:
                    seen.clear()        # an inner loop: its iterations are new loads
                ann_map = {k: v for k, v in stmt.annotations.items() if k != PREFETCH_ANNOTATION}
                return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                                ann_map, stmt.step)
            if isinstance(stmt, tirx.AttrStmt):
                return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, visit(stmt.body, offset, seen))
            if isinstance(stmt, tirx.IfThenElse):
                return tirx.IfThenElse(stmt.condition, visit(stmt.then_case, offset, seen),
                                       visit(stmt.else_case, offset, seen) if stmt.else_case is not None else None)
            return stmt

        body = visit(func.body, None, set())
        if not used[0]:
            return func
        body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", tvm.ir.StringImm(_PREFETCH_IR), body)
        return func.with_body(body)

    return _pass


def _has_parallel(stmt) -> bool:
    """Whether ``stmt`` holds a parallel loop (statements only: loops live in statements)."""
    tirx = _tvm.tvm().tirx
    if isinstance(stmt, tirx.For):
        return stmt.kind == tirx.ForKind.PARALLEL or _has_parallel(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return any(_has_parallel(s) for s in stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return _has_parallel(stmt.then_case) or (stmt.else_case is not None and _has_parallel(stmt.else_case))
    body = getattr(stmt, "body", None)
    return isinstance(body, tirx.Stmt) and _has_parallel(body)


def _reads_buffer(expr) -> bool:
    found = []
    _walk_expr(expr, lambda node: found.append(1) if type(node).__name__ == "BufferLoad" else None)
    return bool(found)


def merge_parallel_pass():
    """A TIR pass (after the default lowering) that runs the parallel loops of one statement list in
    **one** parallel launch, with a barrier after each, instead of one launch per loop.

    Why: every launch hands tasks to the pool's workers and waits for all of them; a worker that went
    to sleep (TVM_THREAD_POOL_SPIN_COUNT=0, or a shared machine) takes a wake-up to start, so a kernel
    of k parallel loops pays k wake-ups and k joins. Merged, it pays one wake-up; the barriers
    (``TVMBackendParallelBarrier``: a spin on per-task counters) cost little more than a cache line
    each. The serial statements between the loops run as a parallel loop of extent 1 (task 0, the
    others wait at its barrier); a loop's iterations go to the same tasks as before (a static,
    contiguous split), so a task meets the data it touched in an earlier loop in its own caches when
    the two loops split alike. Allocations and pure bindings in the range move before the launch;
    anything the rewrite cannot place (a binding that reads a buffer, a parallel loop nested in a
    serial statement) leaves the function as it was.
    """
    tvm = _tvm.tvm()
    tirx = tvm.tirx

    def merge(seq):
        items = list(seq.seq)
        par = [i for i, st in enumerate(items)
               if isinstance(st, tirx.For) and st.kind == tirx.ForKind.PARALLEL]
        if len(par) < 2:
            return None
        i0, i1 = par[0], par[-1]
        hoisted, body, serial = [], [], []

        def flush():
            if serial:
                v = tirx.Var("serial_task", "int32")
                one = serial[0] if len(serial) == 1 else tirx.SeqStmt(list(serial))
                body.append(tirx.For(v, tirx.const(0, "int32"), tirx.const(1, "int32"), tirx.ForKind.PARALLEL, one))
                serial.clear()

        for st in items[i0:i1 + 1]:
            if isinstance(st, (tirx.AllocBuffer, tirx.DeclBuffer)):
                hoisted.append(st)
            elif isinstance(st, tirx.Bind):
                if _reads_buffer(st.value):
                    return None
                hoisted.append(st)
            elif isinstance(st, tirx.For) and st.kind == tirx.ForKind.PARALLEL:
                flush()
                body.append(st)
            elif _has_parallel(st):
                return None
            else:
                serial.append(st)
        flush()
        fenced = [tirx.AttrStmt(tirx.const(0, "int32"), "pragma_parallel_barrier_when_finish", tirx.const(1, "int32"), st)
                  for st in body[:-1]] + body[-1:]
        launch = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_parallel_launch_point", tirx.const(1, "int32"),
                               tirx.SeqStmt(fenced))
        return tirx.SeqStmt(items[:i0] + hoisted + [launch] + items[i1 + 1:])

    def visit(stmt):
        """(new stmt, changed): the first statement list holding two or more parallel loops, merged."""
        if isinstance(stmt, tirx.SeqStmt):
            merged = merge(stmt)
            if merged is not None:
                return merged, True
            out, changed = [], False
            for st in stmt.seq:
                new, c = visit(st) if not changed else (st, False)
                out.append(new)
                changed = changed or c
            return (tirx.SeqStmt(out), True) if changed else (stmt, False)
        if isinstance(stmt, tirx.AttrStmt):
            body, changed = visit(stmt.body)
            return (tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body), True) if changed else (stmt, False)
        if isinstance(stmt, tirx.IfThenElse):
            t, c1 = visit(stmt.then_case)
            e, c2 = visit(stmt.else_case) if stmt.else_case is not None else (None, False)
            return (tirx.IfThenElse(stmt.condition, t, e), True) if (c1 or c2) else (stmt, False)
        return stmt, False

    @tirx.transform.prim_func_pass(opt_level=0)
    def _pass(func, mod, ctx):
        body, changed = visit(func.body)
        return func.with_body(body) if changed else func

    return _pass


# the largest buffer a parallel task allocates on its stack, and the most bytes of them per function
# (stack_buffers_pass). LLVM puts every such alloca in the task's entry block, for every parallel loop
# of the function together (no lifetime markers), and probes no stack, so the total is what a task's
# stack must hold: TVM's workers and the calling thread run on the platform's default thread stack
# (8 MB with glibc; musl's is 128 KB), so 128 KB in all stays within either
STACK_BUFFER_BYTES = 64 * 1024
STACK_TOTAL_BYTES = 128 * 1024


def _alloc_bytes(buf) -> int | None:
    """Bytes of a buffer of static shape, or None."""
    n = 1
    for d in buf.shape:
        if not isinstance(d, _tvm.tvm().tirx.IntImm):
            return None
        n *= int(d)
    return n * int(buf.dtype.bits) * int(buf.dtype.lanes) // 8


def stack_buffers_pass(limit: int = STACK_BUFFER_BYTES, total: int = STACK_TOTAL_BYTES):
    """A TIR pass (after the default lowering) that puts the buffers a parallel task allocates, of static
    size up to ``limit`` bytes, on the task's stack instead of TVM's workspace pool, first come first
    served until they add up to ``total`` bytes in the function (the rest stay with the pool).

    Why: TVM serves an allocation of 1 KB or more through ``TVMBackendAllocWorkspace`` and
    ``TVMBackendFreeWorkspace``, calls into the runtime made in every iteration of the parallel loop
    that holds the buffer: ghost BN channels-last (N, C) allocated three 4 KB buffers per group, six
    runtime calls for 16 KB of x. Marked ``disable_lower_builtin``, the allocation stays an LLVM
    ``alloca`` in the task's entry block.
    """
    tvm = _tvm.tvm()
    tirx = tvm.tirx

    @tirx.transform.prim_func_pass(opt_level=0)
    def _pass(func, mod, ctx):
        changed = [False]
        used = [0]

        def visit(stmt, in_par):
            if isinstance(stmt, tirx.AllocBuffer):
                if not in_par or str(stmt.buffer.scope()) != "global":
                    return stmt
                nbytes = _alloc_bytes(stmt.buffer)
                if nbytes is None or nbytes > limit or used[0] + nbytes > total:
                    return stmt
                ann = dict(stmt.annotations) if stmt.annotations else {}
                if "disable_lower_builtin" in ann:
                    return stmt
                ann["disable_lower_builtin"] = tirx.IntImm("int32", 1)
                used[0] += nbytes
                changed[0] = True
                return tirx.AllocBuffer(stmt.buffer, ann, stmt.span)
            if isinstance(stmt, tirx.SeqStmt):
                return tirx.SeqStmt([visit(x, in_par) for x in stmt.seq])
            if isinstance(stmt, tirx.For):
                body = visit(stmt.body, in_par or stmt.kind == tirx.ForKind.PARALLEL)
                if body.same_as(stmt.body):
                    return stmt
                return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                                stmt.annotations, stmt.step)
            if isinstance(stmt, tirx.AttrStmt):
                body = visit(stmt.body, in_par)
                return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
            if isinstance(stmt, tirx.IfThenElse):
                t = visit(stmt.then_case, in_par)
                e = visit(stmt.else_case, in_par) if stmt.else_case is not None else None
                return tirx.IfThenElse(stmt.condition, t, e)
            return stmt

        body = visit(func.body, False)
        return func.with_body(body) if changed[0] else func

    return _pass


CPU_PIPELINE = "bncompile_cpu"


def cpu_pipeline(streaming: bool) -> str:
    """Register (once) and return the name of the TIR pipeline of the CPU kernels: TVM's default, then
    :func:`prefetch_pass`, then (``streaming``) :func:`nt_store_pass`, then :func:`merge_parallel_pass`, then
    :func:`stack_buffers_pass`."""
    tvm = _tvm.tvm()
    cp = _tvm.submodule("tvm.tirx.compilation_pipeline")
    name = NT_PIPELINE if streaming else CPU_PIPELINE
    if name not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            base, fin_host, fin_dev = cp.get_tir_pipeline("s_tir", **kwargs)
            passes = [base, prefetch_pass()] + ([nt_store_pass()] if streaming else []) + [merge_parallel_pass(),
                                                                                         stack_buffers_pass()]
            return tvm.transform.Sequential(passes), fin_host, fin_dev

        tvm.tirx.register_tir_pipeline(name, factory)
    return name


def nt_store_pipeline() -> str:
    """The TIR pipeline with streaming stores of y (:func:`cpu_pipeline` ``(True)``)."""
    return cpu_pipeline(True)


def nt_stores_apply(tdict: dict) -> bool:
    """Streaming stores are used for x86-64 llvm targets (the helpers use SSE's sfence)."""
    import os

    if os.environ.get("BNCOMPILE_NT_STORES", "1") == "0":
        return False
    if tdict.get("kind") != "llvm":
        return False
    triple = str(tdict.get("mtriple", "") or "")
    if triple:
        return triple.startswith("x86_64")
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")
