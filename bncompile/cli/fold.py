"""``bncompile fold model.onnx [-o out.onnx]``: fold inference BatchNormalization, verify, explain."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bncompile._io import Files, atomic_output, check_input_file
from bncompile.cli import _args
from bncompile.errors import InputError, VerificationError

DESCRIPTION = (
    "Fold inference BatchNormalization nodes into the Conv, ConvTranspose, Gemm or MatMul before "
    "them (also through a Reshape, and with a per-channel Mul/Add after them), verify the result "
    "in onnxruntime with all graph optimizations off, and report each BN folded or left and why. "
    "Exit 0 ok, 1 verification failed, 2 bad input.")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="input .onnx model (external data is read lazily)")
    parser.add_argument("-o", "--output", help="output path (default: <model>.folded.onnx beside the input)")
    parser.add_argument("--in-place", action="store_true", help="overwrite the input model")
    parser.add_argument("--decompose", action="store_true",
                        help="rewrite each inference BN that cannot be folded into Mul + Add")
    parser.add_argument("--no-fold-constants", dest="fold_constants", action="store_false",
                        help="do not evaluate constant-only subexpressions first")
    parser.add_argument("--no-absorb", dest="absorb_affine", action="store_false",
                        help="do not fold a per-channel Mul/Add that follows a BN")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--check", type=_args.count(0, 10**4, "a number of random input sets"), default=2,
                       metavar="N",
                       help="number of random input sets to verify with (default 2)")
    check.add_argument("--no-check", dest="check", action="store_const", const=0,
                       help="skip the verification")
    parser.add_argument("--seed", type=_args.seed, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="shape of an input with free dimensions (repeatable); a free batch "
                             "dimension defaults to 1")
    parser.add_argument("--tolerance", type=_args.tolerance, default=None,
                        help="max relative error (abs error / largest |output|); default per dtype: "
                             "float32 1e-4, float16 1e-2, bfloat16 5e-2, float64 1e-9")
    parser.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="save weights in <output>.data (auto: when the input had external "
                             "data or the model exceeds 2 GB)")
    parser.add_argument("--float16", action="store_true",
                        help="fold a float32 model in float32, then convert the result to float16 "
                             "(inputs and outputs too): each weight is rounded once")
    parser.add_argument("--strict-float16", action="store_true",
                        help="a float16 result must be no less accurate against float32 than the "
                             "unfolded float16 model (default: within the float16 tolerance)")
    parser.add_argument("--report", metavar="OUT.json", help="also write the report as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def default_output(model: Path) -> Path:
    name = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(name + ".folded.onnx")


def output_path(args) -> Path:
    model = Path(args.model)
    if args.in_place:
        if args.output and not _same_path(args.output, model):
            raise InputError("--in-place and -o name different files: give one of them")
        return model
    output = Path(args.output) if args.output else default_output(model)
    if _same_path(output, model):
        raise InputError(f"output {str(output)!r} is the input: pass --in-place to overwrite it")
    return output


def _same_path(a, b) -> bool:
    import os

    return os.path.realpath(a) == os.path.realpath(b)


def files(args) -> Files:
    """What fold reads (the model and its external data) and writes (the model, its data file, the
    report). With --in-place the model and its data may be replaced."""
    from bncompile import onnx_utils

    output = output_path(args)
    f = Files()
    for k, p in enumerate(onnx_utils.model_files(args.model)):
        f.read(p, "model" if k == 0 else "model's external data file", replaceable=args.in_place)
    f.write(output, "folded model")
    if args.external_data != "never":
        f.write(Path(str(output) + ".data"), "folded model's external data file")
    f.write(args.report, "report", "--report")
    return f


def run(args) -> int:
    from bncompile import onnx_utils
    from bncompile.folding import fold

    model = check_input_file(args.model)
    output = output_path(args)
    shapes = onnx_utils.parse_input_shapes(args.input_shape)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    try:
        result = fold(model, output=None, in_place=args.in_place, decompose=args.decompose,
                      fold_constants=args.fold_constants, absorb_affine=args.absorb_affine,
                      check=args.check > 0, check_runs=max(args.check, 1), seed=args.seed,
                      input_shapes=shapes, tolerance=args.tolerance, float16=args.float16,
                      strict_float16=args.strict_float16)
    except VerificationError as err:  # nothing written; show what was done, then exit 1
        failed = getattr(err, "result", None)
        if failed is not None:
            _emit(failed.report, args)
        raise
    t = time.perf_counter()
    result.save(output, external_data=external)
    result.report.seconds["save"] = round(time.perf_counter() - t, 6)
    result.report.output = str(output)
    _emit(result.report, args)
    return 0


def _emit(report, args) -> None:
    if args.report:
        with atomic_output(args.report, what="report") as tmp:
            Path(tmp).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if not args.quiet:
        print(report.summary())
    else:
        for warning in report.warnings:
            print(f"bncompile fold: warning: {warning}", file=sys.stderr)
