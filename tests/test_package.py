"""Packaging, the README's examples, the CLI entry points and the example models."""

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
#: the console script of the environment running the tests (its own bin/, never PATH)
CONSOLE_SCRIPT = Path(sys.executable).parent / "bncompile"


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def _readme_commands() -> list:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands on a fresh machine")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_two_setup_commands_and_ci_runs_both():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "bncompile fold models/" in commands[0]
    ci = (ROOT / ".ci/run").read_text()
    assert ci.index(commands[0]) < ci.index(commands[1]), "CI runs the first command, then the test one"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["fold", "--help"], ["build", "--help"]])
def test_console_entry_points(args):
    assert CONSOLE_SCRIPT.exists(), f"no console script beside {sys.executable}: install the project first"
    for cmd in ([str(CONSOLE_SCRIPT)], [sys.executable, "-m", "bncompile"]):
        r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout


def test_no_command_is_usage_error():
    r = subprocess.run([sys.executable, "-m", "bncompile"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "command" in r.stderr, r.stderr


def test_import_does_not_pull_tvm():
    code = ("import sys, bncompile, bncompile.folding, bncompile.builder, bncompile.cli.fold; "
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
    """Each shipped model runs in onnxruntime (optimizations off) and agrees with an independent
    implementation: ``onnx.reference`` for the CNNs and the MLP (opset 15 BatchNormalization, where it
    is right), bncompile.reference (float64 NumPy) for the training step's y and updated variables."""
    from onnx.reference import ReferenceEvaluator

    from bncompile import BatchNormConfig
    from bncompile.reference import batchnorm
    from helpers import assert_close, ort_run

    rng = np.random.default_rng(0)
    for name, shape in (("cnn_nchw.onnx", (2, 3, 32, 32)), ("cnn_nhwc.onnx", (2, 24, 24, 3)),
                        ("mlp_gemm.onnx", (3, 64))):
        model = onnx.load(ROOT / "models" / name)
        x = rng.normal(size=shape).astype(np.float32)
        got = ort_run(model, {"x": x})
        want = ReferenceEvaluator(model).run(None, {"x": x})
        assert len(got) == len(want)
        for (out, g), w in zip(got.items(), want):
            assert g.shape == w.shape and np.abs(w).max() > 0, (name, out)
            assert_close(g, w, 1e-4, f"{name}:{out}")
    model = onnx.load(ROOT / "models" / "train_step.onnx")
    meta = {p.key: p.value for p in model.metadata_props}
    x = (rng.normal(size=(4, 8, 8, 16)) * 3 + 1).astype(np.float32)
    feeds = {"x": x}
    state = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    got = ort_run(model, feeds)
    cfg = BatchNormConfig.from_keras(__import__("json").loads(meta["bncompile.config"]))
    ref = batchnorm(cfg, x, {k: v for k, v in state.items() if k in cfg.variable_names()}, training=True)
    want = {"y": ref.y, **{f"{k}_new": v for k, v in ref.variables.items()}}
    assert set(want) == set(got), (sorted(want), sorted(got))
    for k, w in want.items():
        assert_close(got[k], w, 1e-5, f"train_step:{k}")


def _runtime_closure(dist_name: str) -> list:
    """The installed distributions ``dist_name`` needs at run time (its non-extra requirements,
    transitively), read from this environment's metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo, dists = set(), [dist_name], []
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        dists.append(dist)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return dists


def _site_view(dists, folder: Path) -> Path:
    """A folder of links to exactly the files of ``dists`` (top-level packages, modules, metadata):
    what a fresh ``pip install`` of the wheel would bring, without a download."""
    folder.mkdir()
    for dist in dists:
        for f in dist.files or []:
            top = f.parts[0]
            if top.endswith(".pth") or top == ".." or (folder / top).exists():
                continue
            src = Path(dist.locate_file(top))
            if src.exists():
                (folder / top).symlink_to(src)
    return folder


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """The built wheel, installed into a venv that sees neither the checkout, nor the base
    interpreter's packages, nor this environment's editable finder (only the wheel's declared
    run-time dependencies), runs the README's first command from another folder."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, timeout=300)
    wheel = next(wheel_dir.glob("bncompile-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    deps = [d for d in _runtime_closure("bncompile") if d.metadata["Name"].lower() != "bncompile"]
    view = _site_view(deps, tmp_path / "deps")
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "zz_bncompile_test_deps.pth").write_text(f"{view}\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(ROOT / "models", work / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    code = ("import sys, bncompile, bncompile.passes.fold_batchnorm, importlib.util; "
            "assert 'site-packages' in bncompile.__file__, bncompile.__file__; "
            "assert importlib.util.find_spec('passes') is None; "
            f"assert not any(p.startswith({str(ROOT)!r}) for p in sys.path if p), sys.path")
    subprocess.run([str(py), "-c", code], check=True, cwd=work, env=env)
    # the README's first command, from the venv's own bin/
    first = _readme_commands()[0]
    assert first.endswith(".venv/bin/bncompile fold models/cnn_nchw.onnx"), first
    r = subprocess.run([str(env_dir / "bin" / "bncompile"), "fold", "models/cnn_nchw.onnx"],
                       capture_output=True, text=True, cwd=work, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (work / "models" / "cnn_nchw.folded.onnx").exists()


@pytest.mark.slow
def test_readme_cli_tour_runs(tmp_path):
    """Every line of the README's CLI tour, as written, in a folder holding the files it names."""
    import json
    import shlex
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
        assert argv[0] == "bncompile", line
        if argv[:3] == ["bncompile", "bench", "--kernels"]:
            continue  # a minutes-long benchmark; its code path is tested in tests/bench/test_kernels.py
        argv[0] = str(CONSOLE_SCRIPT)
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        ran += 1
    assert (tmp_path / "model.folded.onnx").exists() and (tmp_path / "bench.png").exists()
    assert ran == len(lines) - 1


def test_every_package_folder_is_packaged():
    """pyproject's explicit package list names every folder with an __init__.py (a missing one installs
    fine in editable mode and breaks the wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bncompile").rglob("__init__.py")}
    found.add("bncompile.passes")
    assert (ROOT / "passes" / "__init__.py").exists()
    assert found == listed, (sorted(found - listed), sorted(listed - found))
