"""``bncompile.compile`` on training steps with adjustment inputs of any broadcast shape (issue 14
item 2: a (1, C) adjustment with a dynamic batch used to read past its buffer; a static batch used to
ask for ``input_shapes``) and on training steps with gradients (issue 16: the backward compiles through
its inlined standard-op body), against the float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import bncompile
from bncompile import BatchNormConfig, build_model
from bncompile.reference import batchnorm, batchnorm_backward
from helpers import assert_close
from helpers.bn import random_weights

TOL = 2e-5


@pytest.mark.parametrize("batch_dim", [None, 4])
@pytest.mark.parametrize("adj_shape", [(1, 2), (4, 2), (4, 1), (1, 1)])
def test_adjustment_of_any_broadcast_shape(batch_dim, adj_shape, rng):
    cfg = BatchNormConfig(adjustment="inputs")
    cm = bncompile.compile(build_model(cfg, [batch_dim, 2], training=True))
    x = rng.normal(1.0, 2.0, (4, 2)).astype(np.float32)
    adj = (rng.uniform(0.9, 1.1, adj_shape).astype(np.float32), rng.uniform(-0.1, 0.1, adj_shape).astype(np.float32))
    out = cm.run({"x": x, "adjustment_scale": adj[0], "adjustment_bias": adj[1]})
    ref = batchnorm(cfg, x, training=True, adjustment=adj)
    assert_close(out["y"], ref.y, TOL, "y")
    for k, v in ref.variables.items():
        assert_close(out[f"{k}_new"], v, TOL, k)


def test_adjustment_rank4_per_channel_dynamic_batch(rng):
    cfg = BatchNormConfig(axis=-1, adjustment="inputs", renorm=True)
    cm = bncompile.compile(build_model(cfg, [None, 3, 3, 5], training=True))
    for batch in (2, 6):
        x = rng.normal(size=(batch, 3, 3, 5)).astype(np.float32)
        adj = (rng.uniform(0.9, 1.1, (1, 1, 1, 5)).astype(np.float32), np.full((1, 1, 1, 1), 0.05, np.float32))
        out = cm.run({"x": x, "adjustment_scale": adj[0], "adjustment_bias": adj[1]})
        assert_close(out["y"], batchnorm(cfg, x, training=True, adjustment=adj).y, TOL, f"y@{batch}")


GRAD_CASES = {
    "fused_nhwc": (dict(axis=-1), [None, 4, 4, 3]),
    "plain_nchw": (dict(axis=1, fused=False), [8, 3, 5]),
    "axis_list": (dict(axis=[1, 3]), [None, 2, 3, 2]),
    "renorm_clipped": (dict(axis=-1, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.2}), [8, 5]),
    "ghost": (dict(axis=-1, virtual_batch_size=2), [None, 3]),
    "ghost_renorm": (dict(axis=1, virtual_batch_size=4, renorm=True), [8, 3, 2]),
    "adjustment": (dict(axis=-1, adjustment="inputs"), [None, 4]),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_compile(case, rng):
    kw, shape = GRAD_CASES[case]
    cfg = BatchNormConfig(**kw)
    run = [8 if d is None else d for d in shape]
    w = random_weights(cfg, run, rng)
    cm = bncompile.compile(build_model(cfg, shape, training=True, gradients=True, weights=w))
    x = rng.normal(1.0, 2.0, run).astype(np.float32)
    dy = rng.normal(size=run).astype(np.float32)
    feeds = {"x": x, "dy": dy, **{k: v.astype(np.float32) for k, v in w.items()}}
    adj = None
    if cfg.adjustment == "inputs":
        adj = (rng.uniform(0.9, 1.1, (1, run[-1])).astype(np.float32),
               rng.uniform(-0.1, 0.1, (1, run[-1])).astype(np.float32))
        feeds["adjustment_scale"], feeds["adjustment_bias"] = adj
    out = cm.run(feeds)
    fwd = batchnorm(cfg, x, w, training=True, adjustment=adj)
    ref = batchnorm_backward(cfg, x, dy, w, training=True, adjustment=adj)
    assert_close(out["y"], fwd.y, TOL, "y")
    assert_close(out["dx"], ref.dx, 1e-4, "dx")
    assert_close(out["dgamma"], ref.dgamma, 1e-4, "dgamma")
    assert_close(out["dbeta"], ref.dbeta, 1e-4, "dbeta")


@pytest.mark.parametrize("bad", [(3, 2), (1, 5), (4, 3), (2, 1)])
def test_adjustment_that_does_not_broadcast_is_refused(bad, rng, tmp_path):
    """A feed that does not broadcast against x is refused with the dimension and the fix (onnxruntime
    refuses it too), by the compiled model and by one exported and loaded again (the check travels in
    the metadata); shapes that broadcast still run."""
    from bncompile.errors import InputError

    cfg = BatchNormConfig(adjustment="inputs")
    cm = bncompile.compile(build_model(cfg, [None, 2], training=True))
    loaded = bncompile.load(cm.export(tmp_path / "bn.so"))
    x = rng.normal(size=(4, 2)).astype(np.float32)
    good = np.full((1, 2), 0.1, np.float32)
    for model in (cm, loaded):
        for which in ("adjustment_scale", "adjustment_bias"):
            feeds = {"x": x, "adjustment_scale": good + 1, "adjustment_bias": good, which: np.ones(bad, np.float32)}
            with pytest.raises(InputError, match=rf"input '{which}': shape \({bad[0]}, {bad[1]}\) does not "
                                                 r"broadcast: dimension \d is \d, broadcast against \d.*give 1 or \d"):
                model.run(feeds)
        adj = (np.ones((4, 1), np.float32), good)
        out = model.run({"x": x, "adjustment_scale": adj[0], "adjustment_bias": adj[1]})
        assert_close(out["y"], batchnorm(cfg, x, training=True, adjustment=adj).y, TOL, "y")
