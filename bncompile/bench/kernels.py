"""Benchmark of the TVM batch-normalization kernels against onnxruntime and NumPy.

For each case, in one run and interleaved (:func:`bncompile.bench.timing.time_interleaved`: one
call of each implementation per round, the order rotated every round, so that machine noise hits
them alike; 2 warm-up rounds), the median time of:

* ``tvm``: the compiled training-mode kernel (y and every updated variable), pre-bound TVM tensors;
* ``tvm_infer``: the compiled inference kernel of the same config (y from the moving statistics);
* ``ort_train``: onnxruntime's BatchNormalization, opset 15, ``training_mode=1`` (y, running mean/var);
* ``ort_infer``: onnxruntime's inference-mode BatchNormalization on the same tensor: one read and one
  write of x, the floor a training kernel (which must also reduce) is compared to;
* ``numpy``: float32 NumPy (mean, var, normalize).

ONNX BatchNormalization normalizes axis 1, so a channels-last case runs the ORT baselines on the
same-size channels-first tensor (same bytes, same channel count). ORT uses IOBinding with
preallocated outputs, all graph optimizations off and no spinning thread pool (a spinning pool steals
the cores from the next implementation of the round), like the TVM kernel writing into preallocated
tensors. ``GB/s`` counts one read of x and one write of y.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bncompile.bench.timing import time_interleaved
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


DEFAULT_CASES = [
    Case("NCHW", (32, 64, 56, 56), 1),
    Case("NCHW", (32, 64, 56, 56), 1, "renorm"),
    Case("NCHW", (32, 64, 56, 56), 1, "ghost"),
    Case("NCHW", (64, 128, 28, 28), 1),
    Case("NC", (256, 1024), 1),
    Case("NHWC", (32, 56, 56, 64), -1),
    Case("NHWC", (32, 56, 56, 64), -1, "renorm"),
]


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


def _ort_runner(shape, arrays, *, training: bool, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's pool spins after each run by default, stealing the cores from whatever runs next in the
    # interleaved rounds (measured: the TVM kernel timed right after ORT came out up to 1.7x slower)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(_ort_model(shape, training=training), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    for name, arr in arrays.items():
        binding.bind_cpu_input(name, arr)
    outs = {"y": np.empty(shape, np.float32)}
    if training:
        outs.update(running_mean=np.empty(shape[1], np.float32), running_var=np.empty(shape[1], np.float32))
    for name, arr in outs.items():
        binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)

    keep = (arrays, outs)          # the binding holds raw pointers: keep the buffers alive

    def call():
        sess.run_with_iobinding(binding)
        return keep

    return call


def _numpy_runner(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    C = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis % x.ndim] = C
    gamma, beta = np.ones(shape, np.float32), np.zeros(shape, np.float32)

    def call():
        mean = x.mean(axis=red, keepdims=True)
        var = x.var(axis=red, keepdims=True)
        return (x - mean) / np.sqrt(var + np.float32(1e-5)) * gamma + beta

    return call


def _tvm_runner(case: Case, x: np.ndarray, *, target="llvm", training: bool = True):
    from bncompile.lower import tvm as _tvm
    from bncompile.kernels import compile_batchnorm

    cfg = case.config()
    k = compile_batchnorm(cfg, (None,) + tuple(case.shape[1:]), target=target, training=training)
    dev = k.device
    variables = cfg.initial_variables(case.shape)
    feeds = {"x": _tvm.tvm().runtime.tensor(x, dev)}      # an aligned (device) copy
    for n in k.spec.variable_names():
        feeds[n] = _tvm.tvm().runtime.tensor(variables[n].astype(np.float32), dev)
    call, _ = k.bind(feeds)
    if dev.dlpack_device_type() != 1:
        inner = call

        def call():  # noqa: F811 - synchronize so the wall clock measures the kernel
            inner()
            dev.sync()
    return k, call


def run_kernel_benchmark(shapes: Sequence | None = None, *, repeat: int = 30, json_path: str | None = None,
                         threads: int | None = None, target: str = "llvm") -> dict:
    """Run the benchmark; returns ``{"machine": ..., "cases": [...]}`` (times in ms, medians).

    ``shapes``: a list of :class:`Case` or of ``(shape, axis)`` / ``(shape, axis, variant)`` tuples;
    default :data:`DEFAULT_CASES`. ``json_path`` writes the result as JSON too.
    """
    from bncompile.lower import tvm as _tvm

    if _tvm.target_kind(target) == "cuda" and not _tvm.cuda_available():
        log.warning("benchmark: no CUDA GPU here; the CUDA benchmark is skipped")
        return {"machine": {"target": target, "skipped": "no CUDA GPU"}, "cases": []}
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
    rng = np.random.default_rng(0)
    results = []
    for case in cases:
        x = rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1
        k, tvm_call = _tvm_runner(case, x, target=target)
        ax = case.axis % len(case.shape)
        x_cf = x if ax == 1 else np.ascontiguousarray(np.moveaxis(x, ax, 1))
        C = x_cf.shape[1]
        params = {"scale": np.ones(C, np.float32), "B": np.zeros(C, np.float32),
                  "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
        _, tvm_infer = _tvm_runner(case, x, target=target, training=False)
        runners = {"tvm": tvm_call, "tvm_infer": tvm_infer,
                   "ort_train": _ort_runner(x_cf.shape, {"x": x_cf, **params}, training=True, threads=threads),
                   "ort_infer": _ort_runner(x_cf.shape, {"x": x_cf, **params}, training=False, threads=threads),
                   "numpy": _numpy_runner(x, case.axis)}
        times, _ = time_interleaved(runners, repeat, warmup=2)
        med = {k2: statistics.median(v) * 1e3 for k2, v in times.items()}
        nbytes = 2 * x.nbytes
        row = {"case": case.name, "shape": list(case.shape), "axis": case.axis, "variant": case.variant,
               "schedule": k.schedule, "ms": med,
               "gbps": {k2: nbytes / (v * 1e-3) / 1e9 for k2, v in med.items()},
               "tvm_vs_ort_infer": med["tvm"] / med["ort_infer"],
               "ort_train_vs_tvm": med["ort_train"] / med["tvm"],
               "numpy_vs_tvm": med["numpy"] / med["tvm"],
               "tvm_vs_tvm_infer": med["tvm"] / med["tvm_infer"]}
        results.append(row)
        log.info("benchmark %s %s %s: %s", case.name, case.shape, case.variant, med)
    plain = {(r["case"], tuple(r["shape"])): r["ms"]["tvm"] for r in results if r["variant"] == "plain"}
    for r in results:
        base = plain.get((r["case"], tuple(r["shape"])))
        if r["variant"] != "plain" and base:
            r["vs_plain_training"] = r["ms"]["tvm"] / base
    out = {"machine": {"cpu": _tvm.host_cpu(), "threads": threads, "target": target, "repeat": repeat},
           "cases": results}
    if json_path:
        from pathlib import Path

        from bncompile._io import atomic_output

        with atomic_output(json_path, what="json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def format_table(result: dict) -> str:
    """A plain-text table of :func:`run_kernel_benchmark`'s result."""
    head = (f"{'case':<6} {'shape':<14} {'variant':<7} {'schedule':<22} {'tvm ms':>7} {'GB/s':>5} "
            f"{'tvm_inf':>7} {'ort_inf':>7} {'ort_trn':>7} {'numpy':>7} {'tvm/inf':>7} {'trn/tvm':>7} {'vs plain':>8}")
    lines = [head, "-" * len(head)]
    for r in result["cases"]:
        ms = r["ms"]
        vp = f"{r['vs_plain_training']:.2f}" if "vs_plain_training" in r else ""
        lines.append(f"{r['case']:<6} {'x'.join(map(str, r['shape'])):<14} {r['variant']:<7} {r['schedule']:<22} "
                     f"{ms['tvm']:7.3f} {r['gbps']['tvm']:5.1f} {ms['tvm_infer']:7.3f} {ms['ort_infer']:7.3f} "
                     f"{ms['ort_train']:7.3f} {ms['numpy']:7.2f} {r['tvm_vs_ort_infer']:7.2f} "
                     f"{r['ort_train_vs_tvm']:7.2f} {vp:>8}")
    m = result["machine"]
    if m.get("skipped"):
        return f"benchmark skipped for target {m.get('target')}: {m['skipped']}"
    lines.append(f"(medians of {m['repeat']} interleaved rounds; cpu {m['cpu']}, {m['threads']} threads; "
                 "tvm/inf = TVM training time / ORT inference floor; trn/tvm = ORT training / TVM)")
    return "\n".join(lines)


def print_table(result: dict) -> None:
    """Print :func:`format_table` (for scripts and the CLI)."""
    print(format_table(result))  # noqa: T201 - the table printer is the one place that prints


__all__ = ["Case", "DEFAULT_CASES", "run_kernel_benchmark", "format_table", "print_table"]


# --------------------------------------------------------------------------- backward (gradients)
#
# The backward kernel (compile_batchnorm(..., gradients=True), Kernel.bind_backward) beside the forward
# training kernel and beside its floor: one read of x and dy and one write of dx, 1.5x onnxruntime's
# inference BN on the same tensor (one read, one write). Every side pre-bound (Kernel.bind, ORT
# IOBinding) and its inputs rotated over enough sets that each call finds them out of the caches.

DEFAULT_BACKWARD_CASES = [
    Case("NCHW", (32, 64, 56, 56), 1),
    Case("NCHW", (32, 64, 56, 56), 1, "renorm"),
    Case("NCHW", (32, 64, 56, 56), 1, "ghost"),
    Case("NCHW", (64, 128, 28, 28), 1),
    Case("NC", (256, 1024), 1),
    Case("NHWC", (32, 56, 56, 64), -1),
]
BACKWARD_TARGET_VS_FLOOR = 1.3


def machine_info(target: str = "llvm") -> dict:
    """CPU model (the OS's name and LLVM's), float32 vector lanes of ``target``, cache sizes (bytes)."""
    import platform

    from bncompile.lower import targets, tvm as _tvm
    from bncompile.lower.graph_schedules import vector_lanes
    from bncompile.lower.kernels.schedules.backward_cpu import cache_sizes

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    lanes = None
    if _tvm.target_kind(target) == "llvm":
        with _tvm.make_target(targets.target_dict(target)):
            lanes = vector_lanes()[0]
    return {"cpu_model": model, "llvm_cpu": _tvm.host_cpu(), "cores": os.cpu_count(), "fp32_lanes": lanes,
            "caches": {f"L{k}": v for k, v in sorted(cache_sizes().items())}}


def _rotation(set_bytes: int) -> int:
    """Input sets to rotate over: together at least twice the last-level cache (2 at least, 8 at most)."""
    from bncompile.lower.kernels.schedules.backward_cpu import cache_sizes

    llc = max(cache_sizes().values(), default=32 << 20)
    return int(min(8, max(2, -(-2 * llc // max(1, set_bytes)))))


def _rotating(calls: list):
    state = [0]

    def call():
        calls[state[0] % len(calls)]()
        state[0] += 1

    return call


def run_backward_benchmark(shapes: Sequence | None = None, *, repeat: int = 20, json_path: str | None = None,
                           threads: int | None = None, target: str = "llvm") -> dict:
    """The backward's time beside the forward's and beside its floor (see the section comment).

    Returns ``{"machine": ..., "cases": [...]}`` with, per case, the medians in ms of ``fwd`` (training
    forward), ``bwd`` (backward: dx, dgamma, dbeta) and ``ort_infer``; ``floor_ms = 1.5 * ort_infer``,
    ``bwd_vs_floor`` (target <= :data:`BACKWARD_TARGET_VS_FLOOR`) and ``bwd_vs_fwd``.
    """
    from bncompile.kernels import compile_batchnorm
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.backward import backward_variable_names

    if _tvm.target_kind(target) == "cuda" and not _tvm.cuda_available():
        log.warning("benchmark: no CUDA GPU here; the CUDA backward benchmark is skipped")
        return {"machine": {"target": target, "skipped": "no CUDA GPU"}, "cases": []}
    cases = [c if isinstance(c, Case) else Case("NC" if len(c[0]) == 2 else ("NCHW" if c[1] % len(c[0]) == 1
                                                                            else "NHWC"),
                                                tuple(int(d) for d in c[0]), int(c[1]), c[2] if len(c) > 2 else "plain")
             for c in (shapes or DEFAULT_BACKWARD_CASES)]
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    tvm = _tvm.tvm()
    results = []
    for case in cases:
        cfg = case.config()
        k = compile_batchnorm(cfg, (None,) + tuple(case.shape[1:]), target=target, gradients=True)
        dev = k.device
        variables = {n: v.astype(np.float32) for n, v in cfg.initial_variables(case.shape).items()}
        nbytes = int(np.prod(case.shape)) * 4
        fwd, bwd, ort_calls = [], [], []
        for _ in range(_rotation(3 * nbytes)):
            x = rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1
            dy = rng.standard_normal(case.shape, dtype=np.float32)
            xt = tvm.runtime.tensor(x, dev)
            var_t = {n: tvm.runtime.tensor(v, dev) for n, v in variables.items()}
            fwd.append(k.bind({"x": xt, **{n: var_t[n] for n in k.spec.variable_names()}})[0])
            bfeeds = {"x": xt, "dy": tvm.runtime.tensor(dy, dev),
                      **{n: var_t[n] for n in backward_variable_names(k.spec)}}
            bwd.append(k.bind_backward(bfeeds)[0])
            ax = case.axis % len(case.shape)
            x_cf = x if ax == 1 else np.ascontiguousarray(np.moveaxis(x, ax, 1))
            C = x_cf.shape[1]
            params = {"scale": np.ones(C, np.float32), "B": np.zeros(C, np.float32),
                      "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
            ort_calls.append(_ort_runner(x_cf.shape, {"x": x_cf, **params}, training=False, threads=threads))
        runners = {"fwd": _rotating(fwd), "bwd": _rotating(bwd), "ort_infer": _rotating(ort_calls)}
        if dev.dlpack_device_type() != 1:
            for name in ("fwd", "bwd"):
                inner = runners[name]
                runners[name] = lambda _f=inner: (_f(), dev.sync())
        times, _ = time_interleaved(runners, repeat, warmup=2)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        floor = 1.5 * med["ort_infer"]
        results.append({"case": case.name, "shape": list(case.shape), "axis": case.axis, "variant": case.variant,
                        "schedule": k.backward_schedule, "forward_schedule": k.schedule, "ms": med,
                        "floor_ms": floor, "bwd_vs_floor": med["bwd"] / floor, "bwd_vs_fwd": med["bwd"] / med["fwd"],
                        "bwd_gbps": 3 * nbytes / (med["bwd"] * 1e-3) / 1e9, "input_sets": len(bwd)})
        log.info("backward benchmark %s %s %s: %s", case.name, case.shape, case.variant, med)
    out = {"machine": {**machine_info(target), "threads": threads, "target": target, "repeat": repeat},
           "cases": results}
    if json_path:
        from pathlib import Path

        from bncompile._io import atomic_output

        with atomic_output(json_path, what="json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def format_backward_table(result: dict) -> str:
    """A plain-text table of :func:`run_backward_benchmark`'s result."""
    m = result["machine"]
    if m.get("skipped"):
        return f"backward benchmark skipped for target {m.get('target')}: {m['skipped']}"
    head = (f"{'case':<6} {'shape':<14} {'variant':<7} {'bwd schedule':<22} {'fwd ms':>7} {'bwd ms':>7} "
            f"{'ort_inf':>7} {'floor':>7} {'bwd/floor':>9} {'bwd/fwd':>7} {'GB/s':>5}")
    lines = [head, "-" * len(head)]
    for r in result["cases"]:
        ms = r["ms"]
        lines.append(f"{r['case']:<6} {'x'.join(map(str, r['shape'])):<14} {r['variant']:<7} {r['schedule']:<22} "
                     f"{ms['fwd']:7.3f} {ms['bwd']:7.3f} {ms['ort_infer']:7.3f} {r['floor_ms']:7.3f} "
                     f"{r['bwd_vs_floor']:9.2f} {r['bwd_vs_fwd']:7.2f} {r['bwd_gbps']:5.1f}")
    caches = ", ".join(f"{k} {v // 1024} KiB" for k, v in m.get("caches", {}).items())
    lines.append(f"(medians of {m['repeat']} interleaved rounds, inputs rotated; cpu {m.get('cpu_model')} "
                 f"({m.get('llvm_cpu')}), {m.get('cores')} cores, {m['threads']} threads, fp32 lanes "
                 f"{m.get('fp32_lanes')}, caches {caches}; floor = 1.5 x ORT inference BN: one read of x and "
                 f"dy, one write of dx; target bwd/floor <= {BACKWARD_TARGET_VS_FLOOR})")
    return "\n".join(lines)


__all__ += ["DEFAULT_BACKWARD_CASES", "BACKWARD_TARGET_VS_FLOOR", "machine_info", "run_backward_benchmark",
            "format_backward_table"]
