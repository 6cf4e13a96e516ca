"""`bncompile bench` on the command line: table, JSON, plot, --kernels, and bad input (one line,
exit 2, nothing written)."""

from __future__ import annotations

import json

import onnx
import pytest

from bncompile.cli import main
from helpers.bench import conv_bn_relu, validate


@pytest.fixture
def conv_path(tmp_path):
    p = tmp_path / "conv.onnx"
    onnx.save(conv_bn_relu(), p)
    return p


def test_cli_json_plot_table(conv_path, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", str(conv_path), "--batch", "1,2", "--repeat", "3", "--warmup", "1",
               "--variants", "ort-noopt,folded-ort", "--no-memory", "--no-progress",
               "--json", str(js), "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "folded-ort" in out and "median ms" in out
    data = json.loads(js.read_text())
    validate(data)
    assert data["batches"] == [1, 2] and len(data["results"]) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_settle_flags_reach_the_report(conv_path, tmp_path, capsys):
    js = tmp_path / "b.json"
    for flag, want in (("--settle", True), ("--no-settle", False)):
        rc = main(["bench", str(conv_path), "--variants", "ort", "--repeat", "2", "--warmup", "0", flag,
                   "--no-memory", "--no-progress", "--json", str(js)])
        out, err = capsys.readouterr()
        assert rc == 0, err
        data = json.loads(js.read_text())
        validate(data)
        assert data["settle"] is want and ("b2b ms" in out) is want
        assert (data["results"][0]["warm_median_ms"] is not None) is want


def _bad(argv, capsys):
    rc = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", ["missing", "garbage", "directory", "batch", "fixed", "json_dir",
                                  "plot_dir", "threads", "repeat", "variant", "no_model"])
def test_cli_bad_input_one_line_exit_2_nothing_written(case, conv_path, tmp_path, capsys):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not onnx")
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_bn_relu(batch=1), fixed)
    model, extra = conv_path, []
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "garbage":
        model = garbage
    elif case == "directory":
        model = tmp_path
    elif case == "batch":
        extra = ["--batch", "1,x"]
    elif case == "fixed":
        model, extra = fixed, ["--batch", "1,8"]
    elif case == "json_dir":
        js = tmp_path / "no_such_dir" / "out.json"
    elif case == "plot_dir":
        png = tmp_path / "no_such_dir" / "out.png"
    elif case == "threads":
        extra = ["--threads", "0"]
    elif case == "repeat":
        extra = ["--repeat", "0"]
    elif case == "variant":
        extra = ["--variants", "ort,nope"]
    argv = ([] if case == "no_model" else [model]) + extra + [
        "--repeat" if case != "repeat" else "--warmup", "2", "--no-memory", "--no-progress",
        "--json", js, "--plot", png]
    rc, out, err = _bad(argv, capsys)
    assert rc == 2, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("bncompile bench: error:"), err
    assert not js.exists() and not png.exists()
    assert not list(tmp_path.glob(".out.*"))          # no temporary left behind


def test_cli_fixed_batch_message_names_the_input(tmp_path, capsys):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_bn_relu(batch=1), fixed)
    rc, _, err = _bad([fixed, "--batch", "8", "--no-progress"], capsys)
    assert rc == 2 and "'x'" in err and "fixed to 1" in err and "--batch 1" in err


# --------------------------------------------------------------------------- --kernels

def test_cli_kernels_delegates(tmp_path, capsys, monkeypatch):
    from bncompile.bench import kernels

    calls = {}

    def fake_run(shapes=None, *, repeat=30, json_path=None, threads=None, target="llvm", rounds="settled"):
        calls.update(repeat=repeat, threads=threads, target=target, rounds=rounds)
        return {"machine": {"target": target}, "cases": [{"case": "NC"}]}

    def fake_backward(**kw):
        calls["backward_rounds"] = kw["rounds"]
        return {"machine": {"target": kw["target"]}, "cases": [{"case": "bwd"}]}

    monkeypatch.setattr(kernels, "run_kernel_benchmark", fake_run)
    monkeypatch.setattr(kernels, "format_table", lambda result: f"KERNEL TABLE {len(result['cases'])} case(s)")
    monkeypatch.setattr(kernels, "run_backward_benchmark", fake_backward)
    monkeypatch.setattr(kernels, "format_backward_table", lambda result: "BACKWARD TABLE")
    js = tmp_path / "k.json"
    rc = main(["bench", "--kernels", "--repeat", "4", "--threads", "2", "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "KERNEL TABLE 1 case(s)" in out and "BACKWARD TABLE" in out
    assert calls == {"repeat": 4, "threads": 2, "target": "llvm", "rounds": "settled", "backward_rounds": "settled"}
    assert json.loads(js.read_text())["cases"] == [{"case": "NC"}]
    assert json.loads(js.read_text())["backward"]["cases"] == [{"case": "bwd"}]
    assert main(["bench", "--kernels", "--repeat", "4", "--no-settle"]) == 0
    assert calls["rounds"] == calls["backward_rounds"] == "interleaved"


def test_cli_kernels_cuda_target_runs_the_gpu_benchmark(tmp_path, capsys, monkeypatch):
    from bncompile.bench import cuda

    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return {"machine": {"skipped": "no CUDA GPU"}, "cases": []}

    from bncompile.lower import tvm as _tvm

    monkeypatch.setattr(cuda, "run_cuda_benchmark", fake_run)
    js = tmp_path / "k.json"
    monkeypatch.setattr(_tvm, "cuda_available", lambda: True)
    rc = main(["bench", "--kernels", "--target", "cuda", "--repeat", "3", "--json", str(js)])
    assert rc == 0
    assert seen == {"repeat": 3, "json_path": str(js)}
    assert "CUDA benchmark skipped: no CUDA GPU" in capsys.readouterr().out
    # without a GPU: one line naming the problem and the fix, exit 2, nothing written
    monkeypatch.setattr(_tvm, "cuda_available", lambda: False)
    seen.clear()
    rc = main(["bench", "--kernels", "--target", "cuda", "--json", str(js)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not seen and not js.exists()
    assert len(err) == 1 and "no CUDA GPU" in err[0] and "drop --target" in err[0]


def test_cli_kernels_refuses_model_and_model_flags(conv_path, capsys):
    rc, _, err = _bad([conv_path, "--kernels"], capsys)
    assert rc == 2 and "--kernels" in err
    rc, _, err = _bad(["--kernels", "--batch", "1"], capsys)
    assert rc == 2 and "--batch does not apply" in err
    rc, _, err = _bad(["--kernels", "--variants", "tvm"], capsys)
    assert rc == 2 and "--variants does not apply" in err
