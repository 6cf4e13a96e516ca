"""The CUDA kernel benchmark: the TVM batch-normalization kernels on a GPU against the GPU's own copy.

A training forward must read x once and write y once, the bytes of a device-to-device copy of x, so
the floor is the copy, measured here on the same device, the same bytes, in the same interleaved rounds:
``copy`` (TVM's tensor copy, ``cudaMemcpyAsync`` device to device). Per case, medians of:

* ``fwd``: the training forward (y and the updated variables), pre-bound (``Kernel.bind``);
* ``infer``: the inference forward of the same config (one read, one write: a copy with arithmetic);
* ``bwd``: the backward (dx, dgamma, dbeta; ``Kernel.bind_backward``), whose floor is 1.5 copies
  (x and dy read, dx written);
* ``copy``: the copy of x.

``fwd_copy_bw`` is the forward's bandwidth as a fraction of the copy's (copy time / forward time; the
issue's target is 0.8), ``bwd_copy_bw`` the backward's (1.5 x copy time / backward time), and
``peak_copy_gbps`` the copy bandwidth of the largest case (bytes read plus written), against which
every case's own ``gbps`` can be read.

Every implementation is pre-bound to several input sets (x, y and dy each; the x sets together at
least 3x the GPU's L2, at most 1024 sets), one shared counter picks the next set at every call, so no
call finds its x in L2 from an earlier call. A round runs ``calls`` back-to-back calls of one
implementation and synchronizes; the order of the implementations rotates every round. Two clocks:
the host's wall clock around the round (what a caller waits for) and, when PyTorch is importable (never
a dependency: the GPU machines have it), CUDA events on the default stream TVM launches into, around
the round's calls: GPU time including the gaps between kernels. A tensor of a few MB moves in a few us,
about what a launch costs: those rows measure launches as much as bandwidth. The table names the GPU,
its multiprocessor count and L2 size.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from typing import Sequence

import numpy as np

from bncompile.bench.kernels import Case, Rotation

log = logging.getLogger(__name__)

DEFAULT_CUDA_CASES = [Case(name, shape, axis, variant)
                      for name, shape, axis in (("NCHW", (32, 64, 56, 56), 1), ("NCHW", (64, 128, 28, 28), 1),
                                                ("NC", (256, 1024), 1), ("NHWC", (32, 56, 56, 64), -1))
                      for variant in ("plain", "renorm")]
# and tensors of 200-270 MB, several times an H100's or H200's L2, where launches cost nothing
DEFAULT_CUDA_CASES += [Case("NCHW", (128, 64, 112, 112), 1), Case("NHWC", (128, 112, 112, 64), -1),
                       Case("NC", (65536, 1024), 1)]
FORWARD_TARGET = 0.8        # issue 14: the training forward at >= 80% of the device's copy bandwidth


def gpu_info() -> dict:
    from bncompile.lower import tvm as _tvm

    dev = _tvm.tvm().cuda(0)
    info = {"gpu": str(getattr(dev, "device_name", "") or "CUDA GPU")}
    for key in ("multi_processor_count", "compute_version", "max_threads_per_block", "l2_cache_size_bytes",
                "total_global_memory"):
        try:
            v = getattr(dev, key)
            if v is not None:
                info[key] = v if isinstance(v, (int, str)) else str(v)
        except Exception:  # noqa: BLE001 - not every TVM build reports every attribute
            pass
    return info


def _events():
    """(start, stop) -> elapsed ms around a region on the default stream, or None without PyTorch."""
    try:
        import torch  # noqa: PLC0415 - optional, GPU machines only

        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        return None

    def region(fn):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    return region


def _runners(case: Case, sets: int, rng, *, schedule: str | None, parts: Sequence[str]):
    from bncompile.kernels import compile_batchnorm
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.backward import backward_variable_names

    tvm = _tvm.tvm()
    cfg = case.config()
    shape = tuple(case.shape)
    sym = (None,) + shape[1:]
    k = compile_batchnorm(cfg, sym, target="cuda", schedule=schedule, gradients="bwd" in parts)
    ki = compile_batchnorm(cfg, sym, target="cuda", training=False) if "infer" in parts else k
    dev = k.device
    variables = cfg.initial_variables(shape)
    params = {n: tvm.runtime.tensor(np.asarray(variables[n], np.float32), dev) for n in k.spec.variable_names()}
    iparams = {n: tvm.runtime.tensor(np.asarray(variables[n], np.float32), dev) for n in ki.spec.variable_names()}
    host = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    xs = [tvm.runtime.tensor(np.roll(host, i) if i else host, dev) for i in range(sets)]
    dys = [tvm.runtime.tensor(rng.standard_normal(shape, dtype=np.float32), dev) for _ in range(sets)]
    ys = [_tvm.empty(shape, "float32", dev) for _ in range(sets)]
    calls = {"fwd": [k.bind({"x": x, **params})[0] for x in xs],
             "copy": [(lambda a=x, b=y: a.copyto(b)) for x, y in zip(xs, ys)]}
    if "infer" in parts:
        calls["infer"] = [ki.bind({"x": x, **iparams})[0] for x in xs]
    if "bwd" in parts:
        bfeeds = {n: params[n] for n in backward_variable_names(k.spec)}
        calls["bwd"] = [k.bind_backward({"x": x, "dy": dy, **bfeeds})[0] for x, dy in zip(xs, dys)]
    rot = Rotation(sets)

    def rotating(fns):
        return lambda: fns[rot.next() % len(fns)]()

    return k, {n: rotating(fns) for n, fns in calls.items()}


def run_cuda_benchmark(cases: Sequence[Case] | None = None, *, repeat: int = 15, calls: int = 10,
                       schedule: str | None = None, parts: Sequence[str] = ("fwd", "infer", "bwd", "copy"),
                       json_path: str | None = None) -> dict:
    """Time the cases (default :data:`DEFAULT_CUDA_CASES`) on CUDA device 0; ``schedule`` forces the
    forward's rule, ``parts`` leaves out the inference or backward kernels (A/B runs of the forward).
    Returns ``{"machine": ..., "cases": [...]}``."""
    from bncompile.lower import tvm as _tvm

    if not _tvm.cuda_available():
        log.warning("CUDA benchmark: no CUDA GPU here; skipped")
        return {"machine": {"skipped": "no CUDA GPU"}, "cases": []}
    dev = _tvm.tvm().cuda(0)
    machine = gpu_info()
    l2 = int(machine.get("l2_cache_size_bytes") or 64 << 20)
    events = _events()
    machine["clock"] = ("CUDA events around each round's calls (GPU time, gaps between kernels included) and "
                        "wall clock") if events else "wall clock only (no PyTorch)"
    rng = np.random.default_rng(0)
    rows = []
    for case in (cases or DEFAULT_CUDA_CASES):
        nbytes = int(np.prod(case.shape)) * 4
        sets = int(min(1024, max(2, -(-3 * l2 // nbytes) + 1)))
        k, runners = _runners(case, sets, rng, schedule=schedule, parts=parts)
        dev.sync()
        names = list(runners)
        wall = {n: [] for n in names}
        gpu = {n: [] for n in names}
        for rnd in range(repeat + 2):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for n in order:
                fn = runners[n]

                def many(fn=fn):
                    for _ in range(calls):
                        fn()

                t0 = time.perf_counter()
                g = events(many) if events else None
                if g is None:
                    many()
                dev.sync()
                t = (time.perf_counter() - t0) / calls * 1e3
                if rnd >= 2:
                    wall[n].append(t)
                    if g is not None:
                        gpu[n].append(g / calls)
        med = {n: statistics.median(v) for n, v in wall.items()}
        gmed = {n: statistics.median(v) for n, v in gpu.items() if v}
        base = gmed or med
        row = {"case": case.name, "shape": list(case.shape), "variant": case.variant, "schedule": k.schedule,
               "backward_schedule": k.backward_schedule or "", "input_sets": sets, "wall_ms": med, "gpu_ms": gmed,
               "gbps": {n: (3 if n == "bwd" else 2) * nbytes / (v * 1e-3) / 1e9 for n, v in base.items()},
               "fwd_copy_bw": base["copy"] / base["fwd"]}
        if "infer" in base:
            row["infer_copy_bw"] = base["copy"] / base["infer"]
        if "bwd" in base:
            row["bwd_copy_bw"] = 1.5 * base["copy"] / base["bwd"]
        rows.append(row)
        log.info("cuda benchmark %s %s %s: %s", case.name, case.shape, case.variant, base)
        del runners
    largest = max(rows, key=lambda r: int(np.prod(r["shape"])), default=None)
    peak = largest["gbps"]["copy"] if largest else 0.0
    out = {"machine": {**machine, "repeat": repeat, "calls": calls, "peak_copy_gbps": peak}, "cases": rows}
    if json_path:
        from pathlib import Path

        from bncompile._io import atomic_output

        with atomic_output(json_path, what="json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2, default=str))
    return out


def format_cuda_table(result: dict) -> str:
    m = result["machine"]
    if not result["cases"]:
        return f"CUDA benchmark skipped: {m.get('skipped', 'no cases')}"
    head = (f"{'case':<5} {'shape':<16} {'variant':<7} {'schedule':<15} {'bwd schedule':<19} {'fwd us':>7} "
            f"{'inf us':>7} {'bwd us':>7} {'copy us':>7} {'fwd/cp':>6} {'bwd/cp':>6} {'GB/s':>6} {'wall fwd':>8}")
    lines = [head, "-" * len(head)]
    for r in result["cases"]:
        ms = r["gpu_ms"] or r["wall_ms"]
        def us(n):
            return f"{ms[n] * 1e3:7.1f}" if n in ms else f"{'':>7}"

        bcp = f"{r['bwd_copy_bw']:6.2f}" if "bwd_copy_bw" in r else f"{'':>6}"
        lines.append(f"{r['case']:<5} {'x'.join(map(str, r['shape'])):<16} {r['variant']:<7} {r['schedule']:<15} "
                     f"{r['backward_schedule']:<19} {us('fwd')} {us('infer')} {us('bwd')} {us('copy')} "
                     f"{r['fwd_copy_bw']:6.2f} {bcp} {r['gbps']['fwd']:6.0f} {r['wall_ms']['fwd'] * 1e3:8.1f}")
    lines.append(f"fwd/cp: the training forward's bandwidth over the copy's, same bytes, same rounds (target >= "
                 f"{FORWARD_TARGET}); bwd/cp: the backward's over 1.5 copies. Times: {m.get('clock')}; wall fwd: "
                 f"host wall clock per call (launches included).")
    lines.append(f"GPU: {m.get('gpu')}, {m.get('multi_processor_count', '?')} SMs, compute "
                 f"{m.get('compute_version', '?')}, L2 {int(m.get('l2_cache_size_bytes') or 0) >> 20} MB; copy of the "
                 f"largest case {m.get('peak_copy_gbps', 0):.0f} GB/s (read + write); {m.get('repeat')} rounds of "
                 f"{m.get('calls')} calls")
    return "\n".join(lines)


__all__ = ["DEFAULT_CUDA_CASES", "FORWARD_TARGET", "format_cuda_table", "gpu_info", "run_cuda_benchmark"]
