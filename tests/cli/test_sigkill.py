"""SIGKILL at several moments of a real ``python -m bncompile`` fold and compile (issue 12): afterwards
the output folder holds exactly what it held before, or the complete new output, apart from the
fallback temporary ``.NAME.bncompile-<pid>.tmp`` of a multi-file output, which the next run to the
same output removes (or, killed while moving complete files into place, finishes moving).

The moments: fixed delays into the run (loading, folding, verifying, compiling), and, through a
``sitecustomize`` hook on ``PYTHONPATH``, the instant before the output is linked or renamed into
place (the hook writes a marker file and sleeps, so the kill lands exactly there).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

HOOK = '''
import os, time
_WHAT = os.environ.get("BNCOMPILE_TEST_SLOW")
_MARK = os.environ.get("BNCOMPILE_TEST_MARK")
if _WHAT:
    _orig = getattr(os, _WHAT)
    def _slow(src, *a, **k):
        if ".bncompile-" in str(src) or str(src).startswith("/proc/self/fd/"):
            open(_MARK, "w").close()
            time.sleep(120)
        return _orig(src, *a, **k)
    setattr(os, _WHAT, _slow)
'''

TMP = re.compile(r"^\..+\.bncompile-\d+\.tmp$")


def _big_model(folder: Path, *, external: bool) -> Path:
    """Six 128-channel Conv+BN pairs (about 3.5 MB of weights): long enough to kill in each phase."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(6):
        inits.append(nh.from_array(rng.standard_normal((128, 128, 3, 3)).astype(np.float32) * 0.05, f"W{k}"))
        for n, v in (("s", 1.1), ("b", 0.1), ("m", 0.05), ("v", 1.5)):
            inits.append(nh.from_array(np.full(128, v, np.float32), f"{n}{k}"))
        nodes += [h.make_node("Conv", [x, f"W{k}"], [f"c{k}"], pads=[1, 1, 1, 1]),
                  h.make_node("BatchNormalization", [f"c{k}", f"s{k}", f"b{k}", f"m{k}", f"v{k}"], [f"y{k}"])]
        x = f"y{k}"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 128, 32, 32])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, 128, 32, 32])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 15)])
    m.ir_version = 8
    path = folder / "model.onnx"
    if external:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(m, path)
    return path


def _listing(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _start(argv, env):
    return subprocess.Popen([sys.executable, "-m", "bncompile", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(argv, env, *, delay=None, mark: Path | None = None):
    p = _start(argv, env)
    try:
        if mark is not None:
            t0 = time.monotonic()
            while not mark.exists():
                assert p.poll() is None, "the run ended before reaching the hook"
                assert time.monotonic() - t0 < 120, "the hook was never reached"
                time.sleep(0.02)
        else:
            time.sleep(delay)
    finally:
        p.kill()
        p.wait()


def _env(tmp_path: Path, slow: str | None = None, mark: Path | None = None) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    env.pop("BNCOMPILE_TEST_SLOW", None)
    if slow:
        env["BNCOMPILE_TEST_SLOW"] = slow
        env["BNCOMPILE_TEST_MARK"] = str(mark)
    return env


def _check_after_kill(folder: Path, before: dict, outputs: list[str], complete) -> None:
    now = _listing(folder)
    hidden = [n for n in now if n not in before and TMP.match(n)]
    visible = {n: t for n, t in now.items() if n not in hidden}
    new = sorted(set(visible) - set(before))
    changed = sorted(n for n in before if n in visible and visible[n] != before[n])
    assert set(before) <= set(visible), f"files vanished: {set(before) - set(visible)}"
    if new or changed:      # the complete new output, nothing else
        assert sorted(set(new) | set(changed)) == sorted(outputs), (new, changed)
        complete()


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_sigkill_during_fold(tmp_path, external):
    folder = tmp_path / "m"
    folder.mkdir()
    model = _big_model(folder, external=external)
    out = folder / "out.onnx"
    outputs = ["out.onnx"] + (["out.onnx.data"] if external else [])
    argv = ["fold", str(model), "-o", str(out), "-q"]

    def complete():
        m = onnx.load(out)
        onnx.checker.check_model(m, full_check=True)
        assert "BatchNormalization" not in {n.op_type for n in m.graph.node}

    before = _listing(folder)
    for delay in (0.4, 1.2, 2.0):
        _kill(argv, _env(tmp_path), delay=delay)
        _check_after_kill(folder, before, outputs, complete)
    mark = tmp_path / "mark"
    snap = _listing(folder)
    _kill(argv, _env(tmp_path, "replace" if external else "link", mark), mark=mark)
    _check_after_kill(folder, before, outputs, complete)
    if external:     # killed between the hidden folder and its move: the fallback is there
        assert any(TMP.match(n) for n in os.listdir(folder))
    else:            # an unnamed O_TMPFILE: nothing at all, not even a changed file
        assert _listing(folder) == snap
    # the next run completes and leaves no temporary behind
    r = subprocess.run([sys.executable, "-m", "bncompile", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(folder)) == sorted(set(before) | set(outputs))
    complete()


def test_sigkill_while_moving_a_complete_output_is_finished_by_the_next_run(tmp_path):
    """Killed after the data file moved but before the model did: the next run finishes the move
    (never an old model beside a new data file)."""
    from bncompile._io import COMMIT_MARK, clean_stale

    folder = tmp_path / "m"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tmp = folder / f".out.onnx.bncompile-{dead}.tmp"
    tmp.mkdir()
    (tmp / "out.onnx").write_text("new model")
    (tmp / COMMIT_MARK).touch()
    (folder / "out.onnx").write_text("old model")
    (folder / "out.onnx.data").write_text("new data")       # moved before the kill
    clean_stale(folder / "out.onnx")
    assert (folder / "out.onnx").read_text() == "new model"
    assert sorted(os.listdir(folder)) == ["out.onnx", "out.onnx.data"]


def test_sigkill_during_compile(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    src = Path(__file__).resolve().parents[2] / "models" / "mlp_gemm.onnx"
    model = folder / "model.onnx"
    model.write_bytes(src.read_bytes())
    out = folder / "model.so"
    outputs = ["model.so", "model.so.json"]
    argv = ["compile", str(model), "-o", str(out)]

    def complete():
        import json

        assert json.loads((folder / "model.so.json").read_text())["format"] == "bncompile-library/1"
        from bncompile.lower.runtime import check_library_file

        check_library_file(out)

    before = _listing(folder)
    for delay in (1.0, 2.5):
        _kill(argv, _env(tmp_path), delay=delay)
        _check_after_kill(folder, before, outputs, complete)
    mark = tmp_path / "mark"
    _kill(argv, _env(tmp_path, "replace", mark), mark=mark)
    _check_after_kill(folder, before, outputs, complete)
    r = subprocess.run([sys.executable, "-m", "bncompile", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(folder)) == sorted(set(before) | set(outputs))
    complete()
