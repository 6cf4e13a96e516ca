"""Sums and means in compiled models accumulate float32 in float64 (graph_schedules.legalize_sum/mean).

Found by a random differential test: the plain layer's backward is standard ops (``ReduceMean(x)``, then
centred sums); TVM's legalization added float32 in loop order, and over 533K values of mean 1000 a
compiled training step gave dx off by 76% while onnxruntime and bncompile's own kernels were exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import bncompile
from bncompile import BatchNormConfig, build_model
from bncompile.reference import batchnorm, batchnorm_backward
from helpers.compile_models import ort_run

pytestmark = pytest.mark.tvm


def test_plain_backward_large_mean_long_reduction():
    """(8, 3, 65536) about 1000 x its spread: 524K values per channel through the standard-op backward."""
    cfg = BatchNormConfig(axis=1, center=False, momentum=0.5)
    shape = (8, 3, 65536)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + 1000.0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    v = {k: a.astype(np.float32) for k, a in cfg.initial_variables(shape).items()}
    model = build_model(cfg, [None, 3, 65536], training=True, gradients=True)
    feeds = {"x": x, "dy": dy, **v}
    out = bncompile.compile(model).run({i.name: feeds[i.name] for i in model.graph.input})
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), v, training=True)
    fwd = batchnorm(cfg, x.astype(np.float64), v, training=True)
    for name, got, want in [("dx", out["dx"], ref.dx), ("dgamma", out["dgamma"], ref.dgamma),
                            ("y", out["y"], fwd.y)]:
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-5, (name, err)


def _reduce_model(op, axes, keepdims, shape, dtype=TensorProto.FLOAT):
    ins = ["x"]
    inits = []
    if axes is not None:
        inits.append(helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes))
        ins.append("axes")
    node = helper.make_node(op, ins, ["y"], keepdims=keepdims)
    g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", dtype, list(shape))],
                          [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([1], 0), ([-1, 0], 0), ([0, 2, 3], 1), (None, 0),
                                           (None, 1), ([3], 0)])
def test_reductions_match_onnxruntime(op, axes, keepdims):
    """Any axes, keepdims, a symbolic batch; long reductions (the batch, or >= WIDE_SUM_MIN values) are
    exact to one float32 rounding, short ones (global pooling) stay float32 sums."""
    from bncompile.lower.graph_schedules import WIDE_SUM_MIN

    dims = (5, 7, 1200)
    model = _reduce_model(op, axes, keepdims, ("N",) + dims)
    cm = bncompile.compile(model)
    for b in (1, 3):
        x = (np.random.default_rng(b).standard_normal((b,) + dims) * 3 + 100).astype(np.float32)
        got = cm.run({"x": x})["y"]
        want = ort_run(model, {"x": x})[0]
        assert got.shape == want.shape
        ax = None if axes is None else tuple(axes)
        ref = (x.astype(np.float64).sum if op == "ReduceSum" else x.astype(np.float64).mean)(
            axis=ax, keepdims=bool(keepdims))
        count = x.size // max(1, np.asarray(ref).size)
        long = ax is None or 0 in [a % 4 for a in ax] or count >= WIDE_SUM_MIN
        np.testing.assert_allclose(got, ref, rtol=2e-7 if long else 1e-5, atol=0)   # long: one rounding
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_integer_sum_keeps_tvm_legalization():
    model = _reduce_model("ReduceSum", [1], 0, (2, 6), TensorProto.INT64)
    x = np.arange(12, dtype=np.int64).reshape(2, 6) * 1000003
    got = bncompile.compile(model).run({"x": x})["y"]
    np.testing.assert_array_equal(got, x.sum(axis=1))


@pytest.mark.parametrize("kw,grads", [(dict(renorm=True, virtual_batch_size=2), False),
                                      (dict(adjustment="inputs"), False), (dict(renorm=True), True),
                                      (dict(), True)])
def test_inlined_models_with_a_free_batch_compile(kw, grads):
    """``bncompile inline`` expands the custom ops into their bodies (shifted means: a ReduceMax per
    channel); the result still compiles with a free batch and matches the float64 reference."""
    cfg = BatchNormConfig(axis=-1, **kw)
    model = bncompile.inline(build_model(cfg, [None, 4, 4, 8], training=True, gradients=grads))
    cm = bncompile.compile(model)
    shape = (6, 4, 4, 8)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 0.5 + 100).astype(np.float32)
    v = {k: a.astype(np.float32) for k, a in cfg.initial_variables(shape).items()}
    adj = None
    feeds = {"x": x, "dy": rng.standard_normal(shape).astype(np.float32), **v}
    if kw.get("adjustment"):
        adj = (np.full((1, 1, 1, 8), 1.1, np.float32), np.full((1, 1, 1, 8), -0.2, np.float32))
        feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
    out = cm.run({i.name: feeds[i.name] for i in model.graph.input})
    ref = batchnorm(cfg, x.astype(np.float64), v, training=True, adjustment=adj)
    assert np.abs(out["y"] - ref.y).max() / np.abs(ref.y).max() < 1e-5
    if grads:
        g = batchnorm_backward(cfg, x.astype(np.float64), feeds["dy"].astype(np.float64), v, training=True)
        assert np.abs(out["dx"] - g.dx).max() / np.abs(g.dx).max() < 1e-4
