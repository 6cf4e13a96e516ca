"""``build_model(..., training=True, gradients=True)``: the backward of every training-mode variant in
ONNX (standard ops for plain and fused layers, ``ai.bncompile`` ``*Grad`` custom ops for renorm, ghost
and adjustment), run by onnxruntime with optimizations off, by ``onnx.reference`` with our OpRuns, and
inlined, against the float64 backward reference (itself checked against finite differences in
test_reference_backward.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncompile import BatchNormConfig, build_model, custom_ops
from bncompile.errors import ConfigError
from bncompile.reference import batchnorm_backward
from helpers import assert_close, ort_run
from helpers.bn import random_weights

# float64: the custom ops' epsilon is an ONNX float (float32) attribute, about 5e-8 off 1e-3
TOL = {"float32": 2e-4, "float64": 1e-6, "float16": 2e-2, "bfloat16": 1e-1}

VARIANTS = {
    "plain_nc": (dict(axis=-1, fused=False), [None, 6]),
    "plain_nchw": (dict(axis=1), [None, 3, 4, 5]),
    "fused_nhwc": (dict(axis=-1), [None, 4, 3, 5]),
    "fused_rank5": (dict(axis=1), [None, 2, 3, 2, 2]),
    "axis_list": (dict(axis=[1, 3]), [None, 2, 3, 4]),
    "axis_list_split": (dict(axis=[1, 3]), [None, 3, 2, 2, 2]),
    "axis_with_batch": (dict(axis=[0, 2]), [4, 3, 2]),
    "no_scale": (dict(axis=-1, scale=False), [None, 3, 3, 4]),
    "no_center_no_scale": (dict(axis=1, scale=False, center=False), [None, 3, 2]),
    "renorm": (dict(axis=-1, renorm=True), [None, 5]),
    "renorm_clipped": (dict(axis=1, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}),
                       [None, 3, 4]),
    "renorm_axis_list": (dict(axis=[1, 2], renorm=True), [None, 2, 3, 2]),
    "ghost": (dict(axis=-1, virtual_batch_size=2), [None, 4]),
    "ghost_nchw": (dict(axis=1, virtual_batch_size=4), [None, 3, 2, 2]),
    "ghost_renorm": (dict(axis=-1, virtual_batch_size=2, renorm=True, renorm_clipping={"rmax": 1.5}),
                     [None, 2, 3]),
    "adjustment": (dict(axis=-1, adjustment="inputs"), [None, 3, 4]),
    "adjustment_renorm": (dict(axis=1, adjustment="inputs", renorm=True), [None, 3, 2]),
    "non_trainable": (dict(axis=-1, trainable=False), [None, 4]),
}


def _feeds(cfg, model, shape, rng, dtype="float32", adj_shape=None):
    npd = {"float32": np.float32, "float64": np.float64, "float16": np.float16}.get(dtype)
    x = (rng.normal(size=shape) * 2 + 1)
    dy = rng.normal(size=shape)
    if dtype == "bfloat16":
        import ml_dtypes
        x, dy = x.astype(ml_dtypes.bfloat16), dy.astype(ml_dtypes.bfloat16)
    else:
        x, dy = x.astype(npd), dy.astype(npd)
    feeds = {"x": x, "dy": dy}
    adj = None
    if cfg.adjustment == "inputs":
        if adj_shape is None:
            adj_shape = tuple(shape[i] if i == cfg.resolve(len(shape)).axes[0] else 1 for i in range(len(shape)))
        adj = (rng.uniform(0.9, 1.1, adj_shape).astype(x.dtype), rng.uniform(-0.1, 0.1, adj_shape).astype(x.dtype))
        feeds["adjustment_scale"], feeds["adjustment_bias"] = adj
    return feeds, adj


def _check(cfg, build_shape, run_shape, rng, *, dtype="float32", transform=None, adj_shape=None):
    weights = random_weights(cfg, run_shape, rng)
    model = build_model(cfg, build_shape, training=True, gradients=True, dtype=dtype, weights=weights)
    onnx.checker.check_model(model, full_check=True)
    names = [o.name for o in model.graph.output]
    want_tail = ["dx"] + (["dgamma"] if cfg.scale else []) + (["dbeta"] if cfg.center else [])
    assert names[-len(want_tail):] == want_tail, names                 # after the existing outputs
    assert [i.name for i in model.graph.input][-1] == "dy"             # after the existing inputs
    if transform is not None:
        model = transform(model)
        onnx.checker.check_model(model, full_check=True)
    feeds, adj = _feeds(cfg, model, run_shape, rng, dtype, adj_shape)
    got = ort_run(model, feeds)
    variables = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    ref = batchnorm_backward(cfg, np.asarray(feeds["x"], np.float64), np.asarray(feeds["dy"], np.float64),
                             variables, training=True, adjustment=adj and tuple(np.asarray(a, np.float64) for a in adj),
                             dtype=dtype)
    tol = TOL[dtype]
    assert got["dx"].shape == tuple(run_shape) and got["dx"].dtype == feeds["x"].dtype
    assert_close(np.asarray(got["dx"], np.float64), ref.dx, tol, "dx")
    pshape = cfg.param_shape(run_shape)
    for name, want in (("dgamma", ref.dgamma), ("dbeta", ref.dbeta)):
        if want is None:
            assert name not in got
            continue
        assert got[name].shape == pshape, (name, got[name].shape, pshape)
        assert_close(np.asarray(got[name], np.float64), want, tol, name)
    return model, feeds, got


def _run_shape(build_shape, batch=4):
    return [batch if d is None else d for d in build_shape]


@pytest.mark.parametrize("case", list(VARIANTS))
def test_gradients_match_reference(case, rng):
    kw, shape = VARIANTS[case]
    _check(BatchNormConfig(**kw), shape, _run_shape(shape), rng)


@pytest.mark.parametrize("case", ["plain_nchw", "ghost", "renorm", "adjustment"])
def test_dynamic_batch_runs_at_several_sizes(case, rng):
    kw, shape = VARIANTS[case]
    model = build_model(BatchNormConfig(**kw), shape, training=True, gradients=True)
    for batch in (4, 8):
        _check(BatchNormConfig(**kw), shape, _run_shape(shape, batch), rng)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("case", ["plain_nc", "fused_nhwc", "renorm", "ghost"])
def test_gradients_in_other_dtypes(case, dtype, rng):
    kw, shape = VARIANTS[case]
    if dtype == "float64" and kw.get("fused") is None and case == "fused_nhwc":
        kw = {**kw, "fused": None}                   # a float64 layer never takes the fused path
    _check(BatchNormConfig(**kw), shape, _run_shape(shape), rng, dtype=dtype)


@pytest.mark.parametrize("adj_shape", [(4, 3, 4), (1, 1, 4), (4, 1, 1), (1, 3, 1)])
def test_adjustment_of_every_broadcast_shape(adj_shape, rng):
    _check(BatchNormConfig(axis=-1, adjustment="inputs"), [None, 3, 4], [4, 3, 4], rng, adj_shape=adj_shape)


@pytest.mark.parametrize("case", ["plain_nchw", "renorm_clipped", "ghost_renorm", "adjustment_renorm"])
def test_inlined_gradients_agree(case, rng):
    import bncompile

    kw, shape = VARIANTS[case]
    model, feeds, got = _check(BatchNormConfig(**kw), shape, _run_shape(shape), rng)
    flat = bncompile.inline(model)
    assert not flat.functions
    assert all(n.domain in ("", "ai.onnx") for n in flat.graph.node)
    again = ort_run(flat, feeds)
    for k in ("dx", "dgamma", "dbeta"):
        if k in got:
            assert_close(again[k], got[k], 1e-5, k)


@pytest.mark.parametrize("case", ["renorm", "ghost", "ghost_renorm", "adjustment", "adjustment_renorm"])
def test_onnx_reference_evaluator_runs_our_grad_ops(case, rng):
    from onnx.reference import ReferenceEvaluator

    kw, shape = VARIANTS[case]
    model, feeds, got = _check(BatchNormConfig(**kw), shape, _run_shape(shape), rng)
    assert any(n.op_type.endswith("Grad") and n.domain == custom_ops.DOMAIN for n in model.graph.node)
    ev = ReferenceEvaluator(model, new_ops=custom_ops.reference_ops())
    ref = dict(zip([o.name for o in model.graph.output], ev.run(None, feeds)))
    for k in ("dx", "dgamma", "dbeta"):
        if k in got:
            assert_close(ref[k], got[k], 1e-5, k)


def test_plain_and_fused_use_standard_ops_only(rng):
    for case in ("plain_nc", "fused_nhwc", "axis_list"):
        kw, shape = VARIANTS[case]
        model = build_model(BatchNormConfig(**kw), shape, training=True, gradients=True)
        assert not model.functions and all(n.domain == "" for n in model.graph.node), case


def test_forward_outputs_unchanged_by_gradients(rng):
    for case in ("fused_nhwc", "ghost_renorm"):
        kw, shape = VARIANTS[case]
        cfg = BatchNormConfig(**kw)
        w = random_weights(cfg, _run_shape(shape), rng)
        plain = build_model(cfg, shape, training=True, weights=w)
        grad = build_model(cfg, shape, training=True, weights=w, gradients=True)
        feeds, _ = _feeds(cfg, grad, _run_shape(shape), rng)
        a = ort_run(plain, {"x": feeds["x"]})
        b = ort_run(grad, feeds)
        for k, v in a.items():
            np.testing.assert_array_equal(v, b[k], err_msg=k)


def test_gradients_need_a_training_step():
    with pytest.raises(ConfigError, match="training=True"):
        build_model(BatchNormConfig(), [None, 3], training=False, gradients=True)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_configs(data, rng):
    rank = data.draw(st.integers(2, 4), "rank")
    shape = [data.draw(st.integers(1, 4), f"d{i}") for i in range(rank)]
    shape[0] = 4
    ghost = data.draw(st.booleans(), "ghost")
    axes = data.draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=2, unique=True), "axes")
    kw = dict(axis=axes if len(axes) > 1 else axes[0], renorm=data.draw(st.booleans(), "renorm"),
              center=data.draw(st.booleans(), "center"), scale=data.draw(st.booleans(), "scale"))
    if ghost:
        kw["virtual_batch_size"] = 2
    elif data.draw(st.booleans(), "adjust"):
        kw["adjustment"] = "inputs"
    build = [None] + shape[1:] if data.draw(st.booleans(), "dynamic") else shape
    _check(BatchNormConfig(**kw), build, shape, rng)
