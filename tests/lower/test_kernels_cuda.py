"""CUDA kernels: codegen checks that need no GPU, numeric checks marked ``gpu``.

Without a GPU each CUDA schedule is compiled for {"kind": "cuda", "arch": "sm_90"}; the built module
must import a ``cuda`` module (an unscheduled function silently compiles into host code), the
pre-compile VerifyMemory check must pass, and nvcc (when on PATH) must turn the source into PTX.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from helpers.cuda import check_cuda_source

from bncompile.config import BatchNormConfig

from bncompile.lower import tvm as _tvm  # noqa: E402
from bncompile.lower.kernels import build_spec, compile_batchnorm  # noqa: E402
from bncompile.lower.kernels.compute import make_spec, prim_func  # noqa: E402
from bncompile.lower.kernels import backward  # noqa: E402
from bncompile.lower.kernels.schedules import schedule, schedule_backward  # noqa: E402

CUDA = {"kind": "cuda", "arch": "sm_90"}
HAS_NVCC = shutil.which("nvcc") is not None

CASES = [
    # (id, config, input shape, expected rule)
    ("nchw-many-channels", BatchNormConfig(axis=1, fused=False), (4, 300, 3, 7), "cuda_block_per_channel"),
    ("nchw-few-channels", BatchNormConfig(axis=1), (None, 30, 5, 7), "cuda_blocked"),
    ("nchw-wide-planes", BatchNormConfig(axis=1, renorm=True), (None, 64, 28, 28), "cuda_blocked"),
    ("nchw-rows-per-block", BatchNormConfig(axis=2, fused=False), (None, 6, 5, 40), "cuda_blocked"),
    ("nhwc", BatchNormConfig(axis=-1), (None, 5, 7, 30), "cuda_blocked"),
    ("nc", BatchNormConfig(axis=-1, fused=False), (None, 1024), "cuda_blocked"),
    ("nc-odd", BatchNormConfig(axis=-1, fused=False, adjustment="inputs"), (None, 1030), "cuda_blocked"),
    ("nchw-short-rows", BatchNormConfig(axis=1), (None, 30, 3, 7), "cuda_two_phase"),
    ("renorm-adjust", BatchNormConfig(axis=1, renorm=True, renorm_clipping={"rmin": 0.5, "dmax": 1.0},
                                      adjustment="inputs"), (4, 30, 3, 7), "cuda_two_phase"),
    ("ghost-static", BatchNormConfig(axis=1, virtual_batch_size=2, renorm=True), (8, 5, 3, 7),
     "cuda_block_per_channel"),
    ("ghost-symbolic", BatchNormConfig(axis=1, virtual_batch_size=2), (None, 5, 3, 7), "cuda_generic"),
    ("axis-list", BatchNormConfig(axis=(1, 3)), (2, 3, 4, 5), "cuda_generic"),
    ("batch-axis", BatchNormConfig(axis=0), (5, 3), "cuda_generic"),
]


def _schedule(cfg, shape, *, training=True, adjustment=None):
    spec = make_spec(cfg, shape, training=training, adjustment=adjustment)
    return spec, schedule(spec, prim_func(spec), target=CUDA)


@pytest.mark.tvm
@pytest.mark.parametrize("cfg,shape,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cuda_schedule_compiles_and_verifies(cfg, shape, rule):
    spec, (name, sch) = _schedule(cfg, shape)
    assert name == rule
    _tvm.verify_memory(sch.mod, CUDA)                     # no device buffer touched by host code
    ex = _tvm.build(sch.mod, CUDA)
    assert _tvm.imported_kinds(ex) == ["cuda"]
    src = _tvm.cuda_source(ex)
    assert "__global__" in src
    check_cuda_source(src)
    if rule == "cuda_blocked":
        assert src.count("__global__") <= 2 * 4 + 2      # declarations and definitions: a few kernels, not one per block
    if rule in ("cuda_block_per_channel",) or (rule == "cuda_two_phase" and spec.shape[-1] != 1):
        assert "__shfl_down_sync" in src                  # warp-shuffle reductions
    if rule == "cuda_block_per_channel":
        assert "__shared__" in src and "__syncthreads" in src
    if HAS_NVCC:
        ptx = _tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx")
        text = ptx.decode() if isinstance(ptx, bytes) else str(ptx)
        assert ".target sm_90" in text


@pytest.mark.tvm
def test_cuda_full_adjustment_and_inference_compile():
    cfg = BatchNormConfig(axis=-1, adjustment="inputs")
    for spec_kw in ({"adjustment": "full"}, {"training": False}):
        spec, (name, sch) = _schedule(cfg, (None, 4, 6, 16), **spec_kw)
        _tvm.verify_memory(sch.mod, CUDA)
        ex = _tvm.build(sch.mod, CUDA)
        assert _tvm.imported_kinds(ex) == ["cuda"], name


@pytest.mark.tvm
def test_unscheduled_cuda_function_is_caught():
    """The guard the schedules are checked with really fails on host-only code."""
    spec = make_spec(BatchNormConfig(axis=1), (2, 3, 4, 4))
    func = prim_func(spec)
    with pytest.raises(Exception, match="Memory verification failed|directly accessed by host memory"):
        _tvm.verify_memory(func, CUDA)
    ex = _tvm.build(func, CUDA)
    assert _tvm.imported_kinds(ex) == []


@pytest.mark.tvm
def test_build_spec_refuses_host_only_cuda(monkeypatch):
    from bncompile.errors import UnsupportedError
    from bncompile.lower.kernels import schedules

    spec = make_spec(BatchNormConfig(axis=1), (2, 3, 4, 4), adjustment=None)
    monkeypatch.setattr(schedules, "RULES", {**schedules.RULES, "cuda": []})
    with pytest.raises(UnsupportedError, match="no CUDA kernel"):
        build_spec(spec, target=CUDA, schedule=None)


# --------------------------------------------------------------------------- numeric, on a GPU

needs_gpu = pytest.mark.skipif(not _tvm.cuda_available(), reason="no CUDA GPU")


@pytest.mark.gpu
@pytest.mark.tvm
@needs_gpu
@pytest.mark.parametrize("cfg,shape,rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cuda_numerics(cfg, shape, rule, monkeypatch):
    from bncompile.reference import batchnorm

    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    concrete = tuple(8 if d is None else d for d in shape)
    rng = np.random.default_rng(0)
    x = rng.normal(1e3, 2.0, concrete).astype(np.float32)
    k = compile_batchnorm(cfg, shape, target="cuda")
    assert k.schedule == rule
    feeds = {"x": x}
    adj = None
    if cfg.adjustment == "inputs":
        ax = cfg.axis[0] % len(concrete) if isinstance(cfg.axis, (list, tuple)) else cfg.axis % len(concrete)
        per_channel = tuple(d if i == ax else 1 for i, d in enumerate(concrete))
        adj = (rng.uniform(0.9, 1.1, per_channel), rng.uniform(-0.1, 0.1, per_channel[1:]))
        feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
    out = k.run(feeds)
    ref = batchnorm(cfg, x, None, training=True, adjustment=adj)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5 * max(1, np.abs(ref.y).max()))
    for n in cfg.updated_variable_names():
        r = ref.variables[n]
        np.testing.assert_allclose(out[n + "_new"], r, rtol=1e-5, atol=1e-5 * max(1, np.abs(r).max()), err_msg=n)


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_compiles(dtype):
    k = compile_batchnorm(BatchNormConfig(axis=1, fused=False), (None, 300, 4, 4), target="cuda", dtype=dtype)
    assert k.schedule == "cuda_block_per_channel"
    src = _tvm.cuda_source(k.executable)
    if HAS_NVCC:
        ptx = _tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx")
        assert b".target sm_90" in (ptx if isinstance(ptx, bytes) else str(ptx).encode())


@pytest.mark.tvm
def test_compile_batchnorm_for_cuda_without_gpu():
    cfg = BatchNormConfig(axis=-1, renorm=True, adjustment="random")
    k = compile_batchnorm(cfg, (None, 8, 8, 32), target="cuda")
    assert k.target == {"kind": "cuda", "arch": "sm_90"}
    assert _tvm.imported_kinds(k.executable) == ["cuda"]
    assert k.output_names[-2:] == ["adjustment_scale", "adjustment_bias"]


@pytest.mark.tvm
@pytest.mark.parametrize("cfg,shape", [
    (BatchNormConfig(axis=-1, fused=False), (None, 1031)),        # channel stripes of one thread
    (BatchNormConfig(axis=-1, fused=False), (None, 2, 514)),      # partial sums: stripes of 2 threads
    (BatchNormConfig(axis=1, fused=False), (None, 70000, 32)),    # more channels than blockIdx.y allows
], ids=["nc-prime", "nhwc-514", "grid-y"])
def test_cuda_fast_rules_decline_awkward_channel_counts(cfg, shape):
    spec = make_spec(cfg, shape)
    name, _ = schedule(spec, prim_func(spec), target=CUDA)
    if shape[-1] == 514:
        assert name == "cuda_blocked"          # the forward's stripes hold all 514 channels
        bname, _ = schedule_backward(spec, backward.backward_prim_func(spec), target=CUDA)
        assert bname != "bwd_cuda_two_phase"
    else:
        assert name not in ("cuda_blocked", "cuda_two_phase"), name


def _kernels(src: str) -> list[str]:
    """The kernel definitions of a CUDA source, each from its signature to its closing brace."""
    out = []
    for m in re.finditer(r'extern "C" __global__ void[^;{]*\{', src):
        end = src.index("\n}", m.end())
        out.append(src[m.start():end + 2])
    return out


@pytest.mark.tvm
@pytest.mark.parametrize("cfg,shape", [
    (BatchNormConfig(axis=1), (None, 64, 7, 9)),
    (BatchNormConfig(axis=1, renorm=True, adjustment="inputs"), (3, 40, 33)),
    (BatchNormConfig(axis=-1), (None, 5, 7, 30)),
    (BatchNormConfig(axis=-1, fused=False), (None, 1030)),
], ids=["nchw", "ncl-renorm-adjust", "nhwc", "nc"])
def test_cuda_blocked_forward_is_three_kernels_with_register_sums(cfg, shape, monkeypatch):
    """cuda_blocked's forward: statistics, one per-channel kernel (both combining reductions, merged
    loops), y. Channels last, each thread's serial block sums accumulate in registers and are stored
    once; with the two switches off, the previous form (four kernels, sums in their global outputs)."""
    from bncompile.lower.kernels.schedules import cuda

    def build():
        spec, (name, sch) = _schedule(cfg, shape)
        assert name == "cuda_blocked"
        src = _tvm.cuda_source(_tvm.build(sch.mod, CUDA))
        check_cuda_source(src)
        return spec, _kernels(src)

    spec, kernels = build()
    assert len(kernels) == 3
    stats = kernels[0]
    if spec.shape[-1] == 1:                    # channels last: thread-serial sums
        assert "bsum_v0_local" in stats and "bm2_v0_local" in stats
        assert not re.search(r"bsum_v0_ptr\[[^\]]+\] = [^;]*bsum_v0_ptr\[", stats)
    monkeypatch.setattr(cuda, "MERGED_CHANNEL_KERNEL", False)
    monkeypatch.setattr(cuda, "REGISTER_SUMS", False)
    monkeypatch.setattr(cuda, "VALUES_PER_THREAD", 0)
    _, kernels = build()
    assert len(kernels) == 4
    assert "_local" not in kernels[0]


TUNABLES = [
    {"MERGED_CHANNEL_KERNEL": False, "REGISTER_SUMS": False, "VALUES_PER_THREAD": 0},
    {"ROW_UNROLL": 1},
    {"VALUES_PER_THREAD": 12},
    {"VALUES_PER_THREAD": 24, "BLOCKED_ROWS": 16},
    {"BLOCKED_ROWS": 32, "BLOCKED_SAMPLES": 128},
]
TUNABLE_IDS = ["previous", "rolled", "threads-12", "threads-24-rows-16", "rows-32-samples-128"]
TUNED_SHAPES = [
    (BatchNormConfig(axis=1, renorm=True), (None, 30, 28, 28)),
    (BatchNormConfig(axis=1), (None, 20, 56, 56)),
    (BatchNormConfig(axis=-1), (None, 9, 7, 40)),
    (BatchNormConfig(axis=-1, fused=False), (None, 300)),
]
TUNED_IDS = ["nchw-28", "nchw-56", "nhwc", "nc"]


@pytest.fixture
def cuda_tunables(monkeypatch):
    """Sets cuda_blocked's tunables for one test; the kernel cache is emptied before and after (its key
    does not hold them)."""
    from bncompile.lower.kernels import clear_cache
    from bncompile.lower.kernels.schedules import cuda

    def set_(values):
        for name, value in values.items():
            monkeypatch.setattr(cuda, name, value)
        clear_cache()

    yield set_
    clear_cache()


@pytest.mark.tvm
@pytest.mark.parametrize("tunables", TUNABLES, ids=TUNABLE_IDS)
@pytest.mark.parametrize("cfg,shape", TUNED_SHAPES, ids=TUNED_IDS)
def test_cuda_blocked_tunables_compile(cfg, shape, tunables, cuda_tunables):
    """Every form of cuda_blocked's tunables that benchmarks/gpu_check.sh measures compiles to checked
    CUDA source (and PTX, where nvcc is installed)."""
    cuda_tunables(tunables)
    _, (name, sch) = _schedule(cfg, shape)
    assert name == "cuda_blocked"
    src = _tvm.cuda_source(_tvm.build(sch.mod, CUDA))
    check_cuda_source(src)
    if HAS_NVCC:
        assert ".target sm_90" in str(_tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx"))


@pytest.mark.gpu
@pytest.mark.tvm
@needs_gpu
@pytest.mark.parametrize("tunables", TUNABLES, ids=TUNABLE_IDS)
@pytest.mark.parametrize("cfg,shape", TUNED_SHAPES, ids=TUNED_IDS)
def test_cuda_blocked_tunables_numerics(cfg, shape, tunables, cuda_tunables, monkeypatch):
    """... and gives the float64 reference's results on a GPU, at batches the sample blocks do and do
    not divide."""
    from bncompile.reference import batchnorm

    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    cuda_tunables(tunables)
    k = compile_batchnorm(cfg, shape, target="cuda")
    assert k.schedule == "cuda_blocked"
    rng = np.random.default_rng(1)
    for n in (1, 7, 16):
        x = (rng.normal(1e3, 2.0, (n,) + shape[1:])).astype(np.float32)
        out = k.run({"x": x})
        ref = batchnorm(cfg, x, None, training=True)
        np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5 * max(1, np.abs(ref.y).max()))
        for v in cfg.updated_variable_names():
            r = ref.variables[v]
            np.testing.assert_allclose(out[v + "_new"], r, rtol=1e-5, atol=1e-5 * max(1, np.abs(r).max()), err_msg=v)


def test_statistics_block_threads(monkeypatch):
    """Channel-first statistics blocks get a power of two of threads, about VALUES_PER_THREAD values
    each, from a warp to BLOCKED_THREADS; 0 keeps BLOCKED_THREADS."""
    from bncompile.lower.kernels.schedules import cuda

    monkeypatch.setattr(cuda, "BLOCKED_THREADS", 256)
    monkeypatch.setattr(cuda, "VALUES_PER_THREAD", 24)
    assert [cuda._stat_threads(v) for v in (32, 784, 1536, 3136, 12544)] == [32, 32, 64, 128, 256]
    monkeypatch.setattr(cuda, "VALUES_PER_THREAD", 0)
    assert cuda._stat_threads(784) == 256


@pytest.mark.tvm
@pytest.mark.parametrize("shape", [(None, 5, 7, 30), (None, 2, 64, 48), (None, 300)], ids=["nhwc", "nhwc-rows", "nc"])
def test_cuda_two_phase_channels_last_sums_in_registers(shape):
    """The forward's two-phase rule, forced on channels-last layouts (it serves them when cuda_blocked
    declines): its partial sums are thread-serial, in registers (``REGISTER_SUMS``), and the source
    passes the shared-memory checks (and nvcc, where installed)."""
    cfg = BatchNormConfig(axis=-1)
    spec = make_spec(cfg, shape)
    name, sch = schedule(spec, prim_func(spec), target=CUDA, rule="cuda_two_phase")
    assert name == "cuda_two_phase"
    src = _tvm.cuda_source(_tvm.build(sch.mod, CUDA))
    check_cuda_source(src)
    assert "_local_ptr" in src
    if HAS_NVCC:
        assert ".target sm_90" in str(_tvm.compile_cuda_source(src, arch="sm_90", fmt="ptx"))
