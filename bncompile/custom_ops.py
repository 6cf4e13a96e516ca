"""bncompile's custom ops: Batch Renormalization, Ghost BN and adjustment, in domain ``ai.bncompile`` v1.

Keras's renorm, virtual_batch_size and adjustment have no ONNX operator. Each op here has

* a schema registered with onnx (``register_schemas()``), so the full checker and shape inference
  accept models that use it;
* a ``FunctionProto`` body of standard ops (opset 15), attached to every model that uses the op, so
  stock onnxruntime runs it with no plugin;
* an ``onnx.reference`` implementation (``REFERENCE_OPS``), for tests.

Layout. Every op takes ``X`` in a canonical 4-D layout ``(N, M, C, A)``: batch, the dims between the
batch and the channel(s) merged, the channel(s) merged, the dims after merged. The builder reaches it
from any Keras axis (int or list) with a Reshape (and a Transpose for non-contiguous axis lists), so one
function body serves every rank and axis, and its numbers come from attributes only. Parameters and
statistics are 1-D ``(C,)``, float32 (float64 with float64 inputs); ``X`` may be float16 or bfloat16.

Semantics (``docs/batchnorm-semantics.md``), with ``EMA_m(v, t) = v*m + t*(1-m)``:

* statistics over N, M, A (ghost: per virtual batch, the strided samples {g, g+G, ...} with
  G = N/virtual_batch_size; the moving statistics take the average of the group means and variances);
* renorm: ``s = max(renorm_stddev, sqrt(eps))``, ``r = clip(sqrt(var+eps)/s, rmin, rmax)``,
  ``d = clip((mean - renorm_mean)/s, -dmax, dmax)``, bounds default to no clipping (rmin 0, rmax inf,
  dmax inf); ``moving_variance_new = relu(moving_stddev_new**2 - eps)``;
* ``Y = ((xhat*r + d)*adj_scale + adj_bias)*scale + B`` (r = 1, d = 0 without renorm).

A batch that virtual_batch_size does not divide makes the Reshape in the ghost ops fail at run time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "ai.bncompile"
VERSION = 1
BODY_OPSET = 15


@dataclass(frozen=True)
class OpKind:
    name: str
    renorm: bool
    ghost: bool
    adjust: bool

    @property
    def inputs(self) -> list[str]:
        names = ["X", "scale", "B", "mean"]
        names += ["stddev", "renorm_mean", "renorm_stddev"] if self.renorm else ["var"]
        if self.adjust:
            names += ["adj_scale", "adj_bias"]
        return names

    @property
    def outputs(self) -> list[str]:
        names = ["Y", "mean_new", "var_new"]
        if self.renorm:
            names += ["stddev_new", "renorm_mean_new", "renorm_stddev_new"]
        return names

    @property
    def attributes(self) -> dict[str, object]:
        """Attribute name -> default value."""
        attrs: dict[str, object] = {"epsilon": 1e-3, "momentum": 0.99}
        if self.renorm:
            attrs.update(renorm_momentum=0.99, rmax=math.inf, rmin=0.0, dmax=math.inf)
        if self.ghost:
            attrs["virtual_batch_size"] = None  # required
        return attrs


OPS = {k.name: k for k in (
    OpKind("BatchRenormalization", renorm=True, ghost=False, adjust=False),
    OpKind("GhostBatchNormalization", renorm=False, ghost=True, adjust=False),
    OpKind("GhostBatchRenormalization", renorm=True, ghost=True, adjust=False),
    OpKind("AdjustedBatchNormalization", renorm=False, ghost=False, adjust=True),
    OpKind("AdjustedBatchRenormalization", renorm=True, ghost=False, adjust=True),
)}


@dataclass(frozen=True)
class GradKind:
    """The backward of a forward op: the gradients of ``sum(Y * dY)`` w.r.t. X, scale and B (see
    ``docs/batchnorm-semantics.md``, "Backward"). r, d and the adjustment are constants; the statistics
    are recomputed from X (the backward reads X and dY)."""

    forward: OpKind

    @property
    def name(self) -> str:
        return self.forward.name + "Grad"

    @property
    def inputs(self) -> list[str]:
        names = ["X", "dY", "scale"]
        if self.forward.renorm:
            names += ["renorm_mean", "renorm_stddev"]
        if self.forward.adjust:
            names += ["adj_scale", "adj_bias"]
        return names

    @property
    def outputs(self) -> list[str]:
        return ["dX", "dscale", "dB"]

    @property
    def attributes(self) -> dict[str, object]:
        attrs: dict[str, object] = {"epsilon": 1e-3}
        if self.forward.renorm:
            attrs.update(rmax=math.inf, rmin=0.0, dmax=math.inf)
        if self.forward.ghost:
            attrs["virtual_batch_size"] = None  # required
        return attrs


#: the backward ops, by name (not in OPS: the compile path inlines their bodies into standard ops)
GRAD_OPS = {g.name: g for g in (GradKind(k) for k in OPS.values())}


def op_for(*, renorm: bool, ghost: bool, adjust: bool) -> OpKind:
    for k in OPS.values():
        if (k.renorm, k.ghost, k.adjust) == (renorm, ghost, adjust):
            return k
    raise ValueError(f"no bncompile op for renorm={renorm} ghost={ghost} adjust={adjust}")


# --------------------------------------------------------------------------- function bodies

class _Body:
    """Tiny helper to write a function body: each call appends a node and returns its output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def __call__(self, op, *inputs, n_out=1, **attrs):
        outs = [f"t{self._n}_{i}" for i in range(n_out)]
        self._n += 1
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def attr_const(self, attr: str, like: str, *, ints: bool = False) -> str:
        """A scalar Constant whose value is the function attribute ``attr``, cast like ``like``."""
        out = f"c_{attr}"
        kind = "value_int" if ints else "value_float"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(AttributeProto(name=kind, ref_attr_name=attr,
                                             type=AttributeProto.INT if ints else AttributeProto.FLOAT))
        self.nodes.append(node)
        return out if ints else self("CastLike", out, like)

    def ints(self, name: str, values) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, [len(values)], list(values))))
        return name


def shifted_mean(b, xw: str, red: list[int]) -> str:
    """The mean of ``xw`` over the axes ``red`` (kept), corrected: ``k + mean(xw - k)`` with ``k`` the plain
    float32 mean (per channel, and group). The second reduction adds offsets about the spread instead of
    values about the mean, so its rounding is relative to the spread: in float32, onnxruntime's ReduceMean
    of 4M values of 1000 +- 1 per channel put ghost BN's y 1e-3 off (random testing); corrected, 1e-5.
    ``xw - k`` is exact where the values are within a factor 2 of ``k`` (Sterbenz).
    ``k`` was the largest value for one session (d1a0e12): exact, but 4 spreads from the mean of a normal
    sample, so on data whose mean is near 0 the second sum's rounding grew with it (moving_mean 30x to
    370x further off than the plain mean's; random testing again). The plain mean is within rounding of
    the mean whatever the data, and needs no Slice (TVM's ONNX frontend loses the shape after a Slice of
    a dynamic batch, and an inlined model must still compile)."""
    k = b("ReduceMean", xw, axes=list(red), keepdims=1)
    return b("Add", k, b("ReduceMean", b("Sub", xw, k), axes=list(red), keepdims=1))


def make_function(kind: OpKind) -> onnx.FunctionProto:
    b = _Body()
    u = "scale"                       # statistics type: like the parameters
    x = b("CastLike", "X", u)
    eps = b.attr_const("epsilon", u)
    mom = b.attr_const("momentum", u)
    one = b("CastLike", b("Constant", value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])), u)
    if kind.ghost:
        vbs = b("Reshape", b.attr_const("virtual_batch_size", u, ints=True), b.ints("shape1", [1]))
        grouped_shape = b("Concat", vbs, b.ints("minus1", [-1]), b("Shape", "X", start=1), axis=0)
        xw = b("Reshape", x, grouped_shape)                     # (v, G, M, C, A)
        red, pshape = [0, 2, 4], [1, 1, 1, -1, 1]
    else:
        xw, red, pshape = x, [0, 1, 3], [1, 1, -1, 1]
    pshape_c = b.ints("pshape", pshape)
    flat = b.ints("flat", [-1])
    mean = shifted_mean(b, xw, red)
    centered = b("Sub", xw, mean)
    var = b("ReduceMean", b("Mul", centered, centered), axes=red, keepdims=1)
    xhat = b("Div", centered, b("Sqrt", b("Add", var, eps)))
    if kind.ghost:                    # one update from the averages of the group statistics
        bmean = b("ReduceMean", mean, axes=[1], keepdims=1)
        bvar = b("ReduceMean", var, axes=[1], keepdims=1)
    else:
        bmean, bvar = mean, var
    out = xhat
    ema = lambda v, t, m: b("Add", b("Mul", v, m), b("Mul", t, b("Sub", one, m)))  # noqa: E731
    bmean_c = b("Reshape", bmean, flat)
    if kind.renorm:
        std = b("Sqrt", b("Add", bvar, eps))
        s = b("Max", b("Reshape", "renorm_stddev", pshape_c), b("Sqrt", eps))
        r = b("Div", std, s)
        d = b("Div", b("Sub", bmean, b("Reshape", "renorm_mean", pshape_c)), s)
        r = b("Min", b("Max", r, b.attr_const("rmin", u)), b.attr_const("rmax", u))
        dmax = b.attr_const("dmax", u)
        d = b("Min", b("Max", d, b("Neg", dmax)), dmax)
        out = b("Add", b("Mul", out, r), d)
        std_c = b("Reshape", std, flat)
        rmom = b.attr_const("renorm_momentum", u)
        stddev_new = ema("stddev", std_c, mom)
        updates = {
            "mean_new": ema("mean", bmean_c, mom),
            "var_new": b("Relu", b("Sub", b("Mul", stddev_new, stddev_new), eps)),
            "stddev_new": stddev_new,
            "renorm_mean_new": ema("renorm_mean", bmean_c, rmom),
            "renorm_stddev_new": ema("renorm_stddev", std_c, rmom),
        }
    else:
        updates = {"mean_new": ema("mean", bmean_c, mom), "var_new": ema("var", b("Reshape", bvar, flat), mom)}
    if kind.ghost:
        out = b("Reshape", out, b("Shape", "X"))
    if kind.adjust:
        out = b("Add", b("Mul", out, b("CastLike", "adj_scale", u)), b("CastLike", "adj_bias", u))
    pshape4 = b.ints("pshape4", [1, 1, -1, 1])
    y = b("Add", b("Mul", out, b("Reshape", "scale", pshape4)), b("Reshape", "B", pshape4))
    b.nodes.append(helper.make_node("CastLike", [y, "X"], ["Y"]))
    for name, value in updates.items():
        b.nodes.append(helper.make_node("Identity", [value], [name]))
    return helper.make_function(
        DOMAIN, kind.name, kind.inputs, kind.outputs, b.nodes,
        opset_imports=[helper.make_opsetid("", BODY_OPSET)],
        attributes=list(kind.attributes),
        doc_string=f"bncompile {kind.name}: see bncompile.custom_ops for the semantics.")


def emit_backward(b, *, x: str, dy: str, scale: str, eps: str, vbs: str | None = None,
                  renorm: Mapping[str, str] | None = None, adjust: tuple[str, str] | None = None
                  ) -> tuple[str, str, str]:
    """Append the backward of one BN call to ``b`` (a node writer: ``b(op, *inputs, **attrs) -> name``
    and ``b.ints(hint, values) -> name``), on x and dy in the canonical (N, M, C, A) layout, already in
    the statistics' type. ``vbs``: an int64 [1] tensor for ghost BN; ``renorm``: names of
    ``renorm_mean``/``renorm_stddev`` ((C,)) and ``rmin``/``rmax``/``dmax`` (scalars); ``adjust``:
    (adj_scale, adj_bias) in x's layout. The mean is :func:`shifted_mean`'s. Returns (dx in x's layout,
    dscale (C,), dB (C,)).

    ``dx = inv*(g - mean(g) - xhat*mean(g*xhat))`` with ``g = dy*r*adj_scale*scale`` per group.
    """
    if vbs is not None:
        grouped = b("Concat", vbs, b.ints("minus1", [-1]), b("Shape", x, start=1), axis=0)
        xw, dyw = b("Reshape", x, grouped), b("Reshape", dy, grouped)       # (v, G, M, C, A)
        red, sums, pshape = [0, 2, 4], [0, 1, 2, 4], [1, 1, 1, -1, 1]
    else:
        xw, dyw, red, sums, pshape = x, dy, [0, 1, 3], [0, 1, 3], [1, 1, -1, 1]
    pc = b.ints("pshape", pshape)
    mean = shifted_mean(b, xw, red)
    centered = b("Sub", xw, mean)
    var = b("ReduceMean", b("Mul", centered, centered), axes=red, keepdims=1)
    inv = b("Reciprocal", b("Sqrt", b("Add", var, eps)))
    xhat = b("Mul", centered, inv)
    gain = b("Reshape", scale, pc)
    out = xhat
    if renorm is not None:               # r and d: constants, from the group-averaged statistics
        bmean = b("ReduceMean", mean, axes=[1], keepdims=1) if vbs is not None else mean
        bvar = b("ReduceMean", var, axes=[1], keepdims=1) if vbs is not None else var
        s = b("Max", b("Reshape", renorm["renorm_stddev"], pc), b("Sqrt", eps))
        r = b("Min", b("Max", b("Div", b("Sqrt", b("Add", bvar, eps)), s), renorm["rmin"]), renorm["rmax"])
        d = b("Div", b("Sub", bmean, b("Reshape", renorm["renorm_mean"], pc)), s)
        d = b("Min", b("Max", d, b("Neg", renorm["dmax"])), renorm["dmax"])
        gain = b("Mul", gain, r)
        out = b("Add", b("Mul", out, r), d)
    grad = b("Mul", dyw, gain)
    if adjust is not None:
        out = b("Add", b("Mul", out, adjust[0]), adjust[1])
        grad = b("Mul", grad, adjust[0])
    mean_g = b("ReduceMean", grad, axes=red, keepdims=1)
    mean_gx = b("ReduceMean", b("Mul", grad, xhat), axes=red, keepdims=1)
    dx = b("Mul", inv, b("Sub", b("Sub", grad, mean_g), b("Mul", xhat, mean_gx)))
    if vbs is not None:
        dx = b("Reshape", dx, b("Shape", x))
    axes = b.ints("sum_axes", sums)
    dscale = b("ReduceSum", b("Mul", dyw, out), axes, keepdims=0)
    dbias = b("ReduceSum", dyw, axes, keepdims=0)
    return dx, dscale, dbias


def make_grad_function(kind: GradKind) -> onnx.FunctionProto:
    b = _Body()
    u = "scale"
    eps = b.attr_const("epsilon", u)
    fwd = kind.forward
    vbs = (b("Reshape", b.attr_const("virtual_batch_size", u, ints=True), b.ints("shape1", [1]))
           if fwd.ghost else None)
    renorm = ({"renorm_mean": "renorm_mean", "renorm_stddev": "renorm_stddev", "rmin": b.attr_const("rmin", u),
               "rmax": b.attr_const("rmax", u), "dmax": b.attr_const("dmax", u)} if fwd.renorm else None)
    adjust = (b("CastLike", "adj_scale", u), b("CastLike", "adj_bias", u)) if fwd.adjust else None
    dx, dscale, dbias = emit_backward(b, x=b("CastLike", "X", u), dy=b("CastLike", "dY", u), scale="scale",
                                      eps=eps, vbs=vbs, renorm=renorm, adjust=adjust)
    b.nodes.append(helper.make_node("CastLike", [dx, "X"], ["dX"]))
    b.nodes.append(helper.make_node("Identity", [dscale], ["dscale"]))
    b.nodes.append(helper.make_node("Identity", [dbias], ["dB"]))
    return helper.make_function(
        DOMAIN, kind.name, kind.inputs, kind.outputs, b.nodes,
        opset_imports=[helper.make_opsetid("", BODY_OPSET)],
        attributes=list(kind.attributes),
        doc_string=f"bncompile {kind.name}: the backward of {fwd.name}; see bncompile.custom_ops.")


# --------------------------------------------------------------------------- schemas

_T = ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"]
_U = ["tensor(float)", "tensor(double)"]


def _infer(ctx, *, scale: int = 1):
    """Y (dX): X's type and shape; every other output: the type and shape of the (C,) scale input."""
    xt = ctx.get_input_type(0)
    pt = ctx.get_input_type(scale)
    if xt is not None:
        ctx.set_output_type(0, xt)
    if pt is not None:
        for i in range(1, ctx.get_num_outputs()):
            ctx.set_output_type(i, pt)


_X_TYPED = ("X", "dY", "Y", "dX", "adj_scale", "adj_bias")


def _schema(kind: OpKind | GradKind) -> onnx.defs.OpSchema:
    S = onnx.defs.OpSchema
    FP = S.FormalParameter
    inputs = []
    for name in kind.inputs:
        tc = "T" if name in _X_TYPED else "U"
        inputs.append(FP(name, tc, f"{name} ({'canonical (N, M, C, A)' if name in ('X', 'dY') else '(C,)'})"))
    outputs = [FP(n, "T" if n in _X_TYPED else "U", n) for n in kind.outputs]
    attrs = []
    for name, default in kind.attributes.items():
        if default is None:
            attrs.append(S.Attribute(name, S.AttrType.INT, "required", required=True))
        else:
            attrs.append(S.Attribute(name, helper.make_attribute(name, float(default)), name))
    schema = S(kind.name, DOMAIN, VERSION, doc=f"bncompile {kind.name} (training step).",
               inputs=inputs, outputs=outputs,
               type_constraints=[("T", _T, "input and output type"), ("U", _U, "statistics type")],
               attributes=attrs)
    schema.set_type_and_shape_inference_function(functools.partial(_infer, scale=kind.inputs.index("scale")))
    return schema


_registered = False


def register_schemas() -> None:
    """Register the ops with onnx (idempotent), so the checker and shape inference accept them."""
    global _registered
    if _registered:
        return
    for kind in (*OPS.values(), *GRAD_OPS.values()):
        try:
            onnx.defs.get_schema(kind.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(_schema(kind))
    _registered = True


# --------------------------------------------------------------------------- onnx.reference

def numpy_op(kind: OpKind, inputs: dict, attrs: dict) -> list[np.ndarray]:
    """NumPy implementation of one op on the canonical layout (float64 math)."""
    a = {**kind.attributes, **attrs}
    x = np.asarray(inputs["X"]).astype(np.float64)
    eps, m = float(a["epsilon"]), float(a["momentum"])
    f = lambda n: np.asarray(inputs[n]).astype(np.float64)  # noqa: E731
    if kind.ghost:
        v = int(a["virtual_batch_size"])
        if x.shape[0] % v:
            raise ValueError(f"virtual_batch_size {v} does not divide the batch {x.shape[0]}")
        xw = x.reshape((v, x.shape[0] // v) + x.shape[1:])
        red = (0, 2, 4)
    else:
        xw, red = x, (0, 1, 3)
    mean = xw.mean(axis=red, keepdims=True)
    var = ((xw - mean) ** 2).mean(axis=red, keepdims=True)
    out = (xw - mean) / np.sqrt(var + eps)
    bmean = mean.mean(axis=1, keepdims=True).reshape(-1) if kind.ghost else mean.reshape(-1)
    bvar = var.mean(axis=1, keepdims=True).reshape(-1) if kind.ghost else var.reshape(-1)
    bshape = [1] * xw.ndim
    bshape[-2] = -1
    ema = lambda v_, t: v_ * m + t * (1 - m)  # noqa: E731
    if kind.renorm:
        std = np.sqrt(bvar + eps)
        s = np.maximum(f("renorm_stddev"), np.sqrt(eps))
        r = np.minimum(np.maximum(std / s, float(a["rmin"])), float(a["rmax"]))
        d = np.clip((bmean - f("renorm_mean")) / s, -float(a["dmax"]), float(a["dmax"]))
        out = out * r.reshape(bshape) + d.reshape(bshape)
        rm = float(a["renorm_momentum"])
        sn = ema(f("stddev"), std)
        upd = [ema(f("mean"), bmean), np.maximum(sn * sn - eps, 0), sn,
               f("renorm_mean") * rm + bmean * (1 - rm), f("renorm_stddev") * rm + std * (1 - rm)]
    else:
        upd = [ema(f("mean"), bmean), ema(f("var"), bvar)]
    out = out.reshape(x.shape)
    if kind.adjust:
        out = out * f("adj_scale") + f("adj_bias")
    y = out * f("scale").reshape(1, 1, -1, 1) + f("B").reshape(1, 1, -1, 1)
    udt = np.asarray(inputs["scale"]).dtype
    return [y.astype(np.asarray(inputs["X"]).dtype)] + [u.astype(udt) for u in upd]


def numpy_grad_op(kind: GradKind, inputs: dict, attrs: dict) -> list[np.ndarray]:
    """NumPy implementation of one backward op on the canonical layout (float64 math)."""
    a = {**kind.attributes, **attrs}
    fwd = kind.forward
    x = np.asarray(inputs["X"]).astype(np.float64)
    dy = np.asarray(inputs["dY"]).astype(np.float64)
    eps = float(a["epsilon"])
    f = lambda n: np.asarray(inputs[n]).astype(np.float64)  # noqa: E731
    if fwd.ghost:
        v = int(a["virtual_batch_size"])
        if x.shape[0] % v:
            raise ValueError(f"virtual_batch_size {v} does not divide the batch {x.shape[0]}")
        shape = (v, x.shape[0] // v) + x.shape[1:]
        xw, dyw, red, sums, bshape = x.reshape(shape), dy.reshape(shape), (0, 2, 4), (0, 1, 2, 4), (1, 1, 1, -1, 1)
    else:
        xw, dyw, red, sums, bshape = x, dy, (0, 1, 3), (0, 1, 3), (1, 1, -1, 1)
    mean = xw.mean(axis=red, keepdims=True)
    var = ((xw - mean) ** 2).mean(axis=red, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (xw - mean) * inv
    r, d = 1.0, 0.0
    if fwd.renorm:
        bmean = mean.mean(axis=1, keepdims=True) if fwd.ghost else mean
        bvar = var.mean(axis=1, keepdims=True) if fwd.ghost else var
        s = np.maximum(f("renorm_stddev").reshape(bshape), np.sqrt(eps))
        r = np.minimum(np.maximum(np.sqrt(bvar + eps) / s, float(a["rmin"])), float(a["rmax"]))
        d = np.clip((bmean - f("renorm_mean").reshape(bshape)) / s, -float(a["dmax"]), float(a["dmax"]))
    adj_s, adj_b = (f("adj_scale"), f("adj_bias")) if fwd.adjust else (1.0, 0.0)
    g = dyw * r * f("scale").reshape(bshape) * adj_s
    dx = inv * (g - g.mean(axis=red, keepdims=True) - xhat * (g * xhat).mean(axis=red, keepdims=True))
    dscale = (dyw * ((xhat * r + d) * adj_s + adj_b)).sum(axis=sums)
    udt = np.asarray(inputs["scale"]).dtype
    return [dx.reshape(x.shape).astype(np.asarray(inputs["X"]).dtype), dscale.astype(udt),
            dyw.sum(axis=sums).astype(udt)]


def _make_reference_ops():
    from onnx.reference.op_run import OpRun

    ops = []
    for kind in (*OPS.values(), *GRAD_OPS.values()):
        impl = numpy_grad_op if isinstance(kind, GradKind) else numpy_op

        def _run(self, *args, _kind=kind, _impl=impl, **kwargs):
            attrs = {k: getattr(self, k, None) for k in _kind.attributes}
            attrs.update(kwargs)
            attrs = {k: v for k, v in attrs.items() if v is not None}
            return tuple(_impl(_kind, dict(zip(_kind.inputs, args)), attrs))

        cls = type(kind.name, (OpRun,), {"op_domain": DOMAIN, "_run": _run})
        ops.append(cls)
    return ops


def reference_ops():
    """``onnx.reference.op_run.OpRun`` classes for ``ReferenceEvaluator(model, new_ops=...)``."""
    return _make_reference_ops()


__all__ = ["DOMAIN", "VERSION", "OPS", "GRAD_OPS", "OpKind", "GradKind", "op_for", "make_function",
           "make_grad_function", "emit_backward", "register_schemas", "reference_ops", "numpy_op", "numpy_grad_op"]
