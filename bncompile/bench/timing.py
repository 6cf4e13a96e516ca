"""The one timer of bncompile's benchmarks: interleaved rounds.

Each round calls every runner once, in an order rotated by one every round (so none always runs
first or last, after the same neighbour); the first ``warmup`` rounds are discarded; Python's
garbage collector is paused. Slow drift of a shared machine then hits every runner alike, and the
calls of one round are adjacent in time (per-round ratios cancel drift). Wall-clock time
(``perf_counter``) and process CPU time (``process_time``, all threads) are recorded per call.

Settled rounds (:func:`time_settled`, for runtimes with thread pools). A pool's workers keep running
after a call returns, waiting for the next job: onnxruntime's spin (without yielding) for tens of
milliseconds by default, TVM 0.27's call ``sched_yield`` 300,000 times
(``TVM_THREAD_POOL_SPIN_COUNT``), hundreds of milliseconds on a busy machine. In plain interleaved
rounds those workers take the cores from the runtime that runs next, so a multi-thread ratio measures
the neighbour's spinning as much as the runtime. In settled rounds each runner, in the same rotated
order, is called twice back to back and then the timer waits until no other thread of this process is
runnable (:func:`wait_idle`: the runner's workers have gone to sleep), so:

* the first call starts on a quiet process: every runtime at its own default configuration, nobody
  else's workers running (``wall``/``cpu``);
* the second runs right after its own first, its own workers still spinning as that runtime intends:
  each runtime's steady state "alone" (``warm_wall``/``warm_cpu``);
* the wait measures the runner's spin tail: the process CPU time burned and the wall time until its
  workers slept (``spin_cpu``/``spin_wall``; ``unsettled`` counts waits that hit the time limit);
* each thread's CPU time during the first calls (:func:`thread_cpu_ns`) gives ``busy_threads``: the
  threads that ran at least :data:`BUSY_SHARE` of the busiest one's CPU time in those calls, i.e. the
  threads the runtime really ran on (relative, so a loaded machine sharing its cores does not matter;
  a worker of another pool sleeps meanwhile and does not count).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

#: the longest :func:`wait_idle` waits for a runner's workers to sleep (TVM's yield loop on a busy
#: 2-core machine took 0.4-0.5 s)
SETTLE_TIMEOUT_S = 3.0
_POLL_S = 0.0005
#: a thread counts in ``busy_threads`` when it ran this share of the busiest thread's CPU time
BUSY_SHARE = 0.25


def time_interleaved(runners: dict[str, Callable[[], object]], repeat: int, warmup: int, *,
                     tick: Callable[[], object] | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """``(wall, cpu)``: per runner, the seconds of each of the ``repeat`` kept rounds.

    ``tick`` is called after every round (warm-up included), e.g. to advance a progress bar.
    """
    names = list(runners)
    wall: dict[str, list] = {n: [] for n in names}
    cpu: dict[str, list] = {n: [] for n in names}
    with _gc_paused():
        for r in range(warmup + repeat):
            for n in _rotated(names, r):
                dt, dc = _timed(runners[n])
                if r >= warmup:
                    wall[n].append(dt)
                    cpu[n].append(dc)
            if tick:
                tick()
    return wall, cpu


@dataclass
class SettledTimes:
    """What :func:`time_settled` recorded, per runner, one entry per kept round (seconds)."""

    wall: dict = field(default_factory=dict)        # first call, started on a quiet process
    cpu: dict = field(default_factory=dict)
    warm_wall: dict = field(default_factory=dict)   # second call, right after the first
    warm_cpu: dict = field(default_factory=dict)
    spin_cpu: dict = field(default_factory=dict)    # process CPU burned after the second call returned
    spin_wall: dict = field(default_factory=dict)   # wall time until no other thread was runnable
    unsettled: dict = field(default_factory=dict)   # waits that hit SETTLE_TIMEOUT_S (kept rounds)
    busy_threads: dict = field(default_factory=dict)  # threads that ran >= BUSY_SHARE of the busiest one


def time_settled(runners: dict[str, Callable[[], object]], repeat: int, warmup: int, *,
                 tick: Callable[[], object] | None = None,
                 timeout: float = SETTLE_TIMEOUT_S) -> SettledTimes:
    """Settled interleaved rounds (see the module docstring): per runner and round, a call on a quiet
    process, a call right after it, then :func:`wait_idle` until its workers sleep."""
    names = list(runners)
    out = SettledTimes()
    for d in (out.wall, out.cpu, out.warm_wall, out.warm_cpu, out.spin_cpu, out.spin_wall):
        d.update({n: [] for n in names})
    out.unsettled.update({n: 0 for n in names})
    ignore: set = set()                        # threads still runnable at a time limit: not a pool's
    per_thread: dict = {n: {} for n in names}  # runner -> thread id -> CPU ns during its first calls
    measurable = thread_cpu_ns() is not None
    with _gc_paused():
        wait_idle(timeout, ignore=ignore)      # whatever ran before the benchmark
        for r in range(warmup + repeat):
            for n in _rotated(names, r):
                before = thread_cpu_ns() if measurable else None
                first = _timed(runners[n])
                if before is not None and r >= warmup:
                    for tid, ns in (thread_cpu_ns() or {}).items():
                        per_thread[n][tid] = per_thread[n].get(tid, 0) + ns - before.get(tid, 0)
                second = _timed(runners[n])
                spin_cpu, spin_wall, settled = wait_idle(timeout, ignore=ignore)
                if r >= warmup:
                    out.wall[n].append(first[0])
                    out.cpu[n].append(first[1])
                    out.warm_wall[n].append(second[0])
                    out.warm_cpu[n].append(second[1])
                    out.spin_cpu[n].append(spin_cpu)
                    out.spin_wall[n].append(spin_wall)
                    out.unsettled[n] += not settled
            if tick:
                tick()
    for n in names:
        top = max(per_thread[n].values(), default=0)
        out.busy_threads[n] = (sum(ns >= BUSY_SHARE * top for ns in per_thread[n].values())
                               if measurable and top > 0 else None)
    return out


def thread_cpu_ns() -> dict[int, int] | None:
    """CPU nanoseconds of every thread of this process so far: Linux's CPU-time clock of each thread id
    in ``/proc/self/task`` (clock id ``(~tid << 3) | 6``: per-thread, scheduler time). None where the OS
    does not give them."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return None
    out = {}
    for tid in tids:
        try:
            out[tid] = time.clock_gettime_ns(((~tid) << 3) | 6)
        except OSError:                        # the thread ended meanwhile
            continue
        except (AttributeError, ValueError, OverflowError):
            return None
    return out or None


def runnable_threads() -> list[int] | None:
    """Linux thread ids of this process, other than the calling thread, that are running or runnable
    (state ``R`` in ``/proc/self/task/*/stat``; a spinning worker is ``R`` even while descheduled, a
    sleeping one ``S``). None where ``/proc`` cannot tell."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    busy = []
    for tid in tids:
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:                        # the thread ended meanwhile
            continue
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R":   # "tid (comm) S ...", comm may hold ")"
            busy.append(int(tid))
    return busy


def wait_idle(timeout: float = SETTLE_TIMEOUT_S, *, probe: Callable[[], list | None] | None = None,
              ignore: set | None = None) -> tuple[float, float, bool]:
    """Wait until no other thread of this process is runnable (two polls in a row; ``probe``, default
    :func:`runnable_threads`), at most ``timeout`` seconds: ``(process CPU seconds burned meanwhile,
    wall seconds waited, settled)``. Where the probe cannot tell (no ``/proc``), waits until the
    process burns under 10% of a core over 5 ms instead. Threads in ``ignore`` do not count; at the
    time limit the threads still runnable are added to it (a thread busy that long is not a pool
    about to sleep, and later waits would only hit the limit again)."""
    probe = probe or runnable_threads
    ignore = set() if ignore is None else ignore
    c0, t0 = time.process_time(), time.perf_counter()
    quiet = 0
    while quiet < 2:
        busy = probe()
        if busy is not None:
            busy = [t for t in busy if t not in ignore]
        if time.perf_counter() - t0 > timeout:
            ignore.update(busy or ())
            return time.process_time() - c0, time.perf_counter() - t0, False
        if busy is None:
            c1 = time.process_time()
            time.sleep(0.005)
            quiet = quiet + 1 if time.process_time() - c1 < 0.0005 else 0
            continue
        quiet = 0 if busy else quiet + 1
        if quiet < 2:
            time.sleep(_POLL_S)
    return time.process_time() - c0, time.perf_counter() - t0, True


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, time.process_time() - c0


class _gc_paused:
    def __enter__(self):
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()
