"""build_model for inference and plain training (standard BatchNormalization), against the reference."""

import itertools

import numpy as np
import onnx
import pytest

from bncompile import BatchNormConfig, ConfigError, build_model
from helpers.bn import check_steps
from bncompile.reference import batchnorm
from helpers import ort_run

CASES = [
    # (input shape, axis)
    ((6, 5), -1), ((6, 5), 1), ((7, 4, 3), 1), ((7, 4, 3), -1), ((7, 4, 3), [1, 2]),
    ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((4, 5, 6, 3), 3), ((4, 3, 5, 6), 2), ((4, 3, 5, 6), [1, 3]),
    ((4, 3, 5, 6), [1, 2]), ((4, 3, 5, 6), [-1, 1]), ((3, 2, 4, 3, 5), 1), ((3, 2, 4, 3, 5), -1),
    ((3, 2, 4, 3, 5), 2), ((3, 2, 4, 3, 5), [2, 4]), ((5, 4), 0), ((6, 3, 4), [0, 2]),
]


@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{s}-ax{a}" for s, a in CASES])
@pytest.mark.parametrize("fused", [None, False, True])
def test_training_steps_then_inference(shape, axis, fused, rng):
    if fused and not (len(shape) in (4, 5) and isinstance(axis, int) and axis % len(shape) in (1, len(shape) - 1)):
        with pytest.raises(ConfigError, match="fused|axis"):
            BatchNormConfig(axis=axis, fused=True).resolve(len(shape))
        return
    cfg = BatchNormConfig(axis=axis, fused=fused, momentum=0.9, epsilon=1e-3)
    assert cfg.resolve(len(shape)).fused == bool(fused is not False and len(shape) in (4, 5) and
                                                  isinstance(axis, int) and axis % len(shape) in (1, len(shape) - 1))
    check_steps(cfg, list(shape), [shape], rng=rng)


@pytest.mark.parametrize("center,scale", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("momentum,epsilon", [(0.99, 1e-3), (0.5, 1e-5), (0.0, 0.1), (1.0, 1e-3)])
def test_center_scale_momentum_epsilon(center, scale, momentum, epsilon, rng):
    cfg = BatchNormConfig(axis=1, center=center, scale=scale, momentum=momentum, epsilon=epsilon)
    check_steps(cfg, [4, 3, 5, 2], [(4, 3, 5, 2)], rng=rng)


@pytest.mark.parametrize("shape,axis,fused", [
    ([None, 3, 4, 5], 1, None), ([None, 4, 5, 3], -1, None), ([None, 6], -1, None), ([None, 3, 4, 5], [1, 3], None),
    ([None, 4, 5, 3], -1, True), ([None, 3, 4, 5, 2], 2, None), ([None, None, 3], -1, None),
    ([None, 3, None], 1, False),
])
def test_dynamic_batch(shape, axis, fused, rng):
    cfg = BatchNormConfig(axis=axis, fused=fused, momentum=0.8)
    concrete = [[d if d is not None else n for d in shape] for n in (2, 5, 1)]
    check_steps(cfg, shape, [tuple(c) for c in concrete], rng=rng)


@pytest.mark.parametrize("fused", [None, True])
def test_fused_path_unbiased_variance_in_onnx(fused, rng):
    cfg = BatchNormConfig(axis=-1, fused=fused, momentum=0.0)
    m = build_model(cfg, [2, 3, 3, 4], training=True)
    x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    out = ort_run(m, {"x": x})
    np.testing.assert_allclose(out["moving_variance_new"], x.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)


def test_same_session_repeated_runs_are_stable(rng):
    """onnxruntime writes running_var into a constant input_var in place: the builder must not feed one."""
    from helpers import ort_session
    cfg = BatchNormConfig(axis=1)
    s = ort_session(build_model(cfg, [4, 3, 2, 2], training=True))
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    a, b = ort_run(s, {"x": x}), ort_run(s, {"x": x})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("axis,fused", [(1, None), (-1, False), ([1, 3], None)])
def test_dtypes(dtype, axis, fused, rng):
    cfg = BatchNormConfig(axis=axis, fused=fused)
    check_steps(cfg, [4, 3, 5, 6], [(4, 3, 5, 6)], rng=rng, dtype=dtype)


def test_contract_names_and_initializers():
    cfg = BatchNormConfig(axis=1)
    train = build_model(cfg, [2, 3, 4, 4], training=True)
    assert [i.name for i in train.graph.input] == ["x", "gamma", "beta", "moving_mean", "moving_variance"]
    assert [o.name for o in train.graph.output] == ["y", "moving_mean_new", "moving_variance_new"]
    inits = {t.name for t in train.graph.initializer}
    assert {"gamma", "beta", "moving_mean", "moving_variance"} <= inits
    assert any(n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
               for n in train.graph.node)
    inf = build_model(cfg, [2, 3, 4, 4], training=False)
    assert [i.name for i in inf.graph.input] == ["x"] and [o.name for o in inf.graph.output] == ["y"]
    assert {"gamma", "beta", "moving_mean", "moving_variance"} <= {t.name for t in inf.graph.initializer}
    # not trainable -> inference model even when a training step is asked for
    frozen = build_model(cfg.replace(trainable=False), [2, 3, 4, 4], training=True)
    assert [o.name for o in frozen.graph.output] == ["y"]
    assert dict((p.key, p.value) for p in inf.metadata_props)["bncompile.mode"] == "inference"


def test_regularizers_kept_in_metadata():
    cfg = BatchNormConfig(gamma_regularizer={"class_name": "L2", "config": {"l2": 0.01}},
                          beta_constraint={"class_name": "NonNeg", "config": {}})
    m = build_model(cfg, [2, 3], training=True)
    meta = {p.key: p.value for p in m.metadata_props}
    assert "L2" in meta["keras.gamma_regularizer"] and "NonNeg" in meta["keras.beta_constraint"]


def test_save_load_roundtrip(tmp_path, rng):
    cfg = BatchNormConfig(axis=[1, 2])
    m = build_model(cfg, [None, 3, 4, 2], training=True)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    m2 = onnx.load(p)
    onnx.checker.check_model(m2, full_check=True)
    x = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    a, b = ort_run(m, {"x": x}), ort_run(m2, {"x": x})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("shape,kwargs,argument", [
    ([4, None, 3], dict(axis=1), "input_shape"), ([4, 3], dict(axis=5), "axis"), ("a,b", dict(), "input_shape"),
    ([4, 0, 3], dict(), "input_shape"), ([4, 3], dict(virtual_batch_size=3), "virtual_batch_size"),
])
def test_build_refusals(shape, kwargs, argument):
    with pytest.raises(ConfigError, match=argument):
        build_model(BatchNormConfig(**kwargs), shape, training=True)


def test_unknown_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        build_model(BatchNormConfig(), [2, 3], training=True, dtype="int8")


@pytest.mark.parametrize("axis,fused", [(1, None), (-1, False), ([1, 3], None)])
def test_large_mean_is_stable(axis, fused, rng):
    """Data whose mean is 1e4 times its standard deviation. float32 resolves 1e4 to ~1e-3, so the best
    a float32 runtime can do is an error of that order in y; a one-pass E[x^2]-E[x]^2 variance would be off
    by ~10 (x^2 ~ 1e8). Bound: 1e-2 absolute on y (std 1) and 1e-2 relative on the variance."""
    cfg = BatchNormConfig(axis=axis, fused=fused, momentum=0.0)
    shape = (8, 3, 4, 5)
    x = (rng.normal(size=shape) + 1e4).astype(np.float32)
    out = ort_run(build_model(cfg, list(shape), training=True), {"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    assert np.max(np.abs(out["y"] - ref.y)) < 1e-2
    np.testing.assert_allclose(out["moving_variance_new"], ref.variables["moving_variance"], rtol=1e-2)
    np.testing.assert_allclose(out["moving_mean_new"], ref.variables["moving_mean"], rtol=1e-6)


@pytest.mark.parametrize("axis", [1, -1, [1, 3]])
def test_float64_statistics_keep_float64_precision(axis, rng):
    """ONNX attributes are float32: the float64 EMA is done in the graph with float64 constants."""
    cfg = BatchNormConfig(axis=axis, momentum=0.99)
    shape = (4, 3, 5, 6)
    x = rng.normal(size=shape) * 3 + 1
    w = {"moving_mean": rng.normal(size=cfg.param_shape(shape)),
         "moving_variance": rng.uniform(0.5, 2, cfg.param_shape(shape))}
    out = ort_run(build_model(cfg, list(shape), training=True, dtype="float64", weights=w), {"x": x})
    ref = batchnorm(cfg, x, w, training=True, dtype="float64")
    for k, v in ref.variables.items():
        np.testing.assert_allclose(out[f"{k}_new"], v, rtol=1e-12)
