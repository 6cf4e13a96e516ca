"""FoldConstantsPass run directly: what it evaluates, what it leaves and why."""

from __future__ import annotations

import numpy as np

from bncompile.passes.fold_constants import FoldConstantsPass
from helpers.fold_graphs import G, assert_equivalent, ops, run_pass, unused_initializers


def _bn_with_computed_var(g: G, x, c, var_expr):
    gamma, beta, mean, _ = g.bn_params(c)
    return g.node("BatchNormalization", [x, g.init(gamma), g.init(beta), g.init(mean), var_expr],
                  epsilon=1e-3)


def test_evaluates_a_constant_chain_feeding_a_bn():
    g = G(seed=1)
    x = g.input("x", [2, 3, 4, 4])
    var = g.node("Add", [g.node("Abs", [g.const(g.rand(3))]), g.const(np.full(3, 0.1, np.float32))])
    g.output(_bn_with_computed_var(g, x, 3, var), shape=[2, 3, 4, 4])
    m = g.model()
    out, r = run_pass(FoldConstantsPass(), m)
    assert [(e.op, e.action) for e in r.entries] == [("Abs", "folded"), ("Add", "folded")]
    assert ops(out) == ["BatchNormalization"] and not unused_initializers(out)
    assert_equivalent(m, out)


def test_one_constant_feeding_two_folded_nodes():
    """Issue 13.1: Constant c feeds Add and Mul, both evaluated; c is removed once, without a crash."""
    g = G(seed=2)
    x = g.input("x", [2, 3, 4, 4])
    c = g.const(np.abs(g.rand(3)) + 0.2)
    y = _bn_with_computed_var(g, x, 3, g.node("Add", [c, g.const(np.full(3, 0.1, np.float32))]))
    y = _bn_with_computed_var(g, y, 3, g.node("Mul", [c, c]))
    g.output(y, shape=[2, 3, 4, 4])
    m = g.model()
    out, r = run_pass(FoldConstantsPass(), m)
    assert [e.action for e in r.entries] == ["folded", "folded"]
    assert ops(out) == ["BatchNormalization", "BatchNormalization"] and not unused_initializers(out)
    assert_equivalent(m, out)


def test_leaves_a_node_whose_output_is_a_graph_output():
    g = G(seed=3)
    g.input("x", [1])
    g.node("Neg", [g.const(g.rand(3))], outputs=["y"])
    g.output("y", shape=[3])
    m = g.model()
    out, r = run_pass(FoldConstantsPass(only_feeding_layers=False), m)
    (e,) = r.left
    assert e.op == "Neg" and e.reason == "an output is a graph output" and not r.modified
    assert ops(out) == ["Constant", "Neg"]


def test_leaves_a_non_deterministic_node():
    g = G(seed=4)
    x = g.input("x", [2, 3, 4, 4])
    var = g.node("Add", [g.node("RandomUniformLike", [g.const(g.rand(3))]), g.const(np.ones(3, np.float32))])
    g.output(_bn_with_computed_var(g, x, 3, var), shape=[2, 3, 4, 4])
    _, r = run_pass(FoldConstantsPass(), g.model())
    assert [(e.op, e.reason) for e in r.left] == [("RandomUniformLike", "not deterministic")]


def test_leaves_a_result_over_the_size_limit():
    g = G(seed=5)
    x = g.input("x", [2, 3, 4, 4])
    var = g.node("Abs", [g.const(g.rand(3))])
    g.output(_bn_with_computed_var(g, x, 3, var), shape=[2, 3, 4, 4])
    _, r = run_pass(FoldConstantsPass(max_elements=2), g.model())
    assert "limit 2" in r.left[0].reason and not r.modified


def test_by_default_leaves_subexpressions_that_feed_no_layer():
    g = G(seed=6)
    x = g.input("x", [3])
    g.node("Sub", [x, g.node("Neg", [g.const(g.rand(3))])], outputs=["y"])
    g.output("y", shape=[3])
    m = g.model()
    out, r = run_pass(FoldConstantsPass(), m)
    assert r.entries == [] and ops(out) == ops(m)
    out, r = run_pass(FoldConstantsPass(only_feeding_layers=False), m)
    assert [(e.op, e.action) for e in r.entries] == [("Neg", "folded")] and ops(out) == ["Sub"]
    assert_equivalent(m, out)
