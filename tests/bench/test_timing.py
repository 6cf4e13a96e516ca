"""`bncompile.bench.timing`: the one interleaved timer rotates the order every round and drops warm-up;
settled rounds start each timed call once no other thread of the process is runnable."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import threading
import time

import pytest

from bncompile.bench import timing
from bncompile.bench.timing import time_interleaved, time_settled, wait_idle


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


# --------------------------------------------------------------------------- settled rounds

class _Pool:
    """A fake thread pool: each call leaves ``tail`` polls of a runnable worker behind it."""

    def __init__(self, tail=3):
        self.tail, self.left, self.log = tail, 0, []

    def runner(self, name):
        def call():
            self.log.append((name, self.left))   # how many polls of spinning were still due at the start
            self.left = self.tail
        return call

    def probe(self):
        if self.left:
            self.left -= 1
            return [4242]
        return []


def test_settled_rounds_call_twice_then_wait_for_the_workers(monkeypatch):
    pool = _Pool(tail=3)
    monkeypatch.setattr(timing, "runnable_threads", pool.probe)
    monkeypatch.setattr(timing, "_POLL_S", 0.0)
    ticks = []
    t = time_settled({n: pool.runner(n) for n in "abc"}, 2, 1, tick=lambda: ticks.append(1))
    names = [n for n, _ in pool.log]
    assert names == list("aabbcc" "bbccaa" "ccaabb")           # rotated rounds, two calls each
    firsts = [left for k, (_, left) in enumerate(pool.log) if k % 2 == 0]
    seconds = [left for k, (_, left) in enumerate(pool.log) if k % 2 == 1]
    assert firsts == [0] * 9                 # every timed call started with no worker runnable
    assert seconds == [3] * 9                # the back-to-back call ran beside its own spinning worker
    assert len(ticks) == 3
    for d in (t.wall, t.cpu, t.warm_wall, t.warm_cpu, t.spin_cpu, t.spin_wall):
        assert {n: len(v) for n, v in d.items()} == {"a": 2, "b": 2, "c": 2}    # warm-up dropped
    assert t.unsettled == {"a": 0, "b": 0, "c": 0}
    assert all(w >= 0 for v in t.spin_wall.values() for w in v)


def test_wait_idle_gives_up_at_the_limit_then_ignores_that_thread(monkeypatch):
    monkeypatch.setattr(timing, "runnable_threads", lambda: [1])      # a thread that never sleeps
    monkeypatch.setattr(timing, "_POLL_S", 0.001)
    ignore = set()
    cpu, wall, settled = wait_idle(0.02, ignore=ignore)
    assert not settled and wall >= 0.02 and ignore == {1}
    assert wait_idle(0.02, ignore=ignore)[2]                          # not waited for again
    fresh = iter(range(10**9))
    monkeypatch.setattr(timing, "runnable_threads", lambda: [next(fresh)])   # always another one
    t = time_settled({"a": lambda: None}, 2, 0, timeout=0.01)
    assert t.unsettled == {"a": 2}


def test_wait_idle_without_proc_falls_back_to_cpu_time():
    cpu, wall, settled = wait_idle(10.0, probe=lambda: None)   # (a TVM pool of an earlier test may spin)
    assert settled and wall >= 0.01             # two quiet 5 ms windows


@contextlib.contextmanager
def _busy_and_sleeping_threads():
    """Two threads of this process: one hashing (hashlib releases the GIL: it runs while the test
    looks), one blocked on an event; yields their Linux thread ids once both have started."""
    stop, idle, ids = threading.Event(), threading.Event(), {}
    data = b"\0" * (8 << 20)

    def busy():
        ids["busy"] = threading.get_native_id()
        while not stop.is_set():
            hashlib.sha256(data).digest()

    def sleeping():
        ids["sleeping"] = threading.get_native_id()
        idle.wait()

    threads = [threading.Thread(target=busy), threading.Thread(target=sleeping)]
    for th in threads:
        th.start()
    try:
        while len(ids) < 2:
            time.sleep(0.001)
        yield ids
    finally:
        stop.set()
        idle.set()
        for th in threads:
            th.join()


def test_runnable_threads_sees_a_busy_thread_not_a_sleeping_one():
    if timing.runnable_threads() is None:
        pytest.skip("no /proc/self/task here")
    with _busy_and_sleeping_threads() as ids:
        while ids["sleeping"] in timing.runnable_threads():     # until it blocks
            time.sleep(0.001)
        seen = set()
        for _ in range(200):
            seen.update(timing.runnable_threads())
            if ids["busy"] in seen:
                break
            time.sleep(0.001)
        assert ids["busy"] in seen and ids["sleeping"] not in seen
        assert threading.get_native_id() not in seen      # the caller is left out


def _matmul_session(threads: int, n: int = 384):
    """An onnxruntime session of an n x n MatMul (enough work to use every intra-op thread) and its run."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, [n, n]) for v in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads          # threads - 1 pool workers beside the calling thread
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {v: np.ones((n, n), np.float32) for v in "ab"}
    return lambda: sess.run(None, feeds)


def test_onnxruntime_pool_spins_after_run_and_wait_idle_sees_it_stop():
    """The reason for settled rounds: onnxruntime's intra-op workers keep running after Run returns
    (by default); wait_idle returns only once they sleep."""
    if timing.runnable_threads() is None:
        pytest.skip("no /proc/self/task here")
    run = _matmul_session(2)
    wait_idle()
    busy_after = []
    for _ in range(5):
        run()
        busy_after.append(bool(timing.runnable_threads()))
        cpu, wall, settled = wait_idle()
        assert settled and not timing.runnable_threads()
    assert any(busy_after), "onnxruntime's worker was never seen spinning after Run"


def test_busy_threads_count_the_threads_a_runtime_ran_on():
    if timing.thread_cpu_ns() is None:
        pytest.skip("no per-thread CPU clocks here")
    t = time_settled({"two": _matmul_session(2), "one": _matmul_session(1)}, 4, 1)
    assert t.busy_threads == {"two": 2, "one": 1}    # the 2-thread pool's worker sleeps during "one"


def test_busy_threads_from_per_thread_cpu(monkeypatch):
    clock = {1: 0, 2: 0, 3: 0}
    uses = {"a": {1: 10_000_000, 2: 9_000_000, 3: 1_000_000}, "b": {1: 10_000_000, 3: 2_000_000}}

    def runner(name):
        def call():
            for tid, ns in uses[name].items():
                clock[tid] += ns
        return call

    monkeypatch.setattr(timing, "thread_cpu_ns", lambda: dict(clock))
    monkeypatch.setattr(timing, "runnable_threads", lambda: [])
    t = time_settled({"a": runner("a"), "b": runner("b")}, 3, 1)
    assert t.busy_threads == {"a": 2, "b": 1}        # >= 1/4 of the busiest thread's CPU time
    monkeypatch.setattr(timing, "thread_cpu_ns", lambda: None)
    assert time_settled({"a": runner("a")}, 1, 0).busy_threads == {"a": None}


def test_thread_cpu_ns_sees_a_busy_thread_and_not_a_sleeping_one():
    first = timing.thread_cpu_ns()
    if first is None:
        pytest.skip("no per-thread CPU clocks here")
    assert threading.get_native_id() in first
    with _busy_and_sleeping_threads() as ids:
        a = timing.thread_cpu_ns()
        time.sleep(0.1)
        b = timing.thread_cpu_ns()
        assert b[ids["busy"]] - a[ids["busy"]] > 10 * (b[ids["sleeping"]] - a[ids["sleeping"]])
