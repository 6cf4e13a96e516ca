"""`bncompile inspect`: lists BN nodes, their mode and what fold would do; writes nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from bncompile.cli import main
from bncompile.cli.inspect import inspect_model
from helpers.fold_graphs import G


def _mixed_model():
    g = G(seed=1)
    x = g.input("x", [4, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn_fold")
    y = g.node("Relu", [y], name="relu")
    y = g.bn(y, 4, name="bn_relu")
    g.bn(y, 4, name="bn_train", outputs=["y", "rm", "rv"], training_mode=1)
    g.output("y", shape=[4, 4, 5, 5])
    return g.model()


def test_inspect_table(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(_mixed_model(), p)
    before = sorted(os.listdir(tmp_path))
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "3 BatchNormalization (1 foldable, 2 not)" in out
    assert "bn_fold (opset 15, inference): folds into Conv 'conv'" in out
    assert "bn_relu (opset 15, inference): not folded: its producer Relu 'relu' is not a foldable layer" in out
    assert "bn_train (opset 15, training): not folded: training_mode=1" in out
    assert sorted(os.listdir(tmp_path)) == before


def test_inspect_json(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(_mixed_model(), p)
    assert main(["inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"] == {"batchnorms": 3, "foldable": 1, "left": 2}
    modes = {b["node"]: (b["mode"], b["would_fold"], b["into_op"]) for b in info["batchnorms"]}
    assert modes == {"bn_fold": ("inference", True, "Conv"), "bn_relu": ("inference", False, None),
                     "bn_train": ("training", False, None)}


def test_inspect_does_not_change_the_model():
    m = _mixed_model()
    blob = m.SerializeToString()
    inspect_model(m)
    assert m.SerializeToString() == blob


def test_inspect_bad_input(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_inspect_spatial0(tmp_path, capsys):
    g = G(seed=2, opset=7)
    x = g.input("x", [2, 3, 4, 4])
    y = g.conv(x, 3, 2, name="conv")
    params = [g.init(g.rand(2, 4, 4)) for _ in range(3)] + [g.init(np.full((2, 4, 4), 0.7, np.float32))]
    g.output(g.node("BatchNormalization", [y, *params], name="bn", outputs=["y"], spatial=0))
    info = inspect_model(g.model())
    assert info["batchnorms"][0]["mode"] == "spatial=0" and not info["batchnorms"][0]["would_fold"]
