"""Batch-normalization kernels compiled with TVM: ``compile_batchnorm(config, input_shape) -> Kernel``.

``Kernel.run(feeds)`` takes and returns the names of the training-step ONNX model of the same
config: inputs ``x``, the variables by Keras name (``gamma`` if scale, ``beta`` if center,
``moving_mean``, ``moving_variance``, with renorm ``moving_stddev``, ``renorm_mean``,
``renorm_stddev``; any array with the right element count), and ``adjustment_scale`` /
``adjustment_bias`` when ``config.adjustment == "inputs"``; outputs ``y`` and ``<name>_new`` for each
of ``config.updated_variable_names()``. Inference (``training=False`` or a non-trainable config)
returns ``y`` only.

Adjustment inputs (any shape that broadcasts against x) are materialized on the host: per channel
when they vary only along the normalized axes (the kernel then folds them into one scale and one
bias per channel), else broadcast to x's full shape (a second kernel variant reading them per
element, compiled on first use). A ``RandomAdjustment`` config draws per-channel uniform values
with NumPy (a generator seeded by the config's seed, fresh draws at each call) unless the feeds give
them, and returns them as ``adjustment_scale`` / ``adjustment_bias``.

Gradients (``compile_batchnorm(..., gradients=True)``): a second kernel,
:mod:`bncompile.lower.kernels.backward`, scheduled by
:mod:`bncompile.lower.kernels.schedules.backward_cpu` / ``backward_cuda``. ``run(feeds)`` with ``dy`` (y's
shape) in the feeds also returns ``dx`` (x's shape and dtype), ``dgamma`` (with scale) and ``dbeta``
(with center) in the variables' Keras shapes: the gradients of ``sum(y * dy)`` of
:func:`bncompile.reference.batchnorm_backward` (renorm's r and d from the variables before the update).
``bind_backward`` pre-binds the backward alone.

``Kernel.run_tvm(feeds, out=None)`` is the hot path: TVM tensors in, TVM tensors out, no copies
(x and the variables are viewed in the kernel's canonical shape; pass ``out`` to reuse outputs).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from bncompile.config import BatchNormConfig, RandomAdjustment, training_effective
from bncompile.errors import ConfigError, InputError, UnsupportedError
from bncompile.lower.kernels.backward import (backward_numpy, backward_output_names, backward_prim_func,
                                              backward_variable_names)
from bncompile.lower.kernels.compute import (KernelSpec, batchnorm_numpy, canonical_shape, make_spec,
                                             prim_func)

log = logging.getLogger(__name__)

_CACHE: dict = {}
_LOCK = threading.Lock()
# y of at least this many bytes is written with streaming stores on x86 (Kernel._streaming): well past
# what the caches keep for the next reader, where a cached write only costs a read of y from memory
STREAMING_MIN_BYTES = 4 << 20
BACKWARD_CPU_PIPELINE = True      # backward_cpu.cpu_pipeline for llvm targets (False: TVM's default)


@dataclass
class Built:
    """One compiled kernel variant."""

    spec: KernelSpec
    schedule: str
    executable: Any
    target: dict
    streaming: bool = False      # y written with non-temporal stores (schedules.nt_store_pass)

    @property
    def func(self):
        return self.executable["main"] if hasattr(self.executable, "__getitem__") else self.executable


def build_spec(spec: KernelSpec, *, target: Any = "llvm", schedule: str | None = None,
               streaming: bool = False) -> Built:
    """Compile ``spec`` for ``target`` (cached per spec, target, schedule and variant within the process).

    ``streaming``: write y with non-temporal stores (x86 llvm targets only, else ignored; see
    :func:`bncompile.lower.kernels.schedules.nt_store_pass`): faster when y is much larger than the caches.
    """
    from bncompile.lower import targets, tvm as _tvm
    from bncompile.lower.kernels import schedules

    tdict = targets.target_dict(target)
    nt = bool(streaming) and schedules.nt_stores_apply(tdict)
    machine = schedules.cpu_machine(tdict) if tdict.get("kind") == "llvm" else None
    key = (spec, repr(sorted(tdict.items())), schedule, nt, machine)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    func = prim_func(spec)
    name, sch = schedules.schedule(spec, func, target=tdict, rule=schedule, machine=machine)
    if tdict.get("kind") == "cuda":
        try:
            _tvm.verify_memory(sch.mod, tdict)      # catches host code touching device buffers
        except Exception as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise UnsupportedError(f"schedule {name} produced no CUDA kernel for layout {spec.kinds} "
                                   f"(host code reads device memory: {first})") from None
    nt = nt and name in schedules.STREAMING_RULES
    if tdict.get("kind") == "llvm":   # prefetches the schedule asked for; y streamed when nt (schedules.cpu_pipeline)
        ex = _tvm.tvm().compile(sch.mod, target=_tvm.make_target(tdict), tir_pipeline=schedules.cpu_pipeline(nt))
    else:
        ex = _tvm.build(sch.mod, tdict)
    if tdict.get("kind") == "cuda" and "cuda" not in _tvm.imported_kinds(ex):
        raise UnsupportedError(f"schedule {name} produced no CUDA kernel for layout {spec.kinds}")
    built = Built(spec=spec, schedule=name, executable=ex, target=tdict, streaming=nt)
    log.info("compiled batchnorm kernel %s %s %s with schedule %s", spec.kinds, spec.shape, spec.dtype, name)
    with _LOCK:
        _CACHE[key] = built
    return built


def build_backward(spec: KernelSpec, *, target: Any = "llvm", schedule: str | None = None,
                   streaming: bool = False) -> Built:
    """Compile the backward kernel of ``spec`` for ``target`` (cached like :func:`build_spec`);
    ``streaming``: dx written with non-temporal stores (x86 llvm, the rules of
    ``backward_cpu.STREAMING_RULES``; else ignored)."""
    from bncompile.lower import targets, tvm as _tvm
    from bncompile.lower.kernels import schedules
    from bncompile.lower.kernels.schedules import backward_cpu

    tdict = targets.target_dict(target)
    nt = bool(streaming) and schedules.nt_stores_apply(tdict)
    key = ("backward", spec, repr(sorted(tdict.items())), schedule, nt)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    name, sch = schedules.schedule_backward(spec, backward_prim_func(spec), target=tdict, rule=schedule)
    if tdict.get("kind") == "cuda":
        try:
            _tvm.verify_memory(sch.mod, tdict)
        except Exception as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise UnsupportedError(f"backward schedule {name} produced no CUDA kernel for layout {spec.kinds} "
                                   f"(host code reads device memory: {first})") from None
    nt = nt and name in backward_cpu.STREAMING_RULES
    if nt:
        ex = _tvm.tvm().compile(sch.mod, target=_tvm.make_target(tdict), tir_pipeline=backward_cpu.nt_dx_pipeline())
    elif tdict.get("kind") == "llvm" and BACKWARD_CPU_PIPELINE:
        ex = _tvm.tvm().compile(sch.mod, target=_tvm.make_target(tdict), tir_pipeline=backward_cpu.cpu_pipeline())
    else:
        ex = _tvm.build(sch.mod, tdict)
    if tdict.get("kind") == "cuda" and "cuda" not in _tvm.imported_kinds(ex):
        raise UnsupportedError(f"backward schedule {name} produced no CUDA kernel for layout {spec.kinds}")
    built = Built(spec=spec, schedule=name, executable=ex, target=tdict, streaming=nt)
    log.info("compiled batchnorm backward kernel %s %s %s with schedule %s", spec.kinds, spec.shape, spec.dtype,
             name)
    with _LOCK:
        _CACHE[key] = built
    return built


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


class Kernel:
    """A compiled batch normalization for one config, input shape (batch may be None), target, dtype."""

    def __init__(self, config: BatchNormConfig, input_shape: Sequence, *, training: bool = True,
                 target: Any = "llvm", dtype: str = "float32", schedule: str | None = None,
                 gradients: bool = False, backward_schedule: str | None = None):
        from bncompile.lower import targets, tvm as _tvm

        if not isinstance(config, BatchNormConfig):
            raise ConfigError(f"config: expected a BatchNormConfig, got {type(config).__name__}")
        self.config = config
        self.input_shape = tuple(None if d is None else int(d) for d in input_shape)
        if any(d is None for d in self.input_shape[1:]):
            raise ConfigError(f"input_shape: only the batch dimension may be None, got {self.input_shape}")
        self.training = training_effective(config, training)
        self.dtype = dtype
        self.target = targets.target_dict(target)
        self.device = _tvm.device_for(self.target)
        self.schedule_rule = schedule
        self.resolved = config.resolve(len(self.input_shape))
        self.param_shape = config.param_shape(self.input_shape)
        self._variants: dict = {}
        self._stripe_limits: dict = {}
        base_adj = None
        if self.training and config.adjustment is not None:
            base_adj = "channel"
        self.spec = make_spec(config, self.input_shape, training=self.training, dtype=dtype, adjustment=base_adj)
        self._built(base_adj)                          # compile now: errors surface here
        rule = self._batch_rule(base_adj, (1,) + tuple(self.input_shape[1:]))
        if rule is not None:                           # and the rule small batches run (not on a first call)
            self._built(base_adj, False, rule)
        self.gradients = bool(gradients)
        self.backward_schedule_rule = backward_schedule
        self._backward: dict[str | None, Built] = {}
        if self.gradients:
            self._built_backward(base_adj)
        self._rng = (np.random.default_rng(config.adjustment.seed)
                     if isinstance(config.adjustment, RandomAdjustment) else None)

    # ---- names
    @property
    def input_names(self) -> list[str]:
        names = ["x"] + self._variable_names()
        if self.training and self.config.adjustment == "inputs":
            names += ["adjustment_scale", "adjustment_bias"]
        return names

    @property
    def output_names(self) -> list[str]:
        names = ["y"]
        if self.training:
            names += [n + "_new" for n in self.config.updated_variable_names()]
            if isinstance(self.config.adjustment, RandomAdjustment):
                names += ["adjustment_scale", "adjustment_bias"]
        return names

    @property
    def backward_schedule(self) -> str | None:
        return self._built_backward(self.spec.adjustment).schedule if self.gradients else None

    def _built_backward(self, adjustment: str | None, streaming: bool = False) -> Built:
        key = (adjustment, streaming) if streaming else adjustment
        b = self._backward.get(key)
        if b is None:
            spec = self._built(adjustment).spec
            b = build_backward(spec, target=self.target, schedule=self.backward_schedule_rule, streaming=streaming)
            self._backward[key] = b
        return b

    @property
    def schedule(self) -> str:
        return self._built(self.spec.adjustment).schedule

    def schedule_for(self, x_shape: Sequence[int]) -> str:
        """The rule a call on x of ``x_shape`` runs (a symbolic-batch kernel may pick one per batch)."""
        self._check_x_shape(x_shape)
        return self._forward(self.spec.adjustment, tuple(int(d) for d in x_shape)).schedule

    @property
    def executable(self):
        return self._built(self.spec.adjustment).executable

    def _variable_names(self) -> list[str]:
        return self.spec.variable_names()

    def _built(self, adjustment: str | None, streaming: bool = False, rule: str | None = None) -> Built:
        key = (adjustment, streaming, rule) if streaming or rule else adjustment
        b = self._variants.get(key)
        if b is None:
            spec = self.spec if adjustment == self.spec.adjustment else \
                make_spec(self.config, self.input_shape, training=self.training, dtype=self.dtype,
                          adjustment=adjustment)
            b = build_spec(spec, target=self.target, schedule=rule or self.schedule_rule, streaming=streaming)
            self._variants[key] = b
        return b

    def _forward(self, adjustment: str | None, x_shape: Sequence[int]) -> Built:
        """The build a call on x of ``x_shape`` runs: streaming stores for a large y (:meth:`_streaming`),
        and, for a symbolic batch, the rule for this batch (:meth:`_batch_rule`)."""
        return self._built(adjustment, self._streaming(x_shape), self._batch_rule(adjustment, x_shape))

    def _batch_rule(self, adjustment: str | None, x_shape: Sequence[int]) -> str | None:
        """``cpu_channel_stripes`` for a batch of at most ``stripe_batch_max`` where the symbolic-batch
        build took ``cpu_channels_last`` (the sample blocks suit any batch; the stripes, measured faster,
        only one whose stripe stays in L2); else None (the build's own rule)."""
        if self.schedule_rule is not None or self.input_shape[0] is not None or self.target.get("kind") != "llvm":
            return None
        base = self._built(adjustment)
        if base.schedule != "cpu_channels_last":
            return None
        limit = self._stripe_limits.get(adjustment)
        if limit is None:
            from bncompile.lower.kernels import schedules

            limit = schedules.stripe_batch_max(base.spec, schedules.cpu_machine(self.target))
            self._stripe_limits[adjustment] = limit
        return "cpu_channel_stripes" if 0 < int(x_shape[0]) <= limit else None

    def _streaming(self, x_shape: Sequence[int]) -> bool:
        """Whether a call on x of ``x_shape`` uses the streaming-store variant: float32 y of at least
        ``STREAMING_MIN_BYTES`` on an x86 llvm target (smaller outputs stay in cache for their reader)."""
        from bncompile.lower.kernels import schedules

        if self.dtype != "float32" or not schedules.nt_stores_apply(self.target):
            return False
        return int(np.prod([int(d) for d in x_shape])) * 4 >= STREAMING_MIN_BYTES

    # ---- shapes
    def _check_x_shape(self, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        exp = self.input_shape
        if len(shape) != len(exp) or any(e is not None and e != s for e, s in zip(exp, shape)):
            raise InputError(f"x: shape {shape} does not match the compiled input shape "
                             f"{tuple('?' if e is None else e for e in exp)}")
        vbs = self.spec.virtual_batch_size
        if vbs and shape[0] % vbs:
            raise ConfigError(f"virtual_batch_size: {vbs} does not divide the batch size {shape[0]}; "
                              "use a batch that is a multiple of it")

    def _adjustment_mode(self, x_shape, scale, bias) -> str:
        """'channel' when both adjustment inputs vary only along the normalized axes, else 'full'."""
        rank = len(x_shape)
        for a in (scale, bias):
            shp = tuple(a.shape)
            try:
                out = np.broadcast_shapes(shp, tuple(x_shape))
            except ValueError:
                raise InputError(f"adjustment: shape {shp} does not broadcast against x {tuple(x_shape)}") from None
            if out != tuple(x_shape):
                raise InputError(f"adjustment: shape {shp} broadcasts x {tuple(x_shape)} to {out}")
            padded = (1,) * (rank - len(shp)) + shp
            if any(d != 1 for i, d in enumerate(padded) if i not in self.resolved.axes):
                return "full"
        return "channel"

    # ---- NumPy path
    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one step on NumPy arrays (or TVM tensors); returns NumPy arrays by output name."""
        from bncompile.lower import tvm as _tvm

        feeds = dict(feeds)
        if "x" not in feeds:
            raise InputError("feeds: 'x' is missing")
        if (all(_tvm.is_tvm_tensor(v) for v in feeds.values()) and self.config.adjustment is None
                and set(self.spec.variable_names()) <= set(feeds)
                and set(feeds) <= set(self.spec.variable_names()) | {"x"}):
            outs = self.run_tvm(feeds)
            return {k: v.numpy() for k, v in outs.items()}
        x = feeds.pop("x")
        x = x.numpy() if _tvm.is_tvm_tensor(x) else np.asarray(x)
        self._check_x_shape(x.shape)
        x = np.ascontiguousarray(x.astype(_np_dtype(self.dtype), copy=False))
        dy = self._dy(feeds, x)
        variables = self._variables(x.shape, feeds)
        adj_arrays, extra_out, mode = self._adjustment(x.shape, feeds)
        unknown = sorted(set(feeds) - set(self.config.variable_names()) - {"adjustment_scale", "adjustment_bias"})
        if unknown:
            raise InputError(f"feeds: unknown input(s) {unknown}; expected some of {self.input_names}")
        built = self._forward(mode, x.shape)
        spec = built.spec
        cs = canonical_shape(spec, x.shape)
        dev = self.device
        args = [_tvm.to_tensor(x.reshape(cs), dev)]
        args += [_tvm.to_tensor(variables[n].reshape(spec.channel_shape), dev) for n in spec.variable_names()]
        for a in adj_arrays:
            args.append(_tvm.to_tensor(a.reshape(spec.adjustment_shape() if mode == "channel" else cs), dev))
        outs = [_tvm.empty(cs, self.dtype, dev)] + [_tvm.empty(spec.channel_shape, "float32", dev)
                                                    for _ in spec.updated_names()]
        built.func(*args, *outs)
        result = {"y": outs[0].numpy().reshape(x.shape)}
        for name, t in zip(spec.updated_names(), outs[1:]):
            result[name + "_new"] = t.numpy().reshape(self.param_shape)
        result.update(extra_out)
        if dy is not None:
            bb = self._built_backward(mode, self._streaming(x.shape))
            bargs = [args[0], _tvm.to_tensor(dy.reshape(cs), dev)]
            bargs += [_tvm.to_tensor(variables[n].reshape(spec.channel_shape), dev)
                      for n in backward_variable_names(spec)]
            bargs += args[1 + len(spec.variable_names()):]            # the adjustment tensors
            bouts = [_tvm.empty(cs, self.dtype, dev)] + [_tvm.empty(spec.channel_shape, "float32", dev)
                                                         for _ in backward_output_names(spec)[1:]]
            bb.func(*bargs, *bouts)
            result["dx"] = bouts[0].numpy().reshape(x.shape)
            for name, t in zip(backward_output_names(spec)[1:], bouts[1:]):
                result[name] = t.numpy().reshape(self.param_shape)
        return result

    def _dy(self, feeds, x) -> np.ndarray | None:
        """Pop ``dy`` from ``feeds`` (None when absent); checked against x's shape."""
        from bncompile.lower import tvm as _tvm

        dy = feeds.pop("dy", None)
        if dy is None:
            return None
        if not self.gradients:
            raise InputError("feeds: 'dy' given, but this kernel was compiled without gradients; "
                             "use compile_batchnorm(..., gradients=True)")
        dy = dy.numpy() if _tvm.is_tvm_tensor(dy) else np.asarray(dy)
        if tuple(dy.shape) != tuple(x.shape):
            raise InputError(f"dy: shape {tuple(dy.shape)} is not the shape of y {tuple(x.shape)}; "
                             "pass dy of y's shape")
        return np.ascontiguousarray(dy.astype(_np_dtype(self.dtype), copy=False))

    def _variables(self, x_shape, feeds) -> dict[str, np.ndarray]:
        names = self.config.variable_names()
        given = {k: feeds.pop(k) for k in list(feeds) if k in names}
        given = {k: (v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v))
                 for k, v in given.items()}
        shape = tuple(int(s) for s in x_shape)
        size = int(np.prod(self.param_shape))
        for k, v in given.items():
            if v.size != size:
                raise InputError(f"feeds[{k!r}]: has {v.size} elements, expected {size} (shape {self.param_shape})")
        missing = [n for n in self.spec.variable_names() if n not in given]
        out = {k: np.asarray(v, dtype=np.float32) for k, v in given.items()}
        if missing:
            init = self.config.initial_variables(shape, {k: v.astype(np.float64) for k, v in given.items()})
            for n in missing:
                out[n] = init[n].astype(np.float32)
        return out

    def _adjustment(self, x_shape, feeds):
        """(arrays for the kernel, extra outputs, kernel adjustment mode)."""
        cfg = self.config.adjustment
        if not self.training or cfg is None:
            for k in ("adjustment_scale", "adjustment_bias"):
                feeds.pop(k, None)
            return [], {}, None
        s, b = feeds.pop("adjustment_scale", None), feeds.pop("adjustment_bias", None)
        extra = {}
        if s is None or b is None:
            if cfg == "inputs":
                raise InputError("feeds: this config has adjustment='inputs'; give adjustment_scale and "
                                 "adjustment_bias (arrays that broadcast against x)")
            C = int(np.prod(self.resolved.channel_shape(x_shape)))
            s = self._rng.uniform(cfg.scale_range[0], cfg.scale_range[1], C)
            b = self._rng.uniform(cfg.bias_range[0], cfg.bias_range[1], C)
            extra = {"adjustment_scale": s.reshape(self.param_shape).astype(np.float32),
                     "adjustment_bias": b.reshape(self.param_shape).astype(np.float32)}
            s = s.reshape(self.resolved.broadcast_shape(x_shape))
            b = b.reshape(self.resolved.broadcast_shape(x_shape))
        s = np.asarray(s.numpy() if hasattr(s, "numpy") and not isinstance(s, np.ndarray) else s, np.float32)
        b = np.asarray(b.numpy() if hasattr(b, "numpy") and not isinstance(b, np.ndarray) else b, np.float32)
        if isinstance(cfg, RandomAdjustment):
            bshape = self.resolved.broadcast_shape(x_shape)
            s = s.reshape(bshape) if s.size == int(np.prod(bshape)) else s
            b = b.reshape(bshape) if b.size == int(np.prod(bshape)) else b
        mode = self._adjustment_mode(x_shape, s, b)
        if mode == "channel":
            bshape = self.resolved.broadcast_shape(x_shape)
            arrays = [np.ascontiguousarray(np.broadcast_to(a.reshape((1,) * (len(x_shape) - a.ndim) + a.shape),
                                                           bshape)) for a in (s, b)]
        else:
            arrays = [np.ascontiguousarray(np.broadcast_to(a, tuple(x_shape))) for a in (s, b)]
        return arrays, extra, mode

    # ---- TVM path
    def run_tvm(self, feeds: Mapping[str, Any], out: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run on TVM tensors already on the kernel's device; no copies.

        ``feeds`` holds x and every variable of the kernel (and per-channel adjustment tensors for an
        adjustment config, in the variables' shape); ``out`` optionally gives the output tensors
        (any shapes with the right element counts) to write into. Returns the output tensors by name.
        """
        from bncompile.lower import tvm as _tvm

        mode = "channel" if self.spec.adjustment else None
        x = feeds["x"]
        xs = tuple(int(d) for d in x.shape)
        self._check_x_shape(xs)
        built = self._forward(mode, xs)
        spec = built.spec
        cs = canonical_shape(spec, xs)
        args = [_tvm.view(x, cs)]
        for n in spec.variable_names():
            if n not in feeds:
                raise InputError(f"feeds: run_tvm needs every variable; {n!r} is missing")
            args.append(_tvm.view(feeds[n], spec.channel_shape))
        if spec.adjustment:
            for n in ("adjustment_scale", "adjustment_bias"):
                if n not in feeds:
                    raise InputError(f"feeds: run_tvm needs per-channel {n!r} for this config")
                args.append(_tvm.view(feeds[n], spec.channel_shape))
        out = dict(out or {})
        names = ["y"] + [n + "_new" for n in spec.updated_names()]
        result = {}
        for name in names:
            t = out.get(name)
            if t is None:
                t = _tvm.empty(xs if name == "y" else self.param_shape, self.dtype if name == "y" else "float32",
                               self.device)
            result[name] = t
        outs = [_tvm.view(result["y"], cs)] + [_tvm.view(result[n], spec.channel_shape) for n in names[1:]]
        built.func(*args, *outs)
        return result

    def bind(self, feeds: Mapping[str, Any], out: Mapping[str, Any] | None = None):
        """Pre-bind TVM tensors; returns ``(call, outputs)`` where ``call()`` runs one step in place.

        The lowest-overhead way to run a step repeatedly (benchmarks, training loops that swap buffers).
        """
        from bncompile.lower import tvm as _tvm

        result = self.run_tvm(feeds, out)           # validates, allocates and warms up
        spec = self._built("channel" if self.spec.adjustment else None).spec
        func = self._forward(spec.adjustment, tuple(int(d) for d in feeds["x"].shape)).func
        cs = canonical_shape(spec, tuple(int(d) for d in feeds["x"].shape))
        args = [_tvm.view(feeds["x"], cs)] + [_tvm.view(feeds[n], spec.channel_shape) for n in spec.variable_names()]
        if spec.adjustment:
            args += [_tvm.view(feeds[n], spec.channel_shape) for n in ("adjustment_scale", "adjustment_bias")]
        names = ["y"] + [n + "_new" for n in spec.updated_names()]
        args += [_tvm.view(result["y"], cs)] + [_tvm.view(result[n], spec.channel_shape) for n in names[1:]]

        def call():
            func(*args)

        return call, result

    def bind_backward(self, feeds: Mapping[str, Any], out: Mapping[str, Any] | None = None):
        """Pre-bind the backward alone on TVM tensors: ``feeds`` holds x, dy, the variables the backward
        reads (``gamma`` with scale; ``renorm_mean``/``renorm_stddev`` with renorm; ``moving_mean``/
        ``moving_variance`` in inference) and per-channel adjustment tensors for an adjustment config;
        ``out`` optionally gives ``dx``/``dgamma``/``dbeta``. Returns ``(call, outputs)``."""
        from bncompile.lower import tvm as _tvm

        if not self.gradients:
            raise InputError("bind_backward: this kernel was compiled without gradients")
        xs = tuple(int(d) for d in feeds["x"].shape)
        self._check_x_shape(xs)
        if tuple(int(d) for d in feeds["dy"].shape) != xs:
            raise InputError(f"dy: shape {tuple(feeds['dy'].shape)} is not the shape of y {xs}")
        built = self._built_backward(self.spec.adjustment, self._streaming(xs))
        spec = built.spec
        cs = canonical_shape(spec, xs)
        names = backward_variable_names(spec)
        if spec.adjustment:
            names = names + ["adjustment_scale", "adjustment_bias"]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"feeds: bind_backward needs {missing}")
        args = [_tvm.view(feeds["x"], cs), _tvm.view(feeds["dy"], cs)]
        args += [_tvm.view(feeds[n], spec.channel_shape) for n in names]
        out = dict(out or {})
        result = {}
        for name in backward_output_names(spec):
            t = out.get(name)
            if t is None:
                t = _tvm.empty(xs, self.dtype, self.device) if name == "dx" else \
                    _tvm.empty(self.param_shape, "float32", self.device)
            result[name] = t
        args += [_tvm.view(result["dx"], cs)] + [_tvm.view(result[n], spec.channel_shape)
                                                 for n in backward_output_names(spec)[1:]]
        func = built.func

        def call():
            func(*args)

        call()
        return call, result

    def numpy_twin(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The same algorithm in NumPy float32 (for checking the kernel apart from TVM)."""
        feeds = dict(feeds)
        x = np.asarray(feeds.pop("x"))
        dy = self._dy(feeds, x)
        variables = self._variables(x.shape, feeds)
        adj_arrays, extra, mode = self._adjustment(x.shape, feeds)
        spec = self._built(mode).spec
        cs = canonical_shape(spec, x.shape)
        adj = tuple(a.reshape(spec.adjustment_shape() if mode == "channel" else cs) for a in adj_arrays) or None
        res = batchnorm_numpy(spec, x.reshape(cs), {k: v.reshape(spec.channel_shape) for k, v in variables.items()},
                              adj)
        out = {"y": res["y"].reshape(x.shape)}
        for n in spec.updated_names():
            out[n + "_new"] = res[n + "_new"].reshape(self.param_shape)
        out.update(extra)
        if dy is not None:
            grads = backward_numpy(spec, x.reshape(cs), dy.reshape(cs),
                                   {k: v.reshape(spec.channel_shape) for k, v in variables.items()}, adj)
            out["dx"] = grads.pop("dx").reshape(x.shape)
            out.update({k: v.reshape(self.param_shape) for k, v in grads.items()})
        return out

    def __repr__(self) -> str:
        return (f"Kernel({self.spec.kinds} {self.spec.shape} {self.dtype} training={self.training} "
                f"target={self.target.get('kind')} schedule={self.schedule})")


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def compile_batchnorm(config: BatchNormConfig, input_shape: Sequence, *, training: bool = True,
                      target: Any = "llvm", dtype: str = "float32", schedule: str | None = None,
                      gradients: bool = False) -> Kernel:
    """Compile ``config`` for inputs of ``input_shape`` (``None`` allowed for the batch).

    ``target``: ``"llvm"`` (host CPU), ``"cuda"`` (sm_90) or a TVM target dict. ``dtype``: x's and y's
    dtype (float32, float16, bfloat16); statistics and variables are float32. ``schedule`` forces a
    schedule rule by name (see :mod:`bncompile.lower.kernels.schedules`). ``gradients``: also compile the
    backward, so that ``run`` with ``dy`` in the feeds returns ``dx``, ``dgamma`` and ``dbeta``.
    """
    return Kernel(config, input_shape, training=training, target=target, dtype=dtype, schedule=schedule,
                  gradients=gradients)


__all__ = ["compile_batchnorm", "Kernel", "build_spec", "build_backward", "clear_cache", "KernelSpec", "make_spec"]
