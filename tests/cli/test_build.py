"""`bncompile build`: Keras get_config() JSON and flags to a valid model; bad input is one line, exit 2,
and nothing written."""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bncompile.cli import main
from helpers import ort_run

KERAS = {"name": "bn", "trainable": True, "dtype": "float32", "axis": [1], "momentum": 0.9, "epsilon": 0.001,
         "center": True, "scale": False,
         "beta_initializer": {"class_name": "Zeros", "config": {}},
         "gamma_initializer": {"class_name": "Ones", "config": {}},
         "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
         "moving_variance_initializer": {"class_name": "Ones", "config": {}},
         "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
         "renorm": True, "renorm_clipping": {"rmax": 3, "rmin": 0.33, "dmax": 5}, "renorm_momentum": 0.99,
         "virtual_batch_size": 2, "adjustment": None}


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_build_from_keras_json(tmp_path, capsys):
    cfg = tmp_path / "layer.json"
    cfg.write_text(json.dumps(KERAS))
    out = tmp_path / "bn.onnx"
    assert main(["build", "--keras-config", str(cfg), "--input-shape", "N,3,4,4", "--training", "-o", str(out)]) == 0
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["x", "beta", "moving_mean", "moving_variance", "moving_stddev",
                                               "renorm_mean", "renorm_stddev"]
    o = ort_run(m, {"x": np.random.default_rng(0).normal(size=(4, 3, 4, 4)).astype(np.float32)})
    assert o["moving_mean_new"].shape == (1, 1, 3, 1, 1)        # ghost BN: Keras's extra leading dim


def test_flags_override_json_and_weights(tmp_path):
    cfg = tmp_path / "layer.json"
    cfg.write_text(json.dumps({"config": {**KERAS, "renorm": False, "virtual_batch_size": None},
                               "class_name": "BatchNormalization"}))
    w = tmp_path / "w.npz"
    np.savez(w, moving_mean=np.arange(3.0), beta=np.ones(3))
    out = tmp_path / "bn.onnx"
    assert main(["build", "--keras-config", str(cfg), "--input-shape", "2,3,4", "--axis", "1", "--momentum", "0.5",
                 "--weights", str(w), "-o", str(out)]) == 0
    m = onnx.load(out)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    np.testing.assert_array_equal(init["moving_mean"], [0, 1, 2])
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["bncompile.config"])["momentum"] == 0.5


@pytest.mark.parametrize("setup,args,needle", [
    (None, ["--keras-config", "{d}/missing.json"], "does not exist"),
    ("{bad json", ["--keras-config", "{d}/layer.json"], "not valid JSON"),
    ("[1, 2]", ["--keras-config", "{d}/layer.json"], "JSON object"),
    ('{"axis": 7}', ["--keras-config", "{d}/layer.json"], "axis"),
    ('{"bogus": 1}', ["--keras-config", "{d}/layer.json"], "unknown"),
    (None, ["--keras-config", "{d}"], "directory"),
    (None, ["-o", "{d}/no/such/dir/out.onnx"], "does not exist"),
    (None, ["--input-shape", "2,x"], "input-shape"),
    (None, ["--renorm-clipping", "rmax"], "renorm_clipping"),
    (None, ["--weights", "{d}/nope.npz"], "does not exist"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, setup, args, needle):
    if setup is not None:
        (tmp_path / "layer.json").write_text(setup)
    before = set(os.listdir(tmp_path))
    argv = ["build", "--input-shape", "2,3", "-o", str(tmp_path / "out.onnx")]
    argv += [a.format(d=tmp_path) for a in args]
    assert main(argv) == 2
    assert needle in _one_line(capsys)
    assert set(os.listdir(tmp_path)) == before


def test_unwritable_output_folder(capsys):
    # /proc refuses new files even to root
    assert main(["build", "--input-shape", "2,3", "-o", "/proc/bncompile-test.onnx"]) == 2
    assert "not writable" in _one_line(capsys)


def test_unwritable_output(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):      # root writes anywhere: the folder is read-only as far as access() says
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
                False if mode & os.W_OK and Path(path).resolve() == ro.resolve() else real_access(path, mode, **kw)))
        assert main(["build", "--input-shape", "2,3", "-o", str(ro / "out.onnx")]) == 2
        assert "not writable" in _one_line(capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A failure while writing leaves neither the output nor a temporary file; one line, exit 2."""
    import errno

    import onnx as onnx_mod

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx_mod, "save", boom)
    assert main(["build", "--input-shape", "2,3", "-o", str(tmp_path / "out.onnx")]) == 2
    assert "No space left on device: free disk space" in _one_line(capsys)
    assert os.listdir(tmp_path) == []


def test_build_with_gradients(tmp_path):
    out = tmp_path / "bn.onnx"
    assert main(["build", "--input-shape", "N,3,4", "--axis", "1", "--training", "--gradients", "-o", str(out)]) == 0
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input][-1] == "dy"
    assert [o.name for o in m.graph.output][-3:] == ["dx", "dgamma", "dbeta"]
    assert main(["build", "--input-shape", "N,3,4", "--gradients", "-o", str(tmp_path / "no.onnx")]) == 2
    assert not (tmp_path / "no.onnx").exists()
