"""ONNX -> Relax: TVM's ONNX frontend with bncompile's converters, and the operator-support check.

* :func:`unsupported_ops` checks every operator against the frontend's converter map (and ours), so that
  :func:`check_supported` reports ALL unsupported ones in one :class:`UnsupportedError`;
* :func:`make_converters` are the converter overrides: training-mode ``BatchNormalization``
  (``training_mode=1``) and the custom ops (``ai.bncompile``) become a ``call_tir`` of OUR kernel
  (:mod:`bncompile.lower.kernels.compute`, scheduled by :mod:`bncompile.lower.kernels.schedules` for the
  target), never TVM's ``batch_norm`` (whose momentum is the PyTorch one: TVM 0.27's frontend passes ONNX's
  momentum through unchanged, which swaps the weights of the running-statistics update); inference
  ``BatchNormalization`` keeps TVM's converter; the backward custom ops (``<Op>Grad``, from
  ``build_model(..., gradients=True)``) become a ``call_tir`` of our backward kernel
  (:mod:`bncompile.lower.kernels.backward`), so one library runs a full training step (the plain and
  fused layers' backward is standard ops, which TVM fuses); ``MaxPool`` / ``AveragePool`` with
  ``auto_pad`` SAME_* get the spec's explicit pads first (:func:`same_pads`: TVM 0.27's converter is one
  row short for SAME_LOWER and shifts the windows when the kernel is smaller than the stride);
  ``ConvTranspose``'s ``output_shape`` becomes the spec's pads (TVM's converter ignores it); a ``Resize``
  whose scales give a fractional size is refused (TVM's resizes by out / in, not by the scale);
* :func:`from_onnx` runs ``tvm.relax.frontend.onnx.from_onnx`` with those converters (installed by the
  shim's :func:`bncompile.lower.tvm.patched_onnx_converters`); symbolic dims (``dim_param``) stay symbolic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Mapping

import numpy as np
import onnx

from bncompile.custom_ops import DOMAIN as CUSTOM_DOMAIN
from bncompile.errors import BncompileError, InputError, UnsupportedError
from bncompile.lower import tvm as _tvm
from bncompile.lower.runtime import fmt_shape as _fmt_shape

log = logging.getLogger(__name__)

__all__ = ["KernelContext", "make_converters", "unsupported_ops", "check_supported", "from_onnx"]


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for g in _subgraphs(n):
            yield from _all_nodes(g)


# --------------------------------------------------------------------------- operator support

def unsupported_ops(model: onnx.ModelProto, convert_map: Mapping | None = None) -> dict[str, list[str]]:
    """``{"domain::op" or "op": [node names]}`` for every operator the compile cannot convert."""
    from bncompile import custom_ops

    if convert_map is None:
        convert_map = _tvm.relax_onnx().onnx_frontend._get_convert_map()
    out: dict[str, list[str]] = {}
    for n in _all_nodes(model.graph):
        dom = n.domain or ""
        if dom in ("", "ai.onnx"):
            ok = n.op_type in convert_map or n.op_type in ("If", "Constant")
            key = n.op_type
        elif dom == CUSTOM_DOMAIN:
            ok = n.op_type in custom_ops.OPS or n.op_type in custom_ops.GRAD_OPS
            key = f"{dom}::{n.op_type}"
        else:
            ok, key = False, f"{dom}::{n.op_type}"
        if not ok:
            out.setdefault(key, []).append(n.name or f"<{n.op_type} -> {n.output[0] if n.output else '?'}>")
    return out


def _unsupported_message(bad: Mapping[str, list[str]]) -> str:
    parts = []
    for op, nodes in sorted(bad.items()):
        shown = ", ".join(nodes[:3]) + (f", ... {len(nodes) - 3} more" if len(nodes) > 3 else "")
        parts.append(f"{op} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}: {shown})")
    return (f"{len(bad)} operator type{'s are' if len(bad) != 1 else ' is'} not supported by the TVM ONNX "
            f"frontend: {'; '.join(parts)}")


def check_supported(model: onnx.ModelProto, converters: Mapping) -> None:
    """Raise one UnsupportedError naming every operator of ``model`` that cannot be converted."""
    bad = unsupported_ops(model, {**_tvm.relax_onnx().onnx_frontend._get_convert_map(), **converters})
    if bad:
        raise UnsupportedError(_unsupported_message(bad))


def from_onnx(model: onnx.ModelProto, converters: Mapping, inputs: list[dict]):
    """The Relax module of ``model`` (converted with ``converters`` on top of TVM's); the frontend's
    failures become an UnsupportedError (with a hint when ``inputs`` have several free dims)."""
    buf = io.StringIO()
    try:
        import warnings

        with _tvm.patched_onnx_converters(converters), contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _tvm.relax_onnx().from_onnx(model)
    except BncompileError:
        raise
    except Exception as err:
        where = buf.getvalue().strip().splitlines()
        lines = str(err).strip().splitlines()
        msg = lines[-1] if lines else type(err).__name__
        free = [f"{i['name']} {_fmt_shape(i['shape'])}" for i in inputs
                if sum(not isinstance(d, int) for d in i["shape"]) > 1]
        hint = (f"; inputs with several free dims ({', '.join(free)}) may need static shapes: give them with "
                "input_shapes / --input-shape") if free else ""
        raise UnsupportedError(f"TVM's ONNX frontend failed{' (' + where[-1][:200] + ')' if where else ''}: "
                               f"{type(err).__name__}: {msg[:300]}{hint}") from None


# --------------------------------------------------------------------------- converters

def _static(d) -> int | None:
    try:
        return int(d)
    except Exception:
        return None


class KernelContext:
    """Per-compile state of the converter overrides: the target and the kernels added so far."""

    def __init__(self, tdict: dict):
        self.tdict = tdict
        self.kernels: dict = {}        # KernelSpec -> GlobalVar
        self.backward_kernels: dict = {}   # KernelSpec -> GlobalVar of its backward
        self.schedules: dict = {}      # kernel name -> schedule rule name
        self.fallbacks: list[str] = []
        self.multiples: dict[str, int] = {}   # symbolic dim name -> the batch must be a multiple of this
        # symbolic dim name -> what it is broadcast against (an int or another symbolic dim's name): a feed's
        # dim must be 1 or that size (CompiledModel.run checks it; the kernels clamp their reads anyway)
        self.broadcasts: dict[str, list] = {}

    def note_broadcast(self, data_dims, target_dims) -> None:
        """Record the run-time broadcast of symbolic ``data_dims`` against ``target_dims`` (ONNX
        right-aligned broadcasting; a target dim of 1 or a compound expression adds nothing)."""
        tirx = _tvm.tirx()
        pad = len(target_dims) - len(data_dims)
        for k, d in enumerate(data_dims):
            if not isinstance(d, tirx.Var) or k + pad < 0:
                continue
            t = target_dims[k + pad]
            want = int(t) if isinstance(t, tirx.IntImm) else (t.name if isinstance(t, tirx.Var) else None)
            if want is None or want == 1 or want == d.name:
                continue
            seen = self.broadcasts.setdefault(d.name, [])
            if want not in seen:
                seen.append(want)

    def _add(self, bb, spec, *, backward: bool):
        """Our kernel for ``spec`` (its backward when ``backward``) as a PrimFunc of the module, scheduled
        for the target, added once per spec."""
        from bncompile.lower.kernels import backward as bwd, compute, schedules

        table = self.backward_kernels if backward else self.kernels
        gv = table.get(spec)
        if gv is not None:
            return gv
        build = bwd.backward_prim_func if backward else compute.prim_func
        apply = schedules.schedule_backward if backward else schedules.schedule
        what = "batchnorm backward kernel" if backward else "batchnorm kernel"
        func, rule = build(spec), "unscheduled"
        try:
            rule, sch = apply(spec, func, target=self.tdict)
            func = sch.mod["main"]
        except BncompileError as err:          # no rule for this target kind: default pipeline decides
            log.info("%s %s left to the default pipeline: %s", what, spec.kinds, err)
        except Exception as err:  # pragma: no cover - a schedule bug must not break the compile
            log.warning("schedule of %s %s failed (%s); using the unscheduled kernel", what, spec.kinds, err)
            func, rule = build(spec), "unscheduled"
        name = f"bncompile_bn_{'grad_' if backward else ''}{len(table)}"
        gv = bb.add_func(func.with_attr("global_symbol", name), name)
        table[spec] = gv
        self.schedules[name] = rule
        return gv

    def kernel(self, bb, spec):
        return self._add(bb, spec, backward=False)

    def backward_kernel(self, bb, spec):
        return self._add(bb, spec, backward=True)


def _node_label(attr) -> str:
    name = (attr.get("tvm_custom") or {}).get("name")
    return repr(name) if name else "(unnamed)"


def _shape_of(x, what: str, attr) -> list:
    ty = x.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise UnsupportedError(f"node {_node_label(attr)}: {what} has an unknown shape; give static shapes "
                               "with input_shapes / --input-shape")
    return list(shape.values)


def _emit_bn_kernel(ctx: KernelContext, bb, attr, *, op: str, x, params: list, adjustment=None,
                    epsilon: float, momentum: float, renorm_momentum: float = 0.99, renorm: bool = False,
                    clipping: tuple = (), ghost: int | None = None, layout: str):
    """Emit OUR training kernel for x; returns ``[y, *updated stats]`` (float32 stats)."""
    from bncompile.lower.kernels.compute import KernelSpec

    relax = _tvm.tvm().relax
    dtype, shp, spec_shape, kinds, rshape, C = _kernel_layout(ctx, attr, op, x, ghost=ghost, layout=layout)
    spec = KernelSpec(training=True, shape=spec_shape, kinds=kinds, dtype=dtype, epsilon=float(epsilon),
                      momentum=float(momentum), renorm_momentum=float(renorm_momentum), renorm=renorm,
                      clipping=clipping, adjustment="full" if adjustment is not None else None,
                      virtual_batch_size=int(ghost) if ghost else None)
    gv = ctx.kernel(bb, spec)
    xc = bb.emit(relax.op.reshape(x, rshape))

    def stat(p):
        p = bb.emit(relax.op.reshape(p, (C,)))
        return p if str(p.ty.dtype) == "float32" else bb.emit(relax.op.astype(p, "float32"))

    args = [xc] + [stat(p) for p in params]
    if adjustment is not None:
        for a in adjustment:
            a = a if str(a.ty.dtype) == "float32" else bb.emit(relax.op.astype(a, "float32"))
            args.append(bb.emit(relax.op.broadcast_to(a, rshape)))
    out_ty = [relax.TensorType(rshape, dtype)] + [relax.TensorType((C,), "float32")
                                                  for _ in spec.updated_names()]
    res = bb.emit(relax.call_tir(gv, args, out_ty=out_ty))
    y = bb.emit(relax.op.reshape(relax.TupleGetItem(res, 0), shp))
    return [y] + [bb.emit(relax.TupleGetItem(res, i + 1)) for i in range(len(spec.updated_names()))]


def _emit_bn_backward_kernel(ctx: KernelContext, bb, attr, *, op: str, x, dy, gamma, renorm_vars=None,
                             adjustment=None, epsilon: float, clipping: tuple = (), ghost: int | None = None):
    """Emit OUR backward kernel for x, dy (canonical (N, M, C, A)); returns ``[dx, dgamma, dbeta]``."""
    from bncompile.lower.kernels.compute import KernelSpec

    relax = _tvm.tvm().relax
    dtype, shp, spec_shape, kinds, rshape, C = _kernel_layout(ctx, attr, op, x, ghost=ghost, layout="canonical")
    spec = KernelSpec(training=True, shape=spec_shape, kinds=kinds, dtype=dtype, epsilon=float(epsilon),
                      renorm=renorm_vars is not None, clipping=clipping,
                      adjustment="full" if adjustment is not None else None,
                      virtual_batch_size=int(ghost) if ghost else None)
    gv = ctx.backward_kernel(bb, spec)

    def f32(v):
        return v if str(v.ty.dtype) == "float32" else bb.emit(relax.op.astype(v, "float32"))

    def as_x(v):
        return v if str(v.ty.dtype) == dtype else bb.emit(relax.op.astype(v, dtype))

    args = [bb.emit(relax.op.reshape(x, rshape)), bb.emit(relax.op.reshape(as_x(dy), rshape))]
    args += [f32(bb.emit(relax.op.reshape(p, (C,)))) for p in [gamma, *(renorm_vars or ())]]
    for a in adjustment or ():
        args.append(bb.emit(relax.op.broadcast_to(f32(a), rshape)))
    out_ty = [relax.TensorType(rshape, dtype), relax.TensorType((C,), "float32"), relax.TensorType((C,), "float32")]
    res = bb.emit(relax.call_tir(gv, args, out_ty=out_ty))
    dx = bb.emit(relax.op.reshape(relax.TupleGetItem(res, 0), shp))
    return [dx, bb.emit(relax.TupleGetItem(res, 1)), bb.emit(relax.TupleGetItem(res, 2))]


def _kernel_layout(ctx: KernelContext, attr, op: str, x, *, ghost, layout: str):
    """``(dtype, x shape, spec shape, kinds, reshaped x shape, C)`` of a kernel call on x."""
    from bncompile.lower.kernels.compute import DTYPES, SYMBOLIC

    dtype = str(x.ty.dtype)
    if dtype not in DTYPES:
        raise UnsupportedError(f"node {_node_label(attr)} ({op}): input dtype {dtype} is not supported by "
                               f"bncompile's kernels ({', '.join(DTYPES)})")
    shp = _shape_of(x, "X", attr)
    rest = [_static(d) for d in shp[1:]]
    if any(d is None for d in rest):
        raise UnsupportedError(f"node {_node_label(attr)} ({op}): X has shape {[str(d) for d in shp]}; only "
                               "the batch dimension may be symbolic: give --input-shape / input_shapes")
    n0 = _static(shp[0])
    N = shp[0]
    if layout == "bn":                  # ONNX BatchNormalization: (N, C, D1, ...)
        C = rest[0]
        Q = int(np.prod(rest[1:], dtype=np.int64)) if len(rest) > 1 else 1
        mid = [1, C, Q]
    else:                               # custom ops: canonical (N, M, C, A)
        if len(shp) != 4:
            raise UnsupportedError(f"node {_node_label(attr)} ({op}): X must be 4-D (N, M, C, A), got rank {len(shp)}")
        mid = rest
        C = rest[1]
    if ghost:
        v = int(ghost)
        if n0 is not None and n0 % v:
            raise InputError(f"node {_node_label(attr)} ({op}): virtual_batch_size {v} does not divide the "
                             f"batch size {n0}")
        if n0 is None:
            # nothing checks N % v at run time inside the graph (a Relax reshape of a symbolic shape does
            # not): record it so CompiledModel.run refuses such a batch with a clear message
            key = str(getattr(N, "name", N))
            ctx.multiples[key] = math.lcm(ctx.multiples.get(key, 1), v)
        spec_shape = (v, SYMBOLIC if n0 is None else n0 // v, *mid)
        kinds = "RGRCR"
        rshape = (v, (N // v) if n0 is None else n0 // v, *mid)
    else:
        spec_shape = (SYMBOLIC if n0 is None else n0, *mid)
        kinds = "RRCR"
        rshape = (N, *mid)
    return dtype, shp, spec_shape, kinds, rshape, C


def _expand_runtime(data, shape):
    """TE: ONNX ``Expand`` of ``data`` to ``shape`` where some of data's dims are symbolic (a graph input
    such as an adjustment of any shape that broadcasts against x). Whether such a dim is 1 is known only
    at run time, so each one is read at ``0 if d == 1 else i``, clamped to ``d - 1`` so that a feed that
    does not broadcast cannot read past its buffer (``CompiledModel.run`` refuses those)."""
    te, tirx = _tvm.te(), _tvm.tirx()
    dshape = list(data.shape)
    pad = len(shape) - len(dshape)
    out = list(shape)
    for k, d in enumerate(dshape):     # ONNX: a target dim of 1 keeps data's dim
        s = out[k + pad]
        if isinstance(s, tirx.IntImm) and int(s) == 1:
            out[k + pad] = d

    def f(*idx):
        src = []
        for k, d in enumerate(dshape):
            i = tirx.Cast("int64", idx[k + pad])
            if isinstance(d, tirx.IntImm):
                src.append(tirx.const(0, "int64") if int(d) == 1 else i)
            else:
                d = tirx.Cast("int64", d)
                src.append(tirx.Select(d == 1, tirx.const(0, "int64"), tirx.min(i, d - 1)))
        return data(*src)

    return te.compute(out, f, name="T_expand")


def make_converters(ctx: KernelContext) -> dict:
    from bncompile import custom_ops

    relax = _tvm.tvm().relax
    fe = _tvm.relax_onnx().onnx_frontend

    def cast_like(bb, v, like):
        dt = str(like.ty.dtype)
        return v if str(v.ty.dtype) == dt else bb.emit(relax.op.astype(v, dt))

    class BatchNormalization(fe.BatchNormalization):
        """Inference: TVM's converter. Training (training_mode=1): our kernel (ONNX momentum)."""

        @classmethod
        def _impl_v15(cls, bb, inputs, attr, params):
            if not attr.get("training_mode", 0):
                return super()._impl_v15(bb, inputs, attr, params)
            x, scale, bias, mean, var = inputs[:5]
            from bncompile.lower.kernels.compute import DTYPES

            if str(x.ty.dtype) not in DTYPES:
                # float64: TVM's batch_norm with the momentum converted to its (PyTorch) convention
                ctx.fallbacks.append(str((attr.get("tvm_custom") or {}).get("name")))
                attr = dict(attr)
                attr["momentum"] = 1.0 - float(attr.get("momentum", 0.9))
                return super()._impl_v15(bb, inputs, attr, params)
            outs = _emit_bn_kernel(ctx, bb, attr, op="BatchNormalization", x=x, params=[scale, bias, mean, var],
                                   epsilon=attr.get("epsilon", 1e-5), momentum=attr.get("momentum", 0.9),
                                   layout="bn")
            return relax.Tuple([outs[0], cast_like(bb, outs[1], mean), cast_like(bb, outs[2], var)])

        _impl_v14 = _impl_v15

    class Expand(fe.Expand):
        """Expand of data with symbolic dims: a run-time broadcast (:func:`_expand_runtime`). TVM 0.27's
        converter emits ``broadcast_to``, whose legalization reads a symbolic dim as if it equalled the
        target dim (a (1, C) adjustment with a dynamic batch is read at rows 1..N-1, past its buffer), and
        with a static target it compares PrimExprs with ``==`` and fails."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            data, shape = inputs[0], inputs[1]
            dshape = getattr(getattr(data, "ty", None), "shape", None)
            tirx = _tvm.tirx()
            if (isinstance(shape, relax.ShapeExpr) and dshape is not None and hasattr(dshape, "values")
                    and any(not isinstance(d, tirx.IntImm) for d in dshape.values)):
                ctx.note_broadcast(list(dshape.values), list(shape.values))
                return bb.emit_te(_expand_runtime, data, list(shape.values), primfunc_name_hint="bnc_expand")
            return super()._impl_v13(bb, inputs, attr, params)

        _impl_v8 = _impl_v13

    def pool_converter(base):
        class Pool(base):
            """MaxPool / AveragePool with ``auto_pad`` SAME_UPPER or SAME_LOWER: explicit pads per the ONNX
            spec (:func:`same_pads`), then TVM's converter. TVM 0.27's computes SAME_LOWER's output as
            floor(in / stride) (one row or column short), leaves a negative total pad (kernel < stride)
            unclamped, which shifts every window, and reads the batch dim as an int (a free batch failed)."""

            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                return super()._impl_v1(bb, inputs, _explicit_same_pads(inputs[0], attr, base.__name__), params)

        Pool.__name__ = base.__name__
        return Pool

    class ConvTranspose(fe.ConvTranspose):
        """The ``output_shape`` attribute as the spec's pads (:func:`conv_transpose_pads`), then TVM's
        converter, which ignores it (the natural output size came back: 11x11 for an asked 10x10)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return super()._impl_v1(bb, inputs, _output_shape_as_pads(inputs[0], inputs[1], attr), params)

    class Resize(fe.Resize):
        """TVM's converter computes its coordinates from the output size, i.e. with out / in, not with the
        given scale (ONNX: x_in = (x_out + 0.5) / scale - 0.5): the two differ, silently, wherever
        in * scale is not a whole number (0.5 on an odd size). Refused there, with the fix."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            _check_resize_scales(inputs, attr, params)
            return super()._impl_v18(bb, inputs, attr, params)

    class Clip(fe.Clip):
        """Relax ``maximum`` / ``minimum`` (with a NaN bound read as no bound, as ONNX and onnxruntime do),
        not TVM's TE calls: layout conversion (``ConvertLayout``, the channel-blocked layout of
        :mod:`bncompile.lower.graph_schedules`) sees through Relax ops, while a TE call stops it (a
        relu6 between two convs then cost two layout copies)."""

        @classmethod
        def _bound(cls, bb, bound, *, for_min: bool, dtype: str):
            value = getattr(bound, "data", None)
            if value is None or not hasattr(value, "numpy"):
                return cls._sanitize_nan_clip_bound(bb, bound, for_min=for_min)
            v = value.numpy()
            if v.dtype.kind == "f" and v.size == 1 and np.isnan(v).all():
                v = np.full(v.shape, -np.inf if for_min else np.inf, v.dtype)
            return relax.const(v, dtype)

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)
            lo = inputs[1] if len(inputs) > 1 else None
            hi = inputs[2] if len(inputs) > 2 else None
            if lo is not None:
                x = bb.emit(relax.op.maximum(x, cls._bound(bb, lo, for_min=True, dtype=dtype)))
            if hi is not None:
                x = bb.emit(relax.op.minimum(x, cls._bound(bb, hi, for_min=False, dtype=dtype)))
            return x

        _impl_v11 = _impl_v13

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            dtype = str(x.ty.dtype)
            if "min" in attr:
                x = bb.emit(relax.op.maximum(x, relax.const(float(attr["min"]), dtype)))
            if "max" in attr:
                x = bb.emit(relax.op.minimum(x, relax.const(float(attr["max"]), dtype)))
            return x

    convs = {"BatchNormalization": BatchNormalization, "Expand": Expand, "Clip": Clip,
             "MaxPool": pool_converter(fe.MaxPool), "AveragePool": pool_converter(fe.AveragePool),
             "ConvTranspose": ConvTranspose, "Resize": Resize}

    for kind in custom_ops.OPS.values():
        def impl(cls, bb, inputs, attr, params, _kind=kind):
            a = {**_kind.attributes, **{k: v for k, v in attr.items() if k != "tvm_custom"}}
            if _kind.ghost and a.get("virtual_batch_size") is None:
                raise InputError(f"node {_node_label(attr)} ({_kind.name}): virtual_batch_size is required")
            x = inputs[0]
            names = _kind.inputs
            get = dict(zip(names, inputs))
            if _kind.renorm:
                # kernel variables: gamma, beta, moving_mean, moving_variance (unused), stddev, renorm_mean/_stddev
                params_ = [get["scale"], get["B"], get["mean"], get["stddev"], get["stddev"], get["renorm_mean"],
                           get["renorm_stddev"]]
                clipping = _clipping(a)
            else:
                params_ = [get["scale"], get["B"], get["mean"], get["var"]]
                clipping = ()
            adj = (get["adj_scale"], get["adj_bias"]) if _kind.adjust else None
            outs = _emit_bn_kernel(ctx, bb, attr, op=_kind.name, x=x, params=params_, adjustment=adj,
                                   epsilon=a["epsilon"], momentum=a["momentum"],
                                   renorm_momentum=a.get("renorm_momentum", 0.99), renorm=_kind.renorm,
                                   clipping=clipping, ghost=a.get("virtual_batch_size") if _kind.ghost else None,
                                   layout="canonical")
            like = get["scale"]
            return relax.Tuple([outs[0]] + [cast_like(bb, o, like) for o in outs[1:]])

        convs[kind.name] = type(kind.name, (fe.OnnxOpConverter,), {"_impl_v1": classmethod(impl)})

    for gkind in custom_ops.GRAD_OPS.values():
        def grad_impl(cls, bb, inputs, attr, params, _kind=gkind):
            fwd = _kind.forward
            a = {**_kind.attributes, **{k: v for k, v in attr.items() if k != "tvm_custom"}}
            if fwd.ghost and a.get("virtual_batch_size") is None:
                raise InputError(f"node {_node_label(attr)} ({_kind.name}): virtual_batch_size is required")
            get = dict(zip(_kind.inputs, inputs))
            outs = _emit_bn_backward_kernel(
                ctx, bb, attr, op=_kind.name, x=get["X"], dy=get["dY"], gamma=get["scale"],
                renorm_vars=(get["renorm_mean"], get["renorm_stddev"]) if fwd.renorm else None,
                adjustment=(get["adj_scale"], get["adj_bias"]) if fwd.adjust else None, epsilon=a["epsilon"],
                clipping=_clipping(a) if fwd.renorm else (),
                ghost=a.get("virtual_batch_size") if fwd.ghost else None)
            return relax.Tuple([cast_like(bb, outs[0], get["X"])] + [cast_like(bb, o, get["scale"]) for o in outs[1:]])

        convs[gkind.name] = type(gkind.name, (fe.OnnxOpConverter,), {"_impl_v1": classmethod(grad_impl)})
    return convs


def _split_pads(totals, mode: str) -> list[int]:
    """ONNX pads ``[begin..., end...]`` from each axis's total pad: halves, the odd one at the end for
    SAME_UPPER, else at the beginning."""
    upper = mode == "SAME_UPPER"
    begins = [t // 2 if upper else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


def _auto_pad(attr) -> str:
    mode = attr.get("auto_pad", b"NOTSET")
    return mode.decode() if isinstance(mode, bytes) else str(mode)


def same_pads(sizes, kernel, strides, dilations, mode: str) -> list[int]:
    """ONNX pads ``[begin..., end...]`` of ``auto_pad`` ``mode`` (SAME_UPPER / SAME_LOWER) for spatial
    ``sizes``: the output is ceil(size / stride); the total pad, max(0, (out - 1) * stride + (kernel - 1) *
    dilation + 1 - size), split in halves with the odd one at the end (UPPER) or the beginning (LOWER)."""
    return _split_pads([max(0, (-(-n // st) - 1) * st + (k - 1) * d + 1 - n)
                        for n, k, st, d in zip(sizes, kernel, strides, dilations)], mode)


def _explicit_same_pads(x, attr, op: str) -> dict:
    """``attr`` of a pool node with ``auto_pad`` SAME_* replaced by explicit pads (:func:`same_pads`) and
    ceil_mode 0 (floor((size + pads - window) / stride) + 1 is then exactly ceil(size / stride))."""
    mode = _auto_pad(attr)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return attr
    kernel = [int(k) for k in attr["kernel_shape"]]
    nd = len(kernel)
    sizes = [_static(d) for d in list(x.ty.shape)[2:]]
    if len(sizes) != nd or any(n is None for n in sizes):
        raise UnsupportedError(f"node {_node_label(attr)} ({op}): auto_pad={mode} needs static spatial dims, "
                               f"got {_fmt_shape(list(x.ty.shape))}; give the input's height and width "
                               "(--input-shape) or explicit pads")
    strides = [int(v) for v in attr.get("strides", [1] * nd)]
    dilations = [int(v) for v in attr.get("dilations", [1] * nd)]
    out = dict(attr)
    out["auto_pad"] = b"NOTSET"
    out["pads"] = same_pads(sizes, kernel, strides, dilations, mode)
    out["ceil_mode"] = 0
    return out


def conv_transpose_pads(sizes, kernel, strides, dilations, output_padding, output_shape, auto_pad: str) -> list[int]:
    """ONNX ConvTranspose pads ``[begin..., end...]`` for an explicit ``output_shape``: total =
    stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - out, the odd half at the end for
    SAME_UPPER, else at the beginning. ValueError when an axis asks for more than the natural size."""
    totals = []
    for n, k, st, d, op, out in zip(sizes, kernel, strides, dilations, output_padding, output_shape):
        totals.append(st * (n - 1) + op + (k - 1) * d + 1 - out)
        if totals[-1] < 0:
            raise ValueError(f"output_shape {out} exceeds the natural size {out + totals[-1]}")
    return _split_pads(totals, auto_pad)


def _output_shape_as_pads(x, w, attr) -> dict:
    """``attr`` of a ConvTranspose node with ``output_shape`` replaced by explicit pads."""
    if not attr.get("output_shape"):
        return attr
    sizes = [_static(d) for d in list(x.ty.shape)[2:]]
    nd = len(sizes)
    want = [int(v) for v in attr["output_shape"]][-nd:]
    kernel = [int(k) for k in attr.get("kernel_shape") or [_static(d) for d in list(w.ty.shape)[2:]]]
    if any(v is None for v in sizes + kernel):
        raise UnsupportedError(f"node {_node_label(attr)} (ConvTranspose): output_shape needs static spatial dims, "
                               f"got {_fmt_shape(list(x.ty.shape))}; give the input's height and width "
                               "(--input-shape) or explicit pads")
    try:
        pads = conv_transpose_pads(sizes, kernel, [int(v) for v in attr.get("strides", [1] * nd)],
                                   [int(v) for v in attr.get("dilations", [1] * nd)],
                                   [int(v) for v in attr.get("output_padding", [0] * nd)], want, _auto_pad(attr))
    except ValueError as err:
        raise UnsupportedError(f"node {_node_label(attr)} (ConvTranspose): {err}; use output_padding for a "
                               "larger output") from None
    out = {k: v for k, v in attr.items() if k not in ("output_shape", "auto_pad")}
    out["pads"] = pads
    return out


def _check_resize_scales(inputs, attr, params) -> None:
    """UnsupportedError for a Resize whose constant ``scales`` give a fractional output size on a static axis
    (see :func:`make_converters`' Resize)."""
    if len(inputs) < 3 or inputs[2] is None:
        return
    try:
        const = _tvm.relax_onnx().onnx_frontend.get_constant(inputs[2], params)
        scales = [float(v) for v in const.value.numpy().ravel()]
    except Exception:  # noqa: BLE001 - not a constant: TVM's converter decides
        return
    dims = list(inputs[0].ty.shape)
    for axis, (scale, dim) in enumerate(zip(scales, dims)):
        n = _static(dim)
        if n is None or scale == 1.0:
            continue
        if abs(n * scale - round(n * scale)) > 1e-6 * max(1.0, n * scale):
            raise UnsupportedError(
                f"node {_node_label(attr)} (Resize): scale {scale:g} on axis {axis} of size {n} gives "
                f"{n * scale:g} pixels; TVM resizes by output size ({math.floor(n * scale)} / {n}), not by the "
                "scale, so the result would differ from the ONNX spec: give the 'sizes' input instead, or scales "
                "that give whole sizes")


def _clipping(a: Mapping) -> tuple:
    """The kernel's renorm clipping from a custom op's attributes (no-op bounds dropped)."""
    clip = []
    for key in ("dmax", "rmax", "rmin"):
        v = float(a[key])
        if math.isfinite(v) and not (key == "rmin" and v <= 0):
            clip.append((key, v))
    return tuple(sorted(clip))
