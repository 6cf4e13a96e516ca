"""The C++ runner for exported libraries (``runner.cc``), the script that fetches the aarch64 TVM
runtime, and :func:`build_runner`, which builds the runner into a folder of the user's choosing
(``bncompile runner [--target aarch64] -o DIR``) without writing into the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bncompile.errors import InputError, UnsupportedError

SOURCE = Path(__file__).with_name("runner.cc")
TARGETS = ("host", "aarch64")
A64_CXX = "aarch64-linux-gnu-g++"


def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise UnsupportedError(f"{module} is not installed: pip install bncompile's dependencies")
    return Path(spec.origin).parent


def build_runner(out_dir, *, target: str = "host", cxx: str | None = None, runtime_dir=None) -> Path:
    """Compile ``runner.cc`` into ``out_dir/bncompile-runner`` (host) or
    ``out_dir/bncompile-runner-aarch64``; returns the executable's path.

    host: links the pip-installed TVM runtime (rpath to it). aarch64: cross-compiles with
    ``aarch64-linux-gnu-g++`` against the aarch64 runtime (``runtime_dir``, default the cache of
    ``python -m bncompile.lower.runner.fetch_aarch64_runtime``) and copies ``libtvm_runtime.so`` and
    ``libtvm_ffi.so`` beside it (rpath ``$ORIGIN``): deploy the folder as it is.
    The executable is written through a temporary beside it (nothing half-written on failure)."""
    from bncompile._io import atomic_output_dir

    if target not in TARGETS:
        raise InputError(f"runner target {target!r}: give one of {', '.join(TARGETS)}")
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"runner folder {str(out)!r} does not exist: create it or choose another -o")
    ffi = _package_dir("tvm_ffi")
    include = ffi / "include"
    if target == "host":
        cxx = cxx or os.environ.get("CXX") or "g++"
        libs = [_package_dir("tvm") / "lib", ffi / "lib"]
        rpath = ":".join(str(d) for d in libs)
        name = "bncompile-runner"
        copies: list[Path] = []
    else:
        from bncompile.lower.runner.fetch_aarch64_runtime import cached

        cxx = cxx or A64_CXX
        rt = Path(runtime_dir) if runtime_dir else cached()
        if rt is None or not all((rt / n).is_file() for n in ("libtvm_runtime.so", "libtvm_ffi.so")):
            raise UnsupportedError("the aarch64 TVM runtime is not there: run "
                                   "python -m bncompile.lower.runner.fetch_aarch64_runtime first")
        libs = [rt]
        rpath = "$ORIGIN"
        name = "bncompile-runner-aarch64"
        copies = [rt / "libtvm_runtime.so", rt / "libtvm_ffi.so"]
    if shutil.which(cxx) is None:
        raise UnsupportedError(f"the C++ compiler {cxx} is not on PATH: install it "
                               + ("(apt-get install g++-aarch64-linux-gnu)" if target == "aarch64" else "(apt-get install g++)"))
    exe = out / name
    with atomic_output_dir(exe, what="runner") as tmp:
        cmd = [cxx, "-std=c++17", "-O2", str(SOURCE), f"-I{include}", *(f"-L{d}" for d in libs),
               "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{rpath}", "-o", str(tmp / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            from bncompile.errors import os_problem_in

            text = proc.stderr.strip()
            lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
            raise UnsupportedError(f"building the runner failed: {os_problem_in(text) or (lines[-1] if lines else text[-300:])}")
        for lib in copies:
            shutil.copyfile(lib, tmp / lib.name)
    return exe
