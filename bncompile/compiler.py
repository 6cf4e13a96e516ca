"""``bncompile.compile``: a whole ONNX graph -> a deployable TVM library.

>>> cm = compile("model.onnx", target="llvm")           # doctest: +SKIP
>>> cm.run({"x": x})["y"]                                # doctest: +SKIP
>>> cm.export("model.so"); load("model.so").run(...)     # doctest: +SKIP

Pipeline:

1. load the model; apply ``input_shapes`` to the graph inputs (a name -> dims; a str dim stays free);
2. fold inference BatchNormalization with :func:`bncompile.fold.fold` (``fold=True``; no verification);
3. inline model-local functions other than bncompile's custom ops (``ai.bncompile``), rewriting the
   ``Constant(value_float=...)`` forms TVM's Constant converter cannot read; graph inputs that also have
   an initializer become real inputs (their initializer is kept as the default value ``run`` feeds);
4. check every operator against the Relax ONNX frontend's converter map and report ALL unsupported ones
   in one :class:`UnsupportedError`;
5. ``tvm.relax.frontend.onnx.from_onnx`` with converter overrides (TVM 0.27 has no custom-converter
   argument, so ``onnx_frontend._get_convert_map`` is patched for the duration of the call, under a lock):
   training-mode ``BatchNormalization`` (``training_mode=1``) and the custom ops become a ``call_tir`` of
   OUR kernel (:mod:`bncompile.kernels.compute`, scheduled by :mod:`bncompile.kernels.schedules` for the
   target), never TVM's ``batch_norm`` (whose momentum is the PyTorch one: TVM 0.27's frontend passes ONNX's
   momentum through unchanged, which swaps the weights of the running-statistics update);
6. ``tvm.compile``; symbolic dims (``dim_param``) stay symbolic. For ``llvm`` targets the Relax pipeline is
   :func:`bncompile.cpu_schedules.pipeline` (TVM's default CPU pipeline leaves every operator an
   unscheduled serial loop nest): packed-weight conv2d, operator fusion, and a CPU schedule for each fused
   PrimFunc (our batch-norm kernels excepted); ``info["cpu_schedules"]`` names the rule of each function.
   Other targets use TVM's default pipeline.

Targets, named plainly: ``llvm`` (host CPU), ``x86_64`` (generic x86-64), ``aarch64`` (Linux, NEON; exported
with ``aarch64-linux-gnu-g++``), ``cuda`` / ``cuda:sm_80`` (sm_90 by default; source codegen works without a
GPU), or a TVM target dict.

``CompiledModel.export(path)`` writes the library and ``<path>.json`` (input/output names, dtypes and
shapes, target); default values of inputs that had an initializer go to ``<path>.defaults.npz``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bncompile._version import __version__
from bncompile.errors import BncompileError, InputError, UnsupportedError

log = logging.getLogger(__name__)

__all__ = ["compile", "load", "CompiledModel", "TARGETS", "resolve_target", "unsupported_ops"]

FORMAT = "bncompile-library/1"
CUSTOM_DOMAIN = "ai.bncompile"
DEFAULT_CUDA_ARCH = "sm_90"
AARCH64_CXX = "aarch64-linux-gnu-g++"

#: Named targets (besides ``cuda:<arch>`` and TVM target dicts).
TARGETS = {
    "llvm": "the host CPU (LLVM's name for it, detected)",
    "x86_64": "generic x86-64 Linux",
    "aarch64": "64-bit ARM Linux with NEON (cross-compiled; exported with aarch64-linux-gnu-g++)",
    "cuda": "NVIDIA GPU, sm_90 by default (cuda:sm_80 for another arch)",
}

_ELEM_TO_NP = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT16: "int16"}


# --------------------------------------------------------------------------- targets

def resolve_target(target: Any = "llvm") -> tuple[str, dict]:
    """``(name, tvm target dict)`` for a target name, ``cuda:<arch>`` or a dict; UnsupportedError otherwise."""
    from bncompile import _tvm

    if isinstance(target, Mapping):
        d = _tvm.target_dict(target)
        return str(d.get("kind", d.get("tag", "custom"))), d
    if not isinstance(target, str):
        raise UnsupportedError(f"target: expected a name such as 'llvm', got {target!r}")
    name = target.strip().lower()
    if name in ("llvm", "cpu", "host"):
        return "llvm", _tvm.target_dict("llvm")
    if name in ("x86_64", "x86-64", "amd64"):
        return "x86_64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
    if name in ("aarch64", "arm64"):
        return "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if name == "cuda" or name.startswith("cuda:"):
        arch = name.partition(":")[2] or DEFAULT_CUDA_ARCH
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise UnsupportedError(f"target: CUDA arch {arch!r} is not valid; use e.g. cuda:sm_80 or cuda:sm_90")
        return "cuda", {"kind": "cuda", "arch": arch}
    raise UnsupportedError(f"target: unknown target {target!r}; use one of {', '.join(TARGETS)} "
                           "(or cuda:sm_80 for another CUDA arch)")


def _host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _runnable_here(tdict: Mapping) -> str | None:
    """None when a library for ``tdict`` can run in this process, else the reason."""
    kind = tdict.get("kind")
    if kind == "llvm":
        triple = str(tdict.get("mtriple", ""))
        arch = triple.split("-")[0] if triple else _host_arch()
        if arch != _host_arch():
            return (f"the library was compiled for {arch} and this host is {_host_arch()}: run it on the "
                    "device with bncompile/runner (see bncompile/runner/README.md), or under qemu-user")
        return None
    if kind == "cuda":
        from bncompile import _tvm
        if not _tvm.cuda_available():
            return "the library was compiled for CUDA and no CUDA GPU is available here"
        return None
    return f"no runtime device for target {dict(tdict)!r}"


# --------------------------------------------------------------------------- model preparation

def _load_model(model) -> onnx.ModelProto:
    from bncompile._io import check_input_file

    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    if isinstance(model, (str, os.PathLike)):
        p = check_input_file(model, "model")
        try:
            return onnx.load(str(p))
        except Exception as err:
            raise InputError(f"model file {str(p)!r} is not a readable ONNX model: {err}") from None
    raise InputError(f"model: expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _dims(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _apply_input_shapes(model: onnx.ModelProto, input_shapes: Mapping | None) -> None:
    if not input_shapes:
        return
    inputs = {i.name: i for i in model.graph.input}
    unknown = sorted(set(input_shapes) - set(inputs))
    if unknown:
        raise InputError(f"input_shapes: no input named {', '.join(map(repr, unknown))}; "
                         f"the model's inputs are {', '.join(inputs)}")
    for name, shape in input_shapes.items():
        vi = inputs[name]
        old = _dims(vi)
        shape = list(shape)
        if old is not None and len(old) != len(shape):
            raise InputError(f"input_shapes: {name!r} has rank {len(old)} ({old}) but the shape given has "
                             f"rank {len(shape)} ({shape})")
        dims = []
        for i, d in enumerate(shape):
            if d is None or (isinstance(d, str) and d.strip() in ("", "?", "-1")) or (
                    isinstance(d, (int, np.integer)) and d < 0):
                prev = old[i] if old is not None else None
                dims.append(prev if isinstance(prev, str) else f"{name}_d{i}")
            elif isinstance(d, str) and not d.strip().lstrip("-").isdigit():
                dims.append(d.strip())
            else:
                v = int(d)
                if v == 0:
                    raise InputError(f"input_shapes: {name!r} dimension {i} must be positive, got 0")
                if old is not None and isinstance(old[i], int) and old[i] > 0 and old[i] != v:
                    raise InputError(f"input_shapes: {name!r} dimension {i} is {old[i]} in the model, "
                                     f"cannot set it to {v}")
                dims.append(v)
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        for d in dims:
            dim = tt.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d
    # stale shape annotations of intermediate values would contradict the new shapes
    del model.graph.value_info[:]


def _set_shape(vi, shape) -> None:
    tt = vi.type.tensor_type
    tt.ClearField("shape")
    for d in shape:
        tt.shape.dim.add().dim_value = int(d)


def _constant_to_value(node: onnx.NodeProto) -> None:
    """Rewrite ``Constant(value_float/value_floats/value_int/value_ints)`` as ``Constant(value=<tensor>)``."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return
    for a in list(node.attribute):
        if a.name == "value_float":
            t = numpy_helper.from_array(np.array(a.f, np.float32), node.output[0])
        elif a.name == "value_floats":
            t = numpy_helper.from_array(np.array(list(a.floats), np.float32), node.output[0])
        elif a.name == "value_int":
            t = numpy_helper.from_array(np.array(a.i, np.int64), node.output[0])
        elif a.name == "value_ints":
            t = numpy_helper.from_array(np.array(list(a.ints), np.int64), node.output[0])
        else:
            continue
        node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("value", t))


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


def _producers_and_constants(g: onnx.GraphProto):
    """{tensor: producing node} and {tensor: value} for initializers and ``Constant(value=...)`` nodes."""
    producer = {o: n for n in g.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return producer, consts


def _drop_single_dim_products(model: onnx.ModelProto) -> int:
    """``ReduceProd(Slice(Shape(x), [s], [s+1]))`` is its input: rewire its consumers to the Slice.

    TVM's frontend keeps ``Shape``/``Slice`` results as shape expressions (so a later Reshape keeps its
    symbolic dims) but refuses a ReduceProd of one; the builder writes this form for one dynamic dim.
    """
    g = model.graph
    producer, consts = _producers_and_constants(g)
    rename = {}
    for n in g.node:
        if n.op_type != "ReduceProd" or n.domain not in ("", "ai.onnx") or len(n.input) != 1:
            continue
        if any(a.name == "keepdims" and a.i == 0 for a in n.attribute):
            continue
        sl = producer.get(n.input[0])
        if sl is None or sl.op_type != "Slice" or len(sl.input) < 3 or len(sl.input) > 3:
            continue
        shp = producer.get(sl.input[0])
        s, e = consts.get(sl.input[1]), consts.get(sl.input[2])
        if shp is None or shp.op_type != "Shape" or s is None or e is None or s.size != 1 or e.size != 1:
            continue
        start, end = int(s.reshape(-1)[0]), int(e.reshape(-1)[0])
        if start >= 0 and end == start + 1:
            rename[n.output[0]] = n.input[0]
    if rename:
        for n in _all_nodes(g):
            for i, x in enumerate(n.input):
                if x in rename:
                    n.input[i] = rename[x]
        for o in g.output:
            if o.name in rename:       # keep graph outputs named: leave the node in place
                rename.pop(o.name)
        keep = [n for n in g.node if not (n.op_type == "ReduceProd" and n.output[0] in rename)]
        del g.node[:]
        g.node.extend(keep)
    return len(rename)


def _minus_one_reshapes(model: onnx.ModelProto) -> int:
    """``Reshape(d, Concat(c1, P, c2...))`` with every part constant but one 1-element product ``P``
    -> ``Reshape(d, [c1, -1, c2...])``.

    Valid whatever P is: a Reshape keeps the element count, so the one unknown entry can only be
    ``numel(d) / prod(constants)``, which is what -1 means (the constants must be positive). The builder
    writes ``ReduceProd(Slice(Shape(x)))`` for a group of dims holding the dynamic batch, and TVM's
    frontend cannot reduce a shape expression; with -1, Relax keeps the batch symbolic.
    """
    g = model.graph
    producer, consts = _producers_and_constants(g)
    changed = 0
    for n in list(g.node):
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        cat = producer.get(n.input[1])
        if cat is None or cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx"):
            continue
        dynamic = [i for i, x in enumerate(cat.input) if x not in consts]
        if len(dynamic) != 1:
            continue
        if any(consts[x].size and (consts[x] <= 0).any() for x in cat.input if x in consts):
            continue
        prod = producer.get(cat.input[dynamic[0]])
        if prod is None or prod.op_type != "ReduceProd" or len(prod.input) != 1 or any(
                a.name in ("keepdims", "axes") and (a.name == "axes" or a.i == 0) for a in prod.attribute):
            continue
        parts = [consts[x].reshape(-1).astype(np.int64) if x in consts else np.array([-1], np.int64)
                 for x in cat.input]
        name = f"{n.input[1]}__bncompile_minus_one"
        if name not in consts:
            g.initializer.append(numpy_helper.from_array(np.concatenate(parts), name))
            consts[name] = np.concatenate(parts)
        n.input[1] = name
        changed += 1
    if changed:
        _remove_dead_nodes(model)
    return changed


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    g = model.graph
    while True:
        used = {o.name for o in g.output}
        for n in _all_nodes(g):
            used.update(n.input)
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _prepare(model: onnx.ModelProto, *, fold: bool, input_shapes) -> tuple[onnx.ModelProto, dict]:
    """Steps 1-3 of the module docstring; returns the model and the default values of inputs."""
    from bncompile import custom_ops

    custom_ops.register_schemas()
    _apply_input_shapes(model, input_shapes)
    if fold:
        from bncompile.folding import fold as fold_bn

        t = time.perf_counter()
        model = fold_bn(model, check=False, validate=False).model
        log.info("folded inference BatchNormalization in %.3f s", time.perf_counter() - t)
    ours = [(f.domain, f.name) for f in model.functions if f.domain == CUSTOM_DOMAIN and f.name in custom_ops.OPS]
    if len(ours) < len(model.functions):
        import onnx.inliner

        model = onnx.inliner.inline_selected_functions(model, ours, exclude=True)
    del model.functions[:]
    for n in _all_nodes(model.graph):
        _constant_to_value(n)
    _minus_one_reshapes(model)
    _drop_single_dim_products(model)
    input_names = {i.name for i in model.graph.input}
    defaults = {}
    keep = []
    for t in model.graph.initializer:
        if t.name in input_names:
            defaults[t.name] = numpy_helper.to_array(t)
        else:
            keep.append(t)
    for vi in model.graph.input:          # an input with a default and free dims takes the default's shape
        d = _dims(vi)
        if vi.name in defaults and (d is None or any(not isinstance(x, int) or x <= 0 for x in d)) and not (
                input_shapes and vi.name in input_shapes):
            _set_shape(vi, defaults[vi.name].shape)
            log.info("input %s: free dims pinned to its default's shape %s", vi.name, defaults[vi.name].shape)
    if defaults:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model, defaults


# --------------------------------------------------------------------------- operator support

def unsupported_ops(model: onnx.ModelProto, convert_map: Mapping | None = None) -> dict[str, list[str]]:
    """``{"domain::op" or "op": [node names]}`` for every operator the compile cannot convert."""
    from bncompile import custom_ops

    if convert_map is None:
        convert_map = _frontend().onnx_frontend._get_convert_map()
    out: dict[str, list[str]] = {}
    for n in _all_nodes(model.graph):
        dom = n.domain or ""
        if dom in ("", "ai.onnx"):
            ok = n.op_type in convert_map or n.op_type in ("If", "Constant")
            key = n.op_type
        elif dom == CUSTOM_DOMAIN:
            ok = n.op_type in custom_ops.OPS
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


# --------------------------------------------------------------------------- converters

def _frontend():
    from bncompile import _tvm

    return _tvm.relax_onnx()


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched_convert_map(extra: Mapping):
    fe = _frontend().onnx_frontend
    with _PATCH_LOCK:
        orig = fe._get_convert_map
        fe._get_convert_map = lambda: {**orig(), **extra}
        try:
            yield
        finally:
            fe._get_convert_map = orig


def _static(d) -> int | None:
    try:
        return int(d)
    except Exception:
        return None


class _KernelContext:
    """Per-compile state of the converter overrides: the target and the kernels added so far."""

    def __init__(self, tdict: dict):
        self.tdict = tdict
        self.kernels: dict = {}        # KernelSpec -> GlobalVar
        self.schedules: dict = {}      # kernel name -> schedule rule name
        self.fallbacks: list[str] = []
        self.multiples: dict[str, int] = {}   # symbolic dim name -> the batch must be a multiple of this

    def kernel(self, bb, spec):
        gv = self.kernels.get(spec)
        if gv is not None:
            return gv
        from bncompile.kernels import compute

        func = compute.prim_func(spec)
        rule = "unscheduled"
        try:
            from bncompile.kernels import schedules

            rule, sch = schedules.schedule(spec, func, target=self.tdict)
            func = sch.mod["main"]
        except BncompileError as err:          # no rule for this target kind: default pipeline decides
            log.info("batchnorm kernel %s left to the default pipeline: %s", spec.kinds, err)
        except Exception as err:  # pragma: no cover - a schedule bug must not break the compile
            log.warning("schedule of batchnorm kernel %s failed (%s); using the unscheduled kernel",
                        spec.kinds, err)
            func = compute.prim_func(spec)
            rule = "unscheduled"
        name = f"bncompile_bn_{len(self.kernels)}"
        gv = bb.add_func(func.with_attr("global_symbol", name), name)
        self.kernels[spec] = gv
        self.schedules[name] = rule
        return gv


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


def _emit_bn_kernel(ctx: _KernelContext, bb, attr, *, op: str, x, params: list, adjustment=None,
                    epsilon: float, momentum: float, renorm_momentum: float = 0.99, renorm: bool = False,
                    clipping: tuple = (), ghost: int | None = None, layout: str):
    """Emit OUR training kernel for x; returns ``[y, *updated stats]`` (float32 stats)."""
    from bncompile.kernels.compute import DTYPES, SYMBOLIC, KernelSpec
    from bncompile import _tvm

    relax = _tvm.tvm().relax
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


def _make_converters(ctx: _KernelContext) -> dict:
    from bncompile import _tvm, custom_ops

    relax = _tvm.tvm().relax
    fe = _frontend().onnx_frontend

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
            from bncompile.kernels.compute import DTYPES

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

    convs = {"BatchNormalization": BatchNormalization}

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
                clip = []
                for key in ("dmax", "rmax", "rmin"):
                    v = float(a[key])
                    if math.isfinite(v) and not (key == "rmin" and v <= 0):
                        clip.append((key, v))
                clipping = tuple(sorted(clip))
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
    return convs


# --------------------------------------------------------------------------- the compiled model

def _value_infos(values) -> list[dict]:
    out = []
    for v in values:
        elem = v.type.tensor_type.elem_type
        out.append({"name": v.name, "dtype": _ELEM_TO_NP.get(elem, onnx.helper.tensor_dtype_to_np_dtype(elem).name
                                                             if elem else "float32"),
                    "shape": _dims(v)})
    return out


class CompiledModel:
    """A compiled ONNX graph: ``run(feeds) -> outputs`` by onnxruntime's names, ``export(path)``."""

    def __init__(self, *, executable=None, module=None, target: dict, target_name: str, inputs: list[dict],
                 outputs: list[dict], defaults: Mapping[str, np.ndarray] | None = None, info: dict | None = None,
                 path: str | None = None):
        self._executable = executable
        self._module = module
        self.target = dict(target)
        self.target_name = target_name
        self.inputs = inputs
        self.outputs = outputs
        self.defaults = dict(defaults or {})
        self.info = dict(info or {})
        self.path = path
        self._vm = None
        self._device = None

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target_name}, inputs={self.input_names}, "
                f"outputs={self.output_names})")

    # ---- running
    def prepare(self) -> "CompiledModel":
        """Load the library and create the virtual machine now (otherwise the first ``run`` does it);
        raises UnsupportedError where the target cannot run on this machine."""
        self._machine()
        return self

    def _machine(self):
        if self._vm is None:
            why = _runnable_here(self.target)
            if why:
                raise UnsupportedError(f"cannot run here: {why}")
            from bncompile import _tvm

            tvm = _tvm.tvm()
            self._device = _tvm.device_for(self.target)
            mod = self._executable if self._executable is not None else self._module
            if mod is None:
                mod = tvm.runtime.load_module(self.path)
                self._module = mod
            self._vm = tvm.relax.VirtualMachine(mod, self._device)
        return self._vm, self._device

    def _check_feeds(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise InputError(f"feeds: unknown input(s) {', '.join(map(repr, unknown))}; the model's inputs are "
                             f"{', '.join(self.input_names)}")
        arrays = []
        bound: dict[str, int] = {}
        for spec in self.inputs:
            name = spec["name"]
            if name in feeds:
                v = feeds[name]
                a = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
            elif name in self.defaults:
                a = self.defaults[name]
            else:
                raise InputError(f"feeds: input {name!r} is missing (inputs: {', '.join(self.input_names)})")
            dt = spec["dtype"]
            if dt == "bfloat16":
                import ml_dtypes

                npdt = np.dtype(ml_dtypes.bfloat16)
            else:
                npdt = np.dtype(dt)
            if a.dtype != npdt:
                if a.dtype.kind == npdt.kind or (a.dtype.kind in "iub" and npdt.kind in "iuf"):
                    a = a.astype(npdt)
                else:
                    raise InputError(f"input {name!r}: dtype {a.dtype} does not match the model's {dt}")
            shape = spec.get("shape")
            if shape is not None:
                if a.ndim != len(shape):
                    raise InputError(f"input {name!r}: shape {tuple(a.shape)} has rank {a.ndim}; the model expects "
                                     f"rank {len(shape)} {_fmt_shape(shape)}")
                for i, (want, got) in enumerate(zip(shape, a.shape)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise InputError(f"input {name!r}: shape {tuple(a.shape)} does not match the compiled "
                                         f"shape {_fmt_shape(shape)} (dimension {i} must be {want})")
                    if isinstance(want, str):
                        if bound.setdefault(want, int(got)) != int(got):
                            raise InputError(f"input {name!r}: dimension {i} ({want}) is {got} but another "
                                             f"input has {want} = {bound[want]}")
                        mult = (self.info.get("dim_multiples") or {}).get(want)
                        if mult and int(got) % int(mult):
                            raise InputError(f"input {name!r}: dimension {i} ({want}) is {got}, which is not a "
                                             f"multiple of {mult} (the virtual_batch_size of a ghost batch norm)")
            arrays.append(np.ascontiguousarray(a))
        return arrays

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on NumPy arrays by input name (inputs with an initializer may be omitted)."""
        arrays = self._check_feeds(feeds)
        vm, dev = self._machine()
        from bncompile import _tvm

        tvm = _tvm.tvm()
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        try:
            res = vm["main"](*args)
        except (ValueError, TypeError) as err:
            msg = str(err).strip().splitlines()
            raise InputError(f"run: {msg[-1] if msg else type(err).__name__}") from None
        outs = [res] if isinstance(res, tvm.runtime.Tensor) else list(res)
        if len(outs) != len(self.outputs):
            raise UnsupportedError(f"run: the library returned {len(outs)} outputs, expected {len(self.outputs)}")
        return {o["name"]: t.numpy() for o, t in zip(self.outputs, outs)}

    __call__ = run

    # ---- export / load
    def metadata(self) -> dict:
        return {"format": FORMAT, "bncompile": __version__, "target": self.target_name,
                "target_dict": self.target, "inputs": self.inputs, "outputs": self.outputs,
                "defaults": sorted(self.defaults), **{k: v for k, v in self.info.items() if k != "defaults"}}

    def export(self, path, *, cc: str | None = None) -> Path:
        """Write the library to ``path`` (a ``.tar`` of objects when the name ends in .tar), plus
        ``<path>.json`` (and ``<path>.defaults.npz`` when some inputs have defaults)."""
        from bncompile._io import atomic_output, check_output_path

        if self._executable is None:
            if self.path is None:
                raise UnsupportedError("export: this model has no executable to export")
            p = check_output_path(path, what="library")
            shutil.copyfile(self.path, p)
        else:
            p = check_output_path(path, what="library")
            kwargs = {}
            if not p.name.endswith(".tar"):
                cc = cc or self._default_cc()
                if cc:
                    kwargs["cc"] = cc
            tmpdir = tempfile.mkdtemp(prefix=f".{p.name}.", dir=str(p.parent) if str(p.parent) else ".")
            try:
                tmp = Path(tmpdir) / p.name
                try:
                    self._executable.export_library(str(tmp), **kwargs)
                except Exception as err:
                    raise UnsupportedError(f"export: linking {p.name} failed: {str(err).strip().splitlines()[-1]}"
                                           ) from None
                os.replace(tmp, p)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        with atomic_output(str(p) + ".json", what="metadata") as tmp:
            tmp.write_text(json.dumps(self.metadata(), indent=1, default=str) + "\n")
        dpath = Path(str(p) + ".defaults.npz")
        if self.defaults:
            with atomic_output(dpath, what="defaults") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **self.defaults)
        elif dpath.exists():
            dpath.unlink()
        self.path = str(p)
        return p

    def _default_cc(self) -> str | None:
        triple = str(self.target.get("mtriple", ""))
        arch = triple.split("-")[0] if triple else None
        if self.target.get("kind") == "llvm" and arch and arch != _host_arch():
            if arch == "aarch64":
                if shutil.which(AARCH64_CXX) is None:
                    raise UnsupportedError(f"export: the aarch64 cross compiler {AARCH64_CXX} is not on PATH: "
                                           "`apt-get install g++-aarch64-linux-gnu`, or export to a .tar of "
                                           "object files and link it on the device")
                return AARCH64_CXX
            raise UnsupportedError(f"export: no cross compiler known for {triple}; export to a .tar instead")
        return None


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


# --------------------------------------------------------------------------- entry points

def compile(model, *, target: Any = "llvm", input_shapes: Mapping | None = None,  # noqa: A001
            fold: bool = True) -> CompiledModel:
    """Compile an ONNX model (path or ModelProto) for ``target``; see the module docstring."""
    from bncompile import _tvm

    t0 = time.perf_counter()
    target_name, tdict = resolve_target(target)
    tvm = _tvm.tvm()
    proto = _load_model(model)
    proto, defaults = _prepare(proto, fold=fold, input_shapes=input_shapes)
    t_prep = time.perf_counter() - t0

    ctx = _KernelContext(tdict)
    extra = _make_converters(ctx)
    convert_map = {**_frontend().onnx_frontend._get_convert_map(), **extra}
    bad = unsupported_ops(proto, convert_map)
    if bad:
        raise UnsupportedError(_unsupported_message(bad))
    inputs = _value_infos(proto.graph.input)
    outputs = _value_infos(proto.graph.output)
    for spec in inputs:
        if spec["shape"] is None:
            raise InputError(f"input {spec['name']!r} has no shape in the model: give it with input_shapes / "
                             "--input-shape")

    t1 = time.perf_counter()
    buf = io.StringIO()
    try:
        import warnings

        with _patched_convert_map(extra), contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = _frontend().from_onnx(proto)
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
    t_import = time.perf_counter() - t1

    t2 = time.perf_counter()
    cpu_report: dict = {}
    try:
        tgt = tvm.target.Target(tdict)
        pipeline = "default"
        if tdict.get("kind") == "llvm":
            from bncompile import cpu_schedules

            pipeline = cpu_schedules.pipeline(tgt, cpu_report)
        ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except BncompileError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise UnsupportedError(f"TVM failed to compile the model for {target_name}: "
                               f"{type(err).__name__}: {(lines[-1] if lines else '')[:300]}") from None
    t_build = time.perf_counter() - t2
    if tdict.get("kind") == "cuda":
        kinds = _module_kinds(ex.mod)
        if "cuda" not in kinds:
            raise UnsupportedError(f"compile for CUDA produced no cuda module (modules: {kinds})")
    info = {"kernels": dict(ctx.schedules), "tvm_batch_norm_fallbacks": ctx.fallbacks,
            "cpu_schedules": dict(sorted(cpu_report.items())),
            "dim_multiples": dict(ctx.multiples),
            "seconds": {"prepare": round(t_prep, 4), "import": round(t_import, 4), "build": round(t_build, 4),
                        "total": round(time.perf_counter() - t0, 4)}}
    log.info("compiled for %s in %.2f s (%d bncompile kernels)", target_name, info["seconds"]["total"],
             len(ctx.kernels))
    return CompiledModel(executable=ex, target=tdict, target_name=target_name, inputs=inputs, outputs=outputs,
                         defaults=defaults, info=info)


def _module_kinds(mod) -> list[str]:
    """Kinds of every module in the import tree of ``mod``."""
    from bncompile import _tvm

    return _tvm.module_tree_kinds(mod)


def cuda_source(cm: CompiledModel) -> str:
    """The CUDA C source of a model compiled for ``cuda`` (for inspection and nvcc checks)."""
    from bncompile import _tvm

    return _tvm.cuda_source(cm._executable)


def load(path) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export` (needs ``<path>.json`` beside it)."""
    from bncompile._io import check_input_file

    p = check_input_file(path, "library")
    meta_path = Path(str(p) + ".json")
    if not meta_path.exists():
        raise InputError(f"library {str(p)!r} has no metadata file {meta_path.name!r} beside it: export it with "
                         "bncompile compile (which writes both)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise InputError(f"metadata file {str(meta_path)!r} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"metadata file {str(meta_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    defaults = {}
    dpath = Path(str(p) + ".defaults.npz")
    if meta.get("defaults") and dpath.exists():
        with np.load(dpath) as z:
            defaults = {k: z[k] for k in z.files}
    cm = CompiledModel(target=meta["target_dict"], target_name=meta["target"], inputs=meta["inputs"],
                       outputs=meta["outputs"], defaults=defaults,
                       info={k: v for k, v in meta.items() if k in ("kernels", "seconds", "dim_multiples")},
                       path=str(p))
    return cm
