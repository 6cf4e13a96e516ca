"""``bncompile run model.so --input x=x.npy [-o out.npz]``: run a compiled library on .npy inputs."""

from __future__ import annotations


import numpy as np

from bncompile.errors import InputError

DESCRIPTION = (
    "Run a library written by `bncompile compile` (it reads <model>.json beside it) on inputs from .npy "
    "files, and save the outputs to an .npz (by output name) or print their shapes. Inputs that had an "
    "initializer in the ONNX model may be omitted (their default is used). Exit 0 ok, 2 bad input.")


def add_arguments(p) -> None:
    p.add_argument("library", help="compiled library (.so) with its .json metadata beside it")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input (repeatable); NAME= may be left out when the model has one input")
    p.add_argument("-o", "--output", help="write the outputs to this .npz (keys: output names)")


def parse_inputs(items, names: list[str]) -> dict:
    from bncompile._io import check_input_file

    feeds = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise InputError(f"--input {item!r}: give NAME=FILE.npy (the model's inputs are {', '.join(names)})")
            name, path = names[0], item
        if name not in names:
            raise InputError(f"--input {item!r}: the model has no input {name!r} (inputs: {', '.join(names)})")
        p = check_input_file(path, f"input {name!r}")
        try:
            feeds[name] = np.load(p, allow_pickle=False)
        except Exception as err:
            raise InputError(f"input file {str(p)!r} is not a readable .npy file: {err}") from None
    return feeds


def run(args) -> int:
    from bncompile._io import atomic_output, check_output_path
    from bncompile.lower.runtime import load

    cm = load(args.library)
    feeds = parse_inputs(args.input, cm.input_names)
    if args.output:
        check_output_path(args.output, what="output")
    outs = cm.run(feeds)
    if args.output:
        with atomic_output(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outs)
        print(f"wrote {len(outs)} output(s) to {args.output}: "
              + ", ".join(f"{k}{list(v.shape)} {v.dtype}" for k, v in outs.items()))
    else:
        for k, v in outs.items():
            print(f"{k}: shape {list(v.shape)} {v.dtype} min {v.min():.6g} max {v.max():.6g}"
                  if v.size and v.dtype.kind in "fiu" else f"{k}: shape {list(v.shape)} {v.dtype}")
    return 0
