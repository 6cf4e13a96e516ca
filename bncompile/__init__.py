"""bncompile: batch normalization meets ONNX and TVM.

The public API is imported lazily so that ``import bncompile`` stays cheap and
never imports TVM.
"""

from __future__ import annotations

import importlib

from bncompile._version import __version__
from bncompile.errors import (BncompileError, ConfigError, InputError, UnsupportedError,
                              VerificationError)

_LAZY = {
    "BatchNormConfig": "bncompile.config",
    "build_model": "bncompile.builder",
    "reference": "bncompile.reference",
    "fold": "bncompile.fold",
    "FoldResult": "bncompile.fold",
    "inline": "bncompile.inline",
    "compile": "bncompile.compiler",
    "load": "bncompile.compiler",
    "CompiledModel": "bncompile.compiler",
    "kernels": "bncompile.kernels",
}

__all__ = ["__version__", "BncompileError", "ConfigError", "InputError", "UnsupportedError",
           "VerificationError", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bncompile' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value
