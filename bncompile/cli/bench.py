"""``bncompile bench model.onnx [--batch 1,8] [--threads N] ...``: compare runtimes against onnxruntime.

``bncompile bench --kernels`` runs the TVM batch-normalization kernel benchmark instead
(:func:`bncompile.bench.kernels.run_kernel_benchmark`; with ``--target cuda``,
:func:`bncompile.bench.cuda.run_cuda_benchmark`: the kernels against the GPU's own copy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from bncompile._io import Files
from bncompile.cli import _args
from bncompile.errors import InputError, UnsupportedError

DESCRIPTION = (
    "Time a model on the same seeded inputs, in interleaved rounds (so machine drift cancels), in "
    "onnxruntime at its default optimization level (the baseline) and with all optimizations off, "
    "the bncompile-folded model in onnxruntime at both levels, the TVM-compiled model (marked "
    "unavailable, with the reason, when it does not compile) and CUDA versions where present. "
    "Prints median/p90 latency, throughput, the ratio to onnxruntime, the max error against it and "
    "peak memory. --kernels runs the TVM kernel benchmark instead. Exit 0 ok, 2 bad input.")


def add_arguments(parser) -> None:
    from bncompile.bench import ALL_VARIANTS, DEFAULT_REPEAT, DEFAULT_THREADS, DEFAULT_WARMUP

    parser.add_argument("model", nargs="?", help="input .onnx model (not with --kernels)")
    parser.add_argument("--kernels", action="store_true",
                        help="benchmark the TVM batch-normalization kernels instead of a model")
    parser.add_argument("--batch", default=None, metavar="B1,B2,...",
                        help="batch sizes for a free batch dimension (default 1, or the model's fixed batch)")
    parser.add_argument("--threads", type=_args.count(1, 4096, "a number of threads"), default=None, metavar="N",
                        help=f"intra-op threads of onnxruntime and TVM (default {DEFAULT_THREADS}: "
                             "reproducible on a busy machine)")
    parser.add_argument("--settle", action=argparse.BooleanOptionalAction, default=None,
                        help="settled rounds: time each call once the other runtimes' thread-pool workers "
                             "sleep, then once more right after it (b2b), and report each pool's spin after "
                             "its calls (default: on when --threads > 1, and always with --kernels; "
                             "--no-settle: plain interleaving)")
    parser.add_argument("--target", default="llvm", help="TVM target of the tvm variant (default llvm)")
    parser.add_argument("--repeat", type=_args.count(1, 10**6, "a number of rounds"), default=DEFAULT_REPEAT, metavar="R",
                        help=f"timed interleaved rounds (default {DEFAULT_REPEAT})")
    parser.add_argument("--warmup", type=_args.count(0, 10**6, "a number of rounds"), default=DEFAULT_WARMUP, metavar="W",
                        help=f"discarded warm-up rounds (default {DEFAULT_WARMUP})")
    parser.add_argument("--variants", default=None, metavar="V1,V2,...",
                        help=f"variants to run (ort always runs): {', '.join(ALL_VARIANTS)} "
                             "(default: all CPU ones and the CUDA ones available)")
    parser.add_argument("--seed", type=_args.seed, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="shape of an input with free non-batch dimensions (repeatable)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw a bar chart (needs matplotlib)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on stderr")


def files(args) -> Files:
    """The model and its external data (read); --json and --plot (written)."""
    from bncompile import onnx_utils

    f = Files()
    if args.model and not args.kernels:
        for k, p in enumerate(onnx_utils.model_files(args.model)):
            f.read(p, "model" if k == 0 else "model's external data file")
    return f.write(args.json, "JSON results", "--json").write(args.plot, "plot", "--plot")


def _check_output(path, flag: str) -> None:
    from bncompile._io import check_output_path

    check_output_path(path, what=flag.lstrip("-"), flag=flag)


def _check_args(args) -> None:
    """Every check that needs no measurement, before any work (nothing is written on failure)."""
    from bncompile._io import check_input_file

    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: give 1 or more")
    if args.repeat < 1:
        raise InputError(f"--repeat {args.repeat}: give 1 or more rounds")
    if args.warmup < 0:
        raise InputError(f"--warmup {args.warmup}: give 0 or more rounds")
    if args.json:
        _check_output(args.json, "--json")
    if args.plot:
        _check_output(args.plot, "--plot")
        if args.json and Path(args.plot).resolve() == Path(args.json).resolve():
            raise InputError("--json and --plot name the same file: give two paths")
    if args.kernels:
        if args.model:
            raise InputError("--kernels benchmarks the BN kernels, not a model: drop the model or --kernels")
        for flag, value in (("--batch", args.batch), ("--plot", args.plot), ("--variants", args.variants),
                            ("--input-shape", args.input_shape)):
            if value:
                raise InputError(f"{flag} does not apply to --kernels: drop it")
        return
    if not args.model:
        raise InputError("give a model to benchmark (bncompile bench model.onnx), or --kernels")
    check_input_file(args.model)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UnsupportedError("--plot needs matplotlib: pip install 'bncompile[plot]'")


def run(args) -> int:
    _check_args(args)
    if args.kernels:
        return _run_kernels(args)

    from bncompile import onnx_utils
    from bncompile.bench import benchmark, parse_batches, plot, write_json

    batches = parse_batches(args.batch) if args.batch is not None else None
    variants = None
    if args.variants is not None:
        variants = [v for v in args.variants.split(",") if v.strip()]
        if not variants:
            raise InputError(f"--variants {args.variants!r}: name at least one variant")
    shapes = onnx_utils.parse_input_shapes(args.input_shape)
    report = benchmark(args.model, batches=batches, threads=args.threads, target=args.target,
                       repeat=args.repeat, warmup=args.warmup, variants=variants,
                       progress=args.progress and _is_terminal(), seed=args.seed, memory=args.memory,
                       input_shapes=shapes, settle=args.settle)
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    print(report.table())
    return 0


def _is_terminal() -> bool:
    """A progress bar only on a terminal (in a log or a pipe it is noise beside the one-line error)."""
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _run_kernels(args) -> int:
    from bncompile._io import atomic_output
    from bncompile.bench.kernels import format_table, run_kernel_benchmark

    if str(args.target).split(":")[0] == "cuda":
        # on a GPU the floor is the device's own copy, not onnxruntime on the host (bncompile.bench.cuda)
        from bncompile.bench.cuda import format_cuda_table, run_cuda_benchmark
        from bncompile.lower import tvm as _tvm

        if not _tvm.cuda_available():
            raise UnsupportedError("--kernels --target cuda: TVM sees no CUDA GPU here; run it on a machine "
                                   "with one, or drop --target for the CPU kernels")
        result = run_cuda_benchmark(repeat=args.repeat, json_path=args.json)
        print(format_cuda_table(result))
        return 0
    result = run_kernel_benchmark(repeat=args.repeat, threads=args.threads, target=args.target,
                                  rounds=_kernel_rounds(args))
    backward = _run_kernels_backward(args)
    if args.json:
        with atomic_output(args.json, what="--json") as tmp:
            Path(tmp).write_text(json.dumps({**result, "backward": backward}, indent=2, default=str) + "\n")
    print(format_table(result))
    from bncompile.bench.kernels import format_backward_table

    print(format_backward_table(backward))
    return 0


def _run_kernels_backward(args) -> dict:
    """The backward section of ``--kernels`` (bncompile.bench.kernels.run_backward_benchmark)."""
    from bncompile.bench.kernels import run_backward_benchmark

    return run_backward_benchmark(repeat=args.repeat, threads=args.threads, target=args.target,
                                  rounds=_kernel_rounds(args))


def _kernel_rounds(args) -> str:
    """--kernels: settled rounds (bncompile.bench.kernels) unless --no-settle asks for interleaved ones."""
    return "interleaved" if args.settle is False else "settled"
