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
