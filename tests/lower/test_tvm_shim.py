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
