"""Benchmark a model in onnxruntime and TVM, before and after bncompile's BatchNormalization folding.

Variants (each on the same seeded inputs, per batch size):

* ``ort``: onnxruntime CPU at its default optimization level (``ORT_ENABLE_ALL``, which fuses
  Conv+BN itself). It is the baseline of every ratio and every error.
* ``ort-noopt``: onnxruntime with all graph optimizations off (``ORT_DISABLE_ALL``).
* ``folded-ort`` / ``folded-ort-noopt``: the model folded by :func:`bncompile.fold`, in
  onnxruntime at both levels.
* ``tvm``: the model compiled by ``bncompile.compile(..., fold=True)`` for ``target``.
  When the compilation fails, the variant is reported ``unavailable`` with the reason and the
  benchmark goes on.
* ``ort-cuda``, ``folded-ort-cuda``, ``tvm-cuda``: only when onnxruntime has its CUDA provider or
  TVM sees a CUDA GPU; left out silently otherwise (marked unavailable if asked for by name).

Timing. All variants of one batch size are built first, then run in interleaved rounds (one call
of each per round, the order rotated every round so none always runs first or last), ``warmup`` rounds
discarded, ``repeat`` rounds kept, Python's garbage collector paused. Slow drift of a shared machine
then hits every variant alike. Per variant: median, p10/p25/p75/p90 latency of one call (``run``
with NumPy inputs and outputs, host copies included), throughput = batch / median. The ratio to
``ort`` is the **median over rounds of the per-round ratio** (each round's calls are adjacent in
time, so this cancels drift better than a ratio of medians, which is reported too). Below 1 is faster.
Each call's process CPU time is recorded too: ``cpu_ratio``, the same median of per-round ratios
from CPU time, is the one to compare on a machine shared with other work (time spent descheduled
does not count; with ``threads=1`` it is the latency an idle machine would show). On a 2-core
machine shared by four busy processes, two consecutive runs of ``benchmarks/bench_models.py``
(ResNet-18, 224x224, batch 1 and 8, 20 rounds) agreed within 7.7% on every wall-clock ratio and
7.4% on every CPU-time ratio.

Threads. ``threads`` pins onnxruntime's intra-op pool (inter-op 1, sequential execution) and TVM's
pool (``TVM_NUM_THREADS``, set in ``os.environ`` before TVM starts its pool, and left set; TVM sizes
its pool once per process). The default is **1**: single-thread latency is what reproduces on a busy
or shared machine (see the figures above), and it compares the kernels rather than the thread pools.
Pass ``threads=os.cpu_count()`` for throughput. ``threads_used`` is what each runtime really runs
with (onnxruntime: the session's intra-op threads; TVM: ``runtime.NumThreads``).

Settled rounds (``settle``; by default when ``threads`` > 1). A thread pool's workers keep running
after a call returns: onnxruntime's spin without yielding (~35-40 ms of CPU after each run of a
MobileNetV2 on the 2-core development VM), TVM 0.27's call ``sched_yield`` 300,000 times (~170-260 ms of
CPU, 0.4-0.5 s of wall time there). In plain interleaved rounds they take the cores from the runtime
that runs next (TVM's MobileNetV2 measured 12.6 ms at 2 threads next to onnxruntime's spinning
workers, 7.25 ms without them). Settled rounds (:func:`bncompile.bench.timing.time_settled`) keep
both runtimes at their defaults (no spin setting is changed) and instead call each variant on a quiet
process: no other thread runnable (``/proc/self/task``), so the other runtimes' workers sleep. The
timed call (``median_ms``, ``ratio``) thus starts with the runtime's own workers asleep, as a request
after a pause would; a second call right after it (``warm_median_ms``, ``warm_ratio``) runs with its
own workers still spinning, each runtime's steady state alone; then the timer waits for the
variant's workers to sleep, and reports what they burned meanwhile (``spin_cpu_ms``,
``spin_wall_ms``; ``unsettled`` counts waits that reached the limit). Per-thread CPU clocks during the
timed calls give ``threads_busy``: the threads that ran at least a quarter of the busiest one's CPU
time, measured where ``threads_used`` is the runtime's own word. With ``threads=1`` neither runtime
starts pool threads, so plain rounds are used unless ``settle=True``.

Accuracy. Each variant's outputs on the benchmark inputs against ``ort``'s:
``max_abs_err`` and ``max_rel_err`` (max abs error / largest |reference|), from
:func:`bncompile.onnx_utils.compare_outputs`.

Memory. Measured in a **fresh subprocess per variant and batch** (so one variant's freed memory,
kept by the allocator, cannot hide another's), with Linux's peak-RSS counter ``VmHWM``, which
writing ``5`` to ``/proc/self/clear_refs`` resets to the current RSS:

* ``peak_rss_mb``: the highest RSS while loading (onnxruntime: session creation from the model
  file; TVM: loading the library exported from the benchmark's compilation, or compiling where the
  export fails, as ``memory_method`` says) and running 3 times, minus the RSS before loading (after
  imports and inputs are in memory);
* ``run_rss_mb``: the highest RSS during the 3 runs minus the RSS just before them: the working set
  inference adds (arenas, intermediates, outputs), comparable across all variants.

Where ``clear_refs`` cannot be written, ``ru_maxrss`` (monotonic) gives ``peak_rss_mb`` only.
``memory=False`` skips the subprocesses.

Library code: logs, never prints (the progress bar goes to stderr and can be turned off).

Modules, in the order the data flows: ``inputs`` (graph inputs, batches, shapes), ``variants``
(the runners), ``timing`` (the one interleaved timer, also used by ``kernels``), ``stats``,
``memory`` (the subprocess probe), ``report`` (results and table), ``output`` (JSON, plot);
``driver`` holds :func:`benchmark`; ``kernels`` is the TVM kernel benchmark (``bench --kernels``).
"""

from bncompile.bench.driver import DEFAULT_REPEAT, DEFAULT_THREADS, DEFAULT_WARMUP, benchmark
from bncompile.bench.inputs import parse_batches, resolve_shapes
from bncompile.bench.output import check_outputs_or_exit, load_schema, plot, write_json, write_json_data
from bncompile.bench.report import BASELINE, SCHEMA_VERSION, BenchReport, VariantResult
from bncompile.bench.variants import ALL_VARIANTS, CPU_VARIANTS, CUDA_VARIANTS, select_variants

__all__ = ["check_outputs_or_exit", "write_json_data", "ALL_VARIANTS", "BASELINE", "BenchReport", "CPU_VARIANTS", "CUDA_VARIANTS", "DEFAULT_REPEAT",
           "DEFAULT_THREADS", "DEFAULT_WARMUP", "SCHEMA_VERSION", "VariantResult", "benchmark",
           "load_schema", "parse_batches", "plot", "resolve_shapes", "select_variants", "write_json"]


def __getattr__(name: str):
    # the probe's constants, without importing bncompile.bench.memory here: it runs as `python -m`
    if name in ("PROBE_RUNS", "PROBE_TIMEOUT_S"):
        from bncompile.bench import memory
        return getattr(memory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
