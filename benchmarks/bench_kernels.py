"""Benchmark the TVM batch-normalization kernels against onnxruntime and NumPy.

    python benchmarks/bench_kernels.py [--repeat 30] [--json out.json] [--target llvm:haswell]
"""

from __future__ import annotations

import argparse
import logging

from bncompile.bench.kernels import print_table, run_kernel_benchmark


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="interleaved rounds (median reported)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--target", default="llvm",
                    help="TVM target (default llvm: the host CPU; llvm:haswell builds AVX2 kernels on any x86 host)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    result = run_kernel_benchmark(repeat=args.repeat, json_path=args.json_path, threads=args.threads,
                                  target=args.target)
    print_table(result)
    from bncompile.bench.kernels import format_backward_table, run_backward_benchmark

    print(format_backward_table(run_backward_benchmark(repeat=args.repeat, threads=args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
