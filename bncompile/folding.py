"""``bncompile.fold``: fold inference BatchNormalization into the layer before it, and prove it.

>>> from bncompile import fold
>>> result = fold("model.onnx", output="model.folded.onnx")    # doctest: +SKIP
>>> print(result.report.summary())                              # doctest: +SKIP

Pipeline (:func:`bncompile.passes.pipeline.fold_passes`, each an onnx-ir pass in
``bncompile.passes``): constant-only subexpressions to initializers (``fold_constants``), then the
fold (``fold_batchnorm``), then optionally ``decompose_batchnorm`` for what could not be folded.
The report is built from the passes' results.

Verification (by default): the full ONNX checker, then the original and folded models run on
seeded random inputs in onnxruntime with all graph optimizations off. A model the passes left
unchanged is reported as such and not run (nothing to verify; onnxruntime is not needed). When
onnxruntime cannot load a model (it has dropped some old kernels, e.g. ``BatchNormalization(6)``),
that model runs in ``onnx.reference`` corrected for the operators it gets wrong in old opsets
(:mod:`bncompile.reference_runtime`); when that cannot run it right either, the result is saved
*unverified*: a warning line, ``"verification": "unverified"`` in the JSON report, exit 0.

Float16/bfloat16 models are folded by default. Both the unfolded and the folded model are compared
against a float32 twin of the unfolded model (every float16 tensor, type and Cast made float32) and
both errors are reported. The fold fails only when the folded model's max relative error against
the twin exceeds the dtype's tolerance (:data:`DEFAULT_TOLERANCE`) *and* :data:`FP16_NOT_WORSE_FACTOR`
times the unfolded model's error (a deep network whose unfolded float16 error already exceeds the
tolerance is not refused for it). ``strict_float16=True`` (``--strict-float16``) demands instead
"no less accurate than unfolded": at most :data:`FP16_NOT_WORSE_FACTOR` times the unfolded error.
Storing ``W*k`` in float16 rounds each weight once more than the unfolded model does, so no fold of
a float16 model is *exactly* as accurate; the factor flags folds that lose clearly more than that
rounding (e.g. folded values computed in float16: 0.0058 -> 0.0093 in peers.md).
BNs rewritten by ``decompose`` (two roundings in X's dtype) are reported but not held to it.

``float16=True`` (``--float16``) on a float32 model folds in float32 and then converts the result
to float16 (:mod:`bncompile.passes.convert_float16`; inputs and outputs become float16), so each
weight is rounded once. It is verified against the float32 original, and its accuracy is compared
with the unfolded float16 twin made by the same converter without folding.

A failure raises :class:`bncompile.errors.VerificationError`.

Errors are relative to the output range: ``max_rel = max|folded - original| / max|original|``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from pathlib import Path

import onnx

from bncompile import onnx_utils
from bncompile.errors import InputError, VerificationError

log = logging.getLogger(__name__)

__all__ = ["fold", "FoldResult", "FoldReport", "BatchNormDecision", "CheckResult", "DEFAULT_TOLERANCE"]

#: Default max relative error (max abs error / largest |reference| output) per output dtype.
DEFAULT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
#: A low-precision folded model's max error against the float32 twin may be at most this factor
#: times the unfolded model's.
FP16_NOT_WORSE_FACTOR = 1.5


@dataclasses.dataclass
class BatchNormDecision:
    """What fold did with one BatchNormalization node (from ``FoldBatchNormPass``'s entry)."""

    node: str
    graph: str
    opset: int
    mode: str                      # "inference", "training", "spatial=0"
    action: str                    # "folded", "left", "decomposed"
    into: str | None = None        # e.g. "Conv 'conv1'"
    into_op: str | None = None
    absorbed: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None
    direction: str | None = None   # "previous" (the layer producing its input) or "next"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckResult:
    """The numerical verification of a folded model against the original."""

    runs: int
    seed: int
    dtype: str | None
    tolerance: float
    max_abs: float
    max_rel: float
    max_elem_rel: float
    passed: bool
    input_shapes: dict = dataclasses.field(default_factory=dict)
    low_precision: dict | None = None   # {"unfolded_vs_float32": ..., "folded_vs_float32": ...}
    note: str | None = None
    runtimes: dict = dataclasses.field(default_factory=dict)  # {"original": ..., "folded": ...}
    nonfinite_agreed: int = 0           # NaN/inf output elements at the same place in both (agreement)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """Everything ``fold`` did: each BN folded (into what) or left (why), counts, error, time."""

    input: str | None
    output: str | None
    ir_version: int
    opset: int | None
    nodes_before: int
    nodes_after: int
    ops_before: dict
    ops_after: dict
    batchnorms: list = dataclasses.field(default_factory=list)
    constants_folded: list = dataclasses.field(default_factory=list)
    decompose: bool = False
    check: CheckResult | None = None
    seconds: dict = dataclasses.field(default_factory=dict)
    unchanged: bool = False        # no pass changed the model
    #: "onnxruntime", "onnx.reference", "onnxruntime+onnx.reference", "unverified",
    #: "not needed (unchanged)" or "skipped"
    verification: str = "skipped"
    warnings: list = dataclasses.field(default_factory=list)
    float16: bool = False          # converted to float16 after folding
    strict_float16: bool = False

    @property
    def folded(self) -> list:
        return [d for d in self.batchnorms if d.action == "folded"]

    @property
    def left(self) -> list:
        return [d for d in self.batchnorms if d.action == "left"]

    @property
    def decomposed(self) -> list:
        return [d for d in self.batchnorms if d.action == "decomposed"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["summary"] = {"batchnorms": len(self.batchnorms), "folded": len(self.folded),
                        "decomposed": len(self.decomposed), "left": len(self.left)}
        return d

    def summary(self) -> str:
        """A human-readable report (what the CLI prints)."""
        lines = []
        src = self.input or "(in-memory model)"
        lines.append(f"bncompile fold: {src}" + (f" -> {self.output}" if self.output else ""))
        lines.append(f"  IR {self.ir_version}, opset {self.opset}; BatchNormalization nodes: "
                     f"{len(self.batchnorms)} ({len(self.folded)} folded, "
                     f"{len(self.decomposed)} decomposed, {len(self.left)} left)")
        for d in self.batchnorms:
            where = f" [{d.graph}]" if d.graph != "main" else ""
            if d.action == "folded":
                extra = f" (with {', '.join(d.absorbed)})" if d.absorbed else ""
                lines.append(f"  folded      {d.node}{where} into {d.into}{extra}")
            elif d.action == "decomposed":
                lines.append(f"  decomposed  {d.node}{where} into Mul + Add (not folded: {d.reason})")
            else:
                lines.append(f"  left        {d.node}{where}: {d.reason}")
        if self.constants_folded:
            lines.append(f"  constant-folded {len(self.constants_folded)} node(s): "
                         + ", ".join(sorted({op for op, _ in self.constants_folded})))
        bn_b = self.ops_before.get("BatchNormalization", 0)
        bn_a = self.ops_after.get("BatchNormalization", 0)
        lines.append(f"  nodes: {self.nodes_before} -> {self.nodes_after} "
                     f"(BatchNormalization {bn_b} -> {bn_a})")
        if self.float16:
            lines.append("  converted to float16 after folding (each weight rounded once)")
        if self.unchanged:
            lines.append("  unchanged: nothing to fold" + (
                "; check: not needed" if self.verification.startswith("not needed") else ""))
        c = self.check
        if c is None:
            if self.verification == "skipped":
                lines.append("  check: skipped (--no-check)")
            elif self.verification == "unverified":
                lines.append("  check: UNVERIFIED (the ONNX checker passed; no runtime could run "
                             "both models right)")
        else:
            verdict = "ok" if c.passed else "FAILED"
            lines.append(f"  check: {verdict}: {c.runs} random input set(s), seed {c.seed}, "
                         f"max abs error {c.max_abs:.3g}, max rel error {c.max_rel:.3g} "
                         f"(tolerance {c.tolerance:g} for {c.dtype})")
            if c.low_precision:
                lp = c.low_precision
                against = "the float32 original" if self.float16 else "float32 twin"
                lines.append(f"  {c.dtype} accuracy vs {against} (max rel error): unfolded "
                             f"{lp['unfolded_vs_float32']:.3g}, folded {lp['folded_vs_float32']:.3g}"
                             f" ({'strict: at most' if self.strict_float16 else 'limit'} "
                             f"{lp['limit']:.3g})")
            if set(c.runtimes.values()) - {"onnxruntime"}:
                lines.append("  runtimes: " + ", ".join(f"{k} in {v}" for k, v in c.runtimes.items()))
            if c.nonfinite_agreed:
                lines.append(f"  note: {c.nonfinite_agreed} NaN/inf output value(s) at the same places in "
                             "both models (counted as agreement)")
            if c.note:
                lines.append(f"  note: {c.note}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        secs = ", ".join(f"{k} {v:.3f}s" for k, v in self.seconds.items())
        lines.append(f"  time: {secs}")
        return "\n".join(lines)


class FoldResult:
    """The folded model (``.model``, an ``onnx.ModelProto``, built on first access) and its report.

    ``.ir_model`` is the onnx-ir model; ``.save(path)`` writes it (external data when needed).
    """

    def __init__(self, ir_model, report: FoldReport):
        self.ir_model = ir_model
        self.report = report
        self._proto = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = onnx_utils.serialize_model(self.ir_model)
        return self._proto

    def save(self, path, *, external_data: bool | None = None) -> Path | None:
        """Write the folded model atomically; returns the external data file written, if any."""
        return onnx_utils.save_model_ir(self.ir_model, path, external_data=external_data)

    def __repr__(self) -> str:
        r = self.report
        return (f"FoldResult({len(r.folded)} folded, {len(r.decomposed)} decomposed, "
                f"{len(r.left)} left)")


def _count_ops(model) -> collections.Counter:
    import onnx_ir as ir
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _load(model_or_path, validate: bool):
    """(onnx-ir model, the input's path or None for an in-memory proto)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        # detach at load: the parsed proto is freed before the folded weights are allocated
        return onnx_utils.load_model_ir(path, check=validate), path
    if isinstance(model_or_path, onnx.ModelProto):
        return onnx_utils.model_from_proto(model_or_path, check=validate), None
    raise InputError(f"fold expects a path or an onnx.ModelProto, got {type(model_or_path).__name__}")


def fold(model_or_path, *, output=None, in_place: bool = False, decompose: bool = False,
         fold_constants: bool = True, absorb_affine: bool = True, check: bool = True,
         check_runs: int = 2, seed: int = 0, input_shapes: dict | None = None,
         tolerance: float | None = None, validate: bool = True,
         external_data: bool | None = None, float16: bool = False,
         strict_float16: bool = False) -> FoldResult:
    """Fold inference BatchNormalization nodes of a model; verify; optionally write the result.

    Args (keyword-only after the model):
        model_or_path: an ``.onnx`` path (external data read lazily) or an ``onnx.ModelProto``.
        output: where to write the folded model (atomic; never the input unless ``in_place``).
        decompose: rewrite each inference BN that could not be folded into Mul + Add.
        fold_constants: first evaluate constant-only subexpressions into initializers.
        absorb_affine: also fold a per-channel constant Mul/Add right after a folded BN.
        check: run the ONNX checker and compare with the original in onnxruntime.
        check_runs, seed, input_shapes: random input sets, their seed, shapes of free dims.
        tolerance: max relative error allowed (default per dtype, :data:`DEFAULT_TOLERANCE`).
        validate: check the input with ``onnx.checker.check_model(full_check=True)``.
        external_data: force (True) or forbid (False) external data on save; None decides.
        float16: convert the folded float32 model to float16 (each weight rounded once).
        strict_float16: a float16 result must be no less accurate than the unfolded float16 model
            against float32 (see the module docstring), not only within the float16 tolerance.

    Raises InputError (bad input; exit 2) or VerificationError (check failed; exit 1).
    """
    from bncompile.passes.pipeline import Pipeline, fold_passes  # the passes, before the clock starts

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    in_path = Path(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if output is not None and in_path is not None and not in_place:
        try:
            same = Path(output).resolve() == in_path.resolve()
        except OSError:
            same = False
        if same:
            raise InputError(f"output {str(output)!r} is the input: pass in_place=True "
                             "(--in-place) to overwrite it, or choose another -o")
    if check_runs < 1:
        raise InputError(f"check_runs must be >= 1, got {check_runs}")
    model, path = _load(model_or_path, validate)
    seconds["load"] = time.perf_counter() - t
    if float16:
        _require_float32(model)

    t = time.perf_counter()
    before = _count_ops(model)
    pipeline = Pipeline(fold_passes(fold_constants=fold_constants, absorb_affine=absorb_affine,
                                    decompose=decompose, float16=float16))
    pipeline(model)
    decisions, constants_folded = _report_entries(pipeline)
    after = _count_ops(model)
    unchanged = not any(r.modified for r in pipeline.results)
    seconds["fold"] = time.perf_counter() - t

    report = FoldReport(
        input=str(in_path) if in_path else None, output=str(output) if output else None,
        ir_version=int(model.ir_version or 0), opset=model.opset_imports.get(""),
        nodes_before=sum(before.values()), nodes_after=sum(after.values()),
        ops_before=dict(sorted(before.items())), ops_after=dict(sorted(after.items())),
        batchnorms=decisions, constants_folded=constants_folded, decompose=decompose,
        unchanged=unchanged, float16=float16, strict_float16=strict_float16)
    result = FoldResult(model, report)

    if check and unchanged:
        report.verification = "not needed (unchanged)"
    elif check:
        t = time.perf_counter()
        report.check, report.verification, warning = _verify(
            model_or_path, path, result, check_runs=check_runs, seed=seed,
            input_shapes=input_shapes, tolerance=tolerance, float16=float16,
            strict_float16=strict_float16, fold_constants=fold_constants)
        if warning:
            report.warnings.append(warning)
            log.warning("%s", warning)
        seconds["check"] = time.perf_counter() - t
    if output is not None and (report.check is None or report.check.passed):
        t = time.perf_counter()
        result.save(output, external_data=external_data)
        seconds["save"] = time.perf_counter() - t
    report.seconds = {k: round(v, 6) for k, v in seconds.items()}
    if report.check is not None and not report.check.passed:
        err = VerificationError(_failure_message(report.check, report))
        err.result = result  # the report of what was done, for the CLI and callers
        raise err
    return result


def _require_float32(model) -> None:
    """``float16=True`` converts a float32 model: refuse one that already computes in float16."""
    import onnx_ir as ir

    kinds = {v.dtype for v in (*model.graph.inputs, *model.graph.outputs,
                               *model.graph.initializers.values()) if v.dtype is not None}
    low = kinds & {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    if low:
        raise InputError(f"--float16 converts a float32 model, but this one already has "
                         f"{', '.join(sorted(str(k.name).lower() for k in low))} tensors: fold it "
                         "without --float16")


def _report_entries(pipeline) -> tuple[list[BatchNormDecision], list[list[str]]]:
    """The BN decisions and the constant-folded ``[op, name]`` pairs, from the passes' results."""
    from bncompile.passes.pipeline import DecomposeBatchNormPass, FoldBatchNormPass, FoldConstantsPass

    fc = pipeline.result_of(FoldConstantsPass)
    constants_folded = [[e.op, e.name] for e in fc.changed] if fc is not None else []
    dec = pipeline.result_of(DecomposeBatchNormPass)
    decomposed = {e.node for e in dec.changed} if dec is not None else set()
    decisions = []
    for e in pipeline.result_of(FoldBatchNormPass).entries:
        action = "decomposed" if not e.changed and e.node in decomposed else e.action
        d = e.detail
        decisions.append(BatchNormDecision(
            node=e.name or "(unnamed)", graph=d["graph"], opset=d["opset"], mode=d["mode"],
            action=action, into=d["into"], into_op=d["into_op"], absorbed=d["absorbed"],
            reason=e.reason, direction=d.get("direction")))
    return decisions, constants_folded


def _failure_message(c: CheckResult, report: FoldReport | None = None) -> str:
    if c.note and c.low_precision is None:
        return f"verification failed: {c.note}"
    if c.low_precision and c.max_rel <= c.tolerance:
        lp = c.low_precision
        if report is not None and report.strict_float16:
            return (f"verification failed (--strict-float16): the folded {c.dtype} model is less "
                    f"accurate than the unfolded one against float32 "
                    f"({lp['folded_vs_float32']:.3g} > {lp['limit']:.3g}, "
                    f"{FP16_NOT_WORSE_FACTOR}x the unfolded {lp['unfolded_vs_float32']:.3g}); "
                    "keep the original model, or drop --strict-float16")
        return (f"verification failed: the folded {c.dtype} model's error against float32 "
                f"{lp['folded_vs_float32']:.3g} exceeds the {c.dtype} tolerance {c.tolerance:g} "
                f"and {FP16_NOT_WORSE_FACTOR}x the unfolded model's "
                f"{lp['unfolded_vs_float32']:.3g}; keep the original model")
    return (f"verification failed: folded model differs from the original by max rel error "
            f"{c.max_rel:.3g} (max abs {c.max_abs:.3g}) > tolerance {c.tolerance:g} for {c.dtype}; "
            "re-run with --no-check to keep it anyway, or report the model")


def _runner(src, proto_of, what: str):
    """(a session-like runner, its runtime's name) for a model, or (None, why not).

    onnxruntime first; when it cannot load the model, ``onnx.reference`` corrected for old opsets
    (:mod:`bncompile.reference_runtime`) when that runs every node of it right."""
    from bncompile import reference_runtime

    try:
        return onnx_utils.make_session(src), "onnxruntime"
    except InputError as err:
        ort_why = str(err)
    proto = proto_of()
    if proto is None:
        return None, f"{ort_why}; the {what} model is too large for onnx.reference"
    why = reference_runtime.unsupported(proto)
    if why is not None:
        return None, f"{ort_why}; onnx.reference cannot run it right either ({why})"
    try:
        return reference_runtime.Session(proto), "onnx.reference"
    except Exception as err:  # an operator onnx.reference lacks
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return None, f"{ort_why}; onnx.reference cannot run it either ({first})"


def _float_dtype(outputs) -> str | None:
    types = {t for _, t in outputs}
    return next((d for d in ("bfloat16", "float16", "float32", "float64")
                 if f"tensor({'float' if d == 'float32' else 'double' if d == 'float64' else d})" in types),
                None)


def _cast_feeds(feeds: dict, session) -> dict:
    """``feeds`` with each float input cast to the float type ``session`` declares for it."""
    want = {i.name: onnx_utils._ort_dtype(i.type) for i in session.get_inputs()}
    return {k: (v.astype(want[k]) if (v.dtype.kind == "f" or v.dtype.name == "bfloat16")
                and want.get(k) is not None and want[k] != v.dtype else v)
            for k, v in feeds.items()}


def _verify(model_or_path, path, result: FoldResult, *, check_runs, seed, input_shapes,
            tolerance, float16=False, strict_float16=False, fold_constants=True):
    """(CheckResult or None, verification label, warning or None) for a changed model."""
    model = result.ir_model
    orig_proto = model_or_path if path is None else None

    def original_proto():
        nonlocal orig_proto
        if orig_proto is None:
            orig_proto = onnx_utils.load_model_proto(path, check=False)
        return orig_proto if orig_proto.ByteSize() < onnx_utils.PROTO_LIMIT_BYTES else None

    def fail(note):
        return CheckResult(runs=0, seed=seed, dtype=None, tolerance=0.0, max_abs=float("nan"),
                           max_rel=float("nan"), max_elem_rel=float("nan"), passed=False, note=note)

    # 1. the full ONNX checker on the folded model
    with onnx_utils.model_on_disk(model) as folded_src:
        try:
            onnx_utils.check_model(folded_src, what="folded model")     # the bytes, or the path
        except InputError as err:
            return fail(str(err)), "onnxruntime", None
        # 2. original vs folded, all optimizations off
        orig_src = str(path) if path is not None else model_or_path.SerializeToString()

        def folded_proto():
            if isinstance(folded_src, bytes):
                return onnx.load_model_from_string(folded_src)
            return None if os.path.getsize(folded_src) >= onnx_utils.PROTO_LIMIT_BYTES else \
                onnx.load(folded_src)

        s_orig, rt_orig = _runner(orig_src, original_proto, "original")
        s_fold, rt_fold = (_runner(folded_src, folded_proto, "folded") if s_orig is not None
                           else (None, None))
        if s_orig is None or s_fold is None:
            why = rt_orig if s_orig is None else rt_fold
            which = "original" if s_orig is None else "folded"
            return None, "unverified", (
                f"the folded model is UNVERIFIED: the {which} model cannot be run ({why}); "
                "the ONNX checker passed")
        runtimes = {"original": rt_orig, "folded": rt_fold}
        label = "+".join(dict.fromkeys(runtimes.values()))
        names_o = [(i.name, i.type) for i in s_orig.get_inputs()]
        names_f = [(i.name, i.type) for i in s_fold.get_inputs()]
        outs_o = [(o.name, o.type) for o in s_orig.get_outputs()]
        outs_f = [(o.name, o.type) for o in s_fold.get_outputs()]
        if float16:  # the types change by design; the names must not
            same = ([n for n, _ in names_o] == [n for n, _ in names_f]
                    and [n for n, _ in outs_o] == [n for n, _ in outs_f])
        else:
            same = names_o == names_f and outs_o == outs_f
        if not same:
            return fail(f"the interface changed: inputs {names_o} -> {names_f}, "
                        f"outputs {outs_o} -> {outs_f}"), label, None
        dtype = _float_dtype(outs_f)
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype or "float32", 1e-4)
        low = dtype in ("float16", "bfloat16")
        twin = unfolded = None   # the float32 reference, and the unfolded low-precision model
        note = None
        if float16:
            twin, unfolded = s_orig, _float16_twin(original_proto(), fold_constants)
            if unfolded is None:
                note = "model too large for the unfolded float16 twin; accuracy comparison skipped"
        elif low:
            unfolded = s_orig
            try:
                proto = original_proto()
                if proto is not None:
                    twin = onnx_utils.make_session(onnx_utils.model_to_float32(proto))
                else:
                    note = "model too large for the float32 accuracy twin; skipped"
            except Exception as err:  # a float32 twin ORT cannot run: report, do not fail
                note = f"float32 twin could not run ({err}); accuracy comparison skipped"
        agg = {"max_abs": 0.0, "max_rel": 0.0, "max_elem_rel": 0.0}
        acc = {"unfolded_vs_float32": 0.0, "folded_vs_float32": 0.0,
               "unfolded_rms_vs_float32": 0.0, "folded_rms_vs_float32": 0.0}
        shapes_used = {}
        nonfinite = 0
        positive = onnx_utils.variance_inputs(model)     # BN variances given as graph inputs: > 0
        for run in range(check_runs):
            feeds = onnx_utils.random_feeds(s_orig, seed=seed + run, input_shapes=input_shapes,
                                            positive=positive)
            shapes_used = {k: list(v.shape) for k, v in feeds.items()}
            ref = s_orig.run(None, feeds)
            got = s_fold.run(None, _cast_feeds(feeds, s_fold))
            err = onnx_utils.compare_outputs(ref, got)
            nonfinite += err["nonfinite_agreed"]
            for k in agg:
                agg[k] = max(agg[k], err[k])
            if twin is not None and unfolded is not None:
                ref32 = ref if float16 else twin.run(None, _cast_feeds(feeds, twin))
                base = unfolded.run(None, _cast_feeds(feeds, unfolded)) if float16 else ref
                e_unf = onnx_utils.compare_outputs(ref32, base)
                e_fol = onnx_utils.compare_outputs(ref32, got)
                acc["unfolded_vs_float32"] = max(acc["unfolded_vs_float32"], e_unf["max_rel"])
                acc["folded_vs_float32"] = max(acc["folded_vs_float32"], e_fol["max_rel"])
                acc["unfolded_rms_vs_float32"] = max(acc["unfolded_rms_vs_float32"], e_unf["rms_rel"])
                acc["folded_rms_vs_float32"] = max(acc["folded_rms_vs_float32"], e_fol["rms_rel"])
    passed = agg["max_rel"] <= tol
    low_precision = None
    if twin is not None and unfolded is not None:
        low_precision = acc
        not_worse = acc["unfolded_vs_float32"] * FP16_NOT_WORSE_FACTOR + 1e-12
        acc["limit"] = not_worse if strict_float16 else max(tol, not_worse)
        if acc["folded_vs_float32"] > acc["limit"]:
            if result.report.decomposed:
                note = ((note + "; ") if note else "") + (
                    "less accurate than the unfolded model against the float32 twin, from the "
                    "decomposed BN(s) (Mul + Add in the model's dtype): not counted as a failure")
            else:
                passed = False
    check = CheckResult(runs=check_runs, seed=seed, dtype=dtype, tolerance=tol,
                        max_abs=agg["max_abs"], max_rel=agg["max_rel"],
                        max_elem_rel=agg["max_elem_rel"], passed=passed, input_shapes=shapes_used,
                        low_precision=low_precision, note=note, runtimes=runtimes, nonfinite_agreed=nonfinite)
    return check, label, None


def _float16_twin(proto, fold_constants: bool):
    """An onnxruntime session of the unfolded model converted to float16 by the same pass."""
    if proto is None:
        return None
    from bncompile.passes.convert_float16 import ConvertFloat16Pass
    from bncompile.passes.fold_constants import FoldConstantsPass
    from bncompile.passes.pipeline import Pipeline

    twin = onnx_utils.model_from_proto(proto, check=False)
    Pipeline([FoldConstantsPass()] * fold_constants + [ConvertFloat16Pass()])(twin)
    return onnx_utils.make_session(onnx_utils.serialize_model(twin))
