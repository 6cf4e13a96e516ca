"""The CPU schedules of ``bncompile.compile`` for llvm (:mod:`bncompile.lower.graph_schedules`): correctness only
(no timing asserts). Every case is checked against onnxruntime; the rules that ran are read from
``CompiledModel.info["cpu_schedules"]``; unusual convolutions must fall back to TVM's legalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import helpers.compile_models as M

pytestmark = pytest.mark.tvm

TOL = 1e-4          # max abs error / max |reference|, float32
#: where a test asserts WHICH rule schedules a function, the choice depends on the vector width, so the
#: target's CPU is pinned: AVX2 code runs on every x86-64 CPU these tests run on (AVX2 and AVX-512 alike)
AVX2 = {"kind": "llvm", "mcpu": "haswell"}


def _conv_model(*, ci, co, h, w, k=3, stride=1, pads=None, group=1, dilation=1, bias=True, relu=True,
                weight_input=False, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    pads = [k // 2] * 4 if pads is None else list(pads)
    wt = (rng.standard_normal((co, ci // group, k, k)) * np.sqrt(2.0 / (ci * k * k))).astype(np.float32)
    inits, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, ci, h, w])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(wt.shape)))
    else:
        inits.append(numpy_helper.from_array(wt, "W"))
    conv_in = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "B"))
        conv_in.append("B")
    nodes = [helper.make_node("Conv", conv_in, ["c"], kernel_shape=[k, k], strides=[stride, stride], pads=pads,
                              group=group, dilations=[dilation, dilation])]
    out = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        out = "y"
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    del out
    g = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    return model, wt


def _check(compiler, model, feeds, **kw):
    cm = compiler.compile(model, target=kw.pop("target", "llvm"), **kw)
    got = cm.run(feeds)["y"]
    want = M.ort_run(model, feeds)[0]
    assert got.shape == want.shape
    assert M.rel_err(got, want) < TOL
    return cm


CONV_CASES = {
    # name: (conv kwargs, the rule expected for the conv function)
    # 3x3 stride 1 with an output of 14 rows and columns or more: Winograd F(2x2, 3x3), in chunks of output
    # rows when the rows are even; the tile columns (7 here) take the register tile (AVX2: 8 channels x 7)
    "3x3_56": (dict(ci=16, co=32, h=14, w=14), "conv2d_winograd"),
    "odd_rows_direct": (dict(ci=8, co=16, h=15, w=14), "conv2d_nchw16o"),     # odd output rows: direct
    "3x3_s2_direct": (dict(ci=8, co=16, h=32, w=32, stride=2), "conv2d_nchw16o"),  # 16x16 output, stride 2
    "3x3_dilated_large": (dict(ci=4, co=16, h=20, w=20, dilation=2, pads=[2, 2, 2, 2]), None),
    "winograd_batch_3": (dict(ci=8, co=16, h=16, w=16, batch=3), "conv2d_winograd"),
    "winograd_asym_pads": (dict(ci=5, co=16, h=16, w=17, pads=[0, 1, 2, 0]), "conv2d_winograd"),
    "winograd_no_pad": (dict(ci=12, co=16, h=18, w=18, pads=[0, 0, 0, 0], bias=False, relu=False), "conv2d_winograd"),
    "winograd_many_chunks": (dict(ci=16, co=16, h=28, w=28), "conv2d_winograd"),
    "3x3_small": (dict(ci=16, co=32, h=12, w=12), "conv2d_nchw16o"),       # under 14 output rows: direct
    "first_7x7_s2": (dict(ci=3, co=16, h=20, w=20, k=7, stride=2), "conv2d_nchw16o"),
    "1x1_s2_nopad": (dict(ci=8, co=16, h=9, w=9, k=1, stride=2, pads=[0, 0, 0, 0]), "conv2d_nchw16o"),
    "prime_width": (dict(ci=4, co=24, h=5, w=13), "conv2d_nchw16o"),
    "width_7_block_8": (dict(ci=8, co=8, h=7, w=7), "conv2d_nchw16o"),
    "asym_pads_nonsquare": (dict(ci=5, co=16, h=6, w=11, pads=[0, 1, 2, 0]), "conv2d_nchw16o"),
    "no_bias_no_relu": (dict(ci=4, co=16, h=8, w=8, bias=False, relu=False), "conv2d_nchw16o"),
    # grouped: a block of 8 output channels inside each group of 8
    "grouped": (dict(ci=8, co=16, h=8, w=8, group=2), "conv2d_nchw16o"),
    # TVM's legalization (still scheduled by the generic rules, never by the packed-conv rule)
    # 10 channels: 12 zero-padded (a half AVX2 register), then a slice
    "oc_padded_to_a_block": (dict(ci=4, co=10, h=8, w=8), "conv2d_nchw16o"),
    "oc_too_few_to_pad": (dict(ci=4, co=5, h=8, w=8), None),
    "grouped_3_per_group": (dict(ci=6, co=6, h=8, w=8, group=2), None),
    "dilated": (dict(ci=4, co=16, h=10, w=10, dilation=2, pads=[2, 2, 2, 2]), None),
    "weight_is_an_input": (dict(ci=4, co=16, h=8, w=8, weight_input=True), None),
}


@pytest.mark.parametrize("target", ["host", "avx2"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_cases_match_onnxruntime(compiler, case, target):
    """Every case matches onnxruntime on the host CPU; with the CPU pinned to AVX2 the rule is asserted."""
    kw, rule = CONV_CASES[case]
    model, wt = _conv_model(**kw)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((kw.get("batch", 1), kw["ci"], kw["h"], kw["w"])).astype(np.float32)}
    if kw.get("weight_input"):
        feeds["W"] = wt
    cm = _check(compiler, model, feeds, target="llvm" if target == "host" else AVX2)
    if target == "host":
        return
    rules = cm.info["cpu_schedules"]
    conv_rules = [r for name, r in rules.items() if "conv" in name]
    assert conv_rules, rules
    if rule is None:
        assert not {"conv2d_nchw16o", "conv2d_winograd"} & set(conv_rules), rules
    else:
        assert conv_rules == [rule], rules


@pytest.mark.parametrize("name", list(M.MODELS))
def test_models_dynamic_batch(compiler, name):
    """Symbolic batch: the packed conv and the generic rules with a free ``N``."""
    model = M.MODELS[name](None)
    cm = compiler.compile(model, target="llvm")
    for batch in (1, 3):
        x = M.input_for(model, batch, seed=batch)
        got = cm.run({"x": x})["y"]
        assert M.rel_err(got, M.ort_run(model, {"x": x})[0]) < TOL
    assert "default" not in cm.info["cpu_schedules"].values() or name == "mlp"


def _resnet18(size):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resnet18(size=size)


@pytest.mark.parametrize("batch", [1, 2])
def test_resnet18_style_matches_onnxruntime(compiler, batch):
    """The benchmark network (small input): every conv by the packed rule, Gemm, pools; folded BN."""
    model = _resnet18(32)
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    cm = compiler.compile(model, target=AVX2, input_shapes={"input": x.shape})
    got = cm.run({"input": x})["logits"]
    want = M.ort_run(model, {"input": x})[0]
    assert M.rel_err(got, want) < TOL
    rules = cm.info["cpu_schedules"]
    assert sum(r == "conv2d_nchw16o" for r in rules.values()) >= 10, rules
    assert all(r == "conv2d_nchw16o" for n, r in rules.items() if "conv" in n), rules


def _pool_gemm_model():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((24, 8 * 3 * 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "B")]
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["a"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "B"], ["g"], transB=1),
             helper.make_node("Sigmoid", ["g"], ["y"])]
    g = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 11, 11])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def test_pools_gemm_elementwise_match_onnxruntime(compiler):
    model = _pool_gemm_model()
    x = np.random.default_rng(4).standard_normal((2, 8, 11, 11)).astype(np.float32)
    _check(compiler, model, {"x": x})


def test_generic_x86_64_target_runs(compiler):
    """SSE2 only (4 lanes): the tiles follow the target's features, not the host's."""
    model, _ = _conv_model(ci=8, co=16, h=10, w=10)
    x = np.random.default_rng(5).standard_normal((1, 8, 10, 10)).astype(np.float32)
    cm = _check(compiler, model, {"x": x}, target="x86_64")
    assert "conv2d_nchw16o" in cm.info["cpu_schedules"].values()


def _scheduled_conv(hw, wshape, *, padding=(1, 1, 1, 1), strides=(1, 1)):
    """``(function name, rule, scheduled TVMScript)`` of conv2d + relu on a ``(1, C) + hw`` input for AVX2."""
    from bncompile.lower import tvm as _shim
    tvm, relax = _shim.tvm(), _shim.submodule("tvm.relax")

    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.targets import target_dict

    T = tvm.target.Target(target_dict(AVX2))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, wshape[1]) + tuple(hw), "float32"))
    w = np.random.default_rng(0).standard_normal(wshape).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w), strides=list(strides),
                                                            padding=list(padding))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": gs.legalize_conv2d}),
        relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
        relax.transform.FuseTIR()])
    with T:
        mod = seq(bb.get())
    funcs = [(gv.name_hint, f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1, [n for n, _ in funcs]      # conv and relu fused into one function
    report: dict = {}
    new = gs.schedule_module(mod, T, report)
    return funcs[0][0], report[funcs[0][0]], new[funcs[0][0]].script()


def test_conv_schedule_shape(compiler):
    """The packed conv function is parallel, vectorized, and has no predicate (even splits only)."""
    name, rule, text = _scheduled_conv((12, 12), (32, 16, 3, 3))
    assert "conv2d_nchw16o" in name and rule == "conv2d_nchw16o"
    assert "T.parallel" in text and "T.vectorized" in text
    assert "T.where" not in text


@pytest.mark.parametrize("hw", [(16, 16), (14, 15), (28, 30)])
def test_winograd_schedule_shape(compiler, hw):
    """A 3x3 stride-1 conv with 14 output rows and columns or more (even rows) is the Winograd function,
    its stages in chunks of output rows under one parallel loop, vectorized, no predicate."""
    name, rule, text = _scheduled_conv(hw, (32, 16, 3, 3))
    assert "conv2d_winograd" in name and rule == "conv2d_winograd"
    assert "T.parallel" in text and "T.vectorized" in text
    assert "T.where" not in text
    assert text.count("T.parallel") == 1, text


def test_winograd_not_for_odd_rows_or_stride_2(compiler):
    """Odd output rows (no even chunk of whole tile rows) and stride 2 keep the direct packed conv."""
    for hw, stride in [((15, 16), 1), ((32, 32), 2)]:
        name, rule, _ = _scheduled_conv(hw, (32, 16, 3, 3), strides=(stride, stride))
        assert "conv2d_nchw16o" in name and rule == "conv2d_nchw16o", (hw, stride, name, rule)


def test_winograd_chunk_rows():
    from bncompile.lower.graph_schedules import WINOGRAD_CHUNK_BYTES, winograd_chunk_rows

    assert winograd_chunk_rows(28, 28, 64, 64, 56) == 2       # 16 x 128 x 2 x 28 x 4 B = 458 KB, 14 chunks
    assert winograd_chunk_rows(28, 28, 128, 32, 56) == 1      # 2 rows: 573 KB
    assert winograd_chunk_rows(14, 14, 128, 128, 28) == 1     # 14 chunks (k = 2 would give 7: odd)
    assert winograd_chunk_rows(7, 7, 256, 256, 14) == 1       # 7 tile rows: 1 or 7 (one chunk: no parallelism)
    assert winograd_chunk_rows(8, 8, 16, 16, 15) == 0         # odd output rows: none
    assert winograd_chunk_rows(2, 8, 8, 8, 4) == 1
    for th, tw, c, o, oh in [(28, 28, 64, 64, 56), (14, 14, 32, 32, 28), (8, 8, 4, 8, 16), (56, 56, 16, 16, 112)]:
        k = winograd_chunk_rows(th, tw, c, o, oh)
        assert th % k == 0 and oh % (2 * k) == 0
        assert k == 1 or 16 * (c + o) * k * tw * 4 <= WINOGRAD_CHUNK_BYTES


def test_winograd_weight_transform():
    """``winograd_weight``: G g G^T per filter, packed [16, O/B, I, B]; with B^T d B and A^T m A it gives
    the 3x3 correlation of a 4x4 tile exactly (float64 check of the algebra)."""
    from bncompile.lower.kernels.conv2d_packed import winograd_weight

    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    u = winograd_weight(w, 8)
    assert u.shape == (16, 2, 3, 8) and u.dtype == np.float32
    bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
    d = rng.standard_normal((3, 4, 4))
    for o in (0, 5, 15):
        uo = u[:, o // 8, :, o % 8].reshape(4, 4, 3)                 # [a, b, channel]
        m = sum(uo[:, :, c] * (bt @ d[c] @ bt.T) for c in range(3))
        got = at @ m @ at.T
        want = np.array([[sum((d[c, i:i + 3, j:j + 3] * w[o, c]).sum() for c in range(3)) for j in range(2)]
                         for i in range(2)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bncompile_kernels_are_left_alone(compiler):
    """Training-mode BN becomes OUR call_tir kernel: never rescheduled, never fused."""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower import tvm as _shim
    tvm = _shim.tvm()

    rng = np.random.default_rng(6)
    c = 16
    inits = [numpy_helper.from_array(rng.standard_normal((c, 4, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "g"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b"),
             numpy_helper.from_array(np.zeros(c, np.float32), "m"),
             numpy_helper.from_array(np.ones(c, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn", "rm", "rv"],
                              training_mode=1, momentum=0.9),
             helper.make_node("Relu", ["bn"], ["y"])]
    g = helper.make_graph(nodes, "train", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "rm", "rv")],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    cm = compiler.compile(model, target="llvm")
    got = cm.run({"x": x})
    want = M.ort_run(model, {"x": x})
    for i, name in enumerate(("y", "rm", "rv")):
        assert M.rel_err(got[name], want[i]) < TOL, name
    assert cm.info["kernels"], cm.info
    assert not any(n.startswith("bncompile_bn") for n in cm.info["cpu_schedules"]), cm.info["cpu_schedules"]
    # and the module-level rule: a function with a global_symbol is "ours"
    f = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0)).with_attr("global_symbol", "bncompile_bn_0")
    assert gs._is_ours(f)


def test_dynamic_shapes_keep_alias_info(compiler):
    """With a symbolic batch, VMShapeLower adds a ``shape_func`` without ``tirx.noalias``; TVM's LLVM codegen
    then drops the alias info of every function in the module (the conv accumulators go to memory after
    each FMA, 2.5x slower). The pipeline gives single-buffer functions the attribute: every PrimFunc of the
    lowered module must carry it."""
    from bncompile.lower import tvm as _shim
    tvm, relax = _shim.tvm(), _shim.submodule("tvm.relax")

    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.targets import target_dict

    T = tvm.target.Target(target_dict("llvm"))
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 8, 6, 6), "float32"))
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1])))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with T:
        mod = gs.pipeline(T)(bb.get())
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "shape_func" in funcs, list(funcs)
    for name, f in funcs.items():
        assert f.attrs is not None and "tirx.noalias" in f.attrs, name
    ex = tvm.compile(bb.get(), target=T, relax_pipeline=gs.pipeline(T))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xs = np.random.default_rng(1).standard_normal((3, 8, 6, 6)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xs)).numpy()
    ref = tvm.compile(bb.get(), target=T)
    want = relax.VirtualMachine(ref, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    assert M.rel_err(got, want) < TOL
