"""TE compute of the packed-weight conv2d that whole-graph CPU compiles legalize ``nn.conv2d`` to.

NCHW input, weight pre-packed at compile time as ``[O/B, I, KH, KW, B]`` (B output channels contiguous, so
a vector of them loads at once), NCHW output. The layout legalization that packs the weight and its CPU
schedule rule live in :mod:`bncompile.lower.graph_schedules`; the rule finds the blocks by the names below.
"""

from __future__ import annotations

from bncompile.lower import tvm as _tvm

VEC = 16                      # default output-channel block of the packed weight (see graph_schedules.conv_tiling)
CONV_BLOCK = "bnc_conv2d_nchw16o"
PAD_BLOCK = "bnc_pad"


def conv2d_packed_te(x, wp, *, strides, padding, out_channels: int, kernel: tuple[int, int], out_dtype: str,
                     block: int = VEC):
    """TE: NCHW conv2d with a weight pre-packed as ``[O/B, I, KH, KW, B]``; output NCHW."""
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
    rc = te.reduce_axis((0, c), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def body(b, o, y, z):
        a = xp[b, rc, y * sh + ry, z * sw + rx]
        k = wp[o // block, rc, ry, rx, o % block]
        if out_dtype != x.dtype:
            a, k = a.astype(out_dtype), k.astype(out_dtype)
        return te.sum(a * k, axis=[rc, ry, rx])

    return te.compute((n, out_channels, oh, ow), body, name=CONV_BLOCK)


__all__ = ["conv2d_packed_te", "VEC", "CONV_BLOCK", "PAD_BLOCK"]
