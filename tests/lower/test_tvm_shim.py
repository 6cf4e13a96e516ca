"""The TVM shim's process-wide choices."""

import os
import subprocess
import sys


def _pool(env):
    code = ("from bncompile.lower import tvm as t; tv = t.tvm(); "
            "print(tv.get_global_func('runtime.NumThreads')())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.strip())


def test_thread_pool_uses_every_cpu_unless_told():
    """TVM 0.27 alone sizes its pool to half the logical CPUs on x86; the shim gives it all of them (as
    onnxruntime takes), and TVM_NUM_THREADS still wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    assert _pool(env) == len(os.sched_getaffinity(0))
    assert _pool({**env, "TVM_NUM_THREADS": "1"}) == 1


def test_set_num_threads_pins_no_thread():
    """set_num_threads(n) sizes TVM's pool and pins nothing: the calling thread, and a thread it starts
    afterwards (onnxruntime's pool workers), keep every CPU the process may use, for n below, at and above
    the CPU count (n = 1 once pinned them all to CPU 0, and a 2-thread onnxruntime session after it ran on
    one core)."""
    code = ("import os, sys, threading\n"
            "from bncompile.lower import tvm as t\n"
            "before = os.sched_getaffinity(0)\n"
            "n = int(sys.argv[1])\n"
            "used = t.set_num_threads(n)\n"
            "seen = []\n"
            "th = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0))); th.start(); th.join()\n"
            "assert os.sched_getaffinity(0) == before == seen[0], (before, os.sched_getaffinity(0), seen)\n"
            "assert used == n, (used, n)\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    cpus = len(os.sched_getaffinity(0))
    for n in sorted({1, cpus, cpus + 1}):
        proc = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (n, proc.stderr[-1500:])
