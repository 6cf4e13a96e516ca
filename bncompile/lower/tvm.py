"""The one module that imports TVM: lazily, with the version pin, the 0.27 API shims and every patch of TVM.

Everything else in bncompile reaches TVM through :func:`tvm` (the module) and the helpers here,
so ``import bncompile`` and the commands that do not compile never pay TVM's import time
(about 2 s). The facts the shims rely on are in ``docs/tvm-0.27.md``:

* targets are dicts (``{"kind": "llvm", "mcpu": ...}``); ``mcpu="native"`` silently builds for
  generic, so the host CPU comes from ``tvm.target.codegen.llvm_get_system_cpu()`` (:func:`host_cpu`);
  the target grammar users write is parsed in :mod:`bncompile.lower.targets`;
* apache-tvm-ffi 0.1.15.x segfaults when IR is serialized; 0.1.14.post1 is required;
* numpy buffers handed straight to a compiled function must be 64-byte aligned;
* the Relax ONNX frontend has no custom-converter argument: :func:`patched_onnx_converters` patches
  its converter map for the duration of one import (the only patch of TVM in bncompile).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
from typing import Any, Mapping

import numpy as np

from bncompile.errors import UnsupportedError

log = logging.getLogger(__name__)

TVM_VERSION = "0.27.0"
TVM_FFI_VERSION = "0.1.14.post1"
ALIGNMENT = 64


def _default_threads() -> None:
    """TVM 0.27's runtime sizes its thread pool to half the logical CPUs on x86 (it assumes two
    hyper-threads per core), so a compiled model used 1 of 2 cores where onnxruntime uses both. Unless
    the user set ``TVM_NUM_THREADS``, the pool gets every CPU this process may run on, as onnxruntime's
    does; the variable is read when the pool starts, so this runs before TVM is imported."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(max(1, n))


@functools.lru_cache(maxsize=None)
def tvm():
    """Import and return the ``tvm`` module, raising UnsupportedError when it is missing or mismatched."""
    _default_threads()
    try:
        ffi = importlib.import_module("tvm_ffi")
    except ImportError as err:
        raise UnsupportedError(
            "TVM is not installed: `pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1` "
            f"({err})") from None
    ffi_version = getattr(ffi, "__version__", "?")
    if not str(ffi_version).startswith("0.1.14"):
        raise UnsupportedError(
            f"apache-tvm-ffi {ffi_version} is installed but bncompile needs {TVM_FFI_VERSION} "
            "(0.1.15 segfaults when TVM serializes IR): `pip install apache-tvm-ffi==0.1.14.post1`")
    try:
        mod = importlib.import_module("tvm")
    except ImportError as err:
        raise UnsupportedError(f"TVM is not installed or failed to import: {err}; "
                               "`pip install apache-tvm==0.27.0.post1`") from None
    version = getattr(mod, "__version__", "?")
    if not str(version).startswith(TVM_VERSION):
        raise UnsupportedError(f"apache-tvm {version} is installed but bncompile needs {TVM_VERSION}.x "
                               "(its API differs): `pip install apache-tvm==0.27.0.post1`")
    # submodules used across the project; importing them here keeps the import cost in one place
    for name in ("tvm.te", "tvm.tirx", "tvm.s_tir", "tvm.runtime", "tvm.target"):
        importlib.import_module(name)
    return mod


def te():
    return tvm().te


def tirx():
    return tvm().tirx


def s_tir():
    return tvm().s_tir


def submodule(name: str):
    """A TVM submodule such as ``tvm.s_tir.dlight``, imported after the version checks of :func:`tvm`
    (the rest of the project imports TVM only through this module)."""
    tvm()
    return importlib.import_module(name)


def relax_onnx():
    """``tvm.relax.frontend.onnx`` (imported on first use, after the version checks of :func:`tvm`)."""
    tvm()
    return importlib.import_module("tvm.relax.frontend.onnx")


@functools.lru_cache(maxsize=None)
def host_cpu() -> str:
    """LLVM's name for the host CPU (``znver3``...); ``"generic"`` when LLVM cannot tell."""
    try:
        return str(tvm().target.codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # pragma: no cover - depends on the LLVM build
        return "generic"


def host_target() -> dict:
    """The host CPU as a TVM target dict."""
    return {"kind": "llvm", "mcpu": host_cpu()}


def make_target(target: Any):
    """A ``tvm.target.Target`` from a TVM target (returned as is), a TVM target dict or a name TVM knows
    (``"llvm"``, ``"cuda"``, a tag). The names users write (``cpu``, ``cuda:sm_80``, ``x86_64``...) are
    parsed by :func:`bncompile.lower.targets.target_dict`, which returns such a dict."""
    T = tvm().target.Target
    if isinstance(target, T):
        return target
    return T(dict(target) if isinstance(target, Mapping) else target)


def target_kind(target: Any) -> str:
    return str(make_target(target).kind.name)


def device_for(target: Any):
    kind = target_kind(target)
    if kind == "llvm":
        return tvm().cpu(0)
    if kind == "cuda":
        return tvm().cuda(0)
    raise UnsupportedError(f"target: no runtime device for target kind {kind!r}")


def cuda_available() -> bool:
    """True when a CUDA device can run kernels here."""
    try:
        return bool(tvm().cuda(0).exist)
    except Exception:
        return False


def num_threads() -> int:
    """The size of TVM's runtime thread pool (``runtime.NumThreads``): what parallel loops really use.
    It is fixed when the pool starts, from ``TVM_NUM_THREADS`` (without it, TVM's own choice, which was
    1 on a 2-core VM)."""
    return int(tvm().get_global_func("runtime.NumThreads")())


# --------------------------------------------------------------------------- tensors

def is_tvm_tensor(value: Any) -> bool:
    return isinstance(value, tvm().runtime.Tensor)


def to_tensor(arr: np.ndarray, device):
    """A TVM tensor holding ``arr`` on ``device``: zero-copy on CPU when ``arr`` is aligned and contiguous."""
    rt = tvm().runtime
    arr = np.asarray(arr)
    if (device.dlpack_device_type() == 1 and arr.flags.c_contiguous and arr.ctypes.data % ALIGNMENT == 0
            and arr.size > 0 and arr.flags.writeable):
        try:
            return rt.from_dlpack(arr)
        except Exception:  # pragma: no cover - fall back to a copy
            pass
    return rt.tensor(np.ascontiguousarray(arr), device)


def empty(shape, dtype: str, device):
    return tvm().runtime.empty(tuple(int(s) for s in shape), dtype, device)


def aligned_numpy(shape, dtype="float32") -> np.ndarray:
    """A zeroed C-contiguous NumPy array whose data is :data:`ALIGNMENT`-aligned (so TVM can use it
    without a copy). NumPy asks Linux for transparent huge pages on large allocations, which TVM's own
    allocator does not: a 25 MB tensor streamed through a kernel measured ~20% faster on them."""
    dt = np.dtype(dtype)
    n = int(np.prod([int(s) for s in shape]))
    buf = np.zeros(n * dt.itemsize + ALIGNMENT, np.uint8)
    off = (-buf.ctypes.data) % ALIGNMENT
    return buf[off:off + n * dt.itemsize].view(dt).reshape(tuple(int(s) for s in shape))


def host_tensor(shape, dtype="float32"):
    """A CPU TVM tensor over :func:`aligned_numpy` memory (zero-copy; huge pages where Linux gives them)."""
    return tvm().runtime.from_dlpack(aligned_numpy(shape, dtype))


def set_num_threads(n: int) -> int:
    """Ask TVM's CPU thread pool for ``n`` threads sharing every core (no pinning); returns the count in use.

    Without it TVM 0.27 runs ``hardware_concurrency() / 2`` threads on x86 (it assumes two hyperthreads
    per core: one thread on a 2-core machine without SMT) and pins each to a core (on a shared machine a
    pinned thread waits for its core while another is idle). Takes effect only before TVM first runs a
    parallel kernel in this thread (the pool's size is fixed then); otherwise TVM_NUM_THREADS must be set
    before the process starts.
    """
    t = tvm()
    n = max(1, int(n))
    configure = t.get_global_func("runtime.config_threadpool")
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or n))
    # kSpecifyThreadShareAllCore: every thread of the pool, the calling thread too, may run on every CPU of
    # the list, so the list holds every CPU this process may use (a list of the first n CPUs pinned the
    # calling thread, and every thread it starts later, onnxruntime's pool too, to CPU 0 for n = 1); TVM
    # caps the pool at the list's length, so a list of at least n entries
    configure(-3, n, [str(cpus[i % len(cpus)]) for i in range(max(n, len(cpus)))])
    used = int(t.get_global_func("runtime.NumThreads")())
    if used != n:
        log.warning("TVM thread pool: %d thread(s) in use, %d asked (the pool was created before; set "
                    "TVM_NUM_THREADS=%d before starting)", used, n, n)
    return used


def view(tensor, shape):
    """A view of a contiguous TVM tensor with another shape (same element count, no copy)."""
    return tensor._create_view(tuple(int(s) for s in shape))


# --------------------------------------------------------------------------- build and checks

def build(func, target: Any):
    """Compile a (scheduled) PrimFunc or IRModule; returns the ``runtime.Executable`` (CUDA: inside
    :func:`cuda_pass_context`)."""
    t = make_target(target)
    with cuda_pass_context(target, opt_level=3):      # the level the kernels were verified at on a GPU
        return tvm().compile(func, target=t)


def cuda_pass_context(target: Any, *, opt_level: int | None = None):
    """For a CUDA target, the current PassContext with TVM's storage rewrite turned off (else a no-op).

    The CUDA schedules keep per-channel scalars in shared memory and let every thread of the block
    compute them (the barriers come from ThreadSync); storage rewrite folds a scalar into the slot of one
    it was computed from (``r = inv * r`` in place), and with every thread doing that read-modify-write
    one thread read the value another had already updated (seen on an H200: the renorm backward's
    gradients off). Used by kernel builds and whole-model compiles alike; ``opt_level`` overrides the
    current context's."""
    import contextlib

    if target_kind(target) != "cuda":
        return contextlib.nullcontext()
    transform = tvm().transform
    cur = transform.PassContext.current()
    config = {str(k): v for k, v in dict(cur.config).items()}
    config["tirx.disable_storage_rewrite"] = True
    return transform.PassContext(opt_level=cur.opt_level if opt_level is None else opt_level, required_pass=list(cur.required_pass),
                                 disabled_pass=list(cur.disabled_pass), config=config)


def verify_memory(mod, target: Any) -> None:
    """Run VerifyMemory on a lowered copy of ``mod`` (raises when device buffers are read on the host).

    The default pipeline checks memory only after FlattenBuffer, where an unscheduled CUDA function
    slips through as host code; this lowers the blocks first so the check is meaningful.
    """
    t = tvm()
    s = t.s_tir
    T = make_target(target)
    if isinstance(mod, t.tirx.PrimFunc):
        mod = t.IRModule({"main": mod})
    host = t.target.Target(host_target())
    m = t.tirx.transform.BindTarget(t.target.Target(T, host))(mod)
    m = t.transform.Sequential([s.transform.LowerCrossThreadReduction(), s.transform.LowerInitBlock(),
                                s.transform.ConvertBlocksToOpaque(), s.transform.LowerOpaqueBlock()])(m)
    t.tirx.transform.VerifyMemory()(m)


def imported_kinds(executable) -> list[str]:
    """Kinds of the modules the host module imports (``["cuda"]`` for a correctly built CUDA kernel)."""
    return [str(m.kind) for m in executable.mod.imports]


def module_tree_kinds(mod) -> list[str]:
    """Kinds of every module in the import tree of ``mod`` (a Relax executable nests
    VMExecutable -> llvm -> cuda), root first."""
    seen, stack = [], [mod]
    while stack:
        m = stack.pop()
        seen.append(str(m.kind))
        stack.extend(m.imports)
    return seen


def cuda_source(executable) -> str:
    """The CUDA C source of an executable (or runtime module), searched through its import tree."""
    stack = [getattr(executable, "mod", executable)]
    while stack:
        m = stack.pop()
        if str(m.kind) == "cuda":
            return m.inspect_source()
        stack.extend(m.imports)
    raise UnsupportedError("no cuda module in this executable (was the function scheduled for CUDA?)")


def compile_cuda_source(source: str, *, arch: str, fmt: str = "ptx") -> bytes:
    """Compile CUDA C with nvcc (needs nvcc on PATH); returns the PTX/cubin bytes."""
    t = tvm()
    nvcc = importlib.import_module("tvm.support.nvcc")
    with t.target.Target({"kind": "cuda", "arch": arch}):
        return nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler="nvcc")


# --------------------------------------------------------------------------- the ONNX frontend patch

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def patched_onnx_converters(extra: Mapping):
    """Within the block, the Relax ONNX frontend converts the op types of ``extra`` with the given
    converters (``OnnxOpConverter`` subclasses). TVM 0.27 has no custom-converter argument, so
    ``onnx_frontend._get_convert_map`` is replaced for the duration, under a lock (one import at a time)."""
    fe = relax_onnx().onnx_frontend
    with _PATCH_LOCK:
        orig = fe._get_convert_map
        fe._get_convert_map = lambda: {**orig(), **extra}
        try:
            yield
        finally:
            fe._get_convert_map = orig


__all__ = ["tvm", "te", "tirx", "s_tir", "submodule", "relax_onnx", "host_cpu", "host_target", "make_target",
           "target_kind", "device_for", "num_threads", "cuda_available", "is_tvm_tensor", "to_tensor", "empty", "view", "build",
           "verify_memory", "imported_kinds", "module_tree_kinds", "cuda_source", "compile_cuda_source",
           "patched_onnx_converters"]
