"""``build_model``: a Keras ``BatchNormalization`` layer as an ONNX model (opset 15).

The contract (relied on by independent checks):

* Inference models (``training=False`` or ``trainable=False``): one input ``x``, one output ``y``; the
  variables are initializers named ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` (1-D
  ``(C,)``, C being the product of the normalized dims) and not graph inputs, so ``bncompile fold``
  can fold the BN. Renorm and ghost layers infer as plain BN, as in Keras: no custom op.
* Training-step models: inputs ``x``, then every variable (Keras names and Keras shapes, see
  ``BatchNormConfig.param_shape``) as a graph input with an initializer holding its initial value,
  then ``adjustment_scale``/``adjustment_bias`` with ``adjustment="inputs"``; outputs ``y``, then
  ``<name>_new`` for each variable a step updates (``moving_mean``, ``moving_variance``, and with renorm
  ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``), then, with the in-graph random adjustment,
  the ``adjustment_scale``/``adjustment_bias`` it drew.

How each mode is expressed:

* plain training: the standard ``BatchNormalization`` with ``training_mode=1`` on x reshaped so the
  channel(s) sit on axis 1 (a Reshape, free; a Transpose only for non-contiguous axis lists);
* Keras's fused path (unbiased moving variance): the same node fed a zero ``input_var``, so its
  ``running_var`` output is ``(1-m)*var_B``, then ``moving_variance_new = m*v + n/(n-1)*that``;
* renorm, ghost BN, adjustment: bncompile's custom ops (``bncompile.custom_ops``) whose function bodies
  are attached to the model;
* float16 x runs BatchNormalization with float32 parameters (opset 15 allows it); bfloat16 x is cast to
  float32 around it (onnxruntime has no bfloat16 BatchNormalization).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bncompile import custom_ops
from bncompile._version import __version__
from bncompile.config import BatchNormConfig, RandomAdjustment, Resolved, training_effective
from bncompile.errors import ConfigError

OPSET = 15
IR_VERSION = 8

DTYPES = {
    "float32": (TensorProto.FLOAT, np.float32),
    "float16": (TensorProto.FLOAT16, np.float16),
    "bfloat16": (TensorProto.BFLOAT16, None),
    "float64": (TensorProto.DOUBLE, np.float64),
}


def _normalize_shape(input_shape) -> list:
    try:
        if isinstance(input_shape, str):
            input_shape = [None if s.strip() in ("", "?", "None", "N", "-1") else int(s)
                           for s in input_shape.split(",")]
        shape = [None if d is None or (isinstance(d, (int, np.integer)) and d < 0) else int(d)
                 for d in input_shape]
    except (TypeError, ValueError):
        raise ConfigError(f"input_shape: expected a list of ints (None for a dynamic dim), got {input_shape!r}") \
            from None
    if any(d == 0 for d in shape if d is not None):
        raise ConfigError(f"input_shape: dimensions must be positive, got {input_shape!r}")
    if not 2 <= len(shape) <= 8:
        raise ConfigError(f"input_shape: rank {len(shape)} is not supported; use rank 2 to 8")
    return shape


class _Graph:
    """Collects nodes, initializers and value infos with unique names."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def name(self, hint: str) -> str:
        base = f"{self.prefix}/{hint}"
        n, i = base, 0
        while n in self._names:
            i += 1
            n = f"{base}_{i}"
        self._names.add(n)
        return n

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, *, outputs=None, domain: str = "",
             hint: str | None = None, **attrs):
        outs = list(outputs) if outputs is not None else [self.name(f"{hint or op}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(hint or op), domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def rename(self, value: str, name: str) -> None:
        """Rename the tensor ``value`` everywhere (it becomes a graph output named ``name``)."""
        for node in self.nodes:
            for seq in (node.input, node.output):
                for i, v in enumerate(seq):
                    if v == value:
                        seq[i] = name

    def const(self, hint: str, array: np.ndarray, *, name: str | None = None) -> str:
        n = name or self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def ints(self, hint: str, values) -> str:
        return self.const(hint, np.asarray(list(values), dtype=np.int64))


class _Layout:
    """Moves the normalized axes of x into the canonical layouts and back.

    ``bn``: (B, C, A) with the channel on axis 1, for BatchNormalization.
    ``op``: (N, M, C, A) for the custom ops (the batch dim kept apart for ghost BN).
    """

    def __init__(self, g: _Graph, x: str, shape: list, res: Resolved):
        self.g, self.shape, self.res = g, shape, res
        axes, rank = res.axes, res.rank
        contiguous = list(axes) == list(range(axes[0], axes[-1] + 1))
        if contiguous:
            self.perm = None
            self.tshape = list(shape)
            first, last = axes[0], axes[-1]
        else:  # move the axes to the end, keeping the others (batch first) in order
            self.perm = [i for i in range(rank) if i not in axes] + list(axes)
            self.tshape = [shape[i] for i in self.perm]
            first, last = rank - len(axes), rank - 1
        self.first, self.last = first, last
        self.C = int(np.prod([shape[a] for a in axes]))
        self.x = g.node("Transpose", [x], perm=self.perm, hint="to_channels_contiguous") if self.perm else x
        self._shape_of_x = None

    def _prod(self, dims) -> int | None:
        return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))

    def _shape_node(self) -> str:
        if self._shape_of_x is None:
            self._shape_of_x = self.g.node("Shape", [self.x], hint="shape_of_x")
        return self._shape_of_x

    def _dyn_prod(self, start: int, end: int) -> str:
        """int64[1]: product of dims [start, end) of (transposed) x, static when known."""
        dims = self.tshape[start:end]
        p = self._prod(dims)
        if p is not None:
            return self.g.ints("dim", [p])
        sl = self.g.node("Slice", [self._shape_node(), self.g.ints("s", [start]), self.g.ints("e", [end])])
        return self.g.node("ReduceProd", [sl], keepdims=1)

    def target(self, form: str) -> str:
        t = self.tshape
        if form == "bn":
            groups = [(0, self.first), None, (self.last + 1, len(t))]
        else:
            batch_is_channel = self.first == 0
            groups = ([(0, 0), (0, 0), None, (self.last + 1, len(t))] if batch_is_channel else
                      [(0, 1), (1, self.first), None, (self.last + 1, len(t))])
        static = [self._prod(t[a:b]) if grp is not None else self.C for grp in groups
                  for (a, b) in [grp or (0, 0)]]
        if sum(s is None for s in static) <= 1:  # at most one unknown group: Reshape's -1 infers it
            return self.g.ints(f"{form}_shape", [-1 if s is None else s for s in static])
        parts = [self._dyn_prod(*grp) if grp is not None else self.g.ints("C", [self.C]) for grp in groups]
        return self.g.node("Concat", parts, axis=0, hint=f"{form}_shape")

    def to(self, form: str, tensor: str | None = None) -> str:
        return self.g.node("Reshape", [tensor or self.x, self.target(form)], hint=f"to_{form}_layout")

    def back(self, y: str) -> str:
        if all(d is not None for d in self.tshape):
            shape = self.g.ints("x_shape", self.tshape)
        else:
            shape = self._shape_node()
        y = self.g.node("Reshape", [y, shape], hint="from_canonical_layout")
        if self.perm:
            inv = [self.perm.index(i) for i in range(len(self.perm))]
            y = self.g.node("Transpose", [y], perm=inv, hint="from_channels_contiguous")
        return y

    def adjustment(self, name: str, x_orig: str, like: str) -> str:
        """An adjustment input (broadcasting against x) in the custom ops' canonical layout, typed like ``like``."""
        value = self.g.node("CastLike", [name, like], hint=f"{name}_cast")
        full = self.g.node("Expand", [value, self.g.node("Shape", [x_orig])], hint=f"{name}_expand")
        if self.perm:
            full = self.g.node("Transpose", [full], perm=self.perm)
        return self.to("op", full)


def _mix_seed(seed: int, stream: int) -> float:
    """A large, float32-exact seed per (seed, stream): onnxruntime's generator (a linear congruential
    engine) gives nearly equal first draws for small seeds such as 0 and 1."""
    return float((int(seed) * 2654435761 + stream * 40503 + 97) % 16777213 + 1)


class _Writer:
    """``custom_ops.emit_backward``'s node-writer interface over a :class:`_Graph` (unique names)."""

    def __init__(self, g: _Graph):
        self.g = g

    def __call__(self, op, *inputs, **attrs):
        return self.g.node(op, inputs, hint=f"grad/{op}", **attrs)

    def ints(self, hint: str, values) -> str:
        return self.g.ints(f"grad/{hint}", values)


def build_model(config: BatchNormConfig, input_shape, *, training: bool, dtype: str = "float32",
                weights: Mapping[str, Any] | None = None, gradients: bool = False) -> onnx.ModelProto:
    """Build the ONNX model of one Keras ``BatchNormalization`` call (see the module docstring).

    ``gradients=True`` (training steps only) adds the input ``dy`` and the outputs ``dx``, ``dgamma``
    (with ``scale``) and ``dbeta`` (with ``center``): the gradients of ``sum(y * dy)``."""
    if not isinstance(config, BatchNormConfig):
        raise ConfigError(f"config: expected a BatchNormConfig, got {type(config).__name__}")
    if gradients and not training:
        raise ConfigError("gradients: the gradients belong to a training step; pass training=True")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    shape = _normalize_shape(input_shape)
    res = config.resolve(len(shape), dtype)
    pshape = config.param_shape(shape)          # validates the channel dims
    init = config.initial_variables(shape, weights)
    train = training_effective(config, training)
    x_type, _ = DTYPES[dtype]
    stat_np = np.float64 if dtype == "float64" else np.float32
    stat_type = TensorProto.DOUBLE if dtype == "float64" else TensorProto.FLOAT
    if train and config.virtual_batch_size is not None and shape[0] is not None \
            and shape[0] % config.virtual_batch_size:
        raise ConfigError(f"virtual_batch_size: {config.virtual_batch_size} does not divide the batch size "
                          f"{shape[0]}; use a batch that is a multiple of it")

    g = _Graph(config.name)
    dims = [d if d is not None else ("batch" if i == 0 else f"d{i}") for i, d in enumerate(shape)]
    inputs = [helper.make_tensor_value_info("x", x_type, dims)]
    outputs = []
    functions = []
    opsets = [helper.make_opsetid("", OPSET)]
    lay = _Layout(g, "x", shape, res)
    C = lay.C
    flat = lambda n: init[n].reshape(-1).astype(stat_np)  # noqa: E731

    def param(name):  # a variable as a (C,) tensor for BN / the custom ops
        if not train:
            return g.const(name, flat(name), name=name)
        inputs.append(helper.make_tensor_value_info(name, stat_type, list(pshape)))
        g.const(name, init[name].astype(stat_np), name=name)
        return name if len(pshape) == 1 else g.node("Reshape", [name, g.ints("flat", [-1])], hint=f"{name}_flat")

    def scale_bias():
        s = param("gamma") if config.scale else g.const("ones", np.ones(C, stat_np))
        b = param("beta") if config.center else g.const("zeros", np.zeros(C, stat_np))
        return s, b

    def emit_output(name, value):  # a (C,) result as the Keras-shaped output `name`
        # The producing node writes the graph output itself (no Identity or Reshape after it): onnxruntime
        # lets a training-mode BatchNormalization update its running statistics in place, into the
        # buffer of an initializer it was fed, whenever its output is an intermediate.
        if len(pshape) != 1:
            g.node("Reshape", [value, g.ints("pshape", list(pshape))], outputs=[name], hint=name)
        else:
            g.rename(value, name)
        outputs.append(helper.make_tensor_value_info(name, stat_type, list(pshape)))

    x_in = lay.x
    if x_type == TensorProto.BFLOAT16:
        x_in = g.node("Cast", [x_in], to=TensorProto.FLOAT, hint="x_to_float")
    custom = train and (config.renorm or config.virtual_batch_size is not None or config.adjustment is not None)

    custom_call = None
    if not train or not custom:
        xb = g.node("Reshape", [x_in, lay.target("bn")], hint="to_bn_layout")
        s, b = scale_bias()
        mean, var = param("moving_mean"), param("moving_variance")
        if not train:
            yb = g.node("BatchNormalization", [xb, s, b, mean, var], epsilon=res.epsilon,
                        hint="BatchNormalization")
        else:
            m = config.momentum
            if res.fused or len(pshape) != 1 or dtype == "float64":
                # With momentum 0 and zero statistics fed, the node returns the batch mean and (biased)
                # variance; the EMA is finished here in the statistics' own precision (ONNX attributes are
                # float32, too coarse for a float64 momentum), with the fused path's n/(n-1). The zeros are
                # computed, not initializers, and the variables reach the node only through this
                # arithmetic: onnxruntime updates a training-mode BatchNormalization's running statistics
                # in place, into the buffer it was fed, which must never be a variable's initializer.
                zero = g.const("zero", np.asarray(0.0, stat_np))
                yb, part_mean, part_var = g.node(
                    "BatchNormalization", [xb, s, b, g.node("Mul", [mean, zero], hint="zero_mean"),
                                           g.node("Mul", [var, zero], hint="zero_variance")], 3,
                    epsilon=res.epsilon, momentum=0.0, training_mode=1, hint="BatchNormalization")
                mom = g.const("momentum", np.asarray(m, stat_np))
                one_minus = g.const("one_minus_momentum", np.asarray(1.0 - m, stat_np))
                part_mean = g.node("Mul", [part_mean, one_minus])
                part_var = g.node("Mul", [part_var, one_minus])
                mean_new = g.node("Add", [g.node("Mul", [mean, mom]), part_mean], hint="moving_mean_ema")
                if res.fused:
                    n = lay._prod(shape)
                    if n is not None:
                        n_per_c = n // C
                        factor = g.const("bessel", np.asarray(n_per_c / max(n_per_c - 1, 1), stat_np))
                    else:
                        size = g.node("Cast", [g.node("Size", [x_in])], to=stat_type)   # x_in: onnxruntime has no bfloat16 Size
                        n_f = g.node("Div", [size, g.const("C", np.asarray(C, stat_np))])
                        one = g.const("one", np.asarray(1.0, stat_np))
                        factor = g.node("Div", [n_f, g.node("Max", [g.node("Sub", [n_f, one]), one])],
                                        hint="bessel")
                    part_var = g.node("Mul", [part_var, factor], hint="unbiased")
                var_new = g.node("Add", [g.node("Mul", [var, mom]), part_var], hint="moving_variance_ema")
            else:
                yb, mean_new, var_new = g.node("BatchNormalization", [xb, s, b, mean, var], 3, epsilon=res.epsilon,
                                               momentum=m, training_mode=1, hint="BatchNormalization")
            emit_output("moving_mean_new", mean_new)
            emit_output("moving_variance_new", var_new)
        y = yb
    else:
        kind = custom_ops.op_for(renorm=config.renorm, ghost=config.virtual_batch_size is not None,
                                 adjust=config.adjustment is not None)
        custom_ops.register_schemas()
        functions.append(custom_ops.make_function(kind))
        opsets.append(helper.make_opsetid(custom_ops.DOMAIN, custom_ops.VERSION))
        xo = g.node("Reshape", [x_in, lay.target("op")], hint="to_op_layout")
        s, b = scale_bias()
        mean = param("moving_mean")
        args = [xo, s, b, mean]
        attrs = {"epsilon": res.epsilon, "momentum": config.momentum}
        if config.renorm:
            param("moving_variance")  # a graph input like every variable; renorm overwrites it
            args += [param("moving_stddev"), param("renorm_mean"), param("renorm_stddev")]
            clip = config.renorm_clipping or {}
            attrs.update(renorm_momentum=config.renorm_momentum, **{k: float(v) for k, v in clip.items()})
        else:
            args.append(param("moving_variance"))
        if config.virtual_batch_size is not None:
            attrs["virtual_batch_size"] = config.virtual_batch_size
        adj_outputs = []
        if config.adjustment == "inputs":
            # required inputs (the caller computes them, as Keras's adjustment function would) of x's
            # rank, each dim either x's size or 1 (the checker wants a declared rank: reshape a (C,)
            # vector to (1, ..., C, ..., 1))
            for name in ("adjustment_scale", "adjustment_bias"):
                inputs.append(helper.make_tensor_value_info(name, x_type,
                                                            [f"{name}_d{i}" for i in range(len(shape))]))
                args.append(lay.adjustment(name, "x", xo))
        elif isinstance(config.adjustment, RandomAdjustment):
            adj = config.adjustment
            for i, (name, (lo, hi)) in enumerate((("adjustment_scale", adj.scale_range),
                                                  ("adjustment_bias", adj.bias_range))):
                drawn = g.node("RandomUniform", [], low=float(lo), high=float(hi), seed=_mix_seed(adj.seed, i),
                               shape=[C], dtype=stat_type, hint=name)
                adj_outputs.append((name, drawn))
                per_channel = g.node("Reshape", [drawn, g.ints("bshape", [1, 1, C, 1])])
                args.append(g.node("CastLike", [per_channel, xo]))
        # every attribute explicit: function bodies read them through ref_attr_name (no defaults in IR 8)
        attrs = {**{k: v for k, v in kind.attributes.items() if v is not None}, **attrs}
        outs = g.node(kind.name, args, len(kind.outputs), domain=custom_ops.DOMAIN, hint=kind.name, **attrs)
        y = outs[0]
        names = ["moving_mean_new", "moving_variance_new"]
        if config.renorm:
            names += ["moving_stddev_new", "renorm_mean_new", "renorm_stddev_new"]
        for name, value in zip(names, outs[1:]):
            emit_output(name, value)
        for name, value in adj_outputs:
            g.node("Identity", [value], outputs=[name], hint=name)
            outputs.append(helper.make_tensor_value_info(name, stat_type, [C]))
        custom_call = (kind, args, attrs)

    if x_type == TensorProto.BFLOAT16:
        y = g.node("Cast", [y], to=TensorProto.BFLOAT16, hint="y_to_bfloat16")
    y = lay.back(y)
    g.node("Identity", [y], outputs=["y"], hint="y")
    outputs.insert(0, helper.make_tensor_value_info("y", x_type, dims))
    if gradients:
        _emit_gradients(g, lay, config, res, train, custom_call, inputs, outputs, functions, dims, x_type,
                        stat_type, stat_np, list(pshape))

    graph = helper.make_graph(g.nodes, config.name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions,
                              producer_name="bncompile", producer_version=__version__)
    model.ir_version = IR_VERSION
    model.doc_string = (f"Keras BatchNormalization ({'training step' if train else 'inference'}), "
                        f"built by bncompile {__version__}")
    meta = {
        "bncompile.mode": "training" if train else "inference",
        "bncompile.config": config.to_json(),
        "bncompile.input_shape": json.dumps(shape),
        "bncompile.dtype": dtype,
        "bncompile.fused_path": json.dumps(res.fused),
    }
    for k in ("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint"):
        if getattr(config, k) is not None:
            meta[f"keras.{k}"] = json.dumps(getattr(config, k), default=str)
    helper.set_model_props(model, meta)
    return model


def _emit_gradients(g: _Graph, lay: _Layout, config: BatchNormConfig, res: Resolved, train: bool, custom_call,
                    inputs: list, outputs: list, functions: list, dims: list, x_type: int, stat_type: int,
                    stat_np, pshape: list) -> None:
    """Input ``dy`` and outputs ``dx``/``dgamma``/``dbeta``: standard ops for plain and fused layers (and
    the inference-mode gradient of a non-trainable layer), the ``<Op>Grad`` custom op for renorm, ghost
    and adjustment, on x and dy in the custom ops' canonical layout."""
    inputs.append(helper.make_tensor_value_info("dy", x_type, dims))
    dy_t = g.node("Transpose", ["dy"], perm=lay.perm, hint="dy_to_channels_contiguous") if lay.perm else "dy"
    like = next(i.name for i in g.inits if i.data_type == stat_type)     # any statistics-typed tensor
    if not train:                # Keras 2 runs a non-trainable layer in inference mode, even in training
        to_u = lambda t: g.node("CastLike", [g.node("Reshape", [t, lay.target("bn")]), like])  # noqa: E731
        xb, dyb = to_u(lay.x), to_u(dy_t)
        bshape = g.ints("grad/bshape", [1, -1, 1])
        gain = g.node("Reshape", ["gamma" if config.scale else g.const("ones", np.ones(lay.C, stat_np)), bshape])
        inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", ["moving_variance",
                                                                  g.const("eps", np.asarray(res.epsilon, stat_np))])])])
        inv = g.node("Reshape", [inv, bshape])
        xhat = g.node("Mul", [g.node("Sub", [xb, g.node("Reshape", ["moving_mean", bshape])]), inv])
        dx = g.node("Mul", [dyb, g.node("Mul", [gain, inv])])
        axes = g.ints("grad/sum_axes", [0, 2])
        dscale = g.node("ReduceSum", [g.node("Mul", [dyb, xhat]), axes], keepdims=0)
        dbias = g.node("ReduceSum", [dyb, axes], keepdims=0)
    else:
        xo = g.node("CastLike", [lay.to("op", lay.x), like])
        dyo = g.node("CastLike", [lay.to("op", dy_t), like])
        scale = custom_call[1][1] if custom_call else None
        if custom_call is None:          # plain and fused: the same body, in the main graph
            scale = (g.node("Reshape", ["gamma", g.ints("flat", [-1])]) if config.scale and len(pshape) != 1
                     else "gamma" if config.scale else g.const("ones", np.ones(lay.C, stat_np)))
            dx, dscale, dbias = custom_ops.emit_backward(_Writer(g), x=xo, dy=dyo, scale=scale,
                                                         eps=g.const("eps", np.asarray(res.epsilon, stat_np)))
        else:
            kind, args, attrs = custom_call
            grad = custom_ops.GRAD_OPS[kind.name + "Grad"]
            functions.append(custom_ops.make_grad_function(grad))
            gargs = [xo, dyo, args[1]]
            if kind.renorm:
                gargs += [args[5], args[6]]              # renorm_mean, renorm_stddev (before the update)
            if kind.adjust:
                gargs += args[-2:]
            gattrs = {k: v for k, v in attrs.items() if k in grad.attributes}
            dx, dscale, dbias = g.node(grad.name, gargs, 3, domain=custom_ops.DOMAIN, hint=grad.name, **gattrs)
    dx = g.node("CastLike", [dx, lay.x])
    dx = lay.back(dx)
    g.node("Identity", [dx], outputs=["dx"], hint="dx")
    outputs.append(helper.make_tensor_value_info("dx", x_type, dims))
    for keep, name, value in ((config.scale, "dgamma", dscale), (config.center, "dbeta", dbias)):
        if keep:
            g.node("Reshape", [value, g.ints("pshape", pshape)], outputs=[name], hint=name)
            outputs.append(helper.make_tensor_value_info(name, stat_type, pshape))


__all__ = ["build_model", "OPSET"]
