"""``bncompile run model.so --input x=x.npy [-o out.npz]``: run a compiled library on .npy inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bncompile._io import Files
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


def files(args) -> Files:
    """The library and its sidecars, every --input file (read); the -o .npz (written)."""
    lib = Path(args.library)
    f = Files().read(lib, "library")
    for suffix, what in ((".json", "library's metadata"), (".defaults.npz", "library's default inputs")):
        side = Path(str(lib) + suffix)
        if side.exists():
            f.read(side, what)
    for item in args.input:
        name, sep, path = item.partition("=")
        f.read(path if sep else item, f"input file of --input {item}")
    return f.write(args.output, "outputs (.npz)")


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
            value = np.load(p, allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a bad input
            raise InputError(f"input file {str(p)!r} is not a readable .npy file ({type(err).__name__}): "
                             "save it with numpy.save") from None
        if not isinstance(value, np.ndarray):
            raise InputError(f"input file {str(p)!r} is an .npz archive, not one .npy array: save the "
                             "input with numpy.save")
        feeds[name] = value
    return feeds


def run(args) -> int:
    from bncompile._io import atomic_output
    from bncompile.lower.runtime import load

    cm = load(args.library)
    feeds = parse_inputs(args.input, cm.input_names)
    cm.prepare()
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
