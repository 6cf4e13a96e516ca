"""Every command keeps the README's promise under bad input and faults (issue 12): exit 2 (or the
documented code) with exactly one line on stderr that names the problem, no traceback, no new or
changed file in the folder, and the inputs' bytes unchanged.

One parametrized matrix: each case builds its files in a fresh folder from module-scoped originals
(one compiled library shared by every ``run`` case), runs ``bncompile.cli.main`` in-process with
file-descriptor capture (so native libraries' stderr would be seen), and checks the folder before and
after. A few cases run ``python -m bncompile`` for real (SIGBUS, no command, TVM's log lines).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bncompile.cli import main

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- originals

def _conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    inits += [nh.from_array(np.full(4, v, np.float32), n) for n, v in
              (("s", 1.5), ("b", 0.1), ("mu", 0.2), ("var", 2.0))]
    g = h.make_graph([h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                      h.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"], ["y"], name="bn")],
                     "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 15)])
    m.ir_version = 8
    return m


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)),
                     opset_imports=[h.make_opsetid("", 15)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    d = tmp_path_factory.mktemp("orig")
    m = _conv_bn()
    onnx.save(m, d / "model.onnx")
    ext = d / "ext"
    ext.mkdir()
    onnx.save(copy.deepcopy(m), ext / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    vi = h.make_tensor_value_info
    # a foldable Gemm + BN on a 2^40-row input: the fold changes it, so its check must draw the input
    huge = [nh.from_array(np.eye(2, dtype=np.float32), "W")] + [
        nh.from_array(np.full(2, v, np.float32), n) for n, v in (("s", 1.5), ("b", 0.1), ("mu", 0.2),
                                                                            ("var", 2.0))]
    onnx.save(_model([h.make_node("Gemm", ["x", "W"], ["c"]),
                      h.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"], ["y"])],
                     [vi("x", T.FLOAT, [2**40, 2])], [vi("y", T.FLOAT, [2**40, 2])], huge), d / "huge_dim.onnx")
    t = T()
    t.name, t.data_type = "W", T.FLOAT
    t.dims.extend([2**31])
    t.raw_data = b"\0" * 8
    onnx.save(_model([h.make_node("Add", ["x", "W"], ["y"])], [vi("x", T.FLOAT, [2**31])],
                     [vi("y", T.FLOAT, [2**31])], [t]), d / "big_init.onnx")
    onnx.save(_model([h.make_node("Relu", ["nope"], ["y"])], [vi("x", T.FLOAT, [1])],
                     [vi("y", T.FLOAT, [1])]), d / "checker.onnx")
    (d / "graph.onnx").write_bytes(m.graph.SerializeToString())
    full = (d / "model.onnx").read_bytes()
    (d / "half.onnx").write_bytes(full[: len(full) // 2])
    (d / "random.onnx").write_bytes(np.random.default_rng(1).bytes(3000))
    (d / "empty.onnx").write_bytes(b"")
    np.save(d / "x.npy", np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32))
    (d / "layer.json").write_text('{"axis": -1, "momentum": 0.9}')
    np.savez(d / "w.npz", gamma=np.ones(3, np.float32))
    # one compiled library for every run case
    assert main(["compile", str(d / "model.onnx"), "-o", str(d / "lib.so")]) == 0
    return d


def _digest(folder: Path) -> dict:
    """name -> (kind, sha256 / link target) of everything in ``folder`` (hidden files included)."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for n in dirs + names:
            p = Path(root) / n
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("dir", "")
    return out


# --------------------------------------------------------------------------- the cases
# Each case: (id, setup(d, o) -> argv, exit code, a phrase the line must hold). ``d`` is the case's
# folder, ``o`` the originals. setup copies what the case needs into d.

def cp(o, d, name, as_=None):
    src = o / name
    dst = d / (as_ or name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return str(dst)


def lib(o, d, name="lib.so"):
    for suffix in ("", ".json"):
        shutil.copy(o / ("lib.so" + suffix), d / (name + suffix))
    return str(d / name)


def sym(d, name, target):
    os.symlink(target, d / name)
    return str(d / name)


def _truncate_ext(d, o):
    cp(o, d, "ext")
    with open(d / "ext" / "model.onnx.data", "r+b") as f:
        f.truncate(40)
    return str(d / "ext" / "model.onnx")


def _missing_ext(d, o):
    cp(o, d, "ext")
    os.unlink(d / "ext" / "model.onnx.data")
    return str(d / "ext" / "model.onnx")


def _outside_ext(d, o):
    cp(o, d, "ext")
    m = onnx.load(d / "ext" / "model.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../model.onnx.data"
    onnx.save(m, d / "ext" / "model.onnx")
    shutil.move(d / "ext" / "model.onnx.data", d / "model.onnx.data")
    return str(d / "ext" / "model.onnx")


BAD_MODELS = {
    "missing": (lambda d, o: str(d / "nope.onnx"), "does not exist"),
    "empty": (lambda d, o: cp(o, d, "empty.onnx"), "not an ONNX model"),
    "random": (lambda d, o: cp(o, d, "random.onnx"), "ONNX"),
    "graphproto": (lambda d, o: cp(o, d, "graph.onnx"), "not an ONNX model"),
    "truncated": (lambda d, o: cp(o, d, "half.onnx"), "ONNX"),
    "checker": (lambda d, o: cp(o, d, "checker.onnx"), ""),
    "init2^31": (lambda d, o: cp(o, d, "big_init.onnx"), ""),
    "ext-short": (_truncate_ext, "truncated"),
    "ext-missing": (_missing_ext, "does not exist"),
    "ext-outside": (_outside_ext, "leaves the model's folder"),
    "folder": (lambda d, o: str(d), "directory"),
}

#: how each model command is called on a model path, and where it writes
MODEL_COMMANDS = {
    "fold": lambda m, d: ["fold", m, "-o", str(d / "out.onnx")],
    "inspect": lambda m, d: ["inspect", m],
    "inline": lambda m, d: ["inline", m, "-o", str(d / "out.onnx")],
    "compile": lambda m, d: ["compile", m, "-o", str(d / "out.so")],
    "bench": lambda m, d: ["bench", m, "--no-memory", "--no-progress", "--repeat", "1", "--warmup", "0",
                           "--variants", "ort-noopt", "--json", str(d / "b.json")],
}

CASES = []
for cmd, call in MODEL_COMMANDS.items():
    for name, (make, phrase) in BAD_MODELS.items():
        if cmd == "compile" and name == "checker":
            phrase = ""          # TVM's frontend names the missing input; one line all the same
        CASES.append((f"{cmd}-{name}", (lambda make=make, call=call: lambda d, o: call(make(d, o), d))(), 2, phrase))

CASES += [
    # a 2^40 input dimension: the random inputs would not fit
    ("fold-dim2^40", lambda d, o: ["fold", cp(o, d, "huge_dim.onnx"), "-o", str(d / "o.onnx")], 2, "GiB"),
    ("bench-dim2^40", lambda d, o: ["bench", cp(o, d, "huge_dim.onnx"), "--no-memory", "--no-progress",
                                    "--variants", "ort-noopt"], 2, "GiB"),
    # argument values
    ("fold-seed-1", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--seed", "-1"], 2, "--seed"),
    ("fold-seed-huge", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--seed", str(2**70)], 2, "--seed"),
    ("fold-tol-nan", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--tolerance", "nan"], 2, "--tolerance"),
    ("fold-tol-neg", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--tolerance", "-1"], 2, "--tolerance"),
    ("fold-tol-inf", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--tolerance", "inf"], 2, "--tolerance"),
    ("fold-check-neg", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--check", "-1"], 2, "--check"),
    ("fold-shape-huge", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--input-shape",
                                      "x=100000000000,3,8,8"], 2, "2^31"),
    ("fold-shape-big", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--input-shape",
                                     "x=2000000000,3,8,8"], 2, "GiB"),
    ("bench-seed-1", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--seed", "-1"], 2, "--seed"),
    ("bench-batch-huge", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--batch", "100000000000"], 2, "--batch"),
    ("bench-batch-big", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--batch", "2000000000", "--no-memory",
                                      "--no-progress", "--variants", "ort-noopt"], 2, "GiB"),
    ("bench-threads-0", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--threads", "0"], 2, "--threads"),
    ("bench-repeat-0", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--repeat", "0"], 2, "--repeat"),
    ("build-shape-huge", lambda d, o: ["build", "--input-shape", f"N,{2**40}", "-o", str(d / "b.onnx")], 2, "2^31"),
    ("compile-shape-huge", lambda d, o: ["compile", cp(o, d, "model.onnx"), "--input-shape", f"x={2**40},3,8,8",
                                         "-o", str(d / "l.so")], 2, "2^31"),
    # outputs that are inputs, inputs' data files, each other, or links to them
    ("fold-report-is-input", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "o.onnx"),
                                           "--report", str(d / "model.onnx")], 2, "--report"),
    ("fold-report-is-output", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "o.onnx"),
                                            "--report", str(d / "o.onnx")], 2, "same file"),
    ("fold-o-is-input", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "model.onnx")], 2, "--in-place"),
    ("fold-o-link-to-input", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o",
                                           sym(d, "l.onnx", "model.onnx")], 2, "in-place"),
    ("fold-o-hardlink-to-input", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o",
                                               (os.link(d / "model.onnx", d / "hl.onnx"), str(d / "hl.onnx"))[1]],
     2, "model"),
    ("fold-report-link-to-input", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--report",
                                                sym(d, "r.json", "model.onnx")], 2, "--report"),
    ("fold-o-is-ext-data", lambda d, o: ["fold", cp(o, d, "ext") + "/model.onnx", "-o",
                                         str(d / "ext" / "model.onnx.data")], 2, "external data"),
    ("fold-o-data-is-ext-data", lambda d, o: [
        "fold", (cp(o, d, "ext"), shutil.move(d / "ext" / "model.onnx", d / "ext" / "src.onnx"),
                 str(d / "ext" / "src.onnx"))[2], "-o", str(d / "ext" / "model.onnx")], 2, "external data"),
    ("fold-o-dir", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d)], 2, "directory"),
    ("fold-o-nofolder", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "no" / "o.onnx")], 2,
     "does not exist"),
    ("fold-inplace-and-o", lambda d, o: ["fold", cp(o, d, "model.onnx"), "--in-place", "-o",
                                         str(d / "x.onnx")], 2, "--in-place"),
    ("inline-o-is-input", lambda d, o: ["inline", cp(o, d, "model.onnx"), "-o", str(d / "model.onnx")], 2, "input"),
    ("inline-o-link-to-input", lambda d, o: ["inline", cp(o, d, "model.onnx"), "-o",
                                             sym(d, "l.onnx", "model.onnx")], 2, "model"),
    ("inline-o-is-ext-data", lambda d, o: ["inline", cp(o, d, "ext") + "/model.onnx", "-o",
                                           str(d / "ext" / "model.onnx.data")], 2, "external data"),
    ("compile-o-is-input", lambda d, o: ["compile", cp(o, d, "model.onnx"), "-o", str(d / "model.onnx")], 2, "model"),
    ("compile-o-is-ext-data", lambda d, o: ["compile", cp(o, d, "ext") + "/model.onnx", "-o",
                                            str(d / "ext" / "model.onnx.data")], 2, "external data"),
    ("compile-json-link-to-input", lambda d, o: ["compile", cp(o, d, "model.onnx"), "-o", str(d / "l.so"),
                                                 "--no-fold"] if sym(d, "l.so.json", "model.onnx") else [],
     2, "metadata"),
    ("build-o-is-keras-config", lambda d, o: ["build", "--keras-config", cp(o, d, "layer.json"), "--input-shape",
                                              "N,3", "-o", str(d / "layer.json")], 2, "--keras-config"),
    ("build-o-is-weights", lambda d, o: ["build", "--weights", cp(o, d, "w.npz"), "--input-shape", "N,3",
                                         "-o", str(d / "w.npz")], 2, "--weights"),
    ("build-o-link-to-config", lambda d, o: ["build", "--keras-config", cp(o, d, "layer.json"), "--input-shape",
                                             "N,3", "-o", sym(d, "m.onnx", "layer.json")], 2, "--keras-config"),
    ("bench-json-is-input", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--json", str(d / "model.onnx")], 2,
     "--json"),
    ("bench-json-is-plot", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--json", str(d / "r"), "--plot",
                                         str(d / "r")], 2, "--plot"),
    ("bench-plot-link-to-input", lambda d, o: ["bench", cp(o, d, "model.onnx"), "--plot",
                                               sym(d, "p.png", "model.onnx")], 2, "--plot"),
    ("run-o-is-library", lambda d, o: ["run", lib(o, d), "-i", cp(o, d, "x.npy"), "-o", str(d / "lib.so")], 2,
     "library"),
    ("run-o-is-input", lambda d, o: ["run", lib(o, d), "-i", cp(o, d, "x.npy"), "-o", str(d / "x.npy")], 2,
     "--input"),
    ("run-o-is-json", lambda d, o: ["run", lib(o, d), "-i", cp(o, d, "x.npy"), "-o", str(d / "lib.so.json")], 2,
     "metadata"),
    ("run-o-link-to-input", lambda d, o: ["run", lib(o, d), "-i", cp(o, d, "x.npy"), "-o",
                                          sym(d, "out.npz", "x.npy")], 2, "--input"),
    # libraries that are not what compile wrote
    ("run-random-so", lambda d, o: ["run", (d / "r.so").write_bytes(os.urandom(4096)) and
                                    (shutil.copy(o / "lib.so.json", d / "r.so.json"), str(d / "r.so"))[1],
                                    "-i", cp(o, d, "x.npy")], 2, "ELF"),
    ("run-empty-so", lambda d, o: ["run", ((d / "e.so").write_bytes(b""),
                                           shutil.copy(o / "lib.so.json", d / "e.so.json"), str(d / "e.so"))[2],
                                   "-i", cp(o, d, "x.npy")], 2, "empty"),
    ("run-half-so", lambda d, o: ["run", ((d / "h.so").write_bytes((o / "lib.so").read_bytes()[:(o / "lib.so").stat().st_size // 2]),
                                          shutil.copy(o / "lib.so.json", d / "h.so.json"), str(d / "h.so"))[2],
                                  "-i", cp(o, d, "x.npy")], 2, "truncated"),
    ("run-non-tvm-so", lambda d, o: ["run", (shutil.copy(np._core._multiarray_umath.__file__, d / "n.so"),
                                             shutil.copy(o / "lib.so.json", d / "n.so.json"), str(d / "n.so"))[2],
                                     "-i", cp(o, d, "x.npy")], 2, "TVM"),
    ("run-onnx-as-library", lambda d, o: ["run", (cp(o, d, "model.onnx"),
                                                  shutil.copy(o / "lib.so.json", d / "model.onnx.json"),
                                                  str(d / "model.onnx"))[2], "-i", cp(o, d, "x.npy")], 2, "ELF"),
    ("run-no-json", lambda d, o: ["run", cp(o, d, "lib.so"), "-i", cp(o, d, "x.npy")], 2, "metadata"),
    ("run-json-incomplete", lambda d, o: ["run", (lib(o, d), (d / "lib.so.json").write_text(
        '{"format": "bncompile-library/1"}'))[0], "-i", cp(o, d, "x.npy")], 2, "incomplete"),
    ("run-json-damaged", lambda d, o: ["run", (lib(o, d), (d / "lib.so.json").write_text(
        '{"format": "bncompile-library/1", "target": "llvm", "target_dict": {}, "inputs": [1], "outputs": []}'))[0],
        "-i", cp(o, d, "x.npy")], 2, "damaged"),
    ("run-json-not-json", lambda d, o: ["run", (lib(o, d), (d / "lib.so.json").write_text("{"))[0],
                                        "-i", cp(o, d, "x.npy")], 2, "JSON"),
    ("run-npy-random", lambda d, o: ["run", lib(o, d), "-i", ((d / "x.npy").write_bytes(os.urandom(100)),
                                                              str(d / "x.npy"))[1]], 2, ".npy"),
    ("run-npy-missing", lambda d, o: ["run", lib(o, d), "-i", str(d / "nope.npy")], 2, "does not exist"),
    ("run-npy-wrong-shape", lambda d, o: ["run", lib(o, d), "-i", (np.save(d / "y.npy", np.zeros((2, 2), np.float32)),
                                                                   str(d / "y.npy"))[1]], 2, "rank"),
    ("run-npy-is-npz", lambda d, o: ["run", lib(o, d), "-i", (np.savez(d / "y.npz", a=np.zeros(2)),
                                                              str(d / "y.npz"))[1]], 2, "numpy.save"),
]

# the input file(s) each case must leave byte-identical: everything in its folder (checked by _digest)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, originals, tmp_path, capfd):
    name, setup, code, phrase = case
    d = tmp_path / "case"
    d.mkdir()
    argv = setup(d, originals)
    before = _digest(d)
    rc = main(argv)
    out, err = capfd.readouterr()
    assert rc == code, (argv, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("bncompile"), err
    if phrase:
        assert phrase in err, err
    assert _digest(d) == before, f"{name}: the folder changed"


# --------------------------------------------------------------------------- faults while writing

FULL_DISK = [
    ("fold", "bncompile.onnx_utils.write_model_streaming",
     lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "o.onnx")]),
    ("fold-ext", "onnx_ir.save",
     lambda d, o: ["fold", cp(o, d, "ext") + "/model.onnx", "-o", str(d / "ext" / "o.onnx")]),
    ("inline", "onnx.save", lambda d, o: ["inline", cp(o, d, "model.onnx"), "-o", str(d / "o.onnx")]),
    ("build", "onnx.save", lambda d, o: ["build", "--input-shape", "N,3", "-o", str(d / "o.onnx")]),
    ("fold-report", "json.dumps", lambda d, o: ["fold", cp(o, d, "model.onnx"), "-o", str(d / "o.onnx"),
                                                "--report", str(d / "r.json")]),
]


@pytest.mark.parametrize("case", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_full_disk_one_line_nothing_left(case, originals, tmp_path, capfd, monkeypatch):
    name, target, setup = case
    d = tmp_path / "case"
    d.mkdir()
    argv = setup(d, originals)
    before = _digest(d)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    mod, attr = target.rsplit(".", 1)
    monkeypatch.setattr(sys.modules.get(mod) or __import__(mod, fromlist=[attr]), attr, full)
    rc = main(argv)
    out, err = capfd.readouterr()
    assert rc == 2, err
    assert err.count("\n") == 1 and "No space left on device" in err and "free disk space" in err, err
    after = _digest(d)
    if name == "fold-report":     # the model was written before the report failed; nothing else
        after.pop("o.onnx", None)
    assert after == before


def test_compile_link_failure_on_full_disk_is_one_line(originals, tmp_path, capfd, monkeypatch):
    """g++ on a full disk prints its (truncated) command line: the user gets the problem and the fix."""
    from bncompile.lower import tvm as _tvm

    tvm = _tvm.tvm()

    d = tmp_path / "case"
    d.mkdir()
    model = cp(originals, d, "model.onnx")
    before = _digest(d)

    def full(self, *a, **k):
        raise RuntimeError("Compilation error:\n/usr/bin/ld: final link failed: No space left on device\n"
                           "collect2: error: ld returned 1 exit status\nCommand line: g++ -shared -fPIC -o /tmp/x")
    monkeypatch.setattr(tvm.relax.VMExecutable, "export_library", full)
    assert main(["compile", model, "-o", str(d / "o.so")]) == 2
    _, err = capfd.readouterr()
    assert err.count("\n") == 1 and "no space left on device: free disk space" in err and "g++ -shared" not in err
    assert _digest(d) == before


# --------------------------------------------------------------------------- what must work

def test_outputs_follow_the_umask(originals, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["fold", str(cp(originals, tmp_path, "model.onnx")), "-o", str(tmp_path / "o.onnx"),
                     "--report", str(tmp_path / "r.json"), "-q"]) == 0
        assert main(["run", lib(originals, tmp_path), "-i", cp(originals, tmp_path, "x.npy"),
                     "-o", str(tmp_path / "y.npz")]) == 0
    finally:
        os.umask(old)
    for n in ("o.onnx", "r.json", "y.npz", "lib.so.json"):
        if n == "lib.so.json":
            continue
        assert (tmp_path / n).stat().st_mode & 0o777 == 0o644, n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_compile_outputs_follow_the_umask(originals, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["compile", str(originals / "model.onnx"), "-o", str(tmp_path / "m.so")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.so.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.so").stat().st_mode & 0o777 in (0o755, 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so", "m.so.json"]


def test_fold_in_place_with_external_data(originals, tmp_path):
    cp(originals, tmp_path, "ext")
    m = tmp_path / "ext" / "model.onnx"
    assert main(["fold", str(m), "--in-place", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(m).graph.node}


def _plus_foldable(nodes, inputs, outputs) -> onnx.ModelProto:
    """The graph plus an independent Gemm + BN on input ``z``, so fold changes the model and its check
    runs (an unchanged model is not checked)."""
    vi = h.make_tensor_value_info
    inits = [nh.from_array(np.eye(2, dtype=np.float32), "Wz")] + [
        nh.from_array(np.full(2, v, np.float32), n) for n, v in (("sz", 1.5), ("bz", 0.1), ("mz", 0.2), ("vz", 2.0))]
    nodes = list(nodes) + [h.make_node("Gemm", ["z", "Wz"], ["gz"]),
                           h.make_node("BatchNormalization", ["gz", "sz", "bz", "mz", "vz"], ["yz"])]
    return _model(nodes, list(inputs) + [vi("z", T.FLOAT, [3, 2])], list(outputs) + [vi("yz", T.FLOAT, [3, 2])],
                  inits)


def test_fold_nan_outputs_agree_and_bool_scalar_input(tmp_path, capfd):
    """BN parameters as graph inputs get positive variances; an If on a 0-d bool input folds; NaN
    against NaN at the same place is agreement (reported)."""
    vi = h.make_tensor_value_info
    bn = _plus_foldable([h.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["y"])],
                        [vi(n, T.FLOAT, s) for n, s in (("x", [2, 3, 4]), ("s", [3]), ("b", [3]), ("mu", [3]),
                                                        ("var", [3]))],
                        [vi("y", T.FLOAT, [2, 3, 4])])
    onnx.save(bn, tmp_path / "bn.onnx")
    for seed in range(4):
        assert main(["fold", str(tmp_path / "bn.onnx"), "-o", str(tmp_path / "o.onnx"), "--seed", str(seed)]) == 0
        assert "check: ok" in capfd.readouterr().out
    then = h.make_graph([h.make_node("Identity", ["x"], ["o1"])], "t", [], [vi("o1", T.FLOAT, [2])])
    els = h.make_graph([h.make_node("Neg", ["x"], ["o2"])], "e", [], [vi("o2", T.FLOAT, [2])])
    cond = _plus_foldable([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                          [vi("c", T.BOOL, []), vi("x", T.FLOAT, [2])], [vi("y", T.FLOAT, [2])])
    onnx.save(cond, tmp_path / "if.onnx")
    assert main(["fold", str(tmp_path / "if.onnx"), "-o", str(tmp_path / "o2.onnx")]) == 0
    assert "check: ok" in capfd.readouterr().out
    sqrt = _plus_foldable([h.make_node("Sqrt", ["x"], ["y"])], [vi("x", T.FLOAT, [64])], [vi("y", T.FLOAT, [64])])
    onnx.save(sqrt, tmp_path / "sqrt.onnx")      # negative inputs -> NaN in both models
    assert main(["fold", str(tmp_path / "sqrt.onnx"), "-o", str(tmp_path / "o3.onnx")]) == 0
    assert "NaN/inf output value(s) at the same places" in capfd.readouterr().out


def test_next_run_cleans_a_dead_runs_fallback_temporaries(originals, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".o.onnx.bncompile-{dead}.tmp"
    stale_dir.mkdir()
    (stale_dir / "o.onnx.data").write_bytes(b"x" * 100)
    live = tmp_path / f".o.onnx.bncompile-{os.getppid()}.tmp"     # a live process's: kept
    live.write_bytes(b"")
    assert main(["fold", str(cp(originals, tmp_path, "model.onnx")), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert not stale_dir.exists() and live.exists()


# --------------------------------------------------------------------------- real processes

def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bncompile", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_no_command_one_line():
    r = _cli()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "name a command" in r.stderr


def test_truncated_library_no_sigbus_and_no_tvm_log_lines(originals, tmp_path):
    half = tmp_path / "h.so"
    data = (originals / "lib.so").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    shutil.copy(originals / "lib.so.json", tmp_path / "h.so.json")
    r = _cli("run", str(half), "-i", str(originals / "x.npy"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "truncated" in r.stderr, r.stderr
    # TVM's frontend fails on a checker-failing model and logs from C++: only our line reaches stderr
    r = _cli("compile", str(originals / "checker.onnx"), "-o", str(tmp_path / "c.so"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "block_builder" not in r.stderr
