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


class OutputError(InputError, OSError):
    """An output could not be written (a full disk, no permission): an ``OSError`` for callers of the
    API, one line naming the path and the fix for the CLI."""


class UnsupportedError(BncompileError):
    """Something valid that bncompile does not handle (an operator, a target)."""


class VerificationError(BncompileError):
    """A transformed model's numbers differ from the original beyond the tolerance."""

    exit_code = 1


#: errno -> the fix, for the OS errors a user can cause or cure
_OS_FIXES = {
    "ENOSPC": "free disk space or choose a folder on another disk",
    "EDQUOT": "free space within your disk quota or choose another folder",
    "EACCES": "check the permissions, or choose another path",
    "EPERM": "check the permissions, or choose another path",
    "EROFS": "the file system is read-only: choose a writable folder",
    "ENOENT": "check the path",
    "ENOTDIR": "check the path: a part of it is not a folder",
    "EISDIR": "give a file, not a folder",
    "ENAMETOOLONG": "choose a shorter path",
    "EMFILE": "close other programs' files or raise the limit (ulimit -n)",
    "ENOMEM": "free memory or use smaller inputs",
    "EIO": "the disk reported an I/O error: check it, or choose another folder",
    "EFBIG": "the file is too large for this file system: choose another folder",
}

#: phrases in a tool's message (g++, ld, TVM) that name an OS problem, and the errno they mean
_OS_PHRASES = {"no space left on device": "ENOSPC", "disk quota exceeded": "EDQUOT",
               "permission denied": "EACCES", "read-only file system": "EROFS",
               "cannot allocate memory": "ENOMEM", "file too large": "EFBIG"}


def os_error_message(err: OSError, *, path=None, what: str = "file", flag: str | None = None) -> str:
    """One line for an OS error: what failed, on which path, and the fix (by errno)."""
    import errno as _errno

    name = _errno.errorcode.get(err.errno or 0, "")
    where = err.filename if err.filename is not None else path
    where = f" {str(where)!r}" if where is not None and not str(where).startswith("/proc/self/fd/") else (
        f" {str(path)!r}" if path is not None else "")
    fix = _OS_FIXES.get(name, "check the path and the disk")
    if flag and name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EFBIG"):
        fix += f" (another {flag})"
    return f"cannot write {what}{where}: {err.strerror or name or err}: {fix}"


def os_problem_in(text: str) -> str | None:
    """The fix for an OS problem a tool's output names (``No space left on device``...), else None."""
    low = text.lower()
    for phrase, name in _OS_PHRASES.items():
        if phrase in low:
            return f"{phrase}: {_OS_FIXES[name]}"
    return None


def first_line(err: BaseException, limit: int = 300) -> str:
    """The most telling line of an exception's message (the last ``...Error: ...`` line of a
    multi-line TVM / onnxruntime message, else its first line), cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    tagged = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith(("Check failed", "error:"))]
    line = tagged[-1] if tagged else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."
