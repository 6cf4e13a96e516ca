"""Run kernels on inputs placed against pages that cannot be read (``tests/lower/test_guarded_reads.py``).

A kernel that reads past either end of an input buffer faults here instead of reading a neighbour's
memory. Each case runs in its own process (:func:`main`: ``python -m helpers.guarded CASE``), so a fault
fails that test instead of ending the test run: it prints ``ok`` and exits 0 when every guarded run gave
the unguarded result.
"""

from __future__ import annotations

import ctypes
import mmap
import re
import sys

import numpy as np

PAGE = mmap.PAGESIZE
_KEEP: list = []            # the mappings stay alive as long as the process (their arrays view them)


def guarded_array(shape, where: str, dtype=np.float32) -> np.ndarray:
    """A C-contiguous array whose first byte follows an unreadable page (``where="before"``) or whose end
    is as close to one as 64-byte alignment allows (``"after"``: at the page when its size is a multiple of
    64 bytes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    itemsize = np.dtype(dtype).itemsize
    nbytes = int(np.prod(shape)) * itemsize
    pages = -(-nbytes // PAGE)
    m = mmap.mmap(-1, (pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if where == "before":
        guard, offset = base, PAGE
    else:
        guard = base + (pages + 1) * PAGE
        offset = ((pages + 1) * PAGE - nbytes) // 64 * 64
    if libc.mprotect(guard, PAGE, 0) != 0:          # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    _KEEP.append(m)
    return np.frombuffer(m, dtype=dtype, count=nbytes // itemsize, offset=offset).reshape(shape)


def _buffer_shapes(func) -> list[tuple[tuple[int, ...], str]] | None:
    """The static shapes and dtypes of ``func``'s buffer parameters; None when a dim is not a literal."""
    sig = func.script().split("def main(", 1)[1].split("):\n", 1)[0]
    shapes = []
    for dims, dtype in re.findall(r'T\.Buffer\(\(([^)]*(?:\)[^)]*)*?)\),\s*"(\w+)"', sig):
        parts = [re.sub(r"^T\.int64\((\d+)\)$", r"\1", d.strip()) for d in dims.split(",") if d.strip()]
        if not all(p.isdigit() for p in parts):
            return None
        shapes.append((tuple(int(p) for p in parts), dtype))
    return shapes


def graph_functions(model, target_dict) -> int:
    """Every scheduled function of ``model``'s whole-graph CPU compile with static float32 buffers (those
    that read a border at a clamped index among them, whether or not the clamp survived scheduling), built
    alone and run with each input in turn against a guard page on either side; returns how many ran."""
    from bncompile.lower import graph_schedules as gs
    from bncompile.lower.tuning import fused_module
    from bncompile.lower.tvm import tvm as _tvm

    tvm = _tvm()
    fused, tdict = fused_module(model)
    target = tvm.target.Target(dict(tdict, **target_dict))
    mod = gs.schedule_module(fused, target, {})
    ran = 0
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        shapes = _buffer_shapes(func)
        if shapes is None or len(shapes) != len(func.params) or any(d != "float32" for _, d in shapes):
            continue
        lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
        rng = np.random.default_rng(len(name))
        host = [rng.standard_normal(s).astype(np.float32) for s, _ in shapes]
        *ins, out_shape = shapes
        want = tvm.runtime.tensor(np.zeros(out_shape[0], np.float32))
        lib[name](*[tvm.runtime.tensor(h) for h in host[:-1]], want)
        for k in range(len(ins)):
            for where in ("before", "after"):
                g = guarded_array(ins[k][0], where)
                g[...] = host[k]
                args = [tvm.runtime.from_dlpack(g) if j == k else tvm.runtime.tensor(host[j])
                        for j in range(len(ins))]
                got = tvm.runtime.tensor(np.zeros(out_shape[0], np.float32))
                lib[name](*args, got)
                if not np.array_equal(got.numpy(), want.numpy()):
                    raise AssertionError(f"{name}: input {k} against a guard page {where} changed the result")
        ran += 1
    return ran


def _edge_model(case: str):
    from lower.test_edge_schedules import G, act

    g = G(7)
    kind, k, stride = case.split("_")[1], int(case.split("_")[2]), int(case.split("_")[3])
    y = act(g, g.conv("x", 3, 16, 3), "relu")
    if kind == "dw":
        y = act(g, g.conv(y, 16, 16, k, stride=stride, group=16), "relu")
    elif kind == "grouped":
        y = act(g, g.conv(y, 16, 16, k, stride=stride, group=2), "relu")
    elif kind == "maxpool":
        y = g.op("MaxPool", [y], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
    elif kind == "avgpool":
        y = g.op("AveragePool", [y], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                 count_include_pad=1)
    y = act(g, g.conv(y, 16, 16, 3, group=16), "relu")      # a depthwise conv: the chain goes channel-blocked
    return g.model(y, 3, 20, 24, 1)


def _edge_network(name: str, size: int):
    """``benchmarks/edge_models.py``'s network ``name`` at ``size`` x ``size``, batch 1."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "edge_models.py"
    spec = importlib.util.spec_from_file_location("edge_models_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.NETWORKS[name](size=size)
    for vi in list(model.graph.input) + list(model.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        if dim.dim_param:
            dim.ClearField("dim_param")
            dim.dim_value = 1
    return model


def batchnorm_tail(gradients: bool, ghost: bool = False, stripes: bool = False, ragged: bool = False) -> int:
    """Batch norm on (N, C) whose last sample block is ragged (a symbolic batch of 25, C = 64: forward
    blocks of 16 under a 16 KB L2; backward row blocks of 32, C being 4 vectors or more on AVX2 and
    AVX-512), forward (and backward) on a guarded x (and dy). These loads are vectors across the channels,
    whose clamp TVM kept even under a Select: the cases guard the tails, not that Select. ``ghost``: ghost
    BN (v = 4, 9 groups of a symbolic batch of 36: the stripes walking the groups, with their prefetch
    of the next group's rows) instead. ``stripes``: the channel stripes (C = 384: three stripes of 128,
    two vectors each) instead of the sample blocks. ``ragged``: NCHW (25, 16, 14, 14) on ragged statistics
    lanes (rows of 196 values, each row's last vector its last L values: ``ragged_stat_lanes``, taken on
    any host here), in tasks of 4 channels on a 2-CPU host (``channel_group``), instead; with ``ghost`` too,
    the lane blocks of each group's rows (v = 4, 9 groups)."""
    import os

    from bncompile.config import BatchNormConfig
    from bncompile.lower import tvm as _shim
    from bncompile.lower.kernels import compile_batchnorm
    from bncompile.lower.kernels.schedules import machine as M
    from bncompile.lower.kernels.schedules.cpu import sample_block_rows

    os.environ[M.ENV_CACHES] = "l1d=32K,l2=16K,l3=8M"
    tvm = _shim.tvm()
    cfg = BatchNormConfig(axis=1 if ragged else -1, momentum=0.5, fused=False,
                          virtual_batch_size=4 if ghost else None)
    C = 384 if stripes else 16 if ragged else 64
    if ragged:
        from bncompile.lower.kernels.schedules import cpu

        cpu.RAGGED_LANES_MIN = 4                 # this process only: a 4-lane NEON host takes them too
    k = compile_batchnorm(cfg, (None, C, 14, 14) if ragged else (None, C), gradients=gradients,
                          schedule="cpu_channel_stripes" if stripes else None if ghost or ragged
                          else "cpu_channels_last")
    spec = k._built(None).spec
    if ragged and not (k.schedule == "cpu_channel_first" and cpu.ragged_stat_lanes(196, M.cpu_machine(None))):
        raise AssertionError(f"expected ragged lanes, got {k.schedule}")
    if ghost and not ragged and k.schedule != "cpu_channels_last_ghost":
        raise AssertionError(f"expected the ghost channels-last rule, got {k.schedule}")
    if not (ghost or stripes or ragged) and (k.schedule != "cpu_channels_last"
                                   or sample_block_rows(spec, M.cpu_machine(None)) != 16):
        raise AssertionError(f"expected sample blocks of 16, got {k.schedule}")
    rng = np.random.default_rng(3)
    n = 36 if ghost else 25
    shape = (n, C, 14, 14) if ragged else (n, C)
    x = (0.5 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    values = {"gamma": rng.uniform(0.5, 1.5, C), "beta": rng.normal(0, 0.1, C),
              "moving_mean": rng.normal(0, 0.1, C), "moving_variance": rng.uniform(0.5, 1.5, C)}
    variables = {n: tvm.runtime.tensor(v.astype(np.float32)) for n, v in values.items()}

    def forward(xt):
        return {n: t.numpy() for n, t in k.run_tvm(dict(variables, x=xt)).items()}

    def backward(xt, dyt):
        call, out = k.bind_backward(dict(variables, x=xt, dy=dyt))
        call()
        return {n: t.numpy() for n, t in out.items()}

    want = forward(tvm.runtime.tensor(x))
    want_b = backward(tvm.runtime.tensor(x), tvm.runtime.tensor(dy)) if gradients else None
    for where in ("before", "after"):
        gx = guarded_array(x.shape, where)
        gx[...] = x
        got = forward(tvm.runtime.from_dlpack(gx))
        for n in want:
            if not np.array_equal(got[n], want[n]):
                raise AssertionError(f"forward {n}: x against a guard page {where} changed the result")
        if gradients:
            gdy = guarded_array(dy.shape, where)
            gdy[...] = dy
            got = backward(tvm.runtime.from_dlpack(gx), tvm.runtime.from_dlpack(gdy))
            for n in want_b:
                if not np.array_equal(got[n], want_b[n]):
                    raise AssertionError(f"backward {n}: x, dy against guard pages {where} changed the result")
    return 1


def main(argv=None) -> int:
    case = (argv or sys.argv[1:])[0]
    if case.startswith("net:"):             # net:NAME:SIZE:MCPU (host: the host's own target)
        _, name, size, mcpu = case.split(":")
        ran = graph_functions(_edge_network(name, int(size)), {} if mcpu == "host" else {"mcpu": mcpu})
        if not ran:
            raise AssertionError(f"{case}: no function to run")
    elif case.startswith("edge_"):
        ran = graph_functions(_edge_model(case), {"mcpu": "haswell"})
        if not ran:
            raise AssertionError(f"{case}: no function to run")
    else:
        batchnorm_tail(case.endswith("backward"), ghost="ghost" in case, stripes="stripes" in case,
                       ragged="ragged" in case)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
