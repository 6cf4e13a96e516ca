"""Generic CPU schedules for the PrimFuncs of a whole-graph ``llvm`` compile.

TVM 0.27's default Relax pipeline for CPU targets legalizes every operator to a naive, serial PrimFunc
(no fusion, no parallel loops, no vectorization): the ResNet-18 of ``benchmarks/bench_models.py`` ran
~50x slower than onnxruntime. :func:`pipeline` is the Relax pipeline :func:`bncompile.lower.driver.compile`
uses for ``llvm`` targets instead: TVM's ``cpu_generic`` pipeline, built from its own pass lists
(``relax.backend.cpu_generic.{library_dispatch,legalize,dataflow_lower,finalize}_passes``), with these changes.

1. ``nn.conv2d`` (NCHW/OIHW, float32, dilation 1, a constant weight, output channels of a group a multiple
   of the channel block) is legalized to OUR compute (:mod:`bncompile.lower.kernels.conv2d_packed`), whose
   weight is packed at compile time to ``[O/B, I/groups, KH, KW, B]``, so a vector of B output channels
   loads contiguously (grouped: a block stays inside one group); output channels that no block divides are
   zero-padded to one (:func:`padded_channels`; also half-register channel counts up to whole registers when
   that adds at most :data:`WHOLE_REGISTER_WASTE`) and sliced back. Depthwise convs (static channels/height/
   width) and ``nn.max_pool2d`` (floor mode) go to :func:`~bncompile.lower.kernels.conv2d_packed.depthwise_conv2d_te`
   / ``max_pool2d_te``: per channel a zero-(or lowest-)padded plane whose columns are split by the stride's
   phase, so every output row is read as vectors. Every other conv2d keeps TVM's legalization (and gets
   the generic rules below). A 3x3 stride-1 conv of one group with at least :data:`WINOGRAD_MIN_OUTPUT`
   output rows (an even number) and columns is legalized to Winograd's F(2x2, 3x3) instead
   (:func:`~bncompile.lower.kernels.conv2d_packed.conv2d_winograd_te`, weight transformed at compile time):
   2.25x fewer multiply-adds, errors against onnxruntime no larger than the direct conv's.
   Before that, a network with a depthwise conv whose channels the target's vector lanes B (8 or more) divide
   is carried in the channel-blocked layout ``NCHW{B}c`` (:func:`channel_blocked`, onnxruntime's NCHWc idea):
   TVM's ``ConvertLayout`` with a per-call choice (:func:`_blocked_layouts`) gives each conv our legalization
   handles a blocked input where B divides its input channels and a blocked output where B divides its output
   channels (depthwise: both or neither), propagates the layout through the element-wise ops, reductions and
   residual adds between them, and puts layout copies only where a tensor changes hands (the network's input
   and output, channel counts B does not divide). Depthwise convs on blocks
   (:func:`~bncompile.lower.kernels.conv2d_packed.depthwise_blocked_te`) read a vector of B channels per input
   pixel at any stride, the border read at the clamped pixel and blended to zero; the packed conv reads blocks
   through an inlined index and writes them as whole vectors (its NCHW write-back scattered the channels-last
   accumulators). Clip is emitted as Relax ``maximum`` / ``minimum`` (the frontend's ``Clip`` converter;
   ``clip`` from HardSwish / HardSigmoid is rewritten) because ``ConvertLayout`` has no rule for ``clip``.
   A 3x3 conv that Winograd takes reads and writes the blocks too (:data:`WINOGRAD_BLOCKED`); a strided 1x1
   conv copies the pixels it reads first (:data:`SUBSAMPLE_STRIDED`); max and average pools run on the blocks
   (:func:`~bncompile.lower.kernels.conv2d_packed.max_pool_blocked_te`, ``avg_pool_blocked_te``); inference
   batch norms become ``x * s + t`` first (:func:`_batch_norms_as_scale_shift`) and concats along whole blocks
   stay on them (DenseNet). The layout is kept only when every operator on a blocked
   tensor is in :data:`BLOCKED_SAFE_OPS` (else the module stays NCHW). A matmul by a constant matrix (ONNX
   Gemm / MatMul) is legalized to a packed dense (:func:`legalize_matmul`: the weight in contiguous panels of
   V outputs), after a ``FoldConstant`` that runs before legalization.
2. ``AnnotateTIROpPattern`` + ``FoldConstant`` + ``FuseOps`` + ``FuseTIR``, TVM's (conv + bias + relu +
   residual add become one PrimFunc). bncompile's own kernels (functions with a ``global_symbol``) are
   marked opaque first, so they are never fused.
3. :func:`schedule_module` gives each PrimFunc the first rule that applies, with dlight's
   ``ApplyDefaultSchedule``. Every rule has dlight's contract, ``apply(func, target, tunable) -> Schedule |
   None`` (None: does not apply; a rule that raises does not apply either, and a function no rule takes
   is compiled as the default pipeline compiles it, correct but slow):

   * :func:`schedule_winograd`: the Winograd conv, in chunks of output rows whose transformed input and
     products stay in L2 (:func:`winograd_chunk_rows`), the products as the packed conv's register tile;
   * :func:`schedule_conv`: the packed conv. Register tile of B channels (vectorized) x a width tile x a row
     tile, the reduction loops outside it, a local channels-last accumulator, the fused epilogue inlined into
     the write-back, parallel over batch x channel blocks x row tiles, the pad parallel and vectorized. A
     flattened-plane conv (:data:`FLAT_PIXEL_TILES`) instead from its output: the epilogue inlined into the
     output store, parallel over batch x chunks of the plane x 16-channel blocks, the conv computed under
     each 6-pixel tile of the store (:func:`_schedule_flat_conv`);
   * :func:`schedule_depthwise_blocked` (``depthwise_blocked``): parallel over batch x channel blocks x
     row tiles, a register tile of rows x pixels of B-channel vectors, window unrolled;
   * :func:`schedule_depthwise` (``depthwise_planes``; ``pool_planes`` for the max pool): parallel over
     batch x channels, the padded plane per channel (zeros, then the in-bounds copy, then the phase split:
     all vectorized), a register tile of rows x a width vector (:func:`depthwise_tiling`), window unrolled;
   * :func:`schedule_dense_packed` (``dense_packed``): the packed dense, each panel's V outputs accumulated
     in registers over the reduction;
   * :func:`schedule_inner_vector_reduction`: one reduction whose output's innermost axis is also the
     innermost axis of an input (dense/matmul with a ``[K, N]`` weight): that axis vectorized inside the
     reduction, local accumulator, epilogue inlined, parallel outside;
   * :func:`schedule_global_pool`: a reduction over the innermost axes of one input (global average/max
     pooling): a tile of channels reduced as independent scalar chains, the epilogue at write-back;
   * dlight's ``cpu.GEMV`` / ``cpu.Reduction``;
   * :func:`schedule_generic`: spatial blocks inlined where possible, then every root block: spatial ->
     innermost loop vectorized when it divides evenly, the others fused and parallel; simple reduction
     (pooling...) -> spatial loops fused and parallel, small windows unrolled.

   Functions with a ``global_symbol`` or ``tirx.is_scheduled`` (bncompile's hand-scheduled batch-norm
   kernels) are never touched. ``CompiledModel.info["cpu_schedules"]`` records the rule of each function.
4. Single-buffer functions get ``tirx.noalias`` before ``AttachGlobalSymbol`` (see :func:`pipeline`).

Tile sizes come from the TARGET's features (:func:`vector_lanes`), not from the CPU's name (a hypervisor
may hide AVX-512 from a CPU LLVM names as an AVX-512 one). On AVX2 the channel block is 16 (two ymm) or 8
and the 2-D tiles use at most 10 accumulators: 16 x 4 for widths 112/56/28, 16 x (2 x 2) for 14x14, 8 x 7
for 7x7 (12 already spilled there, see :data:`ACC_CAP`). Two exceptions hold 12 without a spill (tests read
the assembly): three-register blocks x 4 pixels (:data:`THREE_VECTOR_BLOCKS`), and 1x1 stride-1 convs
between channel-blocked tensors on planes of 24-12544 pixels where it beats the 2-D tile (:func:`flat_plan`),
run over the flattened plane, 16 channels x 6 pixels, or 5 where that rounds the plane up less
(:data:`FLAT_PIXEL_TILES`, :func:`flat_tile`). Zero-pad blocks left at the
root are decomposed into
zeros plus an in-bounds copy (:func:`_decompose_root_pads`); a packed conv's costly epilogue (a sigmoid)
runs on channel vectors before the NCHW store (:func:`_epilogue_on_channel_vectors`).

Splits of a computed block are even (divisible) ones: TVM can drop the ``T.where`` predicate of an uneven
split after ``compute_at`` moves (see docs/tvm-0.27.md), which reads out of bounds without an error. Two
predicates exist, both on stores: the channel slice of a zero-padded conv moved into the conv's tile
(:func:`_slice_in_tile`: made by that ``reverse_compute_at`` itself), and :func:`_schedule_flat_conv`'s
uneven splits of the OUTPUT store (its flattened plane and its 16-channel blocks of padded channels): the
conv is moved under the store's tile (``compute_at`` sizes it from the loop ranges, not the predicate) and
computes whole tiles of a plane rounded up, reads clamped in bounds, so the predicate only skips stores.
Both are tested at batch 1 and 3.

Thread-pool launches. Each parallel loop of a function is a launch of TVM's pool (hand the tasks to the
workers, wait for all of them): a few microseconds with the workers spinning, a scheduler time slice when a
loaded machine has descheduled one. So a function runs at most one parallel loop where it can (the channel
slice of a zero-padded conv inside the conv's loop), and a function with less work than
:data:`PARALLEL_MIN_VECTOR_OPS` vectors of the target (:func:`parallel_worth`) runs serial: ShuffleNetV2
went from 125 launches per inference to 43.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import re

import numpy as np

from bncompile.lower import tvm as _shim
from bncompile.lower.kernels.conv2d_packed import (AVGB_BLOCK, CONV_BLOCK, DENSE_BLOCK, DW_BLOCK, DW_PAD_BLOCK,
                                                   DW_SPLIT_BLOCK, DWB_BLOCK, PAD_BLOCK, POOL_BLOCK, POOLB_BLOCK,
                                                   UNBLOCK_BLOCK, WINO_GEMM_BLOCK, WINO_INPUT_BLOCK,
                                                   WINO_OUTPUT_BLOCK, WINO_SPLIT_BLOCK, avg_pool_blocked_te,
                                                   block_channels, conv2d_packed_te, conv2d_winograd_te,
                                                   dense_packed_te, depthwise_blocked_te, depthwise_conv2d_te,
                                                   max_pool2d_te, max_pool_blocked_te, unblock_channels,
                                                   winograd_tiles, winograd_weight)
from bncompile.lower.kernels.masking import keep_where

log = logging.getLogger(__name__)

OP_PATTERN_OPAQUE = 8
#: most accumulator vectors of a conv register tile, by register count. Measured on AVX2 (16 ymm): 10
#: (16 channels x 5) is the best, 12 already spills in the 2-D tile (16 x 6: 0.85x of 16 x 5; 8 x 12 worse).
#: The 32-register value (AVX-512, NEON) leaves room for the weight vectors and a broadcast; it was not
#: measured. The measured exceptions, 12 accumulators without a spill (their tests read the assembly): a block
#: of three registers x 4 pixels (:data:`THREE_VECTOR_BLOCKS`), and 16 x 6 over a flattened plane
#: (:data:`FLAT_PIXEL_TILES`, where the conv is computed under its output's tile).
ACC_CAP = {16: 10, 32: 14}
#: A blocked-output conv whose output channels two vector registers do not divide (24, 72, 120 on AVX2:
#: MobileNetV2/V3's narrow layers) may take a block of three registers with a tile of 4 pixels (12
#: accumulators, 3 weight vectors, a broadcast: all 16 ymm registers) instead of one register x 8 pixels:
#: 0.58 instead of 1.1 loads per FMA. Measured on AMD EPYC znver3 (AVX2), 1 thread, MobileNetV2's 56x56
#: 96 -> 24 and 144 -> 24 convs: 0.76 and 0.78 of the 8 x 8 tile's time (24 x 2: 0.93; 24 x 2 x 2 rows:
#: 0.82). AVX2 (16 registers) only: not measured with AVX-512's 32.
THREE_VECTOR_BLOCKS = True


def _tvm():
    return _shim.tvm()


def _schedule_of(func):
    """A fresh ``s_tir.Schedule`` of one PrimFunc, working on it."""
    sch = _shim.s_tir().Schedule(_tvm().IRModule({"main": func}))
    sch.work_on("main")
    return sch


def _single_reduction(sch):
    """(block, iter kinds, spatial count, loops) of a function with exactly one reduction block whose
    iterators are spatial then reduction, one loop each; None otherwise."""
    reds = [b for b in _all_blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reds) != 1:
        return None
    blk = reds[0]
    kinds = _iter_kinds(sch, blk)
    ns = kinds.count("S")
    loops = sch.get_loops(blk)
    if ns == 0 or kinds != "S" * ns + "R" * (len(kinds) - ns) or len(loops) != len(kinds):
        return None
    return blk, kinds, ns, loops


def _inline_epilogue(sch, wb) -> None:
    """Inline the element-wise epilogue after the write-back block ``wb`` (bias, relu, residual add, and
    the side branch of x * sigmoid(x), x * hardsigmoid(x)...) into it, so the epilogue runs at write-back
    on values still in registers; stop where a block does not inline. A single consumer is reverse-inlined;
    where ``wb``'s value feeds several consumers that join again (``x * f(x)``), the blocks of the side
    branch are inlined forward into the block that joins them first. (Left as separate passes, each block
    of ``x * sigmoid(x)`` was a scalar loop over the tensor: 3.4x the time of the conv with a relu.)"""
    while True:
        cons = sch.get_consumers(wb)
        if len(cons) == 1 and sch.get(cons[0]).name_hint.startswith(SLICE_BLOCK):
            # TVM 0.27 reverse-inlines a consumer that reads only PART of the block (the channel slice of a
            # zero-padded conv) without an error, and the write-back then writes past the output: the
            # epilogue goes into the slice instead
            _inline_epilogue(sch, cons[0])
            return
        if len(cons) == 1:
            try:
                if _reverse_compute_inline(sch, cons[0]):
                    continue
                return
            except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses; leave the rest as it is
                return
        if len(cons) < 2 or not _inline_side_branches(sch, wb):
            return


def _inline_side_branches(sch, wb) -> bool:
    """compute_inline the element-wise blocks downstream of ``wb`` that are not outputs (a side branch of
    ``x * f(x)``), so that one block reads ``wb``'s value; True when any block was inlined."""
    changed = False
    seen = set()
    frontier = list(sch.get_consumers(wb))
    while frontier:
        blk = frontier.pop(0)
        name = sch.get(blk).name_hint
        if name in seen:
            continue
        seen.add(name)
        if "R" in _iter_kinds(sch, blk):
            continue
        nxt = list(sch.get_consumers(blk))
        if not nxt:
            continue             # an output block: the join, nothing to inline it into
        try:
            changed = _compute_inline(sch, blk) or changed
        except Exception:  # noqa: BLE001 - not inlinable: look further down
            pass
        frontier.extend(nxt)
    return changed


# --------------------------------------------------------------------------- conv2d legalization

def _const_int_list(xs):
    return [int(x) for x in xs]


def vector_lanes(target=None) -> tuple[int, int]:
    """``(fp32 lanes of a vector register, number of vector registers)`` for an llvm target: AVX-512 16/32,
    AVX/AVX2 8/16, NEON 4/32, otherwise (SSE2...) 4/16. The target's features, not the host's: LLVM
    reports the CPU by name (a VM may hide AVX-512 from a CPU LLVM would call znver5)."""
    tvm = _tvm()
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    if target is None or str(target.kind.name) != "llvm":
        return 4, 16
    try:
        feats = set(tvm.target.codegen.llvm_get_cpu_features(target))
    except Exception:  # pragma: no cover - LLVM without the query
        feats = set()
    if "avx512f" in feats:
        return 16, 32
    if "avx" in feats or "avx2" in feats:
        return 8, 16
    if "neon" in feats:
        return 4, 32
    return 4, 16


def conv_tiling(out_channels: int, out_width: int | None, target=None,
                out_height: int | None = None, block: int | None = None,
                odd: bool = False) -> tuple[int, int, int] | None:
    """``(output-channel block, width tile, row tile)`` of the register tile, or None when no block divides
    the output channels. The block is 2 or 1 vector registers of channels, or half a register's lanes
    (an 8-lane half of an AVX-512 register: ``40``, ``24`` or ``440`` channels; at least 4 lanes); the
    width and row tiles divide the output (even splits only), with ``vectors x width x rows`` accumulators,
    leaving registers for the weight vectors and a broadcast. The most accumulated lanes win; ties: the
    wider block (fewer broadcasts per FMA), then the wider width tile. ``block``: only that block (the
    schedule re-derives the tiles of the block the legalization chose). ``odd``: also a block of three
    registers where two do not divide the channels (:data:`THREE_VECTOR_BLOCKS`)."""
    lanes, regs = vector_lanes(target)
    best = None
    blocks = [(lanes * 2, 2), (lanes, 1)] + ([(lanes // 2, 1)] if lanes // 2 >= 4 else [])
    want = block
    if THREE_VECTOR_BLOCKS and (lanes, regs) == (8, 16) and (want == lanes * 3 or (odd and out_channels % (lanes * 2))):
        blocks.insert(0, (lanes * 3, 3))
    for block, nv in blocks:
        if out_channels % block or (want is not None and block != want):
            continue
        most = max(1, min(ACC_CAP.get(regs, 10) // nv, (regs - nv - 2) // nv))
        if nv == 3:     # 4 x 3 accumulators, 3 weight vectors and a broadcast: all 16 registers
            most = (regs - nv - 1) // nv
        for th in range(1, most + 1):
            if th > 1 and (not out_height or out_height % th):
                continue
            tw = _ow_tile(out_width, most // th) if out_width else 1
            key = (block * tw * th, nv, tw)
            if best is None or key > best[0]:
                best = (key, (block, tw, th))
    return None if best is None else best[1]


def _ow_tile(ow: int, most: int) -> int:
    """Register tile along the output width: the largest divisor of ``ow`` up to ``most``."""
    for t in range(min(ow, most), 0, -1):
        if ow % t == 0:
            return t
    return 1


def _is_constant(e) -> bool:
    """A Relax constant (``GenericConst`` in TVM 0.27: no ``relax.Constant`` class, the tensor is ``.value``)."""
    tvm = _tvm()
    return isinstance(_const_value(e), tvm.runtime.Tensor)


def _const_value(e):
    return getattr(e, "value", None) if not hasattr(e, "data") else e.data


def legalize_conv2d(bb, call):
    """``relax.nn.conv2d`` -> our packed-weight conv (when it applies), else TVM's legalization."""
    tvm = _tvm()
    relax = tvm.relax
    _nn_conv2d = _shim.submodule("tvm.relax.transform.legalize_ops.nn")._nn_conv2d

    a = call.attrs
    w = call.args[1]
    x = call.args[0]
    if any(layout_block(str(lay)) for lay in (a.data_layout, a.kernel_layout, a.out_layout)):
        return _legalize_blocked(bb, call)
    dw = _legalize_depthwise(bb, call)
    if dw is not None:
        return dw
    try:
        groups = int(a.groups)
        ok = (str(a.data_layout) == "NCHW" and str(a.kernel_layout) == "OIHW"
              and str(a.out_layout) in ("NCHW", "")
              and all(int(d) == 1 for d in a.dilation) and _is_constant(w)
              and str(_const_value(w).dtype) == "float32" and str(x.ty.dtype) == "float32"
              and str(a.out_dtype) in ("", "None", "float32") and len(_const_value(w).shape) == 4
              and x.ty.ndim == 4)
    except Exception:  # pragma: no cover - unusual attrs: TVM's legalization decides
        ok = False
    if not ok:
        return _nn_conv2d(bb, call)
    wn = _const_value(w).numpy()
    o, i, kh, kw = wn.shape
    oh = ow = None
    try:
        pt, pl, pb, pr = (int(p) for p in a.padding)
        ow = (int(x.ty.shape[3]) + pl + pr - kw) // int(a.strides[1]) + 1
        oh = (int(x.ty.shape[2]) + pt + pb - kh) // int(a.strides[0]) + 1
    except Exception:   # symbolic height/width: tiles of 1 along them
        pass
    if o % groups:
        return _nn_conv2d(bb, call)
    wino = _winograd_plan(wn.shape, groups, _const_int_list(a.strides), _static_channels(x), oh, ow)
    if wino is not None:
        block, tile = wino
        up = relax.const(winograd_weight(wn, block), "float32")
        return bb.call_te(conv2d_winograd_te, x, up, padding=_const_int_list(a.padding), out_channels=o,
                          block=block, tile=tile, primfunc_name_hint="conv2d_winograd")
    # grouped: a block of output channels stays inside one group (it divides the group's channels)
    op, tiling = _packed_tiling(o, ow, oh) if groups == 1 else (o, conv_tiling(o // groups, ow, out_height=oh))
    if tiling is None:
        return _nn_conv2d(bb, call)
    block = tiling[0]
    try:
        if int(x.ty.shape[1]) != i * groups:
            return _nn_conv2d(bb, call)
    except Exception:  # symbolic channel count
        return _nn_conv2d(bb, call)
    if op != o:
        wn = np.concatenate([wn, np.zeros((op - o, i, kh, kw), wn.dtype)])
    packed = np.ascontiguousarray(wn.reshape(op // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1))
    wp = relax.const(packed, "float32")
    pack = _input_pack(i, groups, o, _const_int_list(a.padding))
    if pack:
        return bb.call_te(_conv2d_packed_input_te, x, wp, pack=pack, in_block=pack, out_block=0,
                          strides=_const_int_list(a.strides), padding=_const_int_list(a.padding), out_channels=o,
                          padded_channels=op, kernel=(kh, kw), out_dtype="float32", block=block, groups=1,
                          primfunc_name_hint="conv2d_nchw16o")
    return bb.call_te(_conv2d_packed_sliced_te, x, wp, strides=_const_int_list(a.strides),
                      padding=_const_int_list(a.padding), out_channels=o, padded_channels=op, kernel=(kh, kw),
                      out_dtype="float32", block=block, groups=groups, primfunc_name_hint="conv2d_nchw16o")


def _packed_tiling(o: int, ow, oh) -> tuple[int, tuple | None]:
    """``(computed output channels, conv_tiling)`` of a one-group packed conv with ``o`` output channels:
    zero-padded channels where no block divides them (ShuffleNet's 58, 116) or only a half register does
    (ShuffleNet's 232, RegNet's 440 on AVX-512: a few zero channels up to whole registers; 232 -> 240: 84
    -> 58 us at 7x7; 40 -> 48 was slower: the limit, :data:`WHOLE_REGISTER_WASTE`)."""
    tiling = conv_tiling(o, ow, out_height=oh)
    if tiling is None:
        op = padded_channels(o)
        return (op, conv_tiling(op, ow, out_height=oh)) if op else (o, None)
    if tiling[0] < vector_lanes()[0]:
        full = padded_channels(o, whole_registers=True, waste=WHOLE_REGISTER_WASTE)
        wide = conv_tiling(full, ow, out_height=oh) if full else None
        if wide is not None:
            return full, wide
    return o, tiling


#: 3x3 stride-1 convs (one group) go through Winograd's F(2x2, 3x3) (conv2d_packed.conv2d_winograd_te) when
#: the output is at least this many rows and columns: measured on AMD EPYC znver4 (AVX-512), 1 thread, against
#: the packed direct conv: 14x14x256 -> 256 1.70x, 28x28x128 -> 128 1.76x, 56x56x64 -> 64 1.30x, DenseNet's
#: 128 -> 32 at 56/28/14: 1.14/1.56/1.75x; at 7x7 the 16 tiles leave a 4-tile register tile: 1.09x (512
#: channels) and 0.90x (128 -> 32), so 7x7 stays direct
WINOGRAD_MIN_OUTPUT = 14
WINOGRAD = True


def _static_channels(x):
    """The channel count (axis 1) of the NCHW tensor ``x``, None when symbolic."""
    try:
        return int(x.ty.shape[1])
    except Exception:  # noqa: BLE001 - symbolic channels
        return None


def _winograd_plan(wshape, groups: int, strides, in_channels, oh, ow) -> tuple[int, int] | None:
    """``(channel block, tile)`` of the Winograd conv for a conv of weight ``wshape`` (OIHW), or None
    when it does not apply: 3x3, stride 1, one group, ``in_channels`` (static; the input's) equal to the
    weight's, static height and width, an output
    of at least :data:`WINOGRAD_MIN_OUTPUT` rows (an even number: :func:`winograd_chunk_rows`) and
    columns, and a register tile (:func:`conv_tiling` over the tile columns: a channel block that divides
    the output channels, at least 4 tile columns that divide theirs)."""
    o, i, kh, kw = (int(d) for d in wshape)
    if not WINOGRAD or groups != 1 or (kh, kw) != (3, 3) or list(strides) != [1, 1] or oh is None or ow is None:
        return None
    if oh < WINOGRAD_MIN_OUTPUT or ow < WINOGRAD_MIN_OUTPUT:
        return None
    if in_channels != i:
        return None
    th, tw = winograd_tiles(oh, ow)
    tiling = conv_tiling(o, tw)
    if tiling is None or tiling[1] < 4:
        return None
    if not winograd_chunk_rows(th, tw, i, o, oh):
        # odd output rows: no chunk of whole tile rows splits them evenly, and unchunked (four parallel
        # loops, full-size transformed buffers) it measured no faster than the direct conv (57x57x64:
        # 2.6-3.5 against 2.6-2.7 ms; 113x113x32: 10.7 against 10.1 ms)
        return None
    return tiling[0], tiling[1]


#: bytes of the transformed input and the products of one chunk of tile rows (:func:`winograd_chunk_rows`):
#: they stay in L2 between the three stages that pass them (half of a 1 MB L2; measured on 56x56x64 with
#: the caches flushed between calls: 1.56 ms chunked in 2 tile rows against 2.09 unchunked, whose 3.2 MB
#: buffers went through L3)
WINOGRAD_CHUNK_BYTES = 512 * 1024


def winograd_chunk_rows(tile_rows: int, tile_cols: int, in_channels: int, out_channels: int,
                        out_rows: int) -> int:
    """Tile rows per chunk of the Winograd conv: ``k`` dividing the tile rows with whole output rows (``2k``
    divides the output rows: splits are only ever even), the chunk's transformed input and products (16
    positions x the input and output channels x its tiles, float32) within :data:`WINOGRAD_CHUNK_BYTES`
    unless ``k`` is 1, two chunks
    or more when there is more than one tile row. The chunks are the parallel tasks: an even number of
    them first (7 chunks on 2 threads leave one thread a chunk alone: 765 against 720 us on 28x28x128 for
    7 and 14 chunks), then at least 8 of them (more cores), then the largest ``k`` (fewer re-reads of the
    transformed weight), else the most chunks. 0 when the output rows are odd (the stages then run
    unchunked)."""
    ok = [k for k in range(1, tile_rows + 1)
          if tile_rows % k == 0 and out_rows % (2 * k) == 0
          and (k == 1 or (16 * (in_channels + out_channels) * k * tile_cols * 4 <= WINOGRAD_CHUNK_BYTES
                          and tile_rows // k >= 2))]
    if not ok:
        return 0

    def rank(k):
        chunks = tile_rows // k
        return (chunks % 2 == 0, chunks >= 8, k if chunks >= 8 else -k)

    return max(ok, key=rank)


def _legalize_depthwise(bb, call):
    """``relax.nn.conv2d`` that is depthwise (groups == input channels == output channels, NCHW/OIHW,
    dilation 1, float32, static channels, height and width; any batch) -> :func:`depthwise_conv2d_te`
    (scheduled by :func:`schedule_depthwise`); None otherwise."""
    f = _conv_facts(call, constant_weight=False)
    if f is None or not (f["groups"] == f["c"] == f["o"] and f["i"] == 1):
        return None
    a = call.attrs
    return bb.call_te(depthwise_conv2d_te, call.args[0], call.args[1], strides=_const_int_list(a.strides),
                      padding=_const_int_list(a.padding), kernel=(f["kh"], f["kw"]), primfunc_name_hint="dwconv2d")


def legalize_max_pool2d(bb, call):
    """``relax.nn.max_pool2d`` (float32, dilation 1, static channels, height and width; any batch):
    NCHW in floor mode -> :func:`max_pool2d_te` (scheduled by :func:`schedule_depthwise`, rule ``pool_planes``);
    ``NCHW{B}c`` (:func:`channel_blocked`'s layout), floor or ceil mode -> :func:`max_pool_blocked_te` (rule
    ``depthwise_blocked``); else TVM's legalization. (TVM's pool: a window of scalar loads per output, 6
    GF/s-equivalent on the ResNet stem's 3 x 3 / 2 pool in NCHW; on NCHW8c 2.4 ms against 0.2.)"""
    a = call.attrs
    x = call.args[0]
    layout = str(a.layout)
    blocked = re.fullmatch(r"NCHW\d+c", layout) is not None
    try:
        ok = ((layout == "NCHW" and not bool(a.ceil_mode) or blocked)
              and str(a.out_layout) in (layout, "") and all(int(d) == 1 for d in a.dilation)
              and str(x.ty.dtype) == "float32" and x.ty.ndim == (5 if blocked else 4) and len(a.padding) == 4)
        if ok:
            [int(d) for d in list(x.ty.shape)[1:]]                  # static C, H, W (and block)
            out_hw = tuple(int(d) for d in list(call.ty.shape)[2:4])
    except Exception as err:  # symbolic sizes, unusual attrs: TVM's legalization
        log.debug("max_pool2d legalization does not apply: %s", err)
        ok = False
    if not ok:
        return _shim.submodule("tvm.relax.transform.legalize_ops.nn")._nn_max_pool2d(bb, call)
    if blocked:
        return bb.call_te(max_pool_blocked_te, x, strides=_const_int_list(a.strides),
                          padding=_const_int_list(a.padding), kernel=tuple(_const_int_list(a.pool_size)),
                          out_hw=out_hw, primfunc_name_hint="max_pool2d")
    return bb.call_te(max_pool2d_te, x, strides=_const_int_list(a.strides), padding=_const_int_list(a.padding),
                      kernel=tuple(_const_int_list(a.pool_size)), primfunc_name_hint="max_pool2d")


def legalize_avg_pool2d(bb, call):
    """``relax.nn.avg_pool2d`` on ``NCHW{B}c`` (:func:`channel_blocked`'s layout: DenseNet's transitions),
    float32, floor mode, dilation 1, static channels, height and width, no padding or ``count_include_pad``
    -> :func:`avg_pool_blocked_te` (rule ``depthwise_blocked``); else TVM's legalization."""
    a = call.attrs
    x = call.args[0]
    layout = str(a.layout)
    try:
        ok = (re.fullmatch(r"NCHW\d+c", layout) is not None and str(a.out_layout) in (layout, "")
              and not bool(a.ceil_mode) and all(int(d) == 1 for d in a.dilation)
              and (bool(a.count_include_pad) or not any(int(p) for p in a.padding))
              and str(x.ty.dtype) == "float32" and x.ty.ndim == 5 and len(a.padding) == 4)
        if ok:
            [int(d) for d in list(x.ty.shape)[1:]]                  # static C, H, W, block
    except Exception as err:  # symbolic sizes, unusual attrs: TVM's legalization
        log.debug("avg_pool2d legalization does not apply: %s", err)
        ok = False
    if not ok:
        return _shim.submodule("tvm.relax.transform.legalize_ops.nn")._nn_avg_pool2d(bb, call)
    return bb.call_te(avg_pool_blocked_te, x, strides=_const_int_list(a.strides), padding=_const_int_list(a.padding),
                      kernel=tuple(_const_int_list(a.pool_size)), primfunc_name_hint="avg_pool2d")


#: most zero channels :func:`padded_channels` adds, as a fraction of the padded count
PAD_WASTE = 0.25


#: most zero channels that pad a half-register block up to whole registers, as a fraction of the padded count
WHOLE_REGISTER_WASTE = 0.125


def padded_channels(out_channels: int, target=None, *, whole_registers: bool = False,
                    waste: float = PAD_WASTE) -> int | None:
    """The output channels a packed conv computes for ``out_channels`` that no block divides: the next
    multiple of a vector register's lanes (else half a register's, at least 4), when the zero channels
    are at most :data:`PAD_WASTE` of it; None otherwise. (ShuffleNetV2's 1x1 convs of 58 channels at 28x28
    ran 6x slower through ``conv2d_rows`` than 64 channels through the packed rule.) ``whole_registers``:
    only a multiple of a whole register; ``waste``: the most zero channels, as a fraction of the padded count."""
    lanes, _ = vector_lanes(target)
    for unit in (lanes,) if whole_registers else (lanes, lanes // 2):
        if unit < 4:
            continue
        op = -(-out_channels // unit) * unit
        if op != out_channels and (op - out_channels) <= waste * op:
            return op
    return None


# --------------------------------------------------------------------------- channel-blocked layout

#: carry the channel-blocked layout ``NCHW{B}c`` (B = the target's float32 vector lanes, at least 8) between
#: the convs of a network that has depthwise convs (:func:`channel_blocked`). A depthwise conv on it
#: reads a vector of B channels per input pixel (no per-plane fixed cost, any stride), and a packed conv
#: that writes it stores whole vectors instead of scattering its channels-last accumulators into NCHW rows.
#: Measured alone (AMD EPYC znver4, AVX-512, 1 thread, hot caches), NCHW -> NCHW16c: depthwise 3x3 576 x
#: 14 x 14 85 -> 41 us, 960 x 7 x 7 50 -> 18, 96 x 112 x 112 stride 2 227 -> 111, 144 x 56 x 56 stride 2
#: 112 -> 42, 5x5 672 x 14 x 14 stride 2 117 -> 22 (large stride-1 planes: 144 x 56 x 56 150 -> 182-216);
#: the 16 -> 96 1x1 conv at 112 x 112 705 -> 520, 24 -> 144 at 56 x 56 305 -> 208.
CHANNEL_BLOCKED = True
#: the block, when not the target's lanes (0: the lanes); an experiment's knob
CHANNEL_BLOCK = 0
#: also half a register's lanes (at least 8) for channel counts the lanes do not divide (MobileNetV3's 72,
#: 120, 184, 200 on AVX-512). Measured (1 thread, both builds in one process, 20 alternating rounds):
#: MobileNetV3-Large 6.55 -> 6.59 ms, ShuffleNetV2 4.04 -> 4.40 ms (its 24 and 232 channels then blocked,
#: with layout copies around its channel shuffles). Off.
HALF_BLOCKS = False
#: the vector widths (float32 lanes) of the targets on which networks WITHOUT a depthwise conv get the
#: layout too (ResNets, RegNets: every one-group conv whose channels a block divides, Winograd's included
#: (:data:`WINOGRAD_BLOCKED`). On AVX2 the packed 1x1 convs at 7x7 and 14x14 ran at 22-45
#: GFLOP/s on NCHW: each input channel's few pixels sit a plane apart, one cache line per channel, where
#: NCHW8c packs them into whole lines. Measured on AMD EPYC znver3 (AVX2, 1 thread, both builds in one
#: process): ResNet-50 164 -> 130 ms, RegNetY-400MF 24.8 -> 17.1 ms. On AVX-512 (NCHW16c; AMD EPYC znver5,
#: L1d 48 KB, L2 1 MB, both builds in one process, 20 alternating rounds, 224 x 224, outputs within 2.1e-6):
#: 1 / 2 threads ResNet-50 0.933 / 0.939 of NCHW's time, DenseNet-121 0.895 / 0.871, RegNetY-400MF 0.946 /
#: 0.946
ALL_NETWORKS_LANES: tuple[int, ...] = (8, 16)
#: zero-pad the channels of conv-to-conv regions with a depthwise conv up to a whole block before import
#: (``bncompile.passes.pad_channels``, as onnxruntime's NCHWc layout does: MobileNetV3's 72 -> 80, 120 ->
#: 128, 184 -> 192, 200 -> 208 on AVX-512), so those depthwise convs and pools run on blocks too
PAD_CHANNELS = True


def layout_blocks(target=None) -> tuple[int, ...]:
    """The channel blocks :func:`channel_blocked` may use on ``target`` (largest first; empty: none)."""
    lanes = vector_lanes(target)[0]
    blocks = (CHANNEL_BLOCK,) if CHANNEL_BLOCK else (lanes, lanes // 2) if HALF_BLOCKS else (lanes,)
    return tuple(b for b in blocks if b >= 8) if CHANNEL_BLOCKED else ()


def padding_block(target=None) -> int | None:
    """The block :data:`PAD_CHANNELS` pads channels to on ``target``, or None."""
    blocks = layout_blocks(target)
    return blocks[0] if PAD_CHANNELS and blocks else None


def layout_block(layout: str) -> int:
    """The channel block of a layout string: ``"NCHW16c"`` / ``"OIHW16o"`` -> 16, ``"NCHW"`` (or ``""``) -> 0."""
    digits = "".join(ch for ch in layout if ch.isdigit())
    return int(digits) if digits else 0


def _conv_facts(call, *, constant_weight: bool = True) -> dict | None:
    """Static facts of an NCHW/OIHW float32 ``relax.nn.conv2d`` with a 4-D weight (a constant one unless
    ``constant_weight`` is False), dilation 1 and static channels, height and width (any batch):
    ``{c, o, i, kh, kw, groups, h, w}``; None for any other conv2d."""
    a = call.attrs
    x, w = call.args[0], call.args[1]
    try:
        if not (str(a.data_layout) == "NCHW" and str(a.kernel_layout) == "OIHW"
                and str(a.out_layout) in ("NCHW", "") and all(int(d) == 1 for d in a.dilation)
                and str(x.ty.dtype) == "float32" and str(w.ty.dtype) == "float32"
                and str(a.out_dtype) in ("", "None", "float32") and x.ty.ndim == 4 and w.ty.ndim == 4
                and (_is_constant(w) or not constant_weight)):
            return None
        c, h, wd = (int(d) for d in list(x.ty.shape)[1:])
        o, i, kh, kw = (int(d) for d in list(w.ty.shape))
        return {"c": c, "o": o, "i": i, "kh": kh, "kw": kw, "groups": int(a.groups), "h": h, "w": wd}
    except Exception:  # noqa: BLE001 - symbolic channels/height/width, unusual attrs
        return None


def _channel_block(channels: int, blocks) -> int:
    """The first of ``blocks`` that divides ``channels``; 0 when none does."""
    return next((b for b in blocks if channels % b == 0), 0)


def _blocked_layouts(call, blocks) -> dict:
    """``ConvertLayout``'s per-call choice: NCHW{B}c for the input and/or output of a conv our legalization
    runs on it (depthwise with C % B == 0: both; one group: the input when C % B == 0, the output when
    O % B == 0); NCHW/OIHW for every other conv (TVM's converter then places the layout copies)."""
    plain = {"relax.nn.conv2d": ["NCHW", "OIHW"]}
    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return {}
    f = _conv_facts(call)
    if f is None:
        return plain
    bi, bo = _channel_block(f["c"], blocks), _channel_block(f["o"], blocks)
    data, out = f"NCHW{bi}c" if bi else "NCHW", f"NCHW{bo}c" if bo else "NCHW"
    kernel = f"OIHW{bo}o" if bo else "OIHW"
    if f["groups"] == f["c"] == f["o"] and f["i"] == 1:
        return {"relax.nn.conv2d": [data, kernel, out]} if bi else plain
    if _grouped_in_blocks(f, bi, bo):
        return {"relax.nn.conv2d": [data, kernel, out]}
    if f["groups"] != 1 or not (bi or bo) or (_runs_winograd(call, f) and not (WINOGRAD_BLOCKED and bi and bo)):
        return plain
    return {"relax.nn.conv2d": [data, kernel, out]}


#: a grouped conv whose groups of input and output channels are equal and divide the block (RegNet's groups
#: of 8 channels, on AVX2's blocks of 8) runs on the blocks, each output block reading its own input block
#: (:func:`_legalize_blocked`), instead of NCHW between layout copies
GROUPED_BLOCKS = True


def _grouped_in_blocks(f: dict, bi: int, bo: int) -> bool:
    """Whether the grouped conv of facts ``f`` runs on blocks (:data:`GROUPED_BLOCKS`)."""
    return (GROUPED_BLOCKS and 1 < f["groups"] < f["c"] and f["c"] == f["o"] and bool(bi) and bi == bo
            and bi % f["i"] == 0)


#: a conv that runs Winograd (:func:`_runs_winograd`) with a block dividing its input and output channels
#: reads and writes the blocks (:func:`~bncompile.lower.kernels.conv2d_packed.conv2d_winograd_te`'s
#: ``in_block``, ``out_block``: the parity split reads the blocks, the output transform stores whole
#: vectors of a block) instead of NCHW between two layout copies. Measured on AMD EPYC znver3 (AVX2, 1
#: thread), ResNet-50's three Winograd convs alone: 14x14 1059 -> 859 us, 28x28 1014 -> 941, 56x56 1119 ->
#: 1203 (the split's reads are strided by the block there); in the network (both builds in one process) the
#: layout copies, 1.2 ms, are gone: 104.6 -> 103.8 ms of summed calls
WINOGRAD_BLOCKED = True


def _runs_winograd(call, f) -> bool:
    """Whether the NCHW legalization would run this one-group conv through Winograd (:func:`_winograd_plan`).
    Unless :data:`WINOGRAD_BLOCKED`, such a conv keeps NCHW (layout copies around it): the packed conv on
    blocks would run it direct (1.3-1.76x slower at 14x14-56x56, see :data:`WINOGRAD_MIN_OUTPUT`)."""
    a = call.attrs
    try:
        pt, pl, pb, pr = (int(p) for p in a.padding)
        strides = _const_int_list(a.strides)
        oh = (f["h"] + pt + pb - f["kh"]) // strides[0] + 1
        ow = (f["w"] + pl + pr - f["kw"]) // strides[1] + 1
    except Exception:  # noqa: BLE001 - unusual attrs: the direct conv
        return False
    return _winograd_plan((f["o"], f["i"], f["kh"], f["kw"]), f["groups"], strides, f["c"], oh, ow) is not None


def _blocked_chain(mod, blocks) -> list:
    """The one-group convs of ``mod`` that :func:`_blocked_layouts` puts on channel blocks, when at least one
    of them writes blocks and another reads them (a layout to carry); empty otherwise (a lone conv would only
    gain a layout copy)."""
    relax = _tvm().relax
    convs = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d":
            f = _conv_facts(e)
            if f is not None and f["groups"] == 1 and (WINOGRAD_BLOCKED or not _runs_winograd(e, f)):
                convs.append((e, bool(_channel_block(f["c"], blocks)), bool(_channel_block(f["o"], blocks))))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    reads = [k for k, (_, bi, _) in enumerate(convs) if bi]
    writes = [k for k, (_, _, bo) in enumerate(convs) if bo]
    chain = any(r != w for r in reads for w in writes)
    return [e for e, bi, bo in convs if bi or bo] if chain else []


def channel_blocked(mod, target=None):
    """``mod`` with the channel-blocked layout carried between its convs (:data:`CHANNEL_BLOCKED`): TVM's
    ``ConvertLayout`` with :func:`_blocked_layouts`, then ``FoldConstant`` (the weights' layout copies). Only
    for a target with at least 8 float32 lanes, and a module with a depthwise conv that the layout takes (on
    targets of :data:`ALL_NETWORKS_LANES`: any one-group conv it takes); ``mod`` unchanged otherwise."""
    tvm = _tvm()
    relax = tvm.relax
    blocks = layout_blocks(target)
    if not blocks:
        return mod
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d":
            f = _conv_facts(e)
            if f is not None and f["groups"] == f["c"] == f["o"] and f["i"] == 1 and _channel_block(f["c"], blocks):
                found.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if not found and vector_lanes(target)[0] in ALL_NETWORKS_LANES:
        found = _blocked_chain(mod, blocks)
    if not found:
        return mod
    try:
        out = _clips_as_min_max(mod)
        if BLOCKED_BATCH_NORM:
            # inference batch norms (DenseNet's pre-activations) as x * scale + shift, which the layout
            # pass moves onto the blocks (it has no sub-channel rule for batch_norm's axis)
            out = _batch_norms_as_scale_shift(out)
        out = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NCHW", "OIHW"]},
                                            layout_cb=lambda call: _blocked_layouts(call, blocks))(out)
        out = relax.transform.FoldConstant()(out)      # the weights' layout copies
    except Exception as err:  # noqa: BLE001 - a graph TVM's layout pass cannot convert stays NCHW
        log.warning("channel-blocked layout not applied (the model compiles in NCHW): %s",
                    str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__)
        return mod
    unsafe = _unsafe_blocked_uses(out, blocks)
    if unsafe:
        log.info("channel-blocked layout not applied: %s would run on channel blocks", ", ".join(sorted(unsafe)))
        return mod
    return out


#: the operators allowed to read or write a channel-blocked tensor (:func:`_unsafe_blocked_uses`): the ones
#: the layout is measured and tested on. ``ConvertLayout`` also moves Split, Concat, Pad, pools... onto the
#: blocks; a random differential run found a channel Split moved onto them (8 + 8 channels on blocks of
#: 8, TVM 0.27) returning garbage (1.9e36 to inf), so a network where any other operator would touch a
#: blocked tensor compiles in NCHW instead.
BLOCKED_SAFE_OPS = frozenset({
    "relax.nn.conv2d", "relax.layout_transform", "relax.add", "relax.subtract", "relax.multiply",
    "relax.divide", "relax.maximum", "relax.minimum", "relax.nn.relu", "relax.sigmoid", "relax.tanh",
    "relax.exp", "relax.nn.silu", "relax.mean", "relax.sum", "relax.max", "relax.nn.max_pool2d",
    "relax.nn.avg_pool2d", "relax.concat"})
_SPATIAL_REDUCTIONS = frozenset({"relax.mean", "relax.sum", "relax.max"})
#: inference ``batch_norm`` as ``x * s + t`` before the layout pass (:func:`channel_blocked`,
#: :func:`_batch_norms_as_scale_shift`), so networks with standalone batch norms (DenseNet's pre-activations)
#: carry the blocks, their concats and average pools too. Measured on AMD EPYC znver3 (AVX2, 1 thread, both
#: builds in one process): DenseNet-121 83.5 -> 72.9 ms (1.09 -> 0.94 of onnxruntime)
BLOCKED_BATCH_NORM = True


def _unsafe_blocked_uses(mod, blocks) -> set:
    """Names of the operators of ``mod``'s Relax functions that read or write a channel-blocked tensor (5-D,
    last dim one of ``blocks``) and are not in :data:`BLOCKED_SAFE_OPS` (a reduction only over the height and
    width axes 2, 3)."""
    tvm = _tvm()
    relax = tvm.relax
    bad: set = set()

    def blocked(e) -> bool:
        ty = getattr(e, "ty", None)
        shape = getattr(ty, "shape", None)
        if shape is None or getattr(ty, "ndim", -1) != 5 or not hasattr(shape, "__len__"):
            return False
        return _static(shape[4]) in blocks

    def visit(e):
        if not isinstance(e, relax.Call):
            return
        name = getattr(e.op, "name", None) or type(e.op).__name__
        args = [a for a in e.args if isinstance(a, relax.Expr)]
        if not (blocked(e) or any(blocked(a) for a in args)):
            return
        if name not in BLOCKED_SAFE_OPS:
            bad.add(name)
        elif name == "relax.concat":
            # along the blocks only, every part blocked alike (whole blocks: a part of C % B != 0 channels
            # would have been padded by its layout copy)
            parts = args[0].fields if args and isinstance(args[0], relax.Tuple) else None
            if (parts is None or int(e.attrs.axis) != 1 or not blocked(e)
                    or any(not blocked(f) or _static(f.ty.shape[4]) != _static(e.ty.shape[4]) for f in parts)):
                bad.add(name)
        elif name == "relax.layout_transform" and blocked(e) and args and getattr(args[0].ty, "ndim", -1) == 4:
            # NCHW -> NCHW{B}c of a channel count B does not divide would pad with undefined values
            c = _static(args[0].ty.shape[1])
            if c is None or c % _static(e.ty.shape[4]):
                bad.add(name)
        elif name in _SPATIAL_REDUCTIONS:
            axes = getattr(e.attrs, "axis", None)
            if axes is None or not {int(a) for a in axes} <= {2, 3}:
                bad.add(name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bad


def _batch_norms_as_scale_shift(mod):
    """``relax.nn.batch_norm(x, gamma, beta, mean, var)[0]`` in inference mode with constant parameters (the
    ones bncompile's fold leaves: DenseNet's pre-activations) as ``x * s + t``, ``s = gamma / sqrt(var +
    eps)`` and ``t = beta - mean * s`` computed in float64 and rounded once, shaped to broadcast along the
    axis. Two element-wise ops that fuse with what follows; TVM's ``DecomposeOpsForInference`` leaves four
    (a divide among them) and a tuple that stopped the fusion with the following relu."""
    tvm = _tvm()
    relax = tvm.relax
    dpl = _shim.submodule("tvm.relax.dpl")
    bn = dpl.is_op("relax.nn.batch_norm")(dpl.wildcard(), dpl.is_const(), dpl.is_const(), dpl.is_const(),
                                          dpl.is_const())
    pattern = dpl.is_tuple_get_item(bn, 0)

    def rewrite(expr, matches):
        call = matches[bn]
        x = call.args[0]
        try:
            a = call.attrs
            nd, axis, dtype = int(x.ty.ndim), int(a.axis), str(x.ty.dtype)
            gamma, beta, mean, var = (_const_value(v).numpy().astype(np.float64) for v in call.args[1:])
            ok = not bool(a.training) and dtype == "float32" and nd >= 2 and gamma.ndim == 1
            eps, center, scaled = float(a.epsilon), bool(a.center), bool(a.scale)
        except Exception:  # noqa: BLE001 - unknown rank, unusual attrs: left as it is
            return expr
        if not ok:
            return expr
        shape = [1] * nd
        shape[axis % nd] = -1
        scale = (gamma if scaled else 1.0) / np.sqrt(var + eps)
        shift = (beta if center else 0.0) - mean * scale
        s32, t32 = (np.asarray(v, np.float32).reshape(shape) for v in (scale, shift))
        return relax.op.add(relax.op.multiply(x, relax.const(s32)), relax.const(t32))

    out = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = dpl.rewrite_call(pattern, rewrite, func)
    return out


def _clips_as_min_max(mod):
    """``relax.clip(x, lo, hi)`` with constant bounds (TVM's HardSigmoid / HardSwish converters) as
    ``minimum(maximum(x, lo), hi)``: ``ConvertLayout`` has no layout rule for ``clip`` (it put two layout
    copies around each of MobileNetV3's 29) and has one for the element-wise min and max."""
    tvm = _tvm()
    relax = tvm.relax
    dpl = _shim.submodule("tvm.relax.dpl")
    pattern = dpl.is_op("relax.clip")(dpl.wildcard(), dpl.wildcard(), dpl.wildcard())

    def rewrite(expr, _matches):
        x, lo, hi = expr.args
        try:      # PrimValue(IntImm / FloatImm) or the IntImm / FloatImm itself
            lo, hi = (float(getattr(b.value, "value", b.value)) for b in (lo, hi))
            dtype = str(x.ty.dtype)
        except Exception:  # noqa: BLE001 - symbolic bounds: left as it is
            return expr
        if not lo <= hi or not dtype.startswith("float"):
            return expr
        return relax.op.minimum(relax.op.maximum(x, relax.const(lo, dtype)), relax.const(hi, dtype))

    out = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = dpl.rewrite_call(pattern, rewrite, func)
    return out


def _unpacked_weight(w, kernel_block: int):
    """The OIHW numpy weight of a constant in ``OIHW`` or ``OIHW{B}o`` (``[O/B, I, KH, KW, B]``)."""
    wn = _const_value(w).numpy()
    if not kernel_block:
        return wn
    ob, i, kh, kw, b = wn.shape
    return np.ascontiguousarray(wn.transpose(0, 4, 1, 2, 3).reshape(ob * b, i, kh, kw))


def _conv2d_blocked_te(x, wp, *, in_block: int, out_block: int, **kw):
    """:func:`_conv2d_packed_sliced_te` reading an ``NCHW{in_block}c`` input and/or writing
    ``NCHW{out_block}c``."""
    if in_block and any(kw["padding"]) and kw.get("groups", 1) > 1 and GROUPED_INPLACE_PAD \
            and max(kw["strides"]) >= GROUPED_INPLACE_PAD_MIN_STRIDE:
        # the padding read in place (GROUPED_INPLACE_PAD): the unblocked view of the padded input, a load at
        # the clamped pixel blended to zero outside the plane, inlined into the conv's reads (no padded copy)
        tvm = _tvm()
        tirx = tvm.tirx
        pt, pl, pb, pr = kw["padding"]
        n, cb, h, w, b = x.shape

        def padded(i, c, yy, zz):
            inside = tirx.all(yy >= pt, yy < h + pt, zz >= pl, zz < w + pl)
            v = x[i, c // b, tirx.max(tirx.min(yy - pt, h - 1), 0), tirx.max(tirx.min(zz - pl, w - 1), 0), c % b]
            return keep_where(inside, v)               # not a Select: TVM would drop the clamp under it

        xin = tvm.te.compute((n, cb * b, h + pt + pb, w + pl + pr), padded, name=UNBLOCK_BLOCK + "_padded")
        y = _conv2d_packed_sliced_te(xin, wp, **dict(kw, padding=[0, 0, 0, 0]))
        return block_channels(y, out_block) if out_block else y
    if in_block and BLOCKED_PAD and any(kw["padding"]):
        # zero-pad the blocks themselves, so the conv still reads whole lines of B channels per pixel (a pad
        # of the unblocked view made an NCHW copy, and the conv read planes again)
        pt, pl, pb, pr = kw["padding"]
        x = _tvm().topi.nn.pad(x, [0, 0, pt, pl, 0], [0, 0, pb, pr, 0], pad_value=0.0, name=PAD_BLOCK)
        kw = dict(kw, padding=[0, 0, 0, 0])
    if in_block and SUBSAMPLE_STRIDED and tuple(kw["kernel"]) == (1, 1) and max(kw["strides"]) > 1 \
            and not any(kw["padding"]):
        # a strided 1x1 conv reads one pixel in S x S: copy those first (1/S^2 of the input, contiguous),
        # then run the conv at stride 1 over the copy
        sh, sw = kw["strides"]
        n, cb, h, w, b = x.shape
        x = _tvm().te.compute((n, cb, (h - 1) // sh + 1, (w - 1) // sw + 1, b),
                              lambda i, c, yy, zz, ci: x[i, c, yy * sh, zz * sw, ci], name=SUBSAMPLE_BLOCK)
        kw = dict(kw, strides=[1, 1])
    xin = unblock_channels(x) if in_block else x
    y = _conv2d_packed_sliced_te(xin, wp, **kw)
    return block_channels(y, out_block) if out_block else y



#: 1x1 stride-1 convs (at most :data:`FLAT_MAX_PIXELS` output pixels) between NCHW{B}c
#: tensors run over the FLATTENED plane (:func:`_conv2d_flat_te`, :func:`_schedule_flat_conv`): a register
#: tile of 16 channels (two AVX2 registers) x 6 consecutive pixels of the ``H * W`` row, 12 accumulators as
#: MLAS has, where the 2-D tile of :func:`conv_tiling` must divide the width: 7 (prime) left it 8 channels x
#: 7 pixels (7 accumulators: below the 8 FMAs two pipes keep in flight), 14 x 14 16 x (2 x 2). The plane is
#: computed rounded up to whole tiles (the last tile's extra pixels read the last pixel again: in bounds)
#: and the store skips them; the conv is computed under the output's tile (``compute_at``), so that skip is
#: the output's own predicate and the reduction has none. Output channels padded to 16 (zero weights; RegNet's
#: 440 -> 448), the store skipping the pad. Measured alone on AMD EPYC znver3 (AVX2, 1 thread, add + relu
#: epilogue, one process, alternating): 7x7 440 -> 440 285 -> 238 us (0.83), 512 -> 2048 0.86, 2048 -> 512
#: 0.86, 160 -> 960 0.85, 960 -> 160 0.83; 14x14 208 -> 208 0.95. An 8-channel x 12-pixel tile was slower
#: (1.15: LLVM spills); a predicate on the reduction's own split, left to TVM's loop partitioning, spilled
#: or branched per pixel at 14x14. AVX2 only (AVX-512's 32 registers not measured). Whole networks, 1 thread,
#: both builds in one process: RegNetY-400MF 1.04 -> 1.01 of onnxruntime (a second run 18.0 -> 16.7 ms),
#: MobileNetV2 1.06 -> 1.02, ResNet-50 0.99 -> 0.97, EfficientNet-B0 1.04 -> 1.02; 2 threads (TVM only):
#: RegNetY 8.14 -> 7.60 ms, MobileNetV2 6.41 -> 5.96.
#: Larger planes (up to 112x112) pay once the chunks run outside the channel blocks (each task's input
#: chunk, at most :data:`FLAT_CHUNK_BYTES`, stays in L2 across the blocks): with the blocks outside, 2
#: threads were 7% slower on ResNet-50 (both threads streaming the whole input from L3 per block). Per conv
#: in RegNetY-400MF (1 thread): 28x28 104 -> 104 0.85-0.89, 56x56 48 -> 104 0.87; MobileNetV2's expansions
#: at 112x112 0.91, 56x56 0.93, 28x28 0.89. Networks on the same CPU (AMD EPYC znver3, AVX2, 512 KB L2),
#: 1 thread, both builds and onnxruntime in one process
#: (20 rounds; the limit at 196 pixels, then at 12544): ResNet-50 122.4 -> 117.7 ms, RegNetY 17.8 -> 17.0,
#: MobileNetV2 12.5 -> 12.5 (1.02 -> 0.99 of onnxruntime); 2 threads ResNet-50 69.1 -> 69.2, RegNetY 10.2 ->
#: 9.6 (TVM only). Planes above 112x112 (the largest measured) keep the 2-D tile.
FLAT_PIXEL_TILES = True
FLAT_MAX_PIXELS = 12544
FLAT_TILE = 6
#: the pixel tiles a flattened plane may take (:func:`flat_tile`): the one of least modelled cost, so that a
#: plane whose tail a tile of 6 rounds up far takes 5 (7x7: 49 pixels as 10 x 5 = 50, not 9 x 6 = 54; 5x5
#: as 5 x 5). 10 accumulators still keep two FMA pipes busy, and each tile costs ``FLAT_TILE_COST`` pixels
#: more (its stores and loop), which keeps 6 on 14x14 and larger planes.
FLAT_TILES = (6, 5)
FLAT_TILE_COST = 0.5
#: the fewest parallel tasks of a flattened conv: with fewer 16-channel blocks (RegNet's 104 channels at
#: 28x28: 7) the plane is cut into as many chunks of whole tiles as make up this many (7 tasks on 2 threads
#: left one idle an eighth of the time)
FLAT_MIN_TASKS = 8
#: the fewest tiles of a flattened plane: below, the rounded-up tail is a large share (a squeeze-excitation
#: conv on a 1x1 plane computed 6 pixels for 1)
FLAT_MIN_TILES = 4
#: the most input one chunk of a flattened plane reads (bytes): the parallel loop runs the chunks outside
#: the channel blocks, so a task's input chunk stays in L2 (a quarter of 512 KB) for every block after the
#: first, instead of the whole input streamed again from L3 per block
FLAT_CHUNK_BYTES = 128 * 1024
#: the fewest tiles of a chunk cut for :data:`FLAT_CHUNK_BYTES`: a small plane's input fits L2 whole, and
#: its chunks would round it up further (ResNet-50's 7x7 2048 -> 512: 2 chunks of 5 tiles for 49 pixels).
#: Against 1 (AMD EPYC znver3, 1 thread, one process, 20 rounds): ResNet-50 1.00-1.02 -> 0.95 of
#: onnxruntime, MobileNetV2 1.02-1.03 -> 1.00
FLAT_BYTES_MIN_TILES = 16
FLAT_OUT_BLOCK = "bnc_flat_out"


def flat_tile(pixels: int) -> int:
    """The pixel tile of a flattened plane of ``pixels``: of :data:`FLAT_TILES` (``FLAT_TILE`` when that is
    empty) the one that computes the fewest pixels, each tile counted :data:`FLAT_TILE_COST` pixels more;
    the larger on a tie."""
    tiles = FLAT_TILES or (FLAT_TILE,)
    return min(tiles, key=lambda t: (-(-pixels // t) * (t + FLAT_TILE_COST), -t))


def flat_plan(out_channels: int, oh: int, ow: int, *, kernel, strides, padding, groups: int, in_block: int,
              out_block: int, target=None, in_channels: int = 0) -> tuple[int, int, int] | None:
    """``(channel block, computed output channels, pixel tile)`` of :data:`FLAT_PIXEL_TILES` for a conv, or
    None where it does not apply (not 1x1 / stride 1 / unpadded / one group, not NCHW{B}c on both sides,
    a larger plane or one of fewer than :data:`FLAT_MIN_TILES` tiles, a target other than 8 lanes x 16
    registers (AVX/AVX2), 16 channels not a multiple of the output block, more than
    :data:`WHOLE_REGISTER_WASTE` zero channels, or a 2-D tile with as many accumulated lanes per computed
    pixel, the rounded-up tail counted)."""
    if not FLAT_PIXEL_TILES or not in_block or not out_block or groups != 1:
        return None
    if tuple(kernel) != (1, 1) or tuple(strides) != (1, 1) or any(padding):
        return None
    lanes, regs = vector_lanes(target)
    if (lanes, regs) != (8, 16) or oh * ow > FLAT_MAX_PIXELS:
        return None
    block = 2 * lanes
    if block % out_block:
        return None
    op = -(-out_channels // block) * block
    if op - out_channels > WHOLE_REGISTER_WASTE * op:
        return None
    pixels = oh * ow
    tile = flat_tile(pixels)
    if pixels < FLAT_MIN_TILES * tile:
        return None
    chunks = flat_chunks(op // block, pixels, in_channels)
    rounded = -(-pixels // (tile * chunks)) * tile * chunks
    cur = conv_tiling(out_channels, ow, target, out_height=oh, odd=True)
    if cur is not None and cur[0] * cur[1] * cur[2] * rounded >= block * tile * pixels:
        return None
    return block, op, tile


def flat_chunks(blocks: int, pixels: int, in_channels: int = 0) -> int:
    """Into how many chunks (of whole tiles) a flattened conv's plane is cut for its parallel loop: the most
    up to enough for :data:`FLAT_MIN_TASKS` tasks with ``blocks`` channel blocks and for chunks of at most
    :data:`FLAT_CHUNK_BYTES` of input (``in_channels`` float32 per pixel; only as many chunks as keep
    :data:`FLAT_BYTES_MIN_TILES` tiles each), each chunk at least
    :data:`FLAT_MIN_TILES` tiles, whose rounding of the tile count up to a multiple adds at most an eighth of
    it (whole tiles computed for nothing; 1 chunk always qualifies). Tiles of :func:`flat_tile` pixels."""
    tile = flat_tile(pixels)
    tiles = -(-pixels // tile)
    by_bytes = min(-(-in_channels * pixels * 4 // FLAT_CHUNK_BYTES), tiles // FLAT_BYTES_MIN_TILES)
    want = max(-(-FLAT_MIN_TASKS // max(blocks, 1)), by_bytes)
    most = max(1, min(want, pixels // (tile * FLAT_MIN_TILES)))
    return max(c for c in range(1, most + 1) if -(-tiles // c) * c - tiles <= tiles // 8)


def _conv2d_flat_te(x, wp, *, out_block: int, out_channels: int, padded_channels: int, block: int, tile: int):
    """TE of :data:`FLAT_PIXEL_TILES`: the 1x1 conv of NCHW{B}c ``x`` over its plane flattened and rounded up
    to whole tiles of ``tile`` pixels (the extra pixels read the last one), ``padded_channels`` computed;
    then NCHW{out_block}c of the first ``out_channels`` (:data:`FLAT_OUT_BLOCK`)."""
    tvm = _tvm()
    te, tirx = tvm.te, tvm.tirx
    n, cb, h, w, b = x.shape
    h, w = int(h), int(w)
    pixels = h * w
    step = tile * flat_chunks(padded_channels // block, pixels, int(cb) * int(b))
    rounded = -(-pixels // step) * step

    def flat(i, c, _y, z):
        q = tirx.min(z, pixels - 1)
        return x[i, c // b, q // w, q % w, c % b]

    # named as the unblocking view, so that schedule_conv inlines it into the conv's reads like that one
    xf = te.compute((n, cb * b, 1, rounded), flat, name=UNBLOCK_BLOCK)
    acc = conv2d_packed_te(xf, wp, strides=[1, 1], padding=[0, 0, 0, 0], out_channels=padded_channels,
                           kernel=(1, 1), out_dtype="float32", block=block)
    return te.compute((n, out_channels // out_block, h, w, out_block),
                      lambda i, c, y, z, ci: acc[i, c * out_block + ci, 0, y * w + z], name=FLAT_OUT_BLOCK)

#: a grouped conv on NCHW{B}c (:func:`_grouped_in_blocks`) reads its zero padding in place, a load at the
#: clamped pixel blended to zero (:func:`_conv2d_blocked_te`), instead of an NCHW copy of the padded
#: unblocked view: at stride 2 that copy was as large as the input and the conv did a quarter of the work
#: per input pixel. Measured on AMD EPYC znver3 (AVX2, 1 thread, both builds in one process, 30 rounds):
#: RegNetY-400MF 14.89 -> 14.03 ms (1.11 -> 1.04 of onnxruntime), its stride-2 grouped convs had been
#: 1.56-2.0x onnxruntime's time. The same for one-group convs made ResNet-50 slower (1.07 -> 1.13): off there
GROUPED_INPLACE_PAD = True

#: the least stride at which a grouped conv reads its padding in place (:data:`GROUPED_INPLACE_PAD`). At
#: stride 1 every input pixel is read K x K times, each read a blend of four compares, against one select
#: per pixel in the padded copy: RegNetY-400MF's 28x28 104-channel 3x3 (13 groups of 8) 594 -> 210 us with
#: the copy, 14x14 243 -> 169, 7x7 91 -> 82, its stride-2 ones the same either way (551 against 537).
#: Measured on AMD EPYC znver3 (AVX2, 1 thread, one process, alternating); the network (both builds and
#: onnxruntime in one process, 30 rounds): 1.07 -> 0.99 of onnxruntime at 1 thread; 2 threads 13.74 ->
#: 13.04 ms (TVM only)
GROUPED_INPLACE_PAD_MIN_STRIDE = 2


#: a strided 1x1 packed conv on NCHW{B}c copies the pixels it reads first (:func:`_conv2d_blocked_te`):
#: 1/S^2 of the input, contiguous, then the conv at stride 1 reads whole lines (at stride 2 it used half of
#: each line it read, and a 14x14x1024 input did not fit a 512 KB L2). Measured on AMD EPYC znver3 (AVX2, 1
#: thread, both builds in one process, in the network): ResNet-50's 1024 -> 2048 projection 4953 -> 3419
#: us, 512 -> 1024 2831 -> 2558 us; the network's summed calls 102.2 -> 100.7 ms
SUBSAMPLE_STRIDED = True
SUBSAMPLE_BLOCK = "bnc_subsample"


#: a packed conv on an NCHW{B}c input pads the blocked tensor (:func:`_conv2d_blocked_te`) instead of its
#: unblocked view (an NCHW copy the conv then reads plane by plane). Measured on AMD EPYC znver3 (AVX2, 1
#: thread, both builds in one process): RegNetY-400MF 15.24 -> 15.02 ms (the noise), ResNet-50 132.9 ->
#: 142.7 ms (its 3x3 convs at 7x7 and stride 2 slower). Off
BLOCKED_PAD = False


#: the vector widths (float32 lanes) of the targets on which a one-group NCHW conv copies its input into
#: NCHW{B}c blocks first, inside its function (:func:`_conv2d_packed_input_te`), when B divides the input
#: channels and the conv has at least PACK_MIN_OUTPUT_CHANNELS outputs (the copy is about 1/O of the conv's
#: work): the conv then reads whole lines of B channels per pixel and steps through a block at a time
#: (:data:`UNROLL_INPUT_BLOCK`), as on a carried layout, for convs outside it (ShuffleNet, DenseNet and the
#: convs next to grouped ones keep NCHW)
PACK_INPUT_LANES: tuple[int, ...] = (8,)
PACK_MIN_OUTPUT_CHANNELS = 32
PACK_IN_BLOCK = "bnc_pack_input"


def _input_pack(in_channels: int, groups: int, out_channels: int, padding) -> int:
    """The block B an NCHW conv packs its input into (:data:`PACK_INPUT_LANES`), 0 for none. Not for a
    padded conv unless :data:`BLOCKED_PAD`: the pad of the unblocked view would read the planes again."""
    lanes = vector_lanes()[0]
    if (lanes not in PACK_INPUT_LANES or groups != 1 or out_channels < PACK_MIN_OUTPUT_CHANNELS
            or (any(padding) and not BLOCKED_PAD)):
        return 0
    return lanes if in_channels % lanes == 0 and in_channels > lanes else 0


def _conv2d_packed_input_te(x, wp, *, pack: int, **kw):
    """:func:`_conv2d_blocked_te` on ``x`` (NCHW) copied into ``NCHW{pack}c`` first."""
    te = _tvm().te
    n, c, h, w = x.shape
    xb = te.compute((n, c // pack, h, w, pack), lambda i, cb, y, z, ci: x[i, cb * pack + ci, y, z],
                    name=PACK_IN_BLOCK)
    return _conv2d_blocked_te(xb, wp, **kw)


def _conv2d_generic_blocked_te(x, w, *, in_block: int, out_block: int, strides, padding, groups: int):
    """Any conv2d with blocked input/output: unblocked, TVM's NCHW conv, blocked again (a fallback that is
    always right; our rules schedule what they recognize)."""
    topi = _tvm().topi
    xin = unblock_channels(x) if in_block else x
    y = topi.nn.group_conv2d_nchw(xin, w, strides, padding, 1, groups) if groups > 1 else \
        topi.nn.conv2d_nchw(xin, w, strides, padding, 1)
    return block_channels(y, out_block) if out_block else y


def _legalize_blocked(bb, call):
    """A conv2d that :func:`channel_blocked` gave NCHW{B}c input, output or weight: the depthwise conv on
    blocks (:func:`~bncompile.lower.kernels.conv2d_packed.depthwise_blocked_te`), the packed conv reading
    and/or writing blocks (:func:`_conv2d_blocked_te`), else TVM's NCHW conv between layout copies."""
    tvm = _tvm()
    relax = tvm.relax
    a = call.attrs
    x, w = call.args[0], call.args[1]
    bi, bk = layout_block(str(a.data_layout)), layout_block(str(a.kernel_layout))
    bo = layout_block(str(a.out_layout) or str(a.data_layout))
    wn = _unpacked_weight(w, bk)
    o, i, kh, kw = wn.shape
    groups = int(a.groups)
    strides, padding = _const_int_list(a.strides), _const_int_list(a.padding)
    shape = list(x.ty.shape)             # the batch may be symbolic
    c = int(shape[1]) * bi if bi else int(shape[1])
    h, wd = int(shape[2]), int(shape[3])
    oh = (h + padding[0] + padding[2] - kh) // strides[0] + 1
    ow = (wd + padding[1] + padding[3] - kw) // strides[1] + 1
    if groups == c == o and i == 1 and bi and bi == bo:
        w4 = np.ascontiguousarray(wn.reshape(c // bi, bi, kh, kw).transpose(0, 2, 3, 1))
        return bb.call_te(depthwise_blocked_te, x, relax.const(w4, "float32"), strides=strides,
                          padding=padding, kernel=(kh, kw), primfunc_name_hint="dwconv2d_blocked")
    wino = _winograd_plan(wn.shape, groups, strides, c, oh, ow) if WINOGRAD_BLOCKED and bi and bo else None
    if wino is not None:
        block, tile = wino
        return bb.call_te(conv2d_winograd_te, x, relax.const(winograd_weight(wn, block), "float32"),
                          padding=padding, out_channels=o, block=block, tile=tile, in_block=bi, out_block=bo,
                          primfunc_name_hint="conv2d_winograd")
    if groups > 1 and _grouped_in_blocks({"groups": groups, "c": c, "o": o, "i": i}, bi, bo):
        # the groups of a block as one group of B channels: a block-diagonal weight (zeros between groups)
        wn, groups, i = _block_diagonal(wn, bi), c // bi, bi
        op, tiling = o, conv_tiling(bi, ow, out_height=oh)
    elif groups != 1 or c != i:
        op, tiling = o, None
    elif bo and (flat := flat_plan(o, oh, ow, kernel=(kh, kw), strides=strides, padding=padding, groups=groups,
                                   in_block=bi, out_block=bo, in_channels=c)):
        block, op, tile = flat
        if op != o:
            wn = np.concatenate([wn, np.zeros((op - o, i, kh, kw), wn.dtype)])
        packed = np.ascontiguousarray(wn.reshape(op // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1))
        return bb.call_te(_conv2d_flat_te, x, relax.const(packed, "float32"), out_block=bo, out_channels=o,
                          padded_channels=op, block=block, tile=tile, primfunc_name_hint="conv2d_flat16o")
    elif bo:    # a blocked output: no zero channels (the block divides them), a tile of whole blocks
        op, tiling = o, conv_tiling(o, ow, out_height=oh, odd=True)
        if tiling is not None and tiling[0] % bo:
            tiling = conv_tiling(o, ow, out_height=oh, block=bo)
    else:
        op, tiling = _packed_tiling(o, ow, oh)
    if tiling is not None:
        block = tiling[0]
        if op != o:
            wn = np.concatenate([wn, np.zeros((op - o, i, kh, kw), wn.dtype)])
        packed = np.ascontiguousarray(wn.reshape(op // block, block, i, kh, kw).transpose(0, 2, 3, 4, 1))
        return bb.call_te(_conv2d_blocked_te, x, relax.const(packed, "float32"), in_block=bi, out_block=bo,
                          strides=strides, padding=padding, out_channels=o, padded_channels=op, kernel=(kh, kw),
                          out_dtype="float32", block=block, groups=groups, primfunc_name_hint="conv2d_nchw16o")
    return bb.call_te(_conv2d_generic_blocked_te, x, relax.const(wn, "float32"), in_block=bi, out_block=bo,
                      strides=strides, padding=padding, groups=groups, primfunc_name_hint="conv2d_blocked")


def _block_diagonal(wn, block: int):
    """An OIHW grouped weight ``[O, I, KH, KW]`` (groups of I channels, I dividing ``block``) as one of
    groups of ``block`` channels: ``[O, block, KH, KW]``, each output channel's I taps at its group's offset
    inside the block, zeros elsewhere."""
    o, i = wn.shape[:2]
    out = np.zeros((o, block) + wn.shape[2:], wn.dtype)
    for oc in range(o):
        start = (oc // i) * i % block          # the group's first input channel, inside its block
        out[oc, start:start + i] = wn[oc]
    return out


def _conv2d_packed_sliced_te(x, wp, *, out_channels: int, padded_channels: int, **kw):
    """The packed conv over ``padded_channels`` (zero weights past ``out_channels``), then its first
    ``out_channels`` channels (a copy block the schedule runs as a parallel vectorized pass)."""
    tvm = _tvm()
    y = conv2d_packed_te(x, wp, out_channels=padded_channels, **kw)
    if padded_channels == out_channels:
        return y
    n, _, h, w = y.shape
    return tvm.te.compute((n, out_channels, h, w), lambda b, o, i, j: y[b, o, i, j], name=SLICE_BLOCK)


SLICE_BLOCK = "bnc_channel_slice"


#: the fewest values per output (or a symbolic count) that a float32 sum or mean accumulates in float64:
#: shorter ones (global pooling over 7x7-28x28) stay float32, whose error grows with the count (measured:
#: float64 made MobileNetV3's squeeze-excitation means 1.1-3.5x slower, 0.17 of 6.3 ms)
WIDE_SUM_MIN = 4096


def _wide_reduce(x, axis, keepdims: bool, mean: bool):
    """TE: ``sum`` (or ``mean``) of float32 ``x`` over ``axis`` accumulated in float64, rounded to float32
    once (see :func:`legalize_sum`)."""
    tvm = _tvm()
    te, tirx = tvm.te, tvm.tirx
    nd = len(x.shape)
    axes = sorted({int(a) % nd for a in axis}) if axis is not None else list(range(nd))
    red = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
    shape = [1 if a in red else x.shape[a] for a in range(nd)] if keepdims else \
        [x.shape[a] for a in range(nd) if a not in red]

    def body(*idx):
        it, full = iter(idx), []
        for a in range(nd):
            if a in red:
                full.append(red[a])
                if keepdims:
                    next(it)
            else:
                full.append(next(it))
        return te.sum(x[tuple(full)].astype("float64"), axis=[red[a] for a in axes])

    total = te.compute(shape, body, name="wide_sum")
    count = 1
    for a in axes:
        count = count * x.shape[a]
    if mean:
        return te.compute(shape, lambda *i: (total[i] / tirx.Cast("float64", count)).astype(x.dtype), name="wide_mean")
    return te.compute(shape, lambda *i: total[i].astype(x.dtype), name="wide_round")


def _legalize_wide(bb, call, *, mean: bool):
    """``relax.sum`` / ``relax.mean`` of a float32 tensor accumulated in float64 (:func:`_wide_reduce`);
    TVM's legalization for every other dtype, an empty axis list or a zero-size reduction."""
    tvm = _tvm()
    stat = _shim.submodule("tvm.relax.transform.legalize_ops.statistical")
    x = call.args[0]
    try:
        ok = str(x.ty.dtype) == "float32" and (call.attrs.axis is None or len(call.attrs.axis) > 0) \
            and not stat._has_const_zero_reduction_dim(call)
        if ok:      # only long reductions: a symbolic extent (the batch), or WIDE_SUM_MIN values or more
            dims = list(x.ty.shape.values)
            axes = range(len(dims)) if call.attrs.axis is None else [int(a) % len(dims) for a in call.attrs.axis]
            count = 1
            for a in axes:
                d = _static(dims[a])
                count = None if d is None or count is None else count * d
            ok = count is None or count >= WIDE_SUM_MIN
    except Exception:  # noqa: BLE001 - an unusual call: TVM's legalization
        ok = False
    if not ok:
        return tvm.ir.Op.get("relax.mean" if mean else "relax.sum").get_attr("FLegalize")(bb, call)
    return bb.call_te(_wide_reduce, x, call.attrs.axis, bool(call.attrs.keepdims), mean,
                      primfunc_name_hint="mean" if mean else "sum")


def dense_vector(n: int, lanes: int) -> int | None:
    """The output block V of a packed dense / the vector tile of :func:`schedule_inner_vector_reduction` for
    ``n`` outputs: the widest multiple of a full (else a half, a quarter; at least 4 lanes) register up to
    4 registers that divides ``n`` (1000 -> 40, 1280 -> 64 on AVX-512); None when none does."""
    for unit in (u for u in (lanes, lanes // 2, lanes // 4) if u >= 4):
        v = next((v for v in range(4 * lanes - 4 * lanes % unit, 0, -unit) if n % v == 0), None)
        if v is not None:
            return v
    return None


def _constant_matrix(bb, e):
    """The numpy value of ``e`` when it is a 2-D float32 constant, or a variable bound to
    ``permute_dims`` of one (ONNX Gemm's ``transB``); None otherwise."""
    tvm = _tvm()
    relax = tvm.relax
    if isinstance(e, relax.Var):
        try:
            bound = bb.lookup_binding(e)
        except Exception:  # noqa: BLE001 - not bound in this builder
            bound = None
        if bound is None:
            return None
        e = bound
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.permute_dims":
            inner = _constant_matrix(bb, e.args[0])
            if inner is None:
                return None
            axes = e.attrs.axes
            return inner.T if axes is None or [int(a) for a in axes] == [1, 0] else inner
    if not _is_constant(e):
        return None
    v = _const_value(e).numpy()
    return v if v.ndim == 2 and v.dtype == np.float32 else None


#: legalize a matmul by a constant matrix to the packed dense (:func:`legalize_matmul`); False: TVM's
DENSE_PACKED = True


def legalize_matmul(bb, call):
    """``relax.matmul`` of a float32 input by a constant 2-D float32 weight ``[K, N]`` (also ``permute_dims``
    of one) -> :func:`~bncompile.lower.kernels.conv2d_packed.dense_packed_te` over the weight packed in
    blocks of :func:`dense_vector` outputs; TVM's legalization otherwise. Measured (AMD EPYC znver4, 1
    thread, the weight cold: 64 MB written between calls): the 1280 x 1000 classifier 636 -> 356 us
    (onnxruntime's Gemm 433), 960 x 1280 597 -> 427 (onnxruntime 421): the unpacked weight was read in
    column strips, a few cache lines from each of its 1280 rows at a time."""
    _matmul = _shim.submodule("tvm.relax.transform.legalize_ops.linear_algebra")._matmul
    x = call.args[0]
    try:
        ok = (str(x.ty.dtype) == "float32" and x.ty.ndim >= 1
              and str(call.attrs.out_dtype) in ("", "None", "float32", "void"))
    except Exception:  # noqa: BLE001 - unknown rank or dtype
        ok = False
    w = _constant_matrix(bb, call.args[1]) if ok and DENSE_PACKED else None
    if w is None or not (w.shape[0] == _static(x.ty.shape[-1])):
        return _matmul(bb, call)
    k, n = w.shape
    v = dense_vector(n, vector_lanes()[0])
    if v is None:
        return _matmul(bb, call)
    wp = np.ascontiguousarray(w.reshape(k, n // v, v).transpose(1, 0, 2))
    return bb.call_te(dense_packed_te, x, _tvm().relax.const(wp, "float32"), primfunc_name_hint="dense_packed")


def legalize_sum(bb, call):
    """``relax.sum`` of float32 accumulated in float64 and rounded once, for sums of at least
    :data:`WIDE_SUM_MIN` values or a symbolic count. TVM's legalization adds in float32
    in loop order; the plain layer's backward (standard ops: ``ReduceMean(x)``, then centred sums) over
    533K values of mean 1000 then gave dx off by 76% (found by random testing; onnxruntime's blocked float32
    sums and bncompile's kernels were exact)."""
    return _legalize_wide(bb, call, mean=False)


def legalize_mean(bb, call):
    """``relax.mean``: as :func:`legalize_sum`, divided in float64 before the one rounding."""
    return _legalize_wide(bb, call, mean=True)


def legalize_sigmoid(bb, call):
    """``relax.sigmoid`` -> ``1 / (1 + fast_exp(-x))`` for float32 (TVM's ``fast_exp``: a range-reduced
    polynomial, relative error ~1e-7, that vectorizes; the ``exp`` intrinsic becomes one scalar ``expf``
    call per element on CPUs). Other dtypes keep TVM's legalization."""
    tvm = _tvm()
    x = call.args[0]
    if str(x.ty.dtype) != "float32":
        return _shim.submodule("tvm.relax.transform.legalize_ops.common")._call_topi_without_attr(
            tvm.topi.sigmoid, "tir_sigmoid")(bb, call)

    def sigmoid_te(t):
        e = tvm.topi.fast_exp(tvm.te.compute(t.shape, lambda *i: -t(*i), name="neg"))
        return tvm.te.compute(t.shape, lambda *i: tvm.tirx.const(1.0, "float32") / (
            tvm.tirx.const(1.0, "float32") + e(*i)), name="sigmoid")

    return bb.call_te(sigmoid_te, x, primfunc_name_hint="sigmoid")


# --------------------------------------------------------------------------- schedule rules

def _static(e) -> int | None:
    try:
        return int(e)
    except Exception:
        return None


def _block_named(sch, prefix: str):
    """Blocks of the function whose name starts with ``prefix`` (FuseTIR may add a suffix)."""
    out = []
    for blk in _all_blocks(sch):
        if sch.get(blk).name_hint.startswith(prefix):
            out.append(blk)
    return out


def _all_blocks(sch):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _iter_kinds(sch, blk) -> str:
    """'S'/'R'/'O' per block iter."""
    out = []
    for iv in sch.get(blk).iter_vars:
        k = int(iv.iter_type)
        out.append("S" if k == 0 else "R" if k == 2 else "O")
    return "".join(out)


def _packed_block(sch, blk) -> int | None:
    """The channel block of our conv: the last dim of its 5-D (packed weight) read, the last 5-D one (an
    NCHW{B}c input is read before the weight)."""
    shapes = [getattr(_region_buffer(region), "shape", ()) for region in sch.get(blk).reads]
    weights = [shape for shape in shapes if len(shape) == 5]
    return _static(weights[-1][4]) if weights else None


def _input_block(sch, blk) -> int:
    """The channel block B of the NCHW{B}c input (or its zero-padded copy) a packed conv block reads: the
    last dim of its first 5-D read when the packed weight (5-D too) follows it; 0 for an NCHW input."""
    shapes = [getattr(_region_buffer(region), "shape", ()) for region in sch.get(blk).reads]
    fives = [shape for shape in shapes if len(shape) == 5]
    return (_static(fives[0][4]) or 0) if len(fives) >= 2 else 0


def _unroll_step(sch, blk, cin: int | None) -> int:
    """By how many input channels the packed conv ``blk``'s reduction is unrolled (:data:`UNROLL_INPUT_BLOCK`):
    its input's channel block, halved down to :data:`UNROLL_STEP_MAX`; 0 when not (no block, or it does not
    divide the ``cin`` input channels)."""
    step = _input_block(sch, blk) if UNROLL_INPUT_BLOCK else 0
    while step > UNROLL_STEP_MAX:
        step //= 2
    return step if step and cin is not None and cin % step == 0 else 0


#: the order of the packed conv's parallel loop: ``"auto"`` puts the output rows outside the channel blocks
#: when the conv reads fewer weight than input elements per sample (:func:`_rows_outer`), True/False always/
#: never. TVM's pool hands each thread one contiguous range of the fused loop, so rows outside give each
#: thread a band of rows of every channel: the next conv (rows outside too) reads the band its own thread
#: wrote, from its own core's L2, where channel blocks outside leave half of every input channel in the
#: other core's cache. Channel blocks stay outside where the weight is the larger read (ResNet's 7x7 and
#: 14x14 stages), so each thread reads half the weight, not all of it. Measured at 2 threads (AMD EPYC
#: znver4, 2 cores, whole networks at 224x224, both orders in one process, interleaved): DenseNet-121
#: 3.5-11% faster (four runs), MobileNetV2 4-8%, RegNetY 4-20%, EfficientNet-B0 3%, ResNet-50 from 9%
#: faster to 4% slower (six runs: the noise); 1 thread unchanged.
ROWS_OUTER: bool | str = "auto"
#: a packed conv with at most PAD_TASK_MAX_CHANNELS input channels whose parallel tasks are bands of output
#: rows (rows outside: a stem such as MobileNet's 3 -> 32 3x3 stride 2) builds the zero-padded input rows
#: each task reads inside that task (again for each channel block: a few rows of 3 channels), instead of a
#: serial pass over the whole padded copy before its parallel loop (3 x 226 x 226 floats zero-filled, then
#: the interior copied, on one thread). MobileNetV2's stem at 2 threads 197 -> 162 us (1 thread 340 -> 337;
#: the network 4.09 -> 4.05 ms, AMD EPYC znver4)
PAD_IN_ROW_TASKS = True
PAD_TASK_MAX_CHANNELS = 4
#: a packed conv that reads an NCHW{B}c input runs its input-channel loop in steps of B, the B channels of
#: one input block unrolled: each load then sits at a constant offset from the block's base, where the
#: flat channel loop computed ``rc // B`` and ``rc % B`` into every address (12 integer instructions per
#: two channels on AVX2, next to 14 FMAs). Measured on AMD EPYC znver3 (AVX2, 1 thread, both builds in one
#: process): MobileNetV2's pointwise convs at 14x14 and 7x7 0.59-0.98x the time (96 -> 576 at 14x14 481 ->
#: 339 us, 576 -> 96 537 -> 314), the network 18.7 -> 14.4 ms; MobileNetV3-Large 15.0 -> 12.3, EfficientNet-B0
#: 21.1 -> 19.6. The step is at most UNROLL_STEP_MAX channels: LLVM spilled accumulators of znver4's code
#: for a whole 16-channel block (54 stack accesses per 224 FMAs), none for 8 (the assembly read; no
#: AVX-512 CPU timed it)
UNROLL_INPUT_BLOCK = True
UNROLL_STEP_MAX = 8


def _rows_outer(sch, blk) -> bool:
    """:data:`ROWS_OUTER` for the packed conv block ``blk``: rows outside when its 5-D packed weight has
    fewer elements than one sample of its 4-D input (the padded copy where there is one)."""
    if ROWS_OUTER != "auto":
        return bool(ROWS_OUTER)
    shapes = [[_static(d) for d in getattr(_region_buffer(region), "shape", ())] for region in sch.get(blk).reads]
    shapes = [shape for shape in shapes if len(shape) in (4, 5)]
    if len(shapes) < 2 or len(shapes[-1]) != 5 or None in shapes[-1]:
        return False
    weight = math.prod(shapes[-1])
    # the input (4-D, or 5-D NCHW{B}c), per sample: the batch may be symbolic; the accumulator comes first
    data = next((math.prod(shape[1:]) for shape in shapes[:-1] if None not in shape[1:]), None)
    return data is not None and weight < data


def schedule_conv(func, target=None):
    """The packed conv block(s): the channel block vectorized, a register tile of output columns (and
    rows, see :func:`conv_tiling`), the reduction loops outside it, a local accumulator written back once
    (with the fused epilogue inlined into the write-back), parallel over batch x channel blocks x row
    tiles (batch x row tiles x channel blocks where the weight is the smaller read: :data:`ROWS_OUTER`).
    None when the function has no such block (or its tiling does not divide evenly). A flattened-plane conv
    (:data:`FLAT_PIXEL_TILES`) goes to :func:`_schedule_flat_conv`."""
    sch = _schedule_of(func)
    convs = _block_named(sch, CONV_BLOCK)
    if not convs:
        return None
    for ub in _block_named(sch, UNBLOCK_BLOCK):     # an NCHW{B}c input: the conv reads the blocks directly
        sch.compute_inline(ub)
    if _block_named(sch, FLAT_OUT_BLOCK):
        return _schedule_flat_conv(sch, convs, target)
    for name in [sch.get(b).name_hint for b in convs]:
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if len(loops) != 7:
            return None
        n, oc, oh, ow, rc, ry, rx = loops
        work = _loop_work(sch, loops)
        OW = _static(sch.get(ow).extent)
        OH = _static(sch.get(oh).extent)
        OC = _static(sch.get(oc).extent)
        block = _packed_block(sch, blk)
        tiling = conv_tiling(OC, OW, target, out_height=OH, block=block) if OC is not None else None
        if OW is None or block is None or OC % block or tiling is None or tiling[0] != block:
            return None
        _, T, TH = tiling
        if OW % T or (TH > 1 and (OH is None or OH % TH)):
            return None
        ocb, oci = sch.split(oc, [None, block])
        owo, owi = sch.split(ow, [None, T])
        if TH > 1:
            oho, ohi = sch.split(oh, [None, TH])
        else:
            oho, ohi = oh, None
        rows_first = _rows_outer(sch, blk)
        outer = (n, oho, ocb) if rows_first else (n, ocb, oho)
        sch.reorder(*outer, owo, rc, ry, rx, *([ohi] if ohi is not None else []), owi, oci)
        wb = sch.cache_write(blk, 0, "local")
        # accumulator channels-last, so each vector of output channels is contiguous in the local tile
        sch.transform_layout(blk, ("write", 0), lambda b, o, y, z: (b, y, z, o))
        # inline the element-wise epilogue (bias, relu, residual add...) into the write-back
        _inline_epilogue(sch, wb)
        cin = _static(sch.get(rc).extent)
        stem = rows_first and cin is not None and cin <= PAD_TASK_MAX_CHANNELS
        fused = sch.fuse(*outer)
        if parallel_worth(work, vector_lanes(target)[0]):
            sch.parallel(fused)
        if PAD_IN_ROW_TASKS and stem:
            _pad_per_task(sch, blk, fused, vector_lanes(target)[0])
        sch.reverse_compute_at(wb, owo)
        sch.unroll(rx)          # (unrolling ry as well made LLVM spill the accumulators: 4x slower)
        red = rc
        step = _unroll_step(sch, blk, cin)
        if step:
            red, rci = sch.split(rc, [None, step])
            sch.reorder(red, ry, rx, rci)
            sch.unroll(rci)
        sch.unroll(owi)
        if ohi is not None:
            sch.unroll(ohi)
        lanes = vector_lanes(target)[0]
        odd = block > lanes and block % lanes == 0 and (block // lanes) & (block // lanes - 1)
        if odd:     # 3 vectors of channels: LLVM's <24 x float> legalizes badly (2.4-3x slower); 3 <8 x float> not
            oco, oci = sch.split(oci, [None, lanes])
            sch.unroll(oco)
        sch.vectorize(oci)
        sch.decompose_reduction(blk, red)   # last: loop primitives need the reduction block whole
        init = sch.get_sblock(name + "_init")
        il = sch.get_loops(init)
        for lp in il[len(il) - (3 if ohi is not None else 2) - (1 if odd else 0):-1]:
            sch.unroll(lp)
        sch.vectorize(il[-1])
        out_block = _blocked_output(sch, wb)
        if out_block:
            if block % out_block:
                return None
            _store_channel_vectors(sch, wb, owo, out_block)
            continue
        if _costly_epilogue(sch, wb):
            wb = _epilogue_on_channel_vectors(sch, wb, owo)
        wl = sch.get_loops(wb)
        # write-back loops under owo: (n 1, oc 16, oh 1, ow T) -> unroll the channel loop
        if len(wl) >= 2 and _static(sch.get(wl[-1]).extent) == T and T >= 4:
            sch.vectorize(wl[-1])      # the epilogue (a sigmoid's polynomial...) runs on vectors
        _slice_in_tile(sch, wb, owo, T)
    _decompose_root_pads(sch)
    _schedule_leftovers(sch, vector_lanes(target)[0])   # the pad, element-wise blocks not inlined
    return sch


def _schedule_flat_conv(sch, convs, target):
    """:data:`FLAT_PIXEL_TILES`: every block but the conv and the output inlined into the function's output
    (the epilogue, and the unflattening ``bnc_flat_out``), whose plane is flattened
    (``transform_block_layout``) and tiled: parallel over batch x chunks of the plane (:func:`flat_chunks`)
    x 16-channel blocks, then tiles of :data:`FLAT_TILE` pixels; under each tile the conv (``compute_at``)
    into a local channels-last accumulator, the input channels outside the register tile (unrolled by the
    input block), the store of 6 x 2 vectors with the epilogue. None when a block does not inline (a fused
    function with two outputs), or the function is not the one :func:`_conv2d_flat_te` makes (one conv,
    one 5-D output, static extents, the conv's tile loops 16 x 6 after ``compute_at``); a schedule
    primitive that raises also leaves the function to the next rule."""
    if len(convs) != 1:
        return None
    conv = convs[0]
    lanes = vector_lanes(target)[0]
    work = _loop_work(sch, sch.get_loops(conv))
    for blk in _all_blocks(sch):
        if sch.get(blk).same_as(sch.get(conv)) or not sch.get_consumers(blk):
            continue
        if not _compute_inline(sch, blk):       # refused, or its value too large to inline (INLINE_MAX_SIZE)
            log.debug("flat conv: %s does not inline", sch.get(blk).name_hint)
            return None
    sinks = [b for b in _all_blocks(sch) if not sch.get(b).same_as(sch.get(conv))]
    if len(sinks) != 1 or len(sch.get_loops(sinks[0])) != 5:
        return None
    sink = sinks[0]
    block = _packed_block(sch, conv)
    acc_shape = [_static(d) for d in _region_buffer(sch.get(conv).writes[0]).shape]
    n_, cb_, h_, w_, bo = (_static(sch.get(lp).extent) for lp in sch.get_loops(sink))
    if block is None or None in (cb_, h_, w_, bo) or block % bo or None in acc_shape[1:]:
        return None
    tile = flat_tile(h_ * w_)
    if acc_shape[3] % tile:
        return None
    cin = 1
    for iv in sch.get(conv).iter_vars:                  # 1x1: the reduction is the input channels
        if iv.iter_type != 0:
            cin *= _static(iv.dom.extent) or 0
    chunks = flat_chunks(acc_shape[1] // block, h_ * w_, cin)
    if acc_shape[3] % (tile * chunks):
        return None
    width = w_
    sch.transform_block_layout(sink, lambda b, c, y, z, ci: (b, c, y * width + z, ci))
    n, cb, px, ci = sch.get_loops(sink)
    cbo, cbi = sch.split(cb, [None, block // bo])
    pc, po, pi = sch.split(px, [chunks, acc_shape[3] // (tile * chunks), tile])
    sch.reorder(n, pc, cbo, po, pi, cbi, ci)
    fused = sch.fuse(n, pc, cbo)
    if parallel_worth(work, lanes):
        sch.parallel(fused)
    sch.compute_at(conv, po)
    sch.set_scope(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda b, o, y, z: (b, y, z, o))
    loops = sch.get_loops(conv)
    depth = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(po)))
    inner = [lp for lp in loops[depth + 1:] if _static(sch.get(lp).extent) != 1]
    if [_static(sch.get(lp).extent) for lp in inner[:2]] != [block, tile] or len(inner) != 3:
        return None
    oc, pix, rc = inner
    sch.reorder(rc, pix, oc)
    red = rc
    step = _unroll_step(sch, conv, _static(sch.get(rc).extent))
    if step:
        red, rci = sch.split(rc, [None, step])
        sch.unroll(rci)
    sch.unroll(pix)
    sch.vectorize(oc)
    name = sch.get(conv).name_hint
    sch.decompose_reduction(conv, red)
    init = sch.get_sblock(name + "_init")
    il = sch.get_loops(init)
    sch.unroll(il[-2])
    sch.vectorize(il[-1])
    sch.unroll(pi)
    sch.unroll(cbi)
    sch.vectorize(ci)
    return sch


def _pad_per_task(sch, blk, at, lanes: int) -> None:
    """:data:`PAD_IN_ROW_TASKS`: the conv's zero-pad block (NCHW), if it has one, computed under the parallel
    loop ``at``: each task pads the input rows its output rows read, its innermost loop vectorized."""
    pads = [p for p in sch.get_producers(blk) if sch.get(p).name_hint == PAD_BLOCK]
    if len(pads) != 1 or len(sch.get_loops(pads[0])) != 4:
        return
    sch.compute_at(pads[0], at)
    _vectorize_inner(sch, pads[0], lanes)


def _blocked_output(sch, wb) -> int:
    """The channel block of the NCHW{B}c tensor the write-back ``wb`` stores (its epilogue inlined), 0 when
    it stores NCHW."""
    writes = sch.get(wb).writes
    if len(writes) != 1:
        return 0
    shape = getattr(_region_buffer(writes[0]), "shape", ())
    return (_static(shape[-1]) or 0) if len(shape) == 5 else 0


def _store_channel_vectors(sch, wb, at, out_block: int) -> None:
    """The write-back of a packed conv into NCHW{B}c, under loop ``at``: its channel loop innermost, split by
    B and vectorized (one contiguous vector store per pixel and block of B channels), the rest unrolled."""
    loops = sch.get_loops(wb)
    depth = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(at)))
    inner = [lp for lp in loops[depth + 1:] if _static(sch.get(lp).extent) != 1]
    if not inner:
        return
    chan, rest = inner[0], inner[1:]
    if rest:
        sch.reorder(*rest, chan)
    co, ci = sch.split(chan, [None, out_block])
    sch.vectorize(ci)
    for lp in (*rest, co):
        sch.unroll(lp)


def schedule_winograd(func, target=None):
    """The stages of :func:`~bncompile.lower.kernels.conv2d_packed.conv2d_winograd_te`, in chunks of
    output rows (:func:`winograd_chunk_rows`; unchunked when the output rows are odd): per chunk, parallel
    over batch x chunks, the parity split and the input transform of the chunk's tiles (the 16 positions
    unrolled, the tile columns vectorized), the 16 products as the packed conv's register tile (``tile``
    tile columns x the channel block, vectorized, a local accumulator), then the output transform over
    vectors of a channel block with the fused epilogue (bias, relu, residual add) inlined. A chunk's
    transformed input and products stay in L2 from one stage to the next."""
    sch = _schedule_of(func)
    if not _block_named(sch, WINO_GEMM_BLOCK):
        return None
    for ub in _block_named(sch, UNBLOCK_BLOCK):     # an NCHW{B}c input: the parity split reads the blocks
        sch.compute_inline(ub)
    lanes = vector_lanes(target)[0]
    gemm = sch.get_sblock(WINO_GEMM_BLOCK)
    g_n, g_ob, g_ty, g_tx, g_xi, g_oi, g_rc = sch.get_loops(gemm)
    block, TH, TW, C = (_static(sch.get(lp).extent) for lp in (g_oi, g_ty, g_tx, g_rc))
    nob = _static(sch.get(g_ob).extent)
    if None in (block, TH, TW, C, nob):
        return None
    tiling = conv_tiling(nob * block, TW, target, block=block)
    if tiling is None or TW % tiling[1]:
        return None
    T = tiling[1]
    par = parallel_worth(_loop_work(sch, sch.get_loops(gemm)), lanes)
    out = sch.get_sblock(WINO_OUTPUT_BLOCK)
    _inline_epilogue(sch, out)
    on, oc, oy, ox = sch.get_loops(out)
    OH = _static(sch.get(oy).extent)
    k = winograd_chunk_rows(TH, TW, C, nob * block, OH) if OH is not None else 0
    ocb, oci = sch.split(oc, [None, block])
    if k:
        yc, yi = sch.split(oy, [None, 2 * k])
        sch.reorder(on, yc, ocb, yi, ox, oci)
        anchor = sch.fuse(on, yc)
        for name in (WINO_GEMM_BLOCK, WINO_INPUT_BLOCK, WINO_SPLIT_BLOCK):
            sch.compute_at(sch.get_sblock(name), anchor, preserve_unit_loops=True)
        if par:
            sch.parallel(anchor)
        lead = 1
    else:
        sch.reorder(on, ocb, oy, ox, oci)
        f = sch.fuse(on, ocb, oy)
        if par:
            sch.parallel(f)
        lead = 0
    sch.vectorize(oci)
    # the products: loops [anchor |] n, ob, ty, tx, xi, oi, rc -> xi, n, ob, ty, tx/T | rc, T, oi
    gemm = sch.get_sblock(WINO_GEMM_BLOCK)
    g_n, g_ob, g_ty, g_tx, g_xi, g_oi, g_rc = sch.get_loops(gemm)[lead:]
    po, pi = sch.split(g_tx, [None, T])
    sch.reorder(g_xi, g_n, g_ob, g_ty, po, g_rc, pi, g_oi)
    wb = sch.cache_write(gemm, 0, "local")
    if not k:
        f = sch.fuse(g_xi, g_n, g_ob, g_ty)
        if par:
            sch.parallel(f)
    sch.reverse_compute_at(wb, po)
    sch.unroll(pi)
    sch.vectorize(g_oi)
    sch.decompose_reduction(gemm, g_rc)
    il = sch.get_loops(sch.get_sblock(WINO_GEMM_BLOCK + "_init"))
    sch.unroll(il[-2])
    sch.vectorize(il[-1])
    sch.vectorize(sch.get_loops(wb)[-1])
    # B^T d B: loops [anchor |] xi, n, c, ty, tx -> n, c, ty, xi (unrolled), tx (vectorized)
    vin = sch.get_sblock(WINO_INPUT_BLOCK)
    vx, vn, vc, vty, vtx = sch.get_loops(vin)[lead:]
    sch.reorder(vn, vc, vty, vx, vtx)
    if not k:
        f = sch.fuse(vn, vc)
        if par:
            sch.parallel(f)
    sch.unroll(vx)
    sch.vectorize(vtx)
    if not k:
        ls = sch.get_loops(sch.get_sblock(WINO_SPLIT_BLOCK))
        f = sch.fuse(ls[0], ls[1])
        if par:
            sch.parallel(f)
    _schedule_leftovers(sch, lanes)
    log.debug("winograd conv: %s channels in, %s out, %sx%s tiles, register tile %s, chunk %s tile rows",
              C, nob * block, TH, TW, T, k)
    return sch


def _slice_in_tile(sch, wb, at, width: int) -> None:
    """The channel slice of a zero-padded conv (:data:`SLICE_BLOCK`, carrying the epilogue) moved into the
    conv's tile, right after the write-back ``wb`` under loop ``at``: the tile's channels below
    ``out_channels`` are stored from the values just written (in cache), and the function runs ONE parallel
    loop instead of two (each parallel loop is a launch of the thread pool: a wake-up and a join per call,
    which on a loaded machine waits for a descheduled worker), and the write-back is inlined into it (the
    slice reads the accumulator tile; the padded output is never stored). The last block's zero channels
    are cut by the predicate ``reverse_compute_at`` adds. Left at the root (its own parallel pass) when TVM
    refuses."""
    for sl in sch.get_consumers(wb):
        if not sch.get(sl).name_hint.startswith(SLICE_BLOCK):
            continue
        try:
            sch.reverse_compute_at(sl, at)
        except Exception as err:  # noqa: BLE001 - the slice stays a parallel pass of its own
            log.debug("channel slice stays at the root: %s", err)
            return
        try:        # the slice reads the accumulator tile itself: no padded output in memory
            sch.compute_inline(wb)
        except Exception as err:  # noqa: BLE001 - the write-back stays, the slice reads its output
            log.debug("conv write-back not inlined into the slice: %s", err)
        inner = sch.get_loops(sl)[-1]
        if _static(sch.get(inner).extent) == width and width >= 4:
            sch.vectorize(inner)


#: calls and loads (opening parentheses of the printed body) above which an epilogue is computed on channel
#: vectors before the NCHW store: a bias + relu / clip / residual add has about 15, x * hardsigmoid(x) ~40,
#: a sigmoid's ``fast_exp`` several hundred
COSTLY_EPILOGUE = 60


def _costly_epilogue(sch, wb) -> bool:
    """True when the write-back block's expression is larger than :data:`COSTLY_EPILOGUE` (TVM 0.27 has
    no Python TIR visitor: the printed body's parentheses stand for its calls and loads)."""
    return str(sch.get(wb).body).count("(") > COSTLY_EPILOGUE


#: the largest block expression (calls and loads: parentheses of its printed body) an inlining may make.
#: A block that reads its producer k times gets k copies of the producer's expression, so a chain of such
#: blocks inlined one into the next grows as k**depth, and so does a chain of branches that join again
#: (``x + relu(x)``: the producer is copied into both branches): before this bound 4 chained float32
#: sigmoids (``fast_exp`` reads its input about 30 times) took 45 s to compile and 8 ran out of memory, 18
#: chained ``x + relu(x)`` took 2 minutes and 22 ran out of memory. One conv epilogue with a sigmoid or
#: SiLU is a few hundred; a long chain stops being inlined at the bound and keeps its later blocks.
INLINE_MAX_SIZE = 2000


#: calls whose arguments cost more than their printed size, with the factor they are counted at:
#: ``tanh``, which TVM's lowering (LowerIntrin, llvm) expands into a ratio of exponentials with clamping
#: that reads its argument several times (6 chained ``x * tanh(x) - x`` blocks printed 27 KB inlined but
#: took 4.5 s to build, 7 took 49 s; erf, exp, log, softplus, asinh... lower to one call each: measured,
#: no growth), and conditionals (a reflect pad's ``if_then_else``/``Select`` in index arithmetic) nested in
#: conditionals, which TVM's simplifier handles in time exponential in the depth (5 chained reflect pads
#: with slices printed 45 KB inlined and took 55 s to schedule and 25 s to build); one level of
#: conditionals (the Winograd output's parity select) counts at its printed size.
EXPANDED_INTRINSICS = {"T.tanh(": 8, "T.if_then_else(": 4, "T.Select(": 4}
_CONDITIONALS = ("T.if_then_else(", "T.Select(")


def lowered_size(text: str) -> int:
    """The size of a printed TIR expression once lowered: its parentheses (calls and loads) and size
    markers (:func:`_substituted_size`), each argument of an :data:`EXPANDED_INTRINSICS` call counted as
    often as the lowering copies it."""
    if not any(k in text for k in EXPANDED_INTRINSICS):
        return text.count("(") + text.count(_MARK)
    match, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "(":
            stack.append(i)
        elif ch == ")" and stack:
            match[stack.pop()] = i

    def size(lo: int, hi: int, in_conditional: bool) -> int:
        total, i = 0, lo
        while i < hi:
            if text[i] == "(" or text[i] == _MARK:
                total += 1
            else:
                for name, copies in EXPANDED_INTRINSICS.items():
                    if text.startswith(name, i):
                        cond = name in _CONDITIONALS
                        factor = copies if (not cond or in_conditional) else 1
                        open_at = i + len(name) - 1
                        close = match.get(open_at, hi)
                        total += 1 + factor * size(open_at + 1, close, in_conditional or cond)
                        i = close
                        break
            i += 1
        return total

    return size(0, len(text), False)


def _inline_size_ok(sch, value_block, reader) -> bool:
    """Whether substituting ``value_block``'s stored expression for each of ``reader``'s loads of its
    buffer leaves ``reader`` within :data:`INLINE_MAX_SIZE`. Checked for a single load too: a block with
    two consumers is copied into both, so where the branches join again (``x + relu(x)``, chained) one
    load per reader doubles the expression per level just the same. Both printed bodies are within the
    bound already (every inlining is checked), so printing them is cheap."""
    import re

    vb = sch.get(value_block)
    if len(vb.writes) != 1:
        return True                       # TVM refuses to inline it anyway
    text = str(sch.get(reader).body)
    copies = len(re.findall(r"(?<![\w.])" + re.escape(_region_buffer(vb.writes[0]).name) + r"\[", text))
    if copies == 0:
        return True
    # loads inside an intrinsic's argument are copied again by its lowering: the estimate substitutes the
    # value's size for every load, then counts as the lowering would
    return _substituted_size(text, {_region_buffer(vb.writes[0]).name: _value_cost(str(vb.body))}) \
        <= INLINE_MAX_SIZE


def inline_would_blow_up(func) -> bool:
    """Whether inlining every spatial block of ``func`` into its consumers would make an expression larger
    than :data:`INLINE_MAX_SIZE` (each block's size: its own, plus, per producer, the producer's size
    times the loads of it; in program order, which is topological)."""

    sch = _schedule_of(func)
    cost: dict = {}
    for blk in _all_blocks(sch):
        b = sch.get(blk)
        body = str(b.body)
        costs = {}
        for p in sch.get_producers(blk):
            pb = sch.get(p)
            if len(pb.writes) != 1 or "R" in _iter_kinds(sch, p):
                continue
            costs[_region_buffer(pb.writes[0]).name] = cost.get(pb.name_hint, (0, 0))
        total = _substituted_size(body, costs)
        # the block's value once its producers are inlined: its size, and its own variables' uses
        cost[b.name_hint] = (total, _value_cost(body)[1])
        if total > INLINE_MAX_SIZE:
            return True
    return False


_MARK = "@"          # one unit of an inlined value's size in a substituted text (never in printed TIR)


def _value_cost(body: str) -> tuple[int, int]:
    """``(size, uses)`` of a block's printed body for :func:`_substituted_size`: its lowered size and how
    often it uses its block variables (``v_...``), each of which an inlining replaces by the reader's
    index expression."""
    import re

    return lowered_size(body), len(re.findall(r"(?<![\w.])v_\w+", body))


def _substituted_size(text: str, costs: dict) -> int:
    """:func:`lowered_size` of ``text`` with every load of a buffer named in ``costs`` (name -> ``(size,
    uses)`` of its value, :func:`_value_cost`) standing for the inlined value: the value's size plus, per
    use of a block variable, the load's index expression (an index of index arithmetic, a reflect pad's
    conditionals, grows this way), as that many size markers."""
    import re

    for name, (size, uses) in costs.items():
        def marks(m, size=size, uses=uses):
            return _MARK * max(1, size + uses * lowered_size(m.group(1)))

        text = re.sub(r"(?<![\w.])" + re.escape(name) + r"\[([^\]]*)\]", marks, text)
    return lowered_size(text)


def _compute_inline(sch, blk) -> bool:
    """``compute_inline(blk)`` unless a consumer would outgrow :data:`INLINE_MAX_SIZE`; True when inlined.
    TVM's errors (not inlinable) propagate as before."""
    if not all(_inline_size_ok(sch, blk, c) for c in sch.get_consumers(blk)):
        log.debug("not inlined (expression size): %s", sch.get(blk).name_hint)
        return False
    sch.compute_inline(blk)
    return True


def _reverse_compute_inline(sch, blk) -> bool:
    """``reverse_compute_inline(blk)`` unless the producer it goes into would outgrow
    :data:`INLINE_MAX_SIZE`, or ``blk`` writes fewer (or more) elements than a producer: True when inlined.
    TVM 0.27 reverse-inlines a consumer that reads only part of its producer (a Slice of rows fused after
    a conv) without an error, and the producer's loops then write the consumer's smaller output past its
    end: silently wrong results (found by a random differential run: 0.08 relative error)."""
    producers = sch.get_producers(blk)
    if not all(_same_size(sch, p, blk) for p in producers):
        log.debug("not reverse-inlined (reads part of its producer): %s", sch.get(blk).name_hint)
        return False
    if not all(_inline_size_ok(sch, p, blk) for p in producers):
        log.debug("not reverse-inlined (expression size): %s", sch.get(blk).name_hint)
        return False
    sch.reverse_compute_inline(blk)
    return True


def _same_size(sch, a, b) -> bool:
    """True when blocks ``a`` and ``b`` each write one buffer and the two hold provably as many elements."""
    tvm = _tvm()
    wa, wb = sch.get(a).writes, sch.get(b).writes
    if len(wa) != 1 or len(wb) != 1:
        return False
    one = tvm.tirx.const(1, "int64")
    size_a = functools.reduce(operator.mul, [tvm.tirx.Cast("int64", d) for d in _region_buffer(wa[0]).shape], one)
    size_b = functools.reduce(operator.mul, [tvm.tirx.Cast("int64", d) for d in _region_buffer(wb[0]).shape], one)
    return bool(_shim.submodule("tvm.sym").Analyzer().can_prove_equal(size_a, size_b))


def _epilogue_on_channel_vectors(sch, wb, at):
    """Split the packed conv's write-back ``wb`` (epilogue + NCHW store, under loop ``at``): the epilogue
    runs on the channels-last accumulator tile along the channels (whole vectors, contiguous) into a
    second local tile, then a plain copy stores it as NCHW (vectorized along the width, as before). The
    NCHW store alone vectorizes only along the width tile (7 lanes for 112 or 56 columns): a sigmoid's
    polynomial on 7-lane vectors of values gathered across the tile took 2/3 of EfficientNet's
    16 -> 96-channel 1x1 conv. Returns the store block."""
    store = sch.cache_write(wb, 0, "local")
    sch.transform_layout(wb, ("write", 0), lambda b, o, y, z: (b, y, z, o))
    sch.reverse_compute_at(store, at)
    loops = sch.get_loops(wb)
    depth = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(at)))
    inner = loops[depth + 1:]
    chan = [lp for lp in inner if _static(sch.get(lp).extent) not in (None, 1)]
    if len(chan) >= 2:
        sch.reorder(*chan[1:], chan[0])
        sch.vectorize(chan[0])
    return store


def _decompose_root_pads(sch) -> None:
    """Each zero-pad block still at the root (``bnc_pad``, TVM's ``pad_temp``...) -> a block of zeros over
    the padded tensor, then the in-bounds copy without a test per element (``decompose_padding``); both
    are left to :func:`_schedule_leftovers` (parallel, vectorized). A padded copy tests each element and
    does not vectorize: MobileNetV3's 3 x 226 x 226 pad took as long as its first conv."""
    for blk in _all_blocks(sch):
        try:
            if not sch.get(blk).name_hint.startswith(("bnc_pad", "pad")) or not _untouched(sch, blk):
                continue
            sch.decompose_padding(blk, sch.get_loops(blk)[0])
        except Exception as err:  # noqa: BLE001 - not the padding pattern: the copy tests each element
            log.debug("pad not decomposed: %s", err)


def depthwise_tiling(out_width: int, out_height: int, lanes: int, regs: int) -> tuple[int, int]:
    """``(width vector, rows)`` of :func:`schedule_depthwise`. The width: the whole output row when it fits
    in one vector register (7, 14 on AVX-512), else the largest divisor of the row that is a whole number of
    vectors or half-vectors up to two registers (56 -> 8 on AVX-512: odd-sized vectors such as 28 lanes
    split into 16 + 8 + 4 and the weight broadcasts spill), else the largest divisor up to two registers.
    The rows: the most that divide the height with at most ``regs / 4`` accumulator registers (the rest hold
    the input vectors and the weight broadcasts)."""
    if out_width <= lanes:
        tw = out_width
    else:
        divs = [d for d in range(2 * lanes, 0, -1) if out_width % d == 0]
        tw = next((d for d in divs if d % (lanes // 2) == 0), divs[0])
    per_row = -(-tw // lanes)
    most = max(1, regs // 4 // per_row)
    th = next(t for t in range(min(most, out_height), 0, -1) if out_height % t == 0)
    return tw, th


def _vectorize_inner(sch, blk, lanes: int) -> None:
    """Vectorize the innermost loop of ``blk`` (a row of a plane) when it is static and at most 16 vectors
    long (LLVM splits a long vector into registers)."""
    inner = sch.get_loops(blk)[-1]
    e = _static(sch.get(inner).extent)
    if e is not None and 1 < e <= 16 * lanes:
        sch.vectorize(inner)


def schedule_max_pool(func, target=None):
    """:func:`max_pool2d_te`'s blocks, scheduled as :func:`schedule_depthwise` schedules a depthwise conv."""
    return schedule_depthwise(func, target, block=POOL_BLOCK)


#: a depthwise conv (or max pool) of at least :data:`DW_ROW_CHUNK_MIN` output rows runs its parallel loop
#: over batch x DW_ROW_CHUNKS bands of rows x channels, each band's padded plane filled where it is used
#: (its halo rows twice): so each thread of two reads and writes the rows the convs around it
#: (:data:`ROWS_OUTER`) give the same thread, not half of the channels. 0: one band (channels outside).
#: MobileNetV2 at 2 threads: 2-3% faster (three A/B runs, AMD EPYC znver4); 1 thread unchanged.
DW_ROW_CHUNKS = 2
DW_ROW_CHUNK_MIN = 28

#: a depthwise conv or max pool of stride > 1 builds the padded rows and their column phases of each tile of
#: output rows where the tile reads them (its rows plus the halo: 17 padded rows for 8 output rows of a 3x3
#: stride-2 window), not the channel's whole plane: a 112 x 112 plane's pad and phases are 2 x 51 KB, past
#: L1, so the three passes over them (pad, phases, the conv's reads) each went to L2. Measured alone, 1
#: thread, both builds in one process in alternating order (AMD EPYC znver4): MobileNetV2's 96 x 112 x 112
#: stride-2 conv 330 -> 222 us, EfficientNet-B0's 453 -> 352, ResNet-50's max pool 212 -> 148 (mcpu=haswell:
#: 392 -> 344, 211 -> 148). Only where a tile reads at most DW_TILE_ROWS_READ_MAX times its share of rows.
DW_PHASES_PER_TILE = True
DW_TILE_ROWS_READ_MAX = 1.25
#: the padded copy of a depthwise conv or max pool whose rows are at most this many floats is zero-filled, then
#: its interior copied (decompose_padding), both vectorized by TVM (7 x 7 planes: 9 or 11 columns). Wider rows
#: are one serial pass with a test per element, which LLVM peels into zero rows, a masked first vector, whole
#: vectors and a scalar tail, each element written once instead of twice; on 7 x 7 planes the peeled loop's
#: branches cost more (960 x 7 x 7: 80 us against 73; 14 x 14 planes even). Measured alone, 1 thread: stride-1
#: 56 x 56 and 112 x 112 depthwise convs 1-7% faster (MobileNetV2, EfficientNet-B0), MobileNetV3's 120 x 28 x 28
#: 4%.
DW_PAD_FILL_MAX_WIDTH = 24


def dw_row_bands(out_height: int, rows: int) -> int:
    """Bands of rows of :func:`schedule_depthwise` for ``out_height`` output rows in tiles of ``rows``
    (:func:`depthwise_tiling`): :data:`DW_ROW_CHUNKS` when the plane has at least :data:`DW_ROW_CHUNK_MIN`
    rows and its row tiles split evenly into them, else 0 (one band). A smaller row tile that would make
    them split (56 rows: 8 tiles of 7 rows, not 7 of 8; 28: 14 of 2, not 7 of 4) measured slower on
    MobileNetV2 at 2 threads (5.56-5.62 ms against 5.32-5.39 with the bands where the tiles split as they
    are, 5.43-5.56 without bands; AMD EPYC znver4), so the tile is left as it is."""
    k = DW_ROW_CHUNKS
    ok = k > 1 and out_height >= DW_ROW_CHUNK_MIN and out_height % rows == 0 and (out_height // rows) % k == 0
    return k if ok else 0


def _phases_per_tile(sch, pad, ry, out_height: int, rows: int) -> bool:
    """:data:`DW_PHASES_PER_TILE` for this conv: more than one tile of ``rows`` output rows, each reading at
    most :data:`DW_TILE_ROWS_READ_MAX` times its share of the padded rows (the halo rows are built twice: a
    5x5 stride-2 window over tiles of one row would build 5 rows for every 2)."""
    if not DW_PHASES_PER_TILE or out_height <= rows:
        return False
    kh = _static(sch.get(ry).extent)
    padded = _static(_region_buffer(sch.get(pad).writes[0]).shape[2])
    if kh is None or padded is None:
        return False
    sh = (padded - kh) // (out_height - 1)               # padded rows = (OH - 1) * stride + KH
    return (rows - 1) * sh + kh <= DW_TILE_ROWS_READ_MAX * rows * sh


def schedule_depthwise(func, target=None, *, block: str = DW_BLOCK):
    """:func:`depthwise_conv2d_te`'s blocks: parallel over batch x channels (x bands of rows on large
    planes: :data:`DW_ROW_CHUNKS`); per channel, the padded plane is filled (it stays in L1/L2; with stride
    > 1 its column phases too, both per tile of output rows where the tiles overlap little:
    :data:`DW_PHASES_PER_TILE`; zero-filled then copied on narrow rows only: :data:`DW_PAD_FILL_MAX_WIDTH`),
    then a register tile of output rows x a vector along the output width (:func:`depthwise_tiling`), the
    kernel window unrolled outside it, a local accumulator with the fused epilogue inlined into its
    write-back. None when the function has no such block or its output height/width are symbolic."""
    sch = _schedule_of(func)
    convs = _block_named(sch, block)
    pads = _block_named(sch, DW_PAD_BLOCK)
    if len(convs) != 1 or len(pads) != 1:
        return None
    blk, pad = convs[0], pads[0]
    loops = sch.get_loops(blk)
    if len(loops) != 6:
        return None
    n, c, y, x, ry, rx = loops
    OH, OW = (_static(sch.get(lp).extent) for lp in (y, x))
    if OH is None or OW is None:
        return None
    lanes, regs = vector_lanes(target)
    work = _loop_work(sch, loops)
    tw, th = depthwise_tiling(OW, OH, lanes, regs)
    chunks = dw_row_bands(OH, th)
    yo, yi = sch.split(y, [None, th])
    xo, xi = sch.split(x, [None, tw])
    outer = (n, c)
    if chunks:
        yc, yo = sch.split(yo, [chunks, None])
        outer = (n, yc, c)
    wb, fused = _parallel_tile(sch, blk, outer, (yo, xo, ry, rx, yi, xi), xo, work, lanes)
    splits = _block_named(sch, DW_SPLIT_BLOCK)
    # stride > 1: the padded rows and their column phases of one tile of output rows, where the tile reads
    # them (DW_PHASES_PER_TILE); else the channel's (or band's) whole padded plane
    at = yo if splits and _phases_per_tile(sch, pad, ry, OH, th) else fused
    for split in splits:                                  # the column phases (stride > 1)
        sch.compute_at(split, at)
        # (p, y, q) -> (y * q, p), p unrolled: one serial loop over the padded plane as a stride-S stream
        # (its width is cols * S), which LLVM's loop vectorizer turns into wide loads and shuffles (TVM's
        # vectorize of a stride-S read: a scalar load per lane)
        sl = sch.get_loops(split)
        f = sch.fuse(sl[-2], sl[-1])
        sch.reorder(f, sl[-3])
        sch.unroll(sl[-3])
    sch.compute_at(pad, at)
    ploops = sch.get_loops(pad)                           # fused [, yo] | the pad's rows, columns
    outer = next(k for k, lp in enumerate(ploops) if sch.get(lp).same_as(sch.get(at))) + 1
    width = _static(sch.get(ploops[-1]).extent)
    if width is not None and width <= DW_PAD_FILL_MAX_WIDTH:
        try:    # zeros, then the in-bounds copy without a test per element
            fill = sch.decompose_padding(pad, sch.get_loops(pad)[outer])
            sch.vectorize(sch.fuse(*sch.get_loops(fill)[outer:]))
            _vectorize_inner(sch, pad, lanes)
        except Exception as err:  # noqa: BLE001 - the padded copy then tests each element
            log.debug("depthwise pad not decomposed: %s", err)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(yi)
    return _finish_row_tile(sch, blk, wb, ry, xi, tw, lanes)


DWB_MAX_ACC = 20


def depthwise_blocked_tiling(out_width: int, out_height: int, regs: int) -> tuple[int, int]:
    """``(width tile, rows)`` of :func:`schedule_depthwise_blocked`: the largest divisor of the width up to 8
    output pixels, then the most rows that divide the height with at most 20 accumulator vectors (of 32
    registers; 8 of 16), each a vector of the channel block."""
    most = DWB_MAX_ACC if regs >= 32 else 8
    tw = next(t for t in range(min(8, out_width), 0, -1) if out_width % t == 0)
    th = next(t for t in range(min(out_height, max(1, most // tw)), 0, -1) if out_height % t == 0)
    return tw, th


def schedule_depthwise_blocked(func, target=None):
    """:func:`~bncompile.lower.kernels.conv2d_packed.depthwise_blocked_te`: parallel over batch x channel
    blocks x row tiles (bands of rows outside the blocks on tall planes, :func:`dw_row_bands`); a register
    tile of rows x output pixels (:func:`depthwise_blocked_tiling`), each a vector of the block's channels; the kernel window unrolled outside it; the zero padding read in place
    (a load at the clamped pixel, blended to zero outside the plane: no padded copy); the fused epilogue
    inlined into the write-back. None when the function has no such block or its height, width or block
    are symbolic."""
    sch = _schedule_of(func)
    convs = _block_named(sch, DWB_BLOCK) + _block_named(sch, POOLB_BLOCK) + _block_named(sch, AVGB_BLOCK)
    convs = [b for b in convs if not sch.get(b).name_hint.startswith(AVGB_BLOCK + "_scale")]
    if len(convs) != 1:
        return None
    blk = convs[0]
    loops = sch.get_loops(blk)
    if len(loops) != 7:
        return None
    n, c, y, x, ci, ry, rx = loops
    OH, OW, B = (_static(sch.get(lp).extent) for lp in (y, x, ci))
    if OH is None or OW is None or B is None:
        return None
    lanes, regs = vector_lanes(target)
    work = _loop_work(sch, loops)
    tw, th = depthwise_blocked_tiling(OW, OH, regs)
    yo, yi = sch.split(y, [None, th])
    xo, xi = sch.split(x, [None, tw])
    outer = (n, c, yo)
    chunks = dw_row_bands(OH, th)
    if chunks:              # bands of rows outside the channel blocks, as schedule_depthwise (DW_ROW_CHUNKS)
        yc, yo = sch.split(yo, [chunks, None])
        outer = (n, yc, c, yo)
    wb, _ = _parallel_tile(sch, blk, outer, (xo, ry, rx, yi, xi, ci), xo, work, lanes)
    for lp in (ry, rx, yi, xi):
        sch.unroll(lp)
    return _finish_row_tile(sch, blk, wb, ry, ci, B, lanes)      # the vector: the block's channels


def _parallel_tile(sch, blk, outer, inner, at, work, lanes: int):
    """The loops of ``blk`` ordered ``outer`` then ``inner``, a local accumulator written back under loop
    ``at`` with the element-wise epilogue inlined into it, the ``outer`` loops fused and parallel where the
    work is worth a launch: ``(write-back block, fused loop)``."""
    sch.reorder(*outer, *inner)
    wb = sch.cache_write(blk, 0, "local")
    _inline_epilogue(sch, wb)
    fused = sch.fuse(*outer)
    if parallel_worth(work, lanes):
        sch.parallel(fused)
    sch.reverse_compute_at(wb, at)
    return wb, fused


def _finish_row_tile(sch, blk, wb, red, xi, tw: int, lanes: int):
    """The common end of the row-tile rules: the vector loop ``xi`` (``tw`` long: the width tile; the channel
    block of :func:`schedule_depthwise_blocked`), the reduction's init split off at ``red`` and vectorized,
    the write-back vectorized along the same loop, the leftovers scheduled."""
    sch.vectorize(xi)
    init = sch.decompose_reduction(blk, red)
    sch.vectorize(sch.get_loops(init)[-1])
    wl = sch.get_loops(wb)
    if _static(sch.get(wl[-1]).extent) == tw:
        sch.vectorize(wl[-1])
    _schedule_leftovers(sch, lanes)
    return sch


#: TVM's conv2d blocks (``topi.nn.conv2d_nchw`` / ``group_conv2d_nchw`` / ``depthwise_conv2d_nchw``)
TVM_CONV_BLOCKS = ("group_conv2d_nchw", "conv2d_nchw", "depthwise_conv2d_nchw")


def row_tiling(out_width: int, out_height: int | None, lanes: int, regs: int) -> tuple[int, int]:
    """``(width vector, rows)`` of :func:`schedule_conv_rows`: the whole output row when it fits in two
    vector registers, else its largest divisor up to that (a multiple of 4 preferred); as many rows as keep
    the accumulators within :data:`ACC_CAP` (rows divide the height: even splits only)."""
    if out_width <= 2 * lanes:
        tw = out_width
    else:
        divs = [d for d in range(2 * lanes, 0, -1) if out_width % d == 0]
        tw = next((d for d in divs if d % 4 == 0), divs[0])
    per_row = -(-tw // lanes)
    most = max(1, min(4, ACC_CAP.get(regs, 10) // per_row))
    th = next((t for t in range(most, 0, -1) if out_height and out_height % t == 0), 1)
    return tw, th


def schedule_conv_rows(func, target=None):
    """TVM's own conv2d blocks (depthwise and grouped convolutions, and dense ones whose channels no
    packed block divides): ``SSSS RRR`` over ``(n, f, y, x, rc, ry, rx)``. A register tile of output rows x
    a vector along the output width (:func:`row_tiling`), the reduction loops outside it (the kernel window
    unrolled), a local accumulator with the fused epilogue inlined into its write-back, parallel over batch x
    channels x row tiles. A depthwise pad is computed per tile (its rows stay in cache); other pads are
    computed once, parallel. None when the function has no such block or the shapes are symbolic."""
    sch = _schedule_of(func)
    convs = [b for b in _all_blocks(sch) if sch.get(b).name_hint.startswith(TVM_CONV_BLOCKS)]
    if len(convs) != 1 or _iter_kinds(sch, convs[0]) != "SSSSRRR":
        return None
    blk = convs[0]
    loops = sch.get_loops(blk)
    if len(loops) != 7:
        return None
    n, f, y, x, rc, ry, rx = loops
    exts = [_static(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in exts[1:]):
        return None
    _, F, OH, OW, RC, RY, RX = exts
    lanes, regs = vector_lanes(target)
    work = _loop_work(sch, loops)
    tw, th = row_tiling(OW, OH, lanes, regs)
    yo, yi = sch.split(y, [None, th])
    xo, xi = sch.split(x, [None, tw])
    sch.reorder(n, f, yo, xo, rc, ry, rx, yi, xi)
    wb = sch.cache_write(blk, 0, "local")
    _inline_epilogue(sch, wb)
    fused = sch.fuse(n, f, yo)
    if parallel_worth(work, lanes):
        sch.parallel(fused)
    sch.reverse_compute_at(wb, xo)
    producers = sch.get_producers(blk)
    if RC == 1:       # depthwise: the pad of one tile's rows, computed where it is used
        for p in producers:
            if "R" not in _iter_kinds(sch, p) and sch.get(p).name_hint.startswith("pad"):
                try:
                    sch.compute_at(p, xo)
                    pl = sch.get_loops(p)
                    if _static(sch.get(pl[-1]).extent) is not None:
                        sch.vectorize(pl[-1]) if _static(sch.get(pl[-1]).extent) <= 4 * lanes else None
                except Exception as err:  # noqa: BLE001 - the pad then runs on its own
                    log.debug("pad stays at the root: %s", err)
    if RY * RX <= 49:
        sch.unroll(rx)
        sch.unroll(ry)
    if th > 1:
        sch.unroll(yi)
    return _finish_row_tile(sch, blk, wb, rc, xi, tw, lanes)


#: vector operations (the function's multiply-adds, or the elements it copies, over the target's fp32 lanes)
#: below which a function runs serial. Each parallel loop is a launch of TVM's thread pool: hand the tasks to
#: the workers, wait for all of them. Measured on the 2-core AVX-512 VM of the README (load 3.7, TVM 0.27,
#: workers spinning): an empty launch took 4-12 us, and a 64K-element copy (4K vector ops, 6.8 us serial)
#: took 14 us on 2 threads. 16K vector ops is about 5-10 us of one core's work: below it the second
#: thread gains less than the launch costs, and on a loaded machine a launch waits for a descheduled worker.
PARALLEL_MIN_VECTOR_OPS = 16384


def parallel_worth(work: int | None, lanes: int) -> bool:
    """True when a function of ``work`` multiply-adds (or copied elements) should run its parallel loop:
    ``work`` unknown (a symbolic batch: assume large) or at least :data:`PARALLEL_MIN_VECTOR_OPS` vectors
    of ``lanes``."""
    return work is None or work >= PARALLEL_MIN_VECTOR_OPS * lanes


def _loop_work(sch, loops) -> int | None:
    """The product of the loops' extents (the block's iterations), None when one is symbolic."""
    total = 1
    for lp in loops:
        e = _static(sch.get(lp).extent)
        if e is None:
            return None
        total *= e
    return total


def _schedule_spatial(sch, blk, lanes: int = 8) -> None:
    """Vectorize the innermost loop by ``lanes`` (or 4) when it divides evenly, fuse the others and
    run them in parallel (when the block is big enough)."""
    loops = sch.get_loops(blk)
    if not loops:
        return
    kinds = _iter_kinds(sch, blk)
    if "R" in kinds or "O" in kinds:
        raise ValueError("not a spatial block")
    exts = [_static(sch.get(lp).extent) for lp in loops]
    total = None if any(e is None for e in exts) else int(np.prod(exts))
    # the innermost loops, fused until their extent is a multiple of a vector (14 x 14 -> 196: 4 lanes)
    k, vec, prod = len(loops) - 1, None, 1
    for j in range(len(loops) - 1, -1, -1):
        if exts[j] is None:
            break
        prod *= exts[j]
        vec = next((v for v in (lanes, lanes // 2, 4) if v >= 4 and prod % v == 0), None)
        if vec is not None or prod >= 4 * lanes:
            k = j
            break
    inner = sch.fuse(*loops[k:]) if vec is not None and k < len(loops) - 1 else loops[-1]
    outer = list(loops[:k] if inner is not loops[-1] else loops[:-1])
    if vec is not None:
        io, ii = sch.split(inner, [None, vec])
        sch.vectorize(ii)
        outer.append(io)
    if outer and parallel_worth(total, lanes):
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


def _untouched(sch, blk) -> bool:
    """True when no loop around ``blk`` is parallel/vectorized/unrolled yet (a block still at the root)."""
    return all(int(sch.get(lp).kind) == 0 and not sch.get(lp).annotations for lp in sch.get_loops(blk))


def _schedule_leftovers(sch, lanes: int, skip=()) -> None:
    """Spatial blocks still untouched at the end of a rule (pads, element-wise blocks not inlined)."""
    for b in _all_blocks(sch):
        try:
            if sch.get(b).name_hint in skip or not _untouched(sch, b) or "R" in _iter_kinds(sch, b):
                continue
            _schedule_spatial(sch, b, lanes)
        except Exception as err:
            log.debug("a root block stays unscheduled: %s", err)


def _inline_spatial(sch) -> None:
    """compute_inline every spatial root block that can be (pads, broadcasts, element-wise chains)."""
    for blk in _all_blocks(sch):
        try:
            if "R" in _iter_kinds(sch, blk):
                continue
            _compute_inline(sch, blk)
        except Exception:
            pass


def _schedule_reduction(sch, blk, lanes: int = 8) -> None:
    """Parallel over the leading spatial loops; the reduction loops stay serial (unrolled when small).
    (Vectorizing a pooling window along the output width was slower here: 1.09 vs 0.78 ms for ResNet's
    max pool on AVX2, the strided reads become gathers.)"""
    loops = sch.get_loops(blk)
    kinds = _iter_kinds(sch, blk)
    ns = kinds.count("S")
    if "O" in kinds or ns == 0 or kinds != "S" * ns + "R" * (len(kinds) - ns) or len(loops) != len(kinds):
        raise ValueError("not a simple reduction")
    # parallel() refuses a loop that drives a reduction iter, so loops out of block-iter order fail here
    spatial = loops[:ns]
    work = _loop_work(sch, loops)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    ext = _static(sch.get(fused).extent)
    if (ext is None or ext >= 8) and parallel_worth(work, lanes):
        sch.parallel(fused)
    red = loops[ns:]
    total = 1
    for lp in red:
        e = _static(sch.get(lp).extent)
        total = total * e if e is not None and total is not None else None
    if total is not None and total <= 64:
        for lp in red:
            sch.unroll(lp)


def schedule_generic(func, target=None):
    """Every root block: spatial -> fuse, vectorize by 16/8/4 when even, parallel; simple reduction ->
    parallel spatial loops. Blocks that fit neither are left alone. None when nothing was scheduled."""
    sch = _schedule_of(func)
    done = False
    _inline_spatial(sch)
    for blk in _all_blocks(sch):
        try:
            kinds = _iter_kinds(sch, blk)
            if "R" in kinds:
                _schedule_reduction(sch, blk, vector_lanes(target)[0])
            else:
                _schedule_spatial(sch, blk, vector_lanes(target)[0])
            done = True
        except Exception as err:  # leave this block as it is
            log.debug("generic schedule skipped a block: %s", err)
    return sch if done else None


def _last_index_is(region, var) -> bool:
    rng = list(region.region)
    return bool(rng) and rng[-1].min.same_as(var) and _static(rng[-1].extent) == 1


def schedule_inner_vector_reduction(func, target=None):
    """A function with one reduction block ``S.. R..`` whose last spatial iter is the innermost index of
    its output and of one of its inputs (dense/matmul with a ``[K, N]`` weight, ...): that iter split
    into vectors and moved inside the reduction, a local accumulator, the element-wise epilogue inlined
    into its write-back, parallel over the other spatial loops. None when it does not apply."""
    sch = _schedule_of(func)
    found = _single_reduction(sch)
    if found is None:
        return None
    blk, kinds, ns, loops = found
    block = sch.get(blk)
    jv = block.iter_vars[ns - 1].var
    if len(block.writes) != 1 or not _last_index_is(block.writes[0], jv):
        return None
    if not any(_last_index_is(r, jv) for r in block.reads):
        return None
    lanes = vector_lanes(target)[0]
    E = _static(sch.get(loops[ns - 1]).extent)
    V = dense_vector(E, lanes) if E is not None else None
    if V is None:
        return None
    return _vector_reduction_tile(sch, blk, ns, loops, V, lanes)


def schedule_dense_packed(func, target=None):
    """:func:`~bncompile.lower.kernels.conv2d_packed.dense_packed_te`: the tile of
    :func:`schedule_inner_vector_reduction` with the packed weight's block as the vector: each block of
    outputs accumulates in registers over one contiguous panel of the weight."""
    sch = _schedule_of(func)
    if not _block_named(sch, DENSE_BLOCK):
        return None
    found = _single_reduction(sch)
    if found is None:
        return None
    blk, kinds, ns, loops = found
    if sch.get(blk).name_hint != DENSE_BLOCK:
        return None
    shapes = [getattr(_region_buffer(r), "shape", ()) for r in sch.get(blk).reads]
    V = next((_static(sh[2]) for sh in shapes if len(sh) == 3 and sh is not None), None)
    E = _static(sch.get(loops[ns - 1]).extent)
    if not V or E is None or E % V:
        return None
    return _vector_reduction_tile(sch, blk, ns, loops, V, vector_lanes(target)[0])


def _vector_reduction_tile(sch, blk, ns: int, loops, V: int, lanes: int):
    """The last spatial loop split by V and moved inside the reduction, a local accumulator, the epilogue
    inlined into its write-back, parallel over the other spatial loops and the V-blocks."""
    work = _loop_work(sch, loops)
    jo, ji = sch.split(loops[ns - 1], [None, V])
    sch.reorder(*loops[:ns - 1], jo, *loops[ns:], ji)
    wb = sch.cache_write(blk, 0, "local")
    _inline_epilogue(sch, wb)
    outer = [*loops[:ns - 1], jo]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if parallel_worth(work, lanes):
        sch.parallel(fused)
    sch.reverse_compute_at(wb, fused)
    sch.vectorize(ji)
    init = sch.decompose_reduction(blk, loops[ns])
    for b in (init, wb):
        inner = sch.get_loops(b)[-1]
        if _static(sch.get(inner).extent) == V:
            sch.vectorize(inner)
    _schedule_leftovers(sch, lanes)
    return sch


def schedule_global_pool(func, target=None):
    """A function with one reduction block ``S.. R..`` over the innermost axes of its input (global
    average/max pooling, ``ReduceMean`` over H, W) and element-wise blocks after it: the output positions
    tiled by ``ILP`` (a divisor of their count), each tile summed as that many independent scalar chains
    interleaved in one pass over the reduction (the chains hide the add latency that one accumulator per
    output, dlight's ``cpu.Reduction``, waits on), a local accumulator with the epilogue (the mean's
    divide) inlined into its write-back, parallel over the tiles. None when it does not apply."""
    sch = _schedule_of(func)
    found = _single_reduction(sch)
    if found is None:
        return None
    blk, kinds, ns, loops = found
    block = sch.get(blk)
    rvars = [iv.var for iv in block.iter_vars[ns:]]
    # the reduction runs over the innermost axes of a read: x[..., r0, r1] (contiguous per output)
    # and over ONE input (a pool, not a matmul: no weight indexed by the reduction)
    out_buf = _region_buffer(block.writes[0])
    uses = [r for r in block.reads if not _region_buffer(r).same_as(out_buf)]
    if len(block.writes) != 1 or len(uses) != 1 or len(uses[0].region) < len(rvars) or not all(
            _is_var(rg.min, v) and _static(rg.extent) == 1 for rg, v in zip(list(uses[0].region)[-len(rvars):], rvars)):
        return None
    exts = [_static(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in exts[ns:]):
        return None
    # tile the innermost spatial loop that is not 1 (the channels): a tile that crossed into the next
    # batch row would make reverse_compute_at cover a whole row (TVM over-approximates the region) and
    # write back values not yet reduced
    j = max((i for i in range(ns) if exts[i] != 1), default=None)
    if j is None or exts[j] is None:
        return None
    ilp = next((t for t in ILP if exts[j] % t == 0), None)
    if ilp is None:
        return None
    work = _loop_work(sch, loops)
    so, si = sch.split(loops[j], [None, ilp])
    red = loops[ns]       # (not fused: a fused h x w loop pays a division per element for its index)
    sch.reorder(*loops[:j], so, *loops[j + 1:ns], *loops[ns:], si)
    outer = sch.fuse(*loops[:j], so) if j else so
    wb = sch.cache_write(blk, 0, "local")
    _inline_epilogue(sch, wb)
    if parallel_worth(work, vector_lanes(target)[0]):
        sch.parallel(outer)
    sch.reverse_compute_at(wb, outer)
    sch.unroll(si)
    init = sch.decompose_reduction(blk, red)
    sch.unroll(sch.get_loops(init)[-1])
    _schedule_leftovers(sch, vector_lanes(target)[0])
    return sch


#: independent accumulation chains of :func:`schedule_global_pool`, most first
ILP = (8, 6, 4, 3, 2)


def _region_buffer(region):
    return getattr(region, "buffer", None) or getattr(region, "source", None)     # 0.27: .source


def _is_var(expr, var) -> bool:
    return expr.same_as(var)


def _is_ours(func) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    return "global_symbol" in attrs or "tirx.is_scheduled" in attrs or "tir.is_scheduled" in attrs


class Rule:
    """A named schedule rule with dlight's contract: ``apply(func, target, tunable) -> Schedule | None``.

    Wraps ``fn(func, target) -> Schedule | None``; a rule that raises does not apply (the next one is
    tried). Each function it schedules is appended, with the rule's name, to ``applied``."""

    def __init__(self, name: str, fn, applied: list | None = None):
        self.name = name
        self.fn = fn
        self.applied = applied

    def apply(self, func, target, tunable: bool = False):
        try:
            sch = self.fn(func, target)
        except Exception as err:  # noqa: BLE001 - a failing rule leaves the function to the next one
            log.debug("%s schedule failed: %s", self.name, err)
            return None
        if sch is not None and self.applied is not None:
            self.applied.append((func, self.name))
        return sch


def rules(applied: list | None = None) -> list[Rule]:
    """The CPU rules, in order: the packed conv, dense-like reductions with a contiguous innermost output
    axis, dlight's CPU rules (``GEMV``, ``Reduction``), then the generic parallel/vectorize rule."""
    dl = _shim.submodule("tvm.s_tir.dlight")

    def dlight(rule):
        # dlight's rules inline every element-wise block they can before they look at the function (in
        # trials: on a copy), with no bound on the size: a chain whose blocks read their input many times
        # would take minutes or exhaust memory there; such functions go to the rules below
        return Rule(type(rule).__name__,
                    lambda func, target: None if inline_would_blow_up(func) else rule.apply(func, target, False),
                    applied)

    return [Rule("conv2d_winograd", schedule_winograd, applied),
            Rule("conv2d_nchw16o", schedule_conv, applied),
            Rule("depthwise_planes", schedule_depthwise, applied),
            Rule("depthwise_blocked", schedule_depthwise_blocked, applied),
            Rule("pool_planes", schedule_max_pool, applied),
            Rule("conv2d_rows", schedule_conv_rows, applied),
            Rule("dense_packed", schedule_dense_packed, applied),
            Rule("inner_vector_reduction", schedule_inner_vector_reduction, applied),
            Rule("global_pool", schedule_global_pool, applied),
            dlight(dl.cpu.GEMV()), dlight(dl.cpu.Reduction()),
            Rule("generic", schedule_generic, applied)]


def schedule_module(mod, target, report: dict | None = None, database=None):
    """Schedule every PrimFunc of ``mod`` that is not bncompile's own with dlight's ``ApplyDefaultSchedule``
    and :func:`rules`; returns the new module. ``report[function name]`` gets the rule's name (``"default"``
    where none applied). ``database`` (:class:`bncompile.lower.tuning.TunedSchedules`) goes first: a function
    it has a tuned schedule for takes that one (reported ``"database"``)."""
    tvm = _tvm()
    dl = _shim.submodule("tvm.s_tir.dlight")
    todo = {gv: func for gv, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and not _is_ours(func)}
    updates = {}
    for gv, func in list(todo.items()) if database is not None else ():
        tuned = database.apply(func)
        if tuned is not None:
            updates[gv] = tuned
            del todo[gv]
            if report is not None:
                report[gv.name_hint] = "database"
    if not todo:
        return _updated(mod, updates)
    applied: list = []
    with target:
        done = dl.ApplyDefaultSchedule(*rules(applied))(tvm.IRModule(todo))
    for gv, func in todo.items():
        rule = next((name for f, name in applied if f.same_as(func)), None)
        if report is not None:
            report[gv.name_hint] = rule or "default"
        if rule is not None:
            updates[gv] = done[gv.name_hint]
    return _updated(mod, updates)


def _updated(mod, updates: dict):
    if updates:
        mod = mod.clone()
        for gv, f in updates.items():
            mod.update_func(gv, f)
    return mod


def pipeline(target, report: dict | None = None, *, database=None, until_schedule: bool = False):
    """The Relax pipeline for an llvm target (see the module docstring). ``database``: tuned schedules that
    go before the rules (:func:`schedule_module`). ``until_schedule``: stop before scheduling (the fused,
    unscheduled module ``bncompile tune`` extracts its tasks from: the same functions compile looks up)."""
    tvm = _tvm()
    relax = tvm.relax
    transform = relax.transform

    @tvm.transform.module_pass(opt_level=0, name="bncompile.MarkOwnKernelsOpaque")
    def mark_opaque(mod, _ctx):
        mod = mod.clone()
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and _is_ours(func):
                mod.update_func(gv, func.with_attr("op_pattern", OP_PATTERN_OPAQUE))
        return mod

    @tvm.transform.module_pass(opt_level=0, name="bncompile.ChannelBlocked")
    def blocked(mod, _ctx):
        # then constants folded before legalization: the classifier's weight reaches legalize_matmul as a
        # constant (ONNX Gemm's transB is a permute_dims of it)
        return relax.transform.FoldConstant()(channel_blocked(mod, target))

    @tvm.transform.module_pass(opt_level=0, name="bncompile.ScheduleCPU")
    def schedule(mod, _ctx):
        return schedule_module(mod, target, report, database)

    @tvm.transform.module_pass(opt_level=0, name="bncompile.NoAliasSingleBufferFuncs")
    def noalias_single_buffer(mod, _ctx):
        # VMShapeLower's ``shape_func`` (symbolic shapes) has one buffer and no ``tirx.noalias``. TVM 0.27's
        # LLVM codegen then drops the per-buffer alias info of EVERY function in the same LLVM module, and
        # the conv accumulators are stored to memory after each FMA: dynamic-batch models ran 2.5x slower.
        # A function with a single buffer parameter cannot alias anything, so the attribute is exact.
        mod = mod.clone()
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and "tirx.noalias" in func.attrs):
                continue
            handles = [v for v in func.params if str(v.dtype) == "handle"]
            if len(handles) <= 1:
                mod.update_func(gv, func.with_attr("tirx.noalias", True))
        return mod

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        seq = passes()
        if until_schedule:
            seq = seq[:next(k for k, p in enumerate(seq) if p.same_as(schedule))]
        with target:
            return tvm.transform.Sequential(seq)(mod)

    def passes():
        # the module, not the package: TVM 0.27's cpu_generic/__init__ does not re-export dataflow_lower_passes
        cpu = _shim.submodule("tvm.relax.backend.cpu_generic.pipeline")
        legalize = cpu.legalize_passes(target)          # LegalizeOps, AnnotateTIROpPattern, ..., FuseTIR
        finalize = cpu.finalize_passes(target)          # StaticPlanBlockMemory, ..., AttachGlobalSymbol
        _expect(legalize[0], "LegalizeOps")
        _expect(finalize[-1], "AttachGlobalSymbol")
        return [blocked,
                *cpu.library_dispatch_passes(target),
                transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize_conv2d,
                                                               "relax.nn.max_pool2d": legalize_max_pool2d,
                                                               "relax.nn.avg_pool2d": legalize_avg_pool2d,
                                                               "relax.matmul": legalize_matmul,
                                                               "relax.sigmoid": legalize_sigmoid,
                                                               "relax.sum": legalize_sum,
                                                               "relax.mean": legalize_mean}),
                mark_opaque,
                *legalize[1:],
                schedule,
                *cpu.dataflow_lower_passes(target),
                *finalize[:-1],
                noalias_single_buffer,
                finalize[-1]]

    return _pipeline


def _expect(pass_, name: str) -> None:
    """TVM's pass lists are spliced by position: fail loudly if a TVM update moved them."""
    if pass_.info.name != name:
        raise RuntimeError(f"TVM's cpu_generic pass list changed: expected {name}, found {pass_.info.name}")


__all__ = ["pipeline", "schedule_module", "rules", "Rule", "schedule_conv", "schedule_inner_vector_reduction",
           "schedule_generic", "schedule_conv_rows", "schedule_global_pool", "padded_channels", "row_tiling", "legalize_conv2d", "conv_tiling", "vector_lanes",
           "schedule_depthwise", "schedule_max_pool", "depthwise_tiling", "legalize_max_pool2d",
           "channel_blocked", "schedule_depthwise_blocked", "depthwise_blocked_tiling", "layout_block"]
