"""Kernels that read a border or a ragged tail at a clamped index stay inside their input buffers.

A depthwise conv, a grouped conv and the pools on the channel-blocked layout read their zero padding in
place, and batch norm's sample blocks read a ragged last block, each as a load at a clamped index blended
to the fill (:func:`bncompile.lower.kernels.masking.keep_where`). Written as a Select, TVM's simplifier
dropped the clamp under the Select's condition and MobileNetV2's 112x112 stride-2 depthwise conv read 3.6
KB before its input. Here every function of such a graph runs with each input placed right after, then
right before, a page that cannot be read (``mprotect``), in a process of its own (``helpers.guarded``), and
must give the unguarded result bit for bit; with the Select back, all six graph cases crash. Linux x86 with
AVX2 (the channel-blocked layout is compiled for haswell).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")


def _avx2_linux() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return any(line.startswith("flags") and " avx2" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


pytestmark = [pytest.mark.tvm, pytest.mark.skipif(not _avx2_linux(), reason="guard pages: Linux x86 with AVX2")]

TESTS = Path(__file__).resolve().parents[1]


def _run(case: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "helpers.guarded", case], capture_output=True, text=True,
                          env=env, cwd=TESTS, timeout=600)
    tail = (proc.stdout + proc.stderr)[-2000:]
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), f"exit {proc.returncode}: {tail}"


@pytest.mark.parametrize("case", ["edge_dw_3_1", "edge_dw_3_2", "edge_dw_5_2", "edge_grouped_3_2",
                                  "edge_maxpool_3_2", "edge_avgpool_3_1"])
def test_padding_read_in_place_stays_in_bounds(case):
    _run(case)


@pytest.mark.parametrize("case", ["bn_forward", "bn_backward", "bn_ghost_forward", "bn_ghost_backward",
                                  "bn_stripes_forward", "bn_ragged_lanes_forward", "bn_ragged_lanes_backward",
                                  "bn_ghost_ragged_lanes_forward"])
def test_batchnorm_ragged_sample_block_stays_in_bounds(case):
    _run(case)


@pytest.mark.parametrize("case", ["net:mobilenet_v2:64:host", "net:mobilenet_v3_large:64:host",
                                  "net:efficientnet_b0:64:host", "net:regnety_400mf:64:host",
                                  "net:shufflenet_v2:64:host", "net:resnet50:64:host", "net:densenet121:64:host",
                                  "net:mobilenet_v3_large:72:haswell", "net:shufflenet_v2:72:haswell"])
def test_edge_network_functions_stay_in_bounds(case):
    """Every function of the benchmark's edge networks (batch 1, small inputs), compiled for this host and,
    at an odd size, for AVX2 (with the Select back, both AVX2 builds crash; on an AVX-512 host its own
    builds did not)."""
    _run(case)
