"""Issue 16 item 4: ``bncompile.compile`` of ``build_model(..., gradients=True)`` lowers the ``*Grad``
custom ops (renorm, ghost, adjustment) to the backward kernels (one library runs a full training step),
and keeps the plain/fused standard-op backward compiling; every variant, axis form and dynamic batch
against the float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import bncompile
from bncompile import BatchNormConfig, build_model
from bncompile.reference import batchnorm, batchnorm_backward
from helpers import assert_close
from helpers.bn import random_weights

pytestmark = pytest.mark.tvm
TOL = 1e-4

CASES = {
    # name: (config, build shape, uses the backward kernel)
    "plain_nchw": (dict(axis=1, fused=False), [None, 3, 4, 5], False),
    "fused_nhwc": (dict(axis=-1), [None, 4, 3, 5], False),
    "renorm": (dict(axis=-1, renorm=True), [None, 5], True),
    "renorm_clipped_nchw": (dict(axis=1, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}),
                            [None, 3, 4, 6], True),
    "renorm_axis_list": (dict(axis=[1, 3], renorm=True), [None, 2, 3, 2], True),
    "ghost": (dict(axis=-1, virtual_batch_size=2), [None, 4], True),
    "ghost_nchw_static": (dict(axis=1, virtual_batch_size=4), [8, 3, 2, 2], True),
    "ghost_renorm": (dict(axis=-1, virtual_batch_size=2, renorm=True, renorm_clipping={"rmax": 1.5}),
                     [None, 2, 3], True),
    "adjustment": (dict(axis=-1, adjustment="inputs"), [None, 3, 4], True),
    "adjustment_renorm_nchw": (dict(axis=1, adjustment="inputs", renorm=True), [None, 3, 2], True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_model_compiles_to_backward_kernels(name, rng):
    kw, shape, grad_kernel = CASES[name]
    cfg = BatchNormConfig(**kw)
    run = [8 if d is None else d for d in shape]
    w = random_weights(cfg, run, rng)
    cm = bncompile.compile(build_model(cfg, shape, training=True, gradients=True, weights=w))
    rules = {k: v for k, v in cm.info["kernels"].items() if k.startswith("bncompile_bn_grad")}
    assert bool(rules) == grad_kernel, cm.info["kernels"]
    assert all(r.startswith("bwd_cpu_") for r in rules.values()), rules
    for batch in ([8, 4] if shape[0] is None else [shape[0]]):
        run[0] = batch
        x = rng.normal(1.0, 2.0, run).astype(np.float32)
        dy = rng.normal(size=run).astype(np.float32)
        feeds = {"x": x, "dy": dy, **{k: v.astype(np.float32) for k, v in w.items()}}
        adj = None
        if cfg.adjustment == "inputs":
            ax = cfg.resolve(len(run)).axes[0]
            ashape = [run[i] if i == ax else 1 for i in range(len(run))]
            adj = (rng.uniform(0.9, 1.1, ashape).astype(np.float32), rng.uniform(-0.1, 0.1, ashape).astype(np.float32))
            feeds["adjustment_scale"], feeds["adjustment_bias"] = adj
        out = cm.run(feeds)
        fwd = batchnorm(cfg, x, w, training=True, adjustment=adj)
        ref = batchnorm_backward(cfg, x, dy, w, training=True, adjustment=adj)
        assert_close(out["y"], fwd.y, TOL, "y")
        assert_close(out["dx"], ref.dx, TOL, f"dx@{batch}")
        assert_close(out["dgamma"], ref.dgamma, TOL, "dgamma")
        assert_close(out["dbeta"], ref.dbeta, TOL, "dbeta")


def test_gradient_model_compiles_for_cuda():
    cfg = BatchNormConfig(axis=1, renorm=True)
    cm = bncompile.compile(build_model(cfg, [None, 300, 4], training=True, gradients=True), target="cuda")
    rules = {k: v for k, v in cm.info["kernels"].items() if k.startswith("bncompile_bn_grad")}
    assert rules and all(r.startswith("bwd_cuda_") for r in rules.values()), cm.info["kernels"]


def _draw_case(draw):
    """A random gradient model: rank 2-4, one axis or an axis list (the batch axis too), renorm with
    any clipping, ghost BN, adjustment inputs of a random broadcast shape, scale/center on or off, a
    non-trainable layer, static or dynamic batch."""
    from hypothesis import strategies as st

    rank = draw(st.integers(2, 4))
    ghost = draw(st.integers(0, 2)) == 0
    vbs = draw(st.sampled_from([2, 3])) if ghost else None
    batch = vbs * draw(st.integers(1, 3)) if vbs else draw(st.integers(2, 6))
    shape = [batch] + [draw(st.integers(1, 5)) for _ in range(rank - 1)]
    low = 1 if ghost else draw(st.sampled_from([0, 1, 1, 1]))
    axes = draw(st.lists(st.integers(low, rank - 1), min_size=1, max_size=2, unique=True))
    kw = dict(axis=axes[0] if len(axes) == 1 else sorted(axes), virtual_batch_size=vbs,
              scale=draw(st.booleans()), center=draw(st.booleans()), fused=draw(st.sampled_from([None, False])),
              trainable=draw(st.integers(0, 5)) > 0, epsilon=draw(st.sampled_from([1e-3, 1e-5])))
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(["rmax", "rmin", "dmax"]), unique=True))
        vals = {"rmax": draw(st.floats(1.0, 2.0)), "rmin": draw(st.floats(0.3, 1.0)), "dmax": draw(st.floats(0.0, 1.0))}
        kw.update(renorm=True, renorm_clipping={k: vals[k] for k in keys})
    adj_shape = None
    if not ghost and draw(st.booleans()):
        kw["adjustment"] = "inputs"
        adj_shape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    dynamic = 0 not in axes and draw(st.booleans())
    return kw, shape, dynamic, adj_shape, draw(st.integers(0, 2**31 - 1))


def test_random_gradient_models_compile_and_match_reference():
    """Random configs (hypothesis, derandomized, 20 examples): ``bncompile.compile`` of the gradient model
    against the float64 forward and backward references, at two batch sizes when the batch is dynamic."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(hypothesis.HealthCheck))
    @given(st.composite(_draw_case)())
    def check(case):
        kw, shape, dynamic, adj_shape, s = case
        rng = np.random.default_rng(s)
        cfg = BatchNormConfig(**kw)
        w = random_weights(cfg, shape, rng)
        build = [None] + shape[1:] if dynamic else shape
        cm = bncompile.compile(build_model(cfg, build, training=True, gradients=True, weights=w))
        rules = {k: v for k, v in cm.info["kernels"].items() if k.startswith("bncompile_bn_grad")}
        assert all(r.startswith("bwd_cpu_") for r in rules.values()), rules
        vbs = kw["virtual_batch_size"] or 1
        for batch in ([shape[0], shape[0] + 2 * vbs] if dynamic else [shape[0]]):
            run = [batch] + shape[1:]
            x = rng.normal(1.0, 2.0, run).astype(np.float32)
            dy = rng.normal(size=run).astype(np.float32)
            feeds = {"x": x, "dy": dy, **{k: v.astype(np.float32) for k, v in w.items() if k in cm.input_names}}
            adj = None
            if adj_shape is not None and "adjustment_scale" in cm.input_names:   # a non-trainable layer has none
                ashape = tuple(batch if i == 0 and d != 1 else d for i, d in enumerate(adj_shape))
                adj = (rng.uniform(0.9, 1.1, ashape).astype(np.float32),
                       rng.uniform(-0.1, 0.1, ashape).astype(np.float32))
                feeds["adjustment_scale"], feeds["adjustment_bias"] = adj
            out = cm.run(feeds)
            fwd = batchnorm(cfg, x, w, training=True, adjustment=adj)
            ref = batchnorm_backward(cfg, x, dy, w, training=True, adjustment=adj)
            where = f"{kw} build {build} run {run} adj {adj_shape}"
            assert_close(out["y"], fwd.y, TOL, f"y {where}")
            assert_close(out["dx"], ref.dx, TOL, f"dx {where}")
            for n in ("dgamma", "dbeta"):
                want = getattr(ref, n)
                if want is None:
                    assert n not in out, where
                else:
                    assert_close(out[n], want, TOL, f"{n} {where}")

    check()
