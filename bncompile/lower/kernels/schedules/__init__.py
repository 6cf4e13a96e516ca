"""Schedules for the batch-normalization PrimFuncs of :mod:`bncompile.lower.kernels.compute`, per target.

A schedule is ``rule(spec, func) -> tvm.s_tir.Schedule | None``; None means "does not apply". CPU rules
take a third argument, the :class:`~bncompile.lower.kernels.schedules.machine.CpuMachine`.
:func:`schedule` tries the rules of a target kind in order. Rules never change the math. Every CPU
split divides its loop exactly: TVM 0.27 silently drops the ``T.where`` predicate of a non-divisible
split once a block is moved under the split loop (tvm-0.27.md §2), so extents are factored with
:func:`_divisor` (tests assert the scheduled CPU IR has no ``T.where``). The CUDA rules split unevenly
only where no block is moved under the split afterwards, and the predicates show in the source.

CPU (``llvm``): every rule derives its vector width and blocking from the target's vector lanes and the
host's cache sizes (:mod:`~bncompile.lower.kernels.schedules.machine`), never from one CPU. The CPU
pipeline (:func:`cpu_pipeline`) runs all the parallel loops of a kernel in one launch of the thread pool
with barriers between them (:func:`merge_parallel_pass`): one wake-up of the workers per call.
  * ``cpu_inference``: one streaming pass, parallel over rows, vectorized along the contiguous axis.
  * ``cpu_channel_first`` (x viewed as (N, P, C, Q) with Q > 1, e.g. NCHW; also ghost BN): one
    parallel task per channel does everything for that channel (shift, sum, mean, centered sum of
    squares, scalars, y), so the channel's slice comes from memory once and is re-read from cache;
    the reductions are vectorized along Q (lane blocks of each row, combined exactly, when Q has a
    vector factor >= 8 and the layout is one channel run without ghost groups; else rfactor). Ghost BN:
    a group's statistics (and its y, without renorm) under the group loop, so its v rows are re-read
    from L1, and its second pass and y prefetch the next channel's rows into L2.
  * ``cpu_channels_last_rows`` (Q == 1 with many rows per sample, e.g. NHWC): blocked statistics (x
    read from memory once: blocks of <= L2/4 get both passes while cached, then combine exactly),
    parallel over blocks, vectorized across channels.
  * ``cpu_channels_last`` (Q == 1, few rows per sample, e.g. (N, C)): statistics from blocks of R
    samples (R: as many as fit in L2/4, a multiple of 4; the batch's tail block masked, not split),
    two passes per block while it is cached, reduced 4 rows at a time per channel vector (rows of
    4 KB alias in L1), parallel over blocks, the first pass prefetching x 16 KB ahead (a row's streams
    end where the hardware prefetchers stop); a serial exact combine; y parallel over rows with the
    same split. Declines for very wide rows (fewer than 8 samples per block) and for a static batch
    whose channel stripe fits in L2/2 (``stripe_batch_max``).
  * ``cpu_channel_stripes`` (where ``cpu_channels_last`` declines): parallel over stripes of channels,
    one task per stripe doing both statistics passes and y while the stripe is in L2 (one phase). A
    kernel with a symbolic batch compiles it too and picks it per call for batches up to
    ``stripe_batch_max`` (:class:`bncompile.lower.kernels.Kernel`).
  * ``cpu_channels_last_ghost`` (ghost BN with Q == 1, e.g. NHWC): one parallel task per virtual-batch
    group (statistics vectorized across channels; y in the same task unless renorm needs every group;
    short rows prefetch the next group's); the averages over the groups as partial sums over chunks of
    8 groups, parallel over the chunks, then over the chunks' partials.
  * ``cpu_generic`` (axis lists that are not one run of axes): parallel only.
CUDA (arch sm_90 by default)
  * ``cuda_block_per_channel`` (channel-first with C >= 2x the SM count, or ghost with a static batch):
    one thread block per channel; the reductions are cross-thread (warp shuffles), y is written by the
    same block, every scalar other threads read lives in shared memory (ThreadSync puts the barriers),
    and the per-group averages of ghost BN are cross-thread reductions too (no shared read-modify-write
    by every thread).
  * ``cuda_two_phase`` (other single-run layouts): chunked partial sums through rfactor with coalesced
    loads (threads along the contiguous axis: Q for channel-first, C for channels-last), a second phase
    combining the partials, per-channel scalar kernels and an elementwise y kernel. Kernel boundaries
    order the global writes and reads, so no value is read by another thread of the kernel writing it.
  * ``cuda_generic`` (axis lists, ghost with a symbolic batch, inference): every block its own kernel
    over its fused spatial loops; reductions serial per thread. Correct, not fast.
"""

from __future__ import annotations

from bncompile.lower import tvm as _tvm
from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules._common import REDUCTIONS, Rule, _sched, log
from bncompile.lower.kernels.schedules.cpu import (NT_MIN_TASK_BYTES, NT_PIPELINE, PREFETCH_ANNOTATION,
                                                     STAT_BLOCK_FLOATS, STREAMING_RULES, Y_TASK_BYTES,
                                                     channel_stripe_width, cpu_channel_first, cpu_channel_stripes,
                                                     cpu_channels_last, cpu_channels_last_ghost, cpu_channels_last_rows,
                                                     cpu_generic, cpu_inference, cpu_pipeline, merge_parallel_pass,
                                                     nt_store_pass,
                                                     nt_store_pipeline, nt_stores_apply, prefetch_pass,
                                                     stat_block_floats, stripe_batch_max, y_task_bytes)
from bncompile.lower.kernels.schedules.cuda import cuda_block_per_channel, cuda_blocked, cuda_generic, cuda_two_phase
from bncompile.lower.kernels.schedules import backward_cpu, backward_cuda
from bncompile.lower.kernels.schedules.machine import CpuMachine, cpu_machine

# --------------------------------------------------------------------------- dispatch

RULES: dict[str, list[tuple[str, Rule]]] = {
    "llvm": [("cpu_inference", cpu_inference), ("cpu_channel_first", cpu_channel_first),
             ("cpu_channels_last_rows", cpu_channels_last_rows), ("cpu_channels_last", cpu_channels_last),
             ("cpu_channel_stripes", cpu_channel_stripes),
             ("cpu_channels_last_ghost", cpu_channels_last_ghost), ("cpu_generic", cpu_generic)],
    "cuda": [("cuda_blocked", cuda_blocked), ("cuda_block_per_channel", cuda_block_per_channel), ("cuda_two_phase", cuda_two_phase),
             ("cuda_generic", cuda_generic)],
}


def _takes_machine(fn) -> bool:
    """Whether a rule takes the CpuMachine as a third argument (the CPU rules here; a rule written as
    ``rule(spec, func)`` is called that way)."""
    import inspect

    try:
        return len(inspect.signature(fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def _apply_first(table: dict, what: str, spec: KernelSpec, func, target, rule: str | None, machine, *,
                 scoped: bool = False):
    """The first rule of ``table[target kind]`` that applies (or the named ``rule``): (name, schedule).
    A named rule runs as its ``when_named`` variant where it has one (no deferring to a preferred rule).
    CPU rules that take a :class:`CpuMachine` get one (``machine``, default: the target's vector lanes
    and this host's caches); ``scoped`` runs the rules inside the target's scope (rules that read the
    vector width from the current target)."""
    import contextlib

    from bncompile.errors import UnsupportedError

    kind = _tvm.target_kind(target)
    rules = table.get(kind)
    if rules is None:
        raise UnsupportedError(f"target: no {what} schedules for target kind {kind!r}; use 'llvm' or 'cuda'")
    with _tvm.make_target(target) if scoped else contextlib.nullcontext():
        for name, fn in rules:
            if rule is not None and name != rule:
                continue
            if rule is not None:                    # asked for by name: no deferring to another rule
                fn = getattr(fn, "when_named", fn)
            if kind == "llvm" and _takes_machine(fn):
                if machine is None:
                    from bncompile.lower import targets

                    machine = cpu_machine(targets.target_dict(target))
                sch = fn(spec, func, machine)
            else:
                sch = fn(spec, func)
            if sch is not None:
                log.debug("%s kernel %s: schedule %s", what, spec.kinds, name)
                return name, sch
    if rule is not None:
        raise UnsupportedError(f"schedule {rule!r} does not apply to layout {spec.kinds} {spec.shape}")
    return "unscheduled", _sched(func)


def schedule(spec: KernelSpec, func, *, target="llvm", rule: str | None = None, machine: CpuMachine | None = None):
    """Apply the first rule for ``target`` that applies (or the named ``rule``); returns (name, sch).

    CPU rules get a :class:`~bncompile.lower.kernels.schedules.machine.CpuMachine` (``machine``, default:
    the target's vector lanes and this host's caches) and derive their blocking from it."""
    return _apply_first(RULES, "batch-normalization", spec, func, target, rule, machine)


# the backward kernels (bncompile.lower.kernels.backward): rules per target in backward_cpu / backward_cuda
BACKWARD_RULES: dict[str, list[tuple[str, Rule]]] = {"llvm": backward_cpu.RULES, "cuda": backward_cuda.RULES}


def schedule_backward(spec: KernelSpec, func, *, target="llvm", rule: str | None = None,
                      machine: CpuMachine | None = None):
    """Like :func:`schedule`, for the backward PrimFunc of ``spec``."""
    return _apply_first(BACKWARD_RULES, "backward", spec, func, target, rule, machine, scoped=True)


__all__ = ["CpuMachine", "cpu_machine", "stat_block_floats", "y_task_bytes", "RULES", "BACKWARD_RULES", "schedule_backward", "REDUCTIONS", "NT_MIN_TASK_BYTES", "NT_PIPELINE", "STAT_BLOCK_FLOATS", "STREAMING_RULES",
           "Y_TASK_BYTES", "PREFETCH_ANNOTATION", "Rule", "cpu_pipeline", "prefetch_pass", "nt_store_pass", "merge_parallel_pass", "nt_store_pipeline", "nt_stores_apply", "schedule", "cpu_channel_first", "cpu_channel_stripes", "channel_stripe_width", "stripe_batch_max", "cpu_channels_last", "cpu_channels_last_ghost", "cpu_generic", "cpu_inference",
           "cuda_blocked", "cuda_block_per_channel", "cuda_two_phase", "cuda_generic"]
