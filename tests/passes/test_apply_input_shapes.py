"""ApplyInputShapesPass run directly: shapes given by name, free dims kept, bad shapes refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bncompile.errors import InputError
from bncompile.passes.apply_input_shapes import ApplyInputShapesPass
from helpers import compile_models as M
from helpers import ort_run
from helpers.fold_graphs import run_pass


def _dims(model, name="x"):
    vi = next(i for i in model.graph.input if i.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_fixes_the_batch_and_drops_stale_value_info():
    m = onnx.shape_inference.infer_shapes(M.mlp(None))
    assert m.graph.value_info
    out, r = run_pass(ApplyInputShapesPass({"x": [5, 20]}), m)
    assert _dims(out) == [5, 20] and not out.graph.value_info
    assert [(e.op, e.name, e.action, e.detail) for e in r.entries] == [("input", "x", "shaped", {"shape": [5, 20]})]
    x = {"x": M.input_for(m, 5)}
    np.testing.assert_array_equal(ort_run(out, x)["y"], ort_run(m, x)["y"])


@pytest.mark.parametrize("given,want", [([None, 20], ["N", 20]), (["?", 20], ["N", 20]), ([-1, 20], ["N", 20]),
                                        (["B", 20], ["B", 20])])
def test_free_dims_keep_or_take_a_name(given, want):
    out, _ = run_pass(ApplyInputShapesPass({"x": given}), M.mlp(None))
    assert _dims(out) == want


def test_a_free_dim_without_a_name_is_named_after_the_input():
    m = M.mlp(None)
    m.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    out, _ = run_pass(ApplyInputShapesPass({"x": [None, 20]}), m)
    assert _dims(out) == ["x_d0", 20]


@pytest.mark.parametrize("shapes,why", [
    ({"z": [1, 20]}, "no input named 'z'"),
    ({"x": [1, 2, 3]}, "has rank 2"),
    ({"x": [0, 20]}, "must be positive"),
    ({"x": [2, 21]}, "is 20 in the model, cannot set it to 21"),
])
def test_refuses_shapes_that_do_not_fit(shapes, why):
    with pytest.raises(InputError, match=why):
        run_pass(ApplyInputShapesPass(shapes), M.mlp(None))


def test_no_shapes_changes_nothing():
    m = onnx.shape_inference.infer_shapes(M.mlp(None))
    out, r = run_pass(ApplyInputShapesPass(None), m)
    assert not r.modified and r.entries == [] and len(out.graph.value_info) == len(m.graph.value_info)
