"""DropSingleDimProductsPass run directly: ReduceProd(Slice(Shape(x), [s], [s+1])) -> the Slice."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from bncompile.passes.drop_single_dim_products import DropSingleDimProductsPass
from helpers import ort_run
from helpers.fold_graphs import run_pass


def _model(*, first="s, e", keepdims=1, data="shp", out="y"):
    return onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,M] x) => (float[N,M] {out}) {{
          shp = Shape (x)
          s = Constant <value = int64[1] {{0}}> ()
          e = Constant <value = int64[1] {{1}}> ()
          two = Constant <value = int64[1] {{2}}> ()
          sl0 = Slice ({data}, {first})
          sl1 = Slice (shp, e, two)
          p0 = ReduceProd <keepdims = {keepdims}> (sl0)
          p1 = ReduceProd (sl1)
          t = Concat <axis = 0> (p0, p1)
          y = Reshape (x, t)
        }}""")


def _run(m, out):
    x = {"x": np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)}
    return ort_run(m, x)["y"], ort_run(out, x)["y"]


def test_bypasses_both_products_of_slices_sharing_constants():
    m = _model()
    out, r = run_pass(DropSingleDimProductsPass(), m)
    assert [(e.name, e.action) for e in r.entries] == [("", "bypassed")] * 2 and r.modified
    assert "ReduceProd" not in [n.op_type for n in out.graph.node]
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert list(concat.input) == ["sl0", "sl1"]
    want, got = _run(m, out)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw,why", [
    (dict(first="s, two"), "not one dimension"),
    (dict(keepdims=0), "keepdims=0"),
    (dict(data="x"), "does not slice a Shape"),
])
def test_leaves_with_the_reason(kw, why):
    m = _model(**kw)
    if kw.get("keepdims") == 0:  # a scalar cannot be concatenated: give Concat the Slice itself
        m = _model(**kw)
        m.graph.node[-2].input[0] = "sl1"
    out, r = run_pass(DropSingleDimProductsPass(), m, check=kw.get("data") != "x")
    assert len(r.left) == 1 and why in r.left[0].reason, r.entries
    assert [n.op_type for n in out.graph.node].count("ReduceProd") == 1


def test_a_product_that_is_a_graph_output_keeps_its_node():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,M] x) => (int64[1] p, float[N,M] y) {
          shp = Shape (x)
          s = Constant <value = int64[1] {0}> ()
          e = Constant <value = int64[1] {1}> ()
          sl = Slice (shp, s, e)
          p = ReduceProd (sl)
          m = Constant <value = int64[1] {-1}> ()
          t = Concat <axis = 0> (p, m)
          y = Reshape (x, t)
        }""")
    out, r = run_pass(DropSingleDimProductsPass(), m)
    assert r.entries[0].action == "bypassed"
    assert "ReduceProd" in [n.op_type for n in out.graph.node]
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert list(concat.input) == ["sl", "m"]
    x = {"x": np.ones((3, 5), np.float32)}
    assert ort_run(out, x)["p"].tolist() == [3]
