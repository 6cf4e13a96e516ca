"""Benchmark the TVM batch-normalization kernels against onnxruntime and NumPy.

    python benchmarks/bench_kernels.py [--repeat 30] [--json out.json] [--target llvm:haswell]
                                       [--threads 2] [--part forward|backward|both]
                                       [--rounds settled|interleaved]
    python benchmarks/bench_kernels.py --target cuda [--schedule cuda_two_phase] [--json out.json]

With ``--target cuda`` (a GPU machine): the forward, inference and backward kernels against the GPU's
own device-to-device copy of the same bytes (:mod:`bncompile.bench.cuda`); ``--schedule`` forces the
forward's rule for an A/B run.

The forward table, then the backward's (its time beside the forward's and beside its floor); both for
the same ``--target`` and thread count. ``--json`` holds the forward's result with the backward's under
``"backward"``.
"""

from __future__ import annotations

import argparse
import logging

from bncompile.bench import check_outputs_or_exit, write_json_data
from bncompile.bench.kernels import print_table, run_kernel_benchmark


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="timed rounds (median reported)")
    ap.add_argument("--rounds", choices=("settled", "interleaved"), default="settled",
                    help="settled (default): each runner twice in a row, the second timed (TVM's pool awake), "
                         "then a wait until its workers sleep; interleaved: one call each, TVM's pool never "
                         "spinning (every call wakes a worker)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--target", default="llvm",
                    help="TVM target (default llvm: the host CPU; llvm:haswell builds AVX2 kernels on any x86 host)")
    ap.add_argument("--part", choices=("both", "forward", "backward"), default="both",
                    help="which tables to run (default both)")
    ap.add_argument("--schedule", default=None, help="CUDA only: force the forward's schedule rule")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    check_outputs_or_exit("bench_kernels.py", {"--json": args.json_path})
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.target.split(":")[0] == "cuda":
        from bncompile.bench.cuda import format_cuda_table, run_cuda_benchmark

        res = run_cuda_benchmark(repeat=min(args.repeat, 30), schedule=args.schedule, json_path=args.json_path)
        print(format_cuda_table(res))
        return 0
    result: dict = {}
    if args.part in ("both", "forward"):
        result = run_kernel_benchmark(repeat=args.repeat, threads=args.threads, target=args.target,
                                      rounds=args.rounds)
        print_table(result)
    if args.part in ("both", "backward"):
        from bncompile.bench.kernels import format_backward_table, run_backward_benchmark

        backward = run_backward_benchmark(repeat=args.repeat, threads=args.threads, target=args.target,
                                          rounds=args.rounds)
        print(format_backward_table(backward))
        result = {**result, "backward": backward} if result else backward
    if args.json_path:
        write_json_data(result, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
