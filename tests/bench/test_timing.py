"""`bncompile.bench.timing`: the one interleaved timer rotates the order every round and drops warm-up."""

from __future__ import annotations

import gc

from bncompile.bench.timing import time_interleaved


def test_rounds_rotate_the_order_and_drop_warmup():
    calls = []
    runners = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    ticks = []
    wall, cpu = time_interleaved(runners, 4, 2, tick=lambda: ticks.append(1))
    assert calls == list("abc" "bca" "cab" "abc" "bca" "cab")
    assert len(ticks) == 6
    assert {n: len(v) for n, v in wall.items()} == {"a": 4, "b": 4, "c": 4}
    assert {n: len(v) for n, v in cpu.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in wall.values() for t in v)


def test_gc_paused_while_timing_and_restored():
    seen = []
    time_interleaved({"a": lambda: seen.append(gc.isenabled())}, 2, 0)
    assert seen == [False, False] and gc.isenabled()


def test_kernel_benchmark_uses_the_one_timer():
    import bncompile.bench.kernels as kernels

    assert kernels.time_interleaved is time_interleaved
    assert not hasattr(kernels, "_time_interleaved")
