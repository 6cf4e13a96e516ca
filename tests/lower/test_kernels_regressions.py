"""Regressions found by a seeded random differential test of the kernels (thousands of configurations
against the float64 reference): each case failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from bncompile import BatchNormConfig
from bncompile.reference import batchnorm, batchnorm_backward

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.kernels import compile_batchnorm  # noqa: E402


@pytest.mark.parametrize("momentum", [1.0, 0.0])
@pytest.mark.parametrize("axis,shape,build", [
    (-1, (2, 4), (2, 4)), (-1, (64, 1000), (64, 1000)), (-1, (8, 4), (None, 4)),
    (1, (4, 8, 6, 6), (4, 8, 6, 6)), (-1, (4, 6, 6, 16), (4, 6, 6, 16)), (-1, (4, 2, 2, 16), (4, 2, 2, 16))])
def test_momentum_extremes_every_rule(momentum, axis, shape, build):
    """momentum=1 (the moving statistics keep their values: nothing reads the float64 batch mean) made the
    channels-last rules ask for a block that was not there (ScheduleError on a static batch)."""
    cfg = BatchNormConfig(axis=axis, momentum=momentum, fused=False)
    x = (np.random.default_rng(0).standard_normal(shape) * 2 + 5).astype(np.float32)
    out = compile_batchnorm(cfg, build, training=True).run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5)
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=1e-6, atol=1e-6, err_msg=n)


def test_ghost_backward_group_spread_of_one_ulp():
    """Two values 1 ulp apart in a ghost group, epsilon 0: the one-pass variance about the coarse shift
    cancelled to 0 and dx came out NaN (dgamma -inf); the reference's dx is 0, dgamma -1."""
    a = np.float32(-34013.594)
    x = np.array([[a], [np.nextafter(a, np.float32(0))]], np.float32)
    dy = np.array([[2.0], [1.0]], np.float32)
    cfg = BatchNormConfig(axis=-1, epsilon=0.0, virtual_batch_size=2)
    out = compile_batchnorm(cfg, (2, 1), gradients=True).run({"x": x, "dy": dy})
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), training=True)
    assert np.isfinite(out["dx"]).all() and np.isfinite(out["dgamma"]).all()
    np.testing.assert_allclose(out["dx"], ref.dx, atol=1e-6)
    np.testing.assert_allclose(out["dgamma"], ref.dgamma, rtol=1e-6)


@pytest.mark.parametrize("shape,vbs,renorm", [((32, 16), 2, False), ((32, 16), 2, True), ((64, 1024), 4, False),
                                              ((8, 3, 3, 40), 2, False), ((8, 3, 3, 40), 4, True)])
def test_ghost_backward_short_groups_large_mean(shape, vbs, renorm):
    """Short ghost groups (plain sums) with the mean 1000x the spread: dx was 3e-5 of its largest value
    off (one-pass variance); now within a few float32 roundings."""
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=vbs, renorm=renorm)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 1000).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    out = compile_batchnorm(cfg, (None,) + shape[1:], gradients=True).run({"x": x, "dy": dy})
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), training=True)
    for name in ("dx", "dgamma", "dbeta"):
        want = getattr(ref, name)
        err = np.abs(out[name] - want).max() / np.abs(want).max()
        assert err < 2e-6, (name, err)
