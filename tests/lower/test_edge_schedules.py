"""The CPU schedules for what edge networks are made of (:mod:`bncompile.lower.graph_schedules`):
depthwise and grouped convolutions (``conv2d_rows``), pointwise convolutions whose channels only a
half-register block divides, squeeze-and-excitation blocks, activation epilogues (HardSwish, HardSigmoid,
Sigmoid as ``fast_exp``, Clip, x*sigmoid(x)), pooling, a classifier Gemm with an odd width. Each against
onnxruntime (optimizations off) with static and free batch; no timing asserts. Tests that assert WHICH rule
runs pin the CPU (AVX2 code runs on every x86-64 CPU these tests run on; the AVX-512 case only compiles)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import helpers.compile_models as M

pytestmark = pytest.mark.tvm

TOL = 1e-4          # max abs error / max |reference|, float32
AVX2 = {"kind": "llvm", "mcpu": "haswell"}
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}


class G:
    """A tiny graph: nodes and initializers with unique names."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def c(self, a):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def op(self, op, ins, **attrs):
        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, list(ins), [out], **attrs))
        return out

    def conv(self, x, ci, co, k, stride=1, group=1, bias=True):
        w = self.rng.standard_normal((co, ci // group, k, k)) * np.sqrt(2.0 / (ci // group * k * k))
        ins = [x, self.c(w)] + ([self.c(self.rng.normal(0, 0.1, co))] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def model(self, y, ci, h, w, batch):
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        g = helper.make_graph(self.nodes, "edge", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [batch, ci, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def _check(compiler, model, shape, *, target="llvm", batches=(1,)):
    cm = compiler.compile(model, target=target)
    for b in batches:
        x = np.random.default_rng(b).standard_normal((b, *shape[1:])).astype(np.float32)
        got = cm.run({"x": x})["y"]
        want = M.ort_run(model, {"x": x})[0]
        assert got.shape == want.shape
        assert M.rel_err(got, want) < TOL
    return cm


def _conv_rules(cm):
    return [r for name, r in cm.info["cpu_schedules"].items() if "conv" in name]


ACTS = ["relu", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu"]


def act(g, x, kind):
    if kind == "relu":
        return g.op("Relu", [x])
    if kind == "clip":
        return g.op("Clip", [x, g.c(0.0), g.c(6.0)])
    if kind == "hardswish":
        return g.op("HardSwish", [x])
    if kind == "hardsigmoid":
        return g.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if kind == "sigmoid":
        return g.op("Sigmoid", [x])
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


# (channels, group, kernel, stride, height, width): depthwise (group == channels) and grouped (group width
# 8, 16); odd channel counts and widths; kernels 3 and 5; strides 1 and 2
GROUPED = [(7, 7, 3, 1, 9, 9), (13, 13, 5, 2, 11, 10), (32, 32, 3, 2, 16, 16), (24, 24, 5, 1, 14, 14),
           (24, 3, 3, 1, 10, 10), (40, 5, 3, 2, 9, 13), (48, 3, 5, 1, 8, 8), (32, 2, 3, 2, 12, 12),
           (12, 2, 3, 1, 9, 9), (26, 2, 3, 2, 10, 10)]


@pytest.mark.parametrize("batch", [2, "N"])
@pytest.mark.parametrize("case", GROUPED, ids=lambda c: "c{}g{}k{}s{}_{}x{}".format(*c))
def test_grouped_and_depthwise_convs(compiler, case, batch):
    c, group, k, s, h, w = case
    g = G(c + group)
    y = act(g, g.conv("x", c, c, k, stride=s, group=group), "clip")
    model = g.model(y, c, h, w, batch)
    cm = _check(compiler, model, (2, c, h, w), batches=(2,) if batch == 2 else (1, 3), target=AVX2)
    # grouped: the packed conv when an AVX2 block (16, 8, 4 channels) divides a group's output channels;
    # depthwise: on blocks of 8 channels (AVX2's lanes) where they divide the channels, else per plane
    want = ("depthwise_blocked" if group == c and c % 8 == 0 else "depthwise_planes" if group == c
            else "conv2d_nchw16o" if (c // group) % 4 == 0 else "conv2d_rows")
    assert _conv_rules(cm) == [want], cm.info["cpu_schedules"]


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("kind", ACTS)
def test_depthwise_with_each_epilogue(compiler, kind, blocked, monkeypatch):
    """Per plane (the channel-blocked layout off) and on channel blocks (on: the default)."""
    from bncompile.lower import graph_schedules as gs

    monkeypatch.setattr(gs, "CHANNEL_BLOCKED", blocked)
    g = G(1)
    y = act(g, g.conv("x", 16, 16, 3, group=16), kind)
    cm = _check(compiler, g.model(y, 16, 10, 10, 1), (1, 16, 10, 10), target=AVX2)
    assert _conv_rules(cm) == ["depthwise_blocked" if blocked else "depthwise_planes"], cm.info["cpu_schedules"]


@pytest.mark.parametrize("kind", ACTS)
@pytest.mark.parametrize("co", [24, 40, 58, 13])
def test_pointwise_with_each_epilogue(compiler, kind, co):
    """1x1 convolutions: 24 and 40 channels take the packed rule (a full AVX2 register, an AVX-512 half
    register); 58 (ShuffleNet's) and 13 take it over 64 and 16 zero-padded channels, then a slice that
    carries the epilogue. The whole epilogue (x * sigmoid(x), x * hardsigmoid(x): a side branch that joins
    again) is fused into the conv's function."""
    g = G(co)
    y = act(g, g.conv("x", 12, co, 1), kind)
    model = g.model(y, 12, 7, 9, "N")
    cm = _check(compiler, model, (1, 12, 7, 9), target=AVX2, batches=(1, 2))
    assert _conv_rules(cm) == ["conv2d_nchw16o"], cm.info["cpu_schedules"]
    assert len(cm.info["cpu_schedules"]) == 1, cm.info["cpu_schedules"]     # the whole epilogue fused


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("co,k,s", [(58, 1, 1), (116, 3, 2), (29, 5, 1), (10, 3, 1), (5, 3, 1), (232, 1, 2)])
def test_zero_padded_output_channels(compiler, co, k, s, batch):
    """Dense convs whose output channels no block divides: zero-padded to the next multiple of a register
    (5 -> 8 is too much padding: TVM's conv and the row rule; 10 -> 12, a half AVX2 register), each with a
    relu epilogue and a residual add after it (the slice carries both), against onnxruntime."""
    from bncompile.lower.graph_schedules import padded_channels
    from bncompile.lower.tvm import tvm

    g = G(co + k)
    ci = 7
    y = act(g, g.conv("x", ci, co, k, stride=s), "relu")
    y = g.op("Add", [y, g.conv("x", ci, co, 1, stride=s)])
    cm = _check(compiler, g.model(y, ci, 11, 11, batch), (1, ci, 11, 11), target=AVX2,
                batches=(1,) if batch == 1 else (1, 3))
    with tvm().target.Target(AVX2):
        padded = padded_channels(co)
    assert padded == {58: 64, 116: 120, 29: 32, 10: 12, 5: None, 232: None}[co]     # 232: 8 divides it
    want = "conv2d_rows" if co == 5 else "conv2d_nchw16o"
    assert set(_conv_rules(cm)) == {want}, cm.info["cpu_schedules"]


def test_half_register_block_on_avx512():
    """40 output channels on AVX-512: no 16- or 32-channel block divides them, an 8-lane half does."""
    import bncompile

    g = G(3)
    model = g.model(g.op("Relu", [g.conv("x", 8, 40, 1)]), 8, 14, 14, 1)
    cm = bncompile.compile(model, target=AVX512)      # compiled only: the host may lack AVX-512
    assert _conv_rules(cm) == ["conv2d_nchw16o"], cm.info["cpu_schedules"]


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("batch", [1, "N"])
def test_squeeze_and_excitation_block(compiler, gate, batch):
    """Depthwise conv -> SiLU -> GAP -> 1x1 (bias) -> relu -> 1x1 (bias) -> gate -> Mul -> 1x1 projection."""
    g = G(5)
    c = 24
    h = act(g, g.conv("x", 8, c, 1), "silu")
    h = act(g, g.conv(h, c, c, 3, group=c), "hardswish")
    s = g.op("GlobalAveragePool", [h])
    s = act(g, g.conv(s, c, 6, 1), "relu")
    s = act(g, g.conv(s, 6, c, 1), gate)
    y = g.conv(g.op("Mul", [h, s]), c, 16, 1)
    _check(compiler, g.model(y, 8, 12, 12, batch), (1, 8, 12, 12), batches=(1,) if batch == 1 else (1, 2))


@pytest.mark.parametrize("batch", [2, "N"])
def test_pools_and_odd_width_classifier(compiler, batch):
    """MaxPool, AveragePool, GlobalAveragePool, Flatten and a Gemm with 40 outputs (the packed dense with a
    half-register or smaller vector) and 13 outputs (no vector divides: another rule)."""
    g = G(7)
    x = g.op("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    w = g.rng.standard_normal((40, 9)).astype(np.float32)
    x = g.op("Gemm", [x, g.c(w), g.c(np.zeros(40))], transB=1)
    x = g.op("Gemm", [act(g, x, "hardswish"), g.c(g.rng.standard_normal((13, 40))), g.c(np.ones(13))], transB=1)
    cm = _check(compiler, g.model(x, 9, 15, 15, batch), (2, 9, 15, 15), target=AVX2,
                batches=(2,) if batch == 2 else (1, 3))
    assert "dense_packed" in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


def test_row_tiling_divides_evenly():
    from bncompile.lower.graph_schedules import row_tiling

    for lanes, regs in ((8, 16), (16, 32), (4, 32)):
        for ow in (1, 5, 7, 13, 14, 28, 56, 112, 97):
            for oh in (1, 7, 9, 112):
                tw, th = row_tiling(ow, oh, lanes, regs)
                assert ow % tw == 0 and oh % th == 0 and tw <= max(ow, 2 * lanes)


def test_mobilenet_like_stack_matches(compiler):
    """An inverted-residual stack as the edge networks build it (expand 1x1 -> depthwise -> project 1x1
    + residual), static and dynamic batch."""
    for batch in (1, "N"):
        g = G(11)
        x = act(g, g.conv("x", 3, 16, 3, stride=2), "hardswish")
        for cin, cout, s, k in ((16, 24, 2, 3), (24, 24, 1, 5), (24, 40, 2, 3)):
            h = act(g, g.conv(x, cin, cin * 4, 1), "clip")
            h = act(g, g.conv(h, cin * 4, cin * 4, k, stride=s, group=cin * 4), "clip")
            h = g.conv(h, cin * 4, cout, 1)
            x = g.op("Add", [h, x]) if s == 1 and cin == cout else h
        _check(compiler, g.model(x, 3, 32, 32, batch), (1, 3, 32, 32), batches=(1,) if batch == 1 else (2,))


@pytest.mark.parametrize("batch", [2, "N"])
@pytest.mark.parametrize("c,h,w", [(24, 14, 14), (13, 7, 7), (32, 9, 5), (6, 28, 28)])
def test_global_pooling(compiler, c, h, w, batch):
    """GlobalAveragePool and GlobalMaxPool (the SE block's squeeze, the head): the global_pool rule (chains
    over a tile of channels) where a tile divides the channels, then SE's gate and Mul broadcast over H x W."""
    g = G(c + h)
    a = g.op("GlobalAveragePool", ["x"])
    m = g.op("GlobalMaxPool", ["x"])
    s = act(g, g.op("Add", [a, m]), "hardsigmoid")
    y = g.op("Mul", ["x", s])
    cm = _check(compiler, g.model(y, c, h, w, batch), (2, c, h, w), target=AVX2,
                batches=(2,) if batch == 2 else (1, 3))
    # 13 channels: no tile divides them (dlight's rule); the others: the channel tile of global_pool
    want = 0 if c == 13 else 2
    assert list(cm.info["cpu_schedules"].values()).count("global_pool") == want, cm.info["cpu_schedules"]


# depthwise (``depthwise_planes``): asymmetric pads (TF's SAME_UPPER for stride 2), no pad, odd sizes,
# a 1-row output, static and free batch, against onnxruntime
DEPTHWISE = [(9, 3, 2, 15, 13, [0, 0, 1, 1]), (11, 5, 2, 9, 16, [1, 2, 2, 1]), (6, 3, 1, 5, 7, [0, 0, 0, 0]),
             (5, 3, 2, 3, 17, [1, 1, 1, 1]), (17, 5, 1, 7, 7, [2, 2, 2, 2])]


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "c{}k{}s{}_{}x{}_p{}".format(*c[:5], "".join(map(str, c[5]))))
def test_depthwise_pads_and_strides(compiler, case, batch):
    c, k, s, h, w, pads = case
    g = G(c + k)
    wt = g.rng.standard_normal((c, 1, k, k)) * 0.5
    y = g.op("Conv", ["x", g.c(wt), g.c(g.rng.normal(0, 0.1, c))], kernel_shape=[k, k], strides=[s, s],
             pads=pads, group=c)
    y = act(g, y, "hardswish")
    cm = _check(compiler, g.model(y, c, h, w, batch), (1, c, h, w), target=AVX2, batches=(1,) if batch == 1 else (2, 3))
    assert _conv_rules(cm) == ["depthwise_planes"], cm.info["cpu_schedules"]


def test_depthwise_on_avx512_compiles():
    import bncompile

    g = G(4)
    model = g.model(act(g, g.conv("x", 24, 24, 3, stride=2, group=24), "clip"), 24, 28, 28, 1)
    cm = bncompile.compile(model, target=AVX512)      # compiled only: the host may lack AVX-512
    assert _conv_rules(cm) == ["depthwise_planes"], cm.info["cpu_schedules"]


def test_depthwise_tiling_divides_evenly():
    from bncompile.lower.graph_schedules import depthwise_tiling

    for lanes, regs in ((8, 16), (16, 32), (4, 32)):
        for ow in (1, 5, 7, 13, 14, 28, 56, 112, 97):
            for oh in (1, 7, 9, 112):
                tw, th = depthwise_tiling(ow, oh, lanes, regs)
                assert ow % tw == 0 and oh % th == 0 and tw <= max(ow, 2 * lanes)
                assert th * -(-tw // lanes) <= max(1, regs // 4)     # accumulators within a quarter of the file
    assert depthwise_tiling(56, 56, 16, 32) == (8, 8)         # a half register, not 28 = 16 + 8 + 4 lanes


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_pad_is_decomposed(stride):
    """The padded plane: zeros, then the in-bounds copy with no per-element test (a padded copy that
    tests each element does not vectorize); stride 2 adds the phase split."""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.kernels.conv2d_packed import depthwise_conv2d_te
    from bncompile.lower.tvm import tvm

    t = tvm()
    x = t.te.placeholder((1, 16, 14, 14), "float32", name="x")
    w = t.te.placeholder((16, 1, 3, 3), "float32", name="w")
    y = depthwise_conv2d_te(x, w, strides=(stride, stride), padding=(1, 1, 1, 1), kernel=(3, 3))
    func = t.te.create_prim_func([x, w, y])
    sch = gs.schedule_depthwise(func, t.target.Target(AVX2))
    text = sch.mod["main"].script()
    assert "pad_const" in text and "if_then_else" not in text
    assert ("bnc_dw_phases" in text) == (stride == 2)


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("co,k,s,kind", [(32, 3, 2, "silu"), (13, 3, 2, "silu"), (48, 1, 1, "sigmoid"),
                                          (24, 5, 1, "hardswish")])
def test_dense_conv_with_costly_epilogue(compiler, co, k, s, kind, batch):
    """A sigmoid-bearing epilogue after a packed conv runs on channel vectors of the accumulator tile, then
    a copy stores it NCHW (``_epilogue_on_channel_vectors``); 13 channels go through the zero-padded slice
    instead. Against onnxruntime, odd spatial sizes, static and free batch."""
    g = G(co + k)
    y = act(g, g.conv("x", 5, co, k, stride=s), kind)
    cm = _check(compiler, g.model(y, 5, 15, 13, batch), (1, 5, 15, 13), target=AVX2,
                batches=(1,) if batch == 1 else (2, 3))
    assert _conv_rules(cm) == ["conv2d_nchw16o"], cm.info["cpu_schedules"]


def test_grouped_conv_on_avx512_takes_a_half_register_block():
    """RegNet's group width 8 on AVX-512: an 8-lane block (half a register) inside each group."""
    import bncompile

    g = G(6)
    model = g.model(act(g, g.conv("x", 48, 48, 3, stride=2, group=6), "relu"), 48, 14, 14, 1)
    cm = bncompile.compile(model, target=AVX512)      # compiled only: the host may lack AVX-512
    assert _conv_rules(cm) == ["conv2d_nchw16o"], cm.info["cpu_schedules"]


# MaxPool (``pool_planes``): the stems' 3x3/2, 2x2/2 without pad, 3x3/1, asymmetric pads, odd sizes; all-negative
# inputs near the border check the pad value (the lowest float, not 0)
MAXPOOL = [(8, 3, 2, 17, 15, [1, 1, 1, 1]), (5, 2, 2, 10, 9, [0, 0, 0, 0]), (3, 3, 1, 7, 11, [1, 1, 1, 1]),
           (6, 3, 2, 12, 12, [0, 0, 1, 1]), (4, 5, 2, 13, 13, [2, 2, 2, 2])]


@pytest.mark.parametrize("batch", [2, "N"])
@pytest.mark.parametrize("case", MAXPOOL, ids=lambda c: "c{}k{}s{}_{}x{}_p{}".format(*c[:5], "".join(map(str, c[5]))))
def test_max_pool(compiler, case, batch):
    c, k, s, h, w, pads = case
    g = G(c + k)
    y = g.op("MaxPool", [g.op("Sub", ["x", g.c(3.0)])], kernel_shape=[k, k], strides=[s, s], pads=pads)
    cm = _check(compiler, g.model(y, c, h, w, batch), (2, c, h, w), target=AVX2,
                batches=(2,) if batch == 2 else (1, 3))
    assert "pool_planes" in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("co", [232, 440])
def test_half_register_channels_padded_to_whole_registers(compiler, co, batch):
    """ShuffleNet's 232 and RegNet's 440 output channels: on AVX-512 only a half register divides them, so
    they are zero-padded to 240 / 448 (whole registers) and sliced back (a residual add after it); 40 -> 48
    is too much padding and keeps the half register. Correctness on the host's own target; the choice on a
    pinned AVX-512 target."""
    from bncompile.lower.graph_schedules import padded_channels
    from bncompile.lower.tvm import tvm

    g = G(co)
    y = g.op("Add", [act(g, g.conv("x", 16, co, 1), "relu"), g.conv("x", 16, co, 1)])
    model = g.model(y, 16, 7, 7, batch)
    _check(compiler, model, (1, 16, 7, 7), batches=(1,) if batch == 1 else (2, 3))
    with tvm().target.Target(AVX512):
        assert padded_channels(co, whole_registers=True, waste=0.125) == co + 8
        assert padded_channels(40, whole_registers=True, waste=0.125) is None
    import bncompile

    cm = bncompile.compile(model, target=AVX512)      # compiled only: the host may lack AVX-512
    assert set(_conv_rules(cm)) == {"conv2d_nchw16o"}, cm.info["cpu_schedules"]


def _scheduled(model, target=AVX2):
    """``{function name: (rule, TVMScript text)}`` of the scheduled PrimFuncs of a model's compile."""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.tuning import fused_module
    from bncompile.lower.tvm import tvm

    fused, tdict = fused_module(model, target=target)
    report: dict = {}
    mod = gs.schedule_module(fused, tvm().target.Target(tdict), report)
    return {gv.name_hint: (report.get(gv.name_hint), f.script()) for gv, f in mod.functions.items()
            if gv.name_hint in report}


@pytest.mark.parametrize("co", [8, 16, 32])
@pytest.mark.parametrize("batch", [1, "N"])
def test_a_stem_pads_its_rows_in_each_task(compiler, co, batch):
    """A stem conv (3 channels in, stride 2) whose parallel tasks are bands of output rows of all its
    channels pads the input rows each task reads inside that task (``PAD_IN_ROW_TASKS``): no serial pass
    over a padded copy before the parallel loop. Against onnxruntime, static and free batch."""
    g = G(co)
    y = act(g, g.conv("x", 3, co, 3, stride=2), "relu")
    model = g.model(y, 3, 96, 96, batch)
    _check(compiler, model, (1, 3, 96, 96), target=AVX2, batches=(1, 2) if batch == "N" else (1,))
    (text,) = [t for name, (rule, t) in _scheduled(model).items() if "conv" in name]
    assert text.count("T.parallel") == 1 and text.index("T.parallel") < text.index('T.sblock("bnc_pad")'), text


@pytest.mark.parametrize("co,k,s", [(58, 1, 1), (116, 3, 2), (29, 5, 1)])
def test_zero_padded_conv_slices_inside_its_tile(compiler, co, k, s):
    """A zero-padded conv stores its channel slice (with the epilogue) from the accumulator tile inside
    the conv's parallel loop: one parallel loop per function (one launch of the thread pool), no padded
    output buffer; the last block's zero channels are cut by a predicate. Against onnxruntime, static
    and free batch (a predicate lost would write the zero channels into the next batch row)."""
    g = G(co)
    ci = 24
    y = act(g, g.conv("x", ci, co, k, stride=s), "relu")
    y = g.op("Add", [y, g.conv("x", ci, co, 1, stride=s)])
    h = 56 // s
    for batch in (1, "N"):
        model = g.model(y, ci, h, h, batch)
        g.nodes.pop()                                  # the Identity model() appended
        _check(compiler, model, (1, ci, h, h), target=AVX2, batches=(1,) if batch == 1 else (1, 3))
    funcs = {n: t for n, (r, t) in _scheduled(g.model(y, ci, h, h, 1)).items() if r == "conv2d_nchw16o"}
    assert funcs
    for name, text in funcs.items():
        assert text.count("T.parallel(") == 1, name
        assert "bnc_channel_slice" in text and "T.where" in text, name
        assert "bnc_conv2d_nchw16o = T.sblock_alloc_buffer" not in text, name      # no padded output


@pytest.mark.parametrize("blocked", [True, False])
def test_small_functions_stay_serial(blocked, monkeypatch):
    """:func:`parallel_worth`: a function under PARALLEL_MIN_VECTOR_OPS vectors of work runs no parallel
    loop (a launch of the pool costs more than the second thread gains); a large one does; a symbolic
    batch is taken as large. AVX2 pinned (the threshold counts the target's vectors). The depthwise conv
    per plane and on channel blocks."""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.graph_schedules import PARALLEL_MIN_VECTOR_OPS, parallel_worth

    monkeypatch.setattr(gs, "CHANNEL_BLOCKED", blocked)
    rule = "depthwise_blocked" if blocked else "depthwise_planes"

    assert not parallel_worth(PARALLEL_MIN_VECTOR_OPS * 8 - 1, 8)
    assert parallel_worth(PARALLEL_MIN_VECTOR_OPS * 8, 8) and parallel_worth(None, 8)
    assert not parallel_worth(PARALLEL_MIN_VECTOR_OPS * 8, 16)          # twice the lanes: half the vectors

    def dw_model(c, hw, batch):
        g = G(c)
        return g.model(act(g, g.conv("x", c, c, 3, group=c), "relu"), c, hw, hw, batch)

    small = _scheduled(dw_model(16, 7, 1))        # 16 x 7 x 7 x 9 multiply-adds: 882 AVX2 vectors
    big = _scheduled(dw_model(64, 56, 1))         # 64 x 56 x 56 x 9: 225,792 vectors
    dyn = _scheduled(dw_model(16, 7, "N"))
    for funcs, want in ((small, False), (big, True), (dyn, True)):
        rules = {n: (r, t) for n, (r, t) in funcs.items() if r == rule}
        assert len(rules) == 1, funcs.keys()
        (rule, text), = rules.values()
        assert ("T.parallel(" in text) == want, text


@pytest.mark.parametrize("batch", [1, "N"])
def test_serial_small_functions_match(compiler, batch):
    """A stack of small functions (depthwise 5 x 5 stride 2, a pointwise conv, a global pool and a Gemm on
    odd widths), most under the parallel threshold, against onnxruntime."""
    g = G(11)
    c = 13
    y = act(g, g.conv("x", c, c, 5, stride=2, group=c), "hardswish")
    y = act(g, g.conv(y, c, 24, 1), "relu")
    y = g.op("GlobalAveragePool", [y])
    y = g.op("Flatten", [y])
    y = g.op("Gemm", [y, g.c(g.rng.standard_normal((24, 7))), g.c(g.rng.standard_normal(7))])
    _check(compiler, g.model(y, c, 9, 9, batch), (1, c, 9, 9), target=AVX2, batches=(1,) if batch == 1 else (1, 2))


def _parallel_loops(text):
    import re

    return re.findall(r"for (\w+) in T\.parallel\(", text)


def _rows_first(loop: str, channel: str = "o") -> bool:
    """Whether the fused parallel loop ``loop`` (``b_y_0_o_0_fused``: TVM joins the fused loops' names) runs
    output rows outside the ``channel`` loop."""
    parts = loop.split("_")
    return parts.index("y") < parts.index(channel)


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("ci,co,k,s,hw", [(16, 32, 1, 1, 28), (8, 24, 3, 2, 30), (96, 16, 1, 1, 6), (64, 48, 3, 1, 5)])
def test_conv_parallel_order_follows_the_larger_read(compiler, ci, co, k, s, hw, batch):
    """:data:`graph_schedules.ROWS_OUTER`: a packed conv whose weight is smaller than one sample of its input
    runs its parallel loop over batch x row tiles x channel blocks (each thread a band of rows of every
    channel); one whose weight is larger keeps channel blocks outside (each thread half the weight). The
    order changes which thread computes what, never the result: against onnxruntime, static and free
    batch, odd sizes, stride 2 and a 3x3 window."""
    g = G(ci + co)
    y = act(g, g.conv("x", ci, co, k, stride=s), "relu")
    model = g.model(y, ci, hw, hw, batch)
    _check(compiler, model, (1, ci, hw, hw), target=AVX2, batches=(1,) if batch == 1 else (2, 3))
    funcs = [t for r, t in _scheduled(model).values() if r == "conv2d_nchw16o"]
    assert len(funcs) == 1
    rows_outside = co * ci * k * k < ci * (hw + 2 * (k // 2)) ** 2
    loops = [lp for lp in _parallel_loops(funcs[0]) if lp.startswith("b_")]     # not the pad's
    if loops:      # a small function runs serial (parallel_worth)
        assert len(loops) == 1
        assert _rows_first(loops[0]) == rows_outside, loops


def test_conv_parallel_order_setting():
    """ROWS_OUTER True/False forces the order (the A/B switch the measurements used)."""
    from bncompile.lower import graph_schedules as gs

    g = G(3)
    model = g.model(act(g, g.conv("x", 64, 64, 1), "relu"), 64, 7, 7, 1)   # weight 4096 > input 3136
    old = gs.ROWS_OUTER
    try:
        orders = {}
        for setting in (True, False, "auto"):
            gs.ROWS_OUTER = setting
            (text,) = [t for r, t in _scheduled(model).values() if r == "conv2d_nchw16o"]
            orders[setting] = _parallel_loops(text)
    finally:
        gs.ROWS_OUTER = old
    assert _rows_first(orders[True][0]) and not _rows_first(orders[False][0]) and orders["auto"] == orders[False]


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("c,k,s,hw,op", [(24, 3, 1, 28, "Conv"), (17, 3, 2, 64, "Conv"), (16, 5, 1, 32, "Conv"),
                                         (8, 3, 2, 112, "Conv"), (9, 5, 1, 56, "Conv"),
                                         (24, 3, 2, 56, "MaxPool"), (16, 3, 2, 64, "MaxPool"), (27, 3, 1, 27, "Conv"),
                                         (12, 5, 2, 56, "Conv"), (96, 3, 1, 14, "Conv"), (64, 5, 2, 28, "MaxPool")])
def test_depthwise_bands_of_rows(compiler, c, k, s, hw, op, batch, monkeypatch):
    """:data:`graph_schedules.DW_ROW_CHUNKS`: a depthwise conv or max pool with at least DW_ROW_CHUNK_MIN
    output rows (and an even number of row tiles) runs its parallel loop over batch x 2 bands of rows x
    channels, each band filling its own rows of the padded plane (the halo rows twice). The padded copy is
    zero-filled then copied (no per-element test) only on rows of at most DW_PAD_FILL_MAX_WIDTH floats; with
    stride 2 the padded rows and their phases are built per tile of output rows where the tiles overlap
    little (DW_PHASES_PER_TILE: a 3x3 window over 4-row tiles, not a 5x5 one). Against onnxruntime, static
    and free batch, stride 1 and 2, windows 3 and 5; 27 rows stay one band. (The per-plane schedule: the
    channel-blocked layout off, as for channel counts the block does not divide.)"""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.graph_schedules import (DW_PAD_FILL_MAX_WIDTH, DW_TILE_ROWS_READ_MAX, depthwise_tiling,
                                                 dw_row_bands)

    monkeypatch.setattr(gs, "CHANNEL_BLOCKED", False)
    g = G(c + hw)
    if op == "Conv":
        wt = g.rng.standard_normal((c, 1, k, k)) * 0.5
        y = g.op("Conv", ["x", g.c(wt), g.c(g.rng.normal(0, 0.1, c))], kernel_shape=[k, k], strides=[s, s],
                 pads=[k // 2] * 4, group=c)
        y = act(g, y, "relu")
        rule = "depthwise_planes"
    else:
        y = g.op("MaxPool", ["x"], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)
        rule = "pool_planes"
    model = g.model(y, c, hw, hw, batch)
    _check(compiler, model, (1, c, hw, hw), target=AVX2, batches=(1,) if batch == 1 else (2, 3))
    (text,) = [t for r, t in _scheduled(model).values() if r == rule]
    oh = (hw + 2 * (k // 2) - k) // s + 1
    th = depthwise_tiling(oh, oh, 8, 16)[1]
    banded = dw_row_bands(oh, th) > 1
    loops = _parallel_loops(text)
    assert len(loops) == 1 and ("y" in loops[0].split("_")) == banded, (loops, oh)
    if banded:
        assert _rows_first(loops[0], "ch"), loops
    width = hw + 2 * (k // 2) if s == 1 else (oh + (k - 1) // s) * s      # the padded rows' columns
    assert ("pad_const" in text) == (width <= DW_PAD_FILL_MAX_WIDTH), width
    assert ("if_then_else" in text) == (width > DW_PAD_FILL_MAX_WIDTH), width
    per_tile = s > 1 and oh > th and (th - 1) * s + k <= DW_TILE_ROWS_READ_MAX * th * s
    tile_loop = re.search(r"for y_0(?:_1)? in", text)
    assert (tile_loop is not None and tile_loop.start() < text.index('T.sblock("bnc_dw_pad')) == per_tile


def test_depthwise_row_bands_split_evenly():
    """:func:`dw_row_bands`: two bands of whole row tiles on planes of at least DW_ROW_CHUNK_MIN rows whose
    tiles split evenly; other planes one band."""
    from bncompile.lower.graph_schedules import DW_ROW_CHUNK_MIN, depthwise_tiling, dw_row_bands

    for lanes, regs in ((8, 16), (16, 32)):
        for oh in range(1, 130):
            th = depthwise_tiling(oh, oh, lanes, regs)[1]
            bands = dw_row_bands(oh, th)
            assert bands in (0, 2)
            assert bool(bands) == (oh >= DW_ROW_CHUNK_MIN and (oh // th) % 2 == 0), (oh, th)
    assert dw_row_bands(56, 8) == 0 and dw_row_bands(112, 8) == 2 and dw_row_bands(14, 7) == 0


@pytest.mark.parametrize("conv", ["dense3", "pointwise", "depthwise", "gemm"])
@pytest.mark.parametrize("axis", [1, 2, 3])
def test_slice_fused_after_a_scheduled_reduction(compiler, conv, axis):
    """A Slice that reads part of a conv's (or Gemm's) output, fused after it: TVM 0.27 reverse-inlined it
    into the write-back without an error and the conv then wrote its whole tile into the smaller output
    (0.08-0.15 relative error, found by a random differential run). The slice stays its own block."""
    g = G(axis)
    c = 16
    if conv == "gemm":
        x = g.op("Flatten", ["x"], axis=1)
        y = g.op("Gemm", [x, g.c(g.rng.standard_normal((48, c * 9 * 13))), g.c(np.ones(48))], transB=1)
        starts, ends, axes = [0], [37], [1]
    else:
        y = g.conv("x", c, c if conv == "depthwise" else 32, 3 if conv != "pointwise" else 1,
                   group=c if conv == "depthwise" else 1)
        y = g.op("Relu", [y])
        starts, ends, axes = [0], [9 if axis == 1 else 5], [axis]
    names = [f"slice_{k}" for k in ("starts", "ends", "axes")]
    g.inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in zip(names, (starts, ends, axes))]
    y = g.op("Slice", [y, *names])
    _check(compiler, g.model(y, c, 9, 13, "N"), (2, c, 9, 13), batches=(1, 2))


@pytest.mark.parametrize("blocked", [True, False])
def test_epilogues_inlined_into_the_write_back(blocked, monkeypatch):
    """The bias and activation after a conv run in the conv's write-back: no T_add / T_relu / blocked-layout
    block is left in the scheduled function (an exception in the inlining's checks once left every
    epilogue as its own pass over memory: MobileNetV2 7.4 -> 10.7 ms); a flattened-plane conv's epilogue
    runs in its one output store."""
    from bncompile.lower import graph_schedules as gs

    monkeypatch.setattr(gs, "CHANNEL_BLOCKED", blocked)
    g = G(1)
    y = act(g, g.conv(act(g, g.conv("x", 8, 16, 1), "relu"), 16, 16, 3, group=16), "clip")
    scheduled = dict(_scheduled(g.model(y, 8, 10, 10, 1)))
    g = G(2)        # at 7x7, the last 1x1 conv runs over the flattened plane on blocks (FLAT_PIXEL_TILES)
    y = act(g, g.conv(act(g, g.conv("x", 8, 16, 1), "relu"), 16, 16, 3, group=16), "clip")
    y = act(g, g.conv(y, 16, 32, 1), "relu")
    scheduled.update({"7x7 " + k: v for k, v in _scheduled(g.model(y, 8, 7, 7, 1)).items()})
    assert blocked == any("flat16o" in name for name in scheduled), sorted(scheduled)
    for name, (rule, text) in scheduled.items():
        if "conv" not in name:
            continue
        left = set(re.findall(r'T\.sblock\("(\w+)"', text)) - {"root"}
        if "flat16o" in name:
            # FLAT_PIXEL_TILES: the conv is computed under the output's tile, and the epilogue is inlined
            # forward into that one output store (it keeps TVM's name): one block besides the conv's two
            stores = {b for b in left if not b.startswith("bnc_")}
            assert len(stores) == 1 and len(left) == 3 and text.count("T.parallel(") <= 1, (name, rule, left)
            continue
        assert all(b.startswith("bnc_") for b in left), (name, rule, left)
