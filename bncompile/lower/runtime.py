"""The compiled model: ``CompiledModel.run`` / ``export``, and :func:`load` of an exported library.

``CompiledModel.export(path)`` writes the library and ``<path>.json`` (input/output names, dtypes and
shapes, target); default values of inputs that had an initializer go to ``<path>.defaults.npz``.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from bncompile._version import __version__
from bncompile.errors import InputError, UnsupportedError
from bncompile.lower import tvm as _tvm
from bncompile.lower.targets import host_arch, runnable_here, target_arch

__all__ = ["CompiledModel", "load", "cuda_source", "value_infos", "fmt_shape", "FORMAT"]

FORMAT = "bncompile-library/1"
AARCH64_CXX = "aarch64-linux-gnu-g++"

_ELEM_TO_NP = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT16: "int16"}


def value_dims(vi) -> list | None:
    """The dims of a ValueInfoProto (int, dim_param str, or None), None when it has no shape."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def value_infos(values) -> list[dict]:
    """``[{"name", "dtype", "shape"}]`` of ONNX graph inputs or outputs (the metadata of a library)."""
    out = []
    for v in values:
        elem = v.type.tensor_type.elem_type
        out.append({"name": v.name, "dtype": _ELEM_TO_NP.get(elem, onnx.helper.tensor_dtype_to_np_dtype(elem).name
                                                             if elem else "float32"),
                    "shape": value_dims(v)})
    return out


class CompiledModel:
    """A compiled ONNX graph: ``run(feeds) -> outputs`` by onnxruntime's names, ``export(path)``."""

    def __init__(self, *, executable=None, module=None, target: dict, target_name: str, inputs: list[dict],
                 outputs: list[dict], defaults: Mapping[str, np.ndarray] | None = None, info: dict | None = None,
                 path: str | None = None):
        self._executable = executable
        self._module = module
        self.target = dict(target)
        self.target_name = target_name
        self.inputs = inputs
        self.outputs = outputs
        self.defaults = dict(defaults or {})
        self.info = dict(info or {})
        self.path = path
        self._device = None
        self._lock = threading.Lock()      # loading the library (once, shared by the threads)
        self._local = threading.local()    # per thread: its virtual machine and input tensors

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target_name}, inputs={self.input_names}, "
                f"outputs={self.output_names})")

    # ---- running
    def prepare(self) -> "CompiledModel":
        """Load the library and create the virtual machine now (otherwise the first ``run`` does it);
        raises UnsupportedError where the target cannot run on this machine."""
        self._machine()
        return self

    def _machine(self):
        """This thread's virtual machine and the device: one per calling thread, since TVM's Relax VM keeps
        its program counter and registers in the object (two threads calling one VM at once failed with
        "run into invalid section" or a register index out of range); the library is loaded once."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            with self._lock:
                mod = self._load()
            try:
                vm = _tvm.tvm().relax.VirtualMachine(mod, self._device)
            except Exception as err:  # noqa: BLE001 - a module that is not a Relax executable
                raise self._not_a_library(err) from None
            self._local.vm = vm
        return vm, self._device

    def _load(self):
        """The executable, or the library module (loaded on the first call); sets the device."""
        why = runnable_here(self.target)
        if why:
            raise UnsupportedError(f"cannot run here: {why}")
        self._device = _tvm.device_for(self.target)
        if self._executable is not None:
            return self._executable
        if self._module is None:
            check_library_file(self.path)
            try:
                self._module = _tvm.tvm().runtime.load_module(self.path)
            except Exception as err:  # noqa: BLE001 - TVM's loader raises several kinds
                raise self._not_a_library(err) from None
        return self._module

    def _not_a_library(self, err: Exception) -> InputError:
        from bncompile.errors import first_line

        return InputError(f"library {self.path!r} cannot be loaded as a TVM Relax library ({first_line(err, 200)}): "
                          "give a library written by bncompile compile for this machine")

    def _check_feeds(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise InputError(f"feeds: unknown input(s) {', '.join(map(repr, unknown))}; the model's inputs are "
                             f"{', '.join(self.input_names)}")
        arrays = []
        bound: dict[str, int] = {}
        for spec in self.inputs:
            name = spec["name"]
            if name in feeds:
                v = feeds[name]
                a = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
            elif name in self.defaults:
                a = self.defaults[name]
            else:
                raise InputError(f"feeds: input {name!r} is missing (inputs: {', '.join(self.input_names)})")
            dt = spec["dtype"]
            if dt == "bfloat16":
                import ml_dtypes

                npdt = np.dtype(ml_dtypes.bfloat16)
            else:
                npdt = np.dtype(dt)
            if a.dtype != npdt:
                if a.dtype.kind == npdt.kind or (a.dtype.kind in "iub" and npdt.kind in "iuf"):
                    a = a.astype(npdt)
                else:
                    raise InputError(f"input {name!r}: dtype {a.dtype} does not match the model's {dt}")
            shape = spec.get("shape")
            if shape is not None:
                if a.ndim != len(shape):
                    raise InputError(f"input {name!r}: shape {tuple(a.shape)} has rank {a.ndim}; the model expects "
                                     f"rank {len(shape)} {fmt_shape(shape)}")
                for i, (want, got) in enumerate(zip(shape, a.shape)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise InputError(f"input {name!r}: shape {tuple(a.shape)} does not match the compiled "
                                         f"shape {fmt_shape(shape)} (dimension {i} must be {want})")
                    if isinstance(want, str):
                        if bound.setdefault(want, int(got)) != int(got):
                            raise InputError(f"input {name!r}: dimension {i} ({want}) is {got} but another "
                                             f"input has {want} = {bound[want]}")
                        mult = (self.info.get("dim_multiples") or {}).get(want)
                        if mult and int(got) % int(mult):
                            raise InputError(f"input {name!r}: dimension {i} ({want}) is {got}, which is not a "
                                             f"multiple of {mult} (the virtual_batch_size of a ghost batch norm)")
            arrays.append(np.ascontiguousarray(a))
        self._check_broadcasts(arrays, bound)
        return arrays

    def _check_broadcasts(self, arrays: list[np.ndarray], bound: Mapping[str, int]) -> None:
        """A dim the model broadcasts at run time (an adjustment of any broadcast shape) must be 1 or the
        size it is broadcast against: refuse what ONNX would refuse instead of computing garbage."""
        table = self.info.get("dim_broadcasts") or {}
        if not table:
            return
        for spec, a in zip(self.inputs, arrays):
            for i, (dim, got) in enumerate(zip(spec.get("shape") or (), a.shape)):
                if not isinstance(dim, str) or got == 1:
                    continue
                for want in table.get(dim, ()):
                    size = want if isinstance(want, int) else bound.get(want)
                    if size is not None and int(got) != int(size):
                        against = f"{size}" if isinstance(want, int) else f"{size} ({want})"
                        raise InputError(f"input {spec['name']!r}: shape {tuple(a.shape)} does not broadcast: "
                                         f"dimension {i} is {got}, broadcast against {against}; give 1 or {size} "
                                         "there")

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on NumPy arrays by input name (inputs with an initializer may be omitted)."""
        arrays = self._check_feeds(feeds)
        vm, dev = self._machine()
        main = getattr(self._local, "main", None)
        if main is None:                          # looked up once per thread (0.03 ms a call otherwise)
            main = self._local.main = vm["main"]
        args = self._stage(arrays, dev)
        try:
            res = main(*args)
        except (ValueError, TypeError) as err:
            msg = str(err).strip().splitlines()
            raise InputError(f"run: {msg[-1] if msg else type(err).__name__}") from None
        outs = [res] if isinstance(res, _tvm.tvm().runtime.Tensor) else list(res)
        if len(outs) != len(self.outputs):
            raise UnsupportedError(f"run: the library returned {len(outs)} outputs, expected {len(self.outputs)}")
        return {o["name"]: _to_numpy(t) for o, t in zip(self.outputs, outs)}

    __call__ = run

    def _stage(self, arrays: list[np.ndarray], dev) -> list:
        """The inputs copied into device tensors this thread keeps from call to call (one per input, made
        anew when its shape or dtype changes), through a NumPy view of each where NumPy can see the memory
        (DLPack: a CPU tensor of a NumPy dtype). Measured in MobileNetV2's calls at batch 1, one thread,
        right after a call (AMD EPYC VM): a fresh tensor per call faulted in its pages (0.3-0.5 ms for the
        600 KB input), TVM's ``copyfrom`` took 0.27 ms, ``np.copyto`` into the view 0.10 ms. Safe because
        :meth:`run` copies the outputs out before it returns, even one that is a view of an input."""
        tvm = _tvm.tvm()
        kept = getattr(self._local, "tensors", None)
        if kept is None or len(kept) != len(arrays):
            kept = self._local.tensors = [None] * len(arrays)
        args = []
        for k, a in enumerate(arrays):
            if kept[k] is None or tuple(kept[k][0].shape) != a.shape or str(kept[k][0].dtype) != str(a.dtype):
                t = tvm.runtime.empty(a.shape, str(a.dtype), dev)
                kept[k] = (t, _numpy_view(t))
            t, view = kept[k]
            if view is not None:
                np.copyto(view, a)
            elif a.size:
                t.copyfrom(a)
            args.append(t)
        return args

    # ---- export / load
    def metadata(self) -> dict:
        return {"format": FORMAT, "bncompile": __version__, "target": self.target_name,
                "target_dict": self.target, "inputs": self.inputs, "outputs": self.outputs,
                "defaults": sorted(self.defaults), **{k: v for k, v in self.info.items() if k != "defaults"}}

    def export(self, path, *, cc: str | None = None) -> Path:
        """Write the library to ``path`` (a ``.tar`` of objects when the name ends in .tar), plus
        ``<path>.json`` (and ``<path>.defaults.npz`` when some inputs have defaults)."""
        from bncompile._io import atomic_output_dir, check_output_path

        p = check_output_path(path, what="library")
        if self._executable is None and self.path is None:
            raise UnsupportedError("export: this model has no executable to export")
        kwargs = {}
        if self._executable is not None and not p.name.endswith(".tar"):
            cc = cc or self._default_cc()
            if cc:
                kwargs["cc"] = cc
        dpath = Path(str(p) + ".defaults.npz")
        # the library, its .json and .defaults.npz: written in a hidden folder beside the output,
        # moved into place together on success (the library last); nothing left on failure
        with atomic_output_dir(p, what="library") as tmpdir:
            tmp = Path(tmpdir) / p.name
            if self._executable is None:
                shutil.copyfile(self.path, tmp)
            else:
                try:
                    self._executable.export_library(str(tmp), **kwargs)
                except Exception as err:
                    raise UnsupportedError(f"export: linking {p.name} failed: {_link_error(err)}") from None
            (Path(tmpdir) / (p.name + ".json")).write_text(json.dumps(self.metadata(), indent=1, default=str) + "\n")
            if self.defaults:
                with open(Path(tmpdir) / dpath.name, "wb") as f:
                    np.savez(f, **self.defaults)
        if not self.defaults and dpath.exists():
            dpath.unlink()
        self.path = str(p)
        return p

    def _default_cc(self) -> str | None:
        triple = str(self.target.get("mtriple", ""))
        arch = target_arch(self.target) if triple else None
        if arch and arch != host_arch():
            if arch == "aarch64":
                if shutil.which(AARCH64_CXX) is None:
                    raise UnsupportedError(f"export: the aarch64 cross compiler {AARCH64_CXX} is not on PATH: "
                                           "`apt-get install g++-aarch64-linux-gnu`, or export to a .tar of "
                                           "object files and link it on the device")
                return AARCH64_CXX
            raise UnsupportedError(f"export: no cross compiler known for {triple}; export to a .tar instead")
        return None


def _numpy_view(t):
    """A NumPy array over a TVM tensor's memory (DLPack, no copy), or None where NumPy cannot see it (a GPU
    tensor, a dtype NumPy lacks such as bfloat16)."""
    try:
        return np.from_dlpack(t)
    except Exception:  # noqa: BLE001 - BufferError, RuntimeError, TypeError by NumPy version and device
        return None


def _to_numpy(t) -> np.ndarray:
    """A NumPy copy of an output tensor: through a DLPack view where NumPy can see the memory (right after a
    call it took a quarter of the time of TVM's ``numpy()``: 0.05 against 0.22 ms), else ``numpy()``."""
    view = _numpy_view(t)
    return view.copy() if view is not None else t.numpy()


def _link_error(err: Exception) -> str:
    """One line for a failed link: the OS problem it names (a full disk), else the compiler's last
    message line, never the (possibly truncated) command line."""
    from bncompile.errors import first_line, os_problem_in

    text = str(err)
    fix = os_problem_in(text)
    if fix:
        return fix
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.lstrip().startswith(("g++", "gcc", "cc ", "["))]
    line = errors[-1] if errors else first_line(err)
    return (line[:300] + "...") if len(line) > 300 else line


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


def cuda_source(cm: CompiledModel) -> str:
    """The CUDA C source of a model compiled for ``cuda`` (for inspection and nvcc checks)."""
    return _tvm.cuda_source(cm._executable)


#: keys every library's metadata (``<library>.json``) holds
_META_KEYS = ("format", "target", "target_dict", "inputs", "outputs")


def check_library_file(path) -> None:
    """Refuse a file that is not a complete shared library (or a ``.tar`` of objects) before TVM
    maps it: a truncated ELF file would die of SIGBUS inside ``dlopen``. Checks the ELF header, and
    that the file holds every byte its section and program headers point at."""
    import struct
    import tarfile

    p = Path(path)
    size = p.stat().st_size
    if p.name.endswith(".tar"):
        if not tarfile.is_tarfile(p):
            raise InputError(f"library {str(p)!r} is not a .tar of object files: give the file "
                             "bncompile compile wrote")
        return
    fix = "give the .so that bncompile compile wrote (compile the model again if it was damaged)"
    with open(p, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            what = "is empty" if size == 0 else "is not a shared library (no ELF header)"
            raise InputError(f"library {str(p)!r} {what}: {fix}")
        cls, data = head[4], head[5]
        if cls not in (1, 2) or data not in (1, 2):
            raise InputError(f"library {str(p)!r} has a damaged ELF header: {fix}")
        end = "<" if data == 1 else ">"
        if cls == 2:
            e_type, = struct.unpack_from(end + "H", head, 16)
            phoff, shoff = struct.unpack_from(end + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 54)
            ph_fmt, ph_off, ph_size = end + "QQ", 8, 32   # p_offset, (p_vaddr) ... p_filesz at 32
        else:
            e_type, = struct.unpack_from(end + "H", head, 16)
            phoff, shoff = struct.unpack_from(end + "II", head, 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 42)
            ph_fmt, ph_off, ph_size = end + "I", 4, 16
        if e_type != 3:    # ET_DYN
            raise InputError(f"library {str(p)!r} is an ELF file but not a shared library: {fix}")
        need = max(phoff + phentsize * phnum, shoff + shentsize * shnum if shnum else 0)
        if need > size:
            raise InputError(f"library {str(p)!r} is truncated ({size} bytes, its headers need {need}): {fix}")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for k in range(phnum):
            entry = table[k * phentsize:(k + 1) * phentsize]
            offset, = struct.unpack_from(ph_fmt[:2], entry, ph_off)
            filesz, = struct.unpack_from(ph_fmt[:2], entry, ph_size)
            if offset + filesz > size:
                raise InputError(f"library {str(p)!r} is truncated ({size} bytes, a segment ends at "
                                 f"{offset + filesz}): {fix}")


def load(path) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export` (needs ``<path>.json`` beside it).

    Every file is checked before TVM sees it: the library is a complete shared object
    (:func:`check_library_file`), the metadata is complete, the defaults file is a readable .npz."""
    from bncompile._io import check_input_file

    p = check_input_file(path, "library")
    meta_path = Path(str(p) + ".json")
    if not meta_path.exists():
        raise InputError(f"library {str(p)!r} has no metadata file {meta_path.name!r} beside it: export it with "
                         "bncompile compile (which writes both)")
    check_library_file(p)
    fix = "compile the model again with bncompile compile, which writes both"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"metadata file {str(meta_path)!r} is not valid JSON ({err}): {fix}") from None
    if not isinstance(meta, dict):
        raise InputError(f"metadata file {str(meta_path)!r} is not a JSON object: {fix}")
    if meta.get("format") != FORMAT:
        raise InputError(f"metadata file {str(meta_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise InputError(f"metadata file {str(meta_path)!r} is incomplete (no {', '.join(missing)}): {fix}")
    ok = isinstance(meta["target_dict"], dict) and all(
        isinstance(meta[k], list) and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                          and isinstance(v.get("dtype"), str)
                                          and (v.get("shape") is None or isinstance(v.get("shape"), list))
                                          for v in meta[k])
        for k in ("inputs", "outputs"))
    if not ok:
        raise InputError(f"metadata file {str(meta_path)!r} is damaged (inputs, outputs or target_dict "
                         f"have the wrong form): {fix}")
    defaults = {}
    dpath = Path(str(p) + ".defaults.npz")
    if meta.get("defaults") and dpath.exists():
        try:
            with np.load(dpath, allow_pickle=False) as z:
                defaults = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - any unreadable npz is a bad input
            raise InputError(f"defaults file {str(dpath)!r} is not a readable .npz ({type(err).__name__}): "
                             f"{fix}") from None
    cm = CompiledModel(target=meta["target_dict"], target_name=str(meta["target"]), inputs=meta["inputs"],
                       outputs=meta["outputs"], defaults=defaults,
                       info={k: v for k, v in meta.items() if k in ("kernels", "seconds", "dim_multiples",
                                                                    "dim_broadcasts")},
                       path=str(p))
    return cm
