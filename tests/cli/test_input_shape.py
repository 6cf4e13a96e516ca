"""Every command that takes ``--input-shape`` reads it with the one grammar (`bncompile.shapes`): the
same refusal, one line, exit 2, nothing written."""

from __future__ import annotations

import os

import onnx
import pytest

from bncompile.cli import main
from helpers.bench import conv_bn_relu


@pytest.mark.parametrize("command", ["fold", "bench", "compile", "build"])
def test_same_grammar_same_refusal(command, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(), model)
    out = tmp_path / "out.onnx"
    argv = {"fold": ["fold", str(model), "-o", str(out), "--input-shape", "x=1,3,1.5,12"],
            "bench": ["bench", str(model), "--no-progress", "--no-memory", "--input-shape", "x=1,3,1.5,12"],
            "compile": ["compile", str(model), "-o", str(tmp_path / "m.so"), "--input-shape", "x=1,3,1.5,12"],
            "build": ["build", "-o", str(out), "--input-shape", "1,3,1.5,12"]}[command]
    before = sorted(os.listdir(tmp_path))
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "--input-shape '" in err and "'1.5' is not a dimension; use e.g. " in err, err
    assert sorted(os.listdir(tmp_path)) == before
