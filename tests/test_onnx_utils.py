"""`bncompile.onnx_utils`: the one loader (external data never from outside the model's folder), the
one saver of protos, and the one random-feed generator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bncompile import onnx_utils
from bncompile.errors import InputError


def _model(*, with_weight: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
              helper.make_tensor_value_info("i", TensorProto.INT64, [2]),
              helper.make_tensor_value_info("b", TensorProto.BOOL, [2]),
              helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2])]
    inits = []
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n in ("x", "i", "b", "h")]
    outputs = [helper.make_tensor_value_info(n + "_out", t, shape)
               for n, t, shape in (("x", TensorProto.FLOAT, ["N", 3]), ("i", TensorProto.INT64, [2]),
                                   ("b", TensorProto.BOOL, [2]), ("h", TensorProto.FLOAT16, [2]))]
    if with_weight:
        inits.append(onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "w"))
        nodes.append(helper.make_node("Add", ["x", "w"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_one_generator_for_sessions_and_models():
    model = _model()
    sess = onnx_utils.make_session(model)
    by_session = onnx_utils.random_feeds(sess, seed=7, input_shapes={"x": (2, 3)})
    by_model = onnx_utils.model_feeds(model, {"x": (2, 3), "i": (2,), "b": (2,), "h": (2,)}, seed=7)
    assert list(by_session) == list(by_model) == ["x", "i", "b", "h"]
    for k in by_session:
        assert by_session[k].dtype == by_model[k].dtype
        np.testing.assert_array_equal(by_session[k], by_model[k])
    assert by_model["i"].dtype == np.int64 and by_model["b"].dtype == bool and by_model["h"].dtype == np.float16


def test_feeds_refuse_a_type_without_values():
    with pytest.raises(InputError, match="cannot draw random values"):
        onnx_utils.draw_feeds([("s", (2,), "string")])


def _save_external(model, folder, location):
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def test_as_model_proto_loads_external_data_beside_the_model(tmp_path):
    _save_external(_model(with_weight=True), tmp_path, "m.data")
    proto = onnx_utils.as_model_proto(tmp_path / "m.onnx")
    assert onnx_utils.external_data_locations(proto) == []      # loaded
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.graph.initializer[0]), [0, 1, 2])


def test_as_model_proto_never_follows_external_data_out_of_the_folder(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    _save_external(_model(with_weight=True), tmp_path, "m.data")   # m.data outside inner/
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.data"
    onnx.save(proto, inner / "m.onnx")
    with pytest.raises(InputError, match="leaves the model's folder"):
        onnx_utils.as_model_proto(inner / "m.onnx")
    with pytest.raises(InputError, match="pass the model's path instead"):
        onnx_utils.as_model_proto(proto)


def test_as_model_proto_checks_copies_and_refuses_other_types():
    model = _model()
    assert onnx_utils.as_model_proto(model) is model
    twin = onnx_utils.as_model_proto(model, copy=True)
    assert twin is not model and twin == model
    bad = _model()
    bad.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InputError, match="fails the ONNX checker"):
        onnx_utils.as_model_proto(bad)
    with pytest.raises(InputError, match="expected a path or an onnx.ModelProto"):
        onnx_utils.as_model_proto(42)


def test_save_model_proto_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    onnx_utils.save_model_proto(_model(), out)
    assert onnx.load(out) == _model()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(onnx, "save", boom)
    with pytest.raises(OSError):
        onnx_utils.save_model_proto(_model(), tmp_path / "other.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_tensor_data_shorter_than_its_shape_is_refused_before_anything_reads_it():
    """A 2^31-element initializer holding 8 bytes made compile allocate for the declared size (the
    machine ran out of memory); every loader now compares the stored length with the shape first."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bncompile import onnx_utils
    from bncompile.errors import InputError

    def model(t):
        g = helper.make_graph([helper.make_node("Identity", [t.name], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", t.data_type, None)], [t])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])

    good = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    onnx_utils.check_tensor_data(model(good))
    typed = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [1.0] * 6)
    onnx_utils.check_tensor_data(model(typed))
    short = onnx.TensorProto()
    short.CopyFrom(good)
    short.dims[:] = [2**31]
    with pytest.raises(InputError, match="holds 24 bytes where its shape needs 8589934592"):
        onnx_utils.check_tensor_data(model(short))
    few = onnx.TensorProto()
    few.CopyFrom(typed)
    del few.float_data[-1]
    with pytest.raises(InputError, match="holds 5 values"):
        onnx_utils.as_model_proto(model(few), check=False)
    if hasattr(TensorProto, "INT4"):
        packed = helper.make_tensor("w", TensorProto.INT4, [3], [1, 2, 3])
        onnx_utils.check_tensor_data(model(packed))
