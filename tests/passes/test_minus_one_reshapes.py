"""MinusOneReshapesPass run directly: Reshape(x, Concat(ReduceProd(...), consts)) -> Reshape(x, [-1, ...])."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

from bncompile.passes.minus_one_reshapes import MinusOneReshapesPass
from helpers import ort_run
from helpers.fold_graphs import run_pass


def _model(*, parts="p, c", allowzero=0, c="24", reduce="keepdims = 1"):
    return onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,4,6] x) => (float[N,24] y, float[N,24] z) {{
          shp = Shape (x)
          s = Constant <value = int64[1] {{0}}> ()
          e = Constant <value = int64[1] {{1}}> ()
          sl = Slice (shp, s, e)
          p = ReduceProd <{reduce}> (sl)
          c = Constant <value = int64[1] {{{c}}}> ()
          t = Concat <axis = 0> ({parts})
          y = Reshape <allowzero = {allowzero}> (x, t)
          z = Reshape <allowzero = {allowzero}> (x, t)
        }}""")


def test_two_reshapes_sharing_one_target_read_one_constant():
    m = _model()
    out, r = run_pass(MinusOneReshapesPass(), m)
    assert [(e.op, e.action, e.detail) for e in r.entries] == [("Reshape", "rewritten", {"shape": [-1, 24]})] * 2
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Reshape"]  # the shape subgraph is gone
    (init,) = out.graph.initializer
    assert numpy_helper.to_array(init).tolist() == [-1, 24]
    assert list(out.graph.node[0].input) == list(out.graph.node[1].input) == ["x", init.name]
    x = {"x": np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)}
    want, got = ort_run(m, x), ort_run(out, x)
    for k in ("y", "z"):
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("kw,why", [
    (dict(allowzero=1), "allowzero=1"),
    (dict(parts="p, p"), "2 parts computed at run time"),
    (dict(c="0"), "not positive"),
    (dict(parts="sl, c"), "not a one-element ReduceProd"),
    (dict(reduce="axes = [0]"), "not a one-element ReduceProd"),
])
def test_leaves_with_the_reason(kw, why):
    m = _model(**kw)
    out, r = run_pass(MinusOneReshapesPass(), m)
    assert not r.modified and len(r.left) == 2 and all(why in e.reason for e in r.left), r.left
    assert len(out.graph.node) == len(m.graph.node)


def test_reshape_of_a_constant_target_is_no_candidate():
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[2,12] x) => (float[4,6] y) {
          t = Constant <value = int64[2] {4, 6}> ()
          y = Reshape (x, t)
        }""")
    _, r = run_pass(MinusOneReshapesPass(), m)
    assert r.entries == [] and not r.modified
