"""Fetch the aarch64 TVM runtime libraries the C++ runner links against.

    python -m bncompile.lower.runner.fetch_aarch64_runtime [--cache-dir DIR] [--force]

Downloads the manylinux aarch64 wheels of the pinned TVM (``apache-tvm==0.27.0.post1``, about 95 MB)
and tvm-ffi (``apache-tvm-ffi==0.1.14.post1``) with ``pip download`` and extracts two files:

    DIR/libtvm_runtime.so   (from tvm/lib/ in the apache-tvm wheel)
    DIR/libtvm_ffi.so       (from tvm_ffi/lib/ in the apache-tvm-ffi wheel)

DIR defaults to ``$BNCOMPILE_CACHE/aarch64`` or ``~/.cache/bncompile/aarch64``. Nothing is
downloaded when both files are already there. Prints DIR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TVM_WHEEL = "apache-tvm==0.27.0.post1"
FFI_WHEEL = "apache-tvm-ffi==0.1.14.post1"
PLATFORM = "manylinux_2_28_aarch64"
LIBS = {"libtvm_runtime.so": ("apache_tvm-", "tvm/lib/libtvm_runtime.so"),
        "libtvm_ffi.so": ("apache_tvm_ffi-", "tvm_ffi/lib/libtvm_ffi.so")}


def default_cache_dir() -> Path:
    base = os.environ.get("BNCOMPILE_CACHE")
    return Path(base) / "aarch64" if base else Path.home() / ".cache" / "bncompile" / "aarch64"


def cached(cache_dir: Path | None = None) -> Path | None:
    """The cache dir when both libraries are in it, else None (never downloads)."""
    d = Path(cache_dir) if cache_dir else default_cache_dir()
    return d if all((d / n).is_file() for n in LIBS) else None


def fetch(cache_dir: Path | None = None, *, force: bool = False, python: str | None = None) -> Path:
    """Download (if needed) and extract the aarch64 libtvm_runtime.so and libtvm_ffi.so; returns their dir."""
    d = Path(cache_dir) if cache_dir else default_cache_dir()
    if not force and cached(d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    py_version = f"{sys.version_info.major}{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(prefix="bncompile-a64-") as tmp:
        cmd = [python or sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", PLATFORM, "--python-version", py_version, "-d", tmp, TVM_WHEEL, FFI_WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()
            raise RuntimeError(f"pip download of the aarch64 wheels failed: {tail[-1] if tail else r.returncode}")
        wheels = list(Path(tmp).glob("*.whl"))
        for lib, (prefix, member) in LIBS.items():
            whl = [w for w in wheels if w.name.startswith(prefix) and (prefix != "apache_tvm-" or
                                                                        not w.name.startswith("apache_tvm_ffi"))]
            if not whl:
                raise RuntimeError(f"no wheel {prefix}* among {[w.name for w in wheels]}")
            with zipfile.ZipFile(whl[0]) as z, z.open(member) as src:
                part = d / (lib + ".part")
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                part.chmod(0o755)
                os.replace(part, d / lib)
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bncompile.lower.runner.fetch_aarch64_runtime",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    args = p.parse_args(argv)
    try:
        print(fetch(args.cache_dir, force=args.force))
    except (RuntimeError, OSError) as err:
        print(f"fetch_aarch64_runtime: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
