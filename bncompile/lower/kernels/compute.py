"""Batch normalization as pure TE compute definitions (no schedule), plus their NumPy twin.

One PrimFunc computes ``y`` and every variable a training step updates. The math is
``docs/batchnorm-semantics.md``'s, with ONNX/Keras momentum (``EMA_m(v, t) = v*m + t*(1-m)``):

* statistics per channel ``c`` (and per virtual batch ``g`` for ghost BN) over every other axis:
  ``K = x[first element]`` (a shift taken from the data), ``mu' = sum(x - K)/n``,
  ``var = sum((x - K - mu')**2)/n`` (biased). Two passes about a data shift keep the variance exact
  when the mean is 1e4 times the std; ``y = ((x - K) - mu') * A + B`` keeps ``y`` exact there too
  (``(x - mean)`` with a float32 ``mean = K + mu'`` would lose it to rounding of the mean).
  Every sum is *compensated* (:func:`compensated_sum`: TwoSum pairs, combined exactly by rfactor and
  cross-thread reductions too), and the per-channel finalization (``mu'``, ``var``, ``mu_B = K + mu'``)
  runs in float64 and is rounded once: a plain float32 sum of n offsets of size |K - mu| ~ std is off by
  ~n*u*std (1e-3 in the mean of 65536 values 100*N(0, 1)); the compensated one is exact to float32
  rounding of the result, whatever the ratio of mean to spread.
  A CPU schedule may ask for *blocked* statistics instead (``KernelSpec.stat_block``/``stat_lanes``/
  ``stat_rows``, :func:`_blocked_statistics`): the same two passes about K, per small block (rows of
  one sample, or of ``stat_rows`` samples) that is still in cache for its second pass, then combined
  exactly, so x is read from memory once. With
  ``stat_plain_m2`` (blocks of at most :data:`PLAIN_M2_MAX` elements) a block's sum of squares is a
  plain float32 sum about the block's centre: non-negative terms, so its relative error is bounded by
  (m-1)*u whatever the data, and compensation is kept for the sums and across blocks. Unblocked,
  ``stat_plain_m2`` (a ghost schedule's request for groups of at most :data:`PLAIN_GROUP_MAX` = 4 values,
  e.g. (N, C) with v = 4) makes both sums of a group plain float32 sums about K: m offsets sum to
  within (m-1)*u*sum|x - K| (far below the mean's own rounding when the mean dwarfs the spread), and
  the averages over the groups stay float64.
* ``A = rsqrt(var + eps) * r * adj_scale * gamma``, ``B = (d * adj_scale + adj_bias) * gamma + beta``,
  with ``r = 1, d = 0`` without renorm and ``adj = (1, 0)`` without adjustment.
* renorm: ``s = max(renorm_stddev, sqrt(eps))``, ``r = clip(sqrt(var_B + eps)/s)``,
  ``d = clip((mu_B - renorm_mean)/s)``, rmin applied first (max), then rmax (min), d to [-dmax, dmax].
* ghost BN: x (N, ...) is viewed as (v, N/v, ...) and sample i is in group i % (N/v); each group is
  normalized with its own statistics; ``mu_B`` and ``var_B`` are the plain averages of the group ones.
* Keras's fused path updates moving_variance with ``var * n/(n-1)`` (1 when n = 1).

The kernel works on a *canonical view* of x (a free reshape of the contiguous array): axis 0 (the
batch, which may be symbolic) alone, then runs of adjacent reduced (``R``) or channel (``C``) axes
merged. One channel run gives ``(N, P, C, Q)`` (P, Q may be 1), ghost BN ``(v, G, P, C, Q)`` with the
group axis ``G`` symbolic when the batch is. Variables are passed in their channel shape.
Statistics are float32 whatever x's dtype (float32, float16, bfloat16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bncompile.config import BatchNormConfig, RandomAdjustment, training_effective
from bncompile.errors import ConfigError, UnsupportedError
from bncompile.lower.kernels.masking import keep_where

SYMBOLIC = "n"          # marks the symbolic (batch) extent in a KernelSpec shape
DTYPES = ("float32", "float16", "bfloat16")
STAT = "float32"
WIDE = "float64"        # per-channel finalization of the statistics (O(C) work): rounded once to float32


@dataclass(frozen=True)
class KernelSpec:
    """Everything a kernel's compute depends on (hashable: the compile cache key)."""

    training: bool
    shape: tuple                 # canonical x shape; ints and at most one SYMBOLIC
    kinds: str                   # one letter per canonical axis: R reduced, C channel, G virtual-batch group
    dtype: str = "float32"
    epsilon: float = 1e-3
    momentum: float = 0.99
    renorm_momentum: float = 0.99
    center: bool = True
    scale: bool = True
    renorm: bool = False
    clipping: tuple = ()         # sorted (key, value) pairs of renorm_clipping
    unbiased: bool = False       # Keras fused path: moving variance with n/(n-1)
    adjustment: str | None = None  # None, "channel" (per-channel inputs) or "full" (x-shaped inputs)
    virtual_batch_size: int | None = None
    stat_block: int = 0          # >0: blocked statistics (_blocked_statistics): rows of P per block
    stat_lanes: int = 1          # ... and interleaved lanes of Q per row
    stat_plain_m2: bool = False  # ... block sums of squares in plain float32 (short blocks: _blocked_statistics)
    stat_rows: int = 1           # ... and samples per block (>1: sample blocks, the batch cut in blocks of R)
    y_expand: bool = False       # y from per-(c, [g,] q) copies of its per-channel terms (see batchnorm_te)

    @property
    def ghost(self) -> bool:
        return "G" in self.kinds

    @property
    def channel_shape(self) -> tuple:
        return tuple(s for s, k in zip(self.shape, self.kinds) if k == "C")

    @property
    def stat_shape(self) -> tuple:
        """Shape of per-(channel, group) statistics: channel axes first, then the group axis."""
        return self.channel_shape + tuple(s for s, k in zip(self.shape, self.kinds) if k == "G")

    @property
    def single_channel_run(self) -> bool:
        return self.kinds in ("RRCR", "RGRCR")

    def variable_names(self) -> list[str]:
        names = (["gamma"] if self.scale else []) + (["beta"] if self.center else [])
        names += ["moving_mean", "moving_variance"]
        if self.renorm and self.training:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return names

    def updated_names(self) -> list[str]:
        if not self.training:
            return []
        return [n for n in self.variable_names() if n not in ("gamma", "beta")]

    def input_names(self) -> list[str]:
        names = ["x"] + self.variable_names()
        if self.training and self.adjustment:
            names += ["adjustment_scale", "adjustment_bias"]
        return names

    def output_names(self) -> list[str]:
        return ["y"] + [n + "_new" for n in self.updated_names()]

    def adjustment_shape(self) -> tuple:
        return self.channel_shape if self.adjustment == "channel" else self.shape


# --------------------------------------------------------------------------- canonical view

def canonical_layout(config: BatchNormConfig, input_shape: Sequence, *, training: bool
                     ) -> tuple[tuple, str]:
    """Canonical (shape, kinds) of x for ``config`` (see the module docstring).

    ``input_shape[0]`` may be None (symbolic batch; returned as SYMBOLIC); other dims must be known.
    """
    shape = list(input_shape)
    rank = len(shape)
    res = config.resolve(rank)
    for i, d in enumerate(shape):
        if i == 0 and d is None:
            continue
        if d is None or int(d) <= 0:
            raise ConfigError(f"input_shape: dimension {i} must be a known positive size, got {d!r}")
    if shape[0] is None and 0 in res.axes:
        raise ConfigError("input_shape: the batch axis 0 is normalized, so its size must be known")
    n0 = SYMBOLIC if shape[0] is None else int(shape[0])
    ghost = training_effective(config, training) and config.virtual_batch_size is not None
    runs: list[list] = []          # [extent, kind] for axes 1..rank-1, merged
    for i in range(1, rank):
        kind = "C" if i in res.axes else "R"
        if runs and runs[-1][1] == kind:
            runs[-1][0] *= int(shape[i])
        else:
            runs.append([int(shape[i]), kind])
    if ghost:
        v = config.virtual_batch_size
        if n0 != SYMBOLIC and n0 % v:
            raise ConfigError(f"virtual_batch_size: {v} does not divide the batch size {n0}; "
                              "use a batch that is a multiple of it")
        head = [(v, "R"), (SYMBOLIC if n0 == SYMBOLIC else n0 // v, "G")]
    else:
        head = [(n0, "C" if 0 in res.axes else "R")]
    kinds_rest = "".join(k for _, k in runs)
    if head[0][1] == "R" and kinds_rest.count("C") == 1:
        # pad to (..., P, C, Q) so that every single-channel layout has one form
        if not runs or runs[0][1] == "C":
            runs.insert(0, [1, "R"])
        if runs[-1][1] == "C":
            runs.append([1, "R"])
    dims = head + [tuple(r) for r in runs]
    return tuple(d for d, _ in dims), "".join(k for _, k in dims)


def make_spec(config: BatchNormConfig, input_shape: Sequence, *, training: bool = True,
              dtype: str = "float32", adjustment: str | None = None) -> KernelSpec:
    """The KernelSpec of ``config`` applied to ``input_shape`` (None allowed for the batch)."""
    if dtype not in DTYPES:
        raise UnsupportedError(f"dtype: {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    train = training_effective(config, training)
    res = config.resolve(len(input_shape))
    shape, kinds = canonical_layout(config, input_shape, training=train)
    adj = None
    if train and config.adjustment is not None:
        if adjustment is None:
            adjustment = "channel" if isinstance(config.adjustment, RandomAdjustment) else "full"
        if adjustment not in ("channel", "full"):
            raise UnsupportedError(f"adjustment: kernel mode {adjustment!r}; use 'channel' or 'full'")
        adj = adjustment
    clipping = tuple(sorted((config.renorm_clipping or {}).items())) if config.renorm else ()
    return KernelSpec(training=train, shape=shape, kinds=kinds, dtype=dtype, epsilon=float(res.epsilon),
                      momentum=float(config.momentum), renorm_momentum=float(config.renorm_momentum),
                      center=config.center, scale=config.scale, renorm=bool(config.renorm) and train,
                      clipping=clipping, unbiased=bool(res.fused) and train, adjustment=adj,
                      virtual_batch_size=config.virtual_batch_size if "G" in kinds else None)


def canonical_shape(spec: KernelSpec, x_shape: Sequence[int]) -> tuple[int, ...]:
    """The canonical view's concrete shape for an actual x of ``x_shape``."""
    size = int(np.prod(x_shape))
    known = [int(s) for s in spec.shape if s != SYMBOLIC]
    if SYMBOLIC not in spec.shape:
        out = tuple(int(s) for s in spec.shape)
    else:
        rest = int(np.prod(known)) if known else 1
        if size % rest:
            raise ConfigError(f"x: shape {tuple(x_shape)} does not fit the compiled layout {spec.shape}")
        out = tuple(size // rest if s == SYMBOLIC else int(s) for s in spec.shape)
    if int(np.prod(out)) != size:
        raise ConfigError(f"x: shape {tuple(x_shape)} does not match the compiled input shape")
    return out


# --------------------------------------------------------------------------- TE compute

def widen_to_stat(v):
    """A TIR value in the statistics' type (float32). bfloat16 is float32's upper half: exact bit
    widening, because TVM 0.27's bf16 legalization miscompiles a bf16 Cast inside a tuple (compensated)
    reduction and leaves this form alone."""
    from bncompile.lower import tvm as _tvm

    tirx = _tvm.tirx()
    if v.dtype == STAT:
        return v
    if v.dtype == "bfloat16":
        u = tirx.reinterpret("uint16", v).astype("uint32")
        return tirx.reinterpret(STAT, u << tirx.const(16, "uint32"))
    return v.astype(STAT)


def te_shapes(spec: KernelSpec):
    """``(shape, channel dims, group dims, reduced dims)`` of a spec's canonical x, its symbolic extent a
    TE variable ``n``."""
    from bncompile.lower import tvm as _tvm

    sym = _tvm.te().var("n", dtype="int32")
    shape = tuple(sym if s == SYMBOLIC else int(s) for s in spec.shape)
    pick = lambda kind: tuple(s for s, k in zip(shape, spec.kinds) if k == kind)  # noqa: E731
    return shape, pick("C"), pick("G"), pick("R")


def batchnorm_te(spec: KernelSpec):
    """TE tensors ``(inputs, outputs)`` of the kernel; ``te.create_prim_func(inputs + outputs)``.

    Inputs in order: x (canonical shape, spec.dtype), the variables (channel shape, float32),
    then adjustment_scale / adjustment_bias (channel or x shape) when the spec has an adjustment.
    Outputs: y (x's shape and dtype), then the updated variables.
    """
    from bncompile.lower import tvm as _tvm

    te, tirx = _tvm.te(), _tvm.tirx()

    f32 = widen_to_stat
    const = lambda v: tirx.const(float(v), STAT)  # noqa: E731
    shape, cshape, gshape, rshape = te_shapes(spec)
    kinds = spec.kinds
    sshape = cshape + gshape
    nc = len(cshape)

    x = te.placeholder(shape, spec.dtype, name="x")
    params = {n: te.placeholder(cshape, STAT, name=n) for n in spec.variable_names()}
    inputs = [x] + [params[n] for n in spec.variable_names()]
    adj = {}
    if spec.adjustment:
        ashape = cshape if spec.adjustment == "channel" else shape
        adj = {n: te.placeholder(ashape, STAT, name=n) for n in ("adjustment_scale", "adjustment_bias")}
        inputs += list(adj.values())

    def xidx(stat, red):
        ci, gi, ri = iter(stat[:nc]), iter(stat[nc:]), iter(red)
        return tuple(next(ci) if k == "C" else next(gi) if k == "G" else next(ri) for k in kinds)

    def cidx(idx):   # x index -> channel index
        return tuple(i for i, k in zip(idx, kinds) if k == "C")

    def sidx(idx):   # x index -> statistics index
        return cidx(idx) + tuple(i for i, k in zip(idx, kinds) if k == "G")

    # 1/sqrt: what TVM legalizes rsqrt to on every target, spelled so that the vectorizer keeps it a
    # vector op (tirx.rsqrt is not marked vectorizable: a vectorized loop with it is scalarized)
    rsqrt = lambda v: const(1.0) / te.sqrt(v)  # noqa: E731
    gamma = (lambda c: params["gamma"][c]) if spec.scale else (lambda c: const(1.0))
    beta = (lambda c: params["beta"][c]) if spec.center else (lambda c: const(0.0))
    eps = const(spec.epsilon)

    if not spec.training:
        a = te.compute(cshape, lambda *c: rsqrt(params["moving_variance"][c] + eps) * gamma(c),
                       name="scale_c")
        y = te.compute(shape, lambda *i: ((f32(x[i]) - params["moving_mean"][cidx(i)]) * a[cidx(i)]
                                          + beta(cidx(i))).astype(spec.dtype), name="y")
        return inputs, [y]

    def raxes(tag):
        return [te.reduce_axis((0, s), name=f"{tag}{j}") for j, s in enumerate(rshape)]

    zeros = tuple(0 for _ in rshape)
    count = 1
    for s in rshape:
        count = count * s
    cnt = tirx.Cast(STAT, count)
    cnt64 = tirx.Cast(WIDE, count)
    zero = const(0.0)
    ksum = compensated_sum(te, tirx)
    f64 = lambda v: v.astype(WIDE)  # noqa: E731
    # A static power-of-two count (ghost groups often are): the float64 finalization of a per-group mean
    # or variance, (f64(s0) + f64(s1)) / n rounded to float32, is bit for bit fl32(s0 + s1) * (1/n) (the
    # float64 sum of the two parts is exact, scaling by 2**-k is exact, one rounding either way), which
    # costs no conversions: O(C*G) work with ghost BN.
    pow2 = isinstance(count, int) and count > 0 and count & (count - 1) == 0 and not spec.stat_block
    inv_cnt = const(1.0 / count) if pow2 else None
    # K: the first element with its low 12 mantissa bits cleared (within 2**-11 of it): x - K is then
    # exact for every |x| in [|K|/2, 4096|K|). With K's full mantissa, x - K rounds away K's low bits the
    # same way for every x of a binade: a systematic error in the mean (6 ulps of it for 100*N(0, 1)).
    shift = te.compute(sshape, lambda *s: _coarse(tirx, f32(x[xidx(s, zeros)])), name="shift")
    if spec.stat_block:
        ssum, mean64, mean, sqsum = _blocked_statistics(spec, te, x, shift, f32, cnt64, shape, ksum)
    else:
        r1 = raxes("r")
        plain = bool(spec.stat_plain_m2)
        if plain and (not isinstance(count, int) or count > PLAIN_GROUP_MAX):
            raise ValueError(f"plain sums need at most {PLAIN_GROUP_MAX} values per statistic, not {count}")
        if plain:
            # a short group (a schedule's request: ghost (N, C)): plain float32 sums about K. Every
            # x - K is exact where |x| >> |x - K|, and m terms sum to within (m-1)*u*sum|x - K|: for
            # data whose mean dwarfs its spread, far below the rounding of the mean itself; for
            # other data, at m <= PLAIN_GROUP_MAX, as far off as the compensated sums measured. The sum of
            # squares has non-negative terms: within (m-1)*u relative whatever the data
            ssum = (te.compute(sshape, lambda *s: te.sum(f32(x[xidx(s, r1)]) - shift[s], axis=r1), name="sum"),
                    _Zero(zero))
        else:
            ssum = te.compute(sshape, lambda *s: ksum((f32(x[xidx(s, r1)]) - shift[s], zero), axis=r1),
                              name="sum")
        # offset from shift: the compensated sum's two parts added and divided in float64, rounded once
        mean64 = te.compute(sshape, lambda *s: (f64(ssum[0][s]) + f64(ssum[1][s])) / cnt64, name="mean64")
        if pow2:
            # the same bits in float32: s0 + s1 rounded once, then an exact scaling by 1/count
            mean = te.compute(sshape, lambda *s: (ssum[0][s] + ssum[1][s]) * inv_cnt, name="mean")
        else:
            mean = te.compute(sshape, lambda *s: mean64[s].astype(STAT), name="mean")
        r2 = raxes("q")

        def centered(s, red):
            return (f32(x[xidx(s, red)]) - shift[s]) - mean[s]

        if plain:
            sqsum = (te.compute(sshape, lambda *s: te.sum(centered(s, r2) * centered(s, r2), axis=r2),
                                name="sqsum"), _Zero(zero))
        else:
            sqsum = te.compute(sshape, lambda *s: ksum((centered(s, r2) * centered(s, r2), zero), axis=r2),
                               name="sqsum")
    if pow2:
        var = te.compute(sshape, lambda *s: (sqsum[0][s] + sqsum[1][s]) * inv_cnt, name="var")
    else:
        var = te.compute(sshape, lambda *s: ((f64(sqsum[0][s]) + f64(sqsum[1][s])) / cnt64).astype(STAT),
                         name="var")

    if gshape:
        ng = gshape[0]
        gcnt64 = tirx.Cast(WIDE, ng)
        # mean of the group means as (mean of group shifts) + (mean of offsets), in float64: both exact.
        # The group sums are divided once per channel (a division per term would be O(C*G) divisions).
        g2 = te.reduce_axis((0, ng), name="g2")
        bshift = None
        if spec.stat_block:
            # blocked statistics: the groups' (shift + offset) in one float64 sum (each term rounded once
            # at 2**-53: far below float32), a reduction reading mean64, which a schedule can place under
            # the task of its channels (a sum of the shifts alone reads only x: every task's would be all)
            boff = te.compute(cshape, lambda *c: te.sum(f64(shift[c + (g2,)]) + mean64[c + (g2,)], axis=g2),
                              name="batch_offset")
        else:
            g1 = te.reduce_axis((0, ng), name="g1")
            bshift = te.compute(cshape, lambda *c: te.sum(f64(shift[c + (g1,)]), axis=g1), name="batch_shift")
            if pow2:     # the groups' float64 offsets from the sum parts (no per-group float64 buffer)
                boff = te.compute(cshape, lambda *c: te.sum((f64(ssum[0][c + (g2,)]) + f64(ssum[1][c + (g2,)]))
                                                            / cnt64, axis=g2), name="batch_offset")
            else:
                boff = te.compute(cshape, lambda *c: te.sum(mean64[c + (g2,)], axis=g2), name="batch_offset")
        g3 = te.reduce_axis((0, ng), name="g3")
        bvar_sum = te.compute(cshape, lambda *c: te.sum(f64(var[c + (g3,)]), axis=g3), name="batch_var")
        bvar = te.compute(cshape, lambda *c: (bvar_sum[c] / gcnt64).astype(STAT), name="batch_var_mean")
        if bshift is None:
            bmean_parts = lambda c: (boff[c] / gcnt64, tirx.const(0.0, WIDE))  # noqa: E731
        else:
            bmean_parts = lambda c: (bshift[c] / gcnt64, boff[c] / gcnt64)  # noqa: E731
    else:
        bmean_parts = lambda c: (f64(shift[c]), mean64[c])  # noqa: E731
        bvar = var
    # float64 parts, rounded once: exact to float32 rounding of the batch mean itself
    bmean = te.compute(cshape, lambda *c: (bmean_parts(c)[0] + bmean_parts(c)[1]).astype(STAT), name="batch_mean")

    m = spec.momentum
    ema = lambda v, t, mom: v * const(mom) + t * const(1.0 - mom)  # noqa: E731
    outputs_vars = {}
    outputs_vars["moving_mean"] = te.compute(
        cshape, lambda *c: ema(params["moving_mean"][c], bmean[c], m), name="moving_mean_new")
    r_fn = d_fn = None
    if spec.renorm:
        clip = dict(spec.clipping)
        bstd = te.compute(cshape, lambda *c: te.sqrt(bvar[c] + eps), name="batch_std")
        inv_s = te.compute(cshape, lambda *c: const(1.0) / te.max(params["renorm_stddev"][c],
                                                                   const(math.sqrt(spec.epsilon))),
                           name="renorm_inv_s")

        def r_expr(*c):      # one index per channel axis (axis lists: several)
            r = bstd[c] * inv_s[c]
            if "rmin" in clip:
                r = te.max(r, const(clip["rmin"]))
            if "rmax" in clip:
                r = te.min(r, const(clip["rmax"]))
            return r

        def d_expr(*c):      # one index per channel axis (axis lists: several)
            p = bmean_parts(c)
            d = ((p[0] - f64(params["renorm_mean"][c])) + p[1]).astype(STAT) * inv_s[c]
            if "dmax" in clip:
                d = te.min(te.max(d, const(-clip["dmax"])), const(clip["dmax"]))
            return d

        rr = te.compute(cshape, r_expr, name="renorm_r")
        dd = te.compute(cshape, d_expr, name="renorm_d")
        r_fn, d_fn = (lambda c: rr[c]), (lambda c: dd[c])
        rm = spec.renorm_momentum
        mstd = te.compute(cshape, lambda *c: ema(params["moving_stddev"][c], bstd[c], m), name="moving_stddev_new")
        outputs_vars["moving_variance"] = te.compute(
            cshape, lambda *c: te.max(mstd[c] * mstd[c] - eps, const(0.0)), name="moving_variance_new")
        outputs_vars["moving_stddev"] = mstd
        outputs_vars["renorm_mean"] = te.compute(
            cshape, lambda *c: ema(params["renorm_mean"][c], bmean[c], rm), name="renorm_mean_new")
        outputs_vars["renorm_stddev"] = te.compute(
            cshape, lambda *c: ema(params["renorm_stddev"][c], bstd[c], rm), name="renorm_stddev_new")
    else:
        if spec.unbiased:
            if isinstance(count, int):
                factor = const(count / (count - 1) if count > 1 else 1.0)
            else:   # symbolic count: n/(n-1), 1 when n = 1 (max() keeps the division finite)
                factor = tirx.Select(count > 1, cnt / te.max(cnt - const(1.0), const(1.0)), const(1.0))
        else:
            factor = None
        outputs_vars["moving_variance"] = te.compute(
            cshape, lambda *c: ema(params["moving_variance"][c],
                                   bvar[c] * factor if factor is not None else bvar[c], m),
            name="moving_variance_new")

    def r_of(c):
        return r_fn(c) if r_fn else None

    def bias_expr(c, as_, ab_):
        t = d_fn(c) if d_fn else None
        if as_ is not None:
            t = t * as_ + ab_ if t is not None else ab_
        if t is None:
            return beta(c)
        return t * gamma(c) + beta(c)

    if spec.adjustment == "full":
        def inv_r(*s):
            v = rsqrt(var[s] + eps)
            r = r_of(s[:nc])
            return v * r if r is not None else v

        a = te.compute(sshape, inv_r, name="scale_c")

        def y_full(*i):
            s, c = sidx(i), cidx(i)
            t = ((f32(x[i]) - shift[s]) - mean[s]) * a[s]
            if d_fn:
                t = t + d_fn(c)
            t = t * adj["adjustment_scale"][i] + adj["adjustment_bias"][i]
            return (t * gamma(c) + beta(c)).astype(spec.dtype)

        y = te.compute(shape, y_full, name="y")
    else:
        chan = spec.adjustment == "channel"

        def scale_expr(*s):
            c = s[:nc]
            v = rsqrt(var[s] + eps)
            r = r_of(c)
            if r is not None:
                v = v * r
            if chan:
                v = v * adj["adjustment_scale"][c]
            return v * gamma(c) if spec.scale else v

        a = te.compute(sshape, scale_expr, name="scale_c")
        b = te.compute(cshape, lambda *c: bias_expr(c, adj["adjustment_scale"][c] if chan else None,
                                                    adj["adjustment_bias"][c] if chan else None),
                       name="bias_c")
        if spec.y_expand:
            # a schedule's request ((N, P, C, Q) or ghost (v, G, P, C, Q)): y's per-channel (and group)
            # terms copied along Q, so that y can walk a run of several channels' rows (C x Q contiguous
            # values) in whole vectors, each lane loading its own channel's terms (rows of 49 or 196 values
            # are no multiple of a register)
            if spec.kinds not in ("RRCR", "RGRCR"):
                raise ValueError(f"y_expand needs a (N, P, C, Q) or (v, G, P, C, Q) view, not {spec.kinds}")
            Q_ = shape[-1]
            # one block for the four (a one-term sum of each: 0 + v is v), so that the copy of the shift
            # (which reads only x) is placed with the statistics it goes with, not over every channel
            one = te.reduce_axis((0, 1), name="one")
            copy = plain_sums(te, tirx, 4, "copy")
            terms = te.compute(sshape + (Q_,), lambda *sq: copy((shift[sq[:-1]], mean[sq[:-1]], a[sq[:-1]],
                                                                 b[sq[:nc]]), axis=one), name="y_terms")

            def y_run(*i):
                t = sidx(i) + (i[-1],)
                return (((f32(x[i]) - terms[0][t]) - terms[1][t]) * terms[2][t] + terms[3][t]).astype(spec.dtype)

            y = te.compute(shape, y_run, name="y")
        else:
            y = te.compute(shape, lambda *i: (((f32(x[i]) - shift[sidx(i)]) - mean[sidx(i)]) * a[sidx(i)]
                                              + b[cidx(i)]).astype(spec.dtype), name="y")
    outputs = [y] + [outputs_vars[n] for n in spec.updated_names()]
    return inputs, outputs


def plain_sums(te, tirx, n: int, name: str):
    """A TE reducer of ``n`` plain float32 sums (short blocks: backward.py's ``_blocked_red``; a one-term
    sum copies its values into one block: ``y_expand``)."""
    return te.comm_reducer(lambda a, b: tuple(a[k] + b[k] for k in range(n)),
                           lambda *dts: tuple(tirx.const(0, d) for d in dts), name=f"{name}{n}")


class _Zero:
    """Stands for the compensation part of a plain sum: 0 at every index."""

    def __init__(self, zero):
        self.zero = zero

    def __getitem__(self, idx):
        return self.zero


def _blocked_statistics(spec: KernelSpec, te, x, shift, f32, cnt64, shape, ksum):
    """Statistics of the (N, P, C, Q) view (ghost BN: (v, G, P, C, Q)) from small blocks, combined exactly.

    Rows of P are grouped by ``B = spec.stat_block`` and Q is cut into ``L = spec.stat_lanes``
    interleaved lanes (q = i*L + j). With ``R = spec.stat_rows`` = 1, block ``(n, pb, j)`` is
    ``x[N-1-n, pb*B:(pb+1)*B, c, j::L]`` (m = B*Q/L elements); with R > 1 (sample blocks: a schedule for
    few rows per sample, e.g. (N, C)), block ``(nb, pb, j)`` also spans the R samples
    ``nb*R .. nb*R+R-1`` (the last block of a batch R does not divide is shorter: its missing samples
    add exact zeros, and its element count is m_b = min(R, N - nb*R)*B*Q/L). Ghost BN (R = 1 only): the
    blocks of statistic (c, g) are the rows of its v samples, ``x[v-1-n, g, pb*B:(pb+1)*B, c, j::L]``.
    Its sum and its sum of squares about its own mean are two passes over data
    that is still in cache for the second one, so x is read from memory once; the blocks combine
    exactly (Chan et al.): ``M2 = sum_b M2_b + m_b * sum_b (mean_b - mean)**2`` (all offsets from the
    shift). With L lanes, the L blocks of a row are one vector. The names ``sum``, ``mean`` and
    ``sqsum`` (= M2) keep their meaning, so everything downstream is unchanged. With R = 1, block
    (n, ...) holds sample N-1-n: a forward loop over the blocks reads x from its end, so a pass over x
    that follows in the forward direction starts with the part that is still in the caches; sample
    blocks keep the forward order (a task's y rows are then the rows of its own statistics blocks).
    """
    from bncompile.lower import tvm as _tvm

    tirx = _tvm.tirx()
    ghost = spec.kinds == "RGRCR"
    assert spec.kinds == "RRCR" or (ghost and int(spec.stat_rows) == 1)
    if ghost:
        N, G, P, C, Q = shape
        sdims = (C, G)
    else:
        N, P, C, Q = shape
        sdims = (C,)
    ns = len(sdims)
    B, L, R = int(spec.stat_block), int(spec.stat_lanes), int(spec.stat_rows)
    if not isinstance(P, int) or P % B or L > Q or (Q % L and R != 1):
        raise ValueError(f"stat_block {B} must divide P={P} and stat_lanes {L} must divide Q={Q} "
                         "(or, with one sample per block, be at most Q)")
    # ragged lanes (Q % L = rag, one sample per block): the last of the QL vectors of a row is the row's
    # last L values (x[Q-L:Q], contiguous, in bounds), its first L - rag lanes (counted by the vector
    # before) masked to 0; lanes j >= L - rag hold one value more than the others
    rag = Q % L
    PB, QL = P // B, -(-Q // L)
    zero = tirx.const(0.0, "float32")
    f32c = lambda v: tirx.const(float(v), "float32")  # noqa: E731

    def xat(s, sample, p, q):     # s: the statistic's index, (c,) or (c, g)
        return f32(x[sample, s[1], p, s[0], q] if ghost else x[sample, p, s[0], q])

    def qidx(bq, j):
        return te.min(bq * L, Q - L) + j if rag else bq * L + j

    def qmask(bq, j, v):          # not a Select (masking.py); 0/1 as integers: j may be a vector lane
        if not rag:
            return v
        before_last = te.min(te.max((QL - 1) - bq, 0), 1)
        new_lane = te.min(te.max(j - (L - rag - 1), 0), 1)
        return keep_where(te.max(before_last, new_lane), v)

    if R == 1:
        NB = N
        if rag:
            def m_of(nb, j):          # integer min/max, not a compare: j may be a vector lane
                return tirx.Cast("float32", B * (Q // L) + B * te.min(te.max(j - (L - rag - 1), 0), 1))
        else:
            m_of = lambda nb, j: f32c(B * QL)  # noqa: E731
        ri_axes = []

        def sample(nb, ri):
            return N - 1 - nb

        def masked(nb, ri, v):
            return v
    else:
        NB = (N + (R - 1)) // R
        ri_axes = [te.reduce_axis((0, R), name="ri"), te.reduce_axis((0, R), name="ci_r")]

        def m_of(nb, j):
            return tirx.Cast("float32", te.min(tirx.const(R, "int32"), N - nb * R)) * f32c(B * QL)

        def sample(nb, ri):              # clamped: a missing sample reads the last one, masked to 0
            return te.min(nb * R + ri, N - 1)

        def masked(nb, ri, v):           # not a Select: TVM may drop the clamp under it (masking.py)
            return keep_where(nb * R + ri < N, v)
    bshape = sdims + (NB, PB, L)
    bi = te.reduce_axis((0, B), name="bi")
    bq = te.reduce_axis((0, QL), name="bq")
    r1 = ri_axes[:1]
    ri1 = r1[0] if r1 else None
    bsum = te.compute(bshape, lambda *a: ksum(
        (qmask(bq, a[-1], masked(a[ns], ri1, xat(a[:ns], sample(a[ns], ri1), a[ns + 1] * B + bi, qidx(bq, a[-1]))
                                 - shift[a[:ns]])), zero),
        axis=r1 + [bi, bq]), name="bsum")
    ci = te.reduce_axis((0, B), name="ci")
    cq = te.reduce_axis((0, QL), name="cq")
    r2 = ri_axes[1:]
    ri2 = r2[0] if r2 else None

    def bmean(s, n, pb, j):
        return (bsum[0][s + (n, pb, j)] + bsum[1][s + (n, pb, j)]) / m_of(n, j)

    if spec.stat_plain_m2:
        # M2 of a short block (m <= PLAIN_M2_MAX terms, all >= 0: a plain float32 sum is within (m-1)*u
        # of it, relative) about the block centre z = fl(K + mean_b), one subtraction per element (exact
        # by Sterbenz wherever |x| >> |x - z|). z misses K + mean_b by its rounding delta, so the sum is
        # M2 + m*delta**2 - 2*delta*sum(x - K - mean_b); the last sum is the block's rounding residue
        # (~0), and m*delta**2 (delta from exact float32 differences) is taken off when combining.
        def bcentre(s, n, pb, j):   # opaque: TIR's simplifier would fold (K + b) - K - b to 0
            return tirx.reinterpret("float32", tirx.reinterpret("int32", shift[s] + bmean(s, n, pb, j)))

        def bdev(s, n, pb, j):
            return xat(s, sample(n, ri2), pb * B + ci, qidx(cq, j)) - bcentre(s, n, pb, j)

        bsq = te.compute(bshape, lambda *a: te.sum(
            qmask(cq, a[-1], masked(a[ns], ri2, bdev(a[:ns], *a[ns:]) * bdev(a[:ns], *a[ns:]))), axis=r2 + [ci, cq]),
            name="bm2")

        def m2_parts(s, n, pb, j):
            dl = (bcentre(s, n, pb, j) - shift[s]) - bmean(s, n, pb, j)
            return bsq[s + (n, pb, j)] - m_of(n, j) * (dl * dl), zero
    else:
        def bcent(s, n, pb, j):
            return (xat(s, sample(n, ri2), pb * B + ci, qidx(cq, j)) - shift[s]) - bmean(s, n, pb, j)

        bm2 = te.compute(bshape, lambda *a: ksum(
            (qmask(cq, a[-1], masked(a[ns], ri2, bcent(a[:ns], *a[ns:]) * bcent(a[:ns], *a[ns:]))), zero),
            axis=r2 + [ci, cq]), name="bm2")

        def m2_parts(s, n, pb, j):
            return bm2[0][s + (n, pb, j)], bm2[1][s + (n, pb, j)]
    rn = te.reduce_axis((0, NB), name="rn")
    rp = te.reduce_axis((0, PB), name="rp")
    rj = te.reduce_axis((0, L), name="rj")
    # the block sums and their compensations combine as pairs: the total keeps both parts
    ssum = te.compute(sdims, lambda *s: ksum((bsum[0][s + (rn, rp, rj)], bsum[1][s + (rn, rp, rj)]),
                                             axis=[rn, rp, rj]), name="sum")
    mean64 = te.compute(sdims, lambda *s: (ssum[0][s].astype("float64") + ssum[1][s].astype("float64")) / cnt64,
                        name="mean64")
    mean = te.compute(sdims, lambda *s: mean64[s].astype("float32"), name="mean")
    sn = te.reduce_axis((0, NB), name="sn")
    sp = te.reduce_axis((0, PB), name="sp")
    sj = te.reduce_axis((0, L), name="sj")

    def dev(s, n, pb, j):
        return bmean(s, n, pb, j) - mean[s]

    def m2_term(s, n, pb, j):
        v, comp = m2_parts(s, n, pb, j)
        return v + m_of(n, j) * (dev(s, n, pb, j) * dev(s, n, pb, j)), comp

    sqsum = te.compute(sdims, lambda *s: ksum(m2_term(s, sn, sp, sj), axis=[sn, sp, sj]), name="sqsum")
    return ssum, mean64, mean, sqsum


PLAIN_M2_MAX = 128       # longest block whose sum of squares may be a plain float32 sum (stat_plain_m2)
# most values per statistic whose sums may be plain float32 sums (unblocked stat_plain_m2): at 4, a random
# differential of 1,448 short ghost groups found the batch mean's worst error equal to the compensated
# sums' (8.4x the exactness bound at loc 0, where both miss it); at 8-16 it reached 2.5x theirs and up to
# 16x NumPy's float32 mean on data with a mean near 0 (the offsets from K, up to 2x |x|, sum plainly)
PLAIN_GROUP_MAX = 4
SHIFT_MASK = 0xFFFFF000   # float32 bits kept in the shift K: sign, exponent, top 11 mantissa bits


def _coarse(tirx, v):
    """``v`` (float32) with the low mantissa bits of :data:`SHIFT_MASK` cleared."""
    bits = tirx.reinterpret("uint32", v) & tirx.const(SHIFT_MASK, "uint32")
    return tirx.reinterpret(STAT, bits)


def compensated_sum(te, tirx):
    """A TE reducer over ``(value, compensation)`` pairs: ``s`` accumulates the values, ``c`` the rounding
    error of every addition (Dekker's Fast2Sum, ``e = b - ((a + b) - a)``, exact when |a| >= |b|: the
    running sum against one term, but for its first terms or a sum crossing zero) plus the combined
    compensations, so ``s + c`` in float64 is the sum to ~u*|sum| + u**2*n*sum|v|, not serial float32
    summation's ~n*u*sum|v| (the error that made the mean of 65536 values ~100 off by 1e-3). Feed
    ``(v, 0)``; pairs combine (rfactor, cross-thread). Measured against Knuth's 6-flop TwoSum (exact for
    any order): the same accuracy on every benchmark case and 15-25% faster kernels.

    The TIR simplifier rewrites ``(a + b) - a`` to ``b`` for floats too, which would fold the error term
    to 0; the bit-cast round trips hide the sums from it (LLVM/nvcc fold them away, and neither
    reassociates float adds without fast-math reassociation flags, which TVM does not set).
    """
    global _KSUM_REGISTERED

    def opaque(v):
        return tirx.reinterpret(STAT, tirx.reinterpret("int32", v))

    def combine(lhs, rhs):
        (a, ca), (b, cb) = lhs, rhs
        t = opaque(a + b)
        return t, (ca + cb) + (b - opaque(t - a))

    def identity(t0, t1):
        return tirx.const(0, t0), tirx.const(0, t1)

    if not _KSUM_REGISTERED:
        # rfactor and cross-thread reductions only split reducers of the s_tir registry: add this one
        import ctypes

        from bncompile.lower import tvm as _tvm

        tvm = _tvm.tvm()
        register = tvm.get_global_func("s_tir.schedule.RegisterReducer")
        # the identity getter is called with the init values (FloatImm), not with dtypes
        getters = [tvm.runtime.convert(lambda x, y: list(combine(tuple(x), tuple(y)))),
                   tvm.runtime.convert(lambda vals: list(identity(*(str(v.ty.dtype) for v in vals))))]
        # The registry (a C++ static) outlives the interpreter: were its last references to these Python
        # callbacks dropped at static destruction, their deleters would take the GIL of a finalized
        # interpreter and crash the process at exit. One leaked reference each keeps them alive.
        for g in getters:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(g))
        register(2, *getters)
        _KSUM_REGISTERED = True
    return te.comm_reducer(combine, identity, name="ksum")


_KSUM_REGISTERED = False


def prim_func(spec: KernelSpec):
    """The unscheduled PrimFunc of ``spec`` (parameters: inputs then outputs)."""
    from bncompile.lower import tvm as _tvm

    ins, outs = batchnorm_te(spec)
    return _tvm.te().create_prim_func(ins + outs)


# --------------------------------------------------------------------------- NumPy twin

def batchnorm_numpy(spec: KernelSpec, x: np.ndarray, variables: dict, adjustment: tuple | None = None
                    ) -> dict[str, np.ndarray]:
    """The same algorithm as :func:`batchnorm_te` in NumPy (float32 statistics) on the canonical view.

    ``x`` has the canonical shape, ``variables`` are channel-shaped float32 arrays, ``adjustment`` is
    ``(scale, bias)`` in the spec's adjustment shape. Returns the outputs by name (``y``, ``<var>_new``).
    """
    f = np.float32
    xs = np.asarray(x).astype(f)
    kinds = spec.kinds
    caxes = [i for i, k in enumerate(kinds) if k == "C"]
    gaxes = [i for i, k in enumerate(kinds) if k == "G"]
    raxes = tuple(i for i, k in enumerate(kinds) if k == "R")
    cb = tuple(xs.shape[i] if k == "C" else 1 for i, k in enumerate(kinds))

    def as_c(v):
        return np.asarray(v, f).reshape(cb)

    gamma = as_c(variables["gamma"]) if spec.scale else f(1)
    beta = as_c(variables["beta"]) if spec.center else f(0)
    eps = f(spec.epsilon)
    if not spec.training:
        y = (xs - as_c(variables["moving_mean"])) / np.sqrt(as_c(variables["moving_variance"]) + eps) * gamma + beta
        return {"y": y.astype(spec.dtype if spec.dtype != "bfloat16" else f)}
    first = tuple(slice(None) if k in "CG" else slice(0, 1) for k in kinds)
    shift = (np.ascontiguousarray(xs[first]).view(np.uint32) & np.uint32(SHIFT_MASK)).view(f)
    n = int(np.prod([xs.shape[i] for i in raxes]))
    d = xs - shift
    w = np.float64          # the kernel's compensated sums are exact to ~n*u**2: a float64 sum stands for them
    mean64 = d.sum(axis=raxes, keepdims=True, dtype=w) / n
    mean = mean64.astype(f)
    cen = d - mean
    var = ((cen * cen).sum(axis=raxes, keepdims=True, dtype=w) / n).astype(f)
    if gaxes:
        bshift = shift.mean(axis=tuple(gaxes), keepdims=True, dtype=w)
        boff = mean64.mean(axis=tuple(gaxes), keepdims=True, dtype=w)
        bvar = var.mean(axis=tuple(gaxes), keepdims=True, dtype=w).astype(f)
    else:
        bshift, boff, bvar = shift.astype(w), mean64, var
    bmean = (bshift + boff).astype(f)
    m = f(spec.momentum)
    out = {}
    r = d_ = None
    if spec.renorm:
        clip = dict(spec.clipping)
        bstd = np.sqrt(bvar + eps)
        inv_s = f(1) / np.maximum(as_c(variables["renorm_stddev"]), f(math.sqrt(spec.epsilon)))
        r = bstd * inv_s
        d_ = ((bshift - as_c(variables["renorm_mean"]).astype(w)) + boff).astype(f) * inv_s
        if "rmin" in clip:
            r = np.maximum(r, f(clip["rmin"]))
        if "rmax" in clip:
            r = np.minimum(r, f(clip["rmax"]))
        if "dmax" in clip:
            d_ = np.clip(d_, f(-clip["dmax"]), f(clip["dmax"]))
        rm = f(spec.renorm_momentum)
        mstd = as_c(variables["moving_stddev"]) * m + bstd * (f(1) - m)
        out["moving_stddev_new"] = mstd
        out["moving_variance_new"] = np.maximum(mstd * mstd - eps, f(0))
        out["renorm_mean_new"] = as_c(variables["renorm_mean"]) * rm + bmean * (f(1) - rm)
        out["renorm_stddev_new"] = as_c(variables["renorm_stddev"]) * rm + bstd * (f(1) - rm)
    else:
        factor = f(n / (n - 1)) if spec.unbiased and n > 1 else f(1)
        out["moving_variance_new"] = as_c(variables["moving_variance"]) * m + bvar * factor * (f(1) - m)
    out["moving_mean_new"] = as_c(variables["moving_mean"]) * m + bmean * (f(1) - m)
    t = cen / np.sqrt(var + eps)
    if r is not None:
        t = t * r + d_
    if adjustment is not None:
        ashape = cb if spec.adjustment == "channel" else xs.shape
        t = t * np.asarray(adjustment[0], f).reshape(ashape) + np.asarray(adjustment[1], f).reshape(ashape)
    y = t * gamma + beta
    out["y"] = y.astype(np.float32)
    cs = tuple(xs.shape[i] for i in caxes)
    result = {"y": out["y"]}
    for name in spec.updated_names():
        result[name + "_new"] = np.asarray(out[name + "_new"]).reshape(cs)
    return result


__all__ = ["KernelSpec", "SYMBOLIC", "DTYPES", "canonical_layout", "make_spec", "canonical_shape",
           "batchnorm_te", "prim_func", "batchnorm_numpy"]
