"""Float64 NumPy reference of every batch-normalization mode: the project's oracle.

Written from ``docs/batchnorm-semantics.md`` (Keras 2 semantics), independent of the
ONNX graphs and TVM kernels it checks. Notation: ``EMA_m(v, t) = v*m + t*(1-m)``.

* inference: ``y = (x - moving_mean)/sqrt(moving_variance + eps)*gamma + beta``.
* training: batch mean and biased variance over every axis but ``axis``;
  ``y = ((xhat*r + d)*adj_scale + adj_bias)*gamma + beta`` (r=1, d=0 without renorm, adj 1/0 without
  adjustment); ``moving_mean = EMA_m(moving_mean, mu)``;
  ``moving_variance = EMA_m(moving_variance, var)``, where var is unbiased (n/(n-1)) on Keras's fused path.
* renorm: ``s = max(renorm_stddev, sqrt(eps))``, ``r = clip(sqrt(var+eps)/s, rmin, rmax)``,
  ``d = clip((mu - renorm_mean)/s, -dmax, dmax)`` from the values before the update;
  renorm_mean/renorm_stddev follow EMA with renorm_momentum, moving_mean/moving_stddev with momentum,
  and ``moving_variance = max(moving_stddev_new**2 - eps, 0)``.
* ghost BN: sample i belongs to virtual batch ``i % (N/v)`` (Keras reshapes to (v, N/v, ...));
  each group is normalized with its own statistics; the moving statistics take one update from the
  average of the group means and of the group (biased) variances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from bncompile.config import BatchNormConfig, RandomAdjustment, training_effective
from bncompile.errors import ConfigError, InputError


@dataclass
class ReferenceResult:
    """``y`` and the updated variables (Keras shapes, float64), plus the batch statistics used."""

    y: np.ndarray
    variables: dict[str, np.ndarray]
    batch_mean: np.ndarray | None = None
    batch_variance: np.ndarray | None = None

    def __iter__(self):  # allows ``y, new_vars = batchnorm(...)``
        return iter((self.y, self.variables))


def _ema(v, t, m):
    return v * m + t * (1.0 - m)


def _renorm_r_d(config: BatchNormConfig, sigma, mu, renorm_mean, renorm_stddev, eps):
    """Batch renormalization's r and d from the batch's sigma and mean and the variables before the
    update: ``s = max(renorm_stddev, sqrt(eps))``, ``r = sigma/s`` clipped to [rmin, rmax] (rmax last, as
    Keras), ``d = (mu - renorm_mean)/s`` clipped to [-dmax, dmax]; each bound only when given."""
    s = np.maximum(renorm_stddev, np.sqrt(eps))
    r = sigma / s
    d = (mu - renorm_mean) / s
    clip = config.renorm_clipping or {}
    if "rmin" in clip:
        r = np.maximum(r, clip["rmin"])
    if "rmax" in clip:
        r = np.minimum(r, clip["rmax"])
    if "dmax" in clip:
        d = np.minimum(np.maximum(d, -clip["dmax"]), clip["dmax"])
    return r, d


def batchnorm(config: BatchNormConfig, x, variables: Mapping[str, Any] | None = None, *, training: bool,
              adjustment: tuple[Any, Any] | None = None, dtype: str | None = None) -> ReferenceResult:
    """Run one Keras ``BatchNormalization`` call in float64.

    ``variables`` maps Keras variable names to values (any shape with the right number of elements);
    missing ones come from the config's initializers. ``adjustment`` is ``(adj_scale, adj_bias)``,
    broadcastable against ``x``, required in training mode when the config has an adjustment.
    ``dtype`` is the layer's compute dtype (None: float32, whatever ``x``'s own dtype): a float64 layer
    never takes Keras's fused path.
    Returns the output and every variable a training step updates (unchanged in inference).
    """
    x = np.asarray(x)
    xf = x.astype(np.float64)
    res = config.resolve(x.ndim, dtype)
    vars_ = config.initial_variables(x.shape, variables)
    eps = res.epsilon
    train = training_effective(config, training)
    ghost = config.virtual_batch_size is not None
    pshape = config.param_shape(x.shape)
    # Shape the variables broadcast with in the working tensor (x, or x reshaped for ghost BN).
    vshape = pshape if ghost else res.broadcast_shape(x.shape)
    v = {k: a.reshape(vshape) for k, a in vars_.items()}
    gamma = v.get("gamma", 1.0)
    beta = v.get("beta", 0.0)
    updated = {k: vars_[k].copy() for k in config.updated_variable_names()}

    if not train:
        y = (xf - v["moving_mean"]) / np.sqrt(v["moving_variance"] + eps) * gamma + beta
        return ReferenceResult(y.reshape(x.shape), updated)   # ghost variables carry an extra leading 1

    n_batch = x.shape[0]
    if ghost:
        vbs = config.virtual_batch_size
        if n_batch % vbs:
            raise ConfigError(f"virtual_batch_size: {vbs} does not divide the batch size {n_batch}; "
                              "use a batch that is a multiple of it")
        groups = n_batch // vbs
        xw = xf.reshape((vbs, groups) + x.shape[1:])
        red = (0,) + tuple(a + 1 for a in res.reduce_axes if a != 0)
        mean = xw.mean(axis=red, keepdims=True)                       # (1, G, ...)
        var = ((xw - mean) ** 2).mean(axis=red, keepdims=True)
        batch_mean = mean.mean(axis=1, keepdims=True)                 # (1, 1, ...) = Keras shape
        batch_var = var.mean(axis=1, keepdims=True)
    else:
        xw = xf
        mean = xf.mean(axis=res.reduce_axes, keepdims=True)
        var = ((xf - mean) ** 2).mean(axis=res.reduce_axes, keepdims=True)
        batch_mean, batch_var = mean, var

    xhat = (xw - mean) / np.sqrt(var + eps)
    out = xhat
    m = config.momentum
    if config.renorm:
        stddev = np.sqrt(batch_var + eps)
        r, d = _renorm_r_d(config, stddev, batch_mean, v["renorm_mean"], v["renorm_stddev"], eps)
        out = out * r + d
        rm = config.renorm_momentum
        new_stddev = _ema(v["moving_stddev"], stddev, m)
        updated["moving_stddev"] = new_stddev.reshape(pshape)
        updated["moving_variance"] = np.maximum(new_stddev * new_stddev - eps, 0.0).reshape(pshape)
        updated["renorm_mean"] = _ema(v["renorm_mean"], batch_mean, rm).reshape(pshape)
        updated["renorm_stddev"] = _ema(v["renorm_stddev"], stddev, rm).reshape(pshape)
    else:
        var_for_update = batch_var
        if res.fused:
            n = x.size // int(np.prod(res.channel_shape(x.shape)))
            var_for_update = batch_var * (n / (n - 1) if n > 1 else 1.0)
        updated["moving_variance"] = _ema(v["moving_variance"], var_for_update, m).reshape(pshape)
    updated["moving_mean"] = _ema(v["moving_mean"], batch_mean, m).reshape(pshape)

    if config.adjustment is not None:
        if adjustment is None:
            kind = "inputs" if config.adjustment == "inputs" else "random"
            raise InputError(f"adjustment: this config has adjustment={kind!r}; pass "
                             "adjustment=(adj_scale, adj_bias) to the reference")
        adj_scale = np.asarray(adjustment[0], dtype=np.float64)
        adj_bias = np.asarray(adjustment[1], dtype=np.float64)
        if isinstance(config.adjustment, RandomAdjustment):
            # drawn per channel: a flat (C,) vector broadcasts along the channel axes
            adj_scale = adj_scale.reshape(vshape) if adj_scale.size == np.prod(vshape) else adj_scale
            adj_bias = adj_bias.reshape(vshape) if adj_bias.size == np.prod(vshape) else adj_bias
        out = out * adj_scale + adj_bias
    y = out * gamma + beta
    if ghost:
        y = y.reshape(x.shape)
    return ReferenceResult(y, updated, batch_mean.reshape(pshape), batch_var.reshape(pshape))


def onnx_batchnorm(x, scale, bias, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9,
                   training_mode: bool = False):
    """The ONNX operator's semantics (channel axis 1, biased variance), via :func:`batchnorm`.

    Returns ``y`` in inference, ``(y, running_mean, running_var)`` in training mode.
    """
    x = np.asarray(x)
    cfg = BatchNormConfig(axis=1, epsilon=float(epsilon), momentum=float(momentum), fused=False)
    res = batchnorm(cfg, x, {"gamma": scale, "beta": bias, "moving_mean": mean, "moving_variance": var},
                    training=bool(training_mode))
    if not training_mode:
        return res.y
    return res.y, res.variables["moving_mean"], res.variables["moving_variance"]


def run_steps(config: BatchNormConfig, xs, variables=None, *, adjustments=None):
    """Run training steps feeding the variables back; returns the list of ReferenceResult."""
    state = dict(variables or {})
    results = []
    for i, x in enumerate(xs):
        adj = adjustments[i] if adjustments is not None else None
        r = batchnorm(config, x, state, training=True, adjustment=adj)
        state = {**state, **r.variables}
        results.append(r)
    return results


@dataclass
class GradientResult:
    """Gradients of ``sum(y * dy)``: ``dx`` (x's shape) and, in the variables' Keras shapes, ``dgamma``
    (None without ``scale``) and ``dbeta`` (None without ``center``). Float64."""

    dx: np.ndarray
    dgamma: np.ndarray | None
    dbeta: np.ndarray | None


def batchnorm_backward(config: BatchNormConfig, x, dy, variables: Mapping[str, Any] | None = None, *,
                       training: bool, adjustment: tuple[Any, Any] | None = None,
                       dtype: str | None = None) -> GradientResult:
    """The gradients TensorFlow computes for one call of the Keras 2 layer (``docs/batchnorm-semantics.md``,
    "Backward"), in float64: the statistics carry gradient within their own (virtual) batch; renorm's
    ``r``/``d``, the adjustment and the moving statistics are constants.

    With ``S = r*adj_scale*gamma`` (per element), ``xhat = (x - mu_G)*inv_G`` per normalization group G
    of ``n`` elements per channel, and ``g = dy*S``:
    ``dx = inv_G*(g - mean_G(g) - xhat*mean_G(g*xhat))``, ``dgamma = sum(dy*((xhat*r + d)*adj_scale +
    adj_bias))`` and ``dbeta = sum(dy)`` over every axis but the channel axes.
    """
    x = np.asarray(x)
    xf = x.astype(np.float64)
    dyf = np.asarray(dy, dtype=np.float64)
    if dyf.shape != x.shape:
        raise InputError(f"dy: shape {dyf.shape} is not the shape of y {x.shape}; pass dy of y's shape")
    res = config.resolve(x.ndim, dtype)
    vars_ = config.initial_variables(x.shape, variables)
    eps = res.epsilon
    pshape = config.param_shape(x.shape)
    bshape = res.broadcast_shape(x.shape)
    gamma = vars_["gamma"].reshape(bshape) if "gamma" in vars_ else 1.0
    param_axes = res.reduce_axes                  # dgamma/dbeta sum over every non-channel axis

    def _param_grads(term):
        dgamma = (dyf * term).sum(axis=param_axes).reshape(pshape) if config.scale else None
        dbeta = dyf.sum(axis=param_axes).reshape(pshape) if config.center else None
        return dgamma, dbeta

    if not training_effective(config, training):
        inv = 1.0 / np.sqrt(vars_["moving_variance"].reshape(bshape) + eps)
        xhat = (xf - vars_["moving_mean"].reshape(bshape)) * inv
        return GradientResult(dyf * gamma * inv, *_param_grads(xhat))

    # the working layout: ghost BN reshapes (N, ...) to (v, N/v, ...) and normalizes over axis 0 and
    # the non-channel axes, per group (axis 1)
    if config.virtual_batch_size is not None:
        vbs = config.virtual_batch_size
        if x.shape[0] % vbs:
            raise ConfigError(f"virtual_batch_size: {vbs} does not divide the batch size {x.shape[0]}; "
                              "use a batch that is a multiple of it")
        wshape = (vbs, x.shape[0] // vbs) + x.shape[1:]
        red = (0,) + tuple(a + 1 for a in res.reduce_axes if a != 0)
        cshape = (1, 1) + bshape[1:]                         # a per-channel value in the working layout
    else:
        wshape, red, cshape = x.shape, res.reduce_axes, bshape
    xw, dyw = xf.reshape(wshape), dyf.reshape(wshape)
    mean = xw.mean(axis=red, keepdims=True)
    var = ((xw - mean) ** 2).mean(axis=red, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (xw - mean) * inv
    r, d = 1.0, 0.0
    if config.renorm:                    # constants (stop_gradient), from the group-averaged statistics
        batch_mean = mean.mean(axis=1, keepdims=True) if config.virtual_batch_size else mean
        batch_var = var.mean(axis=1, keepdims=True) if config.virtual_batch_size else var
        r, d = _renorm_r_d(config, np.sqrt(batch_var + eps), batch_mean, vars_["renorm_mean"].reshape(cshape),
                           vars_["renorm_stddev"].reshape(cshape), eps)
    adj_scale, adj_bias = 1.0, 0.0
    if config.adjustment is not None:
        if adjustment is None:
            raise InputError("adjustment: this config has an adjustment; pass adjustment=(adj_scale, adj_bias)")
        adj_scale = np.asarray(adjustment[0], dtype=np.float64)
        adj_bias = np.asarray(adjustment[1], dtype=np.float64)
        if isinstance(config.adjustment, RandomAdjustment):       # drawn per channel, as in the forward
            adj_scale = adj_scale.reshape(bshape) if adj_scale.size == np.prod(bshape) else adj_scale
            adj_bias = adj_bias.reshape(bshape) if adj_bias.size == np.prod(bshape) else adj_bias
    gw = gamma.reshape(cshape) if config.scale else 1.0
    g = dyw * (r * gw) * adj_scale
    dx = inv * (g - g.mean(axis=red, keepdims=True) - xhat * (g * xhat).mean(axis=red, keepdims=True))
    out = ((xhat * r + d) * adj_scale + adj_bias).reshape(x.shape)
    return GradientResult(dx.reshape(x.shape), *_param_grads(out))


__all__ = ["batchnorm", "batchnorm_backward", "onnx_batchnorm", "run_steps", "ReferenceResult",
           "GradientResult"]
