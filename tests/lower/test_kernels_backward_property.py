"""Issue 16: random backward-kernel configs against the float64 backward reference (hypothesis, seeded,
bounded: 40 examples, well under a minute). Ranks 2-4, one axis or axis lists, renorm with any subset
of clipping bounds, ghost BN, adjustment inputs of every broadcast shape, static or symbolic batch,
means up to 1e3 x the spread, with or without scale/center. Then 30 examples of the layouts the streaming
CPU rules take (sizes that give blocked lane sums, several channel stripes, per-sample partials, ghost
stripe tasks), built for the host and for AVX2 (``llvm:haswell``)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bncompile.config import BatchNormConfig  # noqa: E402
from bncompile.reference import batchnorm_backward  # noqa: E402
from helpers.bn_cases import training_step_inputs  # noqa: E402
from helpers.tir_script import loop_vars_of  # noqa: E402

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from bncompile.kernels import compile_batchnorm  # noqa: E402

TOL = 1e-4      # float32 gradients: relative to max(1, |expected|)
# the host, and AVX2 code (8 lanes) where the host runs it (any x86-64 CPU this project supports)
TARGETS = ["llvm"] + (["llvm:haswell"] if platform.machine().lower() in ("x86_64", "amd64") else [])


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 4))
    ghost = draw(st.integers(0, 2)) == 0
    vbs = draw(st.sampled_from([1, 2, 3])) if ghost else None
    n = vbs * draw(st.integers(1, 3)) if vbs else draw(st.integers(2, 5))
    shape = (n, *[draw(st.integers(1, 5)) for _ in range(rank - 1)])
    axes = draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else sorted(axes)
    renorm = draw(st.booleans())
    clip = None
    if renorm:
        keys = draw(st.lists(st.sampled_from(["rmax", "rmin", "dmax"]), unique=True))
        vals = {"rmax": draw(st.floats(0.5, 3.0)), "rmin": draw(st.floats(0.1, 1.0)), "dmax": draw(st.floats(0.0, 2.0))}
        clip = {k: vals[k] for k in keys}
    adjust = not ghost and draw(st.booleans())
    kw = dict(axis=axis, renorm=renorm, renorm_clipping=clip, epsilon=draw(st.sampled_from([1e-3, 1e-5])),
              center=draw(st.booleans()), scale=draw(st.booleans()), fused=False, virtual_batch_size=vbs,
              adjustment="inputs" if adjust else None)
    adj_shapes = None
    if adjust:
        def one():
            dims = tuple(d if draw(st.booleans()) else 1 for d in shape)
            return dims[draw(st.integers(0, rank)):]
        adj_shapes = (one(), one())
    loc = draw(st.sampled_from([0.0, 0.5, 30.0, 1e3]))
    return BatchNormConfig(**kw), shape, draw(st.booleans()), adj_shapes, loc, draw(st.integers(0, 2**31 - 1))


@seed(20240616)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_random_backward_configs_match_reference(case):
    cfg, shape, dynamic, adj_shapes, loc, s = case
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape, gradients=True)
    _check_kernel(k, cfg, shape, adj_shapes, loc, s)


def _check_kernel(k, cfg, shape, adj_shapes, loc, seed_):
    """Run ``k`` on random x, dy, variables (and adjustment inputs of ``adj_shapes``) about ``loc``; its
    gradients against the float64 reference."""
    x, dy, variables, adj, feeds = training_step_inputs(cfg, shape, adj_shapes, loc, seed_)
    out = k.run(feeds)
    ref = batchnorm_backward(cfg, x.astype(np.float64), dy.astype(np.float64), variables, training=True,
                             adjustment=adj)
    for name, exp in (("dx", ref.dx), ("dgamma", ref.dgamma), ("dbeta", ref.dbeta)):
        if exp is None:
            assert name not in out
            continue
        act = np.asarray(out[name], np.float64).reshape(exp.shape)
        scale = max(1.0, float(np.abs(exp).max()))
        np.testing.assert_allclose(act, exp, rtol=TOL, atol=TOL * scale, err_msg=f"{name} {cfg} {shape} {k}")


@st.composite
def fast_layouts(draw):
    """Layouts the streaming CPU rules take (not bwd_cpu_generic): channel-first with rows of a vector
    multiple or not, channels-last with one stripe or several, ghost of either form; plain, renorm or
    per-channel adjustment; static or symbolic batch."""
    form = draw(st.sampled_from(["nchw", "nhwc", "nc", "ghost_nchw", "ghost_nhwc"]))
    vbs = draw(st.sampled_from([2, 3])) if form.startswith("ghost") else None
    n = vbs * draw(st.integers(1, 3)) if vbs else draw(st.integers(2, 6))
    c = draw(st.sampled_from([1, 3, 8, 17, 48, 80, 160]))
    if form in ("nchw", "ghost_nchw"):
        q = draw(st.sampled_from([8, 16, 24, 40, 48, 64, 96, 7, 10]))
        shape, axis = (n, c, draw(st.integers(1, 3)), q), 1
    elif form == "nc":
        shape, axis = (n, c), -1
    else:
        # up to 72 rows a sample: per-sample partials when the batch is symbolic
        shape, axis = (n, draw(st.sampled_from([1, 2, 4, 8, 9])), draw(st.integers(1, 8)), c), -1
    renorm = draw(st.booleans())
    clip = {"rmax": draw(st.floats(1.0, 2.0)), "rmin": draw(st.floats(0.3, 1.0)), "dmax": draw(st.floats(0.0, 1.0))}
    kw = dict(axis=axis, virtual_batch_size=vbs, renorm=renorm, renorm_clipping=clip if renorm else None,
              fused=False, scale=draw(st.booleans()), center=draw(st.booleans()),
              adjustment="inputs" if vbs is None and draw(st.booleans()) else None)
    target = draw(st.sampled_from(TARGETS))
    loc = draw(st.sampled_from([0.0, 3.0, 1e3]))
    return BatchNormConfig(**kw), shape, draw(st.booleans()), target, loc, draw(st.integers(0, 2**31 - 1))


@seed(20261129)
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fast_layouts())
def test_random_streaming_layouts_match_reference_on_both_vector_widths(case):
    """The streaming rules (blocked lane sums, channel stripes, ghost stripe tasks) for random sizes,
    built for the host and for AVX2 (``llvm:haswell``: 8 lanes, other lane blocks and stripes; it runs
    on any x86-64 host with AVX2), against the float64 reference; a per-channel adjustment too."""
    cfg, shape, dynamic, target, loc, s = case
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape, gradients=True, target=target)
    assert k.backward_schedule != "bwd_cpu_generic", (cfg, shape, k.backward_schedule)
    adj_shapes = None
    if cfg.adjustment is not None:           # per channel
        ax = cfg.resolve(len(shape)).axes[0]
        ashape = tuple(d if i == ax else 1 for i, d in enumerate(shape))
        adj_shapes = (ashape, ashape)
    _check_kernel(k, cfg, shape, adj_shapes, loc, s)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,c,variant,loc", [(77, 160, "plain", 1e3), (256, 96, "renorm", 3.0), (45, 128, "adjust", 1e3),
                                             (33, 64, "plain", 0.0), (64, 96, "ghost", 1e3), (40, 160, "ghost_renorm", 3.0)])
def test_nc_row_blocks_and_short_ghost_groups_match_reference(target, n, c, variant, loc):
    """(N, C) with a symbolic batch: the row blocks of bwd_cpu_channels_last (32-sample plain block
    sums; a batch of 77, 45 or 33 ends in a masked block) and ghost (N, C)'s plain group sums (groups of
    4 values), against the float64 reference, means up to 1e3 x the spread, AVX-512 and AVX2."""
    from bncompile.lower import targets
    from bncompile.lower.kernels import backward, schedules

    ghost = variant.startswith("ghost")
    renorm = variant.endswith("renorm")
    clip = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
    cfg = BatchNormConfig(axis=-1, fused=False, virtual_batch_size=4 if ghost else None, renorm=renorm,
                          renorm_clipping=clip if renorm else None,
                          adjustment="inputs" if variant == "adjust" else None)
    k = compile_batchnorm(cfg, (None, c), gradients=True, target=target)
    assert k.backward_schedule == "bwd_cpu_channels_last"
    _, sch = schedules.schedule_backward(k.spec, backward.backward_prim_func(k.spec),
                                         target=targets.target_dict(target))
    script = sch.mod.script()
    if ghost:
        assert "red_v4" not in script          # four plain sums, no compensation terms
    else:
        assert "bsum_v3" in script and "T.where" not in script
    adj_shapes = ((1, c), (1, c)) if variant == "adjust" else None
    _check_kernel(k, cfg, (n, c), adj_shapes, loc, 7)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(5, 64, 14, 14), (3, 32, 17, 17), (4, 48, 3, 10, 10), (6, 256, 7, 7)])
@pytest.mark.parametrize("variant", ["plain", "renorm", "adjust", "ghost", "ghost_renorm"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_channel_groups_match_reference(monkeypatch, target, shape, variant, dynamic):
    """Channel-first rows under 3 KB in tasks of several adjacent channels (``channel_group``, forward and
    backward: 14x14 in groups of 4, 17x17 of 3 or 4, 300-value rows of 3, 7x7 of 16 on a 2-CPU host), means
    1e3 x the spread, AVX-512 and AVX2, against the float64 reference. Ghost BN (groups of the batch's
    divisor; a loop over the groups in each task, each group's dx under it without renorm) too. The groups
    of a 2-CPU host on any host; y and dx of 14x14 and 7x7 in runs across each group's rows."""
    from bncompile.lower.kernels import clear_cache
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "host_cpus", lambda: 2)
    clear_cache()
    clip = {"rmax": 1.4, "rmin": 0.6, "dmax": 0.5}
    kw = {"renorm": {"renorm": True, "renorm_clipping": clip}, "adjust": {"adjustment": "inputs"},
          "ghost": {"virtual_batch_size": {5: 5, 3: 3, 4: 2, 6: 3}[shape[0]]},
          "ghost_renorm": {"virtual_batch_size": {5: 5, 3: 3, 4: 2, 6: 3}[shape[0]], "renorm": True,
                           "renorm_clipping": clip}}.get(variant, {})
    cfg = BatchNormConfig(axis=1, fused=False, **kw)
    k = compile_batchnorm(cfg, ((None,) + shape[1:]) if dynamic else shape, gradients=True, target=target)
    adj_shapes = None
    if variant == "adjust":
        a = tuple(d if i == 1 else 1 for i, d in enumerate(shape))
        adj_shapes = (a, a)
    _check_kernel(k, cfg, shape, adj_shapes, 1e3, sum(shape))
    clear_cache()


@pytest.mark.parametrize("renorm", [False, True])
def test_ghost_backward_group_loop(monkeypatch, renorm):
    """Ghost BN backward, channel first on short rows: the blocked reduction of ``_channel_first_blocked``
    (not the generic rule), the group loop under each task holding the group's scalars and, without
    renorm (whose r and d read every group), its dx, in runs of whole vectors across the task's channel
    group (``dx_terms``: tasks of 4 channels, as on a 2-CPU host); exact against the float64 reference."""
    from bncompile.lower import targets
    from bncompile.lower.kernels import backward, clear_cache, schedules
    from bncompile.lower.kernels.schedules import cpu

    monkeypatch.setattr(cpu, "host_cpus", lambda: 2)
    clear_cache()

    kw = {"renorm": True, "renorm_clipping": {"rmax": 1.4, "dmax": 0.5}} if renorm else {}
    cfg = BatchNormConfig(axis=1, fused=False, virtual_batch_size=2, **kw)
    k = compile_batchnorm(cfg, (None, 64, 14, 14), gradients=True)     # blocked on every host (>= 8 lanes)
    assert k.backward_schedule == "bwd_cpu_channel_first"
    _, sch = schedules.schedule_backward(k.spec, backward.backward_prim_func(k.spec),
                                         target=targets.target_dict("llvm"))
    script = sch.mod.script()
    assert 'T.sblock("bsum_update")' in script           # the blocked reduction
    assert ('T.sblock("dx_terms")' in script) == (not renorm)

    group = loop_vars_of(script, "red_rf_update")[:2]
    for b in ("var", "inv") + (() if renorm else ("coef_a", "dx")):
        assert loop_vars_of(script, b)[:2] == group, b
    if renorm:
        assert loop_vars_of(script, "dx")[:2] != group
    _check_kernel(k, cfg, (6, 64, 14, 14), None, 1e3, 3)
    clear_cache()
