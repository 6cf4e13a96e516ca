"""The Pipeline (onnx-ir's PassManager keeping every result) and prepare_for_lowering."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bncompile import BatchNormConfig, custom_ops, onnx_utils
from bncompile.builder import build_model
from bncompile.errors import InputError
from bncompile.passes.apply_input_shapes import ApplyInputShapesPass
from bncompile.passes.pipeline import Pipeline, Prepared, fold_passes, inline_passes, prepare_for_lowering
from helpers import compile_models as M
from helpers import ort_run
from helpers.fold_graphs import FOREIGN, conv_bn


def test_every_pass_result_is_kept_in_order():
    model = ir.serde.deserialize_model(conv_bn(seed=1))
    pipeline = Pipeline([*fold_passes(decompose=True), RemoveUnusedNodesPass()])
    overall = pipeline(model)
    names = [getattr(r, "pass_name", type(r).__name__) for r in pipeline.results]
    assert names == ["FoldConstantsPass", "FoldBatchNormPass", "DecomposeBatchNormPass", "PassResult"]
    assert overall.modified and pipeline.results[1].modified and not pipeline.results[2].modified
    assert pipeline.result_of(type(fold_passes()[1])) is pipeline.results[1]
    pipeline(model)  # a second run starts a new list
    assert len(pipeline.results) == 4 and not pipeline.results[1].modified


def test_a_bncompile_error_surfaces_as_itself():
    model = ir.serde.deserialize_model(M.mlp(None))
    with pytest.raises(InputError, match="no input named 'z'"):
        Pipeline([ApplyInputShapesPass({"z": [1]})])(model)


def test_inline_passes_are_inline_then_constants():
    assert [type(p).__name__ for p in inline_passes()] == ["InlineFunctionsPass", "NormalizeConstantsPass"]


def _prepare(proto, **kw):
    kw.setdefault("fold", True)
    kw.setdefault("input_shapes", None)
    prep = prepare_for_lowering(ir.serde.deserialize_model(proto), **kw)
    return prep, onnx_utils.serialize_model(prep.model)


def test_prepare_folds_and_lists_every_pass():
    prep, out = _prepare(M.resnet(None))
    assert isinstance(prep, Prepared) and prep.defaults == {}
    assert [r.pass_name for r in prep.results] == [
        "ApplyInputShapesPass", "FoldConstantsPass", "FoldBatchNormPass", "InlineFunctionsPass",
        "NormalizeConstantsPass", "MinusOneReshapesPass", "DropSingleDimProductsPass", "InputDefaultsPass"]
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    _, unfolded = _prepare(M.resnet(None), fold=False)
    assert "BatchNormalization" in [n.op_type for n in unfolded.graph.node]


def test_prepare_training_model_keeps_custom_op_calls_and_splits_defaults():
    custom_ops.register_schemas()
    m = build_model(BatchNormConfig(virtual_batch_size=2), [None, 3], training=True)
    prep, out = _prepare(m)
    assert not out.functions
    assert [n.op_type for n in out.graph.node if n.domain == custom_ops.DOMAIN] == ["GhostBatchNormalization"]
    assert sorted(prep.defaults) == ["beta", "gamma", "moving_mean", "moving_variance"]
    assert not {t.name for t in out.graph.initializer} & set(prep.defaults)
    inline = next(r for r in prep.results if r.pass_name == "InlineFunctionsPass")
    assert inline.left[0].reason == "a bncompile custom op: the lowering implements it"


def test_prepare_bypasses_the_builders_single_dim_products():
    m = build_model(BatchNormConfig(axis=1), [None, 3, None], training=False)
    prep, out = _prepare(m)
    drop = next(r for r in prep.results if r.pass_name == "DropSingleDimProductsPass")
    assert [e.action for e in drop.entries] == ["bypassed", "bypassed"]
    assert "ReduceProd" not in [n.op_type for n in out.graph.node]
    onnx.checker.check_model(out, full_check=True)


def test_prepare_applies_input_shapes_and_refuses_bad_ones():
    prep, out = _prepare(M.mlp(None), input_shapes={"x": [5, 20]})
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 5
    with pytest.raises(InputError, match="no input named 'z'"):
        _prepare(M.mlp(None), input_shapes={"z": [1, 20]})


def test_prepare_inlines_foreign_functions_and_normalizes_their_constants():
    m = onnx.parser.parse_model(FOREIGN)
    prep, out = _prepare(m)
    assert not out.functions
    consts = [n for n in out.graph.node if n.op_type == "Constant"]
    assert consts and all(a.name == "value" for n in consts for a in n.attribute)
    x = {"x": np.ones((2, 3), np.float32)}
    np.testing.assert_allclose(ort_run(out, x)["y"], ort_run(m, x)["y"], rtol=1e-6)
