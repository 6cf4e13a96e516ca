"""The one pipeline that runs bncompile's passes, and the pass lists of fold, inline and compile.

:class:`Pipeline` is onnx-ir's ``PassManager`` run once, keeping every pass's result in
``.results`` (a ``PassManager`` returns only an overall ``PassResult``) and re-raising a
:class:`bncompile.errors.BncompileError` raised by a pass as itself (onnx-ir wraps it in
``PassError``). ``fold``, ``inline`` and compile's preparation each build one:

* :func:`fold_passes`: ``FoldConstantsPass`` (optional), ``FoldBatchNormPass``,
  ``DecomposeBatchNormPass`` (optional), ``ConvertFloat16Pass`` (optional, last: each weight is
  rounded to float16 once, after the fold);
* :func:`inline_passes`: ``InlineFunctionsPass``, ``NormalizeConstantsPass``;
* :func:`prepare_for_lowering`: ``ApplyInputShapesPass``, the fold passes (optional),
  ``InlineFunctionsPass`` (bncompile's custom ops kept as calls, their definitions dropped),
  ``NormalizeConstantsPass``, ``MinusOneReshapesPass``, ``DropSingleDimProductsPass``,
  ``InputDefaultsPass``, ``PadChannelsPass`` (a CPU target with a channel-blocked layout): the model
  the TVM frontend reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bncompile.errors import BncompileError
from bncompile.passes._result import RewriteResult
from bncompile.passes.decompose_batchnorm import DecomposeBatchNormPass
from bncompile.passes.fold_batchnorm import FoldBatchNormPass
from bncompile.passes.fold_constants import FoldConstantsPass

__all__ = ["Pipeline", "Prepared", "fold_passes", "inline_passes", "prepare_for_lowering"]


class _Recorded(ir.passes.PassBase):
    """Runs ``inner`` and appends its result to ``sink``."""

    def __init__(self, inner: ir.passes.PassBase, sink: list):
        self.inner, self.sink = inner, sink

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        self.sink.append(result)
        return result

    def __str__(self) -> str:
        return type(self.inner).__name__


class Pipeline(ir.passes.PassManager):
    """onnx-ir's PassManager (one step) that records each pass's result in ``self.results``."""

    def __init__(self, passes: Sequence[ir.passes.PassBase]):
        self.results: list[ir.passes.PassResult] = []
        super().__init__([_Recorded(p, self.results) for p in passes], steps=1)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.results.clear()
        try:
            return super().call(model)
        except ir.passes.PassError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, BncompileError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None

    def result_of(self, pass_type: type) -> RewriteResult | None:
        """The result of the (last) pass of that class in the last run, or None."""
        return next((r for r in reversed(self.results)
                     if isinstance(r, RewriteResult) and r.pass_name == pass_type.__name__), None)


def fold_passes(*, fold_constants: bool = True, absorb_affine: bool = True,
                decompose: bool = False, float16: bool = False) -> list[ir.passes.PassBase]:
    passes: list[ir.passes.PassBase] = [FoldConstantsPass()] if fold_constants else []
    passes.append(FoldBatchNormPass(absorb_affine=absorb_affine))
    if decompose:
        passes.append(DecomposeBatchNormPass())
    if float16:
        from bncompile.passes.convert_float16 import ConvertFloat16Pass
        passes.append(ConvertFloat16Pass())
    return passes


def inline_passes(*, keep: Mapping[tuple[str, str], str] | None = None,
                  drop_definitions: bool = False) -> list[ir.passes.PassBase]:
    # imported here: onnx-ir's inliner is not needed by fold
    from bncompile.passes.inline_functions import InlineFunctionsPass
    from bncompile.passes.normalize_constants import NormalizeConstantsPass

    return [InlineFunctionsPass(keep=keep, drop_definitions=drop_definitions),
            NormalizeConstantsPass()]


@dataclasses.dataclass
class Prepared:
    """What :func:`prepare_for_lowering` returns."""

    model: ir.Model
    defaults: dict[str, np.ndarray]
    results: list[ir.passes.PassResult]


def prepare_for_lowering(model: ir.Model, *, fold: bool, input_shapes: Mapping | None,
                         pad_channels: int | None = None) -> Prepared:
    """Rewrite ``model`` (in place) into what the TVM frontend reads; see the module docstring.
    ``pad_channels``: the channel block of a CPU target's blocked layout (``PadChannelsPass``), or None.

    Raises :class:`bncompile.errors.InputError` for ``input_shapes`` that do not fit the model.
    """
    from bncompile import custom_ops
    from bncompile.passes.apply_input_shapes import ApplyInputShapesPass
    from bncompile.passes.drop_single_dim_products import DropSingleDimProductsPass
    from bncompile.passes.input_defaults import InputDefaultsPass
    from bncompile.passes.minus_one_reshapes import MinusOneReshapesPass
    from bncompile.passes.pad_channels import PadChannelsPass

    custom_ops.register_schemas()
    keep = {(custom_ops.DOMAIN, name): "a bncompile custom op: the lowering implements it"
            for name in (*custom_ops.OPS, *custom_ops.GRAD_OPS)}
    pipeline = Pipeline([
        ApplyInputShapesPass(input_shapes),
        *(fold_passes() if fold else []),
        *inline_passes(keep=keep, drop_definitions=True),
        MinusOneReshapesPass(),
        DropSingleDimProductsPass(),
        InputDefaultsPass(pinned=input_shapes or ()),
        *([PadChannelsPass(pad_channels)] if pad_channels else []),
    ])
    pipeline(model)
    defaults = pipeline.result_of(InputDefaultsPass).detail["defaults"]
    return Prepared(model, defaults, list(pipeline.results))
