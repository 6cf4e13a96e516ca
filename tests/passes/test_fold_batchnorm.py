"""FoldBatchNormPass run directly (fold()'s patterns and refusals: test_fold_batchnorm_*.py)."""

from __future__ import annotations

import numpy as np

from bncompile.passes._result import RewriteResult
from bncompile.passes.fold_batchnorm import FoldBatchNormPass
from helpers.fold_graphs import G, assert_equivalent, bn_count, conv_bn, run_pass, unused_initializers


def test_folds_conv_bn_and_reports_it():
    m = conv_bn(seed=3)
    out, r = run_pass(FoldBatchNormPass(), m)
    assert isinstance(r, RewriteResult) and r.pass_name == "FoldBatchNormPass" and r.modified
    (e,) = r.entries
    assert e.changed and e.action == "folded" and e.op == "BatchNormalization" and e.reason is None
    assert e.detail["into_op"] == "Conv" and e.detail["mode"] == "inference" and e.detail["graph"] == "main"
    assert bn_count(out) == 0
    assert_equivalent(m, out)


def test_leaves_bn_after_relu_with_the_reason():
    g = G(seed=4)
    x = g.input("x", [2, 3, 5, 5])
    g.bn(g.node("Relu", [g.conv(x, 3, 4)]), 4, name="bn", outputs=["y"])
    g.output("y", shape=[2, 4, 5, 5])
    m = g.model()
    out, r = run_pass(FoldBatchNormPass(), m)
    (e,) = r.left
    assert not r.modified and e.name == "bn" and "not a foldable layer" in e.reason
    assert bn_count(out) == 1
    assert_equivalent(m, out)


def test_leaves_training_bn():
    g = G(seed=5)
    x = g.input("x", [2, 4, 3, 3])
    g.bn(g.conv(x, 4, 4), 4, outputs=["y", "rm", "rv"], training_mode=1)
    g.output("y", shape=[2, 4, 3, 3])
    _, r = run_pass(FoldBatchNormPass(), g.model())
    (e,) = r.left
    assert e.detail["mode"] == "training" and "training_mode=1" in e.reason


def _two_conv_bn_sharing(via: str):
    """Two Conv+BN whose BNs read one shared scale (a Constant node, an initializer or an Identity)."""
    g = G(seed=6)
    x = g.input("x", [1, 3, 6, 6])
    scale = np.abs(g.rand(4)) + 0.5
    shared = {"constant": g.const, "init": g.init}[via if via != "identity" else "init"](scale)
    if via == "identity":
        shared = g.node("Identity", [shared])
    y = x
    for i in range(2):
        _, b, mean, var = g.bn_params(4)
        y = g.node("BatchNormalization", [g.conv(y, 3 if i == 0 else 4, 4),
                                          shared, g.init(b), g.init(mean), g.init(var)],
                   name=f"bn{i}", epsilon=1e-3)
    g.output(y, shape=[1, 4, 6, 6])
    return g.model()


def test_one_constant_feeding_two_folded_bns():
    """Issue 13.1: the shared scale is an orphan twice; it is removed once, without a crash."""
    for via in ("constant", "init", "identity"):
        m = _two_conv_bn_sharing(via)
        out, r = run_pass(FoldBatchNormPass(), m)
        assert [e.action for e in r.entries] == ["folded", "folded"], via
        assert bn_count(out) == 0 and [n.op_type for n in out.graph.node] == ["Conv", "Conv"], via
        assert not unused_initializers(out), via
        assert_equivalent(m, out)


def test_second_run_changes_nothing():
    out, _ = run_pass(FoldBatchNormPass(), conv_bn(seed=8))
    again, r = run_pass(FoldBatchNormPass(), out)
    assert not r.modified and r.entries == []
    assert again.SerializeToString() == out.SerializeToString()


def test_absorb_affine_off_keeps_the_trailing_mul():
    g = G(seed=9)
    x = g.input("x", [2, 3, 4, 4])
    y = g.bn(g.conv(x, 3, 4), 4)
    g.node("Mul", [y, g.init(g.rand(1, 4, 1, 1))], outputs=["y"])
    g.output("y", shape=[2, 4, 4, 4])
    m = g.model()
    kept, r1 = run_pass(FoldBatchNormPass(absorb_affine=False), m)
    took, r2 = run_pass(FoldBatchNormPass(), m)
    assert r1.entries[0].detail["absorbed"] == [] and "Mul" in [n.op_type for n in kept.graph.node]
    assert len(r2.entries[0].detail["absorbed"]) == 1 and "Mul" not in [n.op_type for n in took.graph.node]
    assert_equivalent(m, kept)
    assert_equivalent(m, took)
