"""PadChannelsPass run directly: conv-to-conv regions with a depthwise conv padded to whole channel blocks,
checked against onnxruntime (no graph optimizations) on the original graph; random blocks of the patterns
edge networks are made of, and every way out of a region left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bncompile.passes.pad_channels import PadChannelsPass
from helpers import ort_run
from helpers.fold_graphs import run_pass

TOL = 2e-5      # max abs difference / max |output|: the same sums, in another order


class _G:
    """A tiny graph builder: NCHW float tensors, initializers from a seeded generator."""

    def __init__(self, seed: int, cin: int = 8, hw: int = 9, batch=2):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0
        self.cin, self.hw, self.batch = cin, hw, batch

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, arr) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def node(self, op: str, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.name("n"), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, stride: int = 1, bias: bool = True):
        w = self.const(self.rng.normal(0, 1 / np.sqrt(cin // group * k * k), (cout, cin // group, k, k)))
        ins = [x, w] + ([self.const(self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.node("Conv", ins, kernel_shape=[k, k], group=group, strides=[stride, stride],
                         pads=[k // 2] * 4)

    def act(self, x: str, kind: str) -> str:
        if kind == "Clip":
            return self.node("Clip", [x, self.const(0.0), self.const(6.0)])
        if kind == "LeakyRelu":
            return self.node("LeakyRelu", [x], alpha=0.1)
        return self.node(kind, [x]) if kind else x

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        b = self.batch
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, self.cin, self.hw, self.hw])
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4) for o in outputs]
        g = helper.make_graph(self.nodes, "g", [x], outs, self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _check(model, seed: int = 0, batch: int = 2):
    out, r = run_pass(PadChannelsPass(16), model)
    cin, hw = (d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:3])
    x = np.random.default_rng(seed).normal(size=(batch, cin, hw, hw)).astype(np.float32)
    want, got = ort_run(model, {"x": x}), ort_run(out, {"x": x})
    for k in want:
        assert got[k].shape == want[k].shape
        assert np.abs(got[k] - want[k]).max() <= TOL * max(1.0, np.abs(want[k]).max()), k
    return out, r


def _mbconv(g: _G, x: str, cin: int, c: int, *, act="Relu", k=3, stride=1, se=None, gate="HardSigmoid",
            residual=False, extra=None):
    """1x1 expand to c -> act -> depthwise kxk -> act [-> squeeze-and-excitation] [-> extra] -> 1x1 project
    back to cin [+ x]."""
    h = g.act(g.conv(x, cin, c), act)
    h = g.act(g.conv(h, c, c, k=k, group=c, stride=stride), act)
    if se:
        s = g.node("GlobalAveragePool", [h])
        s = g.act(g.conv(s, c, se), "Relu")
        s = g.act(g.conv(s, se, c), gate)
        h = g.node("Mul", [h, s])
    if extra == "add_per_channel":
        h = g.node("Add", [h, g.const(g.rng.normal(size=(1, c, 1, 1)))])
    elif extra == "mul_scalar":
        h = g.node("Mul", [g.const(1.5), h])
    elif extra == "sub_rank3":
        h = g.node("Sub", [h, g.const(g.rng.normal(size=(c, 1, 1)))])
    y = g.conv(h, c, cin)
    return g.node("Add", [y, x]) if residual and stride == 1 else y


def test_a_mobilenet_v3_block_is_padded_and_exact():
    g = _G(0, cin=24, hw=14)
    y = _mbconv(g, "x", 24, 72, act="HardSwish", k=5, se=24, residual=True)
    out, r = _check(g.model([y]))
    (e,) = r.entries
    assert (e.action, e.detail["channels"]) == ("padded", [72, 80])
    assert e.detail["convs"] == 5                  # expand, depthwise, excite (sources/inside), squeeze, project
    groups = [helper.get_attribute_value(a) for n in out.graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    assert sorted(groups) == [1, 1, 1, 1, 80]
    shapes = {i.name: numpy_helper.to_array(i).shape for i in out.graph.initializer}
    assert sorted(s for s in shapes.values() if len(s) == 4) == sorted(
        [(80, 24, 1, 1), (80, 1, 5, 5), (24, 80, 1, 1), (80, 24, 1, 1), (24, 80, 1, 1)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), c=st.sampled_from([9, 20, 40, 58, 60, 72, 116, 120, 184, 200]),
       act=st.sampled_from(["Relu", "Clip", "HardSwish", "Sigmoid", "Tanh", "LeakyRelu", ""]),
       k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), se=st.sampled_from([None, 8]),
       gate=st.sampled_from(["HardSigmoid", "Sigmoid"]), residual=st.booleans(),
       extra=st.sampled_from([None, "add_per_channel", "mul_scalar", "sub_rank3"]), blocks=st.integers(1, 2))
def test_random_blocks_match_the_original(seed, c, act, k, stride, se, gate, residual, extra, blocks):
    """Random stacks of blocks: the padded graph computes what the original does; a region is padded
    exactly when the zero channels are at most 1/8 of its channels."""
    g = _G(seed, cin=12, hw=9)
    y = "x"
    for _ in range(blocks):
        y = _mbconv(g, y, 12, c, act=act, k=k, stride=stride, se=se, gate=gate, residual=residual, extra=extra)
    _, r = _check(g.model([y]), seed)
    padded = -(-c // 16) * 16
    assert [e.action for e in r.entries] == ["padded" if padded - c <= c / 8 else "left"] * blocks


def _left(build) -> str:
    g = _G(1, cin=8, hw=7)
    model = g.model(build(g))
    out, r = _check(model)
    (e,) = r.entries
    assert e.action == "left"
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    assert {i.name for i in out.graph.initializer} == {i.name for i in model.graph.initializer}
    return e.reason


def test_a_region_reaching_a_graph_output_is_left():
    def build(g):
        h = g.conv("x", 8, 60)
        d = g.conv(h, 60, 60, k=3, group=60)
        return [g.conv(d, 60, 8), d]
    assert "graph output" in _left(build)


def test_a_region_reaching_a_concat_is_left():
    def build(g):
        h = g.conv("x", 8, 60)
        d = g.conv(h, 60, 60, k=3, group=60)
        return [g.node("Concat", [d, "x"], axis=1)]
    assert "Concat" in _left(build)


def test_a_region_fed_by_a_graph_input_is_left():
    g = _G(1, cin=60, hw=7)
    d = g.conv(g.conv("x", 60, 60), 60, 60, k=3, group=60)
    _, r = _check(g.model([g.conv(g.node("Add", [d, "x"]), 60, 8)]))
    (e,) = r.entries
    assert e.action == "left" and "'x' is a graph input" in e.reason


@pytest.mark.parametrize("reads", ["d", "h"])
def test_a_c_to_c_conv_inside_the_region_is_source_and_sink(reads):
    """A 1x1 C -> C conv whose input and output are both in the region (its output added to a region
    tensor): padded on both weight axes. Found by a random differential run (59 of 2,519 graphs): it was
    padded as a sink only, and the Add saw 64 and 60 channels."""
    g = _G(5, cin=8, hw=7)
    h = g.conv("x", 8, 60)
    d = g.conv(h, 60, 60, k=3, group=60)
    p = g.conv(d if reads == "d" else h, 60, 60)
    y = g.conv(g.node("Add", [d, p] if reads == "d" else [p, d]), 60, 8)
    out, r = _check(g.model([y]))
    assert [(e.action, e.detail["convs"]) for e in r.entries] == [("padded", 4)]
    shapes = sorted(numpy_helper.to_array(i).shape for i in out.graph.initializer if i.dims and len(i.dims) == 4)
    assert (64, 64, 1, 1) in shapes


def test_a_tensor_used_twice_in_the_region_is_padded_once():
    g = _G(1, cin=8, hw=7)
    h = g.conv("x", 8, 60)
    d = g.conv(h, 60, 60, k=3, group=60)
    y = g.conv(g.node("Add", [d, g.node("Mul", [h, h])]), 60, 8)
    _, r = _check(g.model([y]))
    assert [(e.action, e.detail["convs"]) for e in r.entries] == [("padded", 3)]


def test_a_grouped_conv_or_a_division_ends_the_region():
    def grouped(g):
        h = g.conv("x", 8, 60)
        d = g.conv(h, 60, 60, k=3, group=60)
        return [g.conv(d, 60, 12, group=6)]
    assert "grouped conv" in _left(grouped)

    def divided(g):
        h = g.conv("x", 8, 60)
        d = g.conv(h, 60, 60, k=3, group=60)
        return [g.conv(g.node("Div", [d, g.node("Sigmoid", [d])]), 60, 8)]
    assert "Div" in _left(divided)


def test_a_per_position_constant_ends_the_region():
    def build(g):
        h = g.conv("x", 8, 60)
        d = g.conv(h, 60, 60, k=3, group=60)
        return [g.conv(g.node("Add", [d, g.const(np.ones((1, 60, 7, 7)))]), 60, 8)]
    assert "not per channel" in _left(build)


def test_a_weight_fed_at_run_time_ends_the_region():
    g = _G(1, cin=8, hw=7)
    h = g.conv("x", 8, 60)
    d = g.conv(h, 60, 60, k=3, group=60)
    y = g.node("Conv", [d, "w"], kernel_shape=[1, 1])
    model = g.model([y])
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 60, 1, 1]))
    out, r = run_pass(PadChannelsPass(16), model)
    (e,) = r.entries
    assert e.action == "left" and "computed at run time" in e.reason


def test_regions_without_a_depthwise_conv_are_not_touched():
    g = _G(2, cin=8, hw=5)
    y = g.conv(g.act(g.conv("x", 8, 60), "Relu"), 60, 8)
    out, r = _check(g.model([y]))
    assert r.entries == [] and not r.modified


def test_a_free_batch_is_fine():
    g = _G(3, cin=16, hw=8, batch="N")
    y = _mbconv(g, "x", 16, 120, act="Relu", k=3, se=32, residual=True)
    model = g.model([y])
    for batch in (1, 3):
        _, r = _check(model, batch=batch)
        assert [e.action for e in r.entries] == ["padded"]


@pytest.mark.parametrize("block,want", [(8, []), (16, [("padded", [72, 80])]), (32, [("left", [72, 96])])])
def test_the_block_sets_the_padding(block, want):
    """72 channels: whole blocks of 8 (nothing to do), 80 on blocks of 16, 96 on 32 (too many zeros)."""
    g = _G(4, cin=8, hw=6)
    y = _mbconv(g, "x", 8, 72, k=3)
    out, r = run_pass(PadChannelsPass(block), g.model([y]))
    assert [(e.action, e.detail["channels"]) for e in r.entries] == want
