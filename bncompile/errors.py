"""Error hierarchy: every error a user can cause is a ``BncompileError``.

The CLI prints ``str(err)`` as one line on stderr and exits with ``err.exit_code``
(2 for bad usage or bad input, 1 for a failed verification). Messages name the
problem (the argument, node, file or value) and the fix.
"""

from __future__ import annotations


class BncompileError(Exception):
    """Base class of the errors bncompile reports to users."""

    exit_code = 2


class ConfigError(BncompileError, ValueError):
    """An invalid BatchNormConfig (one Keras would refuse), naming the argument."""


class InputError(BncompileError):
    """A bad input file, path, shape or model."""


class UnsupportedError(BncompileError):
    """Something valid that bncompile does not handle (an operator, a target)."""


class VerificationError(BncompileError):
    """A transformed model's numbers differ from the original beyond the tolerance."""

    exit_code = 1
