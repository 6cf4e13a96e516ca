"""``bncompile inline``: replace bncompile's custom ops by their bodies of standard ONNX ops."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bncompile._io import Files, check_input_file
from bncompile.errors import InputError

DESCRIPTION = """Inline bncompile's custom ops (model-local functions) into plain standard ops, for
runtimes and tools that read no model-local functions (TensorRT, TVM's ONNX frontend). The output
computes the same values and passes the full ONNX checker."""


def add_arguments(p) -> None:
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", help="output path (default: <model>.inlined.onnx beside the input)")
    p.add_argument("--in-place", action="store_true", help="overwrite the input model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def output_path(args) -> Path:
    src = Path(args.model)
    if args.in_place and args.output:
        raise InputError("give either -o or --in-place, not both")
    out = Path(args.output) if args.output else (src if args.in_place else src.with_suffix(".inlined.onnx"))
    if os.path.realpath(out) == os.path.realpath(src) and not args.in_place:
        raise InputError(f"output {str(out)!r} is the input model: pass --in-place to overwrite it, or choose -o")
    return out


def files(args) -> Files:
    """The model and its external data (read; replaced with --in-place), the inlined model (written,
    self-contained)."""
    from bncompile import onnx_utils

    f = Files()
    for k, p in enumerate(onnx_utils.model_files(args.model)):
        f.read(p, "model" if k == 0 else "model's external data file", replaceable=args.in_place and k == 0)
    return f.write(output_path(args), "inlined model")


def run(args) -> int:
    import onnx

    from bncompile import custom_ops, onnx_utils
    from bncompile.inlining import inline_with_report

    src = check_input_file(args.model)
    out = output_path(args)
    custom_ops.register_schemas()
    model = onnx_utils.load_model_proto(src)
    result, report = inline_with_report(model)
    onnx.checker.check_model(result, full_check=True)
    onnx_utils.save_model_proto(result, out)
    report["output"] = str(out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {out}: inlined {report['calls_inlined']} call(s) of "
              f"{', '.join(report['functions']) or 'no function'}")
    return 0
