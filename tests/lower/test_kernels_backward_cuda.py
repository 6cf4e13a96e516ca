"""CUDA backward kernels: codegen checks that need no GPU (the module imports a ``cuda`` module, the
pre-compile VerifyMemory check passes, nvcc turns the source into PTX where it is installed), numeric
checks against the float64 backward reference marked ``gpu``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers.cuda import check_cuda_source

from bncompile.config import BatchNormConfig

pytest.importorskip("tvm")

from bncompile.lower import tvm as _tvm  # noqa: E402
from bncompile.lower.kernels import backward, compile_batchnorm  # noqa: E402
from bncompile.lower.kernels.compute import make_spec  # noqa: E402
from bncompile.lower.kernels.schedules import schedule_backward  # noqa: E402

CUDA = {"kind": "cuda", "arch": "sm_90"}
HAS_NVCC = shutil.which("nvcc") is not None

CASES = [
    ("nchw-many-channels", BatchNormConfig(axis=1, fused=False), (4, 300, 3, 7), "bwd_cuda_two_phase"),
    ("nchw-renorm-dynamic", BatchNormConfig(axis=1, renorm=True, renorm_clipping={"rmax": 2.0}), (None, 300, 8),
     "bwd_cuda_two_phase"),
    ("ghost-static", BatchNormConfig(axis=1, virtual_batch_size=2, renorm=True), (8, 5, 3, 7),
     "bwd_cuda_block_per_channel"),
    ("nchw-few-channels", BatchNormConfig(axis=1), (None, 30, 5, 7), "bwd_cuda_two_phase"),
    ("nhwc", BatchNormConfig(axis=-1), (None, 5, 7, 30), "bwd_cuda_two_phase"),
    ("nc-renorm", BatchNormConfig(axis=-1, renorm=True, scale=False), (None, 1030), "bwd_cuda_two_phase"),
    ("nchw-wide", BatchNormConfig(axis=1, center=False), (None, 64, 28, 28), "bwd_cuda_two_phase"),
    ("ghost-symbolic", BatchNormConfig(axis=1, virtual_batch_size=2), (None, 5, 3, 7), "bwd_cuda_generic"),
    ("axis-list", BatchNormConfig(axis=(1, 3)), (2, 3, 4, 5), "bwd_cuda_generic"),
    ("adjust-full", BatchNormConfig(axis=1, adjustment="inputs"), (None, 300, 4), None),
    ("inference", BatchNormConfig(axis=1, trainable=False), (None, 300, 4), "bwd_cuda_generic"),
]


def _schedule(cfg, shape, adjustment=None):
    training = cfg.trainable
    spec = make_spec(cfg, shape, training=training, adjustment=adjustment)
    return spec, schedule_backward(spec, backward.backward_prim_func(spec), target=CUDA)


@pytest.mark.tvm
@pytest.mark.parametrize("cfg,shape,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cuda_backward_compiles_to_ptx(cfg, shape, rule):
    spec, (name, sch) = _schedule(cfg, shape, "full" if cfg.adjustment else None)
    if rule is not None:
        assert name == rule
    _tvm.verify_memory(sch.mod, CUDA)                  # no device buffer touched by host code
    ex = _tvm.build(sch.mod, CUDA)
    assert _tvm.imported_kinds(ex) == ["cuda"]
    src = _tvm.cuda_source(ex)
    assert "__global__" in src
    check_cuda_source(src)
    if name == "bwd_cuda_block_per_channel":
        assert "__shfl_down_sync" in src and "__shared__" in src and "__syncthreads" in src
    if HAS_NVCC:
        ptx = _tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx")
        assert b".target sm_90" in (ptx if isinstance(ptx, bytes) else str(ptx).encode())


@pytest.mark.tvm
def test_cuda_kernel_with_gradients_builds():
    k = compile_batchnorm(BatchNormConfig(axis=1, fused=False), (None, 300, 4, 4), target="cuda", gradients=True)
    assert k.backward_schedule == "bwd_cuda_two_phase"


needs_gpu = pytest.mark.skipif(not _tvm.cuda_available(), reason="no CUDA GPU")


@pytest.mark.gpu
@pytest.mark.tvm
@needs_gpu
@pytest.mark.parametrize("cfg,shape,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cuda_backward_numerics(cfg, shape, rule, monkeypatch):
    from bncompile.reference import batchnorm_backward

    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    concrete = tuple(8 if d is None else d for d in shape)
    rng = np.random.default_rng(0)
    x = rng.normal(1e2, 2.0, concrete).astype(np.float32)
    dy = rng.normal(0, 1.0, concrete).astype(np.float32)
    k = compile_batchnorm(cfg, shape, target="cuda", gradients=True)
    feeds = {"x": x, "dy": dy}
    adj = None
    if cfg.adjustment == "inputs":
        adj = (rng.uniform(0.9, 1.1, concrete[1:]), rng.uniform(-0.1, 0.1, concrete[1:]))
        feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
    out = k.run(feeds)
    ref = batchnorm_backward(cfg, x, dy, None, training=True, adjustment=adj)
    for n in ("dx", "dgamma", "dbeta"):
        r = getattr(ref, n)
        if r is None:                      # no scale (center): no dgamma (dbeta)
            assert n not in out
            continue
        np.testing.assert_allclose(out[n], r, rtol=1e-4, atol=1e-4 * max(1, np.abs(r).max()), err_msg=n)
