"""The variants a benchmark times, each built into a runner (a call with no arguments that returns
the outputs in graph order, the inputs bound):

* ``ort``, ``ort-noopt``, ``folded-ort``, ``folded-ort-noopt`` (and ``-cuda`` twins): onnxruntime
  at its default optimization level, or with all graph optimizations off, on the model or the
  model folded by bncompile;
* ``tvm`` / ``tvm-cuda``: the model compiled by bncompile's compiler (with folding) for the target.

TVM is imported inside the functions that need it (``import bncompile.bench`` stays light). Whether
a CUDA variant can run is a question about this machine (a provider, a GPU), asked at run time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Callable, Sequence

import numpy as np
import onnx

from bncompile.bench.report import BASELINE
from bncompile.errors import BncompileError, InputError, UnsupportedError

log = logging.getLogger(__name__)

CPU_VARIANTS = ("ort", "ort-noopt", "folded-ort", "folded-ort-noopt", "tvm")
CUDA_VARIANTS = ("ort-cuda", "folded-ort-cuda", "tvm-cuda")
ALL_VARIANTS = CPU_VARIANTS + CUDA_VARIANTS


def first_line(err: BaseException) -> str:
    """One line for a report: a BncompileError's own sentence, else ``Type: first line``."""
    text = str(err).strip()
    if isinstance(err, BncompileError):        # already a sentence for users
        return text.splitlines()[0] if text else type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- onnxruntime

def _ort_options(threads: int, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def _ort_spec(variant: str) -> tuple[bool, bool, str]:
    """(folded, optimize, provider) of an onnxruntime variant."""
    folded = variant.startswith("folded-")
    optimize = not variant.endswith("-noopt")
    provider = "CUDAExecutionProvider" if variant.endswith("-cuda") else "CPUExecutionProvider"
    return folded, optimize, provider


def ort_runner(model_bytes: bytes, variant: str, threads: int, feeds) -> Callable[[], list]:
    import onnxruntime as ort

    _, optimize, provider = _ort_spec(variant)
    sess = ort.InferenceSession(model_bytes, sess_options=_ort_options(threads, optimize),
                                providers=[provider])
    if provider not in sess.get_providers():
        raise UnsupportedError(f"onnxruntime did not enable {provider} for this model")

    def call():
        return sess.run(None, feeds)
    call.threads = lambda: int(sess.get_session_options().intra_op_num_threads)   # as configured on it
    return call


def _cuda_ort_available() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


# --------------------------------------------------------------------------- TVM

def _tvm_cuda_available() -> bool:
    """Whether TVM sees a CUDA GPU on this machine (imports TVM)."""
    from bncompile.lower import tvm as _tvm
    return _tvm.cuda_available()


def pin_tvm_threads(threads: int) -> None:
    """Set ``TVM_NUM_THREADS`` (TVM reads it when it starts its pool, so before TVM is imported)."""
    if "tvm" in sys.modules and os.environ.get("TVM_NUM_THREADS") != str(threads):
        log.warning("TVM was imported before the benchmark: its thread pool may ignore threads=%d", threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    spin = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")
    if spin is not None:                       # e.g. left by the kernel benchmark in this process
        log.warning("TVM_THREAD_POOL_SPIN_COUNT=%s: TVM's workers are not at their default (300000 "
                    "sched_yield spins between jobs); the report's machine section records it", spin)


def tvm_runner(model: onnx.ModelProto, variant: str, target: str, shapes: dict, feeds,
               out_names: list[str], db=None) -> Callable[[], list]:
    import bncompile as compiler

    tgt = "cuda" if variant == "tvm-cuda" else target
    compiled = compiler.compile(model, target=tgt, input_shapes=dict(shapes), fold=True, db=db)

    def call():
        out = compiled.run(feeds)
        if isinstance(out, dict):
            if all(n in out for n in out_names):
                return [out[n] for n in out_names]
            return list(out.values())
        return list(out) if isinstance(out, (list, tuple)) else [out]
    call.compiled = compiled                   # for the memory probe (export, then load there)
    call.threads = _tvm_pool_size
    return call


def _tvm_pool_size() -> int:
    """TVM's runtime thread pool size (``runtime.NumThreads``, through the shim)."""
    from bncompile.lower import tvm as _tvm

    return _tvm.num_threads()


@contextlib.contextmanager
def native_stderr_to_log():
    """Send what native code writes to file descriptor 2 to this module's debug log instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("native stderr: %s", text)


def to_numpy(outputs) -> list[np.ndarray]:
    res = []
    for o in outputs:
        if hasattr(o, "numpy") and not isinstance(o, np.ndarray):
            o = o.numpy()
        res.append(np.asarray(o))
    return res


# --------------------------------------------------------------------------- choice

def select_variants(variants: Sequence[str] | None, *, cuda_ort: bool | None = None,
                    cuda_tvm: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The variants to run (``ort`` always first) and those asked for but unavailable (-> reason)."""
    if variants is None:
        chosen = list(CPU_VARIANTS)
        if cuda_ort if cuda_ort is not None else _cuda_ort_available():
            chosen += ["ort-cuda", "folded-ort-cuda"]
        if cuda_tvm if cuda_tvm is not None else ("tvm" in chosen and _tvm_cuda_available()):
            chosen.append("tvm-cuda")
        return chosen, {}
    chosen = []
    for v in variants:
        v = v.strip()
        if v not in ALL_VARIANTS:
            raise InputError(f"unknown variant {v!r}: choose among {', '.join(ALL_VARIANTS)}")
        if v not in chosen:
            chosen.append(v)
    if BASELINE in chosen:
        chosen.remove(BASELINE)
    chosen.insert(0, BASELINE)                 # the baseline of ratios and errors always runs
    missing = {}
    if any(v in ("ort-cuda", "folded-ort-cuda") for v in chosen) and not _cuda_ort_available():
        for v in ("ort-cuda", "folded-ort-cuda"):
            if v in chosen:
                missing[v] = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    if "tvm-cuda" in chosen and not _tvm_cuda_available():
        missing["tvm-cuda"] = "TVM sees no CUDA GPU here"
    return chosen, missing
