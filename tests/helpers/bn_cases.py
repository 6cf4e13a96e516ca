"""Hypothesis strategy of random training-mode batch-norm cases (issue 14's property tests): ranks 2-5,
one axis or axis lists (the batch axis among them now and then), renorm with every subset of clipping
bounds (rmax < rmin included), ghost BN, adjustment inputs of every broadcast shape, static or symbolic
batch, means up to 1e3 x the spread. Shared by the kernel and the compile property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from bncompile.config import BatchNormConfig


@st.composite
def bn_cases(draw, *, full_rank_adjustment: bool = False, fused_too: bool = False):
    """``(config, shape, dynamic, adjustment shapes or None, loc, seed)``. ``full_rank_adjustment``: the
    adjustments keep x's rank (a built model's contract); otherwise leading dims may be dropped (the
    kernel API broadcasts NumPy-style). ``fused_too``: ``fused`` is drawn from False and None (Keras's
    choice, the fused path where it applies)."""
    rank = draw(st.integers(2, 5))
    ghost = draw(st.integers(0, 2)) == 0
    vbs = draw(st.sampled_from([1, 2, 3])) if ghost else None
    nmul = draw(st.integers(1, 3))
    n = vbs * nmul if vbs else draw(st.integers(1, 5))
    rest = [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    shape = (n, *rest)
    lo = 1 if ghost else 0
    axes = draw(st.lists(st.integers(lo, rank - 1), min_size=1, max_size=max(1, rank - 1 - lo), unique=True)
                if rank - 1 >= lo else st.just([rank - 1]))
    if not ghost and draw(st.integers(0, 9)) == 0:
        axes = sorted(set(axes) | {0})                       # the batch axis among the channels
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    renorm = draw(st.booleans())
    clip = None
    if renorm:
        keys = draw(st.lists(st.sampled_from(["rmax", "rmin", "dmax"]), unique=True))
        vals = {"rmax": draw(st.floats(0.3, 3.0)), "rmin": draw(st.floats(0.1, 2.0)), "dmax": draw(st.floats(0.0, 2.0))}
        clip = {k: vals[k] for k in keys}
    adjust = not ghost and draw(st.booleans())
    dynamic = 0 not in axes and draw(st.booleans())
    fused = draw(st.sampled_from([False, None])) if fused_too else False
    kw = dict(axis=axis, renorm=renorm, renorm_clipping=clip, momentum=draw(st.sampled_from([0.0, 0.9, 0.99])),
              epsilon=draw(st.sampled_from([1e-3, 1e-5])), center=draw(st.booleans()), scale=draw(st.booleans()),
              fused=fused, virtual_batch_size=vbs, adjustment="inputs" if adjust else None)
    adj_shapes = None
    if adjust:
        def one():
            # each dim: x's size or 1; then (kernel API only) drop 0..rank leading dims
            dims = tuple(d if draw(st.booleans()) else 1 for d in shape)
            return dims if full_rank_adjustment else dims[draw(st.integers(0, rank)):]
        adj_shapes = (one(), one())
    loc = draw(st.sampled_from([0.0, 0.5, 30.0, 1e3]))
    return BatchNormConfig(**kw), shape, dynamic, adj_shapes, loc, draw(st.integers(0, 2**31 - 1))


def case_variables(cfg: BatchNormConfig, shape, loc: float, rng) -> dict:
    """float32 layer variables for a case: the scales (variances, stddevs, gamma) its initial values
    times U(0.7, 1.3); the offsets (means, beta) its initial values + loc + N(0, 0.2)."""
    variables = {}
    for name, v in cfg.initial_variables(shape).items():
        if name in ("moving_variance", "moving_stddev", "renorm_stddev", "gamma"):
            variables[name] = (v * rng.uniform(0.7, 1.3, v.shape)).astype("float32")
        else:
            variables[name] = (v + loc + rng.normal(0, 0.2, v.shape)).astype("float32")
    return variables


def case_adjustment(adj_shapes, rng):
    """float32 adjustment inputs of ``adj_shapes`` ((scale shape, bias shape) or None): scale U(0.9, 1.1),
    bias U(-0.1, 0.1); None without shapes."""
    if not adj_shapes:
        return None
    return (rng.uniform(0.9, 1.1, adj_shapes[0]).astype("float32"),
            rng.uniform(-0.1, 0.1, adj_shapes[1]).astype("float32"))


def training_step_inputs(cfg: BatchNormConfig, shape, adj_shapes, loc: float, seed: int):
    """Seeded inputs of a training step with gradients: ``(x, dy, variables, adjustment, feeds)``; x about
    ``loc`` with spread 1.5, dy N(0, 1), :func:`case_variables`, :func:`case_adjustment` (None without
    shapes); ``feeds`` holds them under the kernel's input names."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = (loc + rng.normal(0, 1.5, shape)).astype(np.float32)
    dy = rng.normal(0, 1.0, shape).astype(np.float32)
    variables = case_variables(cfg, shape, loc, rng)
    adj = case_adjustment(adj_shapes, rng)
    feeds = {"x": x, "dy": dy, **variables}
    if adj:
        feeds.update(adjustment_scale=adj[0], adjustment_bias=adj[1])
    return x, dy, variables, adj, feeds
