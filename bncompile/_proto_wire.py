"""The protobuf wire format, just as far as loading and saving large models needs it.

Loading (:func:`split_model`): a self-contained ``.onnx`` file is mostly the ``raw_data`` of its
main-graph initializers. Instead of parsing those bytes into a ``ModelProto`` (a copy), handing them
to the checker (a second parse, a second copy) and copying them out again into NumPy (a third), the
file is memory-mapped and walked field by field down to each initializer: what comes back is the
*skeleton*, the file's bytes with each large initializer's ``raw_data`` emptied (everything else
byte for byte, so the parser, the checker and the converters see the same model), and where each
emptied payload lies in the file, so it can be viewed in place (:func:`map_tensors`).

A payload is emptied only when nothing that checks a model could look at its bytes except for
their length, which is checked here instead: a numeric type NumPy holds plainly, exactly the bytes
its dims need, no other data field, not external, at least :data:`MAP_MIN_BYTES` long (shape
inference reads the values of shape-like inputs only, a few elements). Anything unusual in the
file (a malformed field, groups, a repeated ``raw_data``, two initializers of one name, a file over
protobuf's 2 GiB) makes :func:`split_model` return None, and the caller parses the file the plain way,
with the plain way's checks and messages.

The arrays (:func:`map_tensors`) read the file as it is when they are used: replace the file by
renaming a new one over it (as every bncompile output is written), never by rewriting it in place,
while a model loaded from it is in use (a truncated file makes a read of the lost bytes fail with
SIGBUS, as for any memory-mapped data, onnx-ir's external data included).

Saving (:func:`tensor_chunk_head`): one initializer is written as a chunk
``ModelProto{graph{initializer{...}}}`` (see :func:`bncompile.onnx_utils.write_model_streaming`);
the chunk's fields up to and including ``raw_data``'s length prefix, and the fields after it, are
encoded here, so the payload itself is written straight from the tensor's buffer. The bytes are the
ones ``SerializeToString`` writes (fields in number order).
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import onnx

#: Inline initializers of at least this many bytes are memory-mapped rather than parsed.
MAP_MIN_BYTES = 4096

#: protobuf's limit on one serialized message (a larger file is left to the plain parser's verdict)
_PROTO_MAX = 2**31 - 1

_T = onnx.TensorProto
#: ONNX data type -> NumPy dtype (little-endian), for the types whose raw bytes NumPy reads as they are
_PLAIN = {_T.FLOAT: "<f4", _T.DOUBLE: "<f8", _T.FLOAT16: "<f2", _T.INT8: "i1", _T.INT16: "<i2",
          _T.INT32: "<i4", _T.INT64: "<i8", _T.UINT8: "u1", _T.UINT16: "<u2", _T.UINT32: "<u4",
          _T.UINT64: "<u8", _T.BOOL: "?", _T.BFLOAT16: "<u2"}

# field numbers
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9


class _Malformed(Exception):
    """Something the fast path does not handle: the caller falls back to the plain parser."""


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, field start, key end, payload start, field end) for each field in
    buf[pos:end]; the payload is the bytes of a length-delimited field (wire type 2)."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        key_end = payload = pos
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, payload = _varint(buf, pos, end)
            pos = payload + n
        else:                                   # groups (3, 4) and invalid types
            raise _Malformed
        if field == 0 or pos > end:
            raise _Malformed
        yield field, wire, start, key_end, payload, pos


#: name -> (offset of the raw bytes in the file, length, NumPy dtype, dims) of the emptied payloads
MappedTensors = dict


def _tensor(buf, start: int, end: int, found: MappedTensors) -> bytes | None:
    """The TensorProto in buf[start:end] with its raw_data emptied, or None to keep it as it is."""
    raw = [(s, p, e) for f, w, s, k, p, e in _fields(buf, start, end) if f == _TENSOR_RAW_DATA]
    if len(raw) != 1:
        if len(raw) > 1:
            raise _Malformed                    # the last would win: leave it to the parser
        return None
    s, p, e = raw[0]
    if e - p < MAP_MIN_BYTES:
        return None
    head, tail = bytes(buf[start:s]), bytes(buf[e:end])
    try:
        meta = _T.FromString(head + tail)
    except Exception:  # DecodeError: the parser will say so
        raise _Malformed from None
    dtype = _PLAIN.get(meta.data_type)
    if (dtype is None or meta.data_location != _T.DEFAULT or len(meta.external_data)
            or meta.HasField("segment") or meta.float_data or meta.int32_data or meta.string_data
            or meta.int64_data or meta.double_data or meta.uint64_data or not meta.name
            or any(d < 0 for d in meta.dims)):
        return None
    count = 1
    for d in meta.dims:
        count *= int(d)
    if count * np.dtype(dtype).itemsize != e - p:   # the checks of the plain path decide
        return None
    if meta.name in found:
        raise _Malformed
    found[meta.name] = (p, e - p, dtype, tuple(int(d) for d in meta.dims))
    return head + bytes([_TENSOR_RAW_DATA << 3 | 2, 0]) + tail


def _graph(buf, start: int, end: int, found: MappedTensors) -> list[bytes] | None:
    out, changed, copied = [], False, start
    for f, w, s, k, p, e in _fields(buf, start, end):
        if f == _GRAPH_INITIALIZER and w == 2:
            new = _tensor(buf, p, e, found)
            if new is not None:
                out.append(bytes(buf[copied:s]))
                out.append(bytes(buf[s:k]) + encode_varint(len(new)) + new)
                copied, changed = e, True
    if not changed:
        return None
    out.append(bytes(buf[copied:end]))
    return out


def split_model(path) -> tuple[bytes, MappedTensors] | None:
    """(skeleton bytes, emptied payloads) of a model file, or None when the file is left to the
    plain parser (see the module docstring)."""
    if sys.byteorder != "little" or os.name != "posix":   # Windows: a mapped file cannot be replaced
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or size > _PROTO_MAX:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                found: MappedTensors = {}
                out, copied = [], 0
                for fnum, w, s, k, p, e in _fields(buf, 0, size):
                    if fnum == _MODEL_GRAPH and w == 2:
                        parts = _graph(buf, p, e, found)
                        if parts is not None:
                            out.append(buf[copied:s])
                            body_len = sum(len(x) for x in parts)
                            out.append(buf[s:k] + encode_varint(body_len))
                            out.extend(parts)
                            copied = e
                if not found:
                    return buf[:], found
                out.append(buf[copied:size])
                return b"".join(out), found
    except (_Malformed, OSError, ValueError):
        return None


#: above this many tensors, one map of the whole file serves them all (a process may hold ~65000 maps)
MAX_MAPS = 4096


def map_tensors(path, mapped: MappedTensors) -> dict[str, np.ndarray]:
    """A read-only array for each emptied payload, viewing the file in place: nothing is read until
    used. Each tensor has a memory map of its own, which goes when its array does (a folded weight
    leaves no pages of the old one behind); past :data:`MAX_MAPS` tensors, one map is shared.
    Raises OSError where the file cannot be mapped."""
    out = {}
    with open(path, "rb") as f:
        shared = None
        if len(mapped) > MAX_MAPS:
            shared = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for name, (offset, length, dtype, dims) in mapped.items():
            if shared is not None:
                m, start = shared, offset
            else:
                base = offset - offset % mmap.ALLOCATIONGRANULARITY
                m = mmap.mmap(f.fileno(), offset - base + length, offset=base, access=mmap.ACCESS_READ)
                start = offset - base
            out[name] = np.frombuffer(m, dtype=dtype, count=length // np.dtype(dtype).itemsize,
                                      offset=start).reshape(dims)
    return out


def tensor_chunk_head(proto_before: onnx.TensorProto, nbytes: int, proto_after: onnx.TensorProto
                      ) -> tuple[bytes, bytes]:
    """The bytes before and after a ``raw_data`` payload of ``nbytes`` in a chunk
    ``ModelProto{graph{initializer{T}}}``, where T's fields numbered below ``raw_data`` are
    ``proto_before`` and those above are ``proto_after``."""
    before = proto_before.SerializeToString()
    after = proto_after.SerializeToString()
    raw_key = bytes([_TENSOR_RAW_DATA << 3 | 2]) + encode_varint(nbytes)
    tensor_len = len(before) + len(raw_key) + nbytes + len(after)
    init = bytes([_GRAPH_INITIALIZER << 3 | 2]) + encode_varint(tensor_len)
    graph = bytes([_MODEL_GRAPH << 3 | 2]) + encode_varint(len(init) + tensor_len)
    return graph + init + before + raw_key, after
