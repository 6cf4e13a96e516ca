"""The channel-blocked layout ``NCHW{B}c`` carried between the convs of networks with depthwise convs
(:func:`bncompile.lower.graph_schedules.channel_blocked`): depthwise convs on channel blocks, packed convs
reading and writing blocks, element-wise epilogues, squeeze-and-excitation, residual adds and layout copies
at the edges. Random inverted-residual stacks (channel counts that the block divides and that it does not,
kernels 3 and 5, strides 1 and 2, odd sizes, static and free batch) against onnxruntime with optimizations
off; on AVX2 (B = 8, runs on any x86-64 CPU these tests run on) and the host's own target. No timing."""

from __future__ import annotations

import numpy as np
import pytest

import helpers.compile_models as M
from bncompile.lower import graph_schedules as gs
from lower.test_edge_schedules import AVX2, TOL, G, _check, act

pytestmark = pytest.mark.tvm



def _stack(seed: int, expand=(16, 24, 32, 40, 48, 64, 72, 96)):
    """A random inverted-residual stack: stem conv, then blocks of expand 1x1 (to one of ``expand``
    channels) -> depthwise k x k / s -> (squeeze-and-excitation) -> project 1x1 (+ residual), random
    activations. ``(model builder, output name, input channels, height, width, depthwise channel counts)``."""
    rng = np.random.default_rng(seed)
    g = G(seed)
    cin = int(rng.choice([3, 8, 16]))
    h = int(rng.integers(7, 21))
    w = int(rng.integers(7, 21))
    acts = ["relu", "clip", "hardswish", "silu", "hardsigmoid"]
    c0 = int(rng.choice([16, 24, 32]))
    x = act(g, g.conv("x", cin, c0, 3, stride=int(rng.integers(1, 3))), str(rng.choice(acts)))
    c, dws = c0, []
    for _ in range(int(rng.integers(1, 4))):
        e = int(rng.choice(expand))
        k, s = int(rng.choice([3, 5])), int(rng.integers(1, 3))
        y = act(g, g.conv(x, c, e, 1), str(rng.choice(acts)))
        y = act(g, g.conv(y, e, e, k, stride=s, group=e), str(rng.choice(acts)))
        dws.append(e)
        if rng.random() < 0.4:                                   # squeeze-and-excitation
            q = g.op("GlobalAveragePool", [y])
            q = act(g, g.conv(q, e, 8, 1), "relu")
            q = act(g, g.conv(q, 8, e, 1), str(rng.choice(["sigmoid", "hardsigmoid"])))
            y = g.op("Mul", [y, q])
        co = int(rng.choice([c, 16, 24, 32, 40]))
        y = g.conv(y, e, co, 1)
        x = g.op("Add", [y, x]) if s == 1 and co == c else y
        c = co
    if rng.random() < 0.5:                                        # a dense 3x3 conv on the blocks
        x = act(g, g.conv(x, c, 32, 3), "relu")
    return g, x, cin, h, w, dws


@pytest.mark.parametrize("seed", range(12))
def test_random_inverted_residual_stacks(compiler, seed):
    g, y, cin, h, w, dws = _stack(seed)
    batch = "N" if seed % 3 == 0 else (2 if seed % 3 == 1 else 1)
    model = g.model(y, cin, h, w, batch)
    batches = (1, 3) if batch == "N" else (batch,)
    cm = _check(compiler, model, (1, cin, h, w), target=AVX2, batches=batches)
    rules = cm.info["cpu_schedules"]
    blocked = [c for c in dws if c % 8 == 0]
    if blocked:   # AVX2: a block of 8 channels
        assert "depthwise_blocked" in rules.values(), rules
    assert "default" not in rules.values(), rules


@pytest.mark.parametrize("seed", range(200, 206))
@pytest.mark.parametrize("pad", [True, False])
def test_channels_padded_to_whole_blocks(compiler, monkeypatch, seed, pad):
    """Expansions to channel counts the block (8 on AVX2) does not divide, each padded with at most 1/8
    zero channels (60 -> 64, 58 -> 64, 116 -> 120, 44 -> 48, 100 -> 104: ``passes/pad_channels.py``): the
    same result, and their depthwise convs run on blocks; without the padding, per plane."""
    monkeypatch.setattr(gs, "PAD_CHANNELS", pad)
    g, y, cin, h, w, dws = _stack(seed, expand=(60, 58, 116, 44, 100))
    batch = "N" if seed % 2 else 2
    cm = _check(compiler, g.model(y, cin, h, w, batch), (1, cin, h, w), target=AVX2,
                batches=(1, 3) if batch == "N" else (2,))
    rules = list(cm.info["cpu_schedules"].values())
    assert rules.count("depthwise_blocked") == (len(dws) if pad else 0), rules


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_random_stacks_on_the_host_target(compiler, seed):
    """The host's own target (AVX-512 hosts: a block of 16 channels; 24, 40, 72 stay NCHW there)."""
    g, y, cin, h, w, _ = _stack(seed)
    _check(compiler, g.model(y, cin, h, w, "N"), (1, cin, h, w), target="llvm", batches=(1, 2))


@pytest.mark.parametrize("k,s,hw", [(3, 1, 7), (3, 2, 14), (5, 1, 9), (5, 2, 11), (3, 2, 1), (5, 1, 2), (3, 1, 28)])
@pytest.mark.parametrize("batch", [1, "N"])
def test_depthwise_blocked_shapes(compiler, k, s, hw, batch):
    """Depthwise convs on blocks where the kernel reaches past every border (planes of 1 and 2 pixels),
    strides 1 and 2, each epilogue in turn (the layout copies at the graph's edges included)."""
    for kind in ("clip", "hardswish", "silu"):
        g = G(k * 10 + s + hw)
        y = act(g, g.conv("x", 16, 16, k, stride=s, group=16), kind)
        model = g.model(y, 16, hw, hw, batch)
        cm = _check(compiler, model, (1, 16, hw, hw), target=AVX2, batches=(1,) if batch == 1 else (1, 2))
        assert "depthwise_blocked" in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


def test_networks_without_blocked_depthwise_keep_nchw(compiler):
    """No depthwise conv that the block divides (24 channels on AVX-512; ShuffleNet's 58, 116): no layout
    change. Compiled only (the host may lack AVX-512)."""
    g = G(3)
    y = act(g, g.conv("x", 8, 24, 1), "relu")
    y = act(g, g.conv(y, 24, 24, 3, group=24), "relu")
    cm = compiler.compile(g.model(y, 8, 9, 9, 1), target={"kind": "llvm", "mcpu": "skylake-avx512"})
    rules = cm.info["cpu_schedules"]
    assert "depthwise_planes" in rules.values() and "depthwise_blocked" not in rules.values(), rules


def test_blocked_setting_off_keeps_planes(compiler, monkeypatch):
    from bncompile.lower import graph_schedules as gs

    monkeypatch.setattr(gs, "CHANNEL_BLOCKED", False)
    g = G(4)
    y = act(g, g.conv(act(g, g.conv("x", 8, 16, 1), "relu"), 16, 16, 3, group=16), "relu")
    cm = _check(compiler, g.model(y, 8, 10, 10, 1), (1, 8, 10, 10), target=AVX2)
    assert "depthwise_planes" in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


def test_layout_block_and_tiling():
    from bncompile.lower.graph_schedules import depthwise_blocked_tiling, layout_block

    assert layout_block("NCHW16c") == 16 and layout_block("OIHW8o") == 8
    assert layout_block("NCHW") == 0 and layout_block("") == 0
    for regs in (16, 32):
        for ow in (1, 2, 5, 7, 13, 14, 28, 56, 112):
            for oh in (1, 3, 7, 14, 112):
                tw, th = depthwise_blocked_tiling(ow, oh, regs)
                assert ow % tw == 0 and oh % th == 0 and tw <= 8
                assert tw * th <= (20 if regs >= 32 else 8) or th == 1


def test_clip_bounds(compiler):
    """Clip as Relax maximum / minimum: constant bounds, a NaN bound (no bound), one bound missing,
    min > max (every value becomes max, as onnxruntime does)."""
    from onnx import TensorProto

    for lo, hi in ((0.0, 6.0), (np.nan, 1.0), (-1.0, np.nan), (None, 0.5), (0.5, None), (2.0, -1.0)):
        g = G(0)
        ins = ["x", g.c(lo) if lo is not None else "", g.c(hi) if hi is not None else ""]
        while ins[-1] == "":
            ins.pop()
        y = g.op("Clip", ins)
        model = g.model(y, 4, 3, 5, 2)
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
        x = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype(np.float32) * 3
        cm = compiler.compile(model)
        np.testing.assert_array_equal(cm.run({"x": x})["y"], M.ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("target", [AVX2, "llvm"])
def test_training_batchnorm_between_blocked_convs(compiler, target):
    """A training-mode BatchNormalization (bncompile's own kernel, a TIR call the layout pass cannot see
    into) between a blocked depthwise conv and a blocked 1x1 conv: layout copies around the kernel, the
    batch statistics and running updates as onnxruntime's."""
    from onnx import TensorProto, helper

    g = G(21)
    c = 16
    h = act(g, g.conv("x", 8, c, 1), "relu")
    h = g.conv(h, c, c, 3, stride=2, group=c)
    rng = np.random.default_rng(5)
    ins = [h, g.c(rng.uniform(0.5, 1.5, c)), g.c(rng.normal(size=c)), g.c(rng.normal(size=c)),
           g.c(rng.uniform(0.5, 2, c))]
    g.nodes.append(helper.make_node("BatchNormalization", ins, ["bn", "rm", "rv"], training_mode=1, momentum=0.8))
    y = g.conv(act(g, "bn", "clip"), c, 32, 1)
    model = g.model(y, 8, 9, 9, "N")
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, [c]) for n in ("rm", "rv")])
    cm = compiler.compile(model, target=target)
    x = np.random.default_rng(3).normal(1, 2, (3, 8, 9, 9)).astype(np.float32)
    got = cm.run({"x": x})
    want = M.ort_run(model, {"x": x})
    for k, w in zip(["y", "rm", "rv"], want):
        assert M.rel_err(got[k], w) < TOL, (k, M.rel_err(got[k], w))
    if target == AVX2:
        assert "depthwise_blocked" in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


@pytest.mark.parametrize("split", [(2, 14), (8, 8)])
def test_operators_outside_the_safe_set_keep_nchw(compiler, split):
    """A channel Split after a blocked depthwise conv. Where the block divides the split (8 + 8 on AVX2's
    blocks of 8), TVM's layout pass moves the Split onto the blocks; a random differential run found such a
    graph (splits, reflect pad, reshapes) returning garbage (1.9e36). Any operator outside BLOCKED_SAFE_OPS
    that would touch a blocked tensor keeps the whole network in NCHW: per-plane depthwise convs. Where it
    does not divide (2 + 14), the pass puts a layout copy before the Split and the rest stays blocked."""
    from onnx import helper

    g = G(28)
    h = act(g, g.conv("x", 8, 16, 1), "clip")
    h = g.op("Sigmoid", [g.conv(h, 16, 16, 5, stride=2, group=16)])
    outs = [f"s{k}" for k in range(2)]
    g.nodes.append(helper.make_node("Split", [h, g.c(np.array(split, np.int64))], outs, axis=1))
    g.inits[-1].data_type = 7                                          # int64 split sizes
    g.inits[-1].ClearField("float_data")
    g.inits[-1].raw_data = np.array(split, np.int64).tobytes()
    y = g.op("Concat", [g.op("Relu", [outs[1]]), g.op("Relu", [outs[0]])], axis=1)
    model = g.model(y, 8, 16, 16, "N")
    cm = _check(compiler, model, (1, 8, 16, 16), target=AVX2, batches=(1, 3))
    want = "depthwise_planes" if split == (8, 8) else "depthwise_blocked"
    assert want in cm.info["cpu_schedules"].values(), cm.info["cpu_schedules"]


# ---------------------------------------------------------------------- networks without depthwise convs

def _residual_stack(seed: int):
    """A random ResNet/RegNet-shaped stack: a stem conv (stride 1 or 2), maybe a max pool (kernel 2 or 3,
    stride 1 or 2, pads 0 or 1, floor or ceil mode), then bottleneck blocks: 1x1 -> 3x3 (one group, or
    groups of 8 channels; stride 1 or 2) -> 1x1 (+ a residual add, or a 1x1 projection shortcut), relu.
    ``(builder, output, input channels, height, width)``."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    g = G(seed)
    cin = int(rng.choice([3, 8]))
    h, w = int(rng.integers(9, 30)), int(rng.integers(9, 30))
    c = int(rng.choice([16, 24, 32]))
    x = act(g, g.conv("x", cin, c, 3, stride=int(rng.integers(1, 3))), "relu")
    if rng.random() < 0.7:
        k, s = int(rng.choice([2, 3])), int(rng.integers(1, 3))
        p = int(rng.integers(0, 2)) if k == 3 else 0
        g.n += 1
        out = f"maxpool{g.n}"
        g.nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                                        ceil_mode=int(rng.random() < 0.3)))
        x = out
    for _ in range(int(rng.integers(1, 4))):
        mid = int(rng.choice([16, 24, 32, 40]))
        s = int(rng.integers(1, 3))
        grouped = rng.random() < 0.3
        y = act(g, g.conv(x, c, mid, 1), "relu")
        y = act(g, g.conv(y, mid, mid, 3, stride=s, group=mid // 8 if grouped else 1), "relu")
        co = int(rng.choice([c, 32, 48, 64]))
        y = g.conv(y, mid, co, 1)
        short = x if (s == 1 and co == c) else g.conv(x, c, co, 1, stride=s)
        x = act(g, g.op("Add", [y, short]), "relu")
        c = co
    return g, x, cin, h, w


@pytest.mark.parametrize("seed", range(300, 310))
def test_residual_stacks_without_depthwise_convs(compiler, seed):
    """On AVX2 and AVX-512 (``ALL_NETWORKS_LANES``) networks with no depthwise conv carry the blocks too:
    their 1x1 and 3x3 convs, groups of 8 channels, residual adds, max pools and Winograd convs on NCHW8c
    (NCHW16c where 16 divides the channels), layout copies at the edges. Against onnxruntime, static and
    free batch; the AVX-512 build runs where the host has AVX-512, and is compiled everywhere."""
    g, y, cin, h, w = _residual_stack(seed)
    batch = "N" if seed % 2 else 2
    model = g.model(y, cin, h, w, batch)
    batches = (1, 3) if batch == "N" else (2,)
    cm = _check(compiler, model, (1, cin, h, w), target=AVX2, batches=batches)
    assert any("layout_transform" in name for name in cm.info["cpu_schedules"]), cm.info["cpu_schedules"]
    wide = {"kind": "llvm", "mcpu": "skylake-avx512"}
    if _host_has_avx512():
        wcm = _check(compiler, model, (1, cin, h, w), target=wide, batches=batches)
    else:
        wcm = compiler.compile(model, target=wide)
    assert any("layout_transform" in name for name in wcm.info["cpu_schedules"]), wcm.info["cpu_schedules"]


def _host_has_avx512() -> bool:
    try:
        return any(line.startswith("flags") and " avx512f" in line and " avx512vl" in line
                   for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def _bn(g, x, c):
    """An inference BatchNormalization over ``c`` channels with random statistics."""
    r = g.rng
    return g.op("BatchNormalization", [x, g.c(r.uniform(0.5, 1.5, c)), g.c(r.normal(0, 0.2, c)),
                                       g.c(r.normal(0, 0.3, c)), g.c(r.uniform(0.5, 2.0, c))], epsilon=1e-5)


def _dense_stack(seed: int):
    """A random DenseNet-shaped stack: a stem conv, maybe a max pool, dense blocks whose layers concatenate
    every earlier output -> batch norm -> relu -> 1x1 -> relu -> 3x3 (growth 8, 16 or 12: 12 leaves parts
    the block does not divide), transitions batch norm -> relu -> 1x1 -> average pool 2x2 (or 3x3 / 1,
    padded, counting the pad), a final batch norm -> relu -> global average pool. ``(builder, output,
    input channels, height, width, growth)``."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    g = G(seed)
    cin = int(rng.choice([3, 8]))
    h, w = int(rng.integers(12, 34)), int(rng.integers(12, 34))
    growth = int(rng.choice([8, 16, 12]))
    c = int(rng.choice([16, 24]))
    x = act(g, g.conv("x", cin, c, 3, stride=int(rng.integers(1, 3))), "relu")
    if rng.random() < 0.5:
        x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    for block in range(int(rng.integers(1, 3))):
        feats = [x]
        for _ in range(int(rng.integers(2, 4))):
            cat = g.op("Concat", feats, axis=1) if len(feats) > 1 else feats[0]
            y = g.op("Relu", [_bn(g, cat, c)])
            y = act(g, g.conv(y, c, 2 * growth, 1), "relu")
            feats.append(g.conv(y, 2 * growth, growth, 3))
            c += growth
        x = g.op("Concat", feats, axis=1)
        if block == 0:
            co = c // 2 // 8 * 8
            x = g.conv(g.op("Relu", [_bn(g, x, c)]), c, co, 1)
            if rng.random() < 0.7:
                x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            else:
                x = g.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4, count_include_pad=1)
            c = co
    x = g.op("Relu", [_bn(g, x, c)])
    del helper
    return g, g.op("GlobalAveragePool", [x]), cin, h, w, growth


@pytest.mark.parametrize("seed", range(400, 410))
def test_dense_stacks_on_blocks(compiler, seed):
    """DenseNet-shaped stacks (``BLOCKED_BATCH_NORM``, concat and average pools on blocks) against
    onnxruntime, static and free batch: with a growth the block divides they carry NCHW8c on AVX2 (the
    pools run as bncompile's blocked kernels); with growth 12 only the convs whose channels 8 divides do,
    concats of parts it does not divide stay NCHW."""
    g, y, cin, h, w, growth = _dense_stack(seed)
    batch = "N" if seed % 2 else 2
    cm = _check(compiler, g.model(y, cin, h, w, batch), (1, cin, h, w), target=AVX2,
                batches=(1, 3) if batch == "N" else (2,))
    rules = cm.info["cpu_schedules"]
    if growth % 8 == 0:
        assert sum("layout_transform" in n for n in rules) >= 1, rules
        pools = [r for n, r in rules.items() if "pool2d" in n]
        assert all(r == "depthwise_blocked" for r in pools), rules


@pytest.mark.parametrize("k,s,p,include,ceil", [(2, 2, 0, 0, 0), (3, 1, 1, 1, 0), (3, 2, 1, 1, 0), (3, 2, 1, 0, 0),
                                                (2, 1, 0, 0, 0), (3, 2, 0, 0, 1)])
def test_avg_pool_on_blocks(compiler, k, s, p, include, ceil):
    """An average pool between two blocked convs, odd sizes, against onnxruntime: bncompile's blocked pool
    where every window is divided by its size (no pad, or the pad counted), TVM's own on the blocks when the
    pad is not counted or in ceil mode."""
    g = G(k * 5 + s + p + include)
    x = act(g, g.conv("x", 3, 16, 3, stride=2), "relu")
    x = g.op("AveragePool", [x], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, count_include_pad=include,
             ceil_mode=ceil)
    y = act(g, g.conv(x, 16, 24, 1), "relu")
    cm = _check(compiler, g.model(y, 3, 23, 19, "N"), (1, 3, 23, 19), target=AVX2, batches=(1, 2))
    rules = cm.info["cpu_schedules"]
    assert sum("layout_transform" in n for n in rules) == 1, rules
    pools = [r for n, r in rules.items() if "avg_pool2d" in n]
    assert (pools == ["depthwise_blocked"]) == ((include or not p) and not ceil), rules


@pytest.mark.parametrize("k,s,p,ceil", [(3, 2, 1, 0), (2, 2, 0, 0), (3, 1, 1, 0), (3, 2, 0, 1), (2, 1, 0, 1), (3, 3, 1, 0)])
def test_max_pool_on_blocks(compiler, k, s, p, ceil):
    """A max pool between two blocked convs runs on the blocks (one layout copy, at the graph's output) as
    bncompile's blocked pool (not TVM's generic one: 10x slower on ResNet's), every window shape against
    onnxruntime (odd sizes: windows past the border, ceil mode)."""
    from onnx import helper

    g = G(k * 7 + s + p)
    x = act(g, g.conv("x", 3, 16, 3, stride=2), "relu")
    g.nodes.append(helper.make_node("MaxPool", [x], ["mp"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                                    ceil_mode=ceil))
    y = act(g, g.conv("mp", 16, 24, 1), "relu")
    model = g.model(y, 3, 23, 19, "N")
    cm = _check(compiler, model, (1, 3, 23, 19), target=AVX2, batches=(1, 2))
    rules = cm.info["cpu_schedules"]
    assert sum("layout_transform" in n for n in rules) == 1, rules
    assert "pool_planes" not in rules.values(), rules
    pools = [r for n, r in rules.items() if "max_pool2d" in n]
    assert pools == ["depthwise_blocked"], rules


@pytest.mark.parametrize("on_blocks", [True, False])
@pytest.mark.parametrize("ci,co,h,w,batch", [(32, 32, 16, 16, 1), (16, 24, 14, 15, "N"), (24, 16, 20, 17, 2)])
def test_winograd_convs_on_blocks(compiler, monkeypatch, on_blocks, ci, co, h, w, batch):
    """A 3x3 stride-1 conv big enough for Winograd inside a blocked chain still runs Winograd: on the blocks
    (reading and writing NCHW8c, no layout copy but at the graph's input and output), or with
    ``WINOGRAD_BLOCKED`` off in NCHW between layout copies. Odd widths (a tile past the last column), free
    and fixed batch, against onnxruntime."""
    monkeypatch.setattr(gs, "WINOGRAD_BLOCKED", on_blocks)
    g = G(41 + h * w)
    y = act(g, g.conv("x", 8, ci, 1), "relu")
    y = act(g, g.conv(y, ci, ci, 1), "relu")
    y = g.op("Add", [act(g, g.conv(y, ci, co, 3), "relu"), g.conv(y, ci, co, 1)])
    y = act(g, g.conv(y, co, 48, 1), "relu")
    cm = _check(compiler, g.model(y, 8, h, w, batch), (1, 8, h, w), target=AVX2,
                batches=(1, 3) if batch == "N" else (batch,))
    rules = cm.info["cpu_schedules"]
    assert "conv2d_winograd" in rules.values(), rules
    copies = sum("layout_transform" in n for n in rules)
    assert copies == 2 if on_blocks else copies >= 3, rules


@pytest.mark.parametrize("stride,h,w,batch", [(2, 14, 14, 1), (2, 15, 9, "N"), (3, 13, 11, 2)])
def test_strided_pointwise_convs_subsample(compiler, monkeypatch, stride, h, w, batch):
    """A strided 1x1 conv on blocks (ResNet's projections) copies the pixels it reads, then runs at stride
    1 (``SUBSAMPLE_STRIDED``): the same result as with the switch off and as onnxruntime's, odd sizes."""
    results = []
    for sub in (True, False):
        monkeypatch.setattr(gs, "SUBSAMPLE_STRIDED", sub)
        g = G(7 + h)
        y = act(g, g.conv("x", 16, 32, 1), "relu")
        wt = g.c(g.rng.standard_normal((40, 32, 1, 1)) * 0.2)
        y = g.op("Conv", [y, wt], kernel_shape=[1, 1], strides=[stride, stride], pads=[0] * 4)
        y = act(g, g.conv(y, 40, 24, 1), "relu")
        cm = _check(compiler, g.model(y, 16, h, w, batch), (1, 16, h, w), target=AVX2,
                    batches=(1, 3) if batch == "N" else (batch,))
        assert "layout_transform" in " ".join(cm.info["cpu_schedules"]), cm.info["cpu_schedules"]
        x = np.random.default_rng(h).standard_normal((batch if batch != "N" else 2, 16, h, w)).astype(np.float32)
        results.append(cm.run({"x": x})["y"])
    assert M.rel_err(results[0], results[1]) < TOL


def test_subsample_stage():
    """The strided 1x1 conv's TE: one copy stage of the read pixels, the conv at stride 1 over it; a 3x3
    strided conv, or a padded one, reads its input in place."""
    from bncompile.lower.tvm import tvm as _tvm

    te = _tvm().te
    x = te.placeholder((1, 4, 13, 11, 8), name="x")
    wp = te.placeholder((5, 32, 1, 1, 8), name="w")

    def stages(kernel, strides, padding):
        w = wp if kernel == (1, 1) else te.placeholder((5, 32, 3, 3, 8), name="w3")
        y = gs._conv2d_blocked_te(x, w, in_block=8, out_block=8, strides=strides, padding=padding,
                                  out_channels=40, padded_channels=40, kernel=kernel, out_dtype="float32", block=8,
                                  groups=1)
        seen, todo = set(), [y.op]
        while todo:
            op = todo.pop()
            if op.name not in seen:
                seen.add(op.name)
                todo.extend(t.op for t in op.input_tensors)
        return seen, [int(d) for d in y.shape]

    names, shape = stages((1, 1), [2, 2], [0, 0, 0, 0])
    assert gs.SUBSAMPLE_BLOCK in names and shape == [1, 5, 7, 6, 8]
    assert gs.SUBSAMPLE_BLOCK not in stages((3, 3), [2, 2], [1, 1, 1, 1])[0]
    assert gs.SUBSAMPLE_BLOCK not in stages((1, 1), [1, 1], [0, 0, 0, 0])[0]


# ---------------------------------------------------------------------- the input block unrolled

def _broadcast_fma_loops(asm: str) -> list[tuple[int, int]]:
    """``(FMAs, vector stack accesses)`` of each innermost loop of ``asm`` (AT&T syntax) that multiplies
    broadcast inputs (a packed conv's; a depthwise conv multiplies vectors) with at least 8 FMAs."""
    import re

    lines = asm.splitlines()
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.LBB\w+:", ln)}
    spans = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bj\w+\s+(\.LBB\w+)", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans.append((labels[m.group(1)], i))
    loops = []
    for a, b in spans:
        if any(a < c <= b and (c, d) != (a, b) for c, d in spans):
            continue                                    # an outer loop
        body = lines[a:b + 1]
        fmas = sum("vfmadd" in ln for ln in body)
        if fmas >= 8 and sum("vbroadcastss" in ln for ln in body) >= 4:
            loops.append((fmas, sum("(%rsp)" in ln and "mm" in ln for ln in body)))
    return loops


@pytest.mark.parametrize("target,lanes", [(AVX2, 8), ({"kind": "llvm", "mcpu": "znver4"}, 16)])
def test_blocked_input_channels_unrolled_without_spills(compiler, monkeypatch, target, lanes):
    """A packed conv reading NCHW{B}c steps through its input channels a block (at most
    ``UNROLL_STEP_MAX``) at a time, unrolled: its FMA loop holds that many channels' FMAs and no vector
    stack access (on znver4, a whole 16-channel block at a time spilled: 54 stack accesses per 224 FMAs).
    Compiled only: the assembly is read, nothing runs."""
    g = G(5)
    y = act(g, g.conv("x", 16, 64, 1), "relu")
    y = act(g, g.conv(y, 64, 64, 3, group=64), "relu")
    y = act(g, g.conv(y, 64, 96, 1), "relu")
    model = g.model(y, 16, 14, 14, 1)

    def loops(unroll: bool):
        monkeypatch.setattr(gs, "UNROLL_INPUT_BLOCK", unroll)
        cm = compiler.compile(model, target=target)
        return _broadcast_fma_loops(cm._executable.mod.imports[0].inspect_source("s"))

    step = min(lanes, gs.UNROLL_STEP_MAX)
    on, off = loops(True), loops(False)
    assert on and all(spills == 0 for _, spills in on), on
    assert max(f for f, _ in on) >= step * max(f for f, _ in off) // 2, (on, off)


@pytest.mark.parametrize("inplace,min_stride", [(True, 2), (True, 1), (False, 2)])
@pytest.mark.parametrize("width,stride,k", [(8, 1, 3), (8, 2, 3), (4, 2, 5), (2, 1, 3), (16, 1, 3)])
def test_grouped_convs_on_blocks(compiler, monkeypatch, width, stride, k, inplace, min_stride):
    """A grouped conv between blocked 1x1 convs (RegNet's bottleneck): groups of ``width`` channels that
    divide the block (8 on AVX2) run on the blocks with a block-diagonal weight, no layout copy around them,
    their padding read in place (``GROUPED_INPLACE_PAD``, from stride ``GROUPED_INPLACE_PAD_MIN_STRIDE``; or
    an NCHW copy of the padded view); groups of 16 keep NCHW between two copies. Against onnxruntime, static
    and free batch, odd sizes."""
    monkeypatch.setattr(gs, "GROUPED_INPLACE_PAD", inplace)
    monkeypatch.setattr(gs, "GROUPED_INPLACE_PAD_MIN_STRIDE", min_stride)
    g = G(width * 10 + stride + k)
    c = 48
    y = act(g, g.conv("x", 3, 32, 3, stride=2), "relu")
    y = act(g, g.conv(y, 32, c, 1), "relu")
    y = act(g, g.conv(y, c, c, k, stride=stride, group=c // width), "relu")
    y = act(g, g.conv(y, c, 32, 1), "relu")
    model = g.model(y, 3, 29, 26, "N")
    cm = _check(compiler, model, (1, 3, 29, 26), target=AVX2, batches=(1, 2))
    copies = sum("layout_transform" in n for n in cm.info["cpu_schedules"])
    assert copies == (1 if 8 % width == 0 else 3), cm.info["cpu_schedules"]


def test_block_diagonal_weight():
    from bncompile.lower.graph_schedules import _block_diagonal

    w = np.arange(8 * 2 * 3 * 3, dtype=np.float32).reshape(8, 2, 3, 3) + 1     # 4 groups of 2 channels
    d = _block_diagonal(w, 4)                                                   # blocks of 4: 2 groups each
    assert d.shape == (8, 4, 3, 3)
    for oc in range(8):
        start = (oc // 2) * 2 % 4
        np.testing.assert_array_equal(d[oc, start:start + 2], w[oc])
        assert not np.delete(d[oc], [start, start + 1], axis=0).any()


@pytest.mark.parametrize("seed", [301, 304])
def test_blocked_pad_switch(compiler, monkeypatch, seed):
    """``BLOCKED_PAD`` (off: measured slower on ResNet-50) pads the blocked tensor itself: still exact."""
    monkeypatch.setattr(gs, "BLOCKED_PAD", True)
    g, y, cin, h, w = _residual_stack(seed)
    _check(compiler, g.model(y, cin, h, w, "N"), (1, cin, h, w), target=AVX2, batches=(1, 2))


@pytest.mark.parametrize("batch", [1, "N"])
def test_nchw_convs_pack_their_input(compiler, monkeypatch, batch):
    """A DenseNet-shaped graph kept NCHW (Concat taken off the operators allowed on blocks, as ShuffleNet's
    channel shuffle keeps it NCHW): on AVX2 its unpadded one-group convs with at least
    PACK_MIN_OUTPUT_CHANNELS outputs and input channels the block divides copy their input into blocks inside
    their function; padded ones do not (unless BLOCKED_PAD). Against onnxruntime."""
    monkeypatch.setattr(gs, "BLOCKED_SAFE_OPS", gs.BLOCKED_SAFE_OPS - {"relax.concat"})
    packed = []
    real = gs._conv2d_packed_input_te

    def spy(x, wp, **kw):
        packed.append(tuple(int(d) for d in x.shape[1:]))
        return real(x, wp, **kw)

    monkeypatch.setattr(gs, "_conv2d_packed_input_te", spy)
    g = G(77)
    x, c = act(g, g.conv("x", 3, 32, 3, stride=2), "relu"), 32
    for _ in range(2):                                   # dense blocks: 1x1 -> 3x3 (16), concatenated
        y = act(g, g.conv(x, c, 64, 1), "relu")
        y = act(g, g.conv(y, 64, 16, 3), "relu")
        x, c = g.op("Concat", [x, y], axis=1), c + 16
    y = act(g, g.conv(x, c, 40, 1), "relu")
    _check(compiler, g.model(y, 3, 18, 15, batch), (1, 3, 18, 15), target=AVX2,
           batches=(1,) if batch == 1 else (1, 2))
    assert sorted(packed) == [(32, 9, 8), (48, 9, 8), (64, 9, 8)], packed


@pytest.mark.parametrize("shape,axis,training", [((2, 16, 5, 7), 1, False), ((3, 12), 1, False),
                                                 ((2, 5, 6, 16), 3, False), ((2, 16, 5, 7), 1, True)])
def test_batch_norm_as_scale_shift(shape, axis, training):
    """``_batch_norms_as_scale_shift``: an inference batch norm with constant statistics becomes ``x * s + t``
    (float64 constants rounded once, broadcast along its axis), the same values as the batch norm formula in
    float64 on random inputs; one in training mode is left as it is."""
    from bncompile.lower.tvm import tvm as _tvm

    tvm = _tvm()
    relax = tvm.relax
    rng = np.random.default_rng(len(shape) + axis)
    c = shape[axis]
    params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.5, c), rng.uniform(0.2, 2.0, c)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            bn = bb.emit(relax.op.nn.batch_norm(x, *(relax.const(p.astype(np.float32)) for p in params),
                                                axis=axis, epsilon=1e-3, training=training))
            y = bb.emit_output(relax.op.nn.relu(relax.TupleGetItem(bn, 0)))
        bb.emit_func_output(y)
    out = gs._batch_norms_as_scale_shift(bb.get())
    ops = []
    relax.analysis.post_order_visit(out["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call) else None)
    if training:
        assert "relax.nn.batch_norm" in ops, ops
        return
    assert "relax.nn.batch_norm" not in ops and "relax.multiply" in ops and "relax.add" in ops, ops
    ex = tvm.compile(out, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = rng.standard_normal(shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    gamma, beta, mean, var = (p.astype(np.float32).astype(np.float64) for p in params)
    bshape = [1] * len(shape)
    bshape[axis] = c
    want = np.maximum((xv - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3) * gamma.reshape(bshape)
                      + beta.reshape(bshape), 0)
    assert M.rel_err(got, want) < 1e-6


def test_three_vector_block_tiling():
    """On AVX2 a blocked-output conv whose channels two registers do not divide (24, 72, 120) takes a
    block of three registers and 4 pixels (12 accumulators) where the width (or width x rows) allows;
    not without ``odd`` (the NCHW and Winograd paths), not with 16 or 48 channels, not on AVX-512."""
    from bncompile.lower.tvm import tvm as _tvm

    tvm = _tvm()
    avx2, avx512 = tvm.target.Target(AVX2), tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert gs.conv_tiling(24, 56, avx2, out_height=56, odd=True) == (24, 4, 1)
    assert gs.conv_tiling(72, 28, avx2, out_height=28, odd=True) == (24, 4, 1)
    assert gs.conv_tiling(120, 14, avx2, out_height=14, odd=True) == (24, 2, 2)
    assert gs.conv_tiling(24, 7, avx2, out_height=7, odd=True) == (8, 7, 1)       # 24 x 1 is fewer lanes
    assert gs.conv_tiling(24, 56, avx2, out_height=56)[0] == 8
    assert gs.conv_tiling(48, 56, avx2, out_height=56, odd=True)[0] == 16
    assert gs.conv_tiling(24, 56, avx512, out_height=56, odd=True)[0] == 8           # half a register
    assert gs.conv_tiling(48, 56, avx512, out_height=56, odd=True)[0] == 16          # not 3 x 16
    assert gs.conv_tiling(24, 56, avx2, out_height=56, block=24) == (24, 4, 1)   # the schedule re-derives it


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("co,h,w,stride", [(24, 28, 28, 1), (72, 14, 12, 1), (24, 9, 7, 1), (120, 15, 13, 2)])
def test_three_vector_blocks(compiler, monkeypatch, on, co, h, w, stride):
    """Blocked convs to 24, 72 and 120 channels (three-register blocks on AVX2, ``THREE_VECTOR_BLOCKS``;
    widths 4 divides and does not) between depthwise convs, with a residual add and a clip epilogue, give
    onnxruntime's result with the switch on and off, static and free batch; on, the FMA loops of the
    12-accumulator tile touch no stack slot (no spill). The assembly is read on AVX2 whatever the host."""
    monkeypatch.setattr(gs, "THREE_VECTOR_BLOCKS", on)
    g = G(co + h + stride)
    y = act(g, g.conv("x", 3, 32, 3, stride=stride), "relu")
    y = act(g, g.conv(y, 32, 32, 3, group=32), "relu")
    y = g.conv(y, 32, co, 1)
    z = act(g, g.conv(y, co, co, 3, group=co), "relu")
    z = act(g, g.conv(z, co, co, 1), "clip")
    y = g.op("Add", [y, z])
    y = act(g, g.conv(y, co, co, 3, group=co), "relu")
    model = g.model(y, 3, h * stride, w * stride, "N")
    cm = _check(compiler, model, (1, 3, h * stride, w * stride), target=AVX2, batches=(1, 2))
    if on and w % 4 == 0:
        loops = _broadcast_fma_loops(cm._executable.mod.imports[0].inspect_source("s"))
        assert any(f >= 12 for f, _ in loops) and all(s == 0 for _, s in loops), loops


def test_flat_plan(monkeypatch):
    """Which convs run over the flattened plane (``FLAT_PIXEL_TILES``): 1x1, stride 1, unpadded, one group,
    NCHW{B}c on both sides, at most ``FLAT_MAX_PIXELS`` output pixels, AVX2, at most 1/8 zero channels, and
    at least ``FLAT_MIN_TILES`` tiles, and only where the 2-D tile has fewer accumulated lanes than 16 x 6 per
    computed pixel (the rounded-up tail counted)."""
    from bncompile.lower.tvm import tvm as _tvm

    tvm = _tvm()
    avx2, avx512 = tvm.target.Target(AVX2), tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    kw = dict(kernel=(1, 1), strides=(1, 1), padding=(0, 0, 0, 0), groups=1, in_block=8, out_block=8)

    def plan(o, oh, ow, target=avx2, **over):
        return gs.flat_plan(o, oh, ow, **dict(kw, **over), target=target)

    assert plan(440, 7, 7) == (16, 448, 5)            # RegNet's 440: 8 zero channels; 49 pixels as 10 x 5
    assert plan(2048, 7, 7) == (16, 2048, 5)
    assert plan(208, 14, 14) == (16, 208, 6)          # 16 x (2 x 2) before
    assert plan(960, 7, 7, out_block=16) == (16, 960, 5)
    assert plan(104, 28, 28) == (16, 112, 6)          # RegNet's 28x28: 16 x (4 x 2) of 8 channels before
    assert plan(48, 112, 112) == (16, 48, 6)          # 112 has no divisor 5-6: 16 x 4 before
    assert plan(104, 224, 224) is None                # above FLAT_MAX_PIXELS
    assert plan(40, 7, 7) is None                     # 8 zero channels of 48
    assert plan(120, 14, 14) is None                  # three registers x (2 x 2) is as many lanes
    assert plan(960, 1, 1) is None                    # a squeeze-excitation conv: 6 pixels computed for 1
    assert plan(64, 3, 3) is None                     # fewer than FLAT_MIN_TILES tiles
    assert plan(64, 5, 5) is None                     # 16 x 5 has as many lanes per computed pixel
    assert plan(64, 7, 7, target=avx512) is None
    assert plan(64, 7, 7, kernel=(3, 3)) is None
    assert plan(64, 7, 7, strides=(2, 2)) is None
    assert plan(64, 7, 7, padding=(1, 1, 1, 1)) is None
    assert plan(64, 7, 7, groups=2) is None
    assert plan(64, 7, 7, in_block=0) is None
    assert plan(64, 7, 7, out_block=0) is None
    assert plan(64, 7, 7, out_block=32) is None       # 16-channel tiles must hold whole output blocks
    monkeypatch.setattr(gs, "FLAT_MAX_PIXELS", 784)
    assert plan(104, 28, 28) == (16, 112, 6)          # 7 blocks: the plane in 2 chunks (flat_chunks)
    assert plan(104, 56, 56) is None
    assert gs.flat_chunks(28, 49) == 1
    assert gs.flat_chunks(7, 784) == 2
    assert gs.flat_chunks(2, 400) == 4
    assert gs.flat_chunks(1, 49) == 2                  # each chunk at least FLAT_MIN_TILES tiles
    assert gs.flat_chunks(1, 196) == 7                 # 8 chunks would round 33 tiles up to 40
    assert gs.flat_chunks(1, 99) == 4                  # 20 tiles of 5
    # chunks of at most FLAT_CHUNK_BYTES of input: 256 x 3136 x 4 bytes in 25 (523 tiles rounded up to 525)
    assert gs.flat_chunks(4, 3136, 256) == 25
    assert gs.flat_chunks(8, 576, 192) == 4
    assert gs.flat_chunks(7, 784, 104) == 3
    assert gs.flat_chunks(28, 49, 440) == 1            # at least FLAT_MIN_TILES tiles a chunk wins
    assert gs.flat_chunks(32, 49, 2048) == 1           # fewer than FLAT_BYTES_MIN_TILES tiles: not cut by bytes
    assert gs.flat_chunks(6, 196, 576) == 2


def test_flat_tile(monkeypatch):
    """The pixel tile of a flattened plane (``flat_tile``): 6 unless 5 computes enough fewer pixels to pay
    for its extra tiles (``FLAT_TILE_COST`` each), 6 on a tie and with ``FLAT_TILES`` empty or just 6."""
    assert [gs.flat_tile(p) for p in (49, 25, 99, 9)] == [5, 5, 5, 5]
    assert [gs.flat_tile(p) for p in (36, 64, 196, 784, 3136, 12544)] == [6] * 6
    for pixels in range(1, 800):
        tile = gs.flat_tile(pixels)
        cost = {t: -(-pixels // t) * (t + gs.FLAT_TILE_COST) for t in (5, 6)}
        assert cost[tile] == min(cost.values()) and (tile == 6 or cost[5] < cost[6]), pixels
    monkeypatch.setattr(gs, "FLAT_TILES", (6,))
    assert gs.flat_tile(49) == 6
    monkeypatch.setattr(gs, "FLAT_TILES", ())
    assert gs.flat_tile(49) == gs.FLAT_TILE


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("ci,co,h,w,kind", [(32, 440, 7, 7, "relu"), (48, 48, 7, 7, "clip"), (24, 56, 5, 5, "silu"), (16, 64, 1, 1, "sigmoid"),
                                            (16, 208, 14, 14, "hardswish"), (32, 96, 3, 3, "sigmoid"),
                                            (16, 16, 9, 11, "relu"),
                                            (32, 104, 28, 28, "relu"), (16, 32, 20, 20, "clip"),
                                            (192, 128, 24, 24, "relu")])
def test_flat_pixel_tiles(compiler, monkeypatch, on, ci, co, h, w, kind):
    """1x1 convs on small planes between depthwise convs (NCHW{B}c both sides), run over the flattened plane
    in tiles of 6 or 5 pixels (``FLAT_PIXEL_TILES``, ``flat_tile``: planes of 1 to 784 pixels, most not a
    multiple of the tile; 7x7, 5x5 and 9x11 in tiles of 5; 440, 56
    and 104 channels padded to 16; 28x28, 20x20 and 24x24 in chunks of the plane, 24x24's 192 input
    channels cut by ``FLAT_CHUNK_BYTES``; ``FLAT_MAX_PIXELS`` at 784 for every case, the default limit is
    checked by ``test_flat_plan``), with a bias, an activation epilogue and a residual add where the channels
    allow: onnxruntime's result with the switch on and off, static and free
    batch (1 and 3). On: the function is scheduled by the packed-conv rule, and its FMA loop keeps the 12
    accumulators in registers (no stack access), read from the AVX2 assembly whatever the host."""
    monkeypatch.setattr(gs, "FLAT_PIXEL_TILES", on)
    monkeypatch.setattr(gs, "FLAT_MAX_PIXELS", 784)
    g = G(ci + co + h)
    y = act(g, g.conv("x", 3, ci, 3), "relu")
    y = act(g, g.conv(y, ci, ci, 3, group=ci), "relu")
    y = act(g, g.conv(y, ci, co, 1), kind)
    if co == ci:
        y = g.op("Add", [y, act(g, g.conv(y, co, co, 1), "relu")])
    y = act(g, g.conv(y, co, co, 3, group=co), "relu")
    model = g.model(y, 3, h, w, "N")
    cm = _check(compiler, model, (1, 3, h, w), target=AVX2, batches=(1, 3))
    flat = {name: rule for name, rule in cm.info["cpu_schedules"].items() if "flat" in name}
    assert any("blocked" in name for name in cm.info["cpu_schedules"])     # the chain is channel-blocked
    if not on:
        assert not flat
        return
    expect = gs.flat_plan(co, h, w, kernel=(1, 1), strides=(1, 1), padding=(0, 0, 0, 0), groups=1, in_block=8,
                          out_block=8, target=_tvm_target(AVX2))
    if expect is None:
        assert not flat
        return
    assert flat and set(flat.values()) == {"conv2d_nchw16o"}, cm.info["cpu_schedules"]
    loops = _broadcast_fma_loops(_functions_asm(cm._executable.mod.imports[0].inspect_source("s"), "flat16o"))
    assert any(f >= 12 for f, _ in loops) and all(s == 0 for _, s in loops), loops


def _functions_asm(asm: str, part: str) -> str:
    """The assembly of the functions whose symbol contains ``part`` (each from its label to its
    ``.Lfunc_end``) and of the parallel-loop bodies they launch (``.L__tvm_parallel_lambda...``)."""
    import re

    sections, name, cur = {}, None, []
    for line in asm.splitlines():
        label = re.match(r"^([A-Za-z_.][\w.$]*):", line)
        if label and (not label.group(1).startswith(".L") or "parallel_lambda" in label.group(1)):
            name, cur = label.group(1), []
            sections[name] = cur
        if name is not None:
            cur.append(line)
        if line.startswith(".Lfunc_end"):
            name = None
    keep = [k for k in sections if part in k]
    lambdas = {m for k in keep for m in re.findall(r"\.L__tvm_parallel_lambda[\w.]*", "\n".join(sections[k]))}
    keep += [k for k in sections if k in lambdas]
    assert keep, f"no function named like {part!r} in the assembly"
    return "\n".join(line for k in keep for line in sections[k])


def _tvm_target(spec):
    from bncompile.lower.tvm import tvm as _tvm

    return _tvm().target.Target(spec)
