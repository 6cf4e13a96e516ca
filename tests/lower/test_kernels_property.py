"""Issue 14: random kernel configs against the float64 reference (hypothesis, seeded, bounded).

Ranks 2-5, one axis or axis lists, renorm with every subset of clipping bounds (rmax < rmin included),
ghost BN, adjustment inputs of every broadcast shape, static or symbolic batch, means up to 1e3 x the
spread. Kernels are cached per spec, so repeated layouts cost one compile.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from bncompile.config import BatchNormConfig
from bncompile.reference import batchnorm

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.kernels import compile_batchnorm

TOL = 5e-5      # float32: relative to max(1, |expected|)


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    ghost = draw(st.integers(0, 2)) == 0
    vbs = draw(st.sampled_from([1, 2, 3])) if ghost else None
    nmul = draw(st.integers(1, 3))
    n = vbs * nmul if vbs else draw(st.integers(1, 5))
    rest = [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    shape = (n, *rest)
    lo = 1 if ghost else 0
    axes = draw(st.lists(st.integers(lo, rank - 1), min_size=1, max_size=max(1, rank - 1 - lo), unique=True)
                if rank - 1 >= lo else st.just([rank - 1]))
    if not ghost and draw(st.integers(0, 9)) == 0:
        axes = sorted(set(axes) | {0})                       # the batch axis among the channels
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    renorm = draw(st.booleans())
    clip = None
    if renorm:
        keys = draw(st.lists(st.sampled_from(["rmax", "rmin", "dmax"]), unique=True))
        vals = {"rmax": draw(st.floats(0.3, 3.0)), "rmin": draw(st.floats(0.1, 2.0)), "dmax": draw(st.floats(0.0, 2.0))}
        clip = {k: vals[k] for k in keys}
    adjust = not ghost and draw(st.booleans())
    dynamic = 0 not in axes and draw(st.booleans())
    kw = dict(axis=axis, renorm=renorm, renorm_clipping=clip, momentum=draw(st.sampled_from([0.0, 0.9, 0.99])),
              epsilon=draw(st.sampled_from([1e-3, 1e-5])), center=draw(st.booleans()), scale=draw(st.booleans()),
              fused=False, virtual_batch_size=vbs, adjustment="inputs" if adjust else None)
    adj_shapes = None
    if adjust:
        def one():
            # each dim: x's size or 1; then drop 0..rank leading dims
            dims = tuple(d if draw(st.booleans()) else 1 for d in shape)
            return dims[draw(st.integers(0, rank)):]
        adj_shapes = (one(), one())
    loc = draw(st.sampled_from([0.0, 0.5, 30.0, 1e3]))
    return BatchNormConfig(**kw), shape, dynamic, adj_shapes, loc, draw(st.integers(0, 2**31 - 1))


@seed(20240614)
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_random_kernel_configs_match_reference(case):
    cfg, shape, dynamic, adj_shapes, loc, s = case
    rng = np.random.default_rng(s)
    x = (loc + rng.normal(0, 1.5, shape)).astype(np.float32)
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape)
    init = cfg.initial_variables(shape)
    variables = {}
    for name, v in init.items():
        if name in ("moving_variance", "moving_stddev", "renorm_stddev", "gamma"):
            variables[name] = (v * rng.uniform(0.7, 1.3, v.shape)).astype(np.float32)
        else:
            variables[name] = (v + loc + rng.normal(0, 0.2, v.shape)).astype(np.float32)
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
