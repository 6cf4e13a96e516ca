"""The float64 backward reference (``bncompile.reference.batchnorm_backward``) against central finite
differences of the forward reference, in float64, over every mode and axis form.

Renorm's ``r`` and ``d`` are constants in Keras's gradient (``stop_gradient``), so a finite difference
of the forward sees them only where they do not move with x: the renorm cases pin them with clipping
(``rmin == rmax`` fixes r; ``d`` saturates at ``dmax`` when renorm_mean is far from the batch mean)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncompile import BatchNormConfig
from bncompile.reference import batchnorm, batchnorm_backward

H = 1e-5
RTOL = 2e-6


def _loss(cfg, x, variables, dy, training, adjustment):
    y = batchnorm(cfg, x, variables, training=training, adjustment=adjustment).y
    return float(np.sum(y.reshape(dy.shape) * dy))


def _fd(f, a):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + H
        up = f()
        a[i] = old - H
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * H)
    return g


def _close(got, want, what):
    scale = max(np.max(np.abs(want)), 1e-3)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.max(np.abs(got - want)) / scale
    assert err < RTOL, f"{what}: max rel error {err:.3g}"


def check_against_fd(cfg, shape, *, training=True, adjustment_shape=None, seed=0, far_renorm_mean=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, size=shape)
    dy = rng.normal(size=shape)
    variables = cfg.initial_variables(shape)
    variables = {k: (rng.uniform(0.5, 1.5, v.shape) if k in ("gamma", "moving_variance", "moving_stddev",
                                                                "renorm_stddev")
                     else rng.normal(0, 0.3, v.shape)) for k, v in variables.items()}
    if far_renorm_mean:
        variables["renorm_mean"] = np.full_like(variables["renorm_mean"], -50.0)
    adjustment = None
    if adjustment_shape is not None:
        adjustment = (rng.uniform(0.9, 1.1, adjustment_shape), rng.uniform(-0.1, 0.1, adjustment_shape))
    grads = batchnorm_backward(cfg, x, dy, variables, training=training, adjustment=adjustment)
    _close(grads.dx, _fd(lambda: _loss(cfg, x, variables, dy, training, adjustment), x), "dx")
    for name, got in (("gamma", grads.dgamma), ("beta", grads.dbeta)):
        if name not in variables:
            assert got is None, name
            continue
        v = variables[name]
        _close(got, _fd(lambda: _loss(cfg, x, variables, dy, training, adjustment), v), f"d{name}")
    return grads


CASES = {
    "nc": (dict(axis=-1), (6, 5)),
    "nchw_axis1": (dict(axis=1, fused=False), (3, 4, 2, 3)),
    "nhwc_fused_path": (dict(axis=-1), (2, 3, 3, 4)),
    "axis_list": (dict(axis=[1, 3]), (3, 2, 3, 2)),
    "axis_list_with_batch_axis": (dict(axis=[0, 2]), (2, 3, 3)),
    "rank5": (dict(axis=1), (2, 3, 2, 2, 2)),
    "no_scale": (dict(axis=-1, scale=False), (5, 3)),
    "no_center": (dict(axis=-1, center=False), (5, 3)),
    "neither": (dict(axis=-1, center=False, scale=False), (5, 3)),
    "renorm_r_pinned_d_zero": (dict(axis=-1, renorm=True, renorm_clipping={"rmin": 1.7, "rmax": 1.7, "dmax": 0.0}),
                               (6, 4)),
    "renorm_r_d_pinned": (dict(axis=1, renorm=True, renorm_clipping={"rmin": 0.6, "rmax": 0.6, "dmax": 0.8}),
                          (4, 3, 2)),
    "ghost": (dict(axis=-1, virtual_batch_size=2), (6, 3)),
    "ghost_nhwc": (dict(axis=-1, virtual_batch_size=3), (6, 2, 2, 3)),
    "ghost_renorm_pinned": (dict(axis=-1, virtual_batch_size=2, renorm=True,
                                 renorm_clipping={"rmin": 1.3, "rmax": 1.3, "dmax": 0.5}), (4, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_gradients_match_finite_differences(case):
    kw, shape = CASES[case]
    check_against_fd(BatchNormConfig(**kw), shape, far_renorm_mean="dmax" in kw.get("renorm_clipping", {}))


@pytest.mark.parametrize("adj_shape", [(4,), (1, 4), (5, 4), (5, 1)])
def test_adjustment_is_a_constant_of_any_broadcast_shape(adj_shape):
    check_against_fd(BatchNormConfig(axis=-1, adjustment="inputs"), (5, 4), adjustment_shape=adj_shape)


@pytest.mark.parametrize("kw", [dict(axis=-1), dict(axis=1, virtual_batch_size=2), dict(axis=-1, trainable=False)])
def test_inference_gradients_match_finite_differences(kw):
    cfg = BatchNormConfig(**kw)
    check_against_fd(cfg, (4, 3, 2) if kw.get("axis") == 1 else (4, 3), training="trainable" in kw)


def test_renorm_r_and_d_carry_no_gradient():
    """Unclipped renorm: the gradient is the plain BN gradient scaled by r (d adds nothing), which a
    finite difference (that moves r and d with x) does not give."""
    rng = np.random.default_rng(5)
    x, dy = rng.normal(2, 3, (8, 3)), rng.normal(size=(8, 3))
    cfg = BatchNormConfig(axis=-1, renorm=True)
    variables = {**cfg.initial_variables(x.shape), "renorm_stddev": np.full(3, 0.7), "renorm_mean": np.full(3, 0.4)}
    r = np.sqrt(x.var(axis=0) + cfg.epsilon) / 0.7
    plain = batchnorm_backward(BatchNormConfig(axis=-1), x, dy * r, {"gamma": np.ones(3)}, training=True)
    got = batchnorm_backward(cfg, x, dy, variables, training=True)
    np.testing.assert_allclose(got.dx, plain.dx, rtol=1e-10, atol=1e-12)
    full_fd = _fd(lambda: _loss(cfg, x, variables, dy, True, None), x.copy())
    assert np.max(np.abs(full_fd - got.dx)) > 1e-3


def test_fused_and_non_fused_gradients_are_equal():
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 5))
    a = batchnorm_backward(BatchNormConfig(axis=-1, fused=True), x, dy, training=True)
    b = batchnorm_backward(BatchNormConfig(axis=-1, fused=False), x, dy, training=True)
    for u, v in zip((a.dx, a.dgamma, a.dbeta), (b.dx, b.dgamma, b.dbeta)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


def test_ghost_groups_are_strided():
    """Sample i of a ghost batch belongs to group i % (N/v): permuting samples within a group leaves the
    gradient permuted the same way; swapping samples across groups does not."""
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=2)          # groups {0, 3}, {1, 4}, {2, 5}
    base = batchnorm_backward(cfg, x, dy, training=True).dx
    p = [3, 1, 2, 0, 4, 5]
    np.testing.assert_allclose(batchnorm_backward(cfg, x[p], dy[p], training=True).dx, base[p], rtol=1e-12)
    q = [1, 0, 2, 3, 4, 5]
    assert not np.allclose(batchnorm_backward(cfg, x[q], dy[q], training=True).dx, base[q])


def test_dy_of_the_wrong_shape_is_refused():
    from bncompile.errors import InputError

    with pytest.raises(InputError, match="dy"):
        batchnorm_backward(BatchNormConfig(), np.zeros((2, 3)), np.zeros((3, 2)), training=True)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_configs_match_finite_differences(data):
    rank = data.draw(st.integers(2, 4), "rank")
    shape = tuple(data.draw(st.lists(st.integers(2, 3), min_size=rank, max_size=rank), "shape"))
    ghost = data.draw(st.booleans(), "ghost")
    if ghost:
        shape = (4,) + shape[1:]
    axes = data.draw(st.lists(st.integers(1 if ghost else 0, rank - 1), min_size=1, max_size=2, unique=True), "axes")
    renorm = data.draw(st.booleans(), "renorm")
    kw = dict(axis=axes if len(axes) > 1 else axes[0], center=data.draw(st.booleans(), "center"),
              scale=data.draw(st.booleans(), "scale"), epsilon=data.draw(st.sampled_from([1e-3, 0.1]), "eps"))
    if ghost:
        kw["virtual_batch_size"] = 2
    if renorm:
        kw.update(renorm=True, renorm_clipping={"rmin": 1.25, "rmax": 1.25, "dmax": 0.3})
    check_against_fd(BatchNormConfig(**kw), shape, seed=data.draw(st.integers(0, 99), "seed"),
                     far_renorm_mean=renorm)
