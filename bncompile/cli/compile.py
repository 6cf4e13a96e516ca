"""``bncompile compile model.onnx --target aarch64 -o model.so``: a whole ONNX graph -> a TVM library."""

from __future__ import annotations

import time
from pathlib import Path

from bncompile._io import Files
from bncompile.errors import InputError

DESCRIPTION = (
    "Compile a whole ONNX model with TVM (Relax) into a deployable library, plus <output>.json "
    "(input/output names, dtypes, shapes). Inference BatchNormalization is folded first; training-mode "
    "BatchNormalization and bncompile's custom ops run bncompile's own kernels. Targets: llvm (this CPU), "
    "x86_64, aarch64 (cross-compiled with aarch64-linux-gnu-g++), cuda (sm_90; --arch or cuda:sm_80). "
    "Run the result with `bncompile run` or the C++ runner (bncompile/lower/runner). Exit 0 ok, 2 bad input.")


def add_arguments(p) -> None:
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", help="library to write (default: <model>.<target>.so beside the input; "
                                          "a name ending in .tar writes object files, no linker needed)")
    p.add_argument("--target", default="llvm",
                   help="llvm (default, this CPU), x86_64, aarch64, cuda, or cuda:sm_XX")
    p.add_argument("--arch", help="CUDA arch for --target cuda (default sm_90)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of an input (repeatable); a dim written N, ? or -1 stays dynamic")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="do not fold inference BatchNormalization before compiling")
    p.add_argument("--db", metavar="DIR", help="tuning database folder written by `bncompile tune` (llvm targets): "
                                               "its schedules replace the hand ones where it has them")


def _target(args) -> str:
    target = args.target
    if args.arch:
        if not target.lower().startswith("cuda"):
            raise InputError(f"--arch {args.arch} applies to --target cuda only (got --target {target})")
        target = f"cuda:{args.arch}"
    return target


def output_path(args) -> Path:
    from bncompile.lower.targets import resolve_target

    name, _ = resolve_target(_target(args))          # unknown targets fail before any work
    src = Path(args.model)
    return Path(args.output) if args.output else src.with_name(f"{src.stem}.{name}.so")


def files(args) -> Files:
    """The model and its external data (read); the library, its .json and .defaults.npz (written)."""
    from bncompile import onnx_utils

    f = Files()
    for k, p in enumerate(onnx_utils.model_files(args.model)):
        f.read(p, "model" if k == 0 else "model's external data file")
    if getattr(args, "db", None):
        from bncompile.lower.tuning import DB_FILES

        for name in DB_FILES:
            f.read(Path(args.db) / name, "tuning database file")
    out = output_path(args)
    f.write(out, "library")
    f.write(Path(str(out) + ".json"), "library's metadata (<library>.json)")
    f.write(Path(str(out) + ".defaults.npz"), "library's default inputs (<library>.defaults.npz)")
    return f


def run(args) -> int:
    from bncompile import onnx_utils
    from bncompile._io import check_input_file
    from bncompile.lower.driver import compile
    from bncompile.lower.targets import resolve_target

    src = check_input_file(args.model, "model")
    target = _target(args)
    name, _ = resolve_target(target)
    out = output_path(args)
    shapes = onnx_utils.parse_input_shapes(args.input_shape, dynamic=True, named=True)
    t = time.perf_counter()
    cm = compile(str(src), target=target, input_shapes=shapes or None, fold=args.fold, db=args.db)
    cm.export(out)
    kernels = cm.info.get("kernels") or {}
    ins = ", ".join(f"{i['name']}{_shape(i['shape'])}" for i in cm.inputs)
    print(f"compiled {src.name} for {name} in {time.perf_counter() - t:.2f} s -> {out} (+ {out.name}.json); "
          f"inputs: {ins}; outputs: {', '.join(cm.output_names)}"
          + (f"; {len(kernels)} bncompile BN kernel(s)" if kernels else "")
          + (f"; {len(cm.info['tuned'])} function(s) from the tuning database" if args.db else ""))
    return 0


def _shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]" if shape is not None else "[?]"
