"""Let ``bncompile.fold(...)`` and ``bncompile.inline(...)`` be calls although ``bncompile.fold`` and
``bncompile.inline`` are also submodules: importing a submodule sets the package attribute to the
module, so the module itself is made callable, forwarding to its function of the same name."""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = _CallableModule
