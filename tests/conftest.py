"""Fixtures and tier markers; the shared helper functions live in ``tests/helpers/``."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import has_gpu


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def compiler():
    """``bncompile.compiler``, or a skip where TVM 0.27 (with tvm-ffi 0.1.14) is not importable."""
    from bncompile import _tvm

    if not _tvm.available():
        pytest.skip("TVM 0.27 with tvm-ffi 0.1.14 is not installed")
    from bncompile import compiler as c

    return c
