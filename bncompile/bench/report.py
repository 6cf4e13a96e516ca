"""What a benchmark measured: one :class:`VariantResult` per (variant, batch) in a :class:`BenchReport`,
its JSON form (``bncompile/schemas/bench.schema.json``) and its plain-text table."""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
#: the variant every ratio and error is measured against
BASELINE = "ort"


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
    threads_used: int | None = None          # onnxruntime: the session's intra-op threads; TVM: its pool size
    parallelism: float | None = None         # CPU time / wall time over the timed runs
    # settled rounds only (BenchReport.settle; bncompile.bench.timing.time_settled):
    warm_median_ms: float | None = None      # the call right after the timed one (own workers still spinning)
    warm_ratio: float | None = None          # median of per-round ratios of those calls to ort's
    spin_cpu_ms: float | None = None         # process CPU burned after the calls returned, until the workers slept
    spin_wall_ms: float | None = None        # wall time until then
    unsettled: int | None = None             # waits that hit the time limit (workers still running)
    threads_busy: int | None = None          # threads that ran >= 1/4 of the busiest one's CPU in its timed calls
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
    settle: bool = False                      # settled rounds (thread pools idle before each timed call)
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
                "warmup": self.warmup, "seed": self.seed, "settle": self.settle, "baseline": BASELINE,
                "variants": list(self.variants), "fold": self.fold, "machine": self.machine,
                "seconds": self.seconds, "results": [r.to_dict() for r in self.results]}

    def table(self) -> str:
        """A plain-text table, one row per (batch, variant)."""
        head = (f"{'batch':>5}  {'variant':<17} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} "
                f"{'samples/s':>10} {'vs ort':>7} {'cpu vs':>7} {'thr':>3} {'par':>5} {'max err':>9} {'peak MB':>8} "
                f"{'run MB':>7}")
        if self.settle:
            head += f" {'b2b ms':>8} {'b2b vs':>7} {'spin ms':>8} {'busy':>4}"
        lines = [f"model {self.model}  inputs {_fmt_inputs(self.inputs)}", head, "-" * len(head)]
        for r in self.results:
            if r.status != "ok":
                lines.append(f"{r.batch:>5}  {r.variant:<17} unavailable: {r.reason}")
                continue
            line = (
                f"{r.batch:>5}  {r.variant:<17} {r.median_ms:10.3f} {r.p10_ms:9.3f} {r.p90_ms:9.3f} "
                f"{r.throughput:10.1f} {r.ratio:7.3f} {_fmt_ratio(r.cpu_ratio):>7} {_fmt_int(r.threads_used):>3} "
                f"{_fmt_par(r.parallelism):>5} {_fmt_err(r.max_rel_err):>9} "
                f"{_fmt_mb(r.peak_rss_mb):>8} {_fmt_mb(r.run_rss_mb):>7}")
            if self.settle:
                line += (f" {_fmt_ms(r.warm_median_ms):>8} {_fmt_ratio(r.warm_ratio):>7} "
                         f"{_fmt_ms(r.spin_cpu_ms):>8}{'!' if r.unsettled else ' '}{_fmt_int(r.threads_busy):>4}")
            lines.append(line)
        m = self.machine
        rounds = ("settled rounds: each variant called on a quiet process (no thread of it runnable), then "
                  "once more right after, then waited for until its workers slept" if self.settle
                  else "interleaved")
        lines.append(
            f"({rounds}: {self.repeat} rounds after {self.warmup} warm-up; {self.threads} thread(s); "
            f"target {self.target}; cpu {m.get('cpu', '?')}, {m.get('cores', '?')} cores; "
            f"load average {_fmt_load(m.get('loadavg_start'))} -> {_fmt_load(m.get('loadavg_end'))}; "
            "vs ort = median per-round latency ratio to onnxruntime default, <1 faster; cpu vs = the "
            "same from process CPU time (steadier on a busy machine); thr = threads the runtime really used "
            "(onnxruntime: its session's intra-op threads, TVM: its thread pool); par = CPU time / wall time "
            "over the timed runs; "
            "max err = max abs error / max |ort output|; peak MB = RSS high-water of load+runs in a "
            "fresh process, run MB = during runs only"
            + ("; b2b = the call right after the timed one, the runtime's own workers still spinning "
               "(each runtime alone, at its default), b2b vs its per-round ratio to ort's; spin ms = process "
               "CPU its workers burned after it returned (! = still running at the time limit); busy = "
               "threads that ran at least a quarter of the busiest one's CPU time in its timed calls (measured)"
               if self.settle else "") + ")")
        return "\n".join(lines)


def _fmt_inputs(inputs: dict) -> str:
    return ", ".join(f"{k} [{','.join(map(str, v))}]" for k, v in inputs.items())


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_int(v) -> str:
    return "-" if v is None else str(v)


def _fmt_par(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_load(v) -> str:
    return "?" if not v else f"{v[0]:.2f}"


def _fmt_err(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def _fmt_mb(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def machine_info(threads: int) -> dict:
    import onnx
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
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
            "tvm_thread_pool_spin_count": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT"),
            "loadavg_start": load_average()}


def load_average() -> list | None:
    """The 1, 5 and 15-minute load averages (None where the OS does not give them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
