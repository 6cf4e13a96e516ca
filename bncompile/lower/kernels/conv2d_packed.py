"""TE computes that whole-graph CPU compiles legalize ``nn.conv2d`` to.

* :func:`conv2d_packed_te`: NCHW input, weight pre-packed at compile time as ``[O/B, I, KH, KW, B]`` (B
  output channels contiguous, so a vector of them loads at once), NCHW output.
* :func:`depthwise_conv2d_te` (and :func:`max_pool2d_te`, the same plane): depthwise (one filter per channel), NCHW, over a zero-padded copy of the
  input whose columns are split by phase of the stride, ``xs[n, c, p, y, q] = xpad[n, c, y, q * S + p]``
  (``S`` the column stride, ``xpad`` the zero-padded input), so output column ``z`` reads
  ``xs[.., rx % S, .., z + rx // S]``: consecutive output columns read consecutive addresses for every
  stride (a vector load, not a gather).

* Channel-blocked layout ``NCHW{B}c`` (``[N, C/B, H, W, B]``): :func:`depthwise_blocked_te` (a vector of B
  channels per input pixel, the border blended to zero in place), :func:`unblock_channels` /
  :func:`block_channels` (index maps the packed conv's schedule inlines into its reads / write-back).
* :func:`dense_packed_te`: a matmul by a constant ``[K, N]`` matrix packed as ``[N/V, K, V]`` panels.

* :func:`conv2d_winograd_te`: 3x3 stride-1 conv2d as Winograd's minimal filtering F(2x2, 3x3) (Lavin and
  Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 output tile is ``A^T [(G g
  G^T) * (B^T d B)] A`` of the 4x4 input tile ``d`` around it; the 16 element-wise products over the
  input channels are 16 matrix products, 2.25x fewer multiply-adds than the direct conv. The weight
  transform ``G g G^T`` is done at compile time (:func:`winograd_weight`).

The layout legalizations and the CPU schedule rules live in :mod:`bncompile.lower.graph_schedules`; the
rules find the blocks by the names below.
"""

from __future__ import annotations

from bncompile.lower import tvm as _tvm
from bncompile.lower.kernels.masking import keep_where

VEC = 16                      # default output-channel block of the packed weight (see graph_schedules.conv_tiling)
CONV_BLOCK = "bnc_conv2d_nchw16o"
PAD_BLOCK = "bnc_pad"


def conv2d_packed_te(x, wp, *, strides, padding, out_channels: int, kernel: tuple[int, int], out_dtype: str,
                     block: int = VEC, groups: int = 1):
    """TE: NCHW conv2d with a weight pre-packed as ``[O/B, I/groups, KH, KW, B]``; output NCHW. Grouped
    (``groups`` > 1): ``B`` divides the output channels of a group, so each block of B output channels
    reads the input channels of one group, ``(o // B) // (O / groups / B)``."""
    tvm = _tvm.tvm()
    te, topi = tvm.te, tvm.topi
    n, c, h, w = x.shape
    kh, kw = kernel
    pt, pl, pb, pr = padding
    sh, sw = strides
    if pt or pl or pb or pr:
        xp = topi.nn.pad(x, [0, 0, pt, pl], [0, 0, pb, pr], pad_value=0.0, name=PAD_BLOCK)
    else:
        xp = x
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    cin = c // groups
    per_group = out_channels // groups // block           # output-channel blocks per group
    rc = te.reduce_axis((0, cin), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def body(b, o, y, z):
        a = xp[b, (o // block) // per_group * cin + rc if groups > 1 else rc, y * sh + ry, z * sw + rx]
        k = wp[o // block, rc, ry, rx, o % block]
        if out_dtype != x.dtype:
            a, k = a.astype(out_dtype), k.astype(out_dtype)
        return te.sum(a * k, axis=[rc, ry, rx])

    return te.compute((n, out_channels, oh, ow), body, name=CONV_BLOCK)


DW_BLOCK = "bnc_dwconv2d"
DW_PAD_BLOCK = "bnc_dw_pad"
DW_SPLIT_BLOCK = "bnc_dw_phases"
POOL_BLOCK = "bnc_maxpool2d"


def depthwise_conv2d_te(x, w, *, strides, padding, kernel: tuple[int, int]):
    """TE: NCHW depthwise conv2d (``w``: ``[C, 1, KH, KW]``, one filter per channel), float32, through
    the phase-split padded input of the module docstring; output NCHW."""
    te = _tvm.tvm().te
    xp, (n, c, oh, ow) = _padded_phases(x, strides, padding, kernel, 0.0)
    sh, sw = strides
    ry = te.reduce_axis((0, kernel[0]), name="ry")
    rx = te.reduce_axis((0, kernel[1]), name="rx")
    return te.compute((n, c, oh, ow), lambda b, ch, y, z: te.sum(
        xp(b, ch, y * sh + ry, rx % sw, z + rx // sw) * w[ch, 0, ry, rx], axis=[ry, rx]), name=DW_BLOCK)


def max_pool2d_te(x, *, strides, padding, kernel: tuple[int, int]):
    """TE: NCHW max pooling (floor mode, dilation 1) over the same phase-split plane as
    :func:`depthwise_conv2d_te`, padded with the lowest float32 (TVM's pool pads with it too)."""
    tvm = _tvm.tvm()
    te = tvm.te
    xp, (n, c, oh, ow) = _padded_phases(x, strides, padding, kernel, tvm.tirx.min_value(x.dtype))
    sh, sw = strides
    ry = te.reduce_axis((0, kernel[0]), name="ry")
    rx = te.reduce_axis((0, kernel[1]), name="rx")
    return te.compute((n, c, oh, ow), lambda b, ch, y, z: te.max(
        xp(b, ch, y * sh + ry, rx % sw, z + rx // sw), axis=[ry, rx]), name=POOL_BLOCK)


def _padded_phases(x, strides, padding, kernel, pad_value):
    """``(xp, output shape)``: ``xp(b, c, y, p, q)`` reads the padded input's row ``y``, column
    ``q * S + p`` (the column phases of the module docstring: a stage per phase when ``S`` > 1)."""
    tvm = _tvm.tvm()
    te, tirx = tvm.te, tvm.tirx
    n, c, h, wd = x.shape
    kh, kw = kernel
    pt, pl, pb, pr = padding
    sh, sw = strides
    oh = (h + pt + pb - kh) // sh + 1
    ow = (wd + pl + pr - kw) // sw + 1
    rows = (oh - 1) * sh + kh                  # padded rows read
    cols = ow + (kw - 1) // sw                 # columns of each phase read
    fill = tirx.const(pad_value, x.dtype) if isinstance(pad_value, float) else pad_value

    def padded(b, ch, y, col):                 # one test per index: decompose_padding's pattern
        inside = tirx.all(y >= pt, y < h + pt, col >= pl, col < wd + pl)
        return tirx.if_then_else(inside, x[b, ch, y - pt, col - pl], fill)

    xp = te.compute((n, c, rows, cols * sw), padded, name=DW_PAD_BLOCK)
    if sw > 1:                                 # the phases of the columns, one after the other
        xs = te.compute((n, c, sw, rows, cols), lambda b, ch, p, y, q: xp[b, ch, y, q * sw + p], name=DW_SPLIT_BLOCK)
        return _phase_major(xs), (n, c, oh, ow)
    return _one_phase(xp), (n, c, oh, ow)


def _phase_major(xs):
    """``xp(b, c, y, p, q)`` of the phase-major split ``xs[b, c, p, y, q]`` (each phase a contiguous plane:
    the split reads the padded plane as one stride-S stream)."""
    return lambda b, ch, y, p, q: xs[b, ch, p, y, q]


def _one_phase(xp):
    """``xp(b, c, y, 0, q)`` of a 4-D padded tensor (stride 1: one phase, no copy)."""
    return lambda b, ch, y, p, q: xp[b, ch, y, q]


UNBLOCK_BLOCK = "bnc_unblock"            # NCHW{B}c input read as NCHW (inlined into the conv's reads)
BLOCK_OUT_BLOCK = "bnc_block_out"        # NCHW output stored as NCHW{B}c (inlined into the write-back)
DWB_BLOCK = "bnc_dwconv2d_blocked"       # depthwise conv on NCHW{B}c
POOLB_BLOCK = "bnc_blocked_maxpool2d"    # max pool on NCHW{B}c
AVGB_BLOCK = "bnc_blocked_avgpool2d"     # average pool on NCHW{B}c


def unblock_channels(x):
    """``x[n, c, h, w]`` of an ``NCHW{B}c`` tensor ``[N, C/B, H, W, B]`` (a compute the schedules inline: the
    conv then reads the blocked tensor directly)."""
    te = _tvm.tvm().te
    n, cb, h, w, b = x.shape
    return te.compute((n, cb * b, h, w), lambda i, c, y, z: x[i, c // b, y, z, c % b], name=UNBLOCK_BLOCK)


def block_channels(y, block: int):
    """``y`` (NCHW) as ``NCHW{block}c``: ``[N, C/B, H, W, B]`` (reverse-inlined into the conv's write-back,
    which then stores whole vectors of channels)."""
    te = _tvm.tvm().te
    n, c, h, w = y.shape
    return te.compute((n, c // block, h, w, block), lambda i, cb, yy, z, ci: y[i, cb * block + ci, yy, z],
                      name=BLOCK_OUT_BLOCK)


def depthwise_blocked_te(x, w, *, strides, padding, kernel: tuple[int, int]):
    """TE: depthwise conv2d on the channel-blocked layout ``NCHW{B}c`` (``x``: ``[N, C/B, H, W, B]``; ``w``:
    ``[C/B, KH, KW, B]``), float32, zero padding read in place (a vector of B channels per input pixel:
    stride S only changes the address, no phase split; the border blended to zero); output ``NCHW{B}c``."""
    te = _tvm.tvm().te
    window, out, (ry, rx) = _blocked_window(x, strides, padding, kernel, 0.0)
    return te.compute(out, lambda i, c, y, z, ci: te.sum(window(i, c, y, z, ci) * w[c, ry, rx, ci], axis=[ry, rx]),
                      name=DWB_BLOCK)


def max_pool_blocked_te(x, *, strides, padding, kernel: tuple[int, int], out_hw: tuple[int, int] | None = None):
    """TE: max pooling (dilation 1) on ``NCHW{B}c``, as :func:`depthwise_blocked_te` reads its window: a vector
    of B channels per input pixel, the padding (and, in ceil mode, the windows that run past the plane: give
    their ``out_hw``) read as the lowest float32; output ``NCHW{B}c``."""
    tvm = _tvm.tvm()
    te = tvm.te
    window, out, (ry, rx) = _blocked_window(x, strides, padding, kernel, tvm.tirx.min_value(x.dtype), out_hw)
    return te.compute(out, lambda i, c, y, z, ci: te.max(window(i, c, y, z, ci), axis=[ry, rx]), name=POOLB_BLOCK)


def avg_pool_blocked_te(x, *, strides, padding, kernel: tuple[int, int]):
    """TE: average pooling on ``NCHW{B}c`` (floor mode, dilation 1, every window divided by its full size:
    no padding, or ``count_include_pad``), the window read as :func:`max_pool_blocked_te` reads it, the padding
    as zeros; output ``NCHW{B}c``."""
    tvm = _tvm.tvm()
    te = tvm.te
    window, out, (ry, rx) = _blocked_window(x, strides, padding, kernel, 0.0)
    total = te.compute(out, lambda i, c, y, z, ci: te.sum(window(i, c, y, z, ci), axis=[ry, rx]), name=AVGB_BLOCK)
    inv = tvm.tirx.const(1.0 / (kernel[0] * kernel[1]), x.dtype)
    return te.compute(out, lambda i, c, y, z, ci: total[i, c, y, z, ci] * inv, name=AVGB_BLOCK + "_scale")


def _blocked_window(x, strides, padding, kernel, fill, out_hw=None):
    """``(window, output shape, (ry, rx))`` of a sliding window over ``NCHW{B}c``: ``window(i, c, y, z, ci)``
    reads input pixel ``(y * S + ry - top, z * S + rx - left)`` of the block, ``fill`` outside the plane."""
    tvm = _tvm.tvm()
    te, tirx = tvm.te, tvm.tirx
    n, cb, h, wd, b = x.shape
    kh, kw = kernel
    pt, pl, pb, pr = padding
    sh, sw = strides
    oh, ow = out_hw or ((h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    fill = tirx.const(fill, x.dtype) if isinstance(fill, float) else fill

    def window(i, c, y, z, ci):
        # the load at the clamped (always in-bounds) pixel, then blended to the fill (keep_where: a bit mask,
        # not a Select, whose condition TVM would use to drop the clamp): LLVM gets one basic block per tile,
        # reuses a load across the taps that read it; if_then_else (a branch per tap) took 1.36x the time
        # over MobileNetV2's depthwise convs
        yy, zz = y * sh + ry - pt, z * sw + rx - pl
        inside = tirx.all(yy >= 0, yy < h, zz >= 0, zz < wd)
        v = x[i, c, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(zz, wd - 1), 0), ci]
        return keep_where(inside, v, fill)

    return window, (n, cb, oh, ow, b), (ry, rx)


DENSE_BLOCK = "bnc_dense_packed"


def dense_packed_te(x, wp):
    """TE: ``y[..., j] = sum_k x[..., k] * w[k, j]`` with the constant weight ``w`` ([K, N]) packed at compile
    time as ``wp[N/V, K, V]`` (``wp[j // V, k, j % V] = w[k, j]``): each block of V outputs reads one
    contiguous panel, so a batch-1 classifier streams its weight from memory in address order."""
    te = _tvm.tvm().te
    nb, k_len, v = wp.shape
    lead = list(x.shape[:-1])
    k = te.reduce_axis((0, k_len), name="k")
    return te.compute((*lead, nb * v), lambda *i: te.sum(x[(*i[:-1], k)] * wp[i[-1] // v, k, i[-1] % v], axis=k),
                      name=DENSE_BLOCK)


WINO_SPLIT_BLOCK = "bnc_wino_split"      # the zero-padded input, its columns split by parity
WINO_INPUT_BLOCK = "bnc_wino_input"      # B^T d B for every 4x4 input tile
WINO_GEMM_BLOCK = "bnc_wino_gemm"        # the 16 matrix products over the input channels
WINO_OUTPUT_BLOCK = "bnc_wino_output"    # A^T m A: the 2x2 outputs of each tile (NCHW)

# G of F(2x2, 3x3): U = G g G^T (4x4) for each 3x3 filter g; the entries are exact in float32
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_tiles(out_h: int, out_w: int) -> tuple[int, int]:
    """(tile rows, tile columns) of 2x2 output tiles covering an ``out_h`` x ``out_w`` output."""
    return (out_h + 1) // 2, (out_w + 1) // 2


def winograd_weight(w, block: int):
    """The transformed weight of a float32 OIHW 3x3 ``w``, ``G g G^T`` computed in float64 and rounded once,
    packed ``[16, O/block, I, block]`` (position ``xi = 4a + b`` of the 4x4 tile first, then ``block``
    output channels contiguous: one vector load per input channel in the matrix products)."""
    import numpy as np

    g = np.asarray(_WINO_G, np.float64)
    o, i = w.shape[:2]
    u = np.einsum("ak,ockl,bl->aboc", g, np.asarray(w, np.float64), g)          # [4, 4, O, I]
    u = u.reshape(16, o // block, block, i).transpose(0, 1, 3, 2)               # [16, O/B, I, B]
    return np.ascontiguousarray(u.astype(np.float32))


def conv2d_winograd_te(x, up, *, padding, out_channels: int, block: int, tile: int, in_block: int = 0,
                       out_block: int = 0):
    """TE: NCHW 3x3 stride-1 conv2d by F(2x2, 3x3) with the weight of :func:`winograd_weight`; output NCHW.
    With ``in_block`` the input is ``NCHW{in_block}c`` (read through :func:`unblock_channels`), with
    ``out_block`` the output ``NCHW{out_block}c`` (:func:`block_channels`).

    Stages (one block each, named for the schedule rule): the zero-padded input with its columns split by
    parity, ``xs[n, c, j % 2, row, q]`` = padded column ``2q + j % 2`` (so tile ``tx``'s columns ``2tx + j``
    are consecutive over ``tx``); ``V = B^T d B`` per tile, ``[16, N, C, tile rows, tile columns]``; the
    products ``M[n, o/B, ty, tx, xi, o%B] = sum_c U[xi, o/B, c, o%B] V[xi, n, c, ty, tx]`` (``tile`` tile
    columns per register tile of the schedule: checked to divide the tile columns); ``y = A^T m A``. A tile past the
    output's last row or column (an odd size) reads zeros and its extra outputs are not written."""
    tvm = _tvm.tvm()
    te, tirx = tvm.te, tvm.tirx
    if in_block:
        x = unblock_channels(x)
    n, c, h, w = x.shape
    c, h, w = int(c), int(h), int(w)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = winograd_tiles(oh, ow)
    if tw % tile:
        raise ValueError(f"winograd: {tile} does not divide the {tw} tile columns")
    zero = tirx.const(0.0, x.dtype)

    def split(b, ch, j, row, q):
        col = 2 * q + j
        inside = tirx.all(row >= pt, row < h + pt, col >= pl, col < w + pl)
        return tirx.if_then_else(inside, x[b, ch, row - pt, col - pl], zero)

    xs = te.compute((n, c, 2, 2 * th + 2, tw + 1), split, name=WINO_SPLIT_BLOCK)

    def bt(a, f):          # the rows of B^T: d0 - d2, d1 + d2, d2 - d1, d1 - d3
        return tirx.Select(a == 0, f(0) - f(2), tirx.Select(a == 1, f(1) + f(2),
                                                            tirx.Select(a == 2, f(2) - f(1), f(1) - f(3))))

    def tile_in(xi, b, ch, ty, tx):
        d = lambda i, j: xs[b, ch, j % 2, 2 * ty + i, tx + j // 2]  # noqa: E731
        return bt(xi // 4, lambda i: bt(xi % 4, lambda j: d(i, j)))

    v = te.compute((16, n, c, th, tw), tile_in, name=WINO_INPUT_BLOCK)
    rc = te.reduce_axis((0, c), name="rc")
    m = te.compute((n, out_channels // block, th, tw, 16, block),
                   lambda b, ob, ty, tx, xi, oi: te.sum(up[xi, ob, rc, oi] * v[xi, b, rc, ty, tx], axis=rc),
                   name=WINO_GEMM_BLOCK)

    def at(i, f):          # the rows of A^T: m0 + m1 + m2, m1 - m2 - m3
        return tirx.Select(i == 0, f(0) + f(1) + f(2), f(1) - f(2) - f(3))

    def tile_out(b, o, y, z):
        return at(y % 2, lambda a: at(z % 2, lambda bb: m[b, o // block, y // 2, z // 2, a * 4 + bb, o % block]))

    y = te.compute((n, out_channels, oh, ow), tile_out, name=WINO_OUTPUT_BLOCK)
    return block_channels(y, out_block) if out_block else y


__all__ = ["conv2d_packed_te", "conv2d_winograd_te", "winograd_weight", "winograd_tiles", "depthwise_conv2d_te",
           "max_pool2d_te", "max_pool_blocked_te", "avg_pool_blocked_te", "depthwise_blocked_te", "VEC",
           "CONV_BLOCK", "PAD_BLOCK", "DW_BLOCK", "DW_PAD_BLOCK", "DW_SPLIT_BLOCK", "POOL_BLOCK", "POOLB_BLOCK",
           "AVGB_BLOCK", "WINO_SPLIT_BLOCK", "WINO_INPUT_BLOCK", "WINO_GEMM_BLOCK", "WINO_OUTPUT_BLOCK"]
