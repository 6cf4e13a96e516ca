"""`bncompile compile` on the example models shipped in models/: llvm, dynamic batch at two sizes,
against onnxruntime (optimizations off); the training step against the reference over 3 steps."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from bncompile import BatchNormConfig
from bncompile.reference import batchnorm
from helpers import assert_close, ort_run

pytestmark = pytest.mark.tvm
MODELS = Path(__file__).resolve().parents[2] / "models"
SHAPES = {"cnn_nchw.onnx": (3, 32, 32), "cnn_nhwc.onnx": (24, 24, 3), "mlp_gemm.onnx": (64,)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_inference_models_dynamic_batch(compiler, name):
    model = onnx.load(MODELS / name)
    cm = compiler.compile(model, target="llvm")
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.normal(size=(batch, *SHAPES[name])).astype(np.float32)
        want = ort_run(model, {"x": x})
        got = cm.run({"x": x})
        assert set(got) == set(want)
        for k in want:
            assert_close(got[k], want[k], 1e-4, f"{name} batch {batch} {k}")


def test_training_step_model_over_three_steps(compiler):
    model = onnx.load(MODELS / "train_step.onnx")
    cfg = BatchNormConfig.from_keras(__import__("json").loads(
        {p.key: p.value for p in model.metadata_props}["bncompile.config"]))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {k: init[k].astype(np.float64) for k in cfg.variable_names()}
    cm = compiler.compile(model, target="llvm")
    rng = np.random.default_rng(1)
    for step, batch in enumerate((4, 2, 4)):
        x = (rng.normal(size=(batch, 8, 8, 16)) * 2 + 0.5).astype(np.float32)
        feeds = {"x": x, **{k: v.astype(np.float32) for k, v in state.items()}}
        got = cm.run(feeds)
        ref = batchnorm(cfg, x, state, training=True)
        assert_close(got["y"], ref.y, 1e-5, f"step {step} y")
        for k, v in ref.variables.items():
            assert_close(got[f"{k}_new"], v, 1e-5, f"step {step} {k}")
            state[k] = np.asarray(got[f"{k}_new"], np.float64)
