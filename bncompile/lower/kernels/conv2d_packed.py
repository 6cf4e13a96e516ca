"""TE computes that whole-graph CPU compiles legalize ``nn.conv2d`` to.

* :func:`conv2d_packed_te`: NCHW input, weight pre-packed at compile time as ``[O/B, I, KH, KW, B]`` (B
  output channels contiguous, so a vector of them loads at once), NCHW output.
* :func:`depthwise_conv2d_te` (and :func:`max_pool2d_te`, the same plane): depthwise (one filter per channel), NCHW, over a zero-padded copy of the
  input whose columns are split by phase of the stride, ``xs[n, c, p, y, q] = xpad[n, c, y, q * S + p]``
  (``S`` the column stride, ``xpad`` the zero-padded input), so output column ``z`` reads
  ``xs[.., rx % S, .., z + rx // S]``: consecutive output columns read consecutive addresses for every
  stride (a vector load, not a gather).

The layout legalizations and the CPU schedule rules live in :mod:`bncompile.lower.graph_schedules`; the
rules find the blocks by the names below.
"""

from __future__ import annotations

from bncompile.lower import tvm as _tvm

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


__all__ = ["conv2d_packed_te", "depthwise_conv2d_te", "max_pool2d_te", "VEC", "CONV_BLOCK", "PAD_BLOCK", "DW_BLOCK",
           "DW_PAD_BLOCK", "DW_SPLIT_BLOCK", "POOL_BLOCK"]
