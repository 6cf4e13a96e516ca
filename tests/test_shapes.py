"""The one ``--input-shape`` grammar (`bncompile.shapes`, re-exported by `bncompile.onnx_utils`)."""

from __future__ import annotations

import pytest

from bncompile import onnx_utils, shapes
from bncompile.errors import InputError


def test_onnx_utils_reexports_the_one_parser():
    assert onnx_utils.parse_input_shapes is shapes.parse_input_shapes
    assert onnx_utils.parse_shape is shapes.parse_shape


@pytest.mark.parametrize("specs,want", [
    (["x=1,3,224,224"], {"x": (1, 3, 224, 224)}),
    (["x=1,3", "y=2"], {"x": (1, 3), "y": (2,)}),
    (["x="], {"x": ()}),                              # a scalar input
    (["x=1,,3,"], {"x": (1, 3)}),                     # empty items skipped (as fold and bench did)
    (["a=b=2,0"], {"a=b": (2, 0)}),                   # the name is what precedes the last "="
    ([" x = 1, 3 "], {"x": (1, 3)}),
    (["x=1x3x8x8"], {"x": (1, 3, 8, 8)}),
    (None, {}),
])
def test_static_shapes(specs, want):
    assert shapes.parse_input_shapes(specs) == want


def test_dynamic_and_named_dimensions_for_compile():
    got = shapes.parse_input_shapes(["x=N,3,?,-1,seq_len", "y=batchx4"], dynamic=True, named=True)
    assert got == {"x": ("N", 3, None, None, "seq_len"), "y": ("batch", 4)}


@pytest.mark.parametrize("text,want", [
    ("N,32,32,16", [None, 32, 32, 16]), ("None,3", [None, 3]), ("?,3", [None, 3]), ("-1,3", [None, 3]),
    ("batch,3", [None, 3]), ("n,3", [None, 3]), ("8x32x32x16", [8, 32, 32, 16]), ("Nx3", [None, 3]),
])
def test_build_shape(text, want):
    assert shapes.parse_shape(text) == want


@pytest.mark.parametrize("kwargs,spec,needle", [
    ({}, "x", "expected NAME=D1,D2"),
    ({}, "=1,2", "expected NAME=D1,D2"),
    ({}, "x=N,3", "'N' is not a number"),
    ({}, "x=?,3", "'?' is not a number"),
    ({}, "x=-1,3", "dimension -1 is negative"),
    ({}, "x=1.5", "'1.5' is not a dimension"),
    ({"dynamic": True, "named": True}, "x=-2,3", "dimension -2 is negative"),
    ({"dynamic": True, "named": True}, "x=a.b", "'a.b' is not a dimension"),
])
def test_refusals_are_one_line_naming_the_spec(kwargs, spec, needle):
    with pytest.raises(InputError, match="--input-shape") as info:
        shapes.parse_input_shapes([spec], **kwargs)
    msg = str(info.value)
    assert needle in msg and repr(spec) in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["2,x", "2,H", "3,-4"])
def test_build_refuses_words_and_negative_sizes(text):
    with pytest.raises(InputError, match="--input-shape"):
        shapes.parse_shape(text)
