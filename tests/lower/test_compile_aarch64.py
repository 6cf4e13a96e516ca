"""Edge deployment without Python: the C++ runner (bncompile/lower/runner) on x86, and a model plus the runner
cross-compiled for aarch64 and run under qemu-user, compared with onnxruntime on x86.

Needs (Debian): qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-arm64-cross, and the aarch64
libtvm_runtime.so / libtvm_ffi.so (``python -m bncompile.lower.runner.fetch_aarch64_runtime``, fetched here on
first use when the network allows). Skipped with the reason when any of it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import helpers.compile_models as M

pytestmark = pytest.mark.tvm

RUNNER = Path(__file__).resolve().parents[2] / "bncompile" / "lower" / "runner" / "runner.cc"
SYSROOT = Path("/usr/aarch64-linux-gnu")
TOL = 1e-4


def _need_tvm():
    from bncompile.lower import tvm as _tvm

    return _tvm


def _ffi_include() -> str:
    import tvm_ffi

    return os.path.join(os.path.dirname(tvm_ffi.__file__), "include")


def _build_host_runner(out: Path) -> Path:
    import tvm_ffi

    tvm = _need_tvm().tvm()
    tvm_lib = os.path.join(os.path.dirname(tvm.__file__), "lib")
    ffi_lib = os.path.join(os.path.dirname(tvm_ffi.__file__), "lib")
    exe = out / "bncompile-runner"
    cmd = ["g++", "-std=c++17", "-O1", str(RUNNER), f"-I{_ffi_include()}", f"-L{tvm_lib}", f"-L{ffi_lib}",
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{tvm_lib}:{ffi_lib}", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return exe


def test_runner_on_host_matches_onnxruntime(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the runner")
    from bncompile import compile

    exe = _build_host_runner(tmp_path)
    model = M.resnet(None)
    x = M.input_for(model, 3)
    np.save(tmp_path / "x.npy", x)
    compile(model, target="llvm").export(tmp_path / "resnet.so")
    r = subprocess.run([str(exe), str(tmp_path / "resnet.so"), f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("y (3, 10) <f4")
    assert M.rel_err(np.load(tmp_path / "out" / "y.npy"), M.ort_run(model, {"x": x})[0]) < TOL
    # a bad input is one line and exit 2
    np.save(tmp_path / "bad.npy", np.zeros((3, 3, 8, 8), np.float32))
    r = subprocess.run([str(exe), str(tmp_path / "resnet.so"), f"x={tmp_path / 'bad.npy'}", "-o", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _aarch64_tools():
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++") if shutil.which(t) is None]
    if not SYSROOT.is_dir():
        missing.append(f"{SYSROOT} (libc6-arm64-cross)")
    if missing:
        pytest.skip(f"aarch64 tools missing: {', '.join(missing)} (apt-get install qemu-user "
                    "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-arm64-cross)")
    from bncompile.lower.runner import fetch_aarch64_runtime as fetch

    libs = fetch.cached()
    if libs is None:
        try:
            libs = fetch.fetch()
        except Exception as err:  # no network
            pytest.skip(f"aarch64 libtvm_runtime.so/libtvm_ffi.so not cached and the download failed ({err}); "
                        "run python -m bncompile.lower.runner.fetch_aarch64_runtime")
    return libs


def test_aarch64_model_and_runner_under_qemu(tmp_path):
    libs = _aarch64_tools()
    _need_tvm()
    from bncompile.builder import build_model
    from bncompile import compile
    from bncompile.config import BatchNormConfig

    exe = tmp_path / "bncompile-runner-aarch64"
    r = subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O1", str(RUNNER), f"-I{_ffi_include()}",
                        f"-L{libs}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    env = {**os.environ, "LD_LIBRARY_PATH": str(libs), "TVM_NUM_THREADS": "1"}

    def qemu(lib, *inputs):
        out = tmp_path / (lib.stem + "_out")
        res = subprocess.run(["qemu-aarch64", "-L", str(SYSROOT), str(exe), str(lib), *inputs, "-o", str(out)],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        return out

    # a whole CNN with a dynamic batch
    model = M.mobilenet(None)
    x = M.input_for(model, 3)
    np.save(tmp_path / "x.npy", x)
    cm = compile(model, target="aarch64")
    lib = cm.export(tmp_path / "mobilenet_a64.so")
    assert open(lib, "rb").read(20)[18] == 183            # ELF e_machine EM_AARCH64
    out = qemu(lib, f"x={tmp_path / 'x.npy'}")
    assert M.rel_err(np.load(out / "y.npy"), M.ort_run(model, {"x": x})[0]) < TOL

    # a training step (renorm custom op -> bncompile's kernel), onnxruntime runs the function body
    config = BatchNormConfig(renorm=True, momentum=0.9)
    tm = build_model(config, [8, 6], training=True)
    cm = compile(tm, target="aarch64")
    lib = cm.export(tmp_path / "renorm_a64.so")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(1, 2, (8, 6)).astype(np.float32)}
    for name in config.variable_names():
        feeds[name] = cm.defaults[name]
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
    out = qemu(lib, *[f"{k}={tmp_path / (k + '.npy')}" for k in feeds])
    want = M.ort_run(tm, feeds)
    for name, w in zip(cm.output_names, want):
        assert M.rel_err(np.load(out / f"{name}.npy"), w) < TOL, name
