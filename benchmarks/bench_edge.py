"""TVM against onnxruntime on the networks people deploy to the edge (issue 15's benchmark).

Builds MobileNetV2, MobileNetV3-Large, EfficientNet-B0, RegNetY-400MF, ShuffleNetV2 (and ResNet-50 and
DenseNet-121 for reference) with :mod:`edge_models` (random weights, no downloads), and runs
:func:`bncompile.bench.benchmark` with the variants ``ort`` (onnxruntime at its default optimization
level) and ``tvm`` (``bncompile compile``, untuned) at batch 1, interleaved and rotated, once with 1
thread and once with every core. Each thread count runs in its own process: TVM's thread pool is sized
when TVM is first imported. Above 1 thread :func:`bncompile.bench.benchmark` times in settled rounds
(:func:`bncompile.bench.timing.time_settled`: each timed call starts once no other thread of the process
is runnable, so neither runtime's spinning workers take the other's cores); the table says which rounds
ran and gives ``b2b`` (TVM / onnxruntime of the calls right after, each runtime's own workers still
spinning). Prints TVM / onnxruntime per network and thread count, with the CPU it ran on (model, vector
width, cache sizes) and the load average before and after (the machine may be shared: a busy core delays
every parallel launch of both runtimes).

Usage::

    python benchmarks/bench_edge.py [--size 224] [--repeat 10] [--warmup 2] [--networks a,b]
        [--threads 1,2] [--json out.json] [--db DIR]
    TVM_NUM_THREADS=1 python benchmarks/bench_edge.py --kernels --networks mobilenet_v2 [--top 25]

With ``--db DIR`` (a database written by ``bncompile tune``) each network is measured again with TVM
compiled from it (``compile --db``), so the table has untuned and tuned ratios side by side.

With ``--kernels`` it prints where the time goes instead: each scheduled function of the network's compile
timed alone (:func:`kernel_profile`), heaviest first, with its rule and GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from edge_models import NETWORKS  # noqa: E402

from bncompile.bench import check_outputs_or_exit, write_json_data  # noqa: E402

DEFAULT = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnety_400mf", "shufflenet_v2",
           "resnet50", "densenet121"]


def cpu_description() -> str:
    """``model, vector width, L1d/L2/L3`` of this machine, from /proc/cpuinfo and sysfs."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"
    caches = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level, kind = (idx / "level").read_text().strip(), (idx / "type").read_text().strip()
            if kind != "Instruction":
                caches[f"L{level}{'d' if kind == 'Data' else ''}"] = (idx / "size").read_text().strip()
        except OSError:
            continue
    cache_text = ", ".join(f"{k} {v}" for k, v in caches.items())
    return f"{model}, {width}, {cache_text}, {os.cpu_count()} cores"


def _load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def run_one(networks, threads, args, db=None) -> dict:
    """One process per thread count: benchmark each network, return {network: ratio or error}. ``db``: the
    ``tvm`` variant compiles with this tuning database (``bncompile tune``)."""
    from bncompile.bench import benchmark

    out = {}
    for name in networks:
        model = NETWORKS[name](size=args.size)
        try:
            rep = benchmark(model, batches=(1,), threads=threads, variants=["ort", "tvm"], repeat=args.repeat,
                            warmup=args.warmup, memory=False, progress=False, db=db)
            d = rep.to_dict()
            res = {r["variant"]: r for r in d["results"]}
            tvm, ort = res.get("tvm", {}), res.get("ort", {})
            out[name] = {"tvm_ms": tvm.get("median_ms"), "ort_ms": ort.get("median_ms"),
                         "ratio": tvm.get("ratio"), "status": tvm.get("status"),
                         "error": tvm.get("reason"), "max_rel_err": tvm.get("max_rel_err"),
                         "tvm_threads": tvm.get("threads_used"), "ort_threads": ort.get("threads_used"),
                         "tvm_parallelism": tvm.get("parallelism"), "ort_parallelism": ort.get("parallelism"),
                         "settled": d.get("settle"), "b2b_ratio": tvm.get("warm_ratio"),
                         "tvm_busy": tvm.get("threads_busy"), "ort_busy": ort.get("threads_busy")}
        except Exception as err:  # noqa: BLE001 - a benchmark reports, it does not stop
            out[name] = {"status": "failed", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(f"  threads={threads} {name}{' (tuned)' if db else ''}: {out[name]}", file=sys.stderr, flush=True)
    return out


def kernel_profile(name: str, args) -> None:
    """Per-function times of one network at batch 1 on this process's threads (``TVM_NUM_THREADS``): each
    scheduled PrimFunc of the compile built alone and timed on random inputs of its buffer shapes (the
    minimum of ``--repeat`` repeats; caches are warm, so a kernel that streams from DRAM in the network reads
    faster here). Prints the heaviest ``--top`` (time x calls), with the rule that scheduled each function
    and GFLOP/s from TVM's FLOP estimate: the ones far below the others are the ones to work on."""
    import re

    import numpy as np
    import onnx

    from bncompile.lower import graph_schedules
    from bncompile.lower.tuning import fused_module
    from bncompile.lower.tvm import submodule, tvm as _tvm

    tvm = _tvm()
    model = onnx.ModelProto()
    model.CopyFrom(NETWORKS[name](size=args.size))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    fused, tdict = fused_module(model)
    target = tvm.target.Target(tdict)
    rules: dict = {}
    mod = graph_schedules.schedule_module(fused, target, rules)
    calls: dict = {}
    for callee in re.findall(r"call_tir\((\w+),", str(mod["main"])):
        calls[callee] = calls.get(callee, 0) + 1
    dev = tvm.cpu()
    rows = []
    for gv, func in mod.functions.items():
        fname = gv.name_hint
        if not isinstance(func, tvm.tirx.PrimFunc) or fname not in calls:
            continue
        sig = func.script().split("def main(", 1)[1].split("):\n", 1)[0]
        shapes = [(tuple(int(v) for v in re.findall(r"\d+", dims.replace("T.int64", ""))), dtype)
                  for dims, dtype in re.findall(r'T\.Buffer\(\(([^)]*(?:\)[^)]*)*?)\),\s*"(\w+)"', sig)]
        if len(shapes) != len(func.params):
            continue                       # symbolic shapes, non-buffer parameters: not timed
        lib = tvm.compile(tvm.IRModule({fname: func.with_attr("global_symbol", fname)}), target=target)
        rng = np.random.default_rng(0)
        tensors = [tvm.runtime.tensor(rng.standard_normal(s).astype(d), dev) for s, d in shapes]
        timer = lib.mod.time_evaluator(fname, dev, number=10, repeat=args.repeat)
        us = min(timer(*tensors).results) * 1e6
        try:
            flops = float(submodule("tvm.s_tir.analysis").estimate_tir_flops(tvm.IRModule({"main": fused[fname]})))
        except Exception:  # noqa: BLE001 - no estimate
            flops = 0.0
        rows.append((us * calls[fname], us, calls[fname], fname, rules.get(fname, ""), flops, shapes))
    total = sum(r[0] for r in rows)
    print(f"{name}: {len(rows)} functions, {total / 1e3:.2f} ms summed (batch 1, size {args.size})")
    print(f"{'us x calls':>11} {'share':>6} {'calls':>5} {'us':>8} {'GFLOP/s':>8}  {'rule':<22} function  (first input -> output)")
    for tot, us, n, fname, rule, flops, shapes in sorted(rows, reverse=True)[:args.top]:
        print(f"{tot:11.1f} {100 * tot / total:5.1f}% {n:5d} {us:8.1f} {flops / us / 1e3:8.1f}  {rule:<22} "
              f"{fname[:48]}  {shapes[0][0]} -> {shapes[-1][0]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--networks", default=",".join(DEFAULT))
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--db", default=None, help="tuning database folder (bncompile tune): also measure TVM tuned")
    ap.add_argument("--kernels", action="store_true",
                    help="per-kernel times of each network instead (batch 1, TVM_NUM_THREADS threads; no onnxruntime)")
    ap.add_argument("--top", type=int, default=25, help="--kernels: the heaviest functions printed")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_outputs_or_exit("bench_edge.py", {"--json": args.json})
    networks = [n for n in args.networks.split(",") if n]
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        ap.error(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")
    if args.kernels:
        print(f"CPU: {cpu_description()}")
        for name in networks:
            kernel_profile(name, args)
        return 0
    if args._child is not None:
        Path(args._out).write_text(json.dumps(run_one(networks, args._child, args, db=args.db)))
        return 0
    thread_counts = sorted({int(t) for t in args.threads.split(",") if t})
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    load_before = _load_average()
    results = {}
    kinds = ["untuned", "tuned"] if args.db else ["untuned"]
    for t in thread_counts:
        results[t] = {}
        # each in its own process: TVM sizes its thread pool (TVM_NUM_THREADS) when it starts. (A second
        # benchmark in one process once seemed to get half a CPU: that was the shared machine's load, see
        # the README's Edge networks paragraph, not the benchmark.)
        for k in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = [sys.executable, __file__, "--size", str(args.size), "--repeat", str(args.repeat),
                       "--warmup", str(args.warmup), "--networks", ",".join(networks), "--_child", str(t),
                       "--_out", str(out)] + (["--db", args.db] if k == "tuned" else [])
                subprocess.run(cmd, check=True, env={**os.environ, "TVM_NUM_THREADS": str(t)})
                results[t][k] = json.loads(out.read_text())
    header = "network".ljust(22) + "".join(f"{'TVM/ORT @' + str(t) + 't' + (' ' + k if args.db else ''):>24}"
                                           f"{'TVM ms':>10}{'ORT ms':>10}{'thr':>6}{'par':>10}{'b2b':>6}"
                                           for t in thread_counts for k in kinds)
    print(header)
    for name in networks:
        row = name.ljust(22)
        for t in thread_counts:
            for k in kinds:
                r = results[t][k][name]
                if r.get("ratio") is None:
                    row += f"{(r.get('status') or 'failed'):>24}{'':>36}"
                else:
                    row += (f"{r['ratio']:>24.2f}{r['tvm_ms']:>10.2f}{r['ort_ms']:>10.2f}"
                            f"{r['tvm_threads']!s:>3}/{r['ort_threads']!s:<2}"
                            f"{r['tvm_parallelism']:>5.2f}/{r['ort_parallelism']:<4.2f}"
                            f"{_fmt_ratio(r.get('b2b_ratio')):>6}")
        print(row)
    print("(thr = threads TVM / onnxruntime really used; par = their CPU time / wall time over the timed runs; "
          "b2b = TVM / onnxruntime of the calls right after the timed ones, settled rounds only)")
    for t in thread_counts:
        settled = {r.get("settled") for k in kinds for r in results[t][k].values()} - {None}
        print(f"  @{t}t: {'settled' if settled == {True} else 'plain' if settled == {False} else 'mixed'} rounds")
    print(f"load average (1, 5, 15 min): {load_before} before, {_load_average()} after")
    for t in thread_counts:
        for k in kinds:
            for name in networks:
                if results[t][k][name].get("error"):
                    print(f"  {name} @{t}t {k}: {results[t][k][name]['error']}")
    if args.json:
        write_json_data({"cpu": cpu, "size": args.size, "results": results, "load_before": load_before,
                         "load_after": _load_average()}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
