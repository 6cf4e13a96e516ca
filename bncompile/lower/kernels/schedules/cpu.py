"""CPU (``llvm``) schedule rules of the batch-normalization kernels, and x86 streaming stores of y
(see :mod:`bncompile.lower.kernels.schedules` for the rule contract and the list)."""

from __future__ import annotations

from bncompile.lower import tvm as _tvm
from bncompile.lower.kernels.compute import KernelSpec
from bncompile.lower.kernels.schedules._common import (REDUCTIONS, _blocks, _divisor, _inline_parameter_only, _sched, _vector_factor)

def cpu_channel_first(spec: KernelSpec, func):
    if not spec.training or not spec.single_channel_run or spec.shape[-1] == 1:
        return None
    if spec.adjustment == "full" and spec.ghost:
        return None
    q = int(spec.shape[-1])
    vec = _vector_factor(q)
    if not spec.ghost and spec.kinds == "RRCR" and vec >= 8:
        import dataclasses

        from bncompile.lower.kernels.compute import prim_func

        bspec = dataclasses.replace(spec, stat_block=1, stat_lanes=vec)
        return _channel_first_lanes(bspec, prim_func(bspec))
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    nstat = 2 if spec.ghost else 1          # stat loops: (c) or (c, g)
    for b in REDUCTIONS:
        loops = sch.get_loops(b)
        if vec > 1:
            _, qi = sch.split(loops[-1], [None, vec])
            sch.rfactor(qi, factor_axis=nstat)
    c = sch.get_loops("shift")[0]
    movers = (["sum_rf"] if vec > 1 else []) + ["sum", "mean64", "mean"] + (["sqsum_rf"] if vec > 1 else []) + ["sqsum"]
    movers += [n for n in names if n not in movers and n not in ("shift", "sum_rf", "sqsum_rf")]
    for b in movers:
        sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    rfs = ["sum_rf", "sqsum_rf"] if vec > 1 else list(REDUCTIONS)
    sch.parallel(c)
    for rf in rfs:
        loops = sch.get_loops(rf)
        if vec > 1:
            # after reverse_compute_at the loops follow the block iters: c | q_inner, c', [g'], reduce...
            qi = loops[1]
            sch.reorder(*loops[2:], qi)
            loops = sch.get_loops(rf)
            sch.vectorize(loops[-1])
            sch.decompose_reduction(sch.get_sblock(rf), loops[1 + nstat])
        else:
            sch.decompose_reduction(sch.get_sblock(rf), loops[1 + nstat])
    yl = sch.get_loops("y")
    if vec > 1:
        _, yi = sch.split(yl[-1], [None, vec])
        sch.vectorize(yi)
    return sch


def _channel_first_lanes(spec: KernelSpec, func):
    """cpu_channel_first with statistics from lane blocks (compute.py's blocked statistics, B = 1,
    L = stat_lanes): per channel (one parallel task), each row of Q gets the L lane sums, then the L
    lane sums of squares about the lane means while the row is in L1 (one vector loop each, no
    horizontal reduction per row); the channel combines its rows' lanes (vectorized over the lanes)
    and writes y from its slice, still in L2. x comes from memory once, like the two-pass schedule,
    but its second statistics pass reads L1 instead of L2."""
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))      # one load of x[0, 0, c, 0] where it is used
    c, n, pb, j, bi, bq = sch.get_loops("bsum")
    sch.reorder(bi, bq, j)
    sch.reverse_compute_at(sch.get_sblock("bm2"), pb, preserve_unit_loops=True)
    loops = sch.get_loops("bm2")                     # c, n, pb | c', n', pb', j, ci, cq
    sch.reorder(loops[-2], loops[-1], loops[-3])
    for b in REDUCTIONS:                             # sum / sqsum over (n, p, lane): partials per lane
        sch.rfactor(sch.get_loops(b)[-1], factor_axis=1)
    movers = ["sum_rf", "sum", "mean64", "mean", "sqsum_rf", "sqsum"]
    movers += [b for b in names if b not in movers and b not in ("shift", "bsum", "bm2")]
    for b in movers:
        sch.reverse_compute_at(sch.get_sblock(b), c, preserve_unit_loops=True)
    sch.parallel(c)
    for b in ("bsum", "bm2"):
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[-3])
    for b in ("sum_rf", "sqsum_rf"):
        loops = sch.get_loops(b)                     # c | lane, c', n, p  (block-iter order)
        sch.reorder(*loops[2:], loops[1])
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[2])
    yl = sch.get_loops("y")
    _, yi = sch.split(yl[-1], [None, int(spec.stat_lanes)])
    sch.vectorize(yi)
    return sch


def cpu_channels_last(spec: KernelSpec, func):
    if not spec.training or not spec.single_channel_run or spec.shape[-1] != 1 or spec.ghost:
        return None
    sch = _sched(func)
    names = _inline_parameter_only(sch, _blocks(sch))
    C = int(spec.channel_shape[0])
    ci = _vector_factor(C) if C > 64 else C
    if C > 64 and ci < 4:
        ci = C if C <= 256 else max(ci, _divisor(C, 64))
    vi = ci
    if ci == 64 and C % 128 == 0 and C >= 256:
        ci = 128      # stripes of 128 channels (rows of 512 B), two 64-wide vectors each (measured: -13%)
    co, _ = sch.split(sch.get_loops("shift")[0], [None, ci])
    stats = ("sum", "mean64", "mean", "sqsum")
    movers = list(stats) + [n for n in names if n not in ("shift", "y") + stats] + ["y"]
    for b in movers:
        sch.reverse_compute_at(sch.get_sblock(b), co, preserve_unit_loops=True)
    sch.parallel(co)
    for b in REDUCTIONS:
        loops = sch.get_loops(b)     # co | c_inner, n, p, q  (block-iter order after the move)
        if vi < ci:
            sch.split(loops[1], [None, vi])
            loops = sch.get_loops(b)     # co | c_o, c_i, n, p, q
            sch.reorder(loops[1], *loops[3:], loops[2])
            loops = sch.get_loops(b)
            sch.vectorize(loops[-1])
            sch.decompose_reduction(sch.get_sblock(b), loops[2])
            continue
        sch.reorder(*loops[2:], loops[1])
        loops = sch.get_loops(b)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(sch.get_sblock(b), loops[1])
    # y under co: loops (co, n, p, c_inner, q=1) -> make c_inner innermost and vectorize it
    yl = sch.get_loops("y")
    inner = yl[1:]
    cin = inner[2]
    sch.reorder(*[l for l in inner if not l.same_as(cin)], cin)
    if vi < ci:
        _, cin = sch.split(cin, [None, vi])
    sch.vectorize(cin)
    return sch


STAT_BLOCK_FLOATS = 65536          # <= 256 KB of x per statistics block: stays in L2 for its second pass
Y_TASK_BYTES = 128 * 1024          # <= bytes of y per parallel task of the channels-last y pass


def cpu_channels_last_rows(spec: KernelSpec, func):
    """Channels-last with many rows per sample (NHWC, NDHWC): blocked statistics, parallel over blocks.

    x is read from memory once for the statistics: the kernel is recompiled with
    ``spec.stat_block = B`` (compute.py's blocked statistics), blocks of B rows (<= 256 KB) each get their
    sum and their centered sum of squares in two passes while the block is in cache (parallel over
    blocks, vectorized across the contiguous channels), and a small serial pass combines the blocks.
    (Blocks of ~256 KB measured ~7% faster than ~128 KB on NHWC 32x56x56x64.)
    The blocks walk the batch backwards, so y's forward pass starts on the part of x the caches still
    hold. y is parallel over blocks of rows, vectorized over channels. When P has no divisor that makes
    useful blocks, per-sample partial sums (rfactor over the batch) are used instead.
    """
    if not spec.training or not spec.single_channel_run or spec.shape[-1] != 1 or spec.ghost:
        return None
    P, C = spec.shape[1], int(spec.channel_shape[0])
    if not isinstance(P, int) or P < 8 or P * C < 1024:
        return None
    B = spec.stat_block or _divisor(P, max(1, STAT_BLOCK_FLOATS // C))
    if B >= 8 and spec.kinds == "RRCR":
        import dataclasses

        from bncompile.lower.kernels.compute import prim_func

        bspec = spec if spec.stat_block == B else dataclasses.replace(spec, stat_block=B)
        return _channels_last_blocked(bspec, prim_func(bspec))
    return _channels_last_rfactor(spec, func)


def _channels_last_vector(sch, block: str, lead: int, C: int, cv: int):
    """Loops ``lead.. | c, r...`` of ``block`` -> ``r..., [co,] ci``; returns the vector loop ci."""
    loops = sch.get_loops(block)[lead:]
    c, rest = loops[0], loops[1:]
    if cv < C:
        co, ci = sch.split(c, [None, cv])
        sch.reorder(co, *rest, ci)
        return ci
    sch.reorder(*rest, c)
    return c


def _channels_last_y(sch, P: int, C: int, cv: int):
    n, p, c, q = sch.get_loops("y")
    rows = sch.fuse(n, p)
    # parallel over blocks of rows (a divisor of P, so the split is exact even for a symbolic batch):
    # a task streams ~100 KB of y (measured better than 28 KB or 450 KB; amortizes the streaming fence)
    chunk = _divisor(P, max(1, Y_TASK_BYTES // (4 * C)))
    if chunk > 1:
        rows, _ = sch.split(rows, [None, chunk])
    sch.parallel(rows)
    if cv < C:
        co, ci = sch.split(c, [None, cv])
        sch.reorder(co, q, ci)
    else:
        sch.reorder(q, c)
        ci = c
    sch.vectorize(ci)


def _channels_last_blocked(spec: KernelSpec, func):
    P, C = spec.shape[1], int(spec.channel_shape[0])
    cv = C if C <= 64 else _vector_factor(C)
    sch = _sched(func)
    _inline_parameter_only(sch, _blocks(sch))
    sch.compute_inline(sch.get_sblock("shift"))      # one load of x[0, 0, c, 0] where it is used
    for b in ("bsum", "bm2"):                         # block statistics with the channels contiguous
        for k in (0, 1):                              # the sums and their compensations
            sch.transform_layout(sch.get_sblock(b), ("write", k), lambda c, n, pb, j: (n, pb, j, c))
    c, n, pb, j, _, _ = sch.get_loops("bsum")          # j: the one lane (Q = 1)
    sch.reorder(n, pb, j, c)
    blk = sch.fuse(n, pb, j)
    sch.reverse_compute_at(sch.get_sblock("bm2"), blk, preserve_unit_loops=True)
    vec = {b: _channels_last_vector(sch, b, 1, C, cv) for b in ("bsum", "bm2")}
    sch.parallel(blk)
    for b in ("bsum", "bm2"):
        sch.vectorize(vec[b])
        sch.decompose_reduction(sch.get_sblock(b), sch.get_loops(b)[1])
    _channels_last_y(sch, P, C, cv)
    return sch


def _channels_last_rfactor(spec: KernelSpec, func):
    """Each reduction rfactored over the batch loop (partials of shape (N, C), no split, so the symbolic
    batch needs no predicate), parallel over samples, vectorized across the contiguous channels of a row;
    a small serial pass adds the N partials."""
    P, C = spec.shape[1], int(spec.channel_shape[0])
    sch = _sched(func)
    _inline_parameter_only(sch, _blocks(sch))
    cv = C if C <= 64 else _vector_factor(C)
    for b in REDUCTIONS:
        c, n, p, q = sch.get_loops(b)
        rf = sch.rfactor(n, factor_axis=0)            # partial sums per sample: <b>_rf[n, c]
        c, n, p, q = sch.get_loops(rf)
        if cv < C:
            co, ci = sch.split(c, [None, cv])
            sch.reorder(n, co, p, q, ci)
        else:
            sch.reorder(n, p, q, c)
            ci = c
        sch.parallel(n)
        sch.vectorize(ci)
        sch.decompose_reduction(rf, sch.get_loops(rf)[1] if cv == C else sch.get_loops(rf)[2])
    _channels_last_y(sch, P, C, cv)
    return sch


def cpu_generic(spec: KernelSpec, func):
    sch = _sched(func)
    if not spec.training:
        return None
    loops = sch.get_loops("y")
    sch.parallel(loops[0])
    for b in ("sum", "sqsum"):
        sch.parallel(sch.get_loops(b)[0])
    return sch


def cpu_inference(spec: KernelSpec, func):
    """Inference: one streaming pass, parallel over rows, vectorized along the contiguous axis."""
    if spec.training:
        return None
    sch = _sched(func)
    loops = sch.get_loops("y")
    if spec.kinds == "RRCR" and spec.shape[-1] != 1:
        n, p, c, q = loops
        sch.parallel(sch.fuse(n, p, c))
        vec = _vector_factor(int(spec.shape[-1]))
        if vec > 1:
            _, qi = sch.split(q, [None, vec])
            sch.vectorize(qi)
    elif spec.kinds == "RRCR":
        n, p, c, q = loops
        sch.parallel(sch.fuse(n, p))
        C = int(spec.channel_shape[0])
        cv = C if C <= 64 else _vector_factor(C)
        co, ci = sch.split(sch.fuse(c, q), [None, cv])
        sch.vectorize(ci)
    else:
        sch.parallel(loops[0])
    return sch


# --------------------------------------------------------------------------- x86: streaming stores of y

NT_PIPELINE = "bncompile_nt_stores"
_NT_LANES = (8, 16, 32, 64)
NT_MIN_TASK_BYTES = 16 * 1024     # bytes of y one parallel iteration must stream (amortizes its sfence)
# the rules whose y pass gains from streaming stores (measured; cpu_channels_last re-reads y's stripe)
STREAMING_RULES = ("cpu_channel_first", "cpu_channels_last_rows")


def _nt_helper_ir(lanes: set) -> str:
    """LLVM IR of the helpers the rewritten stores call (inlined by LLVM: ``alwaysinline``).

    ``bnc_ntstore_f32xL(p, v)`` stores a float32 vector with a non-temporal (streaming) store when
    ``p`` is 32-byte aligned, else with an ordinary store (so any alignment is correct);
    ``bnc_sfence()`` orders the streaming stores before the task that wrote them ends.
    """
    parts = []
    for n in sorted(lanes):
        parts.append(f"""
define void @bnc_ntstore_f32x{n}(ptr %p, <{n} x float> %v) #0 {{
entry:
  %a = ptrtoint ptr %p to i64
  %m = and i64 %a, 31
  %ok = icmp eq i64 %m, 0
  br i1 %ok, label %nt, label %plain
nt:
  store <{n} x float> %v, ptr %p, align 32, !nontemporal !0
  ret void
plain:
  store <{n} x float> %v, ptr %p, align 4
  ret void
}}""")
    parts.append("""
declare void @llvm.x86.sse.sfence()
define void @bnc_sfence() #0 {
entry:
  call void @llvm.x86.sse.sfence()
  ret void
}
attributes #0 = { alwaysinline nounwind }
!0 = !{i32 1}
""")
    return "\n".join(parts)


def nt_store_pass(names=("y",)):
    """A TIR pass (run after the default lowering, once loops are vectorized) that turns the contiguous
    float32 vector stores into the output buffers ``names`` into streaming (non-temporal) stores.

    Why: y is written once and never read back by the kernel, yet an ordinary store first reads each
    line of y from memory (read-for-ownership) and fills the cache with it, evicting the channel slice
    of x the schedule re-reads from cache. Each rewritten store becomes a call to an inlined helper
    (``pragma_import_llvm``); every parallel task that streamed ends with an ``sfence`` (and so does an
    outermost serial loop that streamed). Stores it does not recognize are left as they are, and so are
    stores in a parallel iteration that writes less than ``NT_MIN_TASK_BYTES`` (the fence would cost
    more than the streaming saves).
    """
    import re

    tvm = _tvm.tvm()
    tirx = tvm.tirx
    alts = "|".join(re.escape(n) for n in names)
    pat = re.compile(rf"^({alts})(_\d+)?$")

    def fence():
        return tirx.Evaluate(tirx.call_extern("void", "bnc_sfence"))

    @tirx.transform.prim_func_pass(opt_level=0)
    def _pass(func, mod, ctx):
        lanes_used: set = set()

        def store(stmt, mult):
            v = stmt.value
            dt = getattr(getattr(v, "ty", None), "dtype", None)
            idx = stmt.indices
            if dt is None or not pat.match(stmt.buffer.name) or len(idx) != 1:
                return stmt, False
            ramp = idx[0]
            dt = tvm.DataType(str(dt))
            if (not isinstance(ramp, tirx.Ramp) or dt.type_code != tvm.DataTypeCode.FLOAT or dt.bits != 32
                    or int(dt.lanes) not in _NT_LANES or not isinstance(ramp.stride, tirx.IntImm)
                    or int(ramp.stride) != 1 or int(ramp.lanes) != int(dt.lanes)):
                return stmt, False
            n = int(dt.lanes)
            if mult * n * 4 < NT_MIN_TASK_BYTES:
                return stmt, False
            lanes_used.add(n)
            addr = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(stmt.buffer, [ramp.base]))
            return tirx.Evaluate(tirx.call_extern("void", f"bnc_ntstore_f32x{n}", addr, v)), True

        def visit(stmt, in_loop, mult=1):
            """(new stmt, changed); ``mult``: iterations of the serial loops since the last parallel one."""
            if isinstance(stmt, tirx.BufferStore):
                return store(stmt, mult)
            if isinstance(stmt, tirx.SeqStmt):
                res = [visit(x, in_loop, mult) for x in stmt.seq]
                if not any(r[1] for r in res):
                    return stmt, False
                return tirx.SeqStmt([r[0] for r in res]), True
            if isinstance(stmt, tirx.For):
                par = stmt.kind == tirx.ForKind.PARALLEL
                ext = stmt.extent
                inner = 1 if par else mult * (int(ext) if isinstance(ext, tirx.IntImm) else 1 << 20)
                body, changed = visit(stmt.body, True, inner)
                if not changed:
                    return stmt, False
                if par:
                    body = tirx.SeqStmt([body, fence()])
                loop = tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                                stmt.annotations, stmt.step)
                if not in_loop and not par:
                    return tirx.SeqStmt([loop, fence()]), True
                return loop, True
            if isinstance(stmt, tirx.AttrStmt):
                body, changed = visit(stmt.body, in_loop, mult)
                if not changed:
                    return stmt, False
                return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body), True
            if isinstance(stmt, tirx.IfThenElse):
                t, c1 = visit(stmt.then_case, in_loop, mult)
                e, c2 = visit(stmt.else_case, in_loop, mult) if stmt.else_case is not None else (None, False)
                if not (c1 or c2):
                    return stmt, False
                return tirx.IfThenElse(stmt.condition, t, e), True
            return stmt, False

        body, changed = visit(func.body, False)
        if not changed:
            return func
        body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", tvm.ir.StringImm(_nt_helper_ir(lanes_used)),
                             body)
        return func.with_body(body)

    return _pass


def nt_store_pipeline() -> str:
    """Register (once) and return the name of the TIR pipeline: TVM's default + :func:`nt_store_pass`."""
    tvm = _tvm.tvm()
    cp = _tvm.submodule("tvm.tirx.compilation_pipeline")

    if NT_PIPELINE not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            base, fin_host, fin_dev = cp.get_tir_pipeline("s_tir", **kwargs)
            return tvm.transform.Sequential([base, nt_store_pass()]), fin_host, fin_dev

        tvm.tirx.register_tir_pipeline(NT_PIPELINE, factory)
    return NT_PIPELINE


def nt_stores_apply(tdict: dict) -> bool:
    """Streaming stores are used for x86-64 llvm targets (the helpers use SSE's sfence)."""
    import os

    if os.environ.get("BNCOMPILE_NT_STORES", "1") == "0":
        return False
    if tdict.get("kind") != "llvm":
        return False
    triple = str(tdict.get("mtriple", "") or "")
    if triple:
        return triple.startswith("x86_64")
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")
