"""The backward of batch normalization as a pure TE compute (no schedule), plus its NumPy twin.

The gradients of ``sum(y * dy)`` (``docs/batchnorm-semantics.md``, "Backward"; the oracle is
:func:`bncompile.reference.batchnorm_backward`) on the canonical view of :mod:`compute` (the same
:class:`~bncompile.lower.kernels.compute.KernelSpec`). Per statistics group (a channel, or a channel
and a virtual batch for ghost BN) of ``n`` elements, with ``u = dy`` (``dy * adj_scale`` for an
x-shaped adjustment), ``xk = x - K`` (K: the forward's data shift) and ``xc = xk - mean``:

* ONE pass over x and dy gives four compensated sums (:func:`compensated_sums`, the forward's
  TwoSum pairs): ``Σxk``, ``Σxk²``, ``Σu``, ``Σu·xk`` (plus ``Σdy`` and ``Σdy·adj_bias`` with an
  x-shaped adjustment). With ``spec.stat_lanes = L > 1`` (a CPU schedule's request) the sums come
  from blocks instead (:func:`_blocked_red`): plain float32 lane sums over short runs of the
  contiguous axis (in registers: one FMA or add per value), folded into the compensated pairs once
  per block; with ``spec.stat_rows = R > 1`` (channels last, one value per sample) from plain sums of
  R-sample row blocks (:func:`_row_blocked_red`); with ``spec.stat_plain_m2`` (groups of at most
  :data:`LANE_BLOCK` values, e.g. ghost (N, C)) as plain float32 sums. The mean and variance are finalized in float64 (``var = Σxk²/n - mean'²``:
  the sums are exact to float32 rounding and K is a sample of the data, so this is within a few ulps
  of the forward's two-pass variance); ``Σu·xc = Σu·xk - mean·Σu``;
* with ``w = gamma·r·adj_scale`` (per channel; r = 1 without renorm; renorm's r and d are constants,
  from the group-averaged statistics and the pre-update renorm variables, clipped like the forward)
  and ``inv = 1/sqrt(var + eps)``: ``dx = a·u + b·xc + c`` with ``a = inv·w``,
  ``b = -a·inv²·Σu·xc/n``, ``c = -a·Σu/n`` (the reference's ``inv·(g - mean(g) - xhat·mean(g·xhat))``
  with ``g = u·w``);
* ``dgamma = Σ_groups (r·inv·Σu·xc + d·Σu)·adj_scale + adj_bias·Σdy`` (x-shaped adjustment:
  ``+ Σdy·adj_bias``), ``dbeta = Σdy``.

So the kernel reads x and dy once for the reductions and once for dx; a schedule that keeps a
channel's slab in cache between the two makes it one read from memory. The reductions walk the first
reduced axis backwards, so a dx pass that follows in the forward direction starts on what the caches
still hold. Inference mode (a non-trainable layer): ``dx = dy·gamma·inv_moving``,
``dgamma = Σdy·xhat_moving``, ``dbeta = Σdy``.

Kernel parameters: x, dy (canonical shape, spec.dtype), then ``gamma`` (scale), ``renorm_mean`` and
``renorm_stddev`` (renorm), ``moving_mean`` and ``moving_variance`` (inference), the adjustment
(channel or x shape); outputs dx (spec.dtype), then ``dgamma`` (scale) and ``dbeta`` (center),
channel-shaped float32.
"""

from __future__ import annotations

import math

import numpy as np

from bncompile.lower.kernels.compute import (SHIFT_MASK, STAT, WIDE, KernelSpec, _coarse, plain_sums, te_shapes,
                                              widen_to_stat)
from bncompile.lower.kernels.masking import keep_where

__all__ = ["backward_input_names", "backward_output_names", "backward_te", "backward_prim_func",
           "backward_numpy", "compensated_sums"]


def backward_variable_names(spec: KernelSpec) -> list[str]:
    names = ["gamma"] if spec.scale else []
    if not spec.training:
        return names + ["moving_mean", "moving_variance"]
    return names + (["renorm_mean", "renorm_stddev"] if spec.renorm else [])


def backward_input_names(spec: KernelSpec) -> list[str]:
    names = ["x", "dy"] + backward_variable_names(spec)
    if spec.training and spec.adjustment:
        names += ["adjustment_scale", "adjustment_bias"]
    return names


def backward_output_names(spec: KernelSpec) -> list[str]:
    return ["dx"] + (["dgamma"] if spec.scale else []) + (["dbeta"] if spec.center else [])


_REGISTERED: set = set()


def compensated_sums(te, tirx, pairs: int):
    """A TE reducer over ``pairs`` (value, compensation) pairs, each combined like
    :func:`bncompile.lower.kernels.compute.compensated_sum` (Fast2Sum; the bit-cast round trips hide the
    error term from TIR's simplifier). Registered for rfactor and cross-thread reductions."""

    def opaque(v):
        return tirx.reinterpret(STAT, tirx.reinterpret("int32", v))

    def combine(lhs, rhs):
        out = []
        for k in range(pairs):
            a, ca, b, cb = lhs[2 * k], lhs[2 * k + 1], rhs[2 * k], rhs[2 * k + 1]
            t = opaque(a + b)
            out += [t, (ca + cb) + (b - opaque(t - a))]
        return tuple(out)

    def identity(*dtypes):
        return tuple(tirx.const(0, d) for d in dtypes)

    if pairs not in _REGISTERED:
        import ctypes

        from bncompile.lower import tvm as _tvm

        tvm = _tvm.tvm()
        register = tvm.get_global_func("s_tir.schedule.RegisterReducer")
        getters = [tvm.runtime.convert(lambda x, y: list(combine(tuple(x), tuple(y)))),
                   tvm.runtime.convert(lambda vals: list(identity(*(str(v.ty.dtype) for v in vals))))]
        for g in getters:      # the registry outlives the interpreter (see compute.compensated_sum)
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(g))
        register(2 * pairs, *getters)
        _REGISTERED.add(pairs)
    return te.comm_reducer(combine, identity, name=f"ksum{pairs}")


def backward_te(spec: KernelSpec):
    """TE tensors ``(inputs, outputs)`` of the backward kernel (see the module docstring)."""
    from bncompile.lower import tvm as _tvm

    te, tirx = _tvm.te(), _tvm.tirx()

    f32 = widen_to_stat
    const = lambda v: tirx.const(float(v), STAT)  # noqa: E731
    # 1/sqrt, as compute.py spells it: what TVM legalizes rsqrt to, kept a vector op by the vectorizer
    # (tirx.rsqrt is not marked vectorizable: a vectorized loop holding it is scalarized; ghost (N, C)
    # has one per group and channel, a quarter of the elements at 4 samples per group)
    rsqrt = lambda v: const(1.0) / te.sqrt(v)  # noqa: E731
    c64 = lambda v: tirx.const(float(v), WIDE)  # noqa: E731
    f64 = lambda v: v.astype(WIDE)  # noqa: E731
    shape, cshape, gshape, rshape = te_shapes(spec)
    kinds = spec.kinds
    sshape = cshape + gshape
    nc = len(cshape)

    x = te.placeholder(shape, spec.dtype, name="x")
    dy = te.placeholder(shape, spec.dtype, name="dy")
    params = {n: te.placeholder(cshape, STAT, name=n) for n in backward_variable_names(spec)}
    inputs = [x, dy] + list(params.values())
    adj = {}
    full = spec.training and spec.adjustment == "full"
    chan = spec.training and spec.adjustment == "channel"
    if spec.training and spec.adjustment:
        ashape = cshape if chan else shape
        adj = {n: te.placeholder(ashape, STAT, name=n) for n in ("adjustment_scale", "adjustment_bias")}
        inputs += list(adj.values())

    def xidx(stat, red):
        ci, gi, ri = iter(stat[:nc]), iter(stat[nc:]), iter(red)
        return tuple(next(ci) if k == "C" else next(gi) if k == "G" else next(ri) for k in kinds)

    def cidx(idx):
        return tuple(i for i, k in zip(idx, kinds) if k == "C")

    def sidx(idx):
        return cidx(idx) + tuple(i for i, k in zip(idx, kinds) if k == "G")

    def raxes(tag):
        return [te.reduce_axis((0, s), name=f"{tag}{j}") for j, s in enumerate(rshape)]

    def backwards(red):         # the first reduced axis walked from its end (see the module docstring)
        return (rshape[0] - 1 - red[0],) + tuple(red[1:]) if red else tuple(red)

    eps = const(spec.epsilon)
    zero = const(0.0)
    gamma = (lambda c: params["gamma"][c]) if spec.scale else (lambda c: const(1.0))
    count = 1
    for s in rshape:
        count = count * s
    cnt64 = tirx.Cast(WIDE, count)
    outputs = []

    if not spec.training:
        inv = te.compute(cshape, lambda *c: rsqrt(params["moving_variance"][c] + eps), name="inv")
        r1 = raxes("r")
        ksum = compensated_sums(te, tirx, 2)

        def vals(c, red):
            i = xidx(c, backwards(red))
            d = f32(dy[i])
            return (d, zero, d * (f32(x[i]) - params["moving_mean"][c]), zero)

        red = te.compute(cshape, lambda *c: ksum(vals(c, r1), axis=r1), name="red")
        dx = te.compute(shape, lambda *i: (f32(dy[i]) * (inv[cidx(i)] * gamma(cidx(i)))).astype(spec.dtype),
                        name="dx")
        outputs = [dx]
        if spec.scale:
            outputs.append(te.compute(cshape, lambda *c: ((f64(red[2][c]) + f64(red[3][c])) * f64(inv[c]))
                                      .astype(STAT), name="dgamma"))
        if spec.center:
            outputs.append(te.compute(cshape, lambda *c: (f64(red[0][c]) + f64(red[1][c])).astype(STAT),
                                      name="dbeta"))
        return inputs, outputs

    zeros = tuple(0 for _ in rshape)
    shift = te.compute(sshape, lambda *s: _coarse(tirx, f32(x[xidx(s, zeros)])), name="shift")
    pairs = 6 if full else 4
    ksum = compensated_sums(te, tirx, pairs)
    r1 = raxes("r")

    def vals(s, red, keep=None, direct=False):
        """The summands at reduced index ``red`` (walked backwards unless ``direct``); ``keep``: a
        condition outside which x and dy count as zero (a masked tail)."""
        i = xidx(s, red if direct else backwards(red))
        xk = f32(x[i]) - shift[s]
        d = f32(dy[i])
        if keep is not None:
            xk, d = keep_where(keep, xk), keep_where(keep, d)     # not Selects: see masking.py
        u = d * adj["adjustment_scale"][i] if full else d
        out = (xk, zero, xk * xk, zero, u, zero, u * xk, zero)
        if full:
            out += (d, zero, d * adj["adjustment_bias"][i], zero)
        return out

    lanes = int(spec.stat_lanes)
    plain = bool(spec.stat_plain_m2) and lanes == 1 and int(spec.stat_rows) == 1
    if plain:
        # short groups (a schedule's request): plain float32 sums, within n*u of the compensated ones
        # for n <= LANE_BLOCK values (the accuracy argument of _blocked_red's blocks)
        if not isinstance(count, int) or count > LANE_BLOCK:
            raise ValueError(f"plain group sums need at most {LANE_BLOCK} values per group, not {count}")
        psum = plain_sums(te, tirx, pairs, "gsum")
        red = te.compute(sshape, lambda *s: psum(tuple(vals(s, r1)[0::2]), axis=r1), name="red")
    elif int(spec.stat_rows) > 1:
        red = _row_blocked_red(te, tirx, spec, shape, sshape, vals, ksum, pairs)
    elif lanes > 1:
        red = _blocked_red(te, tirx, spec, sshape, rshape, lanes, vals, ksum, pairs)
    else:
        red = te.compute(sshape, lambda *s: ksum(vals(s, r1), axis=r1), name="red")

    def total(k, s):
        if plain:
            return f64(red[k][s])
        return f64(red[2 * k][s]) + f64(red[2 * k + 1][s])

    mean64 = te.compute(sshape, lambda *s: total(0, s) / cnt64, name="mean64")
    mean = te.compute(sshape, lambda *s: mean64[s].astype(STAT), name="mean")
    if plain:
        # short groups: the variance from a second, centred pass over the group (its values are in L1).
        # The one-pass Σxk²/n - mean'² squares offsets from the coarse shift (up to 2^-11 |x|) in float32:
        # a group spread under ~2^-12 |x| cancels away (two values 1 ulp apart at 34013.6 gave var 0 and,
        # with epsilon 0, dx NaN; random testing)
        r2 = raxes("q")

        def centred(s):
            xc = (f32(x[xidx(s, r2)]) - shift[s]) - mean[s]
            return xc * xc

        sqc = te.compute(sshape, lambda *s: te.sum(centred(s), axis=r2), name="sqc")
        var = te.compute(sshape, lambda *s: (f64(sqc[s]) / cnt64).astype(STAT), name="var")
    else:
        var = te.compute(sshape, lambda *s: te.max(total(1, s) / cnt64 - mean64[s] * mean64[s], c64(0.0))
                         .astype(STAT), name="var")
    inv = te.compute(sshape, lambda *s: rsqrt(var[s] + eps), name="inv")
    # Σu·xc about the float32 mean that dx uses
    suxc = te.compute(sshape, lambda *s: total(3, s) - f64(mean[s]) * total(2, s), name="suxc")

    r_fn = d_fn = None
    if spec.renorm:
        clip = dict(spec.clipping)
        if gshape:
            ng = gshape[0]
            gcnt64 = tirx.Cast(WIDE, ng)
            g1 = te.reduce_axis((0, ng), name="g1")
            bmean64 = te.compute(cshape, lambda *c: te.sum((f64(shift[c + (g1,)]) + mean64[c + (g1,)]) / gcnt64,
                                                            axis=g1), name="batch_mean64")
            g2 = te.reduce_axis((0, ng), name="g2")
            bvar = te.compute(cshape, lambda *c: te.sum(var[c + (g2,)] / tirx.Cast(STAT, ng), axis=g2),
                              name="batch_var")
            bmean_of = lambda c: bmean64[c]  # noqa: E731
        else:
            bmean_of = lambda c: f64(shift[c]) + mean64[c]  # noqa: E731
            bvar = var
        inv_s = te.compute(cshape, lambda *c: const(1.0) / te.max(params["renorm_stddev"][c],
                                                                   const(math.sqrt(spec.epsilon))),
                           name="renorm_inv_s")

        def r_expr(*c):
            r = te.sqrt(bvar[c] + eps) * inv_s[c]
            if "rmin" in clip:
                r = te.max(r, const(clip["rmin"]))
            if "rmax" in clip:
                r = te.min(r, const(clip["rmax"]))
            return r

        def d_expr(*c):
            d = (bmean_of(c) - f64(params["renorm_mean"][c])).astype(STAT) * inv_s[c]
            if "dmax" in clip:
                d = te.min(te.max(d, const(-clip["dmax"])), const(clip["dmax"]))
            return d

        rr = te.compute(cshape, r_expr, name="renorm_r")
        dd = te.compute(cshape, d_expr, name="renorm_d")
        r_fn, d_fn = (lambda c: rr[c]), (lambda c: dd[c])

    def weight(c):             # w = gamma * r * adj_scale (per channel)
        w = gamma(c)
        if r_fn:
            w = w * r_fn(c)
        if chan:
            w = w * adj["adjustment_scale"][c]
        return w

    ncnt = cnt64
    ca = te.compute(sshape, lambda *s: inv[s] * weight(s[:nc]), name="coef_a")
    cb = te.compute(sshape, lambda *s: (-f64(ca[s]) * f64(inv[s]) * f64(inv[s]) * suxc[s] / ncnt).astype(STAT),
                    name="coef_b")
    cc = te.compute(sshape, lambda *s: (-f64(ca[s]) * total(2, s) / ncnt).astype(STAT), name="coef_c")

    def dx_expr(*i):
        s = sidx(i)
        xc = (f32(x[i]) - shift[s]) - mean[s]
        d = f32(dy[i])
        u = d * adj["adjustment_scale"][i] if full else d
        return (xc * cb[s] + (u * ca[s] + cc[s])).astype(spec.dtype)

    if spec.y_expand and not full:
        # a schedule's request, as the forward's y (compute.py): dx's per-statistic terms copied along Q in
        # one block, so that dx walks a run of several channels' rows in whole vectors
        one = te.reduce_axis((0, 1), name="one")
        copy = plain_sums(te, tirx, 5, "copy")
        terms = te.compute(sshape + (rshape[-1],), lambda *sq: copy(
            tuple(t[sq[:-1]] for t in (shift, mean, ca, cb, cc)), axis=one), name="dx_terms")

        def dx_run(*i):
            t = sidx(i) + (i[-1],)
            xc = (f32(x[i]) - terms[0][t]) - terms[1][t]
            return (xc * terms[3][t] + (f32(dy[i]) * terms[2][t] + terms[4][t])).astype(spec.dtype)

        dx = te.compute(shape, dx_run, name="dx")
    else:
        dx = te.compute(shape, dx_expr, name="dx")
    outputs = [dx]

    def gterm(s):              # the per-group contribution to dgamma
        c = s[:nc]
        t = f64(inv[s]) * suxc[s]
        if r_fn:
            t = t * f64(r_fn(c)) + f64(d_fn(c)) * total(2, s)
        if chan:
            t = t * f64(adj["adjustment_scale"][c]) + f64(adj["adjustment_bias"][c]) * total(2, s)
        if full:
            t = t + total(5, s)
        return t

    def bterm(s):
        return total(4, s) if full else total(2, s)

    def param_grad(name, term):
        if not gshape:
            return te.compute(cshape, lambda *c: term(c).astype(STAT), name=name)
        g = te.reduce_axis((0, gshape[0]), name=f"{name}_g")
        acc = te.compute(cshape, lambda *c: te.sum(term(c + (g,)), axis=g), name=f"{name}64")
        return te.compute(cshape, lambda *c: acc[c].astype(STAT), name=name)

    if spec.scale:
        outputs.append(param_grad("dgamma", gterm))
    if spec.center:
        outputs.append(param_grad("dbeta", bterm))
    return inputs, outputs


LANE_BLOCK = 64     # most elements per lane in a plain float32 block sum (blocked reductions)


def lane_block(q: int, lanes: int) -> int:
    """Elements per lane of one plain block sum: the largest divisor of ``m = q / lanes`` <= LANE_BLOCK;
    when that is under 8 (m has no useful divisor, e.g. a prime), the whole row lane (m) while
    m <= 4 * LANE_BLOCK, else that small divisor (slower, never less exact)."""
    m = q // lanes
    best = 1
    for d in range(min(m, LANE_BLOCK), 0, -1):
        if m % d == 0:
            best = d
            break
    if best < 8 and m <= 4 * LANE_BLOCK:
        return m
    return best


def _blocked_red(te, tirx, spec, sshape, rshape, lanes, vals, ksum, pairs):
    """The reduction ``red`` from blocks (``spec.stat_lanes = L > 1``): the last reduced axis (Q, the
    contiguous one) is cut as ``q = (qb*M + j)*L + l``; block ``(lead..., qb, l)`` (M elements, one lane
    of L) gets plain float32 sums of the values (one vector add or FMA per value and L elements, the
    accumulators in registers), and the blocks combine through the compensated pairs. A block's own
    rounding error is at most M*u relative to its sum of magnitudes (M <= :data:`LANE_BLOCK`), its
    total is then carried exactly, so the sums stay within a few ulps of the one-pass compensated ones
    for any n (the large-mean tests, mean 2e3 x the spread, hold the same tolerance)."""
    Q = int(rshape[-1])
    # ragged lanes (Q % L = rag: a schedule's request, as compute.py's): the row's V = ceil(Q / L) vectors,
    # the last one its last L values with the first L - rag lanes (counted by the vector before) masked
    # to 0; the sums need no per-lane counts
    rag = Q % lanes
    if rag and (lanes > Q or not tuple(rshape[:-1])):
        raise ValueError(f"stat_lanes {lanes}: at most the last reduced extent {Q}, under a leading reduced axis")
    V = -(-Q // lanes)
    M = lane_block(V * lanes, lanes)
    QB = V // M
    nval = len(sshape)
    lead = tuple(rshape[:-1])

    psum = plain_sums(te, tirx, pairs, "psum")
    bj = te.reduce_axis((0, M), name="bj")

    def block(*idx):
        s, rest = idx[:nval], idx[nval:]
        qb, l = rest[-2], rest[-1]
        vi = qb * M + bj
        if rag:
            pos = te.min(vi * lanes, Q - lanes) + l                  # contiguous: one vector load
            keep = te.min(te.max(pos - vi * lanes + 1, 0), 1)        # 0/1 integers: l varies across lanes
            v = vals(s, tuple(rest[:-2]) + (pos,), keep=keep)
        else:
            v = vals(s, tuple(rest[:-2]) + (vi * lanes + l,))
        return psum(tuple(v[2 * k] for k in range(pairs)), axis=[bj])

    bs = te.compute(sshape + lead + (QB, lanes), block, name="bsum")
    zero = tirx.const(0.0, STAT)
    ra = [te.reduce_axis((0, e), name=f"b{j}") for j, e in enumerate(lead + (QB, lanes))]

    def combine(*s):
        i = tuple(s) + tuple(ra)
        out = ()
        for k in range(pairs):
            out += (bs[k][i], zero)
        return out

    return te.compute(sshape, lambda *s: ksum(combine(*s), axis=ra), name="red")


def _row_blocked_red(te, tirx, spec, shape, sshape, vals, ksum, pairs):
    """The reduction ``red`` from *row blocks* (``spec.stat_rows = R > 1``; channels last, x viewed as
    (N, P, C, Q) with P*Q*R <= :data:`LANE_BLOCK`): block ``(nb, c)`` gets plain float32 sums over the
    samples ``nb*R .. nb*R+R-1`` (all of their P*Q values), the blocks combine through the compensated
    pairs (the accuracy argument of :func:`_blocked_red`: a block sums at most LANE_BLOCK values). The
    last block of a batch R does not divide is masked (its missing samples read the last one and add
    exact zeros). ``bsum`` is stored block-major, (NB, C): a block's sums are contiguous across the
    channels, so a schedule reduces whole rows, vectorized across them."""
    if spec.kinds != "RRCR" or spec.ghost:
        raise ValueError(f"stat_rows needs a channels-last (N, P, C, Q) view, not {spec.kinds}")
    N, P, C, Q = shape
    R = int(spec.stat_rows)
    if not isinstance(P, int) or not isinstance(Q, int) or R * P * Q > LANE_BLOCK:
        raise ValueError(f"stat_rows {R} x {P} x {Q} values per block: at most {LANE_BLOCK}")
    NB = (N + (R - 1)) // R
    ri, rp, rq = (te.reduce_axis((0, e), name=n) for e, n in ((R, "ri"), (P, "rp"), (Q, "rq")))
    exact = isinstance(N, int) and N % R == 0

    psum = plain_sums(te, tirx, pairs, "rsum")

    def block(nb, c):
        n = nb * R + ri
        if exact:
            v = vals((c,), (n, rp, rq), direct=True)
        else:
            v = vals((c,), (te.min(n, N - 1), rp, rq), keep=n < N, direct=True)
        return psum(tuple(v[2 * k] for k in range(pairs)), axis=[ri, rp, rq])

    bs = te.compute((NB, C), block, name="bsum")
    zero = tirx.const(0.0, STAT)
    rb = te.reduce_axis((0, NB), name="rb")
    return te.compute(sshape, lambda c: ksum(sum(((bs[k][rb, c], zero) for k in range(pairs)), ()), axis=[rb]),
                      name="red")


def backward_prim_func(spec: KernelSpec):
    """The unscheduled backward PrimFunc of ``spec`` (parameters: inputs then outputs)."""
    from bncompile.lower import tvm as _tvm

    ins, outs = backward_te(spec)
    return _tvm.te().create_prim_func(ins + outs)


# --------------------------------------------------------------------------- NumPy twin

def backward_numpy(spec: KernelSpec, x: np.ndarray, dy: np.ndarray, variables: dict,
                   adjustment: tuple | None = None) -> dict[str, np.ndarray]:
    """The same algorithm as :func:`backward_te` in NumPy on the canonical view (float64 stands for the
    compensated sums). ``variables`` are channel-shaped; returns ``dx`` (canonical shape, float32),
    ``dgamma``/``dbeta`` (channel shape) by name."""
    f, w = np.float32, np.float64
    xs = np.asarray(x).astype(f)
    ds = np.asarray(dy).astype(f)
    kinds = spec.kinds
    raxes = tuple(i for i, k in enumerate(kinds) if k == "R")
    gaxes = tuple(i for i, k in enumerate(kinds) if k == "G")
    cb = tuple(xs.shape[i] if k == "C" else 1 for i, k in enumerate(kinds))
    cs = tuple(xs.shape[i] for i, k in enumerate(kinds) if k == "C")
    as_c = lambda v: np.asarray(v, f).reshape(cb)  # noqa: E731
    gamma = as_c(variables["gamma"]) if spec.scale else f(1)
    eps = f(spec.epsilon)
    out = {}
    if not spec.training:
        inv = f(1) / np.sqrt(as_c(variables["moving_variance"]) + eps)
        out["dx"] = (ds * (inv * gamma)).astype(f)
        xhat = (xs - as_c(variables["moving_mean"])).astype(w) * inv
        dg, db = (ds * xhat).sum(axis=raxes, dtype=w), ds.sum(axis=raxes, dtype=w)
    else:
        first = tuple(slice(None) if k in "CG" else slice(0, 1) for k in kinds)
        shift = (np.ascontiguousarray(xs[first]).view(np.uint32) & np.uint32(SHIFT_MASK)).view(f)
        n = int(np.prod([xs.shape[i] for i in raxes]))
        xk = xs - shift
        full = spec.adjustment == "full"
        adj_s = adj_b = None
        if adjustment is not None:
            ashape = cb if spec.adjustment == "channel" else xs.shape
            adj_s, adj_b = (np.asarray(a, f).reshape(ashape) for a in adjustment)
        u = ds * adj_s if full else ds
        mean64 = xk.sum(axis=raxes, keepdims=True, dtype=w) / n
        mean = mean64.astype(f)
        var = np.maximum((xk.astype(w) ** 2).sum(axis=raxes, keepdims=True) / n - mean64 ** 2, 0).astype(f)
        inv = f(1) / np.sqrt(var + eps)
        su = u.sum(axis=raxes, keepdims=True, dtype=w)
        suxc = (u.astype(w) * xk).sum(axis=raxes, keepdims=True) - mean.astype(w) * su
        r = d = None
        if spec.renorm:
            clip = dict(spec.clipping)
            bmean = (shift.astype(w) + mean64).mean(axis=gaxes, keepdims=True) if gaxes else shift + mean64
            bvar = var.mean(axis=gaxes, keepdims=True, dtype=w).astype(f) if gaxes else var
            inv_s = f(1) / np.maximum(as_c(variables["renorm_stddev"]), f(math.sqrt(spec.epsilon)))
            r = np.sqrt(bvar + eps) * inv_s
            d = (bmean - as_c(variables["renorm_mean"]).astype(w)).astype(f) * inv_s
            if "rmin" in clip:
                r = np.maximum(r, f(clip["rmin"]))
            if "rmax" in clip:
                r = np.minimum(r, f(clip["rmax"]))
            if "dmax" in clip:
                d = np.clip(d, f(-clip["dmax"]), f(clip["dmax"]))
        wgt = gamma * (r if r is not None else f(1)) * (adj_s if spec.adjustment == "channel" else f(1))
        a = (inv * wgt).astype(f)
        b = (-a.astype(w) * inv.astype(w) ** 2 * suxc / n).astype(f)
        c = (-a.astype(w) * su / n).astype(f)
        out["dx"] = ((xk - mean) * b + (u * a + c)).astype(f)
        t = inv.astype(w) * suxc
        if r is not None:
            t = t * r + d.astype(w) * su
        if spec.adjustment == "channel":
            t = t * adj_s + adj_b.astype(w) * su
        if full:
            t = t + (ds.astype(w) * adj_b).sum(axis=raxes, keepdims=True)
        db = ds.sum(axis=raxes, keepdims=True, dtype=w)
        dg = t.sum(axis=gaxes, keepdims=True) if gaxes else t
        db = db.sum(axis=gaxes, keepdims=True) if gaxes else db
    if spec.scale:
        out["dgamma"] = np.asarray(dg, f).reshape(cs)
    if spec.center:
        out["dbeta"] = np.asarray(db, f).reshape(cs)
    return out
