"""CUDA schedule rules of the batch-normalization kernels (see :mod:`bncompile.lower.kernels.schedules`
for the rule contract and the list)."""

from __future__ import annotations

from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules._common import (CUDA_THREADS, H100_SMS, REDUCTIONS, _blocks, _inline_parameter_only, _sched)

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


def _bind_elementwise(sch, block: str, nthreads: int = CUDA_THREADS):
    loops = sch.get_loops(block)
    f = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(f, [None, nthreads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def cuda_two_phase(spec: KernelSpec, func, *, chunks: int = 64):
    """Chunked two-phase reductions with coalesced loads; works for every single-channel-run layout."""
    if not spec.training or not spec.single_channel_run:
        return None
    if spec.ghost:
        return None
    sch = _sched(func)
    names = _blocks(sch)
    C = int(spec.channel_shape[0])
    q = int(spec.shape[-1])
    channels_last = q == 1
    for b in REDUCTIONS:
        loops = sch.get_loops(b)               # c, n, p, q
        if channels_last:
            # threads along c (contiguous); rows split into `chunks` partial sums
            rows = sch.fuse(*loops[1:])
            ko, ri = sch.split(rows, [4 * chunks, None])   # few threads per block: more chunks
            rf = sch.rfactor(ko, factor_axis=0)
            rl = sch.get_loops(rf)             # c, ko, ri
            cw = min(C, 32)                    # a warp across 32 adjacent channels of a row (predicated)
            co, cin = sch.split(rl[0], [None, cw])
            sch.reorder(rl[1], co, cin, rl[2])
            bx = sch.fuse(rl[1], co)
            sch.bind(bx, "blockIdx.x")
            sch.bind(cin, "threadIdx.x")
            sch.decompose_reduction(rf, rl[2])
            # phase 2: each thread combines its channel's partials serially
            fl = sch.get_loops(b)              # c, ko
            cb, ct = sch.split(fl[0], [None, cw])
            sch.bind(cb, "blockIdx.x")
            sch.bind(ct, "threadIdx.x")
        else:
            # threads along the contiguous q axis (coalesced), blocks over (c, chunk)
            rows = sch.fuse(*loops[1:])
            ko, ri = sch.split(rows, [chunks, None])
            rf = sch.rfactor(ko, factor_axis=1)
            rl = sch.get_loops(rf)             # c, ko, ri
            bx = sch.fuse(rl[0], rl[1])
            sch.bind(bx, "blockIdx.x")
            _, tx = sch.split(rl[2], [None, CUDA_THREADS])
            sch.bind(tx, "threadIdx.x")        # cross-thread reduction (warp shuffles)
            fl = sch.get_loops(b)              # c, ko
            sch.bind(fl[0], "blockIdx.x")
            sch.bind(fl[1], "threadIdx.x")     # allreduce of the partials
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
