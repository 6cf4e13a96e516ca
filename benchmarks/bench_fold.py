"""Benchmark `bncompile fold` on a ResNet-50-sized model (about 25.5M parameters, 53 BatchNormalization).

Prints, beside onnxruntime's own optimize-and-save of the same model (``SessionOptions.
optimized_model_filepath`` at ORT_ENABLE_BASIC, which folds Conv+BN; load, optimize, save), the
wall time and peak RSS of ``fold(path, output=..., check=False)`` (load, passes, save), each in a
fresh subprocess, median of 3, and the two times again as ``--pairs`` interleaved pairs in one warmed
process (the project's way of comparing on a shared machine); then: fold time without the check (load + passes, then serialization and save separately), peak
memory (process RSS growth in a fresh subprocess, and Python allocations from tracemalloc) against
the model's size, and onnxruntime latency of the folded model against the same network built without
BN (conv with bias), measured interleaved. Weights are random and seeded.

    python benchmarks/bench_fold.py [--runs 20] [--threads 2] [--pairs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet50(*, with_bn: bool, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 v1 (bottleneck, stride in the 3x3). With BN: conv without bias + BN; without: the
    same weights with each BN folded by plain NumPy into a conv with bias (what an exporter writes)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def name(base):
        count[0] += 1
        return f"{base}{count[0]}"

    def conv(x, c_in, c_out, k, stride=1, relu=True):
        n = name("conv")
        w = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, n + "_w"))
        ins = [x, n + "_w"]
        bn_params = (rng.uniform(0.5, 1.5, c_out) * rng.choice([-1, 1], c_out) * 0.5,
                     rng.standard_normal(c_out) * 0.1, rng.standard_normal(c_out) * 0.1,
                     rng.uniform(0.5, 2.0, c_out))
        if not with_bn:  # the same layer with BN folded by plain NumPy, as an exporter would
            gamma, beta, mean, var = bn_params
            k_ = gamma / np.sqrt(var + 1e-5)
            w = (w * k_[:, None, None, None]).astype(np.float32)
            inits[-1] = numpy_helper.from_array(w, n + "_w")
            inits.append(numpy_helper.from_array((beta - mean * k_).astype(np.float32), n + "_b"))
            ins.append(n + "_b")
        pad = k // 2
        nodes.append(helper.make_node("Conv", ins, [n], name=n, strides=[stride, stride],
                                      pads=[pad] * 4, kernel_shape=[k, k]))
        y = n
        if with_bn:
            b = name("bn")
            pn = [f"{b}_{p}" for p in ("scale", "B", "mean", "var")]
            for p, arr in zip(pn, bn_params):
                inits.append(numpy_helper.from_array(arr.astype(np.float32), p))
            nodes.append(helper.make_node("BatchNormalization", [y, *pn], [b], name=b, epsilon=1e-5))
            y = b
        if relu:
            r = name("relu")
            nodes.append(helper.make_node("Relu", [y], [r], name=r))
            y = r
        return y

    x = "input"
    y = conv(x, 3, 64, 7, 2)
    p = name("pool")
    nodes.append(helper.make_node("MaxPool", [y], [p], name=p, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    y, c_in = p, 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            h = conv(y, c_in, width, 1)
            h = conv(h, width, width, 3, s)
            h = conv(h, width, width * 4, 1, relu=False)
            sc = conv(y, c_in, width * 4, 1, s, relu=False) if i == 0 else y
            a = name("add")
            nodes.append(helper.make_node("Add", [h, sc], [a], name=a))
            r = name("relu")
            nodes.append(helper.make_node("Relu", [a], [r], name=r))
            y, c_in = r, width * 4
    gp = name("gap")
    nodes.append(helper.make_node("GlobalAveragePool", [y], [gp], name=gp))
    fl = name("flatten")
    nodes.append(helper.make_node("Flatten", [gp], [fl], name=fl))
    inits.append(numpy_helper.from_array(rng.standard_normal((1000, 2048), dtype=np.float32) * 0.02, "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32) + 0.01, "fc_b"))
    nodes.append(helper.make_node("Gemm", [fl, "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="bench_fold")
    model.ir_version = 8
    return model


_CHILD = r"""
import json, os, sys, threading, time, tracemalloc
from bncompile.folding import fold
fold(sys.argv[2], check=False)                      # warm up imports and code paths
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():                                         # Linux: resident pages from /proc/self/statm
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
rss0 = rss()
peak = [rss0]
done = threading.Event()
def sample():                                      # ru_maxrss would include the parent's RSS at fork
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
mode = sys.argv[3]
if mode == "time":                                 # no sampler, no tracemalloc: clean timings
    import statistics
    times = []
    for _ in range(3):
        t = time.perf_counter()
        r = fold(sys.argv[1], check=False)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        r.save(sys.argv[4])
        times[-1] = (times[-1], time.perf_counter() - t)
        del r
    print(json.dumps({"fold_s": statistics.median(a for a, _ in times),
                      "save_s": statistics.median(b for _, b in times)}))
    sys.exit(0)
sampler = threading.Thread(target=sample, daemon=True)
if mode == "trace":
    tracemalloc.start()
else:
    sampler.start()
t = time.perf_counter()
r = fold(sys.argv[1], check=False)
t_fold = time.perf_counter() - t
fold_peak = max(peak[0], rss())
t = time.perf_counter()
proto = r.model if mode != "save" else None
t_proto = time.perf_counter() - t
t = time.perf_counter()
if mode == "save":
    r.save(sys.argv[4])
t_save = time.perf_counter() - t
done.set()
out = {"fold_s": t_fold, "to_proto_s": t_proto, "save_s": t_save, "folded": len(r.report.folded),
       "left": len(r.report.left)}
if mode == "trace":
    out["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
else:
    sampler.join()
    out["rss_fold_peak_delta"] = fold_peak - rss0
    out["rss_peak_delta"] = max(peak[0], rss()) - rss0
print(json.dumps(out))
"""


_ORT_CHILD = r"""
import json, os, sys, threading, time
import onnxruntime as ort
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
def run(path, out):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
run(sys.argv[2], sys.argv[3])                       # warm up
rss0 = rss(); peak = [rss0]; done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
if sys.argv[4] == "peak":                          # one run, in this fresh process
    th = threading.Thread(target=sample, daemon=True); th.start()
    run(sys.argv[1], sys.argv[3])
    done.set(); th.join()
    print(json.dumps({"rss_peak_delta": max(peak[0], rss()) - rss0})); sys.exit(0)
times = []
for i in range(3):
    t = time.perf_counter(); run(sys.argv[1], sys.argv[3]); times.append(time.perf_counter() - t)
print(json.dumps({"s": sorted(times)[1]}))
"""

_FOLD_SAVE_CHILD = r"""
import json, os, sys, threading, time
from bncompile.folding import fold
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
fold(sys.argv[2], output=sys.argv[3], check=False)  # warm up
rss0 = rss(); peak = [rss0]; done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
if sys.argv[4] == "peak":                          # one run, in this fresh process
    th = threading.Thread(target=sample, daemon=True); th.start()
    fold(sys.argv[1], output=sys.argv[3], check=False)
    done.set(); th.join()
    print(json.dumps({"rss_peak_delta": max(peak[0], rss()) - rss0})); sys.exit(0)
times = []
for i in range(3):
    t = time.perf_counter(); fold(sys.argv[1], output=sys.argv[3], check=False); times.append(time.perf_counter() - t)
print(json.dumps({"s": sorted(times)[1]}))
"""


_PAIRS_CHILD = r"""
import json, statistics, sys, time
import onnxruntime as ort
from bncompile.folding import fold
def ort_run(path, out):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
def ours(path, out):
    fold(path, output=out, check=False)
runs = {"ours": ours, "ort": ort_run}
for f in runs.values():                             # warm up on the model itself
    f(sys.argv[1], sys.argv[2])
times = {k: [] for k in runs}
for i in range(int(sys.argv[3])):
    order = ("ours", "ort") if i % 2 == 0 else ("ort", "ours")
    for k in order:
        t = time.perf_counter(); runs[k](sys.argv[1], sys.argv[2]); times[k].append(time.perf_counter() - t)
print(json.dumps({"ours": statistics.median(times["ours"]), "ort": statistics.median(times["ort"]),
                  "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["ort"]))}))
"""


def child(args, code=None):
    if code is not None:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmark child failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return _child(args)


def _child(args):
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def latency(a_path, b_path, runs, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # no spin-waiting: an idle session's spinning threads would steal the 2 cores from the other
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sa = ort.InferenceSession(a_path, so, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b_path, so, providers=["CPUExecutionProvider"])
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    for _ in range(3):
        sa.run(None, x)
        sb.run(None, x)
    out_a, out_b = sa.run(None, x)[0], sb.run(None, x)[0]
    agree = float(np.abs(out_a - out_b).max() / np.abs(out_b).max())
    ta, tb = [], []
    for i in range(runs):
        pair = [(sa, ta), (sb, tb)] if i % 2 == 0 else [(sb, tb), (sa, ta)]
        for s, acc in pair:
            t = time.perf_counter()
            s.run(None, x)
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), agree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pairs", type=int, default=10, help="interleaved fold/onnxruntime pairs in one process")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        bn_path, nobn_path = os.path.join(d, "r50_bn.onnx"), os.path.join(d, "r50_nobn.onnx")
        tiny_path = os.path.join(d, "tiny.onnx")
        m = resnet50(with_bn=True)
        n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
        n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        onnx.save(m, bn_path)
        onnx.save(resnet50(with_bn=False), nobn_path)
        tiny = helper.make_model(helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])], "tiny",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
            [numpy_helper.from_array(np.full((2, 2, 1, 1), 0.3, np.float32), "w")]
            + [numpy_helper.from_array(np.array([0.5, 1.5], np.float32), n) for n in "sbmv"]),
            opset_imports=[helper.make_opsetid("", 15)])
        tiny.ir_version = 8
        onnx.save(tiny, tiny_path)
        size = os.path.getsize(bn_path)
        print(f"model: ResNet-50-sized, {n_params / 1e6:.1f}M parameters, {n_bn} BatchNormalization, "
              f"{size / 2**20:.1f} MiB on disk")

        ours, theirs = ({**child([bn_path, tiny_path, os.path.join(d, f"r50_{k}.onnx"), "time"], code),
                         **child([bn_path, tiny_path, os.path.join(d, f"r50_{k}.onnx"), "peak"], code)}
                        for k, code in (("ours", _FOLD_SAVE_CHILD), ("ort", _ORT_CHILD)))
        print("load + fold + save to file: median of 3 warmed-up runs; peak RSS growth of one run in a "
              "fresh process (warmed up on a tiny model):")
        print(f"  bncompile fold (no numeric check):        {ours['s']:.3f} s, peak "
              f"{ours['rss_peak_delta'] / 2**20:.1f} MiB = {ours['rss_peak_delta'] / size:.2f}x model")
        print(f"  onnxruntime ORT_ENABLE_BASIC + save:      {theirs['s']:.3f} s, peak "
              f"{theirs['rss_peak_delta'] / 2**20:.1f} MiB = {theirs['rss_peak_delta'] / size:.2f}x model")
        print(f"  bncompile / onnxruntime time: {ours['s'] / theirs['s']:.2f}x (target < 1); "
              f"bncompile peak {ours['rss_peak_delta'] / size:.2f}x the model (target < 2)")
        pairs = child([bn_path, os.path.join(d, "r50_pair.onnx"), str(args.pairs)], _PAIRS_CHILD)
        print(f"  the same two in one process, {args.pairs} interleaved pairs (fairer on a shared machine): "
              f"bncompile {pairs['ours']:.3f} s, onnxruntime {pairs['ort']:.3f} s, median ratio "
              f"{pairs['ratio']:.2f}x")
        timing = child([bn_path, tiny_path, "time", os.path.join(d, "r50_timing.onnx")])
        mem = child([bn_path, tiny_path, "rss"])
        trace = child([bn_path, tiny_path, "trace"])
        saved = child([bn_path, tiny_path, "save", os.path.join(d, "r50_folded.onnx")])
        print(f"fold (load + input checker + passes, no numeric check), median of 3: {timing['fold_s']:.3f} s; "
              f"folded {mem['folded']}, left {mem['left']}")
        print(f"  then to onnx.ModelProto: {mem['to_proto_s']:.3f} s;  or save to file: {timing['save_s']:.3f} s")
        print(f"peak memory of fold() alone (RSS growth, sampled every 1 ms): "
              f"{mem['rss_fold_peak_delta'] / 2**20:.1f} MiB = {mem['rss_fold_peak_delta'] / size:.2f}x model size")
        print(f"peak memory, fold + to onnx.ModelProto: {mem['rss_peak_delta'] / 2**20:.1f} MiB = "
              f"{mem['rss_peak_delta'] / size:.2f}x model size")
        print(f"peak memory, fold + save to file:       {saved['rss_peak_delta'] / 2**20:.1f} MiB = "
              f"{saved['rss_peak_delta'] / size:.2f}x model size")
        print(f"peak Python allocations (tracemalloc, fold + to_proto): {trace['tracemalloc_peak'] / 2**20:.1f} MiB = "
              f"{trace['tracemalloc_peak'] / size:.2f}x model size")

        folded_path = os.path.join(d, "r50_folded.onnx")
        t_f, t_n, agree = latency(folded_path, nobn_path, args.runs, args.threads)
        print(f"onnxruntime latency (batch 1, {args.threads} threads, default optimizations, median of "
              f"{args.runs} interleaved): folded {t_f * 1e3:.2f} ms, built without BN {t_n * 1e3:.2f} ms, "
              f"ratio {t_f / t_n:.3f}x")
        print(f"  outputs of the two agree to {agree:.2e} (max abs difference / max |output|)")


if __name__ == "__main__":
    main()
