"""Packaging, the README's examples, the CLI entry points and the example models."""

import re
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands on a fresh machine")[1].split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2
    assert "bncompile fold models/" in commands[0]
    assert commands[1] in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["fold", "--help"], ["build", "--help"]])
def test_console_entry_points(args):
    for cmd in (["bncompile"], [sys.executable, "-m", "bncompile"]):
        r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout


def test_no_command_is_usage_error():
    r = subprocess.run([sys.executable, "-m", "bncompile"], capture_output=True, text=True)
    assert r.returncode == 2


def test_import_does_not_pull_tvm():
    code = ("import sys, bncompile, bncompile.fold, bncompile.builder, bncompile.cli.fold; "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_models_regenerate_identically(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "models" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("cnn_nchw.onnx", "cnn_nhwc.onnx", "mlp_gemm.onnx", "train_step.onnx"):
        shipped = ROOT / "models" / name
        assert shipped.stat().st_size < 1_000_000
        m = onnx.load(shipped)
        onnx.checker.check_model(m, full_check=True)
        assert shipped.read_bytes() == (tmp_path / name).read_bytes(), f"{name} is stale: run models/generate.py"


def test_example_models_run():
    from conftest import ort_run
    rng = np.random.default_rng(0)
    for name, shape in (("cnn_nchw.onnx", (2, 3, 32, 32)), ("cnn_nhwc.onnx", (2, 24, 24, 3)),
                        ("mlp_gemm.onnx", (2, 64)), ("train_step.onnx", (2, 8, 8, 16))):
        out = ort_run(onnx.load(ROOT / "models" / name), {"x": rng.normal(size=shape).astype(np.float32)})
        assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """The built wheel ships bncompile.passes (not a top-level `passes`) and the CLI works from elsewhere."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, timeout=300)
    wheel = next(wheel_dir.glob("bncompile-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import bncompile, bncompile.passes.fold_batchnorm, importlib.util, os; "
            "assert 'site-packages' in bncompile.__file__, bncompile.__file__; "
            "assert importlib.util.find_spec('passes') is None or 'bncompile' not in "
            "(importlib.util.find_spec('passes').origin or '')")
    subprocess.run([str(py), "-c", code], check=True, cwd=work)
    out = work / "cnn.folded.onnx"
    r = subprocess.run([str(env_dir / "bin" / "bncompile"), "fold", str(ROOT / "models" / "cnn_nchw.onnx"),
                        "-o", str(out)], capture_output=True, text=True, cwd=work, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists()


@pytest.mark.slow
def test_readme_cli_tour_runs(tmp_path):
    """Every line of the README's CLI tour, as written, in a folder holding the files it names."""
    import json
    import shlex
    import shutil
    text = (ROOT / "README.md").read_text()
    tour = text.split("## A tour of the CLI")[1].split("## ")[0]
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", tour, re.S)
             for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) >= 10
    shutil.copy(ROOT / "models" / "cnn_nchw.onnx", tmp_path / "model.onnx")
    (tmp_path / "layer.json").write_text(json.dumps({"axis": [3], "momentum": 0.9, "epsilon": 0.001,
                                                     "center": True, "scale": True, "name": "bn"}))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32))
    ran = 0
    for line in lines:
        argv = shlex.split(line.split("  #")[0])
        if argv[:3] == ["bncompile", "bench", "--kernels"]:
            continue  # a minutes-long benchmark; its code path is tested in test_kernels_bench.py
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        ran += 1
    assert (tmp_path / "model.folded.onnx").exists() and (tmp_path / "bench.png").exists()
    assert ran == len(lines) - 1
