"""``bncompile.compile``: a whole ONNX graph -> a deployable TVM library.

>>> cm = compile("model.onnx", target="llvm")           # doctest: +SKIP
>>> cm.run({"x": x})["y"]                                # doctest: +SKIP
>>> cm.export("model.so"); load("model.so").run(...)     # doctest: +SKIP

Pipeline:

1. load the model (:func:`bncompile.onnx_utils.as_model_proto`: external data never read from outside
   the model's folder) into onnx-ir;
2. the graph passes of :func:`bncompile.passes.pipeline.prepare_for_lowering`, one onnx-ir pipeline:
   apply ``input_shapes`` to the graph inputs (a name -> dims; a str dim stays free); fold inference
   BatchNormalization (``fold=True``; no verification); inline model-local functions other than
   bncompile's custom ops (``ai.bncompile``) and rewrite the ``Constant(value_float=...)`` forms TVM's
   Constant converter cannot read; undo the builder's shape products that TVM cannot import; graph
   inputs that also have an initializer become real inputs (their initializer is kept as the default
   value ``run`` feeds);
3. serialize to the ``ModelProto`` TVM's frontend reads;
4. check every operator against the Relax ONNX frontend's converter map and report ALL unsupported ones
   in one :class:`UnsupportedError` (:mod:`bncompile.lower.frontend`);
5. ``tvm.relax.frontend.onnx.from_onnx`` with converter overrides (:mod:`bncompile.lower.frontend`):
   training-mode ``BatchNormalization`` (``training_mode=1``) and the custom ops become a ``call_tir`` of
   OUR kernel (:mod:`bncompile.lower.kernels`), never TVM's ``batch_norm`` (whose momentum is the PyTorch one);
6. ``tvm.compile``; symbolic dims (``dim_param``) stay symbolic. For ``llvm`` targets the Relax pipeline is
   :func:`bncompile.lower.graph_schedules.pipeline` (TVM's default CPU pipeline leaves every operator an
   unscheduled serial loop nest): packed-weight conv2d, operator fusion, and a CPU schedule for each fused
   PrimFunc (our batch-norm kernels excepted); ``info["cpu_schedules"]`` names the rule of each function.
   Other targets use TVM's default pipeline.

Targets (:mod:`bncompile.lower.targets`): ``llvm`` (host CPU), ``x86_64`` (generic x86-64), ``aarch64``
(Linux, NEON; exported with ``aarch64-linux-gnu-g++``), ``cuda`` / ``cuda:sm_80`` (sm_90 by default; source
codegen works without a GPU), or a TVM target dict. The result is a :class:`bncompile.lower.runtime.CompiledModel`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import onnx

from bncompile.errors import BncompileError, InputError, UnsupportedError
from bncompile.lower import frontend
from bncompile.lower import tvm as _tvm
from bncompile.lower.runtime import CompiledModel, value_infos
from bncompile.lower.targets import resolve_target

log = logging.getLogger(__name__)

__all__ = ["compile"]


def _channel_padding(tdict: dict) -> int | None:
    """The block compile pads channel regions to for this target (llvm with a channel-blocked layout:
    :func:`bncompile.lower.graph_schedules.padding_block`), else None."""
    if tdict.get("kind") != "llvm":
        return None
    from bncompile.lower import graph_schedules

    return graph_schedules.padding_block(_tvm.tvm().target.Target(tdict))


def _prepare(model, *, fold: bool, input_shapes, pad_channels: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Steps 1-3 of the module docstring: (the proto TVM's frontend reads, default values of inputs)."""
    import onnx_ir as ir

    from bncompile import custom_ops, onnx_utils
    from bncompile.passes.pipeline import prepare_for_lowering

    custom_ops.register_schemas()
    proto = onnx_utils.as_model_proto(model, check=False, copy=True)
    from bncompile.lower.shape_values import fold_shape_values

    prep = prepare_for_lowering(ir.serde.deserialize_model(proto), fold=fold, input_shapes=input_shapes,
                                pad_channels=pad_channels)
    proto = onnx_utils.serialize_model(prep.model)
    fold_shape_values(proto)       # shape programs feeding a Reshape (channel shuffle): constants, 0 / -1
    return proto, prep.defaults


def relax_module(model, *, tdict: dict, input_shapes: Mapping | None = None, fold: bool = True):
    """Steps 1-5: ``(Relax IRModule, KernelContext, prepared proto, default values of inputs)``; the module
    :func:`compile` builds, and the one ``bncompile tune`` extracts its tasks from."""
    proto, defaults = _prepare(model, fold=fold, input_shapes=input_shapes, pad_channels=_channel_padding(tdict))
    ctx = frontend.KernelContext(tdict)
    extra = frontend.make_converters(ctx)
    frontend.check_supported(proto, extra)
    for spec in value_infos(proto.graph.input):
        if spec["shape"] is None:
            raise InputError(f"input {spec['name']!r} has no shape in the model: give it with input_shapes / "
                             "--input-shape")
    return frontend.from_onnx(proto, extra, value_infos(proto.graph.input)), ctx, proto, defaults


def compile(model, *, target: Any = "llvm", input_shapes: Mapping | None = None,  # noqa: A001
            fold: bool = True, db=None) -> CompiledModel:
    """Compile an ONNX model (path or ModelProto) for ``target``; see the module docstring. ``db``: a tuning
    database folder written by ``bncompile tune`` (:mod:`bncompile.lower.tuning`); its best schedule of each
    function replaces the hand schedule, functions it lacks keep theirs (``info["tuned"]`` names them)."""
    t0 = time.perf_counter()
    target_name, tdict = resolve_target(target)
    tvm = _tvm.tvm()
    tuned_db = None
    if db is not None:
        if tdict.get("kind") != "llvm":
            raise InputError(f"db: tuning databases apply to CPU (llvm) targets; {target_name} is not one")
        from bncompile.lower.tuning import TunedSchedules

        tuned_db = TunedSchedules(db, tdict)
    proto, defaults = _prepare(model, fold=fold, input_shapes=input_shapes, pad_channels=_channel_padding(tdict))
    t_prep = time.perf_counter() - t0

    ctx = frontend.KernelContext(tdict)
    extra = frontend.make_converters(ctx)
    frontend.check_supported(proto, extra)
    inputs = value_infos(proto.graph.input)
    outputs = value_infos(proto.graph.output)
    for spec in inputs:
        if spec["shape"] is None:
            raise InputError(f"input {spec['name']!r} has no shape in the model: give it with input_shapes / "
                             "--input-shape")

    t1 = time.perf_counter()
    mod = frontend.from_onnx(proto, extra, inputs)
    t_import = time.perf_counter() - t1

    t2 = time.perf_counter()
    cpu_report: dict = {}
    try:
        tgt = tvm.target.Target(tdict)
        pipeline = "default"
        if tdict.get("kind") == "llvm":
            from bncompile.lower import graph_schedules

            pipeline = graph_schedules.pipeline(tgt, cpu_report, database=tuned_db)
        with _tvm.cuda_pass_context(tdict):       # CUDA: no storage rewrite (shared scalars race)
            ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except BncompileError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise UnsupportedError(f"TVM failed to compile the model for {target_name}: "
                               f"{type(err).__name__}: {(lines[-1] if lines else '')[:300]}") from None
    t_build = time.perf_counter() - t2
    if tdict.get("kind") == "cuda":
        kinds = _tvm.module_tree_kinds(ex.mod)
        if "cuda" not in kinds:
            raise UnsupportedError(f"compile for CUDA produced no cuda module (modules: {kinds})")
    info = {"kernels": dict(ctx.schedules), "tvm_batch_norm_fallbacks": ctx.fallbacks,
            "cpu_schedules": dict(sorted(cpu_report.items())),
            "dim_multiples": dict(ctx.multiples),
            "dim_broadcasts": {k: list(v) for k, v in sorted(ctx.broadcasts.items())},
            "tuned": sorted(n for n, rule in cpu_report.items() if rule == "database"),
            "seconds": {"prepare": round(t_prep, 4), "import": round(t_import, 4), "build": round(t_build, 4),
                        "total": round(time.perf_counter() - t0, 4)}}
    log.info("compiled for %s in %.2f s (%d bncompile kernels)", target_name, info["seconds"]["total"],
             len(ctx.kernels))
    return CompiledModel(executable=ex, target=tdict, target_name=target_name, inputs=inputs, outputs=outputs,
                         defaults=defaults, info=info)
