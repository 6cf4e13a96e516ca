"""`bncompile._proto_wire` and the loader/saver built on it: a model file split into its skeleton and
the places of its large initializers is the same model; the checker gives the same verdicts as on the
whole file; a tensor written from its buffer is the bytes protobuf writes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncompile import _proto_wire, onnx_utils
from bncompile.errors import InputError

BIG = _proto_wire.MAP_MIN_BYTES // 4 + 8          # float32 elements just over the threshold


def _conv_model(*, ir_version: int = 8, weight_name: str = "w", extra_inits=(), inputs_too=False):
    rng = np.random.default_rng(0)
    c = int(np.ceil(BIG / 9))                      # (c, 1, 3, 3) float32 over the threshold
    w = numpy_helper.from_array(rng.standard_normal((c, 1, 3, 3)).astype(np.float32), weight_name)
    w.doc_string = "the weight"
    w.metadata_props.add(key="k", value="v")
    b = numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")
    inits = [w, b, *extra_inits]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])]
    if inputs_too:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    nodes = [helper.make_node("Conv", ["x", weight_name, "b"], ["y"], name="conv", kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 3, 3])], inits)
    opset = 9 if ir_version < 4 else 15
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _many_types():
    rng = np.random.default_rng(1)
    n = _proto_wire.MAP_MIN_BYTES
    arrays = {"f16": rng.standard_normal(n).astype(np.float16),
              "f64": rng.standard_normal(n),
              "i64": rng.integers(-9, 9, n),
              "u8": rng.integers(0, 255, n).astype(np.uint8),
              "bool": rng.random(n) < 0.5,
              "small": np.arange(3, dtype=np.float32)}
    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items()]
    bf = helper.make_tensor("bf16", TensorProto.BFLOAT16, [n],
                            rng.standard_normal(n).astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(),
                            raw=True)
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [n], rng.standard_normal(n).tolist())
    return [*inits, bf, typed]


def _with_subgraph(model):
    """An If whose branches hold a large initializer of their own (never split: not the main graph)."""
    rng = np.random.default_rng(2)
    sub_w = numpy_helper.from_array(rng.standard_normal(BIG).astype(np.float32), "sub_w")
    branch = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["z"])], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [BIG])], [sub_w])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [BIG]))
    return model


def _restore(skeleton: bytes, mapped, path) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(skeleton)
    data = path.read_bytes()
    for t in proto.graph.initializer:
        if t.name in mapped:
            offset, length = mapped[t.name][:2]
            assert t.raw_data == b""
            t.raw_data = data[offset:offset + length]
    return proto


@pytest.mark.parametrize("write", ["onnx.save", "streaming"])
def test_skeleton_plus_mapped_bytes_is_the_file(tmp_path, write):
    model = _with_subgraph(_conv_model(extra_inits=_many_types()))
    p = tmp_path / "m.onnx"
    if write == "onnx.save":
        onnx.save(model, p)
    else:                                          # one `graph` field per initializer, merged on parse
        onnx_utils.write_model_streaming(ir.serde.deserialize_model(model), p)
    skeleton, mapped = _proto_wire.split_model(p)
    assert set(mapped) == {"w", "f16", "f64", "i64", "u8", "bool", "bf16"}   # not small, typed, sub_w
    assert len(skeleton) < p.stat().st_size / 4
    assert _restore(skeleton, mapped, p) == onnx.load(p)


def test_unusual_files_are_left_to_the_plain_parser(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_conv_model(), p)
    data = p.read_bytes()
    for name, content in (("empty", b""), ("truncated", data[:len(data) // 2]), ("text", b"hello world\n"),
                          ("group", bytes([0x0B, 0x0C]) + data)):
        q = tmp_path / f"{name}.onnx"
        q.write_bytes(content)
        assert _proto_wire.split_model(q) is None, name
    twice = _conv_model()
    twice.graph.initializer.append(twice.graph.initializer[0])   # two initializers named "w"
    onnx.save(twice, p)
    assert _proto_wire.split_model(p) is None


@pytest.mark.parametrize("change", ["longer", "shorter", "external", "float_data too", "undefined type"])
def test_tensors_whose_data_the_checker_judges_are_not_split(tmp_path, change):
    model = _conv_model()
    w = model.graph.initializer[0]
    if change == "longer":
        w.raw_data = w.raw_data + b"\0" * 4
    elif change == "shorter":
        w.raw_data = w.raw_data[:-4]
    elif change == "external":
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value="m.data")
    elif change == "float_data too":
        w.float_data.append(1.0)
    else:
        w.data_type = TensorProto.UNDEFINED
    p = tmp_path / "m.onnx"
    p.write_bytes(model.SerializeToString())
    split = _proto_wire.split_model(p)
    assert split is None or "w" not in split[1]


def _verdict(fn):
    try:
        fn()
    except InputError as err:
        return str(err)
    return "ok"


def _broken(kind: str) -> onnx.ModelProto:
    if kind == "valid":
        return _conv_model()
    if kind == "ir3, initializers are inputs":
        return _conv_model(ir_version=3, inputs_too=True)
    if kind == "overridable (in the inputs)":
        return _conv_model(inputs_too=True)
    model = _conv_model()
    if kind == "weight of the wrong shape":
        w = model.graph.initializer[0]
        w.dims[:] = [w.dims[0] * 9, 1, 1, 1]        # shape inference: not the declared output
    elif kind == "weight named like a node output":
        model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["w"]))
    elif kind == "weight of the wrong type":
        w = model.graph.initializer[0]
        w.data_type = TensorProto.INT32
    elif kind == "ir3, initializer not an input":
        model.ir_version = 3
        model.opset_import[0].version = 9
    elif kind == "truncated weight":
        w = model.graph.initializer[0]
        w.raw_data = w.raw_data[:-4]
    return model


@pytest.mark.parametrize("kind", ["valid", "ir3, initializers are inputs", "overridable (in the inputs)",
                                  "weight of the wrong shape", "weight named like a node output",
                                  "weight of the wrong type", "ir3, initializer not an input",
                                  "truncated weight"])
def test_the_checker_says_the_same_with_the_weights_left_in_the_file(tmp_path, kind):
    p = tmp_path / "m.onnx"
    onnx.save(_broken(kind), p)
    split = _proto_wire.split_model(p)
    fast = _verdict(lambda: onnx_utils.load_model_ir(p))
    whole = _verdict(lambda: onnx_utils._load_model_ir_whole(p, check=True, detach=True))
    assert fast == whole
    assert (fast == "ok") == kind.startswith(("valid", "ir3, initializers are", "overridable"))
    if kind != "truncated weight":
        assert split is not None and "w" in split[1]        # the fast path was taken


@pytest.mark.parametrize("maps", ["one per tensor", "one shared"])
def test_loaded_tensors_are_the_same_and_mapped(tmp_path, monkeypatch, maps):
    if maps == "one shared":
        monkeypatch.setattr(_proto_wire, "MAX_MAPS", 2)
    model = _with_subgraph(_conv_model(extra_inits=_many_types()))
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    fast = onnx_utils.load_model_ir(p)
    whole = onnx_utils._load_model_ir_whole(p, check=True, detach=True)
    for g_fast, g_whole in zip(fast.graphs(), whole.graphs()):
        assert list(g_fast.initializers) == list(g_whole.initializers)
        for name, v in g_whole.initializers.items():
            a, b = v.const_value, g_fast.initializers[name].const_value
            assert (type(a), a.dtype, a.name, a.doc_string, dict(a.metadata_props)) == \
                (type(b), b.dtype, b.name, b.doc_string, dict(b.metadata_props)), name
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    w = fast.graph.initializers["w"].const_value.numpy()
    assert not w.flags.writeable and w.base is not None           # a view of the file, not a copy
    assert fast.meta[onnx_utils.HAD_EXTERNAL_DATA] is False


def _protobuf_chunk(value) -> bytes:
    chunk = onnx.ModelProto()
    chunk.graph.initializer.append(ir.serde.serialize_tensor(value.const_value))
    chunk.graph.initializer[0].name = value.name
    return chunk.SerializeToString()


def test_a_chunk_written_from_its_buffer_is_what_protobuf_writes(tmp_path):
    arrays = [np.float32(2.5), np.zeros((0, 3), np.float32), np.arange(300, dtype=np.float32).reshape(3, 100),
              np.arange(70000, dtype=np.float16), np.arange(5, dtype=np.int64), np.array([True, False]),
              np.arange(4, dtype=np.uint8), np.arange(3, dtype=np.float64),
              np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)]
    for i, a in enumerate(arrays):
        t = ir.Tensor(np.asarray(a), name=f"t{i}", doc_string="d" if i % 2 else None,
                      metadata_props={"b": "2", "a": "1"} if i % 3 == 0 else None)
        value = ir.Value(name=f"v{i}", const_value=t)
        raw = onnx_utils._plain_bytes(t)
        assert raw is not None, a.dtype
        head, tail = onnx_utils.tensor_chunk_frame(value, raw.nbytes)
        assert head + bytes(raw) + tail == _protobuf_chunk(value), a.dtype


def test_streaming_write_is_byte_identical_to_chunks_serialized_by_protobuf(tmp_path):
    model = ir.serde.deserialize_model(_with_subgraph(_conv_model(extra_inits=_many_types())))
    onnx_utils.detach_tensors(model)
    model.graph.initializers["u8"].const_value = ir.Tensor(np.arange(8, dtype=np.uint8)[::2], name="u8")
    p = tmp_path / "s.onnx"
    onnx_utils.write_model_streaming(model, p)
    expected = p.read_bytes()
    graph = model.graph
    inits = list(graph.initializers.values())
    chunks = b"".join(_protobuf_chunk(v) for v in inits)    # u8: not contiguous, protobuf's way
    assert expected.endswith(chunks)


def _outcome(load):
    try:
        m = load()
    except InputError as err:
        return str(err)
    return {n: (v.const_value.dtype, v.const_value.numpy().tobytes()) for n, v in m.graph.initializers.items()}


def test_damaged_files_get_the_same_verdict_as_from_the_plain_parser(tmp_path):
    import random

    base = _with_subgraph(_conv_model(extra_inits=_many_types())).SerializeToString()
    rng = random.Random(0)
    p = tmp_path / "m.onnx"
    verdicts = set()
    for _ in range(80):
        data = bytearray(base)
        kind = rng.choice(["flip", "truncate", "insert", "delete"])
        pos = rng.randrange(3000) if rng.random() < 0.7 else rng.randrange(len(data))   # mostly headers
        if kind == "flip":
            data[pos] = rng.randrange(256)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = bytes([rng.randrange(256)])
        else:
            del data[pos:pos + 2]
        p.write_bytes(bytes(data))
        fast = _outcome(lambda: onnx_utils.load_model_ir(p))
        assert fast == _outcome(lambda: onnx_utils._load_model_ir_whole(p, check=True, detach=True)), (kind, pos)
        verdicts.add(isinstance(fast, str))
    assert verdicts == {True, False}
