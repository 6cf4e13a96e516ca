"""What a CPU schedule may know of the machine: the target's vector width and the host's cache sizes.

The CPU rules derive every blocking constant from a :class:`CpuMachine` instead of assuming one CPU:

* ``lanes``: float32 lanes of one vector register of the *target* (its ``mcpu``/``mattr`` features, as
  LLVM knows them: AVX-512F 16, AVX/AVX2 8, SSE/NEON 4). A target built for another CPU (``mcpu=haswell``
  on an AVX-512 host) gets that CPU's width.
* ``l1d``, ``l2``, ``l3``: bytes of data cache one thread can count on, from the OS
  (``/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size,shared_cpu_list}``: a cache shared by
  k CPUs counts ``size / k`` per thread for L1/L2; L3 is the whole), else :data:`DEFAULT_CACHES` (a
  small, safe machine: 32 KB L1d, 256 KB L2, 8 MB L3). ``BNCOMPILE_CPU_CACHES="l1d=32K,l2=512K,l3=32M"``
  overrides them (to build for, or to emulate, another machine; tests pin a machine this way or by
  passing one to :func:`bncompile.lower.kernels.schedules.schedule`).

The caches describe the host the kernel is compiled on (bncompile compiles where it runs, or is told by
the variable); a cross-compiled target (``mtriple`` of another architecture) gets the defaults unless the variable is set.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from bncompile.lower import tvm as _tvm

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
ENV_CACHES = "BNCOMPILE_CPU_CACHES"
DEFAULT_CACHES = {"l1d": 32 << 10, "l2": 256 << 10, "l3": 8 << 20}
DEFAULT_LANES = 4          # a target whose features LLVM cannot tell: 128-bit vectors (SSE2, NEON)


@dataclass(frozen=True)
class CpuMachine:
    """The facts a CPU schedule derives its constants from (hashable: part of the compile cache key)."""

    lanes: int = DEFAULT_LANES
    l1d: int = DEFAULT_CACHES["l1d"]
    l2: int = DEFAULT_CACHES["l2"]
    l3: int = DEFAULT_CACHES["l3"]
    source: str = "default"    # where the cache sizes came from: sysfs, env or default

    def describe(self) -> str:
        return (f"{self.lanes} x f32 vectors, L1d {_fmt(self.l1d)}, L2 {_fmt(self.l2)}, "
                f"L3 {_fmt(self.l3)} ({self.source})")


def _fmt(n: int) -> str:
    return f"{n >> 20} MB" if n >= (1 << 20) and n % (1 << 20) == 0 else f"{n >> 10} KB"


def parse_size(text: str) -> int:
    """``"32K"``, ``"1024K"``, ``"1M"``, ``"524288"`` -> bytes; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a cache size: {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _cpu_count(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return max(n, 1)


def sysfs_caches(root: Path = SYSFS_CACHE) -> dict[str, int]:
    """Per-thread data-cache bytes by level from the OS (``{}`` when it does not tell)."""
    out: dict[str, int] = {}
    try:
        dirs = sorted(root.glob("index*"))
    except OSError:
        return out
    for d in dirs:
        try:
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
            size = parse_size((d / "size").read_text())
            share = d / "shared_cpu_list"
            sharers = _cpu_count(share.read_text()) if share.exists() else 1
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level not in (1, 2, 3):
            continue
        key = {1: "l1d", 2: "l2", 3: "l3"}[level]
        out[key] = size if level == 3 else size // sharers
    return out


def env_caches(text: str | None = None) -> dict[str, int]:
    """The :data:`ENV_CACHES` override (``l1d=32K,l2=512K,l3=32M``; any subset)."""
    text = os.environ.get(ENV_CACHES, "") if text is None else text
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        key = key.strip().lower()
        if key not in DEFAULT_CACHES:
            raise ValueError(f"{ENV_CACHES}: unknown cache {key!r} in {text!r}; use l1d, l2 and l3")
        out[key] = parse_size(val)
    return out


@functools.lru_cache(maxsize=None)
def _host_caches(env: str) -> tuple[dict, str]:
    if env:
        found, source = env_caches(env), "env"
    else:
        found, source = sysfs_caches(), "sysfs"
    if not found:
        source = "default"
    caches = {**DEFAULT_CACHES, **found}
    return caches, source


def target_lanes(tdict: Mapping) -> int:
    """float32 lanes of one vector register of an llvm target (its mcpu/mattr features)."""
    tvm = _tvm.tvm()
    try:
        t = _tvm.make_target(tdict)
        has = lambda f: bool(tvm.target.codegen.target_has_features(f, t))  # noqa: E731
        triple = str(tdict.get("mtriple", "") or "")
        if triple.startswith(("aarch64", "arm")):
            return 4
        if has("avx512f"):
            return 16
        if has("avx"):
            return 8
        if has("sse2"):
            return 4
    except Exception:  # pragma: no cover - an LLVM that does not know the features
        pass
    return DEFAULT_LANES


def cpu_machine(target: Mapping | None = None) -> CpuMachine:
    """The :class:`CpuMachine` of an llvm target dict built on this host (the host CPU when None)."""
    tdict = dict(target) if target is not None else _tvm.host_target()
    env = os.environ.get(ENV_CACHES, "")
    from bncompile.lower import targets

    if not env and targets.target_arch(tdict) != targets.host_arch():
        caches, source = dict(DEFAULT_CACHES), "default"
    else:
        caches, source = _host_caches(env)
    return CpuMachine(lanes=target_lanes(tdict), l1d=caches["l1d"], l2=caches["l2"], l3=caches["l3"], source=source)


__all__ = ["CpuMachine", "DEFAULT_CACHES", "ENV_CACHES", "cpu_machine", "env_caches", "parse_size",
           "sysfs_caches", "target_lanes"]
