"""`bncompile.compile`: whole ONNX graphs -> TVM libraries (llvm), checked against onnxruntime and the
float64 reference; export/load; unsupported operators; CUDA codegen without a GPU; the CLI's bad input."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import helpers.compile_models as M

pytestmark = pytest.mark.tvm

TOL = 1e-4          # max abs error / max |reference|, float32


# --------------------------------------------------------------------------- whole CNN graphs

@pytest.mark.parametrize("name", list(M.MODELS))
def test_static_batch_matches_onnxruntime(compiler, name):
    model = M.MODELS[name](2)
    cm = compiler.compile(model, target="llvm")
    x = M.input_for(model, 2)
    got = cm.run({"x": x})
    assert list(got) == ["y"]
    assert M.rel_err(got["y"], M.ort_run(model, {"x": x})[0]) < TOL


@pytest.mark.parametrize("name", list(M.MODELS))
def test_dynamic_batch_two_sizes(compiler, name):
    model = M.MODELS[name](None)
    cm = compiler.compile(model, target="llvm")
    assert cm.inputs[0]["shape"][0] == "N"
    for batch in (1, 3):
        x = M.input_for(model, batch, seed=batch)
        got = cm.run({"x": x})["y"]
        assert got.shape[0] == batch
        assert M.rel_err(got, M.ort_run(model, {"x": x})[0]) < TOL


def test_no_fold_uses_tvm_inference_bn(compiler):
    model = M.resnet(2)
    cm = compiler.compile(model, fold=False)
    x = M.input_for(model, 2)
    assert M.rel_err(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0]) < TOL


def test_input_shapes_pin_a_dynamic_batch(compiler):
    model = M.mlp(None)
    cm = compiler.compile(model, input_shapes={"x": [5, 20]})
    assert cm.inputs[0]["shape"] == [5, 20]
    x = M.input_for(model, 5)
    assert M.rel_err(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0]) < TOL
    from bncompile.errors import InputError
    with pytest.raises(InputError, match="dimension 0 must be 5"):
        cm.run({"x": M.input_for(model, 4)})
    with pytest.raises(InputError, match="no input named 'z'"):
        compiler.compile(model, input_shapes={"z": [1, 20]})


# --------------------------------------------------------------------------- training steps

def _train_cases():
    from bncompile.config import BatchNormConfig

    return {
        "plain": (BatchNormConfig(fused=False), [6, 4, 5, 3]),
        "fused": (BatchNormConfig(axis=1), [6, 3, 4, 5]),
        "renorm": (BatchNormConfig(renorm=True, renorm_clipping={"rmax": 1.3, "rmin": 0.8, "dmax": 0.4},
                                   renorm_momentum=0.9, momentum=0.8), [8, 5]),
        "ghost": (BatchNormConfig(virtual_batch_size=2, momentum=0.9), [8, 3, 4]),
        "adjustment": (BatchNormConfig(adjustment="inputs"), [6, 4, 3]),
    }


def _initial_variables(config, shape, rng):
    pshape = config.param_shape(shape)
    v = {"gamma": rng.uniform(0.5, 1.5, pshape), "beta": rng.normal(0, 0.3, pshape),
         "moving_mean": rng.normal(0, 0.5, pshape), "moving_variance": rng.uniform(0.5, 2.0, pshape)}
    v["moving_stddev"] = np.sqrt(v["moving_variance"])
    v["renorm_mean"] = rng.normal(0, 0.5, pshape)
    v["renorm_stddev"] = rng.uniform(0.8, 1.5, pshape)
    return {k: v[k].astype(np.float32) for k in config.variable_names()}


@pytest.mark.parametrize("case", ["plain", "fused", "renorm", "ghost", "adjustment"])
def test_training_step_matches_reference_over_three_steps(compiler, case):
    from bncompile.builder import build_model
    from bncompile.reference import batchnorm

    config, shape = _train_cases()[case]
    model = build_model(config, shape, training=True)
    adj_shape = [1] * (len(shape) - 1) + shape[-1:]
    input_shapes = {"adjustment_scale": adj_shape, "adjustment_bias": adj_shape} if config.adjustment else None
    cm = compiler.compile(model, input_shapes=input_shapes)
    assert cm.info["kernels"], "the BN must run bncompile's kernel"
    rng = np.random.default_rng(7)
    ours = _initial_variables(config, shape, rng)
    ref_vars = {k: v.astype(np.float64) for k, v in ours.items()}
    for step in range(3):
        x = rng.normal(1.5, 2.0, shape).astype(np.float32)
        feeds = {"x": x, **ours}
        adjustment = None
        if config.adjustment:
            adjustment = (rng.uniform(0.93, 1.07, adj_shape).astype(np.float32),
                          rng.uniform(-0.1, 0.1, adj_shape).astype(np.float32))
            feeds.update(adjustment_scale=adjustment[0], adjustment_bias=adjustment[1])
        out = cm.run(feeds)
        ref = batchnorm(config, x, ref_vars, training=True, adjustment=adjustment)
        assert M.rel_err(out["y"], ref.y) < TOL, f"step {step}: y"
        for name in config.updated_variable_names():
            got = out[name + "_new"]
            assert M.rel_err(got, ref.variables[name].reshape(got.shape)) < TOL, f"step {step}: {name}"
        ours = {k: out.get(k + "_new", ours[k]) for k in ours}
        ref_vars = {k: np.asarray(ref.variables.get(k, ref_vars[k]), np.float64) for k in ref_vars}


@pytest.mark.parametrize("kw,shape", [
    (dict(renorm=True, momentum=0.9), [None, 6]),
    (dict(fused=False), [None, 3, 4, 5]),            # Reshape to (N*3*4, C, 1): rewritten with -1
    (dict(axis=2, renorm=True), [None, 3, 4, 5]),
    (dict(virtual_batch_size=2), [None, 3, 5]),
], ids=["renorm-2d", "plain-4d", "renorm-axis2", "ghost"])
def test_training_dynamic_batch(compiler, kw, shape):
    from bncompile.builder import build_model
    from bncompile.config import BatchNormConfig
    from bncompile.reference import batchnorm

    config = BatchNormConfig(**kw)
    cm = compiler.compile(build_model(config, shape, training=True))
    assert cm.inputs[0]["shape"][0] == "batch"
    rng = np.random.default_rng(3)
    for n in (4, 6):
        x = rng.normal(0.5, 3.0, [n] + shape[1:]).astype(np.float32)
        out = cm.run({"x": x})                       # variables: the model's initial values (defaults)
        ref = batchnorm(config, x, None, training=True)
        assert M.rel_err(out["y"], ref.y) < TOL
        for name in config.updated_variable_names():
            got = out[name + "_new"]
            assert M.rel_err(got, ref.variables[name].reshape(got.shape)) < TOL, name


def test_ghost_batch_not_divisible_is_an_input_error(compiler, tmp_path):
    from bncompile.builder import build_model
    from bncompile.config import BatchNormConfig
    from bncompile.errors import InputError

    cm = compiler.compile(build_model(BatchNormConfig(virtual_batch_size=2), [None, 3], training=True))
    with pytest.raises(InputError, match="not a multiple of 2"):
        cm.run({"x": np.ones((5, 3), np.float32)})
    loaded = compiler.load(cm.export(tmp_path / "g.so"))
    with pytest.raises(InputError, match="not a multiple of 2"):
        loaded.run({"x": np.ones((5, 3), np.float32)})
    assert loaded.run({"x": np.ones((4, 3), np.float32)})["y"].shape == (4, 3)


def test_training_bn_uses_onnx_momentum_like_onnxruntime(compiler):
    """A bare ONNX BatchNormalization(training_mode=1): running = running*m + batch*(1-m)."""
    C = 4
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"],
                            training_mode=1, momentum=0.7, epsilon=1e-3)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 3, 5])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [C]) for n in "sbmv"]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 3, 5])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [C]) for n in ("rm", "rv")]
    model = helper.make_model(helper.make_graph([node], "bn", ins, outs), opset_imports=[helper.make_opsetid("", 15)])
    cm = compiler.compile(model)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(2, 3, (3, C, 3, 5)).astype(np.float32), "s": rng.uniform(0.5, 1.5, C).astype(np.float32),
             "b": rng.normal(size=C).astype(np.float32), "m": rng.normal(size=C).astype(np.float32),
             "v": rng.uniform(0.5, 2, C).astype(np.float32)}
    got = cm.run(feeds)
    want = M.ort_run(model, feeds)
    for k, w in zip(["y", "rm", "rv"], want):
        assert M.rel_err(got[k], w) < TOL, k


# --------------------------------------------------------------------------- export / load

def test_export_load_roundtrip_with_defaults(compiler, tmp_path):
    from bncompile.builder import build_model
    from bncompile.config import BatchNormConfig

    model = build_model(BatchNormConfig(virtual_batch_size=2), [4, 3, 5], training=True)
    cm = compiler.compile(model)
    path = cm.export(tmp_path / "ghost.so")
    assert (tmp_path / "ghost.so.json").exists() and (tmp_path / "ghost.so.defaults.npz").exists()
    loaded = compiler.load(path)
    assert loaded.input_names == cm.input_names and loaded.output_names == cm.output_names
    x = np.random.default_rng(1).normal(size=(4, 3, 5)).astype(np.float32)
    a, b = cm.run({"x": x}), loaded.run({"x": x})
    want = M.ort_run(model, {"x": x})                 # onnxruntime runs the custom op's function body
    for i, k in enumerate(cm.output_names):
        np.testing.assert_array_equal(a[k], b[k])
        assert M.rel_err(a[k], want[i]) < TOL, k


def _identity_graph(batch):
    """y = x reshaped (TVM makes the output a view of the input's memory) and z = 2 x: a model whose output
    aliases the tensor ``run`` copies its input into."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 6])
    shape = helper.make_tensor("s", TensorProto.INT64, [3], [-1, 2, 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"]), helper.make_node("Mul", ["x", "two"], ["z"])],
                          "alias", [x], [y, z], [shape, two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [4, None])
def test_run_reuses_its_input_tensors_safely(compiler, batch):
    """``run`` keeps one device tensor per input from call to call: every call sees its own input, an
    output returned earlier never changes (even one that is a view of the input), a new batch size gets a
    new tensor; threads calling at once each get theirs (TVM's VM object is not safe to share: each thread
    has its own)."""
    import threading

    cm = compiler.compile(_identity_graph(batch))
    rng = np.random.default_rng(3)
    sizes = [4, 4, 4] if batch else [4, 1, 7, 7, 4]
    kept = []
    for n in sizes:
        x = rng.normal(size=(n, 6)).astype(np.float32)
        got = cm.run({"x": x})
        kept.append((n, got))
        x[:] = 0                                   # the caller's array changing afterwards changes nothing
    rng = np.random.default_rng(3)                 # the same inputs again, to check against
    for n, got in kept:
        x = rng.normal(size=(n, 6)).astype(np.float32)
        assert got["y"].flags.owndata and got["z"].flags.owndata
        np.testing.assert_array_equal(got["y"], x.reshape(n, 2, 3))
        np.testing.assert_array_equal(got["z"], 2 * x)

    errors = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(20):
                x = r.normal(size=(4, 6)).astype(np.float32)
                got = cm.run({"x": x})
                if not (np.array_equal(got["y"], x.reshape(4, 2, 3)) and np.array_equal(got["z"], 2 * x)):
                    errors.append(f"thread {seed}: wrong output")
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(f"thread {seed}: {err!r}")
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_load_needs_metadata(compiler, tmp_path):
    from bncompile.errors import InputError

    (tmp_path / "x.so").write_bytes(b"")
    with pytest.raises(InputError, match="no metadata file"):
        compiler.load(tmp_path / "x.so")
    with pytest.raises(InputError, match="does not exist"):
        compiler.load(tmp_path / "missing.so")


def test_run_errors_name_the_input(compiler):
    from bncompile.errors import InputError

    cm = compiler.compile(M.mlp(None))
    with pytest.raises(InputError, match="missing"):
        cm.run({})
    with pytest.raises(InputError, match="unknown input"):
        cm.run({"x": np.zeros((2, 20), np.float32), "q": np.zeros(1)})
    with pytest.raises(InputError, match="rank"):
        cm.run({"x": np.zeros((2, 20, 1), np.float32)})


def test_aarch64_library_refuses_to_run_on_x86(compiler, tmp_path):
    from bncompile.errors import UnsupportedError

    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 host only")
    cm = compiler.compile(M.mlp(2), target="aarch64")
    with pytest.raises(UnsupportedError, match="aarch64"):
        cm.run({"x": M.input_for(M.mlp(2), 2)})
    cm.export(tmp_path / "m.tar")                   # object files: no cross linker needed
    assert (tmp_path / "m.tar").stat().st_size > 0


# --------------------------------------------------------------------------- unsupported operators

def _model_with(nodes, opsets=(("", 15),)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_all_unsupported_ops_listed_at_once(compiler):
    from bncompile.errors import UnsupportedError

    model = _model_with([helper.make_node("Celu", ["x"], ["a"], name="celu1"),
                         helper.make_node("Relu", ["a"], ["b"]),
                         helper.make_node("FusedThing", ["b"], ["c"], domain="com.example", name="f1"),
                         helper.make_node("Celu", ["c"], ["y"], name="celu2")],
                        opsets=(("", 15), ("com.example", 1)))
    with pytest.raises(UnsupportedError) as e:
        compiler.compile(model, fold=False)
    msg = str(e.value)
    assert "2 operator types" in msg and "Celu (2 nodes: celu1, celu2)" in msg and "com.example::FusedThing" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- CUDA codegen (no GPU needed)

def test_cuda_codegen_whole_graph_and_training_kernel(compiler):
    from bncompile.builder import build_model
    from bncompile.config import BatchNormConfig
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.runtime import cuda_source

    from helpers.cuda import check_cuda_source

    renorm = BatchNormConfig(axis=-1, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    for model in (M.mlp(4), build_model(BatchNormConfig(axis=1), [None, 8, 6, 6], training=True),
                  build_model(renorm, [None, 7, 7, 48], training=True, gradients=True)):
        cm = compiler.compile(model, target="cuda")
        assert cm.target == {"kind": "cuda", "arch": "sm_90"}
        assert "cuda" in _tvm.module_tree_kinds(cm._executable.mod)
        src = cuda_source(cm)
        assert "__global__" in src
        check_cuda_source(src)        # the kernels' shared-memory invariants hold in a whole-model compile too
        if shutil.which("nvcc"):
            ptx = _tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx")
            assert b".target sm_90" in ptx
    assert cm.info["kernels"] and all(r.startswith(("cuda", "bwd_cuda")) for r in cm.info["kernels"].values())


def test_cuda_arch_option():
    from bncompile.lower.targets import resolve_target

    name, d = resolve_target("cuda:sm_80")
    assert (name, d) == ("cuda", {"kind": "cuda", "arch": "sm_80"})
    from bncompile.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="not valid"):
        resolve_target("cuda:ampere")


@pytest.mark.gpu
def test_cuda_runs_on_gpu(compiler):
    from bncompile.lower import tvm as _tvm

    if not _tvm.cuda_available():
        pytest.skip("no CUDA GPU")
    model = M.resnet(None)
    cm = compiler.compile(model, target="cuda")
    x = M.input_for(model, 3)
    assert M.rel_err(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0]) < TOL


# --------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    from bncompile.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_compile_and_run(compiler, tmp_path, capsys):
    model = M.mlp(None)
    onnx.save(model, tmp_path / "mlp.onnx")
    x = M.input_for(model, 3)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = _cli(["compile", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "mlp.so"),
                         "--input-shape", "x=N,20"], capsys)
    assert rc == 0, err
    assert "compiled mlp.onnx for llvm" in out
    rc, out, err = _cli(["run", str(tmp_path / "mlp.so"), "--input", f"x={tmp_path / 'x.npy'}",
                         "-o", str(tmp_path / "out.npz")], capsys)
    assert rc == 0, err
    with np.load(tmp_path / "out.npz") as z:
        assert M.rel_err(z["y"], M.ort_run(model, {"x": x})[0]) < TOL


def _one_line_exit_2(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_bad_inputs_exit_2_one_line(compiler, tmp_path, capsys):
    model = M.mlp(None)
    onnx.save(model, tmp_path / "mlp.onnx")
    rc, _, err = _cli(["compile", str(tmp_path / "mlp.onnx"), "--target", "riscv", "-o", str(tmp_path / "a.so")],
                      capsys)
    _one_line_exit_2(rc, err, "unknown target", "riscv")
    rc, _, err = _cli(["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "a.so")], capsys)
    _one_line_exit_2(rc, err, "nope.onnx", "does not exist")
    rc, _, err = _cli(["compile", str(tmp_path / "mlp.onnx"), "--input-shape", "x=2,abc!", "-o",
                       str(tmp_path / "a.so")], capsys)
    _one_line_exit_2(rc, err, "--input-shape")
    bad = _model_with([helper.make_node("Celu", ["x"], ["a"]), helper.make_node("Det", ["a"], ["y"])])
    onnx.save(bad, tmp_path / "bad.onnx")
    rc, _, err = _cli(["compile", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "b.so")], capsys)
    _one_line_exit_2(rc, err, "Celu", "Det", "not supported")
    assert not (tmp_path / "b.so").exists()

    rc, _, err = _cli(["compile", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m.so")], capsys)
    assert rc == 0, err
    np.save(tmp_path / "wrong.npy", np.zeros((3, 7), np.float32))
    rc, _, err = _cli(["run", str(tmp_path / "m.so"), "--input", f"x={tmp_path / 'wrong.npy'}"], capsys)
    _one_line_exit_2(rc, err, "'x'", "(3, 7)", "(N, 20)")
    rc, _, err = _cli(["run", str(tmp_path / "m.so"), "--input", f"x={tmp_path / 'missing.npy'}"], capsys)
    _one_line_exit_2(rc, err, "missing.npy", "does not exist")
    rc, _, err = _cli(["run", str(tmp_path / "m.so"), "--input", f"q={tmp_path / 'wrong.npy'}"], capsys)
    _one_line_exit_2(rc, err, "no input 'q'")


def test_foreign_model_local_function_is_inlined(compiler):
    """A model-local function outside ai.bncompile is inlined; its Constant(value_float=<attr ref>) is
    rewritten so TVM's Constant converter can read it."""
    from onnx import AttributeProto

    c = helper.make_node("Constant", [], ["k"])
    c.attribute.append(AttributeProto(name="value_float", ref_attr_name="alpha", type=AttributeProto.FLOAT))
    body = [c, helper.make_node("Mul", ["X", "k"], ["t"]), helper.make_node("Relu", ["t"], ["Y"])]
    fn = helper.make_function("ai.example", "ScaledRelu", ["X"], ["Y"], body,
                              opset_imports=[helper.make_opsetid("", 15)], attributes=["alpha"])
    node = helper.make_node("ScaledRelu", ["x"], ["y"], domain="ai.example", alpha=2.5)
    model = _model_with([node], opsets=(("", 15), ("ai.example", 1)))
    model.functions.append(fn)
    cm = compiler.compile(model)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0], rtol=1e-6)


def test_x86_64_generic_target_runs_here(compiler):
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 host only")
    model = M.mlp(None)
    cm = compiler.compile(model, target="x86_64")
    assert cm.target["mtriple"] == "x86_64-linux-gnu"
    x = M.input_for(model, 2)
    assert M.rel_err(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0]) < TOL
