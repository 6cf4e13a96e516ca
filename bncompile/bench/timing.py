"""The one timer of bncompile's benchmarks: interleaved rounds.

Each round calls every runner once, in an order rotated by one every round (so none always runs
first or last, after the same neighbour); the first ``warmup`` rounds are discarded; Python's
garbage collector is paused. Slow drift of a shared machine then hits every runner alike, and the
calls of one round are adjacent in time (per-round ratios cancel drift). Wall-clock time
(``perf_counter``) and process CPU time (``process_time``, all threads) are recorded per call.
"""

from __future__ import annotations

import gc
import time
from typing import Callable


def time_interleaved(runners: dict[str, Callable[[], object]], repeat: int, warmup: int, *,
                     tick: Callable[[], object] | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """``(wall, cpu)``: per runner, the seconds of each of the ``repeat`` kept rounds.

    ``tick`` is called after every round (warm-up included), e.g. to advance a progress bar.
    """
    names = list(runners)
    wall: dict[str, list] = {n: [] for n in names}
    cpu: dict[str, list] = {n: [] for n in names}
    perf, cpu_clock = time.perf_counter, time.process_time
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + repeat):
            k = r % len(names) if names else 0
            for n in names[k:] + names[:k]:
                fn = runners[n]
                c0 = cpu_clock()
                t0 = perf()
                fn()
                dt = perf() - t0
                dc = cpu_clock() - c0
                if r >= warmup:
                    wall[n].append(dt)
                    cpu[n].append(dc)
            if tick:
                tick()
    finally:
        if gc_was:
            gc.enable()
    return wall, cpu
