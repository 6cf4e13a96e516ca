"""Issue 14: random kernel configs against the float64 reference (hypothesis, seeded, bounded; the
cases are :func:`helpers.bn_cases.bn_cases`). Kernels are cached per spec, so repeated layouts cost one
compile. tests/lower/test_compile_property.py runs the same cases through ``bncompile.compile``.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings

from bncompile.reference import batchnorm
from helpers.bn_cases import bn_cases, case_variables

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.kernels import compile_batchnorm

TOL = 5e-5      # float32: relative to max(1, |expected|)


@seed(20240614)
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bn_cases())
def test_random_kernel_configs_match_reference(case):
    cfg, shape, dynamic, adj_shapes, loc, s = case
    rng = np.random.default_rng(s)
    x = (loc + rng.normal(0, 1.5, shape)).astype(np.float32)
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape)
    variables = case_variables(cfg, shape, loc, rng)
    feeds = {"x": x, **variables}
    adj = None
    if adj_shapes:
        adj = (rng.uniform(0.9, 1.1, adj_shapes[0]).astype(np.float32),
               rng.uniform(-0.1, 0.1, adj_shapes[1]).astype(np.float32))
        feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
    out = k.run(feeds)
    ref = batchnorm(cfg, x.astype(np.float64), variables, training=True, adjustment=adj)
    for name, exp, act in [("y", ref.y, out["y"])] + [(n, v, out[n + "_new"]) for n, v in ref.variables.items()]:
        exp = np.asarray(exp, np.float64)
        act = np.asarray(act, np.float64).reshape(exp.shape)
        scale = max(1.0, float(np.abs(exp).max()))
        np.testing.assert_allclose(act, exp, rtol=TOL, atol=TOL * scale, err_msg=f"{name} {cfg} {shape} {k}")
