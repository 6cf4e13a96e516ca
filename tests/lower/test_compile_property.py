"""Issue 14: random training-mode configs through ``bncompile.compile`` (build_model -> Relax -> one
library) against the float64 reference, the same cases as the kernel property test
(:func:`helpers.bn_cases.bn_cases`) with the built model's contract: adjustments of x's rank, any
broadcast shape; ``fused=None`` as well; a symbolic batch run at two batch sizes; and, drawn, the
gradients (issue 16) against the float64 backward. Each example compiles a library, so the count is
kept small; the kernel property test covers more configurations per second.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import bncompile
from bncompile import build_model
from bncompile.reference import batchnorm, batchnorm_backward
from helpers.bn_cases import bn_cases, case_variables

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

TOL = 5e-5      # float32 forward: relative to max(1, |expected|)
GRAD_TOL = 2e-4  # float32 gradients (two reductions more than the forward)


def _check(name, act, exp, tol, what):
    exp = np.asarray(exp, np.float64)
    act = np.asarray(act, np.float64).reshape(exp.shape)
    scale = max(1.0, float(np.abs(exp).max(initial=0.0)))
    np.testing.assert_allclose(act, exp, rtol=tol, atol=tol * scale, err_msg=f"{name} {what}")


@seed(20261129)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bn_cases(full_rank_adjustment=True, fused_too=True), st.booleans())
def test_random_configs_compile_and_match_reference(case, gradients):
    cfg, shape, dynamic, adj_shapes, loc, s = case
    rng = np.random.default_rng(s)
    variables = case_variables(cfg, shape, loc, rng)
    build_shape = [None, *shape[1:]] if dynamic else list(shape)
    cm = bncompile.compile(build_model(cfg, build_shape, training=True, gradients=gradients))
    # a symbolic batch also runs at another size (a multiple of the ghost batch)
    batches = [shape[0]] + ([shape[0] + (cfg.virtual_batch_size or 1)] if dynamic else [])
    for n in batches:
        xs = (n, *shape[1:])
        x = (loc + rng.normal(0, 1.5, xs)).astype(np.float32)
        feeds = {"x": x, **variables}
        adj = None
        if adj_shapes:
            # a dim that was x's batch follows this run's batch (it broadcasts against x)
            a_shapes = [tuple(n if (i == 0 and d == shape[0] and d != 1) else d for i, d in enumerate(sh))
                        for sh in adj_shapes]
            adj = (rng.uniform(0.9, 1.1, a_shapes[0]).astype(np.float32),
                   rng.uniform(-0.1, 0.1, a_shapes[1]).astype(np.float32))
            feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
        what = f"{cfg} build {build_shape} run {xs} adj {adj_shapes} loc {loc}"
        if gradients:
            dy = rng.normal(0, 1.0, xs).astype(np.float32)
            feeds["dy"] = dy
        out = cm.run(feeds)
        ref = batchnorm(cfg, x.astype(np.float64), variables, training=True, adjustment=adj)
        _check("y", out["y"], ref.y, TOL, what)
        for name, v in ref.variables.items():
            _check(name, out[name + "_new"], v, TOL, what)
        if gradients:
            g = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), variables, training=True,
                                   adjustment=adj)
            _check("dx", out["dx"], g.dx, GRAD_TOL, what)
            if cfg.scale:
                _check("dgamma", out["dgamma"], g.dgamma, GRAD_TOL, what)
            if cfg.center:
                _check("dbeta", out["dbeta"], g.dbeta, GRAD_TOL, what)
