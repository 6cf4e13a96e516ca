"""The float64 reference against hand-computed cases and ONNX's own BatchNormalization node tests."""

import numpy as np
import pytest

from bncompile import BatchNormConfig, ConfigError
from bncompile.reference import batchnorm, onnx_batchnorm, run_steps


def test_hand_computed_training_step():
    # one channel, values 1, 2, 3, 6: mean 3, biased variance (4+1+0+9)/4 = 3.5
    x = np.array([[1.0], [2.0], [3.0], [6.0]])
    cfg = BatchNormConfig(axis=-1, momentum=0.5, epsilon=0.5)
    r = batchnorm(cfg, x, {"gamma": [2.0], "beta": [1.0], "moving_mean": [1.0], "moving_variance": [1.0]},
                  training=True)
    np.testing.assert_allclose(r.y[:, 0], (x[:, 0] - 3) / 2.0 * 2 + 1)    # sqrt(3.5+0.5) = 2
    np.testing.assert_allclose(r.variables["moving_mean"], [0.5 * 1 + 0.5 * 3])
    np.testing.assert_allclose(r.variables["moving_variance"], [0.5 * 1 + 0.5 * 3.5])


def test_hand_computed_inference():
    x = np.array([[1.0, 10.0], [3.0, 20.0]])
    cfg = BatchNormConfig(axis=1, epsilon=1.0)
    r = batchnorm(cfg, x, {"gamma": [1.0, 2.0], "beta": [0.0, 1.0], "moving_mean": [1.0, 10.0],
                           "moving_variance": [3.0, 15.0]}, training=False)
    np.testing.assert_allclose(r.y, [[0.0, 1.0], [1.0, 1 + 2 * 10 / 4]])
    np.testing.assert_allclose(r.variables["moving_mean"], [1.0, 10.0])   # unchanged


def test_fused_path_unbiased_moving_variance():
    # rank 4, NHWC, fused by default: 8 values per channel -> factor 8/7
    x = np.arange(8.0).reshape(2, 2, 2, 1)
    var = x.var()
    fused = batchnorm(BatchNormConfig(momentum=0.0), x, training=True)
    plain = batchnorm(BatchNormConfig(momentum=0.0, fused=False), x, training=True)
    np.testing.assert_allclose(fused.variables["moving_variance"], [var * 8 / 7])
    np.testing.assert_allclose(plain.variables["moving_variance"], [var])
    np.testing.assert_allclose(fused.y, plain.y)   # the output is the same


def test_fused_path_single_element_factor_one():
    x = np.array([5.0]).reshape(1, 1, 1, 1)
    r = batchnorm(BatchNormConfig(momentum=0.0), x, training=True)
    np.testing.assert_allclose(r.variables["moving_variance"], [0.0])


def test_ghost_groups_are_strided():
    # N=4, v=2 -> G=2 groups: {0, 2} and {1, 3}
    x = np.array([[0.0], [10.0], [2.0], [30.0]])
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=2, momentum=0.0, epsilon=1e-12, center=False, scale=False)
    r = batchnorm(cfg, x, training=True)
    np.testing.assert_allclose(r.y[:, 0], [-1, -1, 1, 1], atol=1e-6)
    # moving stats: average of the group means (1, 20) and of the group variances (1, 100)
    np.testing.assert_allclose(r.variables["moving_mean"].reshape(-1), [10.5])
    np.testing.assert_allclose(r.variables["moving_variance"].reshape(-1), [50.5])
    assert r.variables["moving_mean"].shape == (1, 1, 1)   # Keras's extra leading dim


def test_renorm_hand_computed_with_clipping():
    x = np.array([[0.0], [4.0]])                       # mean 2, var 4
    eps = 0.0001
    cfg = BatchNormConfig(axis=-1, renorm=True, epsilon=eps, momentum=0.5, renorm_momentum=0.25,
                          renorm_clipping={"rmax": 1.5, "dmax": 0.5}, center=False, scale=False)
    w = {"moving_mean": [0.0], "moving_variance": [1.0], "moving_stddev": [1.0], "renorm_mean": [1.0],
         "renorm_stddev": [1.0]}
    r = batchnorm(cfg, x, w, training=True)
    sigma = np.sqrt(4 + eps)
    rr = min(sigma / 1.0, 1.5)
    d = min((2 - 1) / 1.0, 0.5)
    xhat = (x[:, 0] - 2) / sigma
    np.testing.assert_allclose(r.y[:, 0], xhat * rr + d)
    np.testing.assert_allclose(r.variables["renorm_mean"], [0.25 * 1 + 0.75 * 2])
    np.testing.assert_allclose(r.variables["renorm_stddev"], [0.25 * 1 + 0.75 * sigma])
    ms = 0.5 * 1 + 0.5 * sigma
    np.testing.assert_allclose(r.variables["moving_stddev"], [ms])
    np.testing.assert_allclose(r.variables["moving_variance"], [ms * ms - eps])
    np.testing.assert_allclose(r.variables["moving_mean"], [1.0])


def test_renorm_small_stddev_uses_sqrt_eps_floor():
    x = np.array([[0.0], [2.0]])
    cfg = BatchNormConfig(axis=-1, renorm=True, epsilon=0.01, center=False, scale=False)
    r = batchnorm(cfg, x, {"renorm_stddev": [0.0], "renorm_mean": [0.0]}, training=True)
    s = np.sqrt(0.01)
    sigma = np.sqrt(1 + 0.01)
    np.testing.assert_allclose(r.y[:, 0], (x[:, 0] - 1) / sigma * (sigma / s) + 1 / s)


def test_adjustment_composition():
    x = np.array([[0.0, 1.0], [2.0, 5.0]])
    cfg = BatchNormConfig(axis=-1, adjustment="inputs", epsilon=1e-9)
    g, b = np.array([2.0, 3.0]), np.array([1.0, -1.0])
    r = batchnorm(cfg, x, {"gamma": g, "beta": b}, training=True, adjustment=(np.array([0.5, 2.0]), 0.25))
    xhat = np.array([[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(r.y, (xhat * [0.5, 2.0] + 0.25) * g + b, atol=1e-6)
    plain = batchnorm(BatchNormConfig(axis=-1, epsilon=1e-9), x, training=True)
    for k in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(r.variables[k], plain.variables[k])


def test_ghost_batch_must_divide():
    with pytest.raises(ConfigError, match="virtual_batch_size"):
        batchnorm(BatchNormConfig(virtual_batch_size=3), np.ones((4, 2)), training=True)


def test_axis_list_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 6))
    r = batchnorm(BatchNormConfig(axis=[1, 3], momentum=0.0, epsilon=1e-3), x, training=True)
    np.testing.assert_allclose(r.variables["moving_mean"], x.mean(axis=(0, 2), keepdims=True))
    np.testing.assert_allclose(r.variables["moving_variance"], x.var(axis=(0, 2), keepdims=True))


def test_run_steps_feeds_variables_back():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(4, 3)) + i for i in range(3)]
    cfg = BatchNormConfig(momentum=0.5)
    res = run_steps(cfg, xs)
    mm = np.zeros(3)
    for x in xs:
        mm = mm * 0.5 + x.mean(axis=0) * 0.5
    np.testing.assert_allclose(res[-1].variables["moving_mean"], mm)


# ---- ONNX's own node tests (golden data shipped in the onnx package as test-case generators)

def _onnx_batchnorm_cases():
    from onnx.backend.test.case.node import collect_testcases
    return [c for c in collect_testcases("BatchNormalization") if c.name.startswith("test_batchnorm")]


@pytest.mark.parametrize("case", _onnx_batchnorm_cases(), ids=lambda c: c.name)
def test_onnx_node_tests(case):
    node = case.model.graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
    mom = attrs["momentum"].f if "momentum" in attrs else 0.9
    training = bool(attrs["training_mode"].i) if "training_mode" in attrs else False
    for inputs, expected in case.data_sets:
        got = onnx_batchnorm(*inputs, epsilon=eps, momentum=mom, training_mode=training)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_ghost_inference_output_has_the_input_shape():
    x = np.random.default_rng(0).normal(size=(8, 3, 5))
    for cfg, training in ((BatchNormConfig(virtual_batch_size=2), False),
                          (BatchNormConfig(virtual_batch_size=2, trainable=False), True)):
        assert batchnorm(cfg, x, training=training).y.shape == x.shape
