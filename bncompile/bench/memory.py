"""Peak memory of one variant, measured in a fresh subprocess (``python -m bncompile.bench.memory
'<json spec>'``) so that one variant's freed memory, kept by the allocator, cannot hide another's.

Linux's peak-RSS counter ``VmHWM`` is reset to the current RSS by writing ``5`` to
``/proc/self/clear_refs``: ``peak_kb`` is the highest RSS while loading and running
:data:`PROBE_RUNS` times minus the RSS before loading, ``run_kb`` the highest RSS during the runs
minus the RSS just before them. Where ``clear_refs`` cannot be written, ``ru_maxrss`` (monotonic)
gives ``peak_kb`` only. The subprocess prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

PROBE_RUNS = 3
PROBE_TIMEOUT_S = 900


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """The subprocess: ``argv[0]`` is the JSON spec; prints one JSON line."""
    import resource

    from bncompile.bench.variants import ort_runner, pin_tvm_threads

    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    with np.load(spec["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    kind = spec["variant"]
    if kind.startswith("tvm"):
        pin_tvm_threads(spec["threads"])
        import onnx

        import bncompile as compiler
        from bncompile.lower import tvm as _tvm
        _tvm.tvm()                              # TVM's own import is not the model's memory
        model = None if spec.get("library") else onnx.load(spec["model"])
    else:
        import onnxruntime as ort  # noqa: F401 - imported before the baseline
    gc.collect()
    resettable = _reset_hwm()
    base_kb = _status_kb("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind.startswith("tvm"):
        if spec.get("library"):
            compiled = compiler.load(spec["library"])
        else:
            tgt = "cuda" if kind == "tvm-cuda" else spec["target"]
            compiled = compiler.compile(model, target=tgt, input_shapes={k: v.shape for k, v in feeds.items()},
                                        fold=True)
        compiled.prepare()                      # load the library and create the VM now, not in run 1
        run = lambda: compiled.run(feeds)  # noqa: E731
    else:
        with open(spec["model"], "rb") as fh:
            model_bytes = fh.read()
        run = ort_runner(model_bytes, kind, spec["threads"], feeds)
        del model_bytes
    gc.collect()
    out: dict[str, Any] = {}
    if resettable:
        load_peak_kb = _status_kb("VmHWM")
        _reset_hwm()
        before_run_kb = _status_kb("VmRSS")
        for _ in range(PROBE_RUNS):
            run()
        run_peak_kb = _status_kb("VmHWM")
        out["peak_kb"] = max(load_peak_kb, run_peak_kb) - base_kb
        out["run_kb"] = run_peak_kb - before_run_kb
        out["method"] = "subprocess VmHWM (clear_refs)"
    else:
        for _ in range(PROBE_RUNS):
            run()
        out["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb
        out["run_kb"] = None
        out["method"] = "subprocess ru_maxrss"
    print(json.dumps(out))  # noqa: T201 - the subprocess's answer to its parent


def probe_memory(variant: str, model_file: str, feeds_file: str, *, threads: int, target: str,
                 library: str | None = None) -> dict:
    """Run :func:`main` in a fresh interpreter; its answer, or ``{"error": reason}``."""
    spec = json.dumps({"variant": variant, "model": model_file, "feeds": feeds_file,
                       "threads": threads, "target": target, "library": library})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "bncompile.bench.memory", spec],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {PROBE_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {tail}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "memory probe gave no answer"}


if __name__ == "__main__":
    main()
