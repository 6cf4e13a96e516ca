"""Issue 16 item 3: the backward kernels (``compile_batchnorm(..., gradients=True)``) against the float64
backward reference (``bncompile.reference.batchnorm_backward``, itself checked against finite
differences), for every variant, axis form, static and dynamic batch; the NumPy twin; the schedule
rules; the pre-bound backward; the errors."""

from __future__ import annotations

import numpy as np
import pytest

from bncompile.config import BatchNormConfig, RandomAdjustment
from bncompile.errors import InputError
from bncompile.reference import batchnorm, batchnorm_backward
from helpers import assert_close

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.kernels import compile_batchnorm  # noqa: E402
from bncompile.lower import tvm as _tvm  # noqa: E402

TOL = 2e-5     # float32 gradients against float64

# (config, kernel input shape (None: dynamic batch), run shape, adjustment shape, expected backward rule)
CASES = {
    "nchw": (dict(axis=1), (None, 8, 6, 32), (4, 8, 6, 32), None, "bwd_cpu_channel_first"),
    "nchw_static_odd": (dict(axis=1, fused=False), (3, 5, 7, 9), (3, 5, 7, 9), None, "bwd_cpu_channel_first"),
    # rows of 9216: several plain lane blocks per row (blocked reduction, M < Q/L)
    "nchw_long_rows": (dict(axis=1), (None, 2, 96, 96), (3, 2, 96, 96), None, "bwd_cpu_channel_first"),
    "nhwc": (dict(axis=-1), (None, 5, 6, 24), (4, 5, 6, 24), None, "bwd_cpu_channels_last"),
    "nhwc_static": (dict(axis=-1), (4, 5, 6, 24), (4, 5, 6, 24), None, "bwd_cpu_channels_last"),
    "nc_wide": (dict(axis=-1, fused=False), (None, 300), (64, 300), None, "bwd_cpu_channels_last"),
    # per-sample partials (64+ rows a sample) over several channel stripes (80 channels: 16 a stripe on
    # AVX2 and AVX-512), walked row by row
    "nhwc_partials_stripes": (dict(axis=-1), (None, 8, 8, 80), (3, 8, 8, 80), None, "bwd_cpu_channels_last"),
    "nhwc_partials_renorm": (dict(axis=-1, renorm=True, renorm_clipping={"rmax": 1.3, "dmax": 0.4}),
                             (None, 9, 8, 48), (4, 9, 8, 48), None, "bwd_cpu_channels_last"),
    "rank5": (dict(axis=1), (None, 3, 2, 4, 5), (2, 3, 2, 4, 5), None, "bwd_cpu_channel_first"),
    "renorm_clipped": (dict(axis=-1, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}),
                       (None, 5), (8, 5), None, "bwd_cpu_channels_last"),
    "renorm_nchw": (dict(axis=1, renorm=True, renorm_clipping={"rmax": 1.5}), (None, 4, 3, 8), (6, 4, 3, 8),
                    None, "bwd_cpu_channel_first"),
    "ghost_nchw": (dict(axis=1, virtual_batch_size=2), (None, 3, 2, 16), (4, 3, 2, 16), None,
                   "bwd_cpu_channel_first"),
    "ghost_static_renorm": (dict(axis=1, virtual_batch_size=4, renorm=True, renorm_clipping={"dmax": 0.2}),
                            (8, 3, 4), (8, 3, 4), None, "bwd_cpu_channel_first"),
    "ghost_channels_last": (dict(axis=-1, virtual_batch_size=2), (None, 3), (6, 3), None, "bwd_cpu_channels_last"),
    # ghost channels-last with more channels than one stripe (tasks: groups x stripes), and with renorm
    # (r and d from every group: the dx pass as tasks of its own)
    "ghost_nhwc_wide": (dict(axis=-1, virtual_batch_size=2), (None, 3, 160), (6, 3, 160), None,
                        "bwd_cpu_channels_last"),
    "ghost_nhwc_renorm": (dict(axis=-1, virtual_batch_size=2, renorm=True,
                               renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.5}),
                          (None, 2, 2, 48), (6, 2, 2, 48), None, "bwd_cpu_channels_last"),
    "ghost_nc_static": (dict(axis=-1, virtual_batch_size=4), (16, 96), (16, 96), None, "bwd_cpu_channels_last"),
    # short groups: a task per stripe of channels walking every group (9 groups, a free batch; 5 groups
    # of 3 samples x 2 rows, no dgamma and dbeta to sum)
    "ghost_nc_walk": (dict(axis=-1, virtual_batch_size=4), (None, 48), (36, 48), None, "bwd_cpu_channels_last"),
    "ghost_nc_walk_bare": (dict(axis=-1, virtual_batch_size=3, scale=False, center=False), (None, 2, 32),
                           (15, 2, 32), None, "bwd_cpu_channels_last"),
    "axis_list": (dict(axis=[1, 3]), (None, 3, 4, 5), (2, 3, 4, 5), None, "bwd_cpu_generic"),
    "axis_list_renorm": (dict(axis=[1, 2], renorm=True), (None, 2, 3, 2), (4, 2, 3, 2), None,
                         "bwd_cpu_channel_first"),
    "axis_with_batch": (dict(axis=[0, 2]), (4, 3, 2), (4, 3, 2), None, "bwd_cpu_generic"),
    "no_scale": (dict(axis=1, scale=False), (None, 3, 5), (4, 3, 5), None, None),
    "no_center_no_scale": (dict(axis=-1, scale=False, center=False), (None, 3, 4), (4, 3, 4), None, None),
    "non_trainable": (dict(axis=-1, trainable=False), (None, 3), (4, 3), None, "bwd_cpu_generic"),
    "adjust_channel": (dict(axis=1, adjustment="inputs"), (None, 3, 16), (4, 3, 16), (1, 3, 1), None),
    "adjust_channel_1d": (dict(axis=-1, adjustment="inputs"), (None, 3, 4), (4, 3, 4), (4,), None),
    "adjust_full": (dict(axis=1, adjustment="inputs", renorm=True), (None, 3, 16), (4, 3, 16), (4, 1, 16), None),
    "adjust_full_nhwc": (dict(axis=-1, adjustment="inputs"), (None, 3, 4), (4, 3, 4), (3, 4), None),
    "adjust_scalar": (dict(axis=-1, adjustment="inputs"), (None, 6), (4, 6), (1, 1), None),
    "random_adjustment": (dict(axis=-1, adjustment=RandomAdjustment(seed=3)), (None, 3, 4), (4, 3, 4), None, None),
}


def random_variables(cfg, shape, rng, loc=0.0):
    out = {}
    for k, v in cfg.initial_variables(shape).items():
        if k in ("moving_variance", "moving_stddev", "renorm_stddev", "gamma"):
            out[k] = v * rng.uniform(0.7, 1.3, v.shape)
        else:
            out[k] = v + loc + rng.normal(0, 0.2, v.shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def _run_case(name, *, loc=1.0, batch=None):
    kw, kshape, shape, ashape, rule = CASES[name]
    if batch is not None:
        shape = (batch,) + tuple(shape[1:])
    cfg = BatchNormConfig(**kw)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    k = compile_batchnorm(cfg, kshape, gradients=True)
    x = (loc + 2 * rng.normal(size=shape)).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    w = random_variables(cfg, shape, rng, loc if loc < 100 else 0.0)
    feeds = {"x": x, "dy": dy, **w}
    adj = None
    if ashape:
        adj = (rng.uniform(0.9, 1.1, ashape).astype(np.float32), rng.uniform(-0.1, 0.1, ashape).astype(np.float32))
        feeds["adjustment_scale"], feeds["adjustment_bias"] = adj
    out = k.run(feeds)
    if isinstance(cfg.adjustment, RandomAdjustment):
        bshape = cfg.resolve(len(shape)).broadcast_shape(shape)
        adj = (out["adjustment_scale"].reshape(bshape), out["adjustment_bias"].reshape(bshape))
    return cfg, k, feeds, out, adj, rule


@pytest.mark.parametrize("name", list(CASES))
def test_backward_kernel_matches_reference(name):
    cfg, k, feeds, out, adj, rule = _run_case(name)
    x, dy = feeds["x"], feeds["dy"]
    w = {n: v for n, v in feeds.items() if n not in ("x", "dy", "adjustment_scale", "adjustment_bias")}
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), w, training=True, adjustment=adj)
    fwd = batchnorm(cfg, x.astype(np.float64), w, training=True, adjustment=adj)
    assert_close(out["y"], fwd.y, TOL, "y")                       # the forward still runs with dy given
    assert out["dx"].shape == x.shape and out["dx"].dtype == np.float32
    assert_close(out["dx"], ref.dx, TOL, "dx")
    pshape = cfg.param_shape(x.shape)
    for n, want in (("dgamma", ref.dgamma), ("dbeta", ref.dbeta)):
        if want is None:
            assert n not in out
            continue
        assert out[n].shape == pshape, (n, out[n].shape, pshape)
        assert_close(out[n], want, TOL, n)
    if rule is not None:
        assert k.backward_schedule == rule
    twin = k.numpy_twin({**feeds, **({"adjustment_scale": adj[0], "adjustment_bias": adj[1]} if adj else {})})
    for n in ("dx", "dgamma", "dbeta"):
        if n in out:
            assert_close(twin[n], out[n], TOL, f"twin {n}")


@pytest.mark.parametrize("name", ["nchw", "nhwc", "ghost_nchw", "renorm_clipped", "adjust_full_nhwc",
                                  "ghost_nhwc_wide", "ghost_nhwc_renorm", "nhwc_partials_stripes"])
def test_dynamic_batch_sizes(name):
    for batch in (2, 8):
        if name.startswith("ghost") and batch % 2:
            continue
        cfg, k, feeds, out, adj, _ = _run_case(name, batch=batch)
        w = {n: v for n, v in feeds.items() if n not in ("x", "dy", "adjustment_scale", "adjustment_bias")}
        ref = batchnorm_backward(cfg, feeds["x"], feeds["dy"], w, training=True, adjustment=adj)
        assert_close(out["dx"], ref.dx, TOL, f"dx@{batch}")


@pytest.mark.parametrize("name", ["nchw", "nhwc", "ghost_nchw", "nchw_long_rows", "ghost_nhwc_wide",
                                  "nhwc_partials_stripes"])
def test_large_mean(name):
    """Mean 1e3 x the spread: the one-pass statistics about the data shift stay exact enough."""
    cfg, k, feeds, out, adj, _ = _run_case(name, loc=2e3)
    w = {n: v for n, v in feeds.items() if n not in ("x", "dy")}
    ref = batchnorm_backward(cfg, feeds["x"], feeds["dy"], w, training=True)
    assert_close(out["dx"], ref.dx, 1e-4, "dx")
    assert_close(out["dgamma"], ref.dgamma, 1e-4, "dgamma")


def test_bind_backward_matches_run():
    cfg, k, feeds, out, _, _ = _run_case("nchw")
    tvm = _tvm.tvm()
    tf = {n: tvm.runtime.tensor(np.ascontiguousarray(v)) for n, v in feeds.items() if n in ("x", "dy", "gamma")}
    call, res = k.bind_backward(tf)
    call()
    for n in ("dx", "dgamma", "dbeta"):
        np.testing.assert_array_equal(res[n].numpy(), out[n])


def test_dy_errors():
    cfg = BatchNormConfig(axis=-1)
    k = compile_batchnorm(cfg, (None, 4))
    x = np.ones((2, 4), np.float32)
    with pytest.raises(InputError, match="without gradients"):
        k.run({"x": x, "dy": x})
    kg = compile_batchnorm(cfg, (None, 4), gradients=True)
    with pytest.raises(InputError, match="shape of y"):
        kg.run({"x": x, "dy": np.ones((2, 3), np.float32)})
    assert "dx" not in kg.run({"x": x})                       # no dy: the forward alone


def test_cpu_backward_schedules_have_no_predicates():
    """Every split divides its loop (tvm-0.27.md §2: a moved block loses its T.where predicate)."""
    from bncompile.lower.kernels import backward, schedules
    from bncompile.lower.kernels.compute import make_spec

    for name in ("nchw_static_odd", "nchw", "nhwc", "nc_wide", "ghost_nchw", "ghost_channels_last",
                 "ghost_nhwc_wide", "ghost_nhwc_renorm", "ghost_nc_static", "ghost_nc_walk", "ghost_nc_walk_bare"):
        kw, kshape, *_ = CASES[name]
        spec = make_spec(BatchNormConfig(**kw), kshape)
        rule, sch = schedules.schedule_backward(spec, backward.backward_prim_func(spec), target="llvm")
        assert rule.startswith("bwd_cpu_"), rule
        assert "T.where" not in sch.mod.script(), name


@pytest.mark.parametrize("name,lanes", [("nchw", 32), ("ghost_nchw", 32), ("nchw_long_rows", 32),
                                        ("rank5", 8)])
def test_channel_first_uses_lane_blocks(name, lanes):
    """bwd_cpu_channel_first reduces through plain lane blocks (``bsum``, vectorized over L lanes)
    folded into compensated totals; the target is pinned (haswell: 8 float32 lanes) so the lane count
    is the same on AVX2 and AVX-512 hosts."""
    from bncompile.lower.kernels import backward, schedules
    from bncompile.lower.kernels.compute import make_spec

    kw, kshape, *_ = CASES[name]
    spec = make_spec(BatchNormConfig(**kw), kshape)
    rule, sch = schedules.schedule_backward(spec, backward.backward_prim_func(spec),
                                            target={"kind": "llvm", "mcpu": "haswell"})
    assert rule == "bwd_cpu_channel_first"
    script = sch.mod.script()
    assert 'T.sblock("bsum_update")' in script and "T.where" not in script
    assert f"T.vectorized({lanes})" in script


def test_lane_block_sizes():
    from bncompile.lower.kernels import backward

    assert backward.lane_block(3136, 64) == 49
    assert backward.lane_block(9216, 32) == 48          # 288 elements per lane: 6 blocks of 48
    assert backward.lane_block(63, 21) == 3
    assert backward.lane_block(64 * 67, 64) == 67        # a prime: the whole row lane (<= 4 x LANE_BLOCK)
    assert backward.lane_block(16 * 257, 16) == 1        # a larger prime: blocks of one (exact, slow)


def test_cache_sizes_come_from_the_os():
    from bncompile.lower.kernels.schedules import backward_cpu

    from bncompile.lower.kernels.schedules.machine import cpu_machine

    sizes = backward_cpu.cache_sizes()
    assert 2 in sizes and sizes[2] >= 64 * 1024
    assert backward_cpu.l2_bytes() == sizes[2] == cpu_machine().l2
