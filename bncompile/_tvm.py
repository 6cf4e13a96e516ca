"""Temporary alias of the TVM shim :mod:`bncompile.lower.tvm`, only for ``bncompile/kernels/bench.py``
(which moves to ``bncompile/bench/kernels.py``): delete this file once nothing imports ``bncompile._tvm``."""

from bncompile.lower.tvm import *  # noqa: F401,F403
