"""CPU kernels (issue 14, speed): one parallel launch per call, sample-block statistics for (N, C), ghost BN
statistics stored group-major, against the float64 reference.

* ``merge_parallel_pass`` runs the parallel loops of a kernel in one launch of the thread pool, with a
  barrier after each (and the serial statements between them as one task): every training rule's
  compiled code loads the launch entry point once;
* ``cpu_channels_last`` on few rows per sample reduces blocks of R samples (compute.py ``stat_rows``):
  the batch's tail block is masked, not split, so any batch (symbolic included) is exact;
* ghost BN channels-last keeps its per-(group, channel) statistics in (G, C) and vectorizes 1/sqrt.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

from bncompile.config import BatchNormConfig

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.lower.kernels import build_spec, compile_batchnorm  # noqa: E402
from bncompile.lower.kernels.compute import make_spec, prim_func  # noqa: E402
from bncompile.lower.kernels.schedules import machine as M  # noqa: E402
from bncompile.lower.kernels.schedules import schedule  # noqa: E402
from bncompile.lower.kernels.schedules.cpu import ROW_GROUP, sample_block_rows  # noqa: E402
from bncompile.reference import batchnorm  # noqa: E402
from helpers.tir_script import enclosing_loops, loop_vars_of  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64")
HASWELL = {"kind": "llvm", "mcpu": "haswell"} if X86 else "llvm"
SMALL_L2 = "l1d=32K,l2=16K,l3=8M"     # stat blocks of 1024 floats: several sample blocks on small shapes


def _launches(built) -> tuple[int, int]:
    ll = built.executable.mod.inspect_source("ll")
    return (ll.count("load ptr, ptr @__TVMBackendParallelLaunch"),
            ll.count("load ptr, ptr @__TVMBackendParallelBarrier"))


@pytest.mark.parametrize("cfg,shape,rule,phases", [
    (BatchNormConfig(axis=1, fused=False), (None, 8, 16, 16), "cpu_channel_first", 1),
    (BatchNormConfig(axis=1, virtual_batch_size=2, fused=False), (None, 8, 16, 16), "cpu_channel_first", 1),
    (BatchNormConfig(axis=-1, fused=False), (None, 32, 32, 64), "cpu_channels_last_rows", 3),
    (BatchNormConfig(axis=-1), (None, 1024), "cpu_channels_last", 3),
    (BatchNormConfig(axis=-1, renorm=True), (None, 1024), "cpu_channels_last", 3),
    (BatchNormConfig(axis=-1), (None, 1024), "cpu_channel_stripes", 1),
    (BatchNormConfig(axis=-1, renorm=True), (None, 3, 384), "cpu_channel_stripes", 1),
    (BatchNormConfig(axis=-1, virtual_batch_size=4), (None, 1024), "cpu_channels_last_ghost", 1),   # stripes
    (BatchNormConfig(axis=-1, virtual_batch_size=2), (None, 8, 8, 64), "cpu_channels_last_ghost", 5),
])
def test_training_kernels_launch_the_pool_once(cfg, shape, rule, phases):
    """One launch; barriers between its phases (statistics, the serial combine, y...)."""
    spec = make_spec(cfg, shape)
    built = build_spec(spec, target=HASWELL, schedule=rule if rule == "cpu_channel_stripes" else None)
    assert built.schedule == rule
    launches, barriers = _launches(built)
    assert launches == 1 and (barriers > 0) == (phases > 1)


@pytest.mark.parametrize("cfg,shape,streaming,phases", [
    (BatchNormConfig(axis=-1), (None, 1024), False, 3),          # NC row blocks: block sums, combine, dx
    (BatchNormConfig(axis=-1), (None, 1024), True, 3),
    (BatchNormConfig(axis=-1, virtual_batch_size=4), (None, 1024), False, 1),   # stripes walking the groups
])
def test_backward_kernels_launch_the_pool_once(cfg, shape, streaming, phases):
    """The CPU backward runs its parallel loops in one launch whether dx is streamed or stored normally
    (the plain store variant used TVM's default pipeline: one launch, one worker wake-up, per loop)."""
    from bncompile.lower.kernels import build_backward

    spec = make_spec(cfg, shape)
    built = build_backward(spec, target=HASWELL, streaming=streaming)
    launches, barriers = _launches(built)
    assert launches == 1 and (barriers > 0) == (phases > 1)


def test_merge_leaves_single_loop_kernels_alone():
    spec = make_spec(BatchNormConfig(axis=1), (None, 8, 16, 16), training=False)
    built = build_spec(spec, target=HASWELL)
    assert _launches(built) == (1, 0)


def _check(cfg, x, kshape):
    # named: the sample blocks whatever the host would prefer (a static batch too small for a block of
    # MIN_SAMPLE_BLOCK samples runs the stripes under this name, as before the stripes were a rule)
    k = compile_batchnorm(cfg, kshape, schedule="cpu_channels_last")
    assert k.schedule == "cpu_channels_last" and k.schedule_for(x.shape) == "cpu_channels_last"
    out = k.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    scale = max(1.0, float(np.abs(ref.y).max()))
    np.testing.assert_allclose(out["y"], ref.y, rtol=2e-6, atol=2e-6 * scale)
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(v).max())),
                                   err_msg=n)
    return k, out, ref


def test_sample_block_rows_follow_l2_and_row_groups():
    spec = make_spec(BatchNormConfig(axis=-1), (None, 1024))
    big = M.CpuMachine(lanes=16, l1d=32 << 10, l2=1 << 20, l3=32 << 20)
    small = M.CpuMachine(lanes=16, l1d=32 << 10, l2=256 << 10, l3=8 << 20)
    assert sample_block_rows(spec, big) == 64            # 256 KB blocks of 4 KB rows
    assert sample_block_rows(spec, small) == 16
    wide = make_spec(BatchNormConfig(axis=-1), (None, 65536))
    assert sample_block_rows(wide, big) == 0             # fewer than MIN_SAMPLE_BLOCK rows: channel stripes
    odd = make_spec(BatchNormConfig(axis=-1), (None, 3, 40))
    assert sample_block_rows(odd, small) % ROW_GROUP == 0
    # a static batch bounds the block (rounded up to whole row groups): no block of thousands of masked rows
    assert sample_block_rows(make_spec(BatchNormConfig(axis=-1), (8, 6)), big) == 8
    assert sample_block_rows(make_spec(BatchNormConfig(axis=-1), (13, 6)), big) == 16


@pytest.mark.parametrize("n", [1, 3, 24, 25, 103])
@pytest.mark.parametrize("dynamic", [True, False], ids=["symbolic", "static"])
def test_sample_blocks_any_batch(monkeypatch, n, dynamic):
    """Blocks of 24 samples (C = 40, 1 K floats): a batch of 103 has a tail block of 7, 1 and 3 a single,
    mostly masked block; static and symbolic batches alike."""
    monkeypatch.setenv(M.ENV_CACHES, SMALL_L2)
    cfg = BatchNormConfig(axis=-1, momentum=0.5, fused=False)
    x = (0.5 + 1.5 * np.random.default_rng(n).standard_normal((n, 40))).astype(np.float32)
    spec = make_spec(cfg, (None, 40))
    assert sample_block_rows(spec, M.cpu_machine(HASWELL if isinstance(HASWELL, dict) else None)) == 24
    _check(cfg, x, (None, 40) if dynamic else x.shape)


def test_stripe_batch_max_follows_l2_lanes_and_cpus(monkeypatch):
    """The stripes are preferred up to the batch whose stripe (N x P x 128 floats for C = 1024) fills L2/2,
    with 4-register vectors (AVX-512's 64-channel vectors; AVX2's are 8 registers: never), and only with a
    stripe per CPU."""
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "host_cpus", lambda: 2)
    avx512 = M.CpuMachine(lanes=16, l1d=48 << 10, l2=1 << 20, l3=32 << 20)
    spec = make_spec(BatchNormConfig(axis=-1), (None, 1024))
    assert cpu.channel_stripe_width(1024, avx512) == (128, 64)
    assert cpu.stripe_batch_max(spec, avx512) == (1 << 20) // 2 // (4 * 128)
    assert cpu.stripe_batch_max(make_spec(BatchNormConfig(axis=-1), (None, 4, 1024)), avx512) == 256
    assert cpu.stripe_batch_max(spec, M.CpuMachine(lanes=16, l1d=32 << 10, l2=256 << 10, l3=8 << 20)) == 256
    assert cpu.stripe_batch_max(spec, M.CpuMachine(lanes=8, l1d=32 << 10, l2=1 << 20, l3=32 << 20)) == 0
    assert cpu.stripe_batch_max(make_spec(BatchNormConfig(axis=-1), (None, 40)), avx512) == 0   # one stripe
    # whole registers only: C = 1000 and 200 walk vectors of 25 channels (ragged: 1.8x the blocks' time on
    # 256 x 1000, AMD EPYC znver4), 96 of 32 and 2000 of 16
    for c, ok in ((1000, False), (200, False), (96, True), (2000, True)):
        ci, vi = cpu.channel_stripe_width(c, avx512)
        assert (cpu.stripe_batch_max(make_spec(BatchNormConfig(axis=-1), (None, c)), avx512) > 0) is ok, (c, ci, vi)
        assert (vi % 16 == 0) is ok
    assert cpu.stripe_batch_max(make_spec(BatchNormConfig(axis=-1, virtual_batch_size=4), (None, 1024)),
                                avx512) == 0                                                   # ghost: its own rule
    monkeypatch.setattr(cpu, "host_cpus", lambda: 16)
    assert cpu.stripe_batch_max(spec, avx512) == 0                                             # 8 stripes, 16 CPUs


NC_RULE_CONFIGS = [{}, {"momentum": 0.0, "center": False}, {"scale": False, "epsilon": 1e-5},
                   {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}},
                   {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}}]


@pytest.mark.parametrize("seed", range(12))
def test_channels_last_rules_agree(seed):
    """Random (N, [P,] C) shapes and configs, the batch static or symbolic, each few-rows channels-last rule
    forced by name (so both run on every host): every output matches the float64 reference, on data
    whose mean dwarfs its spread too."""
    from lower.test_kernels import check

    rng = np.random.default_rng(1000 + seed)
    C = int(rng.choice([7, 40, 130, 256, 384, 1024, 1000]))
    N = int(rng.integers(1, 70))
    shape = (N, C) if rng.random() < 0.6 else (N, int(rng.integers(2, 4)), C)
    cfg = BatchNormConfig(axis=-1, fused=False, **NC_RULE_CONFIGS[seed % len(NC_RULE_CONFIGS)])
    kshape = (None,) + shape[1:] if rng.random() < 0.5 else shape
    loc, scale = [(0.5, 1.5), (1e4, 1.0), (-300.0, 20.0)][seed % 3]
    for rule in ("cpu_channels_last", "cpu_channel_stripes"):
        # named, cpu_channels_last runs its blocks wherever a block of MIN_SAMPLE_BLOCK samples fits, else the stripes
        check(cfg, shape, kshape=kshape, rule=rule, schedule=rule, mean=loc, std=scale, seed=seed)


def test_symbolic_batch_picks_rule_per_call(monkeypatch):
    """A (None, 256) kernel runs the stripes for batches up to stripe_batch_max and the sample blocks past
    it (the limit pinned here: the host's L2 decides it otherwise); both match the reference."""
    from bncompile.lower.kernels import schedules

    monkeypatch.setattr(schedules, "stripe_batch_max", lambda spec, machine=None: 40)
    cfg = BatchNormConfig(axis=-1, momentum=0.5, fused=False)
    k = compile_batchnorm(cfg, (None, 256))
    assert k.schedule == "cpu_channels_last"
    assert (None, False, "cpu_channel_stripes") in k._variants        # compiled with the kernel, not on a call
    for n, rule in ((40, "cpu_channel_stripes"), (41, "cpu_channels_last"), (3, "cpu_channel_stripes")):
        x = (7.0 + 2.0 * np.random.default_rng(n).standard_normal((n, 256))).astype(np.float32)
        assert k.schedule_for(x.shape) == rule
        out = k.run({"x": x})
        ref = batchnorm(cfg, x.astype(np.float64), training=True)
        np.testing.assert_allclose(out["y"], ref.y, rtol=2e-6, atol=2e-5)
        for name, v in ref.variables.items():
            np.testing.assert_allclose(out[name + "_new"], v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(v).max())))
    forced = compile_batchnorm(cfg, (None, 256), schedule="cpu_channels_last")
    assert forced.schedule_for((40, 256)) == "cpu_channels_last"      # a named rule is kept for every batch


@pytest.mark.parametrize("kw", [{}, {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.3}},
                                {"center": False, "scale": False}])
def test_sample_blocks_rows_per_sample(monkeypatch, kw):
    """(N, 3, 40) with axis -1: three rows per sample, blocks of 8 samples (24 rows, 6 row groups)."""
    monkeypatch.setenv(M.ENV_CACHES, SMALL_L2)
    cfg = BatchNormConfig(axis=-1, fused=False, **kw)
    x = (2.0 + np.random.default_rng(1).standard_normal((37, 3, 40))).astype(np.float32)
    _check(cfg, x, (None, 3, 40))


@pytest.mark.parametrize("loc,scale", [(0.0, 100.0), (1e4, 1.0), (-3e4, 2.0)])
def test_sample_blocks_exact_mean_and_variance(monkeypatch, loc, scale):
    """Data whose mean dwarfs its spread, 4000 samples in blocks of 64 (C = 16, a tail of 32): the batch mean
    within 1 ulp (+ 2**-28 of the spread), the variance within a few ulps."""
    monkeypatch.setenv(M.ENV_CACHES, SMALL_L2)
    cfg = BatchNormConfig(axis=-1, momentum=0.0, fused=False)
    x = (loc + scale * np.random.default_rng(3).standard_normal((4000, 16))).astype(np.float32)
    k = compile_batchnorm(cfg, (None, 16))
    assert k.schedule == "cpu_channels_last"
    out = k.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    mean = ref.variables["moving_mean"]
    err = np.abs(out["moving_mean_new"] - mean)
    assert (err <= np.spacing(np.abs(mean).astype(np.float32)) + scale * 2.0 ** -28).all(), err
    var = ref.variables["moving_variance"]
    assert (np.abs(out["moving_variance_new"] - var) / np.spacing(np.abs(var).astype(np.float32))).max() <= 8.0


def test_sample_blocks_wide_rows_use_row_groups():
    """C = 1024 on AVX2: blocks of 64 samples reduced 4 rows at a time, one 32-channel vector (4 registers)
    each; the first pass prefetches x STATS_PREFETCH_BYTES ahead (4 rows of 4 KB), the second none."""
    from bncompile.lower.kernels.schedules.cpu import STATS_PREFETCH_BYTES

    mach = M.CpuMachine(lanes=8, l1d=32 << 10, l2=1 << 20, l3=32 << 20)
    spec = make_spec(BatchNormConfig(axis=-1), (None, 1024))
    name, sch = schedule(spec, prim_func(spec), target=HASWELL, machine=mach)
    script = sch.mod.script()
    assert name == "cpu_channels_last" and "T.where" not in script
    assert f"T.grid(16, 32, {ROW_GROUP})" in script                 # row groups, channel vectors, rows
    assert "T.vectorized(32)" in script
    ahead = STATS_PREFETCH_BYTES // 4
    assert script.count("bncompile_prefetch_x") == 1
    assert any(f'"bncompile_prefetch_x": {ahead}' in line for line in enclosing_loops(script, "bsum_update"))


@pytest.mark.skipif(not X86, reason="prefetch instructions are checked in x86 assembly")
@pytest.mark.parametrize("C", [32, 1024])
def test_sample_blocks_prefetch_ahead_exact(C):
    """The first statistics pass of (N, C) sample blocks issues prefetcht1 (x, rows ahead, past the end
    of x on the last rows: a hint that cannot fault); results exact against the float64 reference for
    a batch the blocks do not divide."""
    cfg = BatchNormConfig(axis=-1, momentum=0.5)
    k = compile_batchnorm(cfg, (None, C), schedule="cpu_channels_last")    # not the stripes, whatever the L2
    assert k.schedule == "cpu_channels_last"
    assert "prefetcht1" in k.executable.mod.inspect_source("asm")
    x = (50.0 + np.random.default_rng(C).standard_normal((203, C))).astype(np.float32)
    out = k.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=2e-5)
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape,prefetch", [((None, 1024), True), ((None, 8, 8, 64), True),
                                            ((None, 64, 64, 64), False)])
def test_ghost_channels_last_prefetches_next_group_rows(shape, prefetch):
    """Ghost BN channels-last with a sample's rows of at most STATS_PREFETCH_BYTES: the first statistics
    pass prefetches the next group's rows (one sample's floats on); long rows stream without it.
    Exact against the float64 reference either way."""
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=4, momentum=0.5)
    spec = make_spec(cfg, shape)
    name, sch = schedule(spec, prim_func(spec), target=HASWELL)
    script = sch.mod.script()
    assert name == "cpu_channels_last_ghost"
    row = int(np.prod(shape[1:]))
    assert any(f'"bncompile_prefetch_x": {row}' in line
               for line in enclosing_loops(script, "sum_update")) == prefetch
    full = (12,) + shape[1:]
    x = (20.0 + 3.0 * np.random.default_rng(row).standard_normal(full)).astype(np.float32)
    out = compile_batchnorm(cfg, shape).run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref.y).max())))
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(v).max())))


@pytest.mark.parametrize("kshape,n,v", [((None, 1024), 256, 4), ((None, 40), 34, 2), ((None, 16), 4, 4),
                                        ((88, 40), 88, 2), ((None, 6, 5, 24), 63, 3), ((None, 64), 244, 4),
                                        ((None, 2, 2, 48), 45, 3), ((None, 24), 40, 8)])
@pytest.mark.parametrize("renorm", [False, True])
def test_ghost_channels_last_chunked_averages(kshape, n, v, renorm):
    """The averages over the groups: short groups without renorm walk every group in a task per stripe
    of channels (no partial sums); otherwise partial sums over chunks of GHOST_CHUNK_GROUPS groups,
    parallel over the chunks (rfactor blocks ``batch_*_rf``), whenever there are more groups than one
    chunk or the batch is free. Exact against the float64 reference for group counts the chunk does not
    divide (17 and 61 groups: a chunked group loop under a free batch once skipped groups of every
    chunk), a single group (G = 1 at run time), static and free batches."""
    from bncompile.lower.kernels.schedules._common import GHOST_WALK_MAX_VALUES
    from bncompile.lower.kernels.schedules.cpu import GHOST_CHUNK_GROUPS

    cfg = BatchNormConfig(axis=-1, virtual_batch_size=v, momentum=0.5, renorm=renorm)
    spec = make_spec(cfg, kshape)
    name, sch = schedule(spec, prim_func(spec), target=HASWELL)
    G = kshape[0] // v if kshape[0] else None
    m = v * int(np.prod(kshape[1:-1]))              # values per channel and group
    stripes = not renorm and m <= GHOST_WALK_MAX_VALUES and kshape[-1] % 8 == 0
    assert name == "cpu_channels_last_ghost"
    script = sch.mod.script()
    assert ("batch_var_rf" in script) == (not stripes and (G is None or G > GHOST_CHUNK_GROUPS))
    if stripes:     # one loop nest: the stripe's task (parallel), its group loop, the averages' sums in it
        outer = enclosing_loops(script, "batch_var_update")
        assert "T.parallel" in outer[0] and "T.parallel" not in "".join(outer[1:])
        assert enclosing_loops(script, "sum_update")[:2] == outer[:2]
    x = (40.0 + 3.0 * np.random.default_rng(n).standard_normal((n,) + kshape[1:])).astype(np.float32)
    out = compile_batchnorm(cfg, kshape).run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref.y).max())))
    for name_, val in ref.variables.items():
        np.testing.assert_allclose(out[name_ + "_new"], val, rtol=2e-6,
                                   atol=2e-6 * max(1.0, float(np.abs(val).max())), err_msg=name_)


def test_ghost_channels_last_stats_group_major():
    """The per-(group, channel) statistics in (G, C): no strided vector access, 1/sqrt vectorized."""
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=4)
    spec = make_spec(cfg, (None, 1024))
    built = build_spec(spec, target=HASWELL)
    assert built.schedule == "cpu_channels_last_ghost"
    ll = built.executable.mod.inspect_source("ll")
    assert "llvm.masked.gather" not in ll and "llvm.masked.scatter" not in ll
    assert "sqrt.v" in ll                       # llvm.sqrt.v8f32 / v64f32: the vector square root
    x = (3.0 + np.random.default_rng(0).standard_normal((64, 1024))).astype(np.float32)
    out = compile_batchnorm(cfg, (None, 1024)).run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref.y).max())))
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("lanes", [True, False])
@pytest.mark.parametrize("renorm", [False, True])
def test_ghost_channel_first_group_passes(monkeypatch, renorm, lanes):
    """Ghost BN, channel first: one group's statistics (and its y, without renorm) under the group loop
    of the channel's task, so the second pass re-reads the group's v rows from L1; the second pass and y
    prefetch the next channel's rows. Exact against the float64 reference either way. ``lanes``: the lane
    blocks of ``_channel_first_lanes`` (what x86 hosts take), else the generic rule (fewer than 8 lanes)."""
    from bncompile.lower.kernels import clear_cache
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "GHOST_LANES", lanes)
    clear_cache()
    kw = {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}} if renorm else {}
    cfg = BatchNormConfig(axis=1, virtual_batch_size=2, fused=False, **kw)
    spec = make_spec(cfg, (None, 4, 16, 16))          # (v, G, 1, C, Q = 256): rows of 1 KB
    name, sch = schedule(spec, prim_func(spec), target=HASWELL,
                         machine=M.CpuMachine(lanes=8, l1d=32 << 10, l2=1 << 20, l3=32 << 20))
    script = sch.mod.script()
    assert name == "cpu_channel_first" and "T.where" not in script
    if lanes:       # the task's loop, then the group loop over the lane blocks of the group's rows
        group = loop_vars_of(script, "bsum_update")[:2]
        per_group = ("sum_rf_update", "sqsum_rf_update", "var", "batch_offset", "batch_var")
    else:
        group = loop_vars_of(script, "shift")          # c, g
        per_group = ("sum_rf_update", "sqsum_rf_update", "var")
    assert len(group) == 2
    for b in per_group + (() if renorm else ("scale_c", "y")):
        assert loop_vars_of(script, b)[:2] == group, b
    if renorm:      # r (every group's variance) scales y: y after the group loop, in the channel's task
        assert loop_vars_of(script, "y")[:2] != group
    assert script.count('annotations={"bncompile_prefetch_x": 256}') == 2    # y and the second pass
    assert any("bncompile_prefetch_x" in line for line in enclosing_loops(script, "sqsum_rf_update"
                                                                           if not lanes else "bm2_update"))
    x = (5.0 + np.random.default_rng(1).standard_normal((6, 4, 16, 16))).astype(np.float32)
    out = compile_batchnorm(cfg, (None, 4, 16, 16)).run({"x": x})
    clear_cache()
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    np.testing.assert_allclose(out["y"], ref.y, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(ref.y).max())))
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(v).max())),
                                   err_msg=n)


def test_channel_first_prefetches_next_channel_in_stats_and_y():
    """Plain channel first on rows of >= 1 KB: the second statistics pass (each row from L1) and y both
    prefetch the next channel's row (Q floats on); the second pass's prefetch sits in the loop over the
    row's vectors (the loops of the block bm2)."""
    spec = make_spec(BatchNormConfig(axis=1, fused=False), (None, 4, 16, 16))      # Q = 256: rows of 1 KB
    name, sch = schedule(spec, prim_func(spec), target=HASWELL,
                         machine=M.CpuMachine(lanes=8, l1d=32 << 10, l2=1 << 20, l3=32 << 20))
    script = sch.mod.script()
    assert name == "cpu_channel_first"
    assert script.count('annotations={"bncompile_prefetch_x": 256}') == 2
    assert any("bncompile_prefetch_x" in line for line in enclosing_loops(script, "bm2_update"))


def _lambda_ir(ll: str) -> str:
    """The LLVM IR of the parallel tasks (the ``__tvm_parallel_lambda`` functions) of a kernel."""
    out, keep = [], False
    for line in ll.splitlines():
        if line.startswith("define "):
            keep = "__tvm_parallel_lambda" in line
        if keep:
            out.append(line)
    return "\n".join(out)


def test_parallel_task_buffers_on_the_stack():
    """Ghost (N, C): a group's task keeps its per-channel buffers (4 KB each) on its stack, not in TVM's
    workspace pool (three allocations and three frees, runtime calls, per group before)."""
    cfg = BatchNormConfig(axis=-1, virtual_batch_size=4)
    built = build_spec(make_spec(cfg, (None, 1024)), target=HASWELL)
    tasks = _lambda_ir(built.executable.mod.inspect_source("ll"))
    assert tasks and "alloca" in tasks
    assert "@__TVMBackendAllocWorkspace" not in tasks and "@__TVMBackendFreeWorkspace" not in tasks


def test_stack_buffers_pass_limits():
    """Only static buffers allocated inside a parallel loop, up to the size limit, are marked."""
    from bncompile.lower import tvm as _tvm
    from bncompile.lower.kernels.schedules.cpu import stack_buffers_pass

    tvm, T = _tvm.tvm(), _tvm.submodule("tvm.script").tirx

    @T.prim_func
    def f(a: T.Buffer((4, 1024), "float32"), b: T.Buffer((4, 1024), "float32")):
        outer = T.alloc_buffer((1024,), "float32")
        for i in T.parallel(4):
            small = T.alloc_buffer((1024,), "float32")          # 4 KB: on the stack
            big = T.alloc_buffer((32768,), "float32")           # 128 KB: stays with the runtime
            for j in range(1024):
                small[j] = a[i, j]
                big[j] = small[j] * T.float32(2)
                outer[j] = big[j]
                b[i, j] = outer[j]

    script = stack_buffers_pass(64 * 1024)(tvm.IRModule({"main": f}))["main"].script()
    allocs = {ln.split("=")[0].strip(): ln for ln in script.splitlines() if "T.alloc_buffer" in ln}
    assert set(allocs) == {"outer", "small", "big"}, script
    assert [n for n, ln in allocs.items() if '"disable_lower_builtin": 1' in ln] == ["small"], script

    @T.prim_func
    def g(a: T.Buffer((4, 1024), "float32"), b: T.Buffer((4, 1024), "float32")):
        for i in T.parallel(4):
            p1 = T.alloc_buffer((12288,), "float32")            # 48 KB each: the third passes 128 KB in all
            p2 = T.alloc_buffer((12288,), "float32")
            p3 = T.alloc_buffer((12288,), "float32")
            for j in range(1024):
                p1[j] = a[i, j]
                p2[j] = p1[j]
                p3[j] = p2[j]
                b[i, j] = p3[j]

    script = stack_buffers_pass(64 * 1024, 128 * 1024)(tvm.IRModule({"main": g}))["main"].script()
    allocs = {ln.split("=")[0].strip(): ln for ln in script.splitlines() if "T.alloc_buffer" in ln}
    assert [n for n, ln in allocs.items() if '"disable_lower_builtin": 1' in ln] == ["p1", "p2"], script


def test_backward_inverse_std_is_a_vector_op():
    """The backward's 1/sqrt(var + eps) per group and channel (a quarter of the elements for ghost (N, C)
    of 4 samples per group) is a vector square root, not a scalar loop (tirx.rsqrt is not
    vectorizable); the numbers match the float64 backward."""
    from bncompile.lower.kernels import build_backward
    from bncompile.reference import batchnorm_backward

    cfg = BatchNormConfig(axis=-1, virtual_batch_size=4)
    built = build_backward(make_spec(cfg, (None, 1024), training=True), target=HASWELL)
    ll = built.executable.mod.inspect_source("ll")
    assert "sqrt.v" in ll and "@llvm.sqrt.f32(" not in ll
    rng = np.random.default_rng(1)
    x = (3.0 + rng.standard_normal((32, 1024))).astype(np.float32)
    dy = rng.standard_normal((32, 1024)).astype(np.float32)
    k = compile_batchnorm(cfg, (None, 1024), gradients=True)
    out = k.run({"x": x, "dy": dy})
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), training=True)
    for name in ("dx", "dgamma", "dbeta"):
        want = getattr(ref, name)
        np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())),
                                   err_msg=name)


@pytest.mark.parametrize("C,vec,cpus,want", [(1024, 16, 2, 256), (1024, 16, 16, 32), (64, 16, 2, 16), (40, 8, 2, 8),
                                              (4096, 32, 2, 256), (96, 16, 1, 48), (16, 16, 4, 16)])
def test_ghost_stripe_width(C, vec, cpus, want):
    """The widest stripe (a multiple of the vector dividing C, at most 1 KB of a row) leaving two stripes
    per CPU; one vector when even that leaves fewer."""
    from bncompile.lower.kernels.schedules._common import ghost_stripe_width

    assert ghost_stripe_width(C, vec, cpus) == want


@pytest.mark.parametrize("shape, axis", [((68, 1000), -1), ((129, 200), -1), ((5, 7, 3, 40), -1), ((9, 4, 120), -1),
                                         ((3, 56, 5, 7), 1), ((6, 8, 14, 14), 1), ((4, 5, 17, 17), 1),
                                         ((5, 64, 14, 14), 1), ((3, 32, 17, 17), 1), ((4, 48, 3, 10, 10), 1)])
@pytest.mark.parametrize("variant", [{}, {"virtual_batch_size": None},
                                     {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}}])
@pytest.mark.parametrize("dynamic", [False, True])
def test_ragged_channel_vectors(shape, axis, variant, dynamic):
    """Channel counts with no multiple of 16 but one of 8 (1000, 200, 40, 120; 56 on NCHW's channel axis) walk
    whole 8-lane vectors (``_vector_factor``; 25- or 20-lane ones before), NCHW rows of 196 and 289 values
    ragged statistics lanes on x86 hosts (``ragged_stat_lanes``), and with 32-64 channels tasks of
    several channels (``channel_group``; 48 x 300-value rows too): every rule the host picks agrees with the
    float64 reference, whatever the batch (ghost: groups of the batch's divisor)."""
    from bncompile.lower.kernels.schedules._common import _vector_factor

    c = shape[axis]
    assert _vector_factor(c, 16) % 8 == 0 and _vector_factor(c, 8) % 8 == 0 or shape[-1] in (10, 14, 17)
    kw = dict(variant)
    if "virtual_batch_size" in kw:
        kw["virtual_batch_size"] = next(v for v in (4, 3, 5, 7, 1) if shape[0] % v == 0)
    cfg = BatchNormConfig(axis=axis, momentum=0.7, fused=False, **kw)
    rng = np.random.default_rng(shape[0] * c)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape)
    out = k.run({"x": x})
    ref = batchnorm(cfg, x.astype(np.float64), training=True)
    scale = max(1.0, float(np.abs(ref.y).max()))
    np.testing.assert_allclose(out["y"], ref.y, rtol=5e-6, atol=5e-6 * scale, err_msg=k.schedule_for(x.shape))
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=5e-6, atol=5e-6 * max(1.0, float(np.abs(v).max())),
                                   err_msg=n)


def test_channel_group_follows_row_bytes_cpus_and_l2(monkeypatch):
    """Tasks of several channels for rows under 3 KB (CHANNEL_GROUP_MIN_BYTES): the fewest channels dividing
    C that reach it, while there are two tasks per CPU and a static batch's group stays within L2/2."""
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "host_cpus", lambda: 2)
    mach = M.CpuMachine(lanes=16, l1d=32 << 10, l2=1 << 20, l3=32 << 20)
    assert cpu.channel_group(256, 196, None, mach) == 4          # 14x14: 4 x 784 B
    assert cpu.channel_group(256, 196, 64, mach) == 4            # 4 x 64 x 784 B = 196 KB <= 512 KB
    assert cpu.channel_group(256, 196, 256, mach) == 1           # 784 KB past L2/2
    assert cpu.channel_group(96, 289, None, mach) == 3           # 17x17: 3 x 1156 B
    assert cpu.channel_group(256, 784, None, mach) == 1          # 28x28: 3136 B already
    assert cpu.channel_group(12, 196, None, mach) == 1           # groups of 4 leave 3 tasks for 2 CPUs
    assert cpu.channel_group(7, 196, None, mach) == 1            # no divisor reaches 3 KB with tasks left
    monkeypatch.setattr(cpu, "CHANNEL_GROUP_MIN_BYTES", 0)
    assert cpu.channel_group(256, 196, None, mach) == 1


@pytest.mark.parametrize("target", ["llvm", "llvm:haswell"] if X86 else ["llvm"])
@pytest.mark.parametrize("shape", [(6, 64, 7, 7), (5, 32, 14, 14), (3, 48, 10, 10), (4, 96, 6, 6), (2, 48, 17, 17)])
@pytest.mark.parametrize("variant", ["plain", "renorm", "adjust"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_y_runs_match_reference(monkeypatch, target, shape, variant, dynamic):
    """y of a task's channel group in runs of whole vectors across its channels' rows (``y_run_lanes``: rows
    of 49, 196, 100 or 36 values, no multiple of the lanes, in groups whose runs are; 17x17's groups of 3
    are not, and x-shaped adjustment inputs keep the row vectors too): y and the updated variables against
    the float64 reference, means 1e3 x the spread (the terms are per-(c, q) copies, y keeps
    ``((x - K) - mean) * A + B``)."""
    from bncompile.lower import targets
    from bncompile.lower.kernels import clear_cache
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "host_cpus", lambda: 2)        # the channel groups of a 2-CPU host, on any host
    clear_cache()
    kw = {"renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.4, "rmin": 0.6, "dmax": 0.5}},
          "adjust": {"adjustment": "inputs"}}.get(variant, {})
    cfg = BatchNormConfig(axis=1, momentum=0.0, fused=False, **kw)
    kshape = ((None,) + shape[1:]) if dynamic else shape
    tdict = targets.target_dict(target)
    mach = M.cpu_machine(tdict)
    spec = make_spec(cfg, kshape)
    name, sch = schedule(spec, prim_func(spec), target=tdict, machine=mach)
    q = shape[2] * shape[3]
    group = cpu.channel_group(shape[1], q, kshape[0], mach)
    runs = cpu.y_run_lanes(spec, group, cpu._vector_factor(q, mach.lanes), mach)
    assert name == "cpu_channel_first" and bool(runs) == (shape[2] != 17 and variant != "adjust")   # x-shaped: rows
    assert ('T.sblock("y_terms")' in sch.mod.script()) == bool(runs)
    rng = np.random.default_rng(sum(shape))
    x = (1e3 + rng.standard_normal(shape)).astype(np.float32)
    feeds = {"x": x}
    if variant == "adjust":
        a = (1, shape[1], 1, 1)
        feeds.update(adjustment_scale=rng.uniform(0.5, 1.5, a).astype(np.float32),
                     adjustment_bias=rng.normal(0, 0.5, a).astype(np.float32))
    out = compile_batchnorm(cfg, kshape, target=target).run(feeds)
    clear_cache()
    adj = (feeds["adjustment_scale"], feeds["adjustment_bias"]) if variant == "adjust" else None
    ref = batchnorm(cfg, x.astype(np.float64), training=True, adjustment=adj)
    np.testing.assert_allclose(out["y"], ref.y, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(ref.y).max())))
    for n, v in ref.variables.items():
        np.testing.assert_allclose(out[n + "_new"], v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(v).max())),
                                   err_msg=n)
