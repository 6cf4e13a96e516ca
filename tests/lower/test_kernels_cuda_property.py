"""Issues 14 and 16 on a GPU: random configs through the CUDA kernels, forward and backward in one run,
against the float64 reference (skipped without a GPU; ``benchmarks/gpu_check.sh`` runs it on one).

Seeded NumPy draws rather than hypothesis, so that the cases split into independent test items that
``pytest -n`` spreads over the GPU machine's cores (each case compiles two CUDA modules with nvcc).
Two families: the small cases of every form (ranks 2-5, axis lists, ghost batches, adjustments of
every broadcast shape, renorm clipping subsets) and layouts large enough to take the fast rules
(``cuda_blocked``, ``bwd_cuda_two_phase``, ``cuda_block_per_channel``): wide planes, many channels,
channels last, odd sizes that leave partial vectors, thread blocks and chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from bncompile.config import BatchNormConfig
from bncompile.reference import batchnorm, batchnorm_backward
from helpers.bn_cases import training_step_inputs

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

TOL_Y = 5e-5        # float32, relative to max(1, |expected|)
TOL_GRAD = 1e-4
PARTS, PER_PART = 12, 6


def _clipping(rng):
    keys = [k for k in ("rmax", "rmin", "dmax") if rng.random() < 0.5]
    vals = {"rmax": rng.uniform(0.3, 3.0), "rmin": rng.uniform(0.1, 2.0), "dmax": rng.uniform(0.0, 2.0)}
    return {k: float(vals[k]) for k in keys} or None


def _small_case(rng):
    rank = int(rng.integers(2, 6))
    ghost = rng.random() < 0.3
    vbs = int(rng.choice([1, 2, 3])) if ghost else None
    n = vbs * int(rng.integers(1, 4)) if ghost else int(rng.integers(1, 6))
    shape = (n, *[int(rng.integers(1, 5)) for _ in range(rank - 1)])
    k = int(rng.integers(1, rank))
    axes = sorted(int(a) for a in rng.choice(np.arange(1, rank), size=min(k, rank - 1), replace=False))
    axis = axes[0] if len(axes) == 1 and rng.random() < 0.5 else axes
    return shape, axis, ghost, vbs


def _large_case(rng):
    form = rng.choice(["nchw", "nhwc", "nc", "rank3", "rank5", "ghost"])
    n = int(rng.choice([1, 2, 3, 8, 17, 32]))
    c = int(rng.choice([1, 3, 16, 64, 130, 300, 1030]))
    if form == "nc":
        return (n * 8, c), -1, False, None
    if form == "nchw":
        h, w = int(rng.choice([1, 4, 7, 14, 33])), int(rng.choice([5, 8, 28, 56]))
        return (n, min(c, 300), h, w), 1, False, None
    if form == "nhwc":
        h, w = int(rng.choice([1, 3, 7, 14])), int(rng.choice([2, 8, 28]))
        return (n, h, w, min(c, 300)), -1, False, None
    if form == "rank3":
        return (n, min(c, 300), int(rng.choice([32, 40, 100, 1000]))), 1, False, None
    if form == "rank5":
        return (n, 3, 4, min(c, 130), 9), 3, False, None
    vbs = int(rng.choice([2, 4]))
    return (vbs * int(rng.integers(1, 4)), min(c, 300), 6, 9), 1, True, vbs


def _case(part: int, i: int):
    rng = np.random.default_rng(1000 * part + i)
    shape, axis, ghost, vbs = (_large_case if (i % 2) else _small_case)(rng)
    renorm = rng.random() < 0.4
    adjust = not ghost and rng.random() < 0.3
    cfg = BatchNormConfig(axis=axis, renorm=renorm, renorm_clipping=_clipping(rng) if renorm else None,
                          momentum=float(rng.choice([0.0, 0.9, 0.99])), epsilon=float(rng.choice([1e-3, 1e-5])),
                          center=bool(rng.random() < 0.8), scale=bool(rng.random() < 0.8), fused=False,
                          virtual_batch_size=vbs, adjustment="inputs" if adjust else None)
    adj_shapes = None
    if adjust:
        def one():
            dims = tuple(d if rng.random() < 0.5 else 1 for d in shape)
            return dims[int(rng.integers(0, len(shape) + 1)):]
        adj_shapes = (one(), one())
    axes = axis if isinstance(axis, list) else [axis]
    dynamic = bool(rng.random() < 0.6) and 0 not in axes
    loc = float(rng.choice([0.0, 0.5, 30.0, 1e3]))
    return cfg, shape, dynamic, adj_shapes, loc, int(rng.integers(0, 2**31 - 1))


@pytest.mark.parametrize("part", range(0, PARTS, 2))
def test_random_cuda_sources_are_race_free(part):
    """Without a GPU (CI): the random cases compile for sm_90 and their CUDA source keeps the shared-
    memory invariants (helpers.cuda.check_cuda_source), forward and backward."""
    from bncompile.kernels import compile_batchnorm
    from bncompile.lower import tvm as _tvm
    from helpers.cuda import check_cuda_source

    for i in range(PER_PART):
        cfg, shape, dynamic, adj_shapes, _, _ = _case(part, i)
        k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape, target="cuda", gradients=True)
        check_cuda_source(_tvm.cuda_source(k.executable))
        check_cuda_source(_tvm.cuda_source(k._built_backward(k.spec.adjustment).executable))


@pytest.mark.gpu
@pytest.mark.parametrize("part", range(PARTS))
def test_random_cuda_kernels_match_reference(part):
    from bncompile.kernels import compile_batchnorm

    for i in range(PER_PART):
        cfg, shape, dynamic, adj_shapes, loc, s = _case(part, i)
        x, dy, variables, adj, feeds = training_step_inputs(cfg, shape, adj_shapes, loc, s)
        k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape, target="cuda", gradients=True)
        what = f"case {part}.{i}: {cfg} {shape} dynamic={dynamic} adj={adj_shapes} loc={loc} " \
               f"rules {k.schedule}/{k.backward_schedule}"
        out = k.run(feeds)
        x64 = x.astype(np.float64)
        ref = batchnorm(cfg, x64, variables, training=True, adjustment=adj)
        grads = batchnorm_backward(cfg, x64, dy.astype(np.float64), variables, training=True, adjustment=adj)
        checks = [("y", ref.y, TOL_Y)] + [(n + "_new", v, TOL_Y) for n, v in ref.variables.items()]
        checks += [(n, getattr(grads, n), TOL_GRAD) for n in ("dx", "dgamma", "dbeta")]
        for name, exp, tol in checks:
            if exp is None:
                continue
            exp = np.asarray(exp, np.float64)
            act = np.asarray(out[name], np.float64).reshape(exp.shape)
            assert np.isfinite(act).all(), f"{name}: non-finite values; {what}"
            scale = max(1.0, float(np.abs(exp).max()))
            np.testing.assert_allclose(act, exp, rtol=tol, atol=tol * scale, err_msg=f"{name}; {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,shape", [
    (BatchNormConfig(axis=1, fused=False), (None, 64, 14, 14)),
    (BatchNormConfig(axis=-1, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}), (None, 7, 7, 48)),
    (BatchNormConfig(axis=1, virtual_batch_size=2), (4, 16, 5, 5)),
    (BatchNormConfig(axis=-1, adjustment="inputs", fused=False), (None, 300)),
], ids=["nchw", "nhwc-renorm", "ghost", "nc-adjustment"])
def test_compile_training_step_on_cuda(cfg, shape):
    """A whole training step (forward and gradients) compiled for CUDA matches onnxruntime (optimizations
    off) running the built model."""
    import onnxruntime as ort

    import bncompile
    from bncompile.builder import build_model

    model = build_model(cfg, list(shape), training=True, gradients=True)
    cm = bncompile.compile(model, target="cuda")
    rng = np.random.default_rng(7)
    concrete = tuple(6 if d is None else d for d in shape)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        dims = [concrete[i] if i < len(concrete) and (d is None or isinstance(d, str)) else d
                for i, d in enumerate(inp.shape)]
        dims = [concrete[0] if not isinstance(d, int) else d for d in dims]
        base = 30.0 if inp.name == "x" else 0.0
        v = base + rng.normal(0, 1.5, dims)
        if "variance" in inp.name or "stddev" in inp.name or "scale" in inp.name or inp.name == "gamma":
            v = rng.uniform(0.7, 1.3, dims)
        feeds[inp.name] = v.astype(np.float32)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    got = cm.run(feeds)
    for name, exp in want.items():
        act = np.asarray(got[name], np.float64).reshape(exp.shape)
        scale = max(1.0, float(np.abs(exp).max()))
        np.testing.assert_allclose(act, exp, rtol=TOL_GRAD, atol=TOL_GRAD * scale, err_msg=name)
