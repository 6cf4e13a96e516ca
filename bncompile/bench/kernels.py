"""Benchmark of the TVM batch-normalization kernels against onnxruntime and NumPy.

For each shape, in one run and in *settled* rounds (:func:`bncompile.bench.timing.time_settled`: per
round each implementation is called twice back to back, then the process waits until no other thread
of it runs; the order rotated every round, so that machine noise hits them alike; 2 warm-up rounds;
the variants of a shape, plain, renorm and ghost, in the same rounds, so ``vs plain`` is the median of
per-round ratios), the median time of:

* ``tvm``: the compiled training-mode kernel (y and every updated variable), pre-bound TVM tensors;
* ``tvm_infer``: the compiled inference kernel of the same config (y from the moving statistics);
* ``ort_train``: onnxruntime's BatchNormalization, opset 15, ``training_mode=1`` (y, running mean/var);
* ``ort_infer``: onnxruntime's inference-mode BatchNormalization on the same tensor: one read and one
  write of x, the floor a training kernel (which must also reduce) is compared to;
* ``numpy``: float32 NumPy (mean, var, normalize).

The figures and ratios are the second calls' (``rounds="settled"``): each runtime right after its own
previous call, its own workers as that runtime leaves them, TVM's pool awake, as in a training step
whose kernels run one after another; and nobody else's workers running, since the wait lets the
previous runner's workers go to sleep. The first calls give the ``cold`` ratio: TVM's pool asleep, so
one wake-up of a worker per call (20-70 us on the 2-core VM this was written on: half a 1 MB kernel's
time). The wait is needed because a spinning neighbour is not free: a process spinning on
``sched_yield`` on the other core slowed onnxruntime's single-threaded BN by 8-29% there, so
TVM's workers spinning through onnxruntime's calls would flatter TVM; TVM's spin is bounded to
:data:`SPIN_COUNT` yields (``TVM_THREAD_POOL_SPIN_COUNT``, unless set) so the wait takes milliseconds,
not TVM's default half second. ``rounds="interleaved"`` is the older method: one call per runner and
round, no waits, TVM's workers never spinning (``TVM_THREAD_POOL_SPIN_COUNT=0``), so every TVM call
pays a wake-up (the ``cold`` figures).

Both sides run ``threads`` threads (TVM's pool is configured to it: TVM 0.27 would otherwise run half
the logical CPUs on x86, one thread on a 2-core machine without SMT) and read and write the same kind
of memory (aligned NumPy buffers, on transparent huge pages where Linux gives them; TVM's allocator
does not ask for them, which cost ~20% on a 25 MB stream). Every implementation is pre-bound to several copies of (x, y) (:func:`rotation_copies`: together at
least twice the host's L3) and one shared counter picks the next copy at every call, whoever makes
it: no call finds its x (or its y) in a cache from an earlier call, as in a network, where each
layer's input was written long before. The table's footer names the CPU, its vector width and cache
sizes (:mod:`bncompile.lower.kernels.schedules.machine`), which the CPU schedules derive their
blocking from.

ONNX BatchNormalization normalizes axis 1, so a channels-last case runs the ORT baselines on the
same-size channels-first tensor (same bytes, same channel count). ORT uses IOBinding with
preallocated outputs, all graph optimizations off and no spinning thread pool (a spinning pool steals
the cores from the next implementation of the round), like the TVM kernel writing into preallocated
tensors. ``GB/s`` counts one read of x and one write of y.

Every pre-bound call runs once when it is bound, on both sides (``Kernel.bind`` does; the ORT runner
does it too), and ORT's outputs live in the same aligned NumPy memory as TVM's. Before, ORT's
outputs were fresh ``np.empty`` buffers never run before timing: the first write of each 4 KB page
of y took a page fault (256 per 1 MB output, seen with ``getrusage`` and ``perf record -e
minor-faults`` at the store of ORT's BN loop), and with one y per rotated input set, each set's first
timed ORT call paid them. ORT's NC 256x1024 inference read 0.5-0.8 ms instead of ~0.1 ms: in the
forward table (33 input sets, 32 rounds: nearly every call was a first) always, in the backward's (14
sets, 22 rounds) in its first 14 calls, so its median flipped between the two. Not huge pages
(1 MB arrays get none either way), alignment, aliasing or thread wake-ups: ORT's BN runs on the
calling thread alone, and its time was all CPU time in the kernel's page-fault handler.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bncompile.bench.timing import time_interleaved, time_settled

#: TVM's pool spin (``TVM_THREAD_POOL_SPIN_COUNT``) in settled rounds unless the environment sets one: long
#: enough to keep the workers awake between a runner's two calls, short enough that they sleep within
#: milliseconds after (TVM's default, 300000 yields, takes ~0.5 s on a busy 2-core machine)
SPIN_COUNT = 20000
ROUNDS = ("settled", "interleaved")
from bncompile.config import BatchNormConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    axis: int
    variant: str = "plain"          # plain | renorm | ghost

    def config(self) -> BatchNormConfig:
        kw: dict[str, Any] = {"axis": self.axis, "momentum": 0.9, "epsilon": 1e-5, "fused": False}
        if self.variant == "renorm":
            kw.update(renorm=True, renorm_clipping={"rmin": 0.5, "rmax": 2.0, "dmax": 1.0})
        elif self.variant == "ghost":
            kw.update(virtual_batch_size=4)
        return BatchNormConfig(**kw)


DEFAULT_CASES = [Case(name, shape, axis, variant)
                 for name, shape, axis in (("NCHW", (32, 64, 56, 56), 1), ("NCHW", (64, 128, 28, 28), 1),
                                           ("NC", (256, 1024), 1), ("NHWC", (32, 56, 56, 64), -1))
                 for variant in ("plain", "renorm", "ghost")]


def _ort_model(shape, *, training: bool):
    import onnx
    from onnx import TensorProto, helper

    C = shape[1]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [C]) for n in ("scale", "B", "mean", "var")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))]
    outs = ["y"]
    if training:
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [C]) for n in ("running_mean", "running_var")]
        outs += ["running_mean", "running_var"]
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], outs, epsilon=1e-5,
                            momentum=0.9, training_mode=1 if training else 0)
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Rotation:
    """A counter shared by every runner of a case: each call takes the next copy of (x, y)."""

    def __init__(self, copies: int):
        self.copies = max(1, int(copies))
        self.i = 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.copies
        return self.i


def _tvm_aligned(shape) -> np.ndarray:
    from bncompile.lower import tvm as _tvm

    return _tvm.aligned_numpy(shape, "float32")


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """``a`` in aligned NumPy memory (huge pages where Linux gives them), for TVM and ORT alike."""
    from bncompile.lower import tvm as _tvm

    out = _tvm.aligned_numpy(a.shape, a.dtype)
    out[...] = a
    return out


def rotation_copies(nbytes: int, l3: int, *, limit: int = 64) -> int:
    """Copies of a (x, y) pair of ``nbytes`` that together pass twice the L3 between two uses of one."""
    return int(min(limit, max(3, -(-2 * l3 // max(1, nbytes)) + 1)))


def _rotating(calls: list, rot: Rotation):
    def call():
        return calls[rot.next() % len(calls)]()

    return call


def _ort_runner(shape, arrays, *, training: bool, threads: int, copies: Sequence | None = None,
                rot: Rotation | None = None):
    """onnxruntime with IOBinding; ``copies`` (a list of x arrays) with ``rot``: one binding per copy."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's pool spins after each run by default, stealing the cores from whatever runs next in the
    # interleaved rounds (measured: the TVM kernel timed right after ORT came out up to 1.7x slower)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(_ort_model(shape, training=training), so, providers=["CPUExecutionProvider"])

    def bound(xarr):
        binding = sess.io_binding()
        feeds = {**arrays, "x": xarr}
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        # the outputs in the memory TVM's outputs get (aligned NumPy memory), and the binding run once
        # now, as Kernel.bind runs the kernel once: a fresh buffer's pages are mapped on its first write
        # (a page fault per 4 KB), which must not be timed on one side only (see the module docstring)
        outs = {"y": _tvm_aligned(shape)}
        if training:
            outs.update(running_mean=_tvm_aligned((shape[1],)), running_var=_tvm_aligned((shape[1],)))
        for name, arr in outs.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        keep = (feeds, outs)          # the binding holds raw pointers: keep the buffers alive

        def call():
            sess.run_with_iobinding(binding)
            return keep

        call()
        return call

    if copies is None:
        return bound(arrays["x"])
    return _rotating([bound(xc) for xc in copies], rot)


def _numpy_runner(x, axis, *, copies: Sequence | None = None, rot: Rotation | None = None):
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    C = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis % x.ndim] = C
    gamma, beta = np.ones(shape, np.float32), np.zeros(shape, np.float32)

    def bound(xa):
        def call():
            mean = xa.mean(axis=red, keepdims=True)
            var = xa.var(axis=red, keepdims=True)
            return (xa - mean) / np.sqrt(var + np.float32(1e-5)) * gamma + beta

        return call

    if copies is None:
        return bound(x)
    return _rotating([bound(xc) for xc in copies], rot)


def _tvm_runner(case: Case, x: np.ndarray, *, target="llvm", training: bool = True,
                copies: Sequence | None = None, rot: Rotation | None = None):
    """The compiled kernel pre-bound (Kernel.bind) to ``x``, or to each of ``copies`` rotated by ``rot``."""
    from bncompile.lower import tvm as _tvm
    from bncompile.kernels import compile_batchnorm

    cfg = case.config()
    k = compile_batchnorm(cfg, (None,) + tuple(case.shape[1:]), target=target, training=training)
    dev = k.device
    variables = cfg.initial_variables(case.shape)
    params = {n: _tvm.tvm().runtime.tensor(variables[n].astype(np.float32), dev) for n in k.spec.variable_names()}

    def bound(xa):
        if dev.dlpack_device_type() == 1:   # the same (aligned, huge-page) memory ORT reads; y likewise
            feeds = {"x": _tvm.to_tensor(xa, dev), **params}
            call, _ = k.bind(feeds, out={"y": _tvm.host_tensor(xa.shape)})
        else:
            call, _ = k.bind({"x": _tvm.tvm().runtime.tensor(xa, dev), **params})
        return call

    call = bound(x) if copies is None else _rotating([bound(xc) for xc in copies], rot)
    if dev.dlpack_device_type() != 1:
        inner = call

        def call():  # noqa: F811 - synchronize so the wall clock measures the kernel
            inner()
            dev.sync()
    return k, call


def _timing_setup(rounds: str) -> None:
    """TVM's pool spin for ``rounds`` (read when TVM's pool starts: before the first parallel kernel)."""
    if rounds not in ROUNDS:
        raise ValueError(f"rounds: expected one of {', '.join(ROUNDS)}, got {rounds!r}")
    # interleaved: TVM's workers spin ~300k iterations after each job by default, stealing the cores from
    # the runner that comes next (ORT's pool is told not to spin either); settled: a bounded spin
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0" if rounds == "interleaved" else str(SPIN_COUNT))


def _timed_rounds(runners: dict, repeat: int, rounds: str) -> tuple[dict, dict, dict]:
    """``(wall, cold, cpu)`` per runner and kept round: settled rounds give the second calls' wall times,
    the first calls' and the second calls' CPU times; interleaved rounds the one call's (twice)."""
    if rounds == "settled":
        st = time_settled(runners, repeat, warmup=2)
        return st.warm_wall, st.wall, st.warm_cpu
    wall, cpu = time_interleaved(runners, repeat, warmup=2)
    return wall, wall, cpu


def run_kernel_benchmark(shapes: Sequence | None = None, *, repeat: int = 30, json_path: str | None = None,
                         threads: int | None = None, target: str = "llvm", rounds: str = "settled") -> dict:
    """Run the benchmark; returns ``{"machine": ..., "cases": [...]}`` (times in ms, medians).

    ``shapes``: a list of :class:`Case` or of ``(shape, axis)`` / ``(shape, axis, variant)`` tuples;
    default :data:`DEFAULT_CASES`. ``json_path`` writes the result as JSON too. ``rounds``: ``settled``
    (default) or ``interleaved`` (see the module docstring).
    """
    from bncompile.lower import targets, tvm as _tvm

    label, target = target, targets.target_dict(target)     # names such as llvm:haswell, cuda:sm_80
    if _tvm.target_kind(target) == "cuda" and not _tvm.cuda_available():
        log.warning("benchmark: no CUDA GPU here; the CUDA benchmark is skipped")
        return {"machine": {"target": label, "skipped": "no CUDA GPU"}, "cases": []}
    cases = []
    for s in (shapes or DEFAULT_CASES):
        if isinstance(s, Case):
            cases.append(s)
        else:
            shape, axis, *rest = s
            shape = tuple(int(d) for d in shape)
            name = "NC" if len(shape) == 2 else ("NCHW" if axis % len(shape) == 1 else "NHWC")
            cases.append(Case(name, shape, int(axis), rest[0] if rest else "plain"))
    threads = threads or os.cpu_count() or 1
    machine = machine_info(target)
    if _tvm.target_kind(target) == "llvm":
        _timing_setup(rounds)
        machine["tvm_threads"] = _tvm.set_num_threads(threads)
        machine["tvm_spin_count"] = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")
    rng = np.random.default_rng(0)
    results = []
    groups: dict[tuple, list[Case]] = {}       # the variants of one shape share their rounds
    for case in cases:
        groups.setdefault((case.name, case.shape, case.axis % len(case.shape)), []).append(case)
    for group in groups.values():
        results += _run_group(group, rng, machine, repeat=repeat, threads=threads, target=target, rounds=rounds)
    out = {"machine": {**machine, "threads": threads, "target": label, "repeat": repeat, "rounds": rounds},
           "cases": results}
    if json_path:
        from pathlib import Path

        from bncompile._io import atomic_output

        with atomic_output(json_path, what="json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def _quartiles(values: Sequence[float]) -> list[float]:
    v = sorted(values)
    return [v[min(len(v) - 1, int(f * len(v)))] for f in (0.25, 0.5, 0.75)]


def _run_group(group: list[Case], rng, machine: dict, *, repeat: int, threads: int, target,
               rounds: str = "settled") -> list[dict]:
    """Time the variants of one shape in the same rounds, with the shared baselines."""
    first = group[0]
    x = rng.standard_normal(first.shape, dtype=np.float32) * 2 + 1
    ncopy = rotation_copies(2 * x.nbytes, machine["l3"])
    xs = [_aligned_copy(np.roll(x, i) if i else x) for i in range(ncopy)]
    rot = Rotation(ncopy)
    runners, kernels = {}, {}
    for case in group:
        kernels[case.variant], runners[f"tvm:{case.variant}"] = _tvm_runner(case, x, target=target, copies=xs, rot=rot)
    ax = first.axis % len(first.shape)
    xs_cf = xs if ax == 1 else [_aligned_copy(np.moveaxis(a, ax, 1)) for a in xs]
    x_cf = xs_cf[0]
    C = x_cf.shape[1]
    params = {"scale": np.ones(C, np.float32), "B": np.zeros(C, np.float32),
              "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    _, runners["tvm_infer"] = _tvm_runner(first, x, target=target, training=False, copies=xs, rot=rot)
    runners["ort_train"] = _ort_runner(x_cf.shape, {"x": x_cf, **params}, training=True, threads=threads,
                                       copies=xs_cf, rot=rot)
    runners["ort_infer"] = _ort_runner(x_cf.shape, {"x": x_cf, **params}, training=False, threads=threads,
                                       copies=xs_cf, rot=rot)
    runners["numpy"] = _numpy_runner(x, first.axis, copies=xs, rot=rot)
    times, cold, _ = _timed_rounds(runners, repeat, rounds)
    med_all = {k2: statistics.median(v) * 1e3 for k2, v in times.items()}
    nbytes = 2 * x.nbytes
    rows = []
    for case in group:
        mine = times[f"tvm:{case.variant}"]
        med = {"tvm": med_all[f"tvm:{case.variant}"],
               **{k2: med_all[k2] for k2 in ("tvm_infer", "ort_train", "ort_infer", "numpy")}}
        cold_ms = {"tvm": statistics.median(cold[f"tvm:{case.variant}"]) * 1e3,
                   "ort_infer": statistics.median(cold["ort_infer"]) * 1e3,
                   "ort_train": statistics.median(cold["ort_train"]) * 1e3}
        # spread: quartiles of the per-round ratio TVM / ORT inference (ratios of one round's adjacent
        # calls cancel the drift of a shared machine)
        q = _quartiles([a / b for a, b in zip(mine, times["ort_infer"])])
        row = {"case": case.name, "shape": list(case.shape), "axis": case.axis, "variant": case.variant,
               "schedule": kernels[case.variant].schedule_for(case.shape), "ms": med,
               "gbps": {k2: nbytes / (v * 1e-3) / 1e9 for k2, v in med.items()},
               "tvm_vs_ort_infer": med["tvm"] / med["ort_infer"],
               "tvm_vs_ort_infer_iqr": [q[0], q[2]], "copies": ncopy,
               "ort_train_vs_tvm": med["ort_train"] / med["tvm"],
               # the first calls: TVM's pool asleep (a worker wake-up per call), ORT as ever
               "cold_ms": cold_ms,
               "cold_tvm_vs_ort_infer": _quartiles([a / b for a, b in zip(cold[f"tvm:{case.variant}"],
                                                                          cold["ort_infer"])])[1],
               "cold_ort_train_vs_tvm": _quartiles([a / b for a, b in zip(cold["ort_train"],
                                                                          cold[f"tvm:{case.variant}"])])[1],
               "numpy_vs_tvm": med["numpy"] / med["tvm"],
               "tvm_vs_tvm_infer": med["tvm"] / med["tvm_infer"]}
        if case.variant != "plain" and "tvm:plain" in times:    # per-round ratio to plain, same rounds
            row["vs_plain_training"] = _quartiles([a / b for a, b in zip(mine, times["tvm:plain"])])[1]
        rows.append(row)
        log.info("benchmark %s %s %s: %s", case.name, case.shape, case.variant, med)
    return rows


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("" when the OS does not tell)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info(target="llvm") -> dict:
    """The CPU the benchmark runs on and what the kernels' schedules derive from it."""
    from bncompile.lower import targets, tvm as _tvm
    from bncompile.lower.kernels.schedules.machine import cpu_machine

    tdict = targets.target_dict(target)
    info = {"cpu": _tvm.host_cpu(), "model": cpu_model(), "target_mcpu": tdict.get("mcpu", "")}
    if tdict.get("kind") == "llvm":
        m = cpu_machine(tdict)
        info.update(lanes=m.lanes, l1d=m.l1d, l2=m.l2, l3=m.l3, caches=m.describe())
    else:
        from bncompile.lower.kernels.schedules.machine import DEFAULT_CACHES

        info.update(l3=DEFAULT_CACHES["l3"])
    return info


def format_table(result: dict) -> str:
    """A plain-text table of :func:`run_kernel_benchmark`'s result."""
    head = (f"{'case':<6} {'shape':<14} {'variant':<7} {'schedule':<22} {'tvm ms':>7} {'GB/s':>5} "
            f"{'tvm_inf':>7} {'ort_inf':>7} {'ort_trn':>7} {'numpy':>7} {'tvm/inf':>7} {'(iqr)':>11} "
            f"{'trn/tvm':>7} {'vs plain':>8} {'cold':>11}")
    lines = [head, "-" * len(head)]
    for r in result["cases"]:
        ms = r["ms"]
        vp = f"{r['vs_plain_training']:.2f}" if "vs_plain_training" in r else ""
        lines.append(f"{r['case']:<6} {'x'.join(map(str, r['shape'])):<14} {r['variant']:<7} {r['schedule']:<22} "
                     f"{ms['tvm']:7.3f} {r['gbps']['tvm']:5.1f} {ms['tvm_infer']:7.3f} {ms['ort_infer']:7.3f} "
                     f"{ms['ort_train']:7.3f} {ms['numpy']:7.2f} {r['tvm_vs_ort_infer']:7.2f} "
                     f"{_iqr(r):>11} {r['ort_train_vs_tvm']:7.2f} {vp:>8} {_cold(r):>11}")
    m = result["machine"]
    if m.get("skipped"):
        return f"benchmark skipped for target {m.get('target')}: {m['skipped']}"
    lines.append(f"(medians of {m['repeat']} {_rounds_text(m)}, inputs rotated; tvm/inf = TVM training time / "
                 "ORT inference floor, (iqr) its per-round quartiles; trn/tvm = ORT training / TVM; "
                 "vs plain = renorm or ghost / plain; cold = tvm/inf and trn/tvm of the first calls, "
                 "TVM's pool asleep: a worker wake-up each)")
    cpu = f"{m.get('model') or '?'} (LLVM {m['cpu']})"
    tgt = f", kernels built for mcpu={m['target_mcpu']}" if m.get("target_mcpu") and m["target_mcpu"] != m["cpu"] else ""
    lines.append(f"cpu {cpu}, {m['threads']} threads (TVM {m.get('tvm_threads', '?')}); {m.get('caches', '')}{tgt}")
    return "\n".join(lines)


def _rounds_text(m: dict) -> str:
    if m.get("rounds", "interleaved") == "settled":
        return (f"settled rounds (the second of two calls in a row: TVM's pool awake, spin "
                f"{m.get('tvm_spin_count') or 'default'}; then a wait until its workers sleep)")
    return "interleaved rounds"


def _cold(row: dict) -> str:
    if "cold_tvm_vs_ort_infer" not in row:
        return ""
    return f"{row['cold_tvm_vs_ort_infer']:.2f}|{row['cold_ort_train_vs_tvm']:.2f}"


def _iqr(row: dict) -> str:
    lo_hi = row.get("tvm_vs_ort_infer_iqr")
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else ""


def print_table(result: dict) -> None:
    """Print :func:`format_table` (for scripts and the CLI)."""
    print(format_table(result))  # noqa: T201 - the table printer is the one place that prints


__all__ = ["Case", "DEFAULT_CASES", "machine_info", "run_kernel_benchmark", "format_table", "print_table"]


# --------------------------------------------------------------------------- backward (gradients)
#
# The backward kernel (compile_batchnorm(..., gradients=True), Kernel.bind_backward) beside the forward
# training kernel and beside its floor: one read of x and dy and one write of dx, 1.5x onnxruntime's
# inference BN on the same tensor (one read, one write). Like the forward's benchmark: the three in the
# same rounds (order rotated every round), every side pre-bound (Kernel.bind and
# bind_backward on zero-copy aligned NumPy memory, ORT IOBinding on the same kind of memory), TVM's pool
# and ORT's at the same thread count, the same settled (or interleaved) rounds as the forward's, and one
# counter shared by all three picking
# the next input set at every call (x, dy and the outputs of each set; sets together past twice the
# L3), so no call finds its inputs in a cache from an earlier call. ``bwd/floor``'s spread is the
# quartiles of the per-round ratio bwd / (1.5 x ORT inference).

DEFAULT_BACKWARD_CASES = [Case(name, shape, axis, variant)
                          for name, shape, axis in (("NCHW", (32, 64, 56, 56), 1), ("NC", (256, 1024), 1),
                                                    ("NHWC", (32, 56, 56, 64), -1))
                          for variant in ("plain", "renorm", "ghost", "adjust")]
DEFAULT_BACKWARD_CASES.insert(4, Case("NCHW", (64, 128, 28, 28), 1))
BACKWARD_TARGET_VS_FLOOR = 1.3
BACKWARD_VARIANTS = ("plain", "renorm", "ghost", "adjust")


def _backward_config(case: Case) -> BatchNormConfig:
    """The case's config; ``adjust``: adjustment inputs (per-channel scale and bias) on a plain layer."""
    if case.variant == "adjust":
        return BatchNormConfig(axis=case.axis, momentum=0.9, epsilon=1e-5, fused=False, adjustment="inputs")
    if case.variant not in BACKWARD_VARIANTS:
        raise ValueError(f"backward benchmark: unknown variant {case.variant!r}; use one of {BACKWARD_VARIANTS}")
    return case.config()


def _backward_case(c) -> Case:
    if isinstance(c, Case):
        return c
    shape, axis, *rest = c
    shape = tuple(int(d) for d in shape)
    name = "NC" if len(shape) == 2 else ("NCHW" if axis % len(shape) == 1 else "NHWC")
    return Case(name, shape, int(axis), rest[0] if rest else "plain")


def _backward_runners(case: Case, xs: list, dys: list, rot: Rotation, *, target, threads: int):
    """Pre-bound ``fwd``, ``bwd`` and ``ort_infer`` calls of ``case``, each over every input set, picked by
    the shared ``rot``; returns ``(kernel, runners)``."""
    from bncompile.kernels import compile_batchnorm
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.backward import backward_variable_names

    cfg = _backward_config(case)
    k = compile_batchnorm(cfg, (None,) + tuple(case.shape[1:]), target=target, gradients=True)
    dev = k.device
    host = dev.dlpack_device_type() == 1
    tvm = _tvm.tvm()
    rng = np.random.default_rng(1)
    variables = {n: v.astype(np.float32) for n, v in cfg.initial_variables(case.shape).items()}
    if "gamma" in variables:
        variables["gamma"] = rng.uniform(0.5, 1.5, variables["gamma"].shape).astype(np.float32)
    if cfg.adjustment is not None:
        pshape = cfg.param_shape(case.shape)
        variables["adjustment_scale"] = rng.uniform(0.9, 1.1, pshape).astype(np.float32)
        variables["adjustment_bias"] = rng.uniform(-0.1, 0.1, pshape).astype(np.float32)
    var_t = {n: tvm.runtime.tensor(v, dev) for n, v in variables.items()}
    fwd_names = k.spec.variable_names() + (["adjustment_scale", "adjustment_bias"] if cfg.adjustment else [])
    bwd_names = backward_variable_names(k.spec) + (["adjustment_scale", "adjustment_bias"] if cfg.adjustment else [])

    def tensor(a):
        return _tvm.to_tensor(a, dev) if host else tvm.runtime.tensor(a, dev)

    def out(shape):
        return _tvm.host_tensor(shape) if host else _tvm.empty(shape, "float32", dev)

    fwd, bwd = [], []
    for xa, da in zip(xs, dys):
        xt = tensor(xa)
        fwd.append(k.bind({"x": xt, **{n: var_t[n] for n in fwd_names}}, out={"y": out(xa.shape)})[0])
        bwd.append(k.bind_backward({"x": xt, "dy": tensor(da), **{n: var_t[n] for n in bwd_names}},
                                   out={"dx": out(xa.shape)})[0])
    ax = case.axis % len(case.shape)
    xs_cf = xs if ax == 1 else [_aligned_copy(np.moveaxis(a, ax, 1)) for a in xs]
    C = xs_cf[0].shape[1]
    params = {"scale": np.ones(C, np.float32), "B": np.zeros(C, np.float32),
              "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    runners = {"fwd": _rotating(fwd, rot), "bwd": _rotating(bwd, rot),
               "ort_infer": _ort_runner(xs_cf[0].shape, {"x": xs_cf[0], **params}, training=False,
                                        threads=threads, copies=xs_cf, rot=rot)}
    if not host:
        for name in ("fwd", "bwd"):
            inner = runners[name]
            runners[name] = lambda _f=inner: (_f(), dev.sync())
    return k, runners


def run_backward_benchmark(shapes: Sequence | None = None, *, repeat: int = 20, json_path: str | None = None,
                           threads: int | None = None, target: str = "llvm", rounds: str = "settled") -> dict:
    """The backward's time beside the forward's and beside its floor (see the section comment).

    ``shapes``: :class:`Case` s or ``(shape, axis[, variant])`` tuples, variant one of
    :data:`BACKWARD_VARIANTS` (default :data:`DEFAULT_BACKWARD_CASES`); ``target`` as the forward's
    (``llvm``, ``llvm:haswell``, a dict). Returns ``{"machine": ..., "cases": [...]}`` with, per case, the
    medians in ms of ``fwd`` (training forward), ``bwd`` (backward: dx, dgamma, dbeta) and ``ort_infer``;
    ``floor_ms = 1.5 * ort_infer``, ``bwd_vs_floor`` (the median of the per-round ratios; target <=
    :data:`BACKWARD_TARGET_VS_FLOOR`) with its quartiles ``bwd_vs_floor_iqr``, and ``bwd_vs_fwd``.
    """
    from bncompile.lower import targets, tvm as _tvm

    label, target = target, targets.target_dict(target)
    if _tvm.target_kind(target) == "cuda" and not _tvm.cuda_available():
        log.warning("benchmark: no CUDA GPU here; the CUDA backward benchmark is skipped")
        return {"machine": {"target": label if isinstance(label, str) else str(label), "skipped": "no CUDA GPU"},
                "cases": []}
    cases = [_backward_case(c) for c in (shapes or DEFAULT_BACKWARD_CASES)]
    threads = threads or os.cpu_count() or 1
    machine = machine_info(target)
    if _tvm.target_kind(target) == "llvm":
        _timing_setup(rounds)                                         # as the forward's
        machine["tvm_threads"] = _tvm.set_num_threads(threads)
        machine["tvm_spin_count"] = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")
    rng = np.random.default_rng(0)
    results = []
    for case in cases:
        nbytes = int(np.prod(case.shape)) * 4
        # a set: x, dy, dx, the forward's y, ORT's y (and a channels-first x for a channels-last case)
        ncopy = rotation_copies(5 * nbytes, machine["l3"])
        xs = [_aligned_copy(rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1) for _ in range(ncopy)]
        dys = [_aligned_copy(rng.standard_normal(case.shape, dtype=np.float32)) for _ in range(ncopy)]
        k, runners = _backward_runners(case, xs, dys, Rotation(ncopy), target=target, threads=threads)
        times, cold, cpu = _timed_rounds(runners, repeat, rounds)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        floor = 1.5 * med["ort_infer"]
        q = _quartiles([b / (1.5 * o) for b, o in zip(times["bwd"], times["ort_infer"])])
        cpu_ratios = [b / (1.5 * o) for b, o in zip(cpu["bwd"], cpu["ort_infer"]) if o > 0]
        results.append({"case": case.name, "shape": list(case.shape), "axis": case.axis, "variant": case.variant,
                        "schedule": k.backward_schedule, "forward_schedule": k.schedule_for(case.shape), "ms": med,
                        "floor_ms": floor, "bwd_vs_floor": q[1], "bwd_vs_floor_iqr": [q[0], q[2]],
                        # on a shared machine: the best call of each (what neither lost to other jobs) and
                        # the per-round ratio of process CPU time (all threads; preempted time not counted)
                        "bwd_vs_floor_min": min(times["bwd"]) / (1.5 * min(times["ort_infer"])),
                        "bwd_vs_floor_cpu": _quartiles(cpu_ratios)[1] if cpu_ratios else None,
                        "bwd_vs_fwd": _quartiles([b / f for b, f in zip(times["bwd"], times["fwd"])])[1],
                        "cold_bwd_vs_floor": _quartiles([b / (1.5 * o) for b, o in zip(cold["bwd"],
                                                                                     cold["ort_infer"])])[1],
                        "bwd_gbps": 3 * nbytes / (med["bwd"] * 1e-3) / 1e9, "input_sets": ncopy})
        log.info("backward benchmark %s %s %s: %s", case.name, case.shape, case.variant, med)
        del xs, dys, runners
    out = {"machine": {**machine, "threads": threads, "target": label if isinstance(label, str) else str(label),
                       "repeat": repeat, "rounds": rounds, "loadavg": _loadavg()}, "cases": results}
    if json_path:
        from pathlib import Path

        from bncompile._io import atomic_output

        with atomic_output(json_path, what="json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def _ratio(v) -> str:
    return f"{v:.2f}" if v is not None else ""


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def format_backward_table(result: dict) -> str:
    """A plain-text table of :func:`run_backward_benchmark`'s result."""
    m = result["machine"]
    if m.get("skipped"):
        return f"backward benchmark skipped for target {m.get('target')}: {m['skipped']}"
    head = (f"{'case':<6} {'shape':<14} {'variant':<7} {'bwd schedule':<22} {'fwd ms':>7} {'bwd ms':>7} "
            f"{'ort_inf':>7} {'floor':>7} {'bwd/floor':>9} {'(iqr)':>11} {'min':>5} {'cpu':>5} {'bwd/fwd':>7} "
            f"{'GB/s':>5} {'cold':>5}")
    lines = [head, "-" * len(head)]
    for r in result["cases"]:
        ms = r["ms"]
        iqr = r.get("bwd_vs_floor_iqr")
        iqr_s = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else ""
        lines.append(f"{r['case']:<6} {'x'.join(map(str, r['shape'])):<14} {r['variant']:<7} {r['schedule']:<22} "
                     f"{ms['fwd']:7.3f} {ms['bwd']:7.3f} {ms['ort_infer']:7.3f} {r['floor_ms']:7.3f} "
                     f"{r['bwd_vs_floor']:9.2f} {iqr_s:>11} {_ratio(r.get('bwd_vs_floor_min')):>5} "
                     f"{_ratio(r.get('bwd_vs_floor_cpu')):>5} {r['bwd_vs_fwd']:7.2f} {r['bwd_gbps']:5.1f} "
                     f"{_ratio(r.get('cold_bwd_vs_floor')):>5}")
    lines.append(f"(medians of {m['repeat']} {_rounds_text(m)}, inputs rotated; bwd/floor and bwd/fwd: medians of "
                 f"the per-round ratios, (iqr) the quartiles of bwd/floor, min: best bwd / best floor, cpu: the "
                 f"median per-round ratio of process CPU time; floor = 1.5 x ORT inference BN: one read of x and "
                 f"dy, one write of dx; target bwd/floor <= {BACKWARD_TARGET_VS_FLOOR}; cold: bwd/floor of the "
                 f"first calls, TVM's pool asleep)")
    cpu = f"{m.get('model') or '?'} (LLVM {m.get('cpu')})"
    tgt = (f", kernels built for mcpu={m['target_mcpu']}"
           if m.get("target_mcpu") and m["target_mcpu"] != m.get("cpu") else "")
    load = m.get("loadavg")
    load_s = f"; load average {' '.join(f'{v:.2f}' for v in load)}" if load else ""
    lines.append(f"cpu {cpu}, {os.cpu_count()} cores, {m['threads']} threads (TVM {m.get('tvm_threads', '?')}); "
                 f"{m.get('caches', '')}{tgt}{load_s}")
    return "\n".join(lines)


__all__ += ["DEFAULT_BACKWARD_CASES", "BACKWARD_TARGET_VS_FLOOR", "BACKWARD_VARIANTS", "run_backward_benchmark",
            "format_backward_table"]
