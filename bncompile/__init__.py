"""bncompile: batch normalization meets ONNX and TVM.

The public API is imported lazily so that ``import bncompile`` stays cheap and
never imports TVM.
"""

from __future__ import annotations

import importlib

from bncompile._version import __version__
from bncompile.errors import (BncompileError, ConfigError, InputError, UnsupportedError,
                              VerificationError)

#: public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "BatchNormConfig": ("bncompile.config", "BatchNormConfig"),
    "RandomAdjustment": ("bncompile.config", "RandomAdjustment"),
    "build_model": ("bncompile.builder", "build_model"),
    "reference": ("bncompile.reference", None),
    "custom_ops": ("bncompile.custom_ops", None),
    "fold": ("bncompile.folding", "fold"),
    "FoldResult": ("bncompile.folding", "FoldResult"),
    "inline": ("bncompile.inlining", "inline"),
    "compile": ("bncompile.lower.driver", "compile"),
    "load": ("bncompile.lower.runtime", "load"),
    "CompiledModel": ("bncompile.lower.runtime", "CompiledModel"),
    "kernels": ("bncompile.kernels", None),
}

__all__ = ["__version__", "BncompileError", "ConfigError", "InputError", "UnsupportedError",
           "VerificationError", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'bncompile' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
