"""The one target parser: the names users write -> TVM 0.27 target dicts.

Targets, named plainly (``bncompile compile --target``, ``bncompile.compile(target=...)``,
``compile_batchnorm(target=...)``):

* ``llvm`` (also ``cpu``, ``host``): the host CPU, by LLVM's name for it (detected: TVM 0.27 builds
  ``mcpu="native"`` for generic); ``llvm:<cpu>`` (``llvm:haswell``): that CPU of the host's architecture (LLVM's name), e.g. to
  build AVX2 kernels on an AVX-512 host;
* ``x86_64`` (also ``x86-64``, ``amd64``): generic x86-64 Linux;
* ``aarch64`` (also ``arm64``): 64-bit ARM Linux with NEON (cross-compiled);
* ``cuda`` (also ``gpu``, ``nvidia``) or ``cuda:<arch>``: an NVIDIA GPU, :data:`DEFAULT_CUDA_ARCH` unless
  given (a bare ``"cuda"`` would make TVM fall back to sm_50);
* a TVM tag such as ``"nvidia/nvidia-h100"``;
* a dict (``kind`` or ``tag`` required; an llvm dict without ``mcpu``/``mtriple`` gets the host CPU, a
  cuda dict without ``arch`` gets :data:`DEFAULT_CUDA_ARCH`), or a ``tvm.target.Target``.

TVM 0.27 no longer parses flag strings such as ``"llvm -mcpu=x"``; they are refused with the fix.
"""

from __future__ import annotations

import platform
from typing import Any, Mapping

from bncompile.errors import UnsupportedError
from bncompile.lower import tvm as _tvm

DEFAULT_CUDA_ARCH = "sm_90"

#: Named targets (besides ``cuda:<arch>``, TVM tags and TVM target dicts).
TARGETS = {
    "llvm": "the host CPU (LLVM's name for it, detected)",
    "x86_64": "generic x86-64 Linux",
    "aarch64": "64-bit ARM Linux with NEON (cross-compiled; exported with aarch64-linux-gnu-g++)",
    "cuda": f"NVIDIA GPU, {DEFAULT_CUDA_ARCH} by default (cuda:sm_80 for another arch)",
}

_ALIASES = {"llvm": "llvm", "cpu": "llvm", "host": "llvm", "x86_64": "x86_64", "x86-64": "x86_64",
            "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "cuda": "cuda", "gpu": "cuda",
            "nvidia": "cuda"}


def resolve_target(target: Any = "llvm") -> tuple[str, dict]:
    """``(name, TVM target dict)`` for any target spec of the module docstring; UnsupportedError otherwise.

    The name is ``llvm``, ``x86_64``, ``aarch64`` or ``cuda`` for the named targets, the kind (or tag)
    for dicts and Target objects."""
    if isinstance(target, Mapping):
        d = dict(target)
        if "kind" not in d and "tag" not in d:
            raise UnsupportedError(f"target: a dict target needs a 'kind' key, got {d!r}")
        return str(d.get("kind", d.get("tag", "custom"))), _with_defaults(d)
    if not isinstance(target, str):
        kind = getattr(getattr(target, "kind", None), "name", None)
        if kind is None:
            raise UnsupportedError(f"target: expected a name such as 'llvm', a dict or a tvm Target, got {target!r}")
        return str(kind), dict(target.export())
    spec = target.strip()
    name, _, arch = spec.lower().partition(":")
    name = _ALIASES.get(name)
    if name == "cuda":
        arch = arch or DEFAULT_CUDA_ARCH
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise UnsupportedError(f"target: CUDA arch {arch!r} is not valid; use e.g. cuda:sm_80 or cuda:sm_90")
        return "cuda", {"kind": "cuda", "arch": arch}
    if name == "llvm" and arch:
        if not _tvm.tvm().target.codegen.llvm_is_valid_cpu(arch, f"{host_arch()}-linux-gnu"):
            raise UnsupportedError(f"target: LLVM does not know the CPU {arch!r}; use e.g. llvm:haswell or "
                                   "llvm:skylake-avx512")
        return "llvm", {"kind": "llvm", "mcpu": arch}
    if name is not None and not arch:
        if name == "llvm":
            return "llvm", _with_defaults({"kind": "llvm"})
        if name == "x86_64":
            return "x86_64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
        return "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if "/" in spec and " " not in spec:
        return spec, {"tag": spec}
    raise UnsupportedError(f"target: unknown target {target!r}; use one of {', '.join(TARGETS)} (or cuda:sm_80 "
                           "for another CUDA arch), a TVM tag or a dict such as {'kind': 'cuda', 'arch': 'sm_90'} "
                           "(TVM 0.27 no longer parses flag strings like 'llvm -mcpu=x')")


def target_dict(target: Any = "llvm") -> dict:
    """The TVM target dict of any target spec (see :func:`resolve_target`)."""
    return resolve_target(target)[1]


def _with_defaults(d: dict) -> dict:
    if d.get("kind") == "llvm" and "mcpu" not in d and "mtriple" not in d:
        d["mcpu"] = _tvm.host_cpu()
    if d.get("kind") == "cuda" and "arch" not in d:
        d["arch"] = DEFAULT_CUDA_ARCH
    return d


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def target_arch(tdict: Mapping) -> str | None:
    """The CPU architecture an llvm target dict builds for (``x86_64``, ``aarch64``), None for others."""
    if tdict.get("kind") != "llvm":
        return None
    triple = str(tdict.get("mtriple", "") or "")
    return triple.split("-")[0] if triple else host_arch()


def runnable_here(tdict: Mapping) -> str | None:
    """None when a library for ``tdict`` can run in this process, else the reason."""
    kind = tdict.get("kind")
    if kind == "llvm":
        arch = target_arch(tdict)
        if arch != host_arch():
            return (f"the library was compiled for {arch} and this host is {host_arch()}: run it on the "
                    "device with bncompile/lower/runner (see bncompile/lower/runner/README.md), or under qemu-user")
        return None
    if kind == "cuda":
        if not _tvm.cuda_available():
            return "the library was compiled for CUDA and no CUDA GPU is available here"
        return None
    return f"no runtime device for target {dict(tdict)!r}"


__all__ = ["DEFAULT_CUDA_ARCH", "TARGETS", "resolve_target", "target_dict", "host_arch", "target_arch",
           "runnable_here"]
