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
