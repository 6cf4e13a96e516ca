"""``keep_where`` (bncompile.lower.kernels.masking): a value where a condition holds, else a fill, bit for
bit against NumPy's ``where``, for float32 and float16 values (NaN, infinities, signed zeros among them)
and fills of +0, -0, -inf and a finite number, on random data and random conditions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm


def _kernel(n: int, dtype: str, fill):
    from bncompile.lower import tvm as _shim
    from bncompile.lower.kernels.masking import keep_where

    tvm = _shim.tvm()
    te = tvm.te
    x = te.placeholder((n,), dtype, name="x")
    m = te.placeholder((n,), "int32", name="m")
    y = te.compute((n,), lambda i: keep_where(m[i] > 0, x[i], fill), name="y")
    func = te.create_prim_func([x, m, y])
    return tvm.compile(tvm.IRModule({"main": func}), target="llvm")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fill", [None, 0.0, -0.0, float("-inf"), 2.5], ids=["none", "zero", "negzero", "-inf", "2.5"])
def test_keep_where_matches_numpy_bitwise(dtype, fill):
    from bncompile.lower import tvm as _shim

    tvm = _shim.tvm()
    n = 1031
    rng = np.random.default_rng(abs(hash(0.0 if fill is None else fill)) % 1000 + len(dtype))   # floats hash stably
    x = (rng.standard_normal(n) * 100).astype(dtype)
    x[rng.integers(0, n, 20)] = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype)[rng.integers(0, 5, 20)]
    m = rng.integers(0, 2, n).astype(np.int32)
    y = tvm.runtime.tensor(np.zeros(n, dtype))
    _kernel(n, dtype, fill)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(m), y)
    want = np.where(m > 0, x, np.array(0.0 if fill is None else fill, dtype))
    itype = np.int32 if dtype == "float32" else np.int16
    np.testing.assert_array_equal(y.numpy().view(itype), want.view(itype))


@pytest.mark.parametrize("fill", [None, -0.0, 2.5], ids=["none", "negzero", "2.5"])
def test_keep_where_takes_an_integer_condition_across_vector_lanes(fill):
    """``inside`` as a 0/1 integer of the value's width (compute.py's ragged lanes: a condition that varies
    across the lanes of a vectorized loop, which TVM 0.27's host passes cannot bind as a bool vector), in a
    vectorized loop, bit for bit against NumPy's ``where``."""
    from bncompile.lower import tvm as _shim
    from bncompile.lower.kernels.masking import keep_where

    tvm = _shim.tvm()
    te = tvm.te
    n, L, q = 64, 16, 53                      # lanes j of vector i kept where i * L + j < q
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: keep_where(te.min(te.max(q - i, 0), 1), x[i], fill), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    _, inner = sch.split(sch.get_loops("y")[0], [None, L])
    sch.vectorize(inner)
    f = tvm.compile(sch.mod, target="llvm")
    xv = (np.random.default_rng(5).standard_normal(n) * 10).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    f["main"](tvm.runtime.tensor(xv), out)
    want = np.where(np.arange(n) < q, xv, np.float32(0.0 if fill is None else fill))
    np.testing.assert_array_equal(out.numpy().view(np.int32), want.view(np.int32))
