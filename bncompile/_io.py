"""Safe file handling shared by every command.

Outputs are written to a temporary file in the destination folder and renamed
into place, so a failure never leaves a half-written file; inputs are checked
with messages that name the path and the fix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from bncompile.errors import InputError


def check_input_file(path, what: str = "model") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {str(p)!r} does not exist: check the path")
    if p.is_dir():
        raise InputError(f"{what} path {str(p)!r} is a directory: give a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} file {str(p)!r} is not readable: check its permissions")
    return p


def check_output_path(path, *, what: str = "output", flag: str = "-o") -> Path:
    """Check that ``path`` can be written (its folder exists and is writable, it is not a folder);
    ``flag`` is the option the user gave it with, named in the fix."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{what} path {str(p)!r} is a directory: give a file name to {flag}")
    if not parent.is_dir():
        raise InputError(f"{what} folder {str(parent)!r} does not exist: create it or choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} folder {str(parent)!r} is not writable: choose another {flag}")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{what} {str(p)!r} exists and is not writable: choose another {flag}")
    return p


@contextlib.contextmanager
def atomic_output(path, *, what: str = "output", flag: str = "-o"):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success only."""
    p = check_output_path(path, what=what, flag=flag)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    except OSError as err:
        raise InputError(f"{what} folder {str(p.parent)!r} is not writable ({err.strerror}); "
                         f"choose another {flag}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
