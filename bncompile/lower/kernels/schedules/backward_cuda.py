"""CUDA schedule rules of the backward kernels (:mod:`bncompile.lower.kernels.backward`).

* ``bwd_cuda_block_per_channel`` (channel-first with C >= 2x the SM count, or ghost with a static
  batch): one thread block per channel; its one-pass reduction (four compensated sums) is a
  cross-thread reduction (warp shuffles), the per-channel scalars live in shared memory (every scalar
  other threads read: ThreadSync puts the barriers), and the same block writes the channel's dx, so x
  and dy are read once for the sums and once more, from L2, for dx. Ghost BN: the group loop is serial
  in the block, the sums over groups are cross-thread.
* ``bwd_cuda_two_phase`` (training, one channel run, no ghost groups, static dimensions but the batch):
  three kernels: the one-pass reduction's partial sums (``cuda.partial_sums``: per (channel, sample)
  with a cross-thread reduction along the contiguous axis, channel first; per (sample, block of rows)
  with a thread per channel, channels last; (N, C): row blocks of 8 samples stored block-major), one
  thread block per channel combining them with every per-channel value (``cuda.per_channel_kernels``:
  intermediates in shared memory), and dx element-wise with 16-byte accesses where the layout allows.
  x and dy are read once for the sums and once for dx.
* ``bwd_cuda_generic`` (every other layout, inference): the forward's generic rule, every block its
  own kernel over its spatial loops, reductions serial per thread. Correct, not fast.
"""

from __future__ import annotations

from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules.cuda import block_per_channel_applies
from bncompile.lower.kernels.schedules._common import CUDA_THREADS, H100_SMS, _blocks, _inline_parameter_only, _sched
from bncompile.lower.kernels.schedules.cuda import (Y_VECTOR, _channel_threads, _unroll_static, cuda_generic,
                                                    elementwise_kernel, layout_fits, partial_sums,
                                                    per_channel_kernels)

_GROUP_SUMS = ("batch_mean64", "batch_var", "dgamma64", "dbeta64")
_OUTPUTS = ("dx", "dgamma", "dbeta")


def bwd_cuda_block_per_channel(spec: KernelSpec, func, *, sms: int = H100_SMS):
    if not block_per_channel_applies(spec, sms):
        return None
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nstat = 2 if spec.ghost else 1
    c = sch.get_loops("shift")[0]
    sch.bind(c, "blockIdx.x")
    for b in [n for n in names if n != "shift"]:
        sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    loops = sch.get_loops("red")
    r = sch.fuse(*loops[1 + nstat:])     # c | c', [g], reduce...
    _, tx = sch.split(r, [None, CUDA_THREADS])
    sch.bind(tx, "threadIdx.x")
    for b in _GROUP_SUMS:
        if b in names:
            g = sch.get_loops(b)[-1]
            _, tx = sch.split(g, [None, min(CUDA_THREADS, 32 * -(-int(spec.stat_shape[-1]) // 32))])
            sch.bind(tx, "threadIdx.x")
    f = sch.fuse(*sch.get_loops("dx")[1:])
    _, tx = sch.split(f, [None, CUDA_THREADS])
    sch.bind(tx, "threadIdx.x")
    for b in names:
        if b in _OUTPUTS:
            continue
        for k in range(len(sch.get(sch.get_sblock(b)).writes)):   # the reduction writes eight
            sch.set_scope(sch.get_sblock(b), k, "shared")
    return sch


ROW_BLOCK = 8       # (N, C) layouts: samples per row block of the reduction (backward.py LANE_BLOCK at most)


def bwd_cuda_two_phase(spec: KernelSpec, func):
    if not spec.training or spec.ghost or spec.kinds != "RRCR":
        return None
    _, P, C, Q = spec.shape
    if not all(isinstance(d, int) for d in (P, C, Q)) or not layout_fits(C, Q):
        return None
    import dataclasses

    from bncompile.lower.kernels.backward import LANE_BLOCK, backward_prim_func

    rows = Q == 1 and P * Q <= LANE_BLOCK // 4          # few values per sample: row blocks of samples
    if rows:
        spec = dataclasses.replace(spec, stat_rows=max(2, min(ROW_BLOCK, LANE_BLOCK // (P * Q))))
        func = backward_prim_func(spec)
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))        # one masked load of x per use; no kernel of its own
    names.remove("shift")
    if rows:
        # bsum (NB, C): a thread per channel adds its R samples' values serially, stored block-major
        nb, c, *red = sch.get_loops("bsum")
        co, ci = sch.split(c, [None, _channel_threads(C)])
        sch.bind(sch.fuse(nb, co), "blockIdx.x")
        sch.bind(ci, "threadIdx.x")
        for r in red:
            _unroll_static(sch, r)
        names.remove("bsum")
    else:
        partial_sums(sch, "red", C, P, Q == 1)
    per_channel_kernels(sch, ["red"], [n for n in names if n not in ("red", "dx")], C)
    vec = Y_VECTOR if (C if Q == 1 else Q) % Y_VECTOR == 0 and spec.dtype == "float32" else 1
    elementwise_kernel(sch, "dx", vec)
    return sch


def bwd_cuda_generic(spec: KernelSpec, func):
    return cuda_generic(spec, func)


RULES = [("bwd_cuda_two_phase", bwd_cuda_two_phase), ("bwd_cuda_block_per_channel", bwd_cuda_block_per_channel),
         ("bwd_cuda_generic", bwd_cuda_generic)]

__all__ = ["RULES", "bwd_cuda_two_phase", "bwd_cuda_block_per_channel", "bwd_cuda_generic"]
