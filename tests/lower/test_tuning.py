"""``bncompile tune`` and ``compile(..., db=)`` (issue 15 item 2): MetaSchedule on the model's fused
functions, a JSON database that survives Ctrl-C and the time budget, hand schedules where the database has
nothing better, and measuring through TVM's RPC tracker and server on 127.0.0.1.

Tiny models and 2-8 trials: each tune starts MetaSchedule's worker processes (a few seconds)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bncompile
from bncompile.cli import main
from bncompile.lower import tuning
from helpers.compile_models import ort_run, rel_err

pytestmark = pytest.mark.tvm


def conv_gemm(channels: int = 8, size: int = 8, batch=1) -> onnx.ModelProto:
    """x[1,4,S,S] -> Conv 3x3 + BN + Relu -> Flatten -> Gemm(10): two tasks (the conv, the Gemm)."""
    rng = np.random.default_rng(0)
    c = channels
    inits = [nh.from_array(rng.normal(size=(c, 4, 3, 3)).astype(np.float32) / 6, "w"),
             nh.from_array(rng.normal(size=c).astype(np.float32), "b"),
             nh.from_array(rng.uniform(0.5, 2, size=c).astype(np.float32), "g"),
             nh.from_array(rng.normal(size=c).astype(np.float32), "beta"),
             nh.from_array(rng.normal(size=c).astype(np.float32), "mean"),
             nh.from_array(rng.uniform(0.5, 2, size=c).astype(np.float32), "var"),
             nh.from_array(rng.normal(size=(10, c * size * size)).astype(np.float32) / 16, "fw"),
             nh.from_array(rng.normal(size=10).astype(np.float32), "fb")]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"]),
             h.make_node("Relu", ["n"], ["r"]),
             h.make_node("Flatten", ["r"], ["f"]),
             h.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    g = h.make_graph(nodes, "conv_gemm", [h.make_tensor_value_info("x", T.FLOAT, [batch, 4, size, size])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 10])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 15)])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("tune") / "conv_gemm.onnx"
    onnx.save(conv_gemm(), p)
    return p


def _records(db: Path) -> list[dict]:
    lines = (db / tuning.DB_FILES[1]).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _check_outputs(cm, model):
    x = np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)
    got = cm.run({"x": x})["y"]
    assert rel_err(got, ort_run(model, {"x": x})[0]) < 1e-4


def test_tasks_are_compiles_fused_functions_without_bn_kernels():
    from bncompile import BatchNormConfig, build_model

    tasks = tuning.extract_tasks(conv_gemm())
    assert len(tasks) == 2 and all(t.weight == 1 for t in tasks)
    assert any(t.name.startswith("fused_conv2d") for t in tasks) and any("matmul" in t.name for t in tasks)
    assert tasks[0].flops >= tasks[1].flops                      # heaviest first
    # a training-mode BN runs bncompile's own kernel: never a task
    train = build_model(BatchNormConfig(axis=1), [2, 8, 4, 4], training=True)
    names = [t.name for t in tuning.extract_tasks(train, all_functions=True)]
    assert not any("batchnorm" in n or "bn_" in n for n in names), names


def test_tune_then_compile_applies_the_database_and_falls_back(model_path, tmp_path):
    db = tmp_path / "db"
    model = onnx.load(model_path)
    # no hand records: the search's best is applied; 4 trials in one batch reach the first task only
    res = tuning.tune(str(model_path), db, trials=4, trials_per_iter=4, seed=0, measure_hand=False,
                      progress=False, population=32)
    assert res.stopped == "done" and res.trials == 4 and res.tasks
    assert all((db / f).is_file() for f in tuning.DB_FILES) and _records(db)
    cm = bncompile.compile(str(model_path), db=db)
    tuned = cm.info["tuned"]
    assert tuned and set(tuned) <= set(res.tasks)
    assert set(cm.info["cpu_schedules"].values()) - {"database"}       # the rest: hand schedules
    assert all(cm.info["cpu_schedules"][n] == "database" for n in tuned)
    _check_outputs(cm, model)
    # the CLI's compile --db names how many functions came from the database
    out = tmp_path / "m.so"
    assert main(["compile", str(model_path), "--db", str(db), "-o", str(out)]) == 0


def test_time_budget_stops_after_the_batch_in_flight(model_path, tmp_path):
    t0 = time.monotonic()
    res = tuning.tune(str(model_path), tmp_path / "db", trials=1000, trials_per_iter=2, time_budget=5,
                      measure_hand=False, progress=False, population=32)
    # on a loaded machine the budget can be spent before the first batch; then nothing was measured
    assert res.stopped == "time budget" and res.trials < 1000 and res.trials % 2 == 0
    assert time.monotonic() - t0 < 75
    assert len(_records(tmp_path / "db")) == res.trials


def test_task_scheduler_keeps_measured_batches_under_a_budget():
    """Under a time budget the tasks are scheduled round-robin: MetaSchedule's gradient scheduler joins no
    batch (so keeps none in the database) until every task had one, which on a network of 50-70 tasks
    outlasted a 7-10 minute budget (MobileNetV3 at 224x224, 2 cores: 0 trials kept in 300 s; round-robin
    kept 320). Without a budget, gradient; either can be asked for; anything else is refused."""
    assert tuning._scheduler("auto", 300.0) == "round-robin"
    assert tuning._scheduler("auto", None) == "gradient"
    assert tuning._scheduler("gradient", 300.0) == "gradient"
    assert tuning._scheduler("round-robin", None) == "round-robin"
    with pytest.raises(bncompile.errors.InputError, match="task scheduler"):
        tuning._scheduler("fifo", None)


def test_sigint_keeps_a_valid_database(model_path, tmp_path):
    psutil = pytest.importorskip("psutil")
    db = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-m", "bncompile", "tune", str(model_path), "--trials", "1000",
                             "--trials-per-iter", "2", "--population", "32", "--db", str(db),
                             "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        rec = db / tuning.DB_FILES[1]
        while time.monotonic() < deadline and proc.poll() is None:
            if rec.exists() and len(rec.read_text().splitlines()) >= 2:   # the hand records: searching now
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)   # a hang guard: MetaSchedule finishes its batch first (slow on a loaded machine)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "kept in" in err
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"worker processes left behind: {alive}"
    records = _records(db)                                     # every line parses
    assert len(records) >= 2
    # the hand schedules were measured first: a record for each task; a task whose best record is its hand
    # schedule compiles with the hand rule (reported by the rule's name, not "database")
    cm = bncompile.compile(str(model_path), db=db)             # the database opens and applies
    tuned_db = tuning.TunedSchedules(db, cm.target)
    fused, _ = tuning.fused_module(str(model_path))
    for gv, func in fused.functions.items():
        if gv.name_hint in cm.info["cpu_schedules"] and gv.name_hint.startswith("fused_"):
            rec = tuned_db.best(tuning.normalize(func))
            assert rec is not None, gv.name_hint
            searched = tuning._is_searched(rec.trace)
            assert (cm.info["cpu_schedules"][gv.name_hint] == "database") == searched
    _check_outputs(cm, onnx.load(model_path))


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker and one server registered under a key, on 127.0.0.1 only; stopped after the test
    (and by a watchdog after 5 minutes whatever happens)."""
    from bncompile.lower import tvm as _tvm

    tracker_mod = _tvm.submodule("tvm.rpc.tracker")
    server_mod = _tvm.submodule("tvm.rpc.server")
    tracker = tracker_mod.Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = None
    try:
        server = server_mod.Server(host="127.0.0.1", port=9300, port_end=9400, key="bncompile-test",
                                   tracker_addr=("127.0.0.1", tracker.port), silent=True)
        watchdog = threading.Timer(300, lambda: (server.terminate(), tracker.terminate()))
        watchdog.daemon = True
        watchdog.start()
        client = _tvm.submodule("tvm.rpc")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:           # the server registers with the tracker
            summary = client.connect_tracker("127.0.0.1", tracker.port).summary()
            if summary.get("queue_info", {}).get("bncompile-test", {}).get("free", 0) > 0:
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{tracker.port}"
        watchdog.cancel()
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()


def test_tune_through_rpc_tracker_and_server(model_path, tmp_path, rpc_tracker):
    db = tmp_path / "db"
    res = tuning.tune(str(model_path), db, trials=2, trials_per_iter=2, rpc_tracker=rpc_tracker,
                      rpc_key="bncompile-test", measure_hand=False, progress=False, population=32, seed=0)
    assert res.trials == 2 and res.best, res          # measured on the server: valid times came back
    assert all(0 < s < 1 for s in res.best.values())
    cm = bncompile.compile(str(model_path), db=db)
    assert cm.info["tuned"]
    _check_outputs(cm, onnx.load(model_path))


@pytest.mark.parametrize("case", ["db_is_file", "key_without_tracker", "tracker_without_key", "bad_tracker",
                                  "zero_trials", "budget", "compile_missing_db", "compile_not_a_db",
                                  "compile_db_cuda", "symbolic"])
def test_bad_input_one_line_exit_2(case, model_path, tmp_path, capsys):
    db = tmp_path / "db"
    argv = ["tune", str(model_path), "--trials", "2", "--db", str(db)]
    if case == "db_is_file":
        db.write_text("x")
    elif case == "key_without_tracker":
        argv += ["--rpc-key", "k"]
    elif case == "tracker_without_key":
        argv += ["--rpc-tracker", "127.0.0.1:9190"]
    elif case == "bad_tracker":
        argv += ["--rpc-tracker", "localhost", "--rpc-key", "k"]
    elif case == "zero_trials":
        argv[3] = "0"
    elif case == "budget":
        argv += ["--time-budget", "-1"]
    elif case == "compile_missing_db":
        argv = ["compile", str(model_path), "--db", str(db), "-o", str(tmp_path / "m.so")]
    elif case == "compile_not_a_db":
        db.mkdir()
        argv = ["compile", str(model_path), "--db", str(db), "-o", str(tmp_path / "m.so")]
    elif case == "compile_db_cuda":
        db.mkdir()
        for f in tuning.DB_FILES:
            (db / f).write_text("")
        argv = ["compile", str(model_path), "--db", str(db), "--target", "cuda", "-o", str(tmp_path / "m.so")]
    elif case == "symbolic":                   # a free batch: MetaSchedule cannot measure; --input-shape fixes it
        dyn = tmp_path / "dyn.onnx"
        onnx.save(conv_gemm(batch="N"), dyn)
        argv[1] = str(dyn)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    if case == "symbolic":
        assert "--input-shape" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.so").exists()
    if case != "db_is_file" and case != "compile_not_a_db" and case != "compile_db_cuda":
        assert not db.exists()
