"""CUDA schedule rules of the batch-normalization kernels (see :mod:`bncompile.lower.kernels.schedules`
for the rule contract and the list)."""

from __future__ import annotations

from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules._common import (CUDA_THREADS, H100_SMS, REDUCTIONS, _blocks, _divisor,
                                                       _inline_parameter_only, _sched, log)

# --------------------------------------------------------------------------- CUDA

def _cuda_scalar_blocks(names: list[str]) -> list[str]:
    return [n for n in names if n not in ("shift", "y") + REDUCTIONS and not n.endswith("_new")]


def block_per_channel_applies(spec: KernelSpec, sms: int = H100_SMS) -> bool:
    """Whether one thread block per channel suits ``spec``: training, one channel run, channel-first,
    at least two channels per SM (or ghost BN with a static batch)."""
    if not spec.training or not spec.single_channel_run or spec.shape[-1] == 1:
        return False
    if int(spec.channel_shape[0]) < 2 * sms and not spec.ghost:
        return False
    # per-group scalars of a symbolic group count cannot be shared
    return not (spec.ghost and any(not isinstance(d, int) for d in spec.shape))


def cuda_block_per_channel(spec: KernelSpec, func, *, sms: int = H100_SMS):
    """One thread block per channel (stats, scalars and y); for channel-first layouts with many channels."""
    if not block_per_channel_applies(spec, sms):
        return None
    if spec.adjustment == "full" and spec.ghost:
        return None
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nthreads = CUDA_THREADS
    nstat = 2 if spec.ghost else 1
    c = sch.get_loops("shift")[0]
    sch.bind(c, "blockIdx.x")
    for b in [n for n in names if n != "shift"]:
        sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    for b in REDUCTIONS:
        loops = sch.get_loops(b)
        r = sch.fuse(*loops[1 + nstat:])     # loops: c | c', [g], reduce...
        _, tx = sch.split(r, [None, nthreads])
        sch.bind(tx, "threadIdx.x")
    # ghost: the averages over the groups are cross-thread reductions too (a serial reduction that every
    # thread of the block ran on the same shared accumulator would race)
    for b in ("batch_shift", "batch_offset", "batch_var"):
        if b in names:
            g = sch.get_loops(b)[-1]
            _, tx = sch.split(g, [None, min(nthreads, 32 * -(-int(spec.stat_shape[-1]) // 32))])
            sch.bind(tx, "threadIdx.x")
    yl = sch.get_loops("y")
    f = sch.fuse(*yl[1:])
    _, tx = sch.split(f, [None, nthreads])
    sch.bind(tx, "threadIdx.x")
    # every scalar read by other threads of this block lives in shared memory
    for b in ["shift", *REDUCTIONS, *_cuda_scalar_blocks(names)]:
        for k in range(len(sch.get(sch.get_sblock(b)).writes)):   # the compensated sums write two
            sch.set_scope(sch.get_sblock(b), k, "shared")
    return sch


# cuda_blocked's tunables (measured on an H200: docs/cuda-kernels.md)
BLOCKED_THREADS = 256        # most threads of a channel-first statistics block (one block per sample and channel)
BLOCKED_VALUES = 4096        # channel first: rows of P per statistics block while the block holds at most this
BLOCKED_ROWS = 64            # channels last: rows of P per statistics block
BLOCKED_SAMPLES = 32         # channels last with one row per sample ((N, C)): samples per statistics block
CHANNEL_THREADS = 128        # threads combining one channel's block partials
CHANNELS_LAST_THREADS = 256  # channels last: threads across the channels of a block (more blocks, fewer serial rows)
Y_THREADS = 256
Y_VECTOR = 4                 # float32 values per thread access of the y pass (16-byte loads and stores)
VALUES_PER_THREAD = 24       # channel first: statistics threads for about this many values each (0: BLOCKED_THREADS)
REGISTER_SUMS = True         # channels last: a thread's serial sums accumulate in registers, stored once
ROW_UNROLL = 8               # ... their rows unrolled by (an exact divisor up to) this many
MERGED_CHANNEL_KERNEL = True  # the two combining reductions share one kernel (Schedule.merge)


def _stat_threads(values: int) -> int:
    """Threads of a channel-first statistics block of ``values`` values: BLOCKED_THREADS, or with
    VALUES_PER_THREAD set the largest power of two (32 to BLOCKED_THREADS) giving each about that many:
    a block's two cross-thread reductions cost the same whatever its size, so small planes (28x28: 784
    values) spend most of their time in them with 256 threads."""
    if not VALUES_PER_THREAD:
        return BLOCKED_THREADS
    t = 32
    while t * 2 <= BLOCKED_THREADS and t * 2 * VALUES_PER_THREAD <= values:
        t *= 2
    return t


def _thread_split(sch, loop, threads: int):
    """Split ``loop`` into (outer, threadIdx.x) of ``threads``; a static extent of at most ``threads``
    is bound whole (a predicate such as ``threadIdx.x < 1`` around a cross-thread reduction would put
    its barriers inside a condition, which TVM refuses)."""
    ext = sch.get(loop).extent
    try:
        ext = int(ext)
    except TypeError:
        ext = None
    if ext is not None and ext <= threads:
        sch.bind(loop, "threadIdx.x")
        return loop
    outer, tx = sch.split(loop, [None, threads])
    sch.bind(tx, "threadIdx.x")
    _unroll_static(sch, outer)
    return tx


UNROLL_MAX = 32     # serial loops of at most this many static iterations are unrolled (loads in flight)


def _unroll_static(sch, loop) -> None:
    """Unroll a thread's serial ``loop`` when its extent is static and at most :data:`UNROLL_MAX`: its
    loads are independent of the running sums, and unrolled they are all in flight at once (measured
    on an H200: a statistics pass of 13 loads a thread moved 1.5 TB/s rolled, about half the copy's
    bandwidth, for want of loads in flight)."""
    try:
        ext = int(sch.get(loop).extent)
    except TypeError:
        return
    if 1 < ext <= UNROLL_MAX:
        sch.unroll(loop)


MAX_GRID_Y = 65535


def layout_fits(C: int, Q: int, *, stripe=None) -> bool:
    """Whether the rules that put the channel on blockIdx.y (channel first) or a stripe of channels on
    the threads (channels last; ``stripe(C)`` threads, default :func:`_channel_threads`) suit C channels:
    at most 65535 channels (the grid's y limit), stripes of at least 32 channels (a warp; a C such as
    1031 would leave one thread per block)."""
    if Q > 1:
        return C <= MAX_GRID_Y
    return (stripe or _channel_threads)(C) >= min(C, 32)


def _forward_stripe(C: int) -> int:
    """Channels per block of cuda_blocked's channels-last statistics: all up to 1024, else an exact
    stripe of up to 512."""
    return C if C <= 1024 else _divisor(C, 512)


def _channel_threads(C: int) -> int:
    """Threads across the channels of a channels-last block: all of them up to CHANNELS_LAST_THREADS,
    else an exact divisor (blocks move under the split)."""
    return C if C <= CHANNELS_LAST_THREADS else _divisor(C, CHANNELS_LAST_THREADS)


def blocked_spec(spec: KernelSpec) -> KernelSpec | None:
    """The blocked-statistics spec cuda_blocked computes (compute.py ``_blocked_statistics``), or None
    where the rule does not apply (inference, ghost BN, axis lists, a short contiguous run Q < 32 that is
    not channels last, a symbolic dimension other than the batch)."""
    import dataclasses

    if not spec.training or spec.ghost or spec.kinds != "RRCR":
        return None
    _, P, C, Q = spec.shape
    if not all(isinstance(d, int) for d in (P, C, Q)) or not layout_fits(C, Q, stripe=_forward_stripe):
        return None
    if Q == 1:
        if P == 1:
            return dataclasses.replace(spec, stat_block=1, stat_rows=BLOCKED_SAMPLES)
        return dataclasses.replace(spec, stat_block=_divisor(P, BLOCKED_ROWS))
    if Q >= 32:
        return dataclasses.replace(spec, stat_block=_divisor(P, max(1, BLOCKED_VALUES // Q)))
    return None


def _shared_for_kernel(sch, blocks: list[str], loop, outside: list[str]) -> None:
    """Every buffer ``blocks`` write (all under the block-bound ``loop``; function outputs excepted) in
    shared memory: other threads of the block read them, and ThreadSync puts the barriers (a scalar
    block runs on every thread, a cross-thread reduction writes from thread 0). A block of ``outside``
    (a later kernel) that reads one of them reads a global copy, written under ``loop`` too."""
    params = {p.name for p in sch.mod["main"].params}
    mine = set()
    for b in blocks:
        blk = sch.get_sblock(b)
        for k, w in enumerate(sch.get(blk).writes):
            if w.source.name not in params:          # outputs stay where the caller gave them
                sch.set_scope(blk, k, "shared")      # renames the buffer (<name>_shared)
        mine.update(w.source.name for w in sch.get(blk).writes if w.source.name not in params)
    readers: dict[str, list] = {}           # buffer name -> [(outside block, its read index)]
    for o in outside:
        for k, r in enumerate(sch.get(sch.get_sblock(o)).reads):
            if r.source.name in mine:
                readers.setdefault(r.source.name, []).append((o, k))
    for found in readers.values():
        o, k = found[0]
        cp = sch.cache_read(sch.get_sblock(o), k, "global", consumer_blocks=[sch.get_sblock(r) for r, _ in found])
        sch.reverse_compute_at(cp, loop)


def cuda_blocked(spec: KernelSpec, func):
    """Training, one channel run, channel first with a contiguous run Q >= 32 or channels last; three
    kernels: (1) per statistics block (a sample's plane of a channel, or rows of a sample by a stripe of
    channels) its sum and centred sum of squares, the second pass re-reading the block from L1; (2) one
    thread block per channel combines the block partials exactly (Chan et al.) and computes every
    per-channel value (mean, variance, scale, the updated variables); (3) y, element-wise, 16-byte
    accesses where the layout allows. x is read from memory once for the statistics and once for y
    (from L2 where x fits it)."""
    bspec = blocked_spec(spec)
    if bspec is None:
        return None
    from bncompile.lower.kernels.compute import prim_func

    try:
        return _cuda_blocked(bspec, prim_func(bspec))
    except (TypeError, AttributeError, NameError, KeyError):
        raise                                            # a bug here, not a layout the primitives refuse
    except Exception as err:  # noqa: BLE001 - a layout TVM's primitives refuse: the next rule takes it
        log.warning("cuda_blocked does not apply to %s %s: %s", spec.kinds, spec.shape, str(err).splitlines()[-1:])
        return None


def _sums_in_registers(sch, block, thread_loop) -> None:
    """The thread-serial reduction ``block`` (under ``thread_loop``, its rows serial below it) accumulates
    in local (register) copies of its outputs, each written back once under ``thread_loop``: without
    this its running sums live in their global output, a load and a store per row (read in the source
    the H200 ran), and each row's load waits on the last row's store. The rows are then unrolled by up
    to :data:`ROW_UNROLL` (exactly: TVM 0.27 loses an uneven split's predicate under some primitives),
    so that many loads are in flight."""
    blk = sch.get_sblock(block) if isinstance(block, str) else block
    for k in range(len(sch.get(blk).writes)):
        wb = sch.cache_write(blk, k, "local")
        # the first write-back lands at the root, a later one beside the earlier (under thread_loop)
        if not any(sch.get_sref(lp).same_as(sch.get_sref(thread_loop)) for lp in sch.get_loops(wb)):
            sch.reverse_compute_at(wb, thread_loop, preserve_unit_loops=True)
    loops = sch.get_loops(blk)
    at = [i for i, lp in enumerate(loops) if sch.get_sref(lp).same_as(sch.get_sref(thread_loop))]
    rows = loops[at[0] + 1:] if at else []
    if ROW_UNROLL > 1 and rows:
        r = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        try:
            ext = int(sch.get(r).extent)
        except TypeError:
            return
        u = _divisor(ext, ROW_UNROLL)
        if u > 1:
            _, ri = sch.split(r, [None, u])
            sch.unroll(ri)


def _cuda_blocked(spec: KernelSpec, func):
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))        # one masked load of x per use; no kernel of its own
    names.remove("shift")
    _, P, C, Q = spec.shape
    channels_last = Q == 1
    # (1) the block statistics
    loops = sch.get_loops("bsum")                        # c, n, pb, j | [ri], bi, bq
    if channels_last:
        # all channels in one block up to 1024 (else exact stripes of up to 512): on an H200 the
        # (65536, 1024) forward took 0.41 ms this way, 4.2 ms with 256-channel stripes (both with the
        # sums in memory)
        co, ci = sch.split(loops[0], [None, _forward_stripe(C)])     # exact: blocks move under it
        sch.reorder(loops[1], loops[2], loops[3], co, ci)
        bx = sch.fuse(loops[1], loops[2], loops[3], co)
        sch.bind(bx, "blockIdx.x")
        sch.bind(ci, "threadIdx.x")                      # a thread's sums are its own: no sharing
        if REGISTER_SUMS:
            _sums_in_registers(sch, "bsum", ci)
        sch.reverse_compute_at(sch.get_sblock("bm2"), bx, preserve_unit_loops=True)
        blk = sch.get(sch.get_sblock("bm2"))
        nsp = sum(1 for iv in blk.iter_vars if int(iv.iter_type) == 0)
        bl = sch.get_loops("bm2")[1:]
        tx = sch.fuse(*bl[:nsp])
        sch.bind(tx, "threadIdx.x")
        if REGISTER_SUMS:
            _sums_in_registers(sch, "bm2", tx)
    else:
        # the channel on blockIdx.y, (sample, row block, lane) on blockIdx.x: decoding a fused index
        # whose extent holds the symbolic batch would divide by it for every element (measured on an
        # H200: 62 us for x of 25.7 MB against 15 us for its copy)
        sch.bind(loops[0], "blockIdx.y")
        bx = sch.fuse(*loops[1:4])
        sch.bind(bx, "blockIdx.x")
        threads = _stat_threads(spec.stat_block * Q)
        _thread_split(sch, sch.fuse(*loops[4:]), threads)     # cross-thread (warp shuffles)
        # the block sum is read by every thread of the block (bm2): shared, with a global copy for (2)
        _shared_for_kernel(sch, ["bsum"], bx, ["sum", "sqsum"])
        sch.reverse_compute_at(sch.get_sblock("bm2"), bx, preserve_unit_loops=True)
        blk = sch.get(sch.get_sblock("bm2"))
        nsp = sum(1 for iv in blk.iter_vars if int(iv.iter_type) == 0)
        bl = sch.get_loops("bm2")[1:]
        _thread_split(sch, sch.fuse(*bl[nsp:]), threads)
    # (2) per channel: one kernel of a thread block per channel (cross-thread over the block partials)
    # for both combining reductions and every per-channel value
    per_channel_kernels(sch, ["sum", "sqsum"],
                        [n for n in names if n not in ("bsum", "bm2", "sum", "sqsum", "y") and "_global" not in n], C,
                        merge=MERGED_CHANNEL_KERNEL)
    # (3) y
    vec = Y_VECTOR if (C if channels_last else Q) % Y_VECTOR == 0 and spec.dtype == "float32" else 1
    elementwise_kernel(sch, "y", vec)
    return sch


def _bind_elementwise(sch, block: str, nthreads: int = CUDA_THREADS):
    loops = sch.get_loops(block)
    f = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(f, [None, nthreads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def partial_sums(sch, block: str, C: int, P: int, channels_last: bool) -> None:
    """Phase 1 of a two-phase reduction ``block`` (loops c, n, p, q): ``rfactor`` into partial sums with
    coalesced loads, every split exact (TVM 0.27 drops the predicate of an uneven split once rfactor
    puts a block under it: the sums came out wrong on a GPU). Channel first: a partial per (channel,
    sample), the channel on blockIdx.y, the sample on blockIdx.x, a cross-thread reduction over the
    sample's rows. Channels last: a partial per (sample, block of rows), stored (partial, channel), a
    thread per channel adding the block's rows serially. Leaves ``block`` as the combine over the
    partials (loops c, k)."""
    c, n, p, q = sch.get_loops(block)
    if channels_last:
        pb, bi = sch.split(p, [None, _divisor(P, BLOCKED_ROWS)])
        k = sch.fuse(n, pb)
        rf = sch.rfactor(k, factor_axis=0)
        c, k, bi, q = sch.get_loops(rf)
        co, ci = sch.split(c, [None, _channel_threads(C)])
        sch.reorder(k, co, ci, bi, q)
        sch.bind(sch.fuse(k, co), "blockIdx.x")
        sch.bind(ci, "threadIdx.x")
        if REGISTER_SUMS:
            _sums_in_registers(sch, rf, ci)
        else:
            _unroll_static(sch, bi)
    else:
        rf = sch.rfactor(n, factor_axis=1)
        c, n, p, q = sch.get_loops(rf)
        sch.bind(c, "blockIdx.y")
        sch.bind(n, "blockIdx.x")
        _thread_split(sch, sch.fuse(p, q), CUDA_THREADS)     # cross-thread reduction (warp shuffles)


def per_channel_kernels(sch, owners: list[str], blocks: list[str], C: int, threads: int = CHANNEL_THREADS,
                        *, merge: bool = False) -> None:
    """Per-channel kernels: each block of ``owners`` (a reduction with loops c, then the reduced ones)
    becomes a kernel of one thread block per channel, reduced across ``threads`` threads; every block of
    ``blocks`` (per-channel values) goes under the first owner whose kernel holds all its producers, else
    is a kernel of its own over the channels. In an owner's kernel every intermediate lives in shared
    memory (the scalar blocks run on every thread; :func:`_shared_for_kernel`).

    ``merge``: the owners' channel loops (siblings of one extent, in dataflow order) become one loop
    (``Schedule.merge``), so the owners and everything under them are one kernel: one launch instead of
    one per owner. ``reverse_compute_at`` cannot do this: it moves a block under a loop only with all its
    producers, and each owner reads the statistics kernel's partials."""
    members = {b: [b] for b in owners}
    alone = []          # blocks no owner's kernel holds: kernels of their own
    for b in blocks:
        for owner in owners:
            try:
                sch.reverse_compute_at(sch.get_sblock(b), sch.get_loops(owner)[0], preserve_unit_loops=True)
                members[owner].append(b)
                break
            except (TypeError, AttributeError, NameError, KeyError):
                raise
            except Exception:  # noqa: BLE001 - TVM refuses: a producer lives in another kernel
                continue
        else:
            _bind_elementwise(sch, b, min(CUDA_THREADS, 32 * -(-C // 32)))
            alone.append(b)
    # merge puts the joined loop where the last owner's was, checking no dependence: a kernel of its own
    # between the owners that reads the first would then run before it, so none may exist
    if merge and len(owners) > 1 and not alone:
        groups = {owners[0]: [b for o in owners for b in members[o]]}
        sch.merge(*[sch.get_loops(o)[0] for o in owners])
    else:
        groups = members
    for owner in groups:
        sch.bind(sch.get_loops(owner)[0], "blockIdx.x")
    for b in owners:
        red = sch.get_loops(b)[1:]
        _thread_split(sch, sch.fuse(*red) if len(red) > 1 else red[0], threads)
    everything = _blocks(sch)
    for owner, group in groups.items():
        _shared_for_kernel(sch, group, sch.get_loops(owner)[0], [b for b in everything if b not in group])


def elementwise_kernel(sch, block: str, vector: int) -> None:
    """The element-wise pass ``block`` as one kernel over its fused loops, ``vector`` values per thread
    access (their total must divide by it)."""
    f = sch.fuse(*sch.get_loops(block))
    if vector > 1:
        f, vi = sch.split(f, [None, vector])
    bx, tx = sch.split(f, [None, Y_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if vector > 1:
        sch.vectorize(vi)


def cuda_two_phase(spec: KernelSpec, func):
    """Chunked two-phase reductions with coalesced loads; works for every single-channel-run layout."""
    if not spec.training or not spec.single_channel_run:
        return None
    if spec.ghost or spec.kinds != "RRCR" or not all(isinstance(d, int) for d in spec.shape[1:]):
        return None
    if not layout_fits(int(spec.shape[2]), int(spec.shape[3])):
        return None
    sch = _sched(func)
    names = _blocks(sch)
    C = int(spec.channel_shape[0])
    q = int(spec.shape[-1])
    channels_last = q == 1
    P = int(spec.shape[1])
    for b in REDUCTIONS:
        partial_sums(sch, b, C, P, channels_last)
        fl = sch.get_loops(b)                  # c, k: a thread block per channel across the partials
        sch.bind(fl[0], "blockIdx.x")
        _thread_split(sch, fl[1], CHANNEL_THREADS)
    for b in ["shift", *_cuda_scalar_blocks(names), *[n for n in names if n.endswith("_new")]]:
        _bind_elementwise(sch, b, min(CUDA_THREADS, 32 * -(-C // 32)))
    _bind_elementwise(sch, "y")
    return sch


def cuda_generic(spec: KernelSpec, func):
    """Fallback for layouts the rules above skip (axis lists, ghost with full adjustment, inference)."""
    sch = _sched(func)
    names = _blocks(sch)
    for b in names:
        loops = sch.get_loops(b)
        blk = sch.get(sch.get_sblock(b))
        # TE blocks list their spatial iters first, one loop each, so the spatial loops lead
        spatial = [l for l, iv in zip(loops, blk.iter_vars) if int(iv.iter_type) == 0]
        if not spatial:
            continue
        f = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(f, [None, 64 if len(spatial) < len(loops) else CUDA_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch
