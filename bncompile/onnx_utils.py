"""ONNX helpers shared by the commands: the one home of model loading and saving, the
``--input-shape`` grammar, onnxruntime sessions and random feeds.

* :func:`load_model_ir` / :func:`load_model_proto` read a model file after checking it
  (exists, is ONNX, passes ``onnx.checker.check_model(full_check=True)``, external data stays inside
  the model's folder). onnx-ir reads external data lazily (memory mapped); :func:`load_model_ir`
  memory-maps a file's large inline initializers too, parsing and checking the rest
  (:mod:`bncompile._proto_wire`). :func:`as_model_proto`
  takes a path or an in-memory ``ModelProto`` (the API's "model or path" arguments);
  :func:`model_from_proto` turns a checked proto into onnx-ir.
  :func:`detach_tensors` copies proto-backed tensors out so the parsed proto can be freed.
* :func:`save_model_ir` writes a model atomically; it writes external data beside the output
  (``<output>.data``) when the input had external data or the model would exceed protobuf's 2 GB,
  else one self-contained file streamed one tensor at a time, each written from its own buffer
  (:func:`write_model_streaming`).
  The output never points back at the input's data file. :func:`serialize_model` gives the
  ``ModelProto`` without the redundant initializer value_info onnx-ir adds.
* :func:`save_model_proto` writes a ``ModelProto`` atomically.
* :func:`parse_input_shapes` / :func:`parse_shape`: the ``--input-shape`` grammar
  (:mod:`bncompile.shapes`).
* :func:`make_session` builds an onnxruntime session with **all** graph optimizations off (the
  default level fuses Conv+BatchNormalization itself and would hide a bug).
* :func:`draw_feeds` draws seeded random inputs; :func:`random_feeds` for a session's inputs,
  :func:`model_feeds` for a model's inputs at given shapes.
* :func:`compare_outputs` measures max abs / relative error between two runs.
* :func:`model_to_float32` converts a float16/bfloat16 model to a float32 twin (the accuracy reference).

Library code: logs, never prints.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from bncompile import _proto_wire
from bncompile._io import atomic_output, atomic_output_dir, check_input_file
from bncompile.errors import InputError
from bncompile.shapes import parse_input_shapes, parse_shape  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: Serialized protos above this size are written with external data (protobuf's limit is 2 GiB).
PROTO_LIMIT_BYTES = 2**31 - 2**26

#: ``model.meta`` key set by :func:`load_model_ir`: the file had external data.
HAD_EXTERNAL_DATA = "bncompile.had_external_data"

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                "tensor(float16)": np.float16}


# --------------------------------------------------------------------------- loading

def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph``, then each of its subgraphs (attributes of its nodes), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_graphs(attr.g)
            for g in attr.graphs:
                yield from _iter_graphs(g)


def _iter_tensor_protos(graph: onnx.GraphProto, skip=()) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs (initializers and tensor attributes), less
    the initializers of ``graph`` itself named in ``skip``."""
    for g in _iter_graphs(graph):
        yield from (t for t in g.initializer if t.name not in skip) if g is graph and skip else g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of ``model`` stored as external data (main graph, subgraphs, functions)."""
    tensors = list(_iter_tensor_protos(model.graph))
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The ``location`` of every external tensor of ``model`` (main graph, subgraphs, functions)."""
    return [{e.key: e.value for e in t.external_data}.get("location", "") for t in _external_tensors(model)]


def _declared_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor's dims and type need, None for types without a fixed item size."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in (onnx.TensorProto.STRING,):
        return None
    count = 1
    for d in t.dims:
        count *= int(d)
    return count * itemsize


def check_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike) -> list[Path]:
    """Refuse external data that leaves the model's folder (absolute path, ``..``), is missing, or is
    shorter than a tensor's offset + length (or than its dims need); returns the data files."""
    base = Path(base_dir).resolve()
    files: dict[str, Path] = {}
    for t in _external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if loc not in files:
            if not loc or os.path.isabs(loc) or Path(loc).is_absolute() or loc.startswith(("\\", "/")):
                raise InputError(f"external data location {loc!r} is absolute or empty: it must be a "
                                 f"file name relative to the model's folder {str(base)!r}")
            target = (base / loc).resolve()
            if ".." in Path(loc).parts or not target.is_relative_to(base):
                raise InputError(f"external data location {loc!r} leaves the model's folder "
                                 f"{str(base)!r}: move the data file beside the model")
            if not target.is_file():
                raise InputError(f"external data file {str(target)!r} (location {loc!r}) does not "
                                 "exist: keep the data file beside the model")
            files[loc] = target
        target = files[loc]
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise InputError(f"tensor {t.name!r}: external data offset/length {info.get('offset')!r}/"
                             f"{info.get('length')!r} are not integers: re-save the model") from None
        need = _declared_bytes(t)
        if offset < 0 or (length is not None and length < 0):
            raise InputError(f"tensor {t.name!r}: negative external data offset or length: re-save the model")
        if length is not None and need is not None and length < need:
            raise InputError(f"tensor {t.name!r} of shape {list(t.dims)} needs {need} bytes but its external "
                             f"data length is {length}: the model is damaged; re-save it")
        end = offset + (length if length is not None else (need or 0))
        size = target.stat().st_size
        if end > size:
            raise InputError(f"external data file {str(target)!r} holds {size} bytes but tensor {t.name!r} "
                             f"needs bytes {offset}..{end}: the file is truncated; copy it again "
                             "with the model")
    return sorted(set(files.values()))


def model_files(path) -> list[Path]:
    """A model file and every external data file it uses (checked: inside its folder, present, long
    enough): what a command reads when it reads the model."""
    p = check_input_file(path)
    return [p, *check_external_data(_parse_model(p), p.parent)]


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def check_tensor_data(model: onnx.ModelProto, *, what: str = "model", mapped=()) -> None:
    """Refuse a tensor stored in the model whose data is shorter than its dims and type need (a
    corrupt or truncated tensor would otherwise be read past its end, or make a consumer allocate for
    the declared size). Cheap: compares lengths only. External tensors are checked by
    :func:`check_external_data`; the main-graph initializers named in ``mapped`` (left in the file
    by :func:`bncompile._proto_wire.split_model`, which checked their length) are skipped."""
    tensors = list(_iter_tensor_protos(model.graph, skip=mapped))
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        count = 1
        for d in t.dims:
            if d < 0:
                raise InputError(f"{what}: tensor {t.name!r} has a negative dimension {list(t.dims)}: "
                                 "the model is corrupt; re-export it")
            count *= int(d)
        if t.HasField("raw_data"):
            need = (count + 1) // 2 if t.data_type in _PACKED_4BIT else _declared_bytes(t)
            have = len(t.raw_data)
        else:
            have = (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
                    + len(t.uint64_data))
            need = (count + 1) // 2 if t.data_type in _PACKED_4BIT and t.int32_data else count
            if t.data_type in _COMPLEX:
                need *= 2
            if have == 0 and count == 0:
                continue
        if need is not None and have < need:
            raise InputError(f"{what}: tensor {t.name!r} of shape {list(t.dims)} holds {have} "
                             f"{'bytes' if t.HasField('raw_data') else 'values'} where its shape needs {need}: "
                             "the model is truncated or corrupt; re-export it")


def _parse_model(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError, ValueError, ...: not an ONNX file
        raise InputError(f"{str(path)!r} is not a readable ONNX model ({type(err).__name__}): "
                         "check that the file is complete and is an .onnx file") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise InputError(f"{str(path)!r} is not an ONNX model (no graph or IR version): "
                         "check that the file is complete and is an .onnx file")
    check_tensor_data(proto, what=f"model {str(path)!r}")
    return proto


def check_model(model: onnx.ModelProto | bytes | str | os.PathLike, *, what: str = "model") -> None:
    """Run ``onnx.checker.check_model(full_check=True)`` on a proto, its serialized bytes or a path;
    raise InputError with its first line."""
    try:
        onnx.checker.check_model(model if isinstance(model, (onnx.ModelProto, bytes)) else str(model),
                                 full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what} fails the ONNX checker: {first}") from None


def load_model_proto(path, *, check: bool = True, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and check a model file as an ``onnx.ModelProto`` (external data loaded unless told)."""
    p = check_input_file(path)
    proto = _parse_model(p)
    check_external_data(proto, p.parent)
    if check:
        check_model(p, what=f"model {str(p)!r}")
    if load_external_data and external_data_locations(proto):
        onnx.load_external_data_for_model(proto, str(p.parent))
    return proto


def load_model_ir(path, *, check: bool = True, detach: bool = True):
    """Load and check a model file as an ``onnx_ir.Model``; external data is read lazily.

    Raises InputError for a missing file, a directory, a non-ONNX or truncated file, a model that
    fails the full checker, or external data outside the model's folder.

    The file is parsed once, and its large inline initializers are not copied: they are memory
    mapped from the file and read when used (:mod:`bncompile._proto_wire`), and the checker sees
    them as graph inputs of their type and shape (:func:`_checker_bytes`). Files that path does
    not take (anything unusual) are parsed whole; ``detach`` then copies their tensors out of the
    parsed proto so that it can be freed (:func:`detach_tensors`).
    """
    import onnx_ir as ir

    p = check_input_file(path)
    split = _proto_wire.split_model(p)
    if split is None:
        return _load_model_ir_whole(p, check=check, detach=detach)
    skeleton, mapped = split
    try:
        proto = onnx.ModelProto.FromString(skeleton)
    except Exception:  # DecodeError: the plain path words the message
        return _load_model_ir_whole(p, check=check, detach=detach)
    if not proto.HasField("graph") or proto.ir_version == 0:
        return _load_model_ir_whole(p, check=check, detach=detach)
    check_tensor_data(proto, what=f"model {str(p)!r}", mapped=mapped)
    check_external_data(proto, p.parent)
    had_external = bool(external_data_locations(proto))
    if check:
        # external data: the checker resolves its files against the model's folder
        check_model(p if had_external else _checker_bytes(skeleton, mapped, p),
                    what=f"model {str(p)!r}")
    try:
        arrays = _proto_wire.map_tensors(p, mapped)
    except (OSError, ValueError):   # a file system without memory maps
        return _load_model_ir_whole(p, check=check, detach=detach)
    model = ir.serde.deserialize_model(proto)
    inits = model.graph.initializers
    for name, array in arrays.items():
        t = inits[name].const_value
        inits[name].const_value = ir.Tensor(array, dtype=t.dtype, name=t.name, doc_string=t.doc_string,
                                            metadata_props=dict(t.metadata_props))
    del arrays
    if detach:
        detach_tensors(model)
    del proto
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    model.meta[HAD_EXTERNAL_DATA] = had_external
    return model


def _checker_bytes(skeleton: bytes, mapped: dict, path: Path) -> bytes:
    """The model the full checker runs on when its large initializers were left in the file.

    In IR >= 4, each such initializer that is not also a graph input becomes a graph input of the
    same type and shape (an initializer need not be an input there). Shape inference sees the same types
    and shapes; it reads values only of small, shape-like inputs (under
    :data:`bncompile._proto_wire.MAP_MIN_BYTES`, kept as they are), and every check the checker
    makes of a tensor's data (one data field, a defined type, enough bytes) was made for these by
    :func:`bncompile._proto_wire.split_model`. One that is also a graph input (all of them in IR
    3, where the checker requires it) gets its bytes back from the file, so the checker sees it as
    it is."""
    if not mapped:
        return skeleton
    ck = onnx.ModelProto.FromString(skeleton)
    graph = ck.graph
    inputs = {vi.name for vi in graph.input}
    kept, moved = [], []
    with open(path, "rb") as f:
        for t in graph.initializer:
            if t.name not in mapped:
                kept.append(t)
            elif t.name in inputs or ck.ir_version < 4:
                offset, length = mapped[t.name][:2]
                t.raw_data = os.pread(f.fileno(), length, offset)
                kept.append(t)
            else:
                moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.input.extend(moved)
    return ck.SerializeToString()


def _load_model_ir_whole(p: Path, *, check: bool, detach: bool):
    """:func:`load_model_ir` for the files it does not split: the checker on the path, one parse."""
    import onnx_ir as ir

    if check:
        try:
            check_model(p, what=f"model {str(p)!r}")
        except InputError:
            proto = _parse_model(p)             # a clearer message for a file that is not ONNX
            check_external_data(proto, p.parent)
            raise
    proto = _parse_model(p)
    check_external_data(proto, p.parent)
    had_external = bool(external_data_locations(proto))
    model = ir.serde.deserialize_model(proto)
    if detach:
        detach_tensors(model)
    del proto
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    model.meta[HAD_EXTERNAL_DATA] = had_external
    return model


_DETACHABLE = None


def detach_tensors(model) -> None:
    """Replace the proto-backed tensors of an ``onnx_ir.Model`` (initializers and tensor attributes,
    all graphs) by NumPy-backed ones, so the parsed ``ModelProto`` can be freed. External tensors
    (memory-mapped) and types NumPy cannot hold plainly (strings, 4-bit, 2-bit) are kept as they are."""
    import onnx_ir as ir

    global _DETACHABLE
    if _DETACHABLE is None:
        D = ir.DataType
        _DETACHABLE = {D.FLOAT, D.DOUBLE, D.FLOAT16, D.BFLOAT16, D.INT8, D.INT16, D.INT32, D.INT64,
                       D.UINT8, D.UINT16, D.UINT32, D.UINT64, D.BOOL}

    def detach(t):
        if isinstance(t, ir.serde.TensorProtoTensor) and t.dtype in _DETACHABLE:
            new = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name, doc_string=t.doc_string,
                            metadata_props=dict(t.metadata_props))
            return new
        return t

    def visit_attrs(node):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR:
                new = detach(attr.value)
                if new is not attr.value:
                    node.attributes[name] = ir.AttrTensor(name, new, doc_string=attr.doc_string)
            elif attr.type == ir.AttributeType.TENSORS:
                vals = [detach(t) for t in attr.value]
                node.attributes[name] = ir.AttrTensors(name, vals, doc_string=attr.doc_string)

    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                value.const_value = detach(value.const_value)
        for node in graph:
            visit_attrs(node)
    for fn in model.functions.values():
        for node in fn:
            visit_attrs(node)


def model_from_proto(proto: onnx.ModelProto, *, check: bool = True, base_dir=None):
    """Check an in-memory ``ModelProto`` and convert it to an ``onnx_ir.Model``."""
    import onnx_ir as ir

    if not isinstance(proto, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto or a path, got {type(proto).__name__}")
    if base_dir is not None:
        check_external_data(proto, base_dir)
    elif external_data_locations(proto):
        raise InputError("the in-memory model refers to external data: pass the model's path instead")
    check_tensor_data(proto)
    if check:
        check_model(proto)
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def as_model_proto(model, *, check: bool = True, copy: bool = False, what: str = "model"
                   ) -> onnx.ModelProto:
    """A path or an in-memory ``onnx.ModelProto`` -> a checked ``ModelProto``.

    A path goes through :func:`load_model_proto` (external data loaded, never from outside the
    model's folder); a proto is checked (``check``) and copied (``copy``), and refused when it
    refers to external data (nothing to resolve it against: pass the path instead).
    """
    if isinstance(model, (str, os.PathLike)):
        return load_model_proto(model, check=check)
    if isinstance(model, onnx.ModelProto):
        if external_data_locations(model):
            raise InputError(f"the in-memory {what} refers to external data: pass the model's path instead")
        check_tensor_data(model, what=what)
        if check:
            check_model(model, what=what)
        if copy:
            twin = onnx.ModelProto()
            twin.CopyFrom(model)
            return twin
        return model
    raise InputError(f"{what}: expected a path or an onnx.ModelProto, got {type(model).__name__}")


# --------------------------------------------------------------------------- saving

def has_external_tensors(model) -> bool:
    """Whether an ``onnx_ir.Model`` has any tensor stored as external data."""
    import onnx_ir as ir

    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return True
    return False


def tensor_bytes(model) -> int:
    """Total bytes of an ``onnx_ir.Model``'s initializers (all graphs)."""
    return sum(int(v.const_value.nbytes) for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def needs_external_data(model) -> bool:
    """Whether the model must be saved with external data (too big for one proto, or it had some
    when loaded by :func:`load_model_ir`)."""
    return (bool(model.meta.get(HAD_EXTERNAL_DATA)) or has_external_tensors(model)
            or tensor_bytes(model) >= PROTO_LIMIT_BYTES)


def save_model_ir(model, path, *, external_data: bool | None = None) -> Path | None:
    """Write an ``onnx_ir.Model`` to ``path`` atomically; returns the data file written, if any.

    ``external_data=None`` decides automatically (:func:`needs_external_data`); the data goes to
    ``<path>.data`` beside the output, never to the input's data file.
    """
    import onnx_ir as ir

    out = Path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    data_name = out.name + ".data" if external_data else None
    if data_name:   # two files: through a hidden folder beside the output (the data moves first)
        with atomic_output_dir(out) as tmp:
            ir.save(model, tmp / out.name, external_data=data_name, size_threshold_bytes=1024)
    else:
        with atomic_output(out) as tmp:
            write_model_streaming(model, tmp)
    return out.parent / data_name if data_name else None


def save_model_proto(model: onnx.ModelProto, path) -> Path:
    """Write a ``ModelProto`` (self-contained) to ``path`` atomically."""
    out = Path(path)
    with atomic_output(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def _drop_initializer_value_info(graph: onnx.GraphProto, names=None) -> None:
    """Remove value_info entries that only repeat an initializer's type (onnx-ir adds them)."""
    for g in _iter_graphs(graph):
        drop = set(names or ()) if g is graph else set()
        drop |= {t.name for t in g.initializer}
        if any(vi.name in drop for vi in g.value_info):
            kept = [vi for vi in g.value_info if vi.name not in drop]
            del g.value_info[:]
            g.value_info.extend(kept)


def serialize_model(model) -> onnx.ModelProto:
    """``onnx_ir.serde.serialize_model`` without the value_info entries it adds for initializers."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    _drop_initializer_value_info(proto.graph)
    return proto


def tensor_chunk_frame(value, nbytes: int) -> tuple[bytes, bytes]:
    """The protobuf bytes before and after a value's ``nbytes`` of raw data, so that head + data + tail
    is the TensorProto onnx-ir would serialize (the fields ``ir.serde.serialize_tensor_into`` writes; the
    name is the value's)."""
    t = value.const_value
    before, after = onnx.TensorProto(), onnx.TensorProto()
    before.dims.extend(t.shape.numpy())
    before.data_type = t.dtype.value
    before.name = value.name
    if t.doc_string:
        after.doc_string = t.doc_string
    for key in sorted(t.metadata_props):
        after.metadata_props.add(key=key, value=t.metadata_props[key])
    return _proto_wire.tensor_chunk_head(before, nbytes, after)


def write_model_streaming(model, path) -> None:
    """Write an ``onnx_ir.Model`` as one self-contained ``.onnx`` file, one initializer at a time.

    The model without its main-graph initializers is serialized first; then each initializer is
    appended as its own ``ModelProto{graph{initializer}}`` chunk. Protobuf parsers merge repeated
    occurrences of an embedded message field (``graph``) and append repeated fields
    (``initializer``), so the file parses to exactly the model ``ir.save`` would write. A tensor
    held in a NumPy array (or memory-mapped from the input) has only its chunk's field headers
    encoded (:func:`bncompile._proto_wire.tensor_chunk_head`); its bytes are written straight from
    the array, so nothing the size of the model, nor of one tensor, is copied.
    """
    with open(path, "wb") as f:
        _write_model_chunks(model, f)


def _write_model_chunks(model, f) -> None:
    """:func:`write_model_streaming` into the binary file object ``f``."""
    import onnx_ir as ir

    graph = model.graph
    inits = list(graph.initializers.values())
    for value in inits:
        graph.initializers.pop(value.name)
    try:
        head_proto = ir.serde.serialize_model(model)
    finally:
        for value in inits:
            graph.register_initializer(value)
    _drop_initializer_value_info(head_proto.graph, {v.name for v in inits})
    head = head_proto.SerializeToString()
    del head_proto
    f.write(head)
    del head
    for value in inits:
        raw = _plain_bytes(value.const_value)
        if raw is None:
            chunk = onnx.ModelProto()
            chunk.graph.initializer.append(ir.serde.serialize_tensor(value.const_value))
            chunk.graph.initializer[0].name = value.name
            f.write(chunk.SerializeToString())
            continue
        head, tail = tensor_chunk_frame(value, raw.nbytes)
        f.write(head)
        f.write(raw)
        f.write(tail)


def _plain_bytes(tensor) -> memoryview | None:
    """The bytes ``tensor.tobytes()`` would return, as a view of its NumPy array, for an
    ``onnx_ir.Tensor`` over a C-contiguous little-endian array of a type stored as it is in memory;
    None for anything else (packed 2/4/6-bit types, strings, proto-backed or external tensors)."""
    import onnx_ir as ir

    if type(tensor) is not ir.Tensor or tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    try:
        if tensor.dtype.bitwidth not in (8, 16, 32, 64, 128):
            return None
    except TypeError:       # a type without a bit width
        return None
    array = tensor.raw
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or array.dtype.hasobject \
            or array.dtype.itemsize * 8 != tensor.dtype.bitwidth \
            or array.dtype.byteorder not in ("<", "|", "=" if sys.byteorder == "little" else "<"):
        return None
    return memoryview(array.reshape(-1).view(np.uint8))


@contextlib.contextmanager
def model_on_disk(model) -> Iterator[str | bytes]:
    """Yield bytes (small, self-contained models) or the path of a temporary copy (large ones)."""
    import onnx_ir as ir

    if not has_external_tensors(model) and tensor_bytes(model) < PROTO_LIMIT_BYTES:
        buffer = io.BytesIO()            # one copy of the weights, not a proto and its serialization
        _write_model_chunks(model, buffer)
        yield buffer.getvalue()
        return
    with tempfile.TemporaryDirectory(prefix="bncompile-") as d:
        p = os.path.join(d, "model.onnx")
        ir.save(model, p, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield p


# --------------------------------------------------------------------------- running

def make_session(model: str | os.PathLike | bytes | onnx.ModelProto):
    """An onnxruntime CPU session with all graph optimizations off (ORT_DISABLE_ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot load the model: {first}") from None


def input_specs(session, input_shapes: Mapping[str, Sequence[int]] | None = None
                ) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, concrete shape, ORT type) of each session input; a free first dim defaults to 1."""
    input_shapes = dict(input_shapes or {})
    specs = []
    for inp in session.get_inputs():
        if inp.name in input_shapes:
            shape = tuple(int(d) for d in input_shapes.pop(inp.name))
            if len(shape) != len(inp.shape):
                raise InputError(f"--input-shape {inp.name}: rank {len(shape)} but the model's input "
                                 f"has rank {len(inp.shape)} {list(inp.shape)}")
            for d, want in zip(shape, inp.shape):
                if isinstance(want, int) and want >= 0 and want != d:
                    raise InputError(f"--input-shape {inp.name}: {list(shape)} does not match the "
                                     f"model's fixed shape {list(inp.shape)}")
        else:
            shape = []
            for axis, d in enumerate(inp.shape):
                if isinstance(d, int) and d >= 0:
                    shape.append(d)
                elif axis == 0:
                    shape.append(1)
                else:
                    raise InputError(f"input {inp.name!r} has a free dimension {d!r} at axis {axis}: "
                                     f"give it with --input-shape {inp.name}=...")
            shape = tuple(shape)
        specs.append((inp.name, shape, inp.type))
    if input_shapes:
        raise InputError(f"--input-shape names unknown inputs {sorted(input_shapes)}: the model's "
                         f"inputs are {[i.name for i in session.get_inputs()]}")
    return specs


def _ort_dtype(type_: str):
    """The NumPy dtype of an onnxruntime input type such as ``tensor(float)``; None when it has none."""
    if type_ in _FLOAT_TYPES:
        return np.dtype(_FLOAT_TYPES[type_])
    if type_ == "tensor(bfloat16)":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if type_ == "tensor(bool)":
        return np.dtype(bool)
    if type_.startswith(("tensor(int", "tensor(uint")):
        return np.dtype(type_[len("tensor("):-1])
    return None


def feed_bytes_limit() -> int:
    """The most bytes :func:`draw_feeds` draws: half the machine's physical memory (at least 1 GiB)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 16 << 30
    return max(1 << 30, phys // 2)


def check_feed_sizes(inputs: Sequence[tuple[str, Sequence[int], object]]) -> None:
    """Refuse input shapes whose random values would not fit in memory, naming the input and the fix."""
    total = 0
    for name, shape, dtype in inputs:
        count = 1
        for d in shape:
            count *= max(int(d), 0)
        itemsize = dtype.itemsize if isinstance(dtype, np.dtype) else 8
        total += count * max(itemsize, 8)     # float64 draws before the cast
        if total > feed_bytes_limit():
            raise InputError(f"input {name!r} of shape {list(shape)} needs {count * itemsize / 2**30:.3g} GiB "
                             f"of random values, more than this machine's memory allows: give smaller "
                             f"sizes with --input-shape {name}=... (or a smaller --batch)")


def draw_feeds(inputs: Sequence[tuple[str, Sequence[int], object]], *, seed: int = 0,
               positive: frozenset | set = frozenset()) -> dict[str, np.ndarray]:
    """Seeded random values for ``(name, shape, dtype)`` triples, drawn in order from one generator:
    standard normal floats (float16/32/64, bfloat16; their absolute values for the names in
    ``positive``, e.g. BatchNormalization variances), bools with probability 1/2, integers in
    [0, 4). Every value is an ``np.ndarray`` of the input's dtype (0-d for a scalar input).
    ``dtype`` is a NumPy dtype, or a type name (named in the error) when it has none. Shapes whose
    values would not fit in memory are refused (:func:`check_feed_sizes`)."""
    check_feed_sizes(inputs)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in inputs:
        kind = dtype.kind if isinstance(dtype, np.dtype) else None
        if kind == "f" or (kind is not None and dtype.name == "bfloat16"):
            values = rng.standard_normal(shape)
            if name in positive:
                values = np.abs(values) + 0.5
            feeds[name] = np.asarray(values).astype(dtype)
        elif kind == "b":
            feeds[name] = np.asarray(rng.random(shape) < 0.5, dtype=np.bool_)
        elif kind is not None and kind in "iu":
            feeds[name] = np.asarray(rng.integers(0, 4, size=shape)).astype(dtype)
        else:
            raise InputError(f"input {name!r} has type {dtype}: bncompile cannot draw random "
                             "values for it")
    return feeds


def random_feeds(session, *, seed: int = 0, input_shapes=None, positive=frozenset()) -> dict[str, np.ndarray]:
    """Seeded random inputs for every input of an onnxruntime session (see :func:`draw_feeds`)."""
    return draw_feeds([(name, shape, _ort_dtype(type_) or type_)
                       for name, shape, type_ in input_specs(session, input_shapes)], seed=seed,
                      positive=positive)


def variance_inputs(model) -> set[str]:
    """Names of graph inputs that feed a BatchNormalization's variance (input 4), in any graph of an
    ``onnx.ModelProto`` or ``onnx_ir.Model``: random check values for them must be positive."""
    graph = model.graph
    if isinstance(model, onnx.ModelProto):
        names = {vi.name for vi in graph.input}
        nodes = [n for g in _iter_graphs(graph) for n in g.node]
        return {n.input[4] for n in nodes
                if n.op_type == "BatchNormalization" and len(n.input) > 4 and n.input[4] in names}
    import onnx_ir as ir

    names = {v.name for v in graph.inputs}
    out = set()
    for n in ir.traversal.RecursiveGraphIterator(graph):
        if n.op_type == "BatchNormalization" and len(n.inputs) > 4 and n.inputs[4] is not None \
                and n.inputs[4].name in names:
            out.add(n.inputs[4].name)
    return out


def model_feeds(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], *, seed: int = 0
                ) -> dict[str, np.ndarray]:
    """Seeded random values for the graph inputs named in ``shapes`` (in that order), typed from
    the model (see :func:`draw_feeds`)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    inputs = []
    for name, shape in shapes.items():
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[name]))
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(types[name]).lower()
        inputs.append((name, shape, dtype))
    return draw_feeds(inputs, seed=seed)


def compare_outputs(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> dict:
    """Errors of ``actual`` against ``reference`` over all outputs, in float64: ``max_abs``,
    ``max_rel`` (max abs error / largest |reference|), ``max_elem_rel``
    (``|a-r| / max(|r|, 1e-6 * max|r|)``) and ``rms_rel`` (root-mean-square error / largest
    |reference|, the most stable measure of accuracy). A NaN (or the same infinity) at the same place
    in both is agreement; ``nonfinite_agreed`` counts those elements, ``nan_mismatch`` the places
    where only one side is NaN (an infinite error)."""
    agreed = 0
    mismatch = 0
    max_abs = 0.0
    max_rel = 0.0
    max_elem = 0.0
    rms_rel = 0.0
    for r, a in zip(reference, actual):
        r64 = np.asarray(r).astype(np.float64)
        a64 = np.asarray(a).astype(np.float64)
        if r64.shape != a64.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "max_elem_rel": float("inf"),
                    "rms_rel": float("inf"), "nonfinite_agreed": agreed, "nan_mismatch": mismatch,
                    "note": f"shape {a64.shape} != {r64.shape}"}
        if r64.size == 0:
            continue
        nan_r, nan_a = np.isnan(r64), np.isnan(a64)
        same_nonfinite = (nan_r & nan_a) | (np.isinf(r64) & (r64 == a64))
        agreed += int(np.count_nonzero(same_nonfinite))
        mismatch += int(np.count_nonzero(nan_r ^ nan_a))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same_nonfinite, 0.0, np.abs(a64 - r64))
        diff = np.nan_to_num(diff, nan=np.inf)
        scale = float(np.max(np.abs(np.where(np.isfinite(r64), r64, 0.0))))
        err = float(diff.max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
        floor = max(scale * 1e-6, np.finfo(np.float64).tiny)
        denom = np.where(np.isfinite(r64), np.maximum(np.abs(r64), floor), np.inf)
        with np.errstate(invalid="ignore"):
            elem = np.where(diff == 0, 0.0, diff / denom)
        max_elem = max(max_elem, float(np.nan_to_num(elem, nan=np.inf).max()))
        with np.errstate(over="ignore"):
            rms = float(np.sqrt(np.mean(np.square(np.where(np.isfinite(diff), diff, 0.0)))))
        rms_rel = max(rms_rel, rms / scale if scale > 0 else 0.0)
    return {"max_abs": max_abs, "max_rel": max_rel, "max_elem_rel": max_elem, "rms_rel": rms_rel,
            "nonfinite_agreed": agreed, "nan_mismatch": mismatch}


# --------------------------------------------------------------------------- dtype twin

_LOW = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _tensor_to_float32(t: onnx.TensorProto) -> None:
    if t.data_type not in _LOW:
        return
    arr = onnx.numpy_helper.to_array(t).astype(np.float32)
    new = onnx.numpy_helper.from_array(arr, t.name)
    t.CopyFrom(new)


def _type_to_float32(tp: onnx.TypeProto) -> None:
    which = tp.WhichOneof("value")
    if which == "tensor_type" and tp.tensor_type.elem_type in _LOW:
        tp.tensor_type.elem_type = onnx.TensorProto.FLOAT
    elif which == "sequence_type":
        _type_to_float32(tp.sequence_type.elem_type)
    elif which == "optional_type":
        _type_to_float32(tp.optional_type.elem_type)


def _graph_to_float32(graph: onnx.GraphProto) -> None:
    for g in _iter_graphs(graph):
        for t in g.initializer:
            _tensor_to_float32(t)
        for vi in (*g.input, *g.output, *g.value_info):
            _type_to_float32(vi.type)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    _tensor_to_float32(attr.t)
                for t in attr.tensors:
                    _tensor_to_float32(t)
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i in _LOW:
                    attr.i = onnx.TensorProto.FLOAT


def model_to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float16/bfloat16 tensor, type and Cast target made float32."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    _graph_to_float32(twin.graph)
    return twin
