"""``BatchNormConfig``: the Keras ``BatchNormalization`` layer's arguments, validated as Keras does.

Defaults are Keras 2's. ``resolve(rank)`` turns a config plus an input rank into a
``Resolved`` plan (normalized axes, parameter shape, whether Keras would take the fused
path, the epsilon it would use) that the reference, the ONNX builder and the TVM kernels
all share, so the three can never disagree on what a config means.

Keras behaviours reproduced here (``docs/batchnorm-semantics.md``):

* ``fused=None`` takes the fused path for rank 4/5 inputs when the single axis is 1 or the
  last; rank 5 with another axis falls back silently; ``fused=True`` where it cannot apply is
  an error. Keras's quirk: for rank 4, an axis written ``-4`` passes the constructor's check but
  resolves to 0 in ``build`` and is refused there, even with ``fused=None``.
* The fused path clamps epsilon to at least 1.001e-5 (TensorFlow's ``fused_batch_norm``).
* ``virtual_batch_size`` adds a leading dimension to every variable's shape.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from bncompile.errors import ConfigError

_log = logging.getLogger(__name__)

FUSED_MIN_EPSILON = 1.001e-5
RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
ALL_VARIABLE_NAMES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                      "renorm_stddev")


# --------------------------------------------------------------------------- initializers

_INIT_ALIASES = {
    "zeros": "Zeros", "zero": "Zeros", "ones": "Ones", "one": "Ones", "constant": "Constant",
    "random_normal": "RandomNormal", "normal": "RandomNormal",
    "random_uniform": "RandomUniform", "uniform": "RandomUniform",
    "truncated_normal": "TruncatedNormal",
}
_INIT_DEFAULTS = {
    "Zeros": {}, "Ones": {}, "Constant": {"value": 0.0},
    "RandomNormal": {"mean": 0.0, "stddev": 0.05, "seed": None},
    "RandomUniform": {"minval": -0.05, "maxval": 0.05, "seed": None},
    "TruncatedNormal": {"mean": 0.0, "stddev": 0.05, "seed": None},
}


def normalize_initializer(value: Any, *, argument: str) -> dict:
    """Return ``{"class_name": ..., "config": {...}}`` for a Keras initializer name or dict."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"class_name": "Constant", "config": {"value": float(value)}}
    if isinstance(value, str):
        name = _INIT_ALIASES.get(value.lower(), value)
        cfg: dict = {}
    elif isinstance(value, Mapping):
        name = value.get("class_name")
        cfg = dict(value.get("config") or {})
        if not isinstance(name, str):
            raise ConfigError(f"{argument}: an initializer dict needs a 'class_name' string, got {value!r}")
        name = _INIT_ALIASES.get(name.lower(), name)
    else:
        raise ConfigError(f"{argument}: expected an initializer name or a Keras serialized dict, got {value!r}")
    if name not in _INIT_DEFAULTS:
        raise ConfigError(f"{argument}: unknown initializer {name!r}; use one of "
                          + ", ".join(sorted(_INIT_DEFAULTS)))
    unknown = set(cfg) - set(_INIT_DEFAULTS[name]) - {"dtype"}
    if unknown:
        raise ConfigError(f"{argument}: unknown {name} parameter(s) {sorted(unknown)}")
    full = {**_INIT_DEFAULTS[name], **{k: v for k, v in cfg.items() if k != "dtype"}}
    if name in ("RandomNormal", "TruncatedNormal") and float(full["stddev"]) < 0:
        raise ConfigError(f"{argument}: stddev must be >= 0, got {full['stddev']}")
    if name == "RandomUniform" and float(full["maxval"]) < float(full["minval"]):
        raise ConfigError(f"{argument}: maxval {full['maxval']} is below minval {full['minval']}")
    return {"class_name": name, "config": full}


def sample_initializer(spec: dict, shape: Sequence[int], *, salt: int = 0) -> np.ndarray:
    """Draw an initial value (float64) for a normalized initializer spec.

    Seeded initializers are reproducible (NumPy's generator, not TensorFlow's: the
    distribution and the seed's determinism match Keras, the exact draws do not).
    Unseeded ones use seed ``salt`` so that a model build is still deterministic.
    """
    name, cfg = spec["class_name"], spec["config"]
    shape = tuple(int(s) for s in shape)
    if name == "Zeros":
        return np.zeros(shape)
    if name == "Ones":
        return np.ones(shape)
    if name == "Constant":  # tf.constant(value, shape=shape): a scalar fills, a list must have the size
        value = np.asarray(cfg["value"], dtype=np.float64)
        if value.size == 1:
            return np.full(shape, float(value.reshape(-1)[0]))
        if value.size != int(np.prod(shape)):
            raise ConfigError(f"Constant initializer: value has {value.size} elements, the variable {shape} "
                              f"needs {int(np.prod(shape))} (or give one number)")
        return value.reshape(shape).copy()
    seed = cfg.get("seed")
    rng = np.random.default_rng(salt if seed is None else int(seed))
    if name == "RandomNormal":
        return rng.normal(float(cfg["mean"]), float(cfg["stddev"]), shape)
    if name == "RandomUniform":
        return rng.uniform(float(cfg["minval"]), float(cfg["maxval"]), shape)
    # TruncatedNormal: redraw values beyond two standard deviations, as Keras does.
    mean, std = float(cfg["mean"]), float(cfg["stddev"])
    out = rng.normal(0.0, 1.0, shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
        bad = np.abs(out) > 2
    return mean + std * out


# --------------------------------------------------------------------------- adjustment

@dataclass(frozen=True)
class RandomAdjustment:
    """The brief's adjustment, drawn in the graph: per-channel uniform scale and bias, fresh each step."""

    scale_range: tuple[float, float] = (0.93, 1.07)
    bias_range: tuple[float, float] = (-0.1, 0.1)
    seed: int = 0

    def to_dict(self) -> dict:
        return {"kind": "random", "scale_range": list(self.scale_range),
                "bias_range": list(self.bias_range), "seed": self.seed}


def _normalize_adjustment(value) -> str | RandomAdjustment | None:
    if value is None or isinstance(value, RandomAdjustment):
        return value
    if value == "inputs":
        return "inputs"
    if value == "random":
        return RandomAdjustment()
    if isinstance(value, Mapping) and value.get("kind", "random") == "random":
        try:
            return RandomAdjustment(
                scale_range=tuple(float(v) for v in value.get("scale_range", (0.93, 1.07))),
                bias_range=tuple(float(v) for v in value.get("bias_range", (-0.1, 0.1))),
                seed=int(value.get("seed", 0)))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"adjustment: bad random adjustment {dict(value)!r}: {err}") from None
    if isinstance(value, Mapping) and value.get("kind") == "inputs":
        return "inputs"
    raise ConfigError(f"adjustment: expected None, 'inputs', 'random' or a dict "
                      f"{{'kind': 'random', 'scale_range': ..., 'bias_range': ..., 'seed': ...}}, got {value!r} "
                      "(a Python callable cannot travel in an ONNX graph: compute it and feed it with 'inputs')")


# --------------------------------------------------------------------------- the config

def _as_float(value, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{argument}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{argument}: must be finite, got {value!r}")
    return v


def _as_bool(value, argument: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{argument}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class Resolved:
    """A config applied to an input rank: what every implementation needs to agree on."""

    rank: int
    axes: tuple[int, ...]            # normalized (non-negative, sorted) channel axes of x
    reduce_axes: tuple[int, ...]     # the other axes of x
    fused: bool                      # Keras would take the fused path
    epsilon: float                   # epsilon actually used (fused path clamps it)
    virtual_batch_size: int | None

    def broadcast_shape(self, input_shape: Sequence) -> tuple[int, ...]:
        """Shape that broadcasts a flattened per-channel vector against x."""
        return tuple(int(input_shape[i]) if i in self.axes else 1 for i in range(self.rank))

    def channel_shape(self, input_shape: Sequence) -> tuple[int, ...]:
        return tuple(int(input_shape[i]) for i in self.axes)


@dataclass(frozen=True)
class BatchNormConfig:
    """Every argument of Keras's ``BatchNormalization`` layer, with Keras 2's defaults."""

    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    beta_initializer: Any = "zeros"
    gamma_initializer: Any = "ones"
    moving_mean_initializer: Any = "zeros"
    moving_variance_initializer: Any = "ones"
    beta_regularizer: Any = None
    gamma_regularizer: Any = None
    beta_constraint: Any = None
    gamma_constraint: Any = None
    renorm: bool = False
    renorm_clipping: Mapping[str, float] | None = None
    renorm_momentum: float = 0.99
    fused: bool | None = None
    trainable: bool = True
    virtual_batch_size: int | None = None
    adjustment: Any = None
    name: str = "batch_normalization"

    # ---- validation (runs on construction, as Keras's constructor does)
    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        axis = self.axis
        if isinstance(axis, (list, tuple)):
            if not axis:
                raise ConfigError("axis: the axis list is empty; give at least one axis")
            if any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in axis):
                raise ConfigError(f"axis: expected an int or a list of ints, got {axis!r}")
            axis = tuple(int(a) for a in axis)
        elif isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
            axis = int(axis)
        else:
            raise ConfigError(f"axis: expected an int or a list of ints, got {axis!r}")
        set_("axis", axis)
        set_("momentum", _as_float(self.momentum, "momentum"))
        set_("renorm_momentum", _as_float(self.renorm_momentum, "renorm_momentum"))
        set_("epsilon", _as_float(self.epsilon, "epsilon"))
        if self.epsilon < 0:  # Keras checks nothing; 0 works (the fused path clamps it), a negative value
            raise ConfigError(f"epsilon: must be >= 0 (sqrt(var + epsilon) of a negative value is NaN), "
                              f"got {self.epsilon}")
        for k in ("center", "scale", "renorm", "trainable"):
            set_(k, _as_bool(getattr(self, k), k))
        if self.fused is not None:
            set_("fused", _as_bool(self.fused, "fused"))
        for k in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                  "moving_variance_initializer"):
            set_(k, normalize_initializer(getattr(self, k), argument=k))
        # renorm_clipping: keys rmax/rmin/dmax only (Keras checks them only with renorm=True and ignores the
        # argument otherwise), numbers. rmax < rmin is accepted as Keras accepts it: r = min(max(r, rmin), rmax)
        # (tf.clip_by_value), so r is rmax there; every path (reference, ONNX ops, kernels) clips in that order.
        clip = self.renorm_clipping
        if clip is not None and not self.renorm:
            set_("renorm_clipping", None)
        elif clip is not None:
            if not isinstance(clip, Mapping):
                raise ConfigError(f"renorm_clipping: expected a dict with keys rmax, rmin, dmax, got {clip!r}")
            bad = sorted(set(clip) - set(RENORM_CLIPPING_KEYS))
            if bad:
                raise ConfigError(f"renorm_clipping: invalid key(s) {bad}; allowed keys are rmax, rmin, dmax")
            clip = {k: _as_float(v, f"renorm_clipping[{k!r}]") for k, v in clip.items() if v is not None}
            set_("renorm_clipping", dict(clip))
        vbs = self.virtual_batch_size
        if vbs is not None:
            if isinstance(vbs, bool) or not isinstance(vbs, (int, np.integer)):
                raise ConfigError(f"virtual_batch_size: expected a positive int, got {vbs!r}")
            if vbs <= 0:
                raise ConfigError(f"virtual_batch_size: must be a positive integer, got {vbs}")
            set_("virtual_batch_size", int(vbs))
        set_("adjustment", _normalize_adjustment(self.adjustment))
        if vbs is not None and self.adjustment is not None:
            raise ConfigError("virtual_batch_size and adjustment cannot be used together (Keras refuses it); "
                              "drop one of them")
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        if vbs is not None and 0 in axes:
            raise ConfigError("axis: with virtual_batch_size the batch axis 0 cannot be normalized; "
                              "use another axis")
        if self.fused:  # Keras's _raise_if_fused_cannot_be_used
            if self.renorm:
                raise ConfigError("fused: fused=True cannot be combined with renorm=True; set fused=None or False")
            if len(axes) > 1 or axes[0] not in (-4, -3, -1, 1, 3, 4):
                raise ConfigError(f"fused: fused=True needs axis 1 or 3 for rank-4 inputs or 1 or 4 for rank-5 "
                                  f"inputs, got axis={self.axis}; set fused=None or False")
            if vbs is not None:
                raise ConfigError("fused: fused=True cannot be combined with virtual_batch_size; "
                                  "set fused=None or False")
            if self.adjustment is not None:
                raise ConfigError("fused: fused=True cannot be combined with adjustment; set fused=None or False")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name: expected a non-empty string, got {self.name!r}")

    # ---- derived facts
    @property
    def axes(self) -> tuple[int, ...]:
        return self.axis if isinstance(self.axis, tuple) else (self.axis,)

    def _fused_can_be_used(self) -> bool:
        return (not self.renorm and len(self.axes) == 1 and self.axes[0] in (-4, -3, -1, 1, 3, 4)
                and self.virtual_batch_size is None and self.adjustment is None)

    def resolve(self, rank: int, dtype: str | None = None) -> Resolved:
        """Apply the config to an input of ``rank`` dims, raising ConfigError as Keras's build() would.

        ``dtype`` is the layer's compute dtype (None: float32). Keras never fuses a float64 layer:
        ``fused=None`` falls back, ``fused=True`` is refused."""
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"input_shape: expected a rank >= 1, got {rank!r}")
        axes = []
        for a in self.axes:
            if not -rank <= a < rank:
                raise ConfigError(f"axis: {a} is out of range for a rank-{rank} input "
                                  f"(valid: {-rank}..{rank - 1})")
            axes.append(a % rank)
        if len(set(axes)) != len(axes):
            raise ConfigError(f"axis: {list(self.axes)} repeats an axis for a rank-{rank} input")
        axes = tuple(sorted(axes))
        if self.virtual_batch_size is not None and 0 in axes:
            raise ConfigError("axis: with virtual_batch_size the batch axis 0 cannot be normalized; "
                              "use another axis")
        # Keras: fused None -> rank in (4, 5) when the constructor's check passed.
        fused = self.fused
        fusable_dtype = dtype in (None, "float32", "float16", "bfloat16")
        if fused and not fusable_dtype:
            raise ConfigError(f"fused: fused=True needs a float16, bfloat16 or float32 layer, got {dtype}; "
                              "set fused=None or False")
        if fused is None:
            fused = rank in (4, 5) and self._fused_can_be_used() and fusable_dtype
        elif fused and rank not in (4, 5):
            raise ConfigError(f"fused: fused=True needs a rank-4 or rank-5 input, got rank {rank}; "
                              "set fused=None or False")
        if fused:
            ok = (axes == (1,)) or (axes == (rank - 1,))
            if not ok:
                if rank == 5:
                    fused = False
                else:
                    raise ConfigError(f"axis: {self.axis} resolves to {list(axes)} for a rank-4 input, which "
                                      "Keras's fused path refuses (it needs axis 1 or 3); set fused=False")
        reduce_axes = tuple(i for i in range(rank) if i not in axes)
        return Resolved(rank=rank, axes=axes, reduce_axes=reduce_axes, fused=bool(fused),
                        epsilon=max(self.epsilon, FUSED_MIN_EPSILON) if fused else self.epsilon,
                        virtual_batch_size=self.virtual_batch_size)

    def param_shape(self, input_shape: Sequence) -> tuple[int, ...]:
        """Shape of every variable, as Keras stores it, for an input of ``input_shape``."""
        res = self.resolve(len(input_shape))
        for a in res.axes:
            d = input_shape[a]
            if d is None or (isinstance(d, (int, np.integer)) and d <= 0) or not isinstance(d, (int, np.integer)):
                raise ConfigError(f"input_shape: the normalized axis {a} needs a known positive size, got {d!r}")
        if len(res.axes) == 1 and self.virtual_batch_size is None:
            return (int(input_shape[res.axes[0]]),)
        shape = [int(input_shape[i]) if i in res.axes else 1 for i in range(res.rank)]
        if self.virtual_batch_size is not None:
            shape.insert(1, 1)
        return tuple(shape)

    def variable_names(self) -> list[str]:
        """The variables in the order the training-step model lists them."""
        names = []
        if self.scale:
            names.append("gamma")
        if self.center:
            names.append("beta")
        names += ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return names

    def updated_variable_names(self) -> list[str]:
        """Variables a training step updates (gamma and beta are trained by the optimizer, not here)."""
        return [n for n in self.variable_names() if n not in ("gamma", "beta")]

    def initial_variables(self, input_shape: Sequence, weights: Mapping[str, Any] | None = None
                          ) -> dict[str, np.ndarray]:
        """Initial values (float64, Keras shapes) from ``weights`` or else the initializers.

        ``weights`` values may have any shape with the right number of elements (C order).
        For renorm, ``moving_stddev`` and ``renorm_stddev`` default to sqrt(moving_variance)
        and ``renorm_mean`` to moving_mean, as Keras initialises them.
        """
        shape = self.param_shape(input_shape)
        size = int(np.prod(shape))
        weights = dict(weights or {})
        known = set(self.variable_names())
        unknown = sorted(set(weights) - set(ALL_VARIABLE_NAMES))
        if unknown:
            raise ConfigError(f"weights: unknown variable(s) {unknown}; Keras's BatchNormalization has "
                              f"{', '.join(ALL_VARIABLE_NAMES)}")
        # a Keras variable this config has none of (gamma with scale=False, renorm ones without renorm)
        # is ignored, as Keras would never read it
        weights = {k: v for k, v in weights.items() if k in known}
        out: dict[str, np.ndarray] = {}

        def take(name, default):
            if name in weights:
                arr = np.asarray(weights[name], dtype=np.float64)
                if arr.size != size:
                    raise ConfigError(f"weights[{name!r}]: has {arr.size} elements, expected {size} "
                                      f"(shape {shape})")
                return arr.reshape(shape).copy()
            return default()

        init = {"gamma": self.gamma_initializer, "beta": self.beta_initializer,
                "moving_mean": self.moving_mean_initializer, "moving_variance": self.moving_variance_initializer}
        for salt, name in enumerate(("gamma", "beta", "moving_mean", "moving_variance")):
            if name in known:
                out[name] = take(name, lambda n=name, s=salt: sample_initializer(init[n], shape, salt=s))
        if self.renorm:
            mv = out["moving_variance"]
            with np.errstate(invalid="ignore"):  # Keras: tf.sqrt(initial moving variance), NaN if negative
                root = np.sqrt(mv)
            out["moving_stddev"] = take("moving_stddev", lambda: root.copy())
            out["renorm_mean"] = take("renorm_mean", lambda: out["moving_mean"].copy())
            out["renorm_stddev"] = take("renorm_stddev", lambda: root.copy())
        return out

    # ---- serialization
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axis"] = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        if isinstance(self.adjustment, RandomAdjustment):
            d["adjustment"] = self.adjustment.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_keras(cls, d: Mapping[str, Any], *, built: bool | None = None) -> "BatchNormConfig":
        """Build from the dict Keras's ``layer.get_config()`` returns (JSON-loaded).

        Also accepts the ``{"class_name": "BatchNormalization", "config": {...}}`` wrapper of a
        serialized layer. Keys Keras adds that do not change the math (``dtype``, ``batch_input_shape``,
        ``synchronized`` ...) are ignored; unknown keys are refused.

        Keras 2's ``build()`` of a layer with ``virtual_batch_size`` rewrites its axis in place: made
        non-negative, as a list, then shifted by one for the ghost dimension it inserts (axis -1 of a
        rank-4 input is saved as ``[4]``), and ``get_config()`` returns that. ``built=None`` (default)
        reads a ``virtual_batch_size`` config whose axis is a list of ints all >= 2 as that built form
        and shifts it back (an unbuilt layer's axis is the constructor's, ``-1`` by default; the batch
        axis 0 cannot be normalized with ghost BN, so a built axis is always >= 2). ``built=True`` /
        ``False`` force the reading.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"keras config: expected a JSON object, got {type(d).__name__}")
        if "config" in d and "class_name" in d:
            if d["class_name"] not in ("BatchNormalization", "SyncBatchNormalization"):
                raise ConfigError(f"keras config: class_name {d['class_name']!r} is not BatchNormalization")
            d = d["config"]
        ignored = {"dtype", "batch_input_shape", "input_shape", "synchronized", "module", "registered_name",
                   "build_config", "dtype_policy"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - ignored)
        if unknown:
            raise ConfigError(f"keras config: unknown argument(s) {unknown}")
        kwargs = {k: v for k, v in d.items() if k in fields}
        axis = kwargs.get("axis")
        if isinstance(axis, list):
            kwargs["axis"] = tuple(axis)
            looks_built = (d.get("virtual_batch_size") is not None and "adjustment" not in d and axis
                           and all(isinstance(a, int) and not isinstance(a, bool) and a >= 2 for a in axis))
            if built if built is not None else looks_built:
                if not looks_built:
                    raise ConfigError(f"axis: {axis} is not the axis of a built virtual_batch_size layer "
                                      "(a list of ints >= 2); pass built=False")
                kwargs["axis"] = tuple(a - 1 for a in axis)
                _log.info("axis %s read as Keras's built virtual_batch_size form: axis %s", axis,
                          list(kwargs["axis"]))
        if d.get("synchronized"):
            raise ConfigError("synchronized: synchronized (cross-replica) batch normalization is not supported; "
                              "set synchronized=False")
        return cls(**kwargs)

    def replace(self, **changes) -> "BatchNormConfig":
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(changes)
        return BatchNormConfig(**d)


def training_effective(config: BatchNormConfig, training: bool) -> bool:
    """Keras 2: a non-trainable layer always runs in inference mode."""
    return bool(training) and config.trainable


__all__ = ["BatchNormConfig", "Resolved", "RandomAdjustment", "normalize_initializer", "sample_initializer",
           "training_effective", "FUSED_MIN_EPSILON"]
