"""Shape programs feeding a Reshape (ShuffleNet's channel shuffle as exporters write it) compile without
folding, with a static and a free batch: :mod:`bncompile.lower.shape_values` against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from helpers import ort_run, rel_err

from bncompile.lower.shape_values import fold_shape_values


def _i(name, v):
    return numpy_helper.from_array(np.array(v, dtype=np.int64), name)


def shuffle_model(form: str, dims=("N", 8, 5, 5)) -> onnx.ModelProto:
    """Relu -> channel shuffle (groups 2) -> Sigmoid, the shuffle's Reshape targets computed by ``form``:
    ``gather`` (Shape/Gather/Div/Unsqueeze/Concat), ``floordiv`` (torch's integer floor division:
    Div/Mul/Sub/Less/Xor/Equal/Not/And/Where), ``float`` (Cast/Div/Floor/Cast), ``slice`` (Shape/Slice)."""
    C = dims[1]
    nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Shape", ["t"], ["shp"])]
    inits = [_i("two", 2), _i("ax0", [0]), _i("two1", [2]), _i("zero", 0), _i("one", 1)]
    for i, nm in enumerate("bchw"):
        inits.append(_i(f"i{i}", i))
        nodes.append(helper.make_node("Gather", ["shp", f"i{i}"], [f"g{nm}"], axis=0))
    if form == "gather":
        nodes.append(helper.make_node("Div", ["gc", "two"], ["cpg"]))
    elif form == "floordiv":
        nodes += [helper.make_node("Div", ["gc", "two"], ["d"]),
                  helper.make_node("Less", ["gc", "zero"], ["l1"]), helper.make_node("Less", ["two", "zero"], ["l2"]),
                  helper.make_node("Xor", ["l1", "l2"], ["neg"]), helper.make_node("Mul", ["d", "two"], ["dm"]),
                  helper.make_node("Sub", ["gc", "dm"], ["mod"]), helper.make_node("Equal", ["mod", "zero"], ["eq"]),
                  helper.make_node("Not", ["eq"], ["ne"]), helper.make_node("And", ["neg", "ne"], ["mask"]),
                  helper.make_node("Sub", ["d", "one"], ["fix"]),
                  helper.make_node("Where", ["mask", "fix", "d"], ["cpg"])]
    elif form == "float":
        nodes += [helper.make_node("Cast", ["gc"], ["gcf"], to=TP.FLOAT),
                  helper.make_node("Cast", ["two"], ["twof"], to=TP.FLOAT),
                  helper.make_node("Div", ["gcf", "twof"], ["df"]), helper.make_node("Floor", ["df"], ["ff"]),
                  helper.make_node("Cast", ["ff"], ["cpg"], to=TP.INT64)]
    if form == "slice":
        inits += [_i("s0", [0]), _i("s1", [1]), _i("s2", [2]), _i("s4", [4]), _i("g", [2, C // 2]), _i("c", [C])]
        nodes += [helper.make_node("Slice", ["shp", "s0", "s1"], ["gb_u"]),
                  helper.make_node("Slice", ["shp", "s2", "s4"], ["hw"]),
                  helper.make_node("Concat", ["gb_u", "g", "hw"], ["s1t"], axis=0),
                  helper.make_node("Concat", ["gb_u", "c", "hw"], ["s2t"], axis=0)]
    else:
        for nm in ["gb", "gc", "gh", "gw", "cpg"]:
            nodes.append(helper.make_node("Unsqueeze", [nm, "ax0"], [nm + "_u"]))
        nodes += [helper.make_node("Concat", ["gb_u", "two1", "cpg_u", "gh_u", "gw_u"], ["s1t"], axis=0),
                  helper.make_node("Concat", ["gb_u", "gc_u", "gh_u", "gw_u"], ["s2t"], axis=0)]
    nodes += [helper.make_node("Reshape", ["t", "s1t"], ["r1"]),
              helper.make_node("Transpose", ["r1"], ["tr"], perm=[0, 2, 1, 3, 4]),
              helper.make_node("Reshape", ["tr", "s2t"], ["r2"]),
              helper.make_node("Sigmoid", ["r2"], ["y"])]
    g = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TP.FLOAT, list(dims))],
                          [helper.make_tensor_value_info("y", TP.FLOAT, list(dims))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _reshape_targets(m):
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [consts.get(n.input[1]) for n in m.graph.node if n.op_type == "Reshape"]


@pytest.mark.parametrize("form", ["gather", "floordiv", "float", "slice"])
def test_static_shape_programs_become_constants(form):
    m = shuffle_model(form, (2, 8, 5, 5))
    fold_shape_values(m)
    onnx.checker.check_model(m, full_check=True)
    assert [t.tolist() for t in _reshape_targets(m)] == [[2, 2, 4, 5, 5], [2, 8, 5, 5]]
    assert {n.op_type for n in m.graph.node} == {"Relu", "Reshape", "Transpose", "Sigmoid"}
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    assert rel_err(ort_run(m, {"x": x})["y"], ort_run(shuffle_model(form, (2, 8, 5, 5)), {"x": x})["y"]) == 0


@pytest.mark.parametrize("form", ["gather", "floordiv", "float", "slice"])
def test_free_batch_becomes_copy_dim(form):
    """The batch entry is the same symbol as the data's dim 0: 0 (copy), the rest constants."""
    m = shuffle_model(form, ("N", 8, 5, 5))
    fold_shape_values(m)
    onnx.checker.check_model(m, full_check=True)
    assert [t.tolist() for t in _reshape_targets(m)] == [[0, 2, 4, 5, 5], [0, 8, 5, 5]]


def test_one_unknown_entry_becomes_minus_one():
    """Flatten written as Reshape(x, [Shape(x)[0] * 1 + 0 ... ]) with a non-trivial product: -1."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Mul", ["b", "three"], ["b3"]), helper.make_node("Unsqueeze", ["b3", "ax0"], ["bu"]),
             helper.make_node("Concat", ["bu", "rest"], ["t"], axis=0), helper.make_node("Reshape", ["x", "t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)],
                          [_i("i0", 0), _i("three", 3), _i("ax0", [0]), _i("rest", [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    assert fold_shape_values(m)["reshapes"] == 1
    assert [t.tolist() for t in _reshape_targets(m)] == [[-1, 4]]


def test_two_unknown_entries_are_left_alone():
    """Free H and W moved to other positions: two entries cannot both be -1; the program stays (its
    constant part, C/2, is still evaluated)."""
    m = shuffle_model("gather", ("N", 8, "H", "W"))
    fold_shape_values(m)
    onnx.checker.check_model(m, full_check=True)
    assert _reshape_targets(m)[0] is None
    assert "Div" not in {n.op_type for n in m.graph.node}
    assert "Shape" in {n.op_type for n in m.graph.node}


def test_allowzero_reshape_is_left_alone():
    m = shuffle_model("gather", ("N", 8, 5, 5))
    for n in m.graph.node:
        if n.op_type == "Reshape":
            n.attribute.append(helper.make_attribute("allowzero", 1))
    m.opset_import[0].version = 15
    fold_shape_values(m)
    assert _reshape_targets(m) == [None, None]


@pytest.mark.tvm
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("form", ["gather", "floordiv", "float", "slice"])
@pytest.mark.parametrize("dims", [(2, 8, 5, 5), ("N", 8, 5, 5), ("N", 6, "H", "W")], ids=["static", "N", "NHW"])
def test_shuffle_compiles_and_matches_onnxruntime(compiler, form, fold, dims):
    m = shuffle_model(form, dims)
    cm = compiler.compile(m, fold=fold)
    for shape in ((2, dims[1], 5, 5),) + (((3, dims[1], 4, 6),) if dims[2] == "H" else ((1, dims[1], 5, 5),)
                                          if dims[0] == "N" else ()):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        assert rel_err(cm.run({"x": x})["y"], ort_run(m, {"x": x})["y"]) < 1e-6


def test_input_with_default_is_not_a_constant():
    """An initializer that is also a graph input can be fed another value: not evaluated."""
    nodes = [helper.make_node("Mul", ["m", "k"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("m", TP.INT64, [2])],
                          [helper.make_tensor_value_info("y", TP.INT64, [2])], [_i("m", [1, 2]), _i("k", [3, 3])])
    nodes2 = [helper.make_node("Mul", ["m", "k"], ["z"]), helper.make_node("Identity", ["z"], ["y"])]
    g2 = helper.make_graph(nodes2, "g", [helper.make_tensor_value_info("m", TP.INT64, [2])],
                           [helper.make_tensor_value_info("y", TP.INT64, [2])], [_i("m", [1, 2]), _i("k", [3, 3])])
    for graph in (g, g2):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        assert fold_shape_values(m)["constants"] == 0
        assert "Mul" in {n.op_type for n in m.graph.node}
