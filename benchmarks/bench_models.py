"""Benchmark a ResNet-18-style network with :func:`bncompile.bench.benchmark` at batch 1 and 8.

The network is generated here with ``onnx.helper`` (seeded, random weights; 11.7M parameters):
ResNet-18 v1 layout, every convolution without bias followed by BatchNormalization (20 BN), Relu,
basic blocks with residual Adds (1x1 stride-2 projection + BN on the down-sampling shortcuts),
global average pooling, Flatten and a 1000-way Gemm. The input has a free batch dimension ``N``
and is ``N x 3 x S x S`` with ``S = --size`` (default 224, the standard size; 112 quarters the
work if time is short). Random weights are scaled (He init, BN variances near 1) so activations stay
in range and the errors against onnxruntime are meaningful.

Usage::

    python benchmarks/bench_models.py [--size 224] [--batch 1,8] [--repeat 20] [--warmup 3]
        [--threads 1] [--variants ...] [--no-memory] [--json out.json] [--plot out.png]
        [--twice]

``--twice`` runs the whole benchmark two times back to back and prints the ratios of both runs and
their relative difference (the reproducibility check: every ratio should agree within 10%); its
``--json`` is then ``{"runs": [report, report]}``, each report following ``bench.schema.json``.

TVM's default Relax pipeline (no tuning) runs this network about 25-30x slower than onnxruntime on
CPU, so one interleaved round with the ``tvm`` variant costs mostly TVM; use ``--variants`` and a
smaller ``--repeat`` for it (see the figures in the issue report).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet18(*, size: int = 224, seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 v1 with Conv(no bias)+BN+Relu and residual Adds; input ``[N, 3, size, size]``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(base):
        counter[0] += 1
        return f"{base}{counter[0]}"

    def const(arr, base):
        n = name(base)
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), n))
        return n

    def conv_bn(x, c_in, c_out, k, stride=1, relu=True):
        w = const(rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k)), "W")
        c = name("conv")
        nodes.append(helper.make_node("Conv", [x, w], [c], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        params = [const(rng.uniform(0.5, 1.5, c_out), "gamma"), const(rng.normal(0, 0.1, c_out), "beta"),
                  const(rng.normal(0, 0.1, c_out), "mean"), const(rng.uniform(0.5, 1.5, c_out), "var")]
        y = name("bn")
        nodes.append(helper.make_node("BatchNormalization", [c, *params], [y], epsilon=1e-5))
        if relu:
            r = name("relu")
            nodes.append(helper.make_node("Relu", [y], [r]))
            return r
        return y

    def block(x, c_in, c_out, stride):
        h = conv_bn(x, c_in, c_out, 3, stride)
        h = conv_bn(h, c_out, c_out, 3, 1, relu=False)
        short = x if stride == 1 and c_in == c_out else conv_bn(x, c_in, c_out, 1, stride, relu=False)
        s, r = name("add"), name("relu")
        nodes.append(helper.make_node("Add", [h, short], [s]))
        nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    x = conv_bn("input", 3, 64, 7, 2)
    p = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = p, 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(x, c, c_out, stride)
        x = block(x, c_out, c_out, 1)
        c = c_out
    g, f = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
    nodes.append(helper.make_node("Flatten", [g], [f], axis=1))
    w = const(rng.standard_normal((classes, 512)) * np.sqrt(1.0 / 512), "fcW")
    b = const(np.zeros(classes), "fcB")
    nodes.append(helper.make_node("Gemm", [f, w, b], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="bncompile-bench")
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv=None) -> int:
    from bncompile.bench import (BenchReport, benchmark, check_outputs_or_exit, parse_batches, plot, write_json,
                                 write_json_data)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--twice", action="store_true", help="run two times and compare the ratios")
    args = ap.parse_args(argv)
    check_outputs_or_exit("bench_models.py", {"--json": args.json, "--plot": args.plot})

    model = resnet18(size=args.size)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    print(f"model: ResNet-18-style, input N x 3 x {args.size} x {args.size}, {n_params / 1e6:.1f}M parameters, "
          f"{n_bn} BatchNormalization, {len(model.graph.node)} nodes")
    variants = args.variants.split(",") if args.variants else None
    kw = dict(batches=parse_batches(args.batch), threads=args.threads, target=args.target, repeat=args.repeat,
              warmup=args.warmup, variants=variants, memory=args.memory)
    reports = []
    for i in range(2 if args.twice else 1):
        t = time.perf_counter()
        report = benchmark(model, **kw)
        report.model = f"resnet18-{args.size}"
        reports.append(report)
        print(f"\nrun {i + 1} ({time.perf_counter() - t:.0f} s):")
        print(report.table())
        sys.stdout.flush()
    if args.json:
        data = reports[0].to_dict() if len(reports) == 1 else {
            "runs": [r.to_dict() for r in reports]}
        if len(reports) == 1:
            write_json(reports[0], args.json)
        else:
            write_json_data(data, args.json)
    if args.plot:
        plot(reports[-1], args.plot)
    if len(reports) == 2:
        for label, get in (("wall-clock ratio to ort", BenchReport.ratios),
                           ("CPU-time ratio to ort", BenchReport.cpu_ratios)):
            a, b = get(reports[0]), get(reports[1])
            print(f"\nreproducibility, {label} (run 1, run 2, relative difference):")
            worst = 0.0
            for k in a:
                if k in b and a[k] and b[k] and not k.startswith("ort@"):
                    diff = abs(b[k] - a[k]) / a[k]
                    worst = max(worst, diff)
                    print(f"  {k:<24} {a[k]:.3f}  {b[k]:.3f}  {diff * 100:5.1f}%")
            print(f"  worst: {worst * 100:.1f}% ({'within' if worst <= 0.10 else 'OUTSIDE'} 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
