"""Benchmark a model in onnxruntime and TVM, before and after bncompile's BatchNormalization folding.

Variants (each on the same seeded inputs, per batch size):

* ``ort``: onnxruntime CPU at its default optimization level (``ORT_ENABLE_ALL``, which fuses
  Conv+BN itself). It is the baseline of every ratio and every error.
* ``ort-noopt``: onnxruntime with all graph optimizations off (``ORT_DISABLE_ALL``).
* ``folded-ort`` / ``folded-ort-noopt``: the model folded by :func:`bncompile.fold.fold`, in
  onnxruntime at both levels.
* ``tvm``: the model compiled by ``bncompile.compiler.compile(..., fold=True)`` for ``target``.
  Optional: when the compiler is missing or fails, the variant is reported ``unavailable`` with the
  reason and the benchmark goes on.
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
pool (``TVM_NUM_THREADS``, set in ``os.environ`` before TVM starts its pool, and left set). The
default is **1**: single-thread latency is what reproduces on a busy or shared machine (see the
figures above), and it compares the kernels rather than the thread pools. Pass
``threads=os.cpu_count()`` for throughput.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from bncompile.errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BASELINE = "ort"
CPU_VARIANTS = ("ort", "ort-noopt", "folded-ort", "folded-ort-noopt", "tvm")
CUDA_VARIANTS = ("ort-cuda", "folded-ort-cuda", "tvm-cuda")
ALL_VARIANTS = CPU_VARIANTS + CUDA_VARIANTS
DEFAULT_REPEAT = 30
DEFAULT_WARMUP = 5
DEFAULT_THREADS = 1
PROBE_RUNS = 3
PROBE_TIMEOUT_S = 900

_MB = 1024 * 1024


# --------------------------------------------------------------------------- results

@dataclass
class VariantResult:
    """One variant at one batch size. ``status`` is ``ok`` or ``unavailable`` (then ``reason``)."""

    variant: str
    batch: int
    status: str = "ok"
    reason: str | None = None
    median_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    p10_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    throughput: float | None = None          # samples per second, batch / median
    ratio: float | None = None               # median of per-round (variant / ort) latency ratios
    ratio_of_medians: float | None = None
    cpu_median_ms: float | None = None       # process CPU time per call (all threads)
    cpu_ratio: float | None = None           # median of per-round CPU-time ratios to ort
    max_abs_err: float | None = None         # against ort's outputs
    max_rel_err: float | None = None
    peak_rss_mb: float | None = None
    run_rss_mb: float | None = None
    memory_method: str | None = None
    samples: int = 0

    def to_dict(self) -> dict:
        """Plain JSON values (a non-finite error, e.g. from a shape mismatch, becomes null)."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class BenchReport:
    """What :func:`benchmark` measured: settings, machine and one :class:`VariantResult` per
    (batch, variant). ``.to_dict()`` follows ``bncompile/schemas/bench.schema.json``."""

    model: str
    inputs: dict                              # name -> shape with the batch as "N" when free
    batches: list
    threads: int
    target: str
    repeat: int
    warmup: int
    seed: int
    variants: list
    results: list = field(default_factory=list)
    fold: dict | None = None
    machine: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def result(self, variant: str, batch: int) -> VariantResult | None:
        for r in self.results:
            if r.variant == variant and r.batch == batch:
                return r
        return None

    def ratios(self) -> dict:
        """``{"<variant>@<batch>": ratio}`` of every measured variant (for reproducibility checks)."""
        return {f"{r.variant}@{r.batch}": r.ratio for r in self.results if r.status == "ok"}

    def cpu_ratios(self) -> dict:
        """``{"<variant>@<batch>": cpu_ratio}``: the same from process CPU time."""
        return {f"{r.variant}@{r.batch}": r.cpu_ratio for r in self.results if r.status == "ok"}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "tool": "bncompile bench",
                "model": self.model, "inputs": self.inputs, "batches": list(self.batches),
                "threads": self.threads, "target": self.target, "repeat": self.repeat,
                "warmup": self.warmup, "seed": self.seed, "baseline": BASELINE,
                "variants": list(self.variants), "fold": self.fold, "machine": self.machine,
                "seconds": self.seconds, "results": [r.to_dict() for r in self.results]}

    def table(self) -> str:
        """A plain-text table, one row per (batch, variant)."""
        head = (f"{'batch':>5}  {'variant':<17} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} "
                f"{'samples/s':>10} {'vs ort':>7} {'cpu vs':>7} {'max err':>9} {'peak MB':>8} {'run MB':>7}")
        lines = [f"model {self.model}  inputs {_fmt_inputs(self.inputs)}", head, "-" * len(head)]
        for r in self.results:
            if r.status != "ok":
                lines.append(f"{r.batch:>5}  {r.variant:<17} unavailable: {r.reason}")
                continue
            lines.append(
                f"{r.batch:>5}  {r.variant:<17} {r.median_ms:10.3f} {r.p10_ms:9.3f} {r.p90_ms:9.3f} "
                f"{r.throughput:10.1f} {r.ratio:7.3f} {_fmt_ratio(r.cpu_ratio):>7} {_fmt_err(r.max_rel_err):>9} "
                f"{_fmt_mb(r.peak_rss_mb):>8} {_fmt_mb(r.run_rss_mb):>7}")
        m = self.machine
        lines.append(
            f"(interleaved: {self.repeat} rounds after {self.warmup} warm-up; {self.threads} thread(s); "
            f"target {self.target}; cpu {m.get('cpu', '?')}, {m.get('cores', '?')} cores; "
            "vs ort = median per-round latency ratio to onnxruntime default, <1 faster; cpu vs = the "
            "same from process CPU time (steadier on a busy machine); "
            "max err = max abs error / max |ort output|; peak MB = RSS high-water of load+runs in a "
            "fresh process, run MB = during runs only)")
        return "\n".join(lines)


def _fmt_inputs(inputs: dict) -> str:
    return ", ".join(f"{k} [{','.join(map(str, v))}]" for k, v in inputs.items())


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_err(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def _fmt_mb(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# --------------------------------------------------------------------------- inputs

def _first_line(err: BaseException) -> str:
    from bncompile.errors import BncompileError

    text = str(err).strip()
    if isinstance(err, BncompileError):        # already a sentence for users
        return text.splitlines()[0] if text else type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _load(model_or_path) -> tuple[onnx.ModelProto, str]:
    from bncompile import onnx_utils

    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx_utils.load_model_proto(model_or_path), str(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        onnx_utils.check_model(model_or_path)
        name = model_or_path.graph.name or "<in-memory model>"
        return model_or_path, name
    raise InputError(f"benchmark expects a path or an onnx.ModelProto, got {type(model_or_path).__name__}")


def _graph_inputs(model: onnx.ModelProto) -> list[tuple[str, list]]:
    """(name, dims) of the real inputs; a dim is an int, or a str / None when free."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"input {vi.name!r} is not a tensor: bncompile bench feeds tensors only")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise InputError(f"input {vi.name!r} has no shape: give it with --input-shape {vi.name}=...")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append((vi.name, dims))
    return out


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``; InputError naming the value otherwise."""
    try:
        values = tuple(int(t) for t in str(text).split(","))
        if not values or any(v < 1 for v in values):
            raise ValueError
    except ValueError:
        raise InputError(f"--batch {text!r}: give positive integers separated by commas, e.g. 1,8") from None
    if len(set(values)) != len(values):
        raise InputError(f"--batch {text!r}: a batch size is repeated; give each once")
    return values


def resolve_shapes(inputs: list[tuple[str, list]], batches: Sequence[int] | None,
                   input_shapes: dict | None = None) -> tuple[list[int], dict[int, dict[str, tuple]]]:
    """The batch sizes and, per batch, the concrete shape of every input.

    The first axis of each input of rank >= 1 is its batch axis: a free one takes the batch size, a
    fixed one must equal it (InputError otherwise). Without ``batches``: (1,) when some batch axis is
    free, else the model's fixed batch. Other free axes must be given in ``input_shapes``.
    """
    input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    unknown = set(input_shapes) - {n for n, _ in inputs}
    if unknown:
        raise InputError(f"--input-shape names unknown inputs {sorted(unknown)}: the model's inputs are "
                         f"{[n for n, _ in inputs]}")
    fixed = {n: dims[0] for n, dims in inputs if dims and isinstance(dims[0], int) and dims[0] > 0}
    free_batch = any(dims and not (isinstance(dims[0], int) and dims[0] > 0) for _, dims in inputs)
    if batches is None:
        fixed_values = set(fixed.values())
        batches = (1,) if free_batch or not fixed_values else (min(fixed_values),)
    batches = [int(b) for b in batches]
    if not batches or any(b < 1 for b in batches):
        raise InputError(f"batches {batches}: give positive batch sizes, e.g. --batch 1,8")
    if len(set(batches)) != len(batches):
        raise InputError(f"batches {batches}: a batch size is repeated; give each once")
    for name, b0 in fixed.items():
        bad = [b for b in batches if b != b0]
        if bad:
            raise InputError(f"--batch {bad[0]} contradicts input {name!r}, whose batch dimension is "
                             f"fixed to {b0}: use --batch {b0} (or a model with a free batch dimension)")
    per_batch: dict[int, dict[str, tuple]] = {}
    for b in batches:
        shapes = {}
        for name, dims in inputs:
            given = input_shapes.get(name)
            if given is not None and len(given) != len(dims):
                raise InputError(f"--input-shape {name}: rank {len(given)} but the model's input has "
                                 f"rank {len(dims)} {dims}")
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    if given is not None and axis > 0 and given[axis] != d:
                        raise InputError(f"--input-shape {name}: {list(given)} does not match the "
                                         f"model's fixed shape {dims}")
                    shape.append(d)
                elif axis == 0:
                    shape.append(b)
                elif given is not None:
                    shape.append(given[axis])
                else:
                    raise InputError(f"input {name!r} has a free dimension {d!r} at axis {axis}: "
                                     f"give it with --input-shape {name}=...")
            shapes[name] = tuple(shape)
        per_batch[b] = shapes
    return batches, per_batch


def _random_feeds(model: onnx.ModelProto, shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs (standard normal floats, small ints, random bools), same for every variant."""
    rng = np.random.default_rng(seed)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    feeds = {}
    for name, shape in shapes.items():
        np_type = onnx.helper.tensor_dtype_to_np_dtype(types[name])
        if np_type.kind == "f" or np_type.name == "bfloat16":
            feeds[name] = rng.standard_normal(shape).astype(np_type)
        elif np_type.kind == "b":
            feeds[name] = rng.random(shape) < 0.5
        elif np_type.kind in "iu":
            feeds[name] = rng.integers(0, 4, size=shape).astype(np_type)
        else:
            raise InputError(f"input {name!r} has type {np_type}: bncompile bench cannot draw values for it")
    return feeds


# --------------------------------------------------------------------------- variants

def _ort_options(threads: int, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def _ort_spec(variant: str) -> tuple[bool, bool, str]:
    """(folded, optimize, provider) of an onnxruntime variant."""
    folded = variant.startswith("folded-")
    optimize = not variant.endswith("-noopt")
    provider = "CUDAExecutionProvider" if variant.endswith("-cuda") else "CPUExecutionProvider"
    return folded, optimize, provider


def _ort_runner(model_bytes: bytes, variant: str, threads: int, feeds) -> Callable[[], list]:
    import onnxruntime as ort

    _, optimize, provider = _ort_spec(variant)
    sess = ort.InferenceSession(model_bytes, sess_options=_ort_options(threads, optimize),
                                providers=[provider])
    if provider not in sess.get_providers():
        raise UnsupportedError(f"onnxruntime did not enable {provider} for this model")
    return lambda: sess.run(None, feeds)


def _cuda_ort_available() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tvm_cuda_available() -> bool:
    import importlib.util
    if importlib.util.find_spec("bncompile.compiler") is None:
        return False                       # nothing could compile for it anyway
    try:
        from bncompile import _tvm
        return _tvm.available() and _tvm.cuda_available()
    except Exception:  # noqa: BLE001 - no TVM, no CUDA: the variant is simply left out
        return False


def _compiler():
    import importlib
    import importlib.util

    if importlib.util.find_spec("bncompile.compiler") is None:
        raise UnsupportedError("bncompile.compiler is not present in this build")
    try:
        compiler = importlib.import_module("bncompile.compiler")
    except Exception as err:  # noqa: BLE001 - a broken compiler makes the variant unavailable
        raise UnsupportedError(f"bncompile.compiler cannot be imported ({_first_line(err)})") from None
    if not hasattr(compiler, "compile"):
        raise UnsupportedError("bncompile.compiler has no compile()")
    return compiler


def _pin_tvm_threads(threads: int) -> None:
    if "tvm" in sys.modules and os.environ.get("TVM_NUM_THREADS") != str(threads):
        log.warning("TVM was imported before the benchmark: its thread pool may ignore threads=%d", threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)


def _tvm_runner(model: onnx.ModelProto, variant: str, target: str, shapes: dict, feeds,
                out_names: list[str]) -> Callable[[], list]:
    compiler = _compiler()
    tgt = "cuda" if variant == "tvm-cuda" else target
    compiled = compiler.compile(model, target=tgt, input_shapes=dict(shapes), fold=True)

    def call():
        out = compiled.run(feeds)
        if isinstance(out, dict):
            if all(n in out for n in out_names):
                return [out[n] for n in out_names]
            return list(out.values())
        return list(out) if isinstance(out, (list, tuple)) else [out]
    call.compiled = compiled                   # for the memory probe (export, then load there)
    return call


def _to_numpy(outputs) -> list[np.ndarray]:
    res = []
    for o in outputs:
        if hasattr(o, "numpy") and not isinstance(o, np.ndarray):
            o = o.numpy()
        res.append(np.asarray(o))
    return res


def select_variants(variants: Sequence[str] | None, *, cuda_ort: bool | None = None,
                    cuda_tvm: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The variants to run (``ort`` always first) and those asked for but unavailable (-> reason)."""
    if variants is None:
        chosen = list(CPU_VARIANTS)
        if cuda_ort if cuda_ort is not None else _cuda_ort_available():
            chosen += ["ort-cuda", "folded-ort-cuda"]
        if cuda_tvm if cuda_tvm is not None else ("tvm" in chosen and _tvm_cuda_available()):
            chosen.append("tvm-cuda")
        return chosen, {}
    chosen = []
    for v in variants:
        v = v.strip()
        if v not in ALL_VARIANTS:
            raise InputError(f"unknown variant {v!r}: choose among {', '.join(ALL_VARIANTS)}")
        if v not in chosen:
            chosen.append(v)
    if BASELINE in chosen:
        chosen.remove(BASELINE)
    chosen.insert(0, BASELINE)                 # the baseline of ratios and errors always runs
    missing = {}
    if any(v in ("ort-cuda", "folded-ort-cuda") for v in chosen) and not _cuda_ort_available():
        for v in ("ort-cuda", "folded-ort-cuda"):
            if v in chosen:
                missing[v] = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    if "tvm-cuda" in chosen and not _tvm_cuda_available():
        missing["tvm-cuda"] = "TVM sees no CUDA GPU here"
    return chosen, missing


# --------------------------------------------------------------------------- memory probe

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


def _probe_main() -> None:
    """Entry point of the memory subprocess: ``python -c ... '<json spec>'``; prints one JSON line."""
    import resource

    spec = json.loads(sys.argv[1])
    with np.load(spec["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    kind = spec["variant"]
    if kind.startswith("tvm"):
        _pin_tvm_threads(spec["threads"])
        compiler = _compiler()
        from bncompile import _tvm
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
        run = _ort_runner(model_bytes, kind, spec["threads"], feeds)
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


def _probe_memory(variant: str, model_file: str, feeds_file: str, *, threads: int, target: str,
                  library: str | None = None) -> dict:
    spec = json.dumps({"variant": variant, "model": model_file, "feeds": feeds_file,
                       "threads": threads, "target": target, "library": library})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-c", "from bncompile.bench import _probe_main; _probe_main()",
                               spec], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {PROBE_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {tail}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "memory probe gave no answer"}


@contextlib.contextmanager
def _native_stderr_to_log():
    """Send what native code writes to file descriptor 2 to this module's debug log instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("native stderr: %s", text)


# --------------------------------------------------------------------------- timing

def _time_interleaved(runners: dict[str, Callable], repeat: int, warmup: int, tick=None
                      ) -> tuple[dict[str, list], dict[str, list]]:
    """Per-round wall and process-CPU seconds of each runner; rounds rotate the order; warm-up
    rounds dropped."""
    names = list(runners)
    wall: dict[str, list] = {n: [] for n in names}
    cpu: dict[str, list] = {n: [] for n in names}
    perf, cpu_clock = time.perf_counter, time.process_time
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + repeat):
            k = r % len(names)
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


def _stats(result: VariantResult, secs: list[float], base: list[float], batch: int,
           cpu: list[float], cpu_base: list[float]) -> None:
    ms = np.asarray(secs) * 1e3
    p10, p25, p50, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
    result.median_ms, result.p10_ms, result.p25_ms = float(p50), float(p10), float(p25)
    result.p75_ms, result.p90_ms = float(p75), float(p90)
    result.mean_ms, result.min_ms = float(ms.mean()), float(ms.min())
    result.throughput = batch / (p50 / 1e3)
    result.ratio = float(np.median(np.asarray(secs) / np.asarray(base)))
    result.ratio_of_medians = float(p50 / (np.median(base) * 1e3))
    c, cb = np.asarray(cpu), np.asarray(cpu_base)
    result.cpu_median_ms = float(np.median(c) * 1e3)
    if np.all(cb > 0):
        result.cpu_ratio = float(np.median(c / cb))
    result.samples = len(secs)


def _machine(threads: int) -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS")}


# --------------------------------------------------------------------------- API

def benchmark(model_or_path, *, batches: Sequence[int] | None = (1,), threads: int | None = None,
              target: str = "llvm", repeat: int = DEFAULT_REPEAT, warmup: int = DEFAULT_WARMUP,
              variants: Sequence[str] | None = None, progress: bool = True, seed: int = 0,
              memory: bool = True, input_shapes: dict | None = None) -> BenchReport:
    """Benchmark ``model_or_path`` (a path or an ``onnx.ModelProto``); see the module docstring.

    Args (keyword-only after the model):
        batches: batch sizes for the free batch dimension; ``None``: 1, or the model's fixed batch.
        threads: intra-op threads of onnxruntime and TVM; default :data:`DEFAULT_THREADS` (1).
        target: TVM target of the ``tvm`` variant.
        repeat, warmup: timed and discarded interleaved rounds.
        variants: names from :data:`ALL_VARIANTS`; default all CPU ones plus the CUDA ones available.
        progress: a tqdm bar on stderr.
        seed: seed of the random inputs.
        memory: measure peak RSS in subprocesses (slower: one process per variant and batch).
        input_shapes: ``{input: shape}`` for free non-batch dimensions.

    Raises InputError for a bad model, batch or setting. A variant that cannot be built (no
    compiler, a failed compile, no CUDA) is reported ``unavailable`` with its reason instead.
    """
    from tqdm import tqdm

    from bncompile import onnx_utils

    t_start = time.perf_counter()
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise InputError(f"threads {threads}: give 1 or more")
    if repeat < 1 or warmup < 0:
        raise InputError(f"repeat {repeat}, warmup {warmup}: give repeat >= 1 and warmup >= 0")
    model, name = _load(model_or_path)
    batch_list, per_batch = resolve_shapes(_graph_inputs(model), batches, input_shapes)
    if variants is None or any(str(v).strip().startswith("tvm") for v in variants):
        _pin_tvm_threads(threads)          # before anything imports TVM
    chosen, missing = select_variants(variants)
    inputs_desc = {n: [d if isinstance(d, int) and d > 0 else (d or "N") for d in dims]
                   for n, dims in _graph_inputs(model)}
    report = BenchReport(model=name, inputs=inputs_desc, batches=batch_list, threads=threads,
                         target=str(target), repeat=int(repeat), warmup=int(warmup), seed=int(seed),
                         variants=chosen)
    report.machine = _machine(threads)
    out_names = [o.name for o in model.graph.output]
    model_bytes = model.SerializeToString()

    folded_bytes, fold_error = None, None
    if any(v.startswith("folded-") for v in chosen):
        t = time.perf_counter()
        try:
            from bncompile.folding import fold
            res = fold(model, check=False, validate=False)
            folded_bytes = res.model.SerializeToString()
            rep = res.report
            report.fold = {"folded": len(rep.folded), "left": len(rep.left),
                           "nodes_before": rep.nodes_before, "nodes_after": rep.nodes_after}
        except Exception as err:  # noqa: BLE001 - the folded variants become unavailable
            fold_error = f"fold failed: {_first_line(err)}"
            log.info("benchmark: %s", fold_error)
        report.seconds["fold"] = round(time.perf_counter() - t, 3)

    steps = len(batch_list) * (repeat + warmup)
    bar = tqdm(total=steps, desc="bench", unit="round", file=sys.stderr, disable=not progress,
               leave=False, dynamic_ncols=True)
    tmpdir = tempfile.TemporaryDirectory(prefix="bncompile-bench-") if memory else None
    try:
        files = {}
        if tmpdir is not None:
            files["orig"] = os.path.join(tmpdir.name, "model.onnx")
            Path(files["orig"]).write_bytes(model_bytes)
            if folded_bytes is not None:
                files["folded"] = os.path.join(tmpdir.name, "folded.onnx")
                Path(files["folded"]).write_bytes(folded_bytes)
        for b in batch_list:
            shapes = per_batch[b]
            feeds = _random_feeds(model, shapes, seed)
            rows: dict[str, VariantResult] = {v: VariantResult(variant=v, batch=b) for v in chosen}
            runners: dict[str, Callable] = {}
            t = time.perf_counter()
            for v in chosen:
                bar.set_postfix_str(f"batch {b}: building {v}")
                why = missing.get(v)
                if why is None and v.startswith("folded-") and folded_bytes is None:
                    why = fold_error or "fold failed"
                if why is None:
                    try:
                        if v.startswith("tvm"):
                            runners[v] = _tvm_runner(model, v, target, shapes, feeds, out_names)
                        else:
                            src = folded_bytes if v.startswith("folded-") else model_bytes
                            runners[v] = _ort_runner(src, v, threads, feeds)
                    except Exception as err:  # noqa: BLE001 - reported, the benchmark goes on
                        if v == BASELINE:
                            first = _first_line(err)
                            raise InputError(f"onnxruntime cannot run the model: {first}") from None
                        why = _first_line(err)
                        log.info("benchmark: %s unavailable: %s", v, why)
                if why is not None:
                    rows[v].status, rows[v].reason = "unavailable", why
            report.seconds[f"build@{b}"] = round(time.perf_counter() - t, 3)

            # accuracy against ort (one call each; it also warms them up)
            try:
                reference = _to_numpy(runners[BASELINE]())
            except Exception as err:  # noqa: BLE001 - the baseline must run
                raise InputError(f"onnxruntime cannot run the model on inputs {dict(shapes)}: "
                                 f"{_first_line(err)}") from None
            for v, fn in list(runners.items()):
                try:
                    errs = onnx_utils.compare_outputs(reference, _to_numpy(fn()))
                except Exception as err:  # noqa: BLE001
                    rows[v].status, rows[v].reason = "unavailable", f"run failed: {_first_line(err)}"
                    del runners[v]
                    continue
                rows[v].max_abs_err, rows[v].max_rel_err = errs["max_abs"], errs["max_rel"]

            bar.set_postfix_str(f"batch {b}: timing {len(runners)} variants")
            t = time.perf_counter()
            wall, cpu = _time_interleaved(runners, repeat, warmup, tick=lambda: bar.update(1))
            report.seconds[f"time@{b}"] = round(time.perf_counter() - t, 3)
            for v in runners:
                _stats(rows[v], wall[v], wall[BASELINE], b, cpu[v], cpu[BASELINE])
            libraries = {}
            if tmpdir is not None:                 # TVM: export now, load in the probe (no compile there)
                for v, fn in runners.items():
                    if getattr(fn, "compiled", None) is not None:
                        try:
                            with _native_stderr_to_log():   # TVM's C++ warnings while saving
                                libraries[v] = str(fn.compiled.export(os.path.join(tmpdir.name, f"{v}-{b}.so")))
                        except Exception as err:  # noqa: BLE001 - the probe compiles instead
                            log.info("benchmark: export of %s failed (%s); its memory includes compilation",
                                     v, _first_line(err))
            runners.clear()
            gc.collect()

            if tmpdir is not None:
                bar.set_postfix_str(f"batch {b}: memory")
                t = time.perf_counter()
                feeds_file = os.path.join(tmpdir.name, f"feeds{b}.npz")
                np.savez(feeds_file, **feeds)
                for v in chosen:
                    if rows[v].status != "ok":
                        continue
                    src = files["folded"] if v.startswith("folded-") else files["orig"]
                    m = _probe_memory(v, src, feeds_file, threads=threads, target=target,
                                      library=libraries.get(v))
                    if "error" in m:
                        rows[v].memory_method = m["error"]
                        continue
                    rows[v].peak_rss_mb = round(m["peak_kb"] / 1024, 2)
                    rows[v].run_rss_mb = None if m["run_kb"] is None else round(m["run_kb"] / 1024, 2)
                    note = ""
                    if v.startswith("tvm"):
                        note = " (exported library loaded)" if v in libraries else " (includes compilation)"
                    rows[v].memory_method = m["method"] + note
                report.seconds[f"memory@{b}"] = round(time.perf_counter() - t, 3)
            report.results.extend(rows[v] for v in chosen)
    finally:
        bar.close()
        if tmpdir is not None:
            tmpdir.cleanup()
    report.seconds["total"] = round(time.perf_counter() - t_start, 3)
    return report


# --------------------------------------------------------------------------- outputs

def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of :meth:`BenchReport.to_dict`."""
    return json.loads((Path(__file__).parent / "schemas" / "bench.schema.json").read_text())


def write_json(report: BenchReport, path) -> None:
    """Write the report as JSON, atomically."""
    from bncompile._io import atomic_output

    with atomic_output(path, what="json") as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def plot(report: BenchReport, path) -> None:
    """A bar chart, one panel per batch: median latency per variant, whiskers p10..p90, the ratio to
    ort written above each bar (log scale when the medians of a panel span more than 20x).
    matplotlib (Agg backend) is imported here only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bncompile._io import atomic_output

    batches = list(report.batches)
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.6 * len(batches)), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    order = list(report.variants)
    for ax, b in zip(axes[0], batches):
        rows = [report.result(v, b) for v in order]
        for i, r in enumerate(rows):
            if r is None or r.status != "ok":
                ax.annotate("n/a", (i, 0.02), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=8, color="gray")
                continue
            err = [[r.median_ms - r.p10_ms], [r.p90_ms - r.median_ms]]
            ax.bar(i, r.median_ms, color=colors(i % 10), yerr=err, capsize=4, ecolor="black")
            ax.text(i, r.p90_ms, f"{r.ratio:.2f}x", ha="center", va="bottom", fontsize=8)
        meds = [r.median_ms for r in rows if r is not None and r.status == "ok" and r.median_ms > 0]
        if meds and max(meds) / min(meds) > 20:     # e.g. an untuned TVM next to onnxruntime
            ax.set_yscale("log")
            ax.set_ylabel("latency per call (ms, log scale)")
        else:
            ax.set_ylabel("latency per call (ms)")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch {b}")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(report.model).name}: median latency, whiskers p10-p90, "
                 f"label = ratio to ort ({report.threads} thread(s))", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, what="plot") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["ALL_VARIANTS", "BASELINE", "BenchReport", "CPU_VARIANTS", "CUDA_VARIANTS", "VariantResult",
           "benchmark", "load_schema", "parse_batches", "plot", "resolve_shapes", "select_variants",
           "write_json"]
