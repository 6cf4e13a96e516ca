"""One check used by the builder and custom-op tests: 3 training steps feeding the variables back,
then an inference step, the ONNX model in onnxruntime (optimizations off) against the reference."""

from __future__ import annotations

import numpy as np
import onnx

from bncompile import BatchNormConfig, build_model
from bncompile.config import RandomAdjustment
from bncompile.reference import batchnorm
from helpers import assert_close, ort_run, ort_session

RTOL = {"float32": 1e-5, "float64": 1e-7, "float16": 2e-2, "bfloat16": 8e-2}
NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def cast_input(x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(NP[dtype])


def random_weights(cfg: BatchNormConfig, shape, rng):
    pshape = cfg.param_shape(shape)
    w = {"moving_mean": rng.normal(size=pshape), "moving_variance": rng.uniform(0.5, 2.0, pshape)}
    if cfg.scale:
        w["gamma"] = rng.normal(1.0, 0.5, pshape)
    if cfg.center:
        w["beta"] = rng.normal(size=pshape)
    if cfg.renorm:
        w["moving_stddev"] = np.sqrt(w["moving_variance"])
        w["renorm_mean"] = w["moving_mean"] + rng.normal(0, 0.3, pshape)
        w["renorm_stddev"] = rng.uniform(0.5, 1.5, pshape)
    return w


def check_steps(cfg: BatchNormConfig, build_shape, run_shapes, *, rng, dtype="float32", transform=None,
                steps=3, scale=2.0, offset=0.5):
    """Build, optionally transform (e.g. inline) the model, and compare with the reference."""
    stat = np.float64 if dtype == "float64" else np.float32
    weights = random_weights(cfg, [s or run_shapes[0][i] for i, s in enumerate(build_shape)], rng)
    model = build_model(cfg, build_shape, training=True, dtype=dtype, weights=weights)
    onnx.checker.check_model(model, full_check=True)
    if transform is not None:
        model = transform(model)
        onnx.checker.check_model(model, full_check=True)
    sess = ort_session(model)
    input_names = [i.name for i in model.graph.input]  # ORT lists overridable initializers apart
    state = {k: v for k, v in weights.items()}
    rtol = RTOL[dtype]
    results = []
    for step in range(steps):
        shape = run_shapes[step % len(run_shapes)]
        x = cast_input(rng.normal(size=shape) * scale + offset, dtype)
        feeds = {"x": x}
        feeds.update({k: np.asarray(state[k], stat).reshape(cfg.param_shape(shape)) for k in state
                      if k in input_names})
        adj = None
        if cfg.adjustment == "inputs":
            res = cfg.resolve(len(shape))
            bshape = res.broadcast_shape(shape)
            adj = (rng.uniform(0.9, 1.1, bshape), rng.uniform(-0.1, 0.1, (1,) * len(shape)))
            feeds["adjustment_scale"] = cast_input(adj[0], dtype)
            feeds["adjustment_bias"] = cast_input(adj[1], dtype)
        out = ort_run(sess, feeds)
        if isinstance(cfg.adjustment, RandomAdjustment):
            adj = (out["adjustment_scale"], out["adjustment_bias"])
        ref = batchnorm(cfg, np.asarray(x, np.float64), state, training=True, adjustment=adj,
                        dtype="float64" if dtype == "float64" else None)
        assert out["y"].dtype == x.dtype
        assert_close(out["y"], ref.y, rtol, f"step {step} y")
        for name, value in ref.variables.items():
            got = out[f"{name}_new"]
            assert got.shape == tuple(cfg.param_shape(shape)), (name, got.shape)
            assert_close(got, value, max(rtol, 1e-5) if dtype in ("float16", "bfloat16") else rtol,
                         f"step {step} {name}")
            state[name] = got.astype(np.float64)
        results.append((out, ref))
    # then an inference step from the trained variables
    inf = build_model(cfg, build_shape, training=False, dtype=dtype, weights=state)
    onnx.checker.check_model(inf, full_check=True)
    assert [i.name for i in inf.graph.input] == ["x"] and [o.name for o in inf.graph.output] == ["y"]
    assert not inf.functions and all(n.domain == "" for n in inf.graph.node)
    shape = run_shapes[-1]
    x = cast_input(rng.normal(size=shape) * scale + offset, dtype)
    out = ort_run(inf, {"x": x})
    ref = batchnorm(cfg, np.asarray(x, np.float64), state, training=False,
                    dtype="float64" if dtype == "float64" else None)
    assert_close(out["y"], ref.y, rtol, "inference y")
    return results
