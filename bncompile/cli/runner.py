"""``bncompile runner [--target aarch64] -o DIR``: build the C++ runner into a folder of your choosing."""

from __future__ import annotations

from pathlib import Path

from bncompile._io import Files

DESCRIPTION = (
    "Build bncompile-runner (bncompile/lower/runner/runner.cc), which runs a library written by "
    "`bncompile compile` without Python, into DIR: for this machine (--target host, linking the "
    "installed TVM runtime) or cross-compiled for 64-bit ARM Linux (--target aarch64, with "
    "aarch64-linux-gnu-g++ and the runtime of `python -m bncompile.lower.runner.fetch_aarch64_runtime`, "
    "copied beside it). Nothing is written into the installed package. Exit 0 ok, 2 bad input.")


def add_arguments(p) -> None:
    p.add_argument("--target", default="host", choices=["host", "aarch64"],
                   help="host (default) or aarch64")
    p.add_argument("-o", "--output-dir", default=".", metavar="DIR", help="folder to write the runner to (default .)")
    p.add_argument("--cxx", help="C++ compiler (default g++, or aarch64-linux-gnu-g++)")


def _exe(args) -> Path:
    return Path(args.output_dir) / ("bncompile-runner" if args.target == "host" else "bncompile-runner-aarch64")


def files(args) -> Files:
    f = Files().write(_exe(args), "runner", "-o")
    if args.target == "aarch64":
        for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
            f.write(Path(args.output_dir) / name, "aarch64 runtime library", "-o")
    return f


def run(args) -> int:
    from bncompile.lower.runner import build_runner

    exe = build_runner(args.output_dir, target=args.target, cxx=args.cxx)
    print(f"wrote {exe}" + (" (+ libtvm_runtime.so, libtvm_ffi.so beside it)" if args.target == "aarch64" else ""))
    return 0
