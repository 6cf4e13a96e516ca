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
    """The public compile API (``bncompile.compile``, ``bncompile.load``); TVM is a hard dependency."""
    import bncompile

    return bncompile
