"""Issue 14: the TVM kernels against the float64 reference on the configs that broke them.

1. renorm with axis lists (split channel axes) compiled and ran;
2. adjustment inputs of every broadcastable shape, static and symbolic batch;
3. batch statistics exact to float32 rounding of the result whatever the ratio of mean to spread
   (compensated sums, float64 finalization, a coarse shift), in every CPU schedule; CUDA to PTX;
4. renorm_clipping with rmax < rmin accepted as Keras does (r = min(max(r, rmin), rmax) = rmax).
"""

from __future__ import annotations

import numpy as np
import pytest

from bncompile.config import BatchNormConfig
from bncompile.reference import batchnorm

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.lower import tvm as _tvm
from bncompile.kernels import compile_batchnorm
from bncompile.lower.kernels.compute import make_spec, prim_func
from bncompile.lower.kernels.schedules import schedule


def _close(actual, expected, tol=2e-5, what=""):
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64).reshape(expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def _run_and_check(cfg, shape, *, kshape=None, seed=0, adjustment=None, variables=None, tol=2e-5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 1.5 + 0.5).astype(np.float32)
    k = compile_batchnorm(cfg, kshape or shape)
    feeds = {"x": x, **(variables or {})}
    if adjustment is not None:
        feeds.update(adjustment_scale=adjustment[0], adjustment_bias=adjustment[1])
    out = k.run(feeds)
    ref = batchnorm(cfg, x.astype(np.float64), variables, training=True, adjustment=adjustment)
    _close(out["y"], ref.y, tol, "y")
    for n, v in ref.variables.items():
        _close(out[n + "_new"], v, tol, n)
    return k, out


# --------------------------------------------------------------------------- 1. renorm + axis lists

@pytest.mark.parametrize("axis,shape", [([1, 3], (2, 3, 4, 5)), ([0, 1], (2, 3, 4)), ([0, 2], (2, 3, 4)),
                                        ([1, 2], (3, 2, 4, 5)), ([-1, 1], (2, 3, 2, 4, 3))])
def test_renorm_with_axis_lists(axis, shape):
    cfg = BatchNormConfig(axis=axis, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1})
    _run_and_check(cfg, shape)
    cfg = BatchNormConfig(axis=axis, renorm=True)                     # no clipping: r, d unbounded
    _run_and_check(cfg, shape, seed=1)


# --------------------------------------------------------------------------- 2. adjustment shapes

def _adj_shapes(shape, axis):
    """Every broadcast shape class of an adjustment for x of ``shape`` with channel ``axis`` (an int)."""
    rank = len(shape)
    ax = axis % rank
    chan = tuple(shape[i] if i == ax else 1 for i in range(rank))
    out = [shape, chan, (shape[ax],) if ax == rank - 1 else chan, chan[1:], (1,), ()]
    out.append(tuple(shape[i] if i in (0, ax) else 1 for i in range(rank)))      # per sample and channel
    out.append(tuple(1 if i == ax else shape[i] for i in range(rank)))           # everything but the channel
    out.append((1,) + shape[1:])                                                  # per element, one sample
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("axis,shape", [(-1, (4, 2)), (1, (3, 4, 2, 5)), (-1, (2, 3, 4, 6))])
def test_adjustment_every_broadcast_shape(axis, shape, dynamic):
    rng = np.random.default_rng(7)
    cfg = BatchNormConfig(axis=axis, adjustment="inputs", renorm=True, renorm_clipping={"dmax": 0.5})
    kshape = (None,) + shape[1:] if dynamic else shape
    for ashape in _adj_shapes(shape, axis):
        adj = (rng.uniform(0.9, 1.1, ashape).astype(np.float32), rng.uniform(-0.1, 0.1, ashape).astype(np.float32))
        _run_and_check(cfg, shape, kshape=kshape, adjustment=adj)


def test_adjustment_dynamic_batch_runs_several_batches():
    cfg = BatchNormConfig(axis=-1, adjustment="inputs")
    rng = np.random.default_rng(3)
    for n in (1, 4, 9):
        for ashape in ((1, 2), (2,), (n, 2), (n, 1)):
            adj = (rng.uniform(0.9, 1.1, ashape).astype(np.float32), rng.uniform(-0.1, 0.1, ashape).astype(np.float32))
            _run_and_check(cfg, (n, 2), kshape=(None, 2), adjustment=adj, seed=n)


# --------------------------------------------------------------------------- 3. exact statistics

def _ulps(a, ref):
    """|a - ref| in units of the float32 spacing at ref."""
    ref = np.asarray(ref, np.float64)
    return np.abs(np.asarray(a, np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)


EXACT_CASES = [  # (config, shape, expected CPU schedule)
    (BatchNormConfig(axis=-1), (65536, 4), ("cpu_channels_last", "cpu_channel_stripes")),   # the host's choice
    (BatchNormConfig(axis=-1, fused=False), (16, 28, 28, 32), "cpu_channels_last_rows"),
    (BatchNormConfig(axis=1), (8, 16, 32, 32), "cpu_channel_first"),
    (BatchNormConfig(axis=1), (4096, 3, 5), "cpu_channel_first"),             # rfactor path (Q = 5)
    (BatchNormConfig(axis=1, virtual_batch_size=4), (4096, 3, 16), "cpu_channel_first"),
    (BatchNormConfig(axis=-1, virtual_batch_size=4), (4096, 24), "cpu_channels_last_ghost"),   # plain group sums
    (BatchNormConfig(axis=-1, virtual_batch_size=2), (4096, 2, 5), "cpu_channels_last_ghost"),
    (BatchNormConfig(axis=[1, 3]), (512, 3, 8, 5), "cpu_generic"),
]


@pytest.mark.parametrize("loc,scale", [(0.0, 100.0), (1e3, 1.0), (-3e4, 2.0)], ids=["spread", "mean1e3", "mean1e4"])
@pytest.mark.parametrize("cfg,shape,rule", EXACT_CASES, ids=[f"{c[2] if isinstance(c[2], str) else 'nc'}-{c[1]}" for c in EXACT_CASES])
def test_batch_mean_exact_to_float32_rounding(cfg, shape, rule, loc, scale, forced=None):
    cfg = BatchNormConfig(**{**cfg.__dict__, "momentum": 0.0})      # moving_mean_new is the batch mean
    x = (loc + scale * np.random.default_rng(11).standard_normal(shape)).astype(np.float32)
    k = compile_batchnorm(cfg, shape, schedule=forced)
    assert k.schedule in ((rule,) if isinstance(rule, str) else rule)
    out = k.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    # the mean: within 1 ulp of the result, plus 2**-28 of the spread for a mean near 0 (x - K rounds
    # randomly for |x| < |K|/2). The issue's case was 8e-4 off: 2**-28 * 100 is 3.7e-7.
    mean = ref.variables["moving_mean"]
    err = np.abs(out["moving_mean_new"] - mean)
    assert (err <= np.spacing(np.abs(mean).astype(np.float32)) + scale * 2.0 ** -28).all(), err
    # the variance: a few ulps (its float32 inputs x - K - mean' are rounded once each)
    assert _ulps(out["moving_variance_new"], ref.variables["moving_variance"]).max() <= 8.0
    # y: as exact as float32 normalization allows
    _close(out["y"], ref.y, 2e-6 * max(1.0, float(np.abs(ref.y).max())), "y")


@pytest.mark.parametrize("loc,scale", [(0.0, 100.0), (1e3, 1.0), (-3e4, 2.0)], ids=["spread", "mean1e3", "mean1e4"])
@pytest.mark.parametrize("shape", [(4096, 256), (65536, 4, 32)])
def test_channel_stripes_exact_to_float32_rounding(shape, loc, scale):
    """The channel stripes (asked for by name, whatever the host prefers): the same bounds."""
    test_batch_mean_exact_to_float32_rounding(BatchNormConfig(axis=-1), shape, "cpu_channel_stripes", loc, scale,
                                              forced="cpu_channel_stripes")


@pytest.mark.parametrize("shape,v,plain", [((None, 1024), 4, True), ((64, 2, 5), 2, True), ((None, 40), 1, True),
                                           ((64, 3, 5), 4, False), ((None, 40), 8, False), ((None, 4, 5), 8, False)])
def test_ghost_short_groups_sum_plainly(shape, v, plain):
    """Ghost channels-last groups of at most PLAIN_GROUP_MAX values per channel sum in plain float32 (the
    cases above bound their error); longer groups keep the compensated sums."""
    from bncompile.lower.kernels.schedules import cpu as scpu

    spec = make_spec(BatchNormConfig(axis=-1, virtual_batch_size=v), shape)
    name, sch = schedule(spec, prim_func(spec), target={"kind": "llvm"}, machine=scpu.cpu_machine())
    assert name == "cpu_channels_last_ghost"
    script = sch.mod.script()          # a compensated sum writes two buffers, <name>_v0 and <name>_v1
    assert ("sum_v1" in script) != plain and ("sqsum_v1" in script) != plain


def test_issue_case_mean_error():
    """The issue's numbers: 100*N(0, 1) of (65536, 4), momentum 0; was 8.0e-4 off, NumPy float32 2.9e-6."""
    cfg = BatchNormConfig(momentum=0.0)
    x = (100 * np.random.default_rng(0).standard_normal((65536, 4))).astype(np.float32)
    out = compile_batchnorm(cfg, (None, 4)).run({"x": x})
    exact = x.astype(np.float64).mean(axis=0)
    err = np.abs(out["moving_mean_new"] - exact)
    assert err.max() <= np.abs(x.mean(axis=0) - exact).max()
    assert (err <= np.spacing(np.abs(exact).astype(np.float32)) + 100 * 2.0 ** -28).all(), err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_statistics_exact(dtype):
    cfg = BatchNormConfig(axis=1, momentum=0.0, fused=False)
    x = (50 + 10 * np.random.default_rng(2).standard_normal((64, 3, 16, 16))).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        x = x.astype(ml_dtypes.bfloat16)
    else:
        x = x.astype(np.float16)
    out = compile_batchnorm(cfg, x.shape, dtype=dtype).run({"x": x})
    exact = x.astype(np.float64).mean(axis=(0, 2, 3))
    assert _ulps(out["moving_mean_new"], exact).max() <= 1.0


CUDA = {"kind": "cuda", "arch": "sm_90"}
CUDA_CASES = [(BatchNormConfig(axis=1), (None, 300, 3, 7), "cuda_block_per_channel"),
              (BatchNormConfig(axis=1), (None, 30, 3, 7), "cuda_two_phase"),
              (BatchNormConfig(axis=-1), (None, 5, 7, 30), "cuda_blocked"),
              (BatchNormConfig(axis=1), (None, 30, 5, 7), "cuda_blocked"),
              (BatchNormConfig(axis=(1, 3)), (2, 3, 4, 5), "cuda_generic")]


@pytest.mark.parametrize("cfg,shape,rule", CUDA_CASES, ids=[c[2] + str(c[1]) for c in CUDA_CASES])
def test_cuda_compensated_sums_compile_to_ptx(cfg, shape, rule):
    import shutil

    spec = make_spec(cfg, shape)
    name, sch = schedule(spec, prim_func(spec), target=CUDA)
    assert name == rule
    ex = _tvm.build(sch.mod, CUDA)
    src = _tvm.cuda_source(ex)
    assert "*(int *)(&" in src                                    # the compensation's bit casts survived
    assert "double" in src                                        # float64 finalization
    if shutil.which("nvcc"):
        ptx = _tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx")
        assert ".target sm_90" in (ptx.decode() if isinstance(ptx, bytes) else str(ptx))


# --------------------------------------------------------------------------- 4. rmax < rmin

@pytest.mark.parametrize("axis,shape", [(-1, (6, 4)), (1, (3, 4, 5, 2)), ([1, 3], (2, 3, 4, 5))])
def test_rmax_below_rmin_clips_to_rmax(axis, shape):
    clip = {"rmax": 0.5, "rmin": 2.0}
    cfg = BatchNormConfig(axis=axis, renorm=True, renorm_clipping=clip)
    assert cfg.renorm_clipping == clip
    _run_and_check(cfg, shape)
    # r is rmax wherever rmax < rmin: y = (xhat*rmax + d)*gamma + beta
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 1.5 + 0.5).astype(np.float32)
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    plain = batchnorm(BatchNormConfig(axis=axis, renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 0.5}),
                      x.astype(np.float64), training=True)
    np.testing.assert_allclose(ref.y, plain.y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loc,scale", [(0.0, 100.0), (1e3, 1.0), (-3e4, 2.0)], ids=["spread", "mean1e3", "mean1e4"])
@pytest.mark.parametrize("shape", [(512, 4, 14, 14), (64, 3, 17, 17), (300, 2, 1, 100)])
@pytest.mark.parametrize("ghost", [None, 4], ids=["plain", "ghost"])
def test_ragged_stat_lanes_exact_to_float32_rounding(monkeypatch, shape, loc, scale, ghost):
    """Channel-first rows that no multiple of the lanes divides (196, 289, 100) on whole-register lanes, the
    last vector of a row its last L values with the lanes counted before masked (compute.py's ragged lanes;
    x86 hosts take them for such rows, and here a 4-lane NEON host does too: ``RAGGED_LANES_MIN`` lowered):
    the same bounds as every other rule; ghost BN too (the lane blocks of each group's v rows, the batch
    mean from the groups' shifts and offsets in one float64 sum)."""
    from bncompile.lower.kernels import clear_cache
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "RAGGED_LANES_MIN", 4)
    clear_cache()
    try:
        assert cpu.ragged_stat_lanes(shape[-2] * shape[-1], cpu._machine(None)) > 0
        test_batch_mean_exact_to_float32_rounding(BatchNormConfig(axis=1, virtual_batch_size=ghost, fused=False),
                                                  shape, "cpu_channel_first", loc, scale)
    finally:
        clear_cache()
