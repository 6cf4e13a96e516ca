"""Checks on the CUDA source TVM generates for a schedule (no GPU needed)."""

from __future__ import annotations

import re

_PARAM_SHARED = re.compile(r"__global__[^{]*\b\w+_shared_ptr\b")
_IN_PLACE = re.compile(r"(\w+)\[([^\]]+)\] = .*\b\1\[\2\]")


def check_cuda_source(src: str) -> None:
    """A buffer in shared memory is never a kernel parameter (it would cross kernels), and no statement
    updates a ``__shared__`` buffer in place (``r = inv * r``): the CUDA rules let every thread of a
    block compute the per-channel scalars, so an in-place update would read what another thread had
    already updated (seen on an H200 before storage rewrite was turned off for CUDA builds)."""
    assert not _PARAM_SHARED.search(src), "a shared buffer crosses kernels"
    # the schedules' own shared buffers (set_scope names them <buffer>_shared); TVM's cross-thread
    # reduction temporaries (red_buf*) synchronize themselves
    shared = {n for n in re.findall(r"__shared__[^;]*?\b(\w+)\[", src) if n.endswith("_shared_ptr")}
    for line in src.splitlines():
        m = _IN_PLACE.search(line)
        assert not (m and m.group(1) in shared), f"in-place update of a shared buffer: {line.strip()[:160]}"
