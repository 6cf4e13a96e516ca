"""Safe file handling shared by every command: the one path for inputs, outputs and their checks.

* :func:`check_input_file` / :func:`check_output_path`: a path is usable (exists, readable, a file; the
  output's folder exists and is writable), with messages that name the path and the fix.
* :class:`Files` and :func:`check_files`: every input and output of one command run (a model's
  external data files and a library's sidecars included). An output that is an input, an input's
  external data file, another output of the same run, or a link to any of them is refused.
* :func:`atomic_output`: write one file through an unnamed ``O_TMPFILE`` in the output's folder,
  linked into place only on success. Nothing is left behind on failure, on a signal, or on SIGKILL.
* :func:`atomic_output_dir`: for outputs written as several files (a model and its external data, a
  library written by a linker), a hidden folder ``.NAME.bncompile-<pid>.tmp`` in the output's folder
  whose files are moved into place on success and which is removed on failure or signal; after a
  SIGKILL, the next run writing the same output removes it (:func:`clean_stale`, when its pid is dead),
  or, when the kill came while complete files were being moved into place, finishes the move.

Outputs get the mode ``0666 & ~umask`` (a linker's executable output ``0777 & ~umask``), like any file
a user creates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
from pathlib import Path

from bncompile.errors import InputError, OutputError, os_error_message

#: suffix of the fallback temporaries (files and folders) in an output's folder
TMP_TAG = ".bncompile-"
TMP_SUFFIX = ".tmp"
#: written in a multi-file output's hidden folder once every file is complete: a run killed while
#: moving them is finished by the next run (so the folder never keeps a new data file beside an old model)
COMMIT_MARK = ".complete"


# --------------------------------------------------------------------------- single paths

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
    parent = _folder(p)
    if p.is_dir():
        raise InputError(f"{what} path {str(p)!r} is a directory: give a file name to {flag}")
    if not parent.is_dir():
        raise InputError(f"{what} folder {str(parent)!r} does not exist: create it or choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} folder {str(parent)!r} is not writable: choose another {flag}")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{what} {str(p)!r} exists and is not writable: choose another {flag}")
    return p


def _folder(p: Path) -> Path:
    return p.parent if str(p.parent) else Path(".")


# --------------------------------------------------------------------------- one run's files

@dataclasses.dataclass(frozen=True)
class Input:
    """A file a command reads: ``what`` names it in messages (``"model"``, ``"--keras-config"``)."""

    path: Path
    what: str
    #: the output may replace it (``--in-place``)
    replaceable: bool = False


@dataclasses.dataclass(frozen=True)
class Output:
    """A file a command may write; ``flag`` is the option that chooses it (named in the fix)."""

    path: Path
    what: str
    flag: str = "-o"


@dataclasses.dataclass
class Files:
    """Every input and output of one command run (see :func:`check_files`)."""

    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)

    def read(self, path, what: str, *, replaceable: bool = False) -> "Files":
        if path is not None:
            self.inputs.append(Input(Path(path), what, replaceable))
        return self

    def write(self, path, what: str, flag: str = "-o") -> "Files":
        if path is not None:
            self.outputs.append(Output(Path(path), what, flag))
        return self


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same file: the same real path, or (both existing) the same inode."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_files(files: Files) -> None:
    """Refuse, before any work, an output that would overwrite an input (or an input's external data,
    or a library's sidecar), two outputs of the same run that are one file, and unusable outputs.
    Links count: a symbolic or hard link to an input is that input."""
    for o in files.outputs:
        check_output_path(o.path, what=o.what, flag=o.flag)
        for i in files.inputs:
            if not i.replaceable and _same(o.path, i.path):
                same = "is" if os.path.realpath(o.path) == str(o.path.absolute()) else "leads to"
                raise InputError(f"{o.flag}: the {o.what} {str(o.path)!r} {same} the {i.what} "
                                 f"{str(i.path)!r}, which this command reads: choose another {o.flag}")
    for k, a in enumerate(files.outputs):
        for b in files.outputs[k + 1:]:
            if _same(a.path, b.path):
                if a.flag == b.flag:
                    raise InputError(f"{a.flag} {str(a.path)!r}: the {b.what} would be written to the same "
                                     f"file as the {a.what}: choose another {a.flag}")
                raise InputError(f"{a.flag} and {b.flag} name the same file {str(b.path)!r} (the {a.what} "
                                 f"and the {b.what}): give two different paths")


# --------------------------------------------------------------------------- writing

def _tmp_name(p: Path) -> str:
    return f".{p.name}{TMP_TAG}{os.getpid()}{TMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path) -> None:
    """Remove the fallback temporaries ``.NAME.bncompile-<pid>.tmp`` beside ``path`` that a killed run
    left (its pid is dead); another live run's are kept."""
    p = Path(path)
    folder = _folder(p)
    prefix = f".{p.name}{TMP_TAG}"
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        tmp = folder / name
        if (tmp / COMMIT_MARK).is_file():     # killed while moving a complete output: finish the move
            with contextlib.suppress(OSError):
                _move_out(tmp, p)
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _move_out(tmp: Path, p: Path) -> None:
    """Move the files of a hidden output folder beside ``p``: companions first, ``p`` itself last."""
    names = sorted((n for n in os.listdir(tmp) if n != COMMIT_MARK), key=lambda n: n == p.name)
    for name in names:
        os.replace(tmp / name, _folder(p) / name)


def _write_error(err: OSError, p: Path, what: str, flag: str) -> OutputError:
    if isinstance(err, OutputError):
        return err
    out = OutputError(os_error_message(err, path=p, what=what, flag=flag))
    out.errno = err.errno
    return out


def _folder_error(err: OSError, folder: Path, what: str, flag: str) -> OutputError:
    out = OutputError(f"{what} folder {str(folder)!r} is not writable ({err.strerror or err}): "
                      f"choose another {flag}")
    out.errno = err.errno
    return out


def _link_into_place(src: str, p: Path) -> None:
    """Give the unnamed file ``/proc/self/fd/N`` the name ``p`` (replacing it atomically)."""
    folder = _folder(p)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:    # no file there yet: one atomic link
            os.link(src, p.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        tmp = _tmp_name(p)   # a name the next run cleans if we are killed between link and rename
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.link(src, tmp, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
        try:
            os.replace(tmp, p.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


@contextlib.contextmanager
def atomic_output(path, *, what: str = "output", flag: str = "-o"):
    """Yield a path to write the whole of ``path`` to; it becomes ``path`` only when the block succeeds.

    The path is an unnamed file in the output's folder (``O_TMPFILE``, seen as ``/proc/self/fd/N``):
    a failure, a signal or SIGKILL leaves nothing. Where the file system has no ``O_TMPFILE``, a named
    hidden temporary ``.NAME.bncompile-<pid>.tmp`` is used, removed on failure and by the next run.
    """
    p = check_output_path(path, what=what, flag=flag)
    clean_stale(p)
    folder = _folder(p)
    fd = None
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            raise _folder_error(err, folder, what, flag) from None
    if fd is not None:
        try:
            yield Path(f"/proc/self/fd/{fd}")
            _link_into_place(f"/proc/self/fd/{fd}", p)
        except OSError as err:
            raise _write_error(err, p, what, flag) from None
        finally:
            os.close(fd)
        return
    tmp = folder / _tmp_name(p)
    try:
        with open(tmp, "wb"):
            pass
    except OSError as err:
        raise _folder_error(err, folder, what, flag) from None
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as err:
        raise _write_error(err, p, what, flag) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_output_dir(path, *, what: str = "output", flag: str = "-o"):
    """Yield a hidden folder in ``path``'s folder; write ``path``'s file and its companions there
    under their final names. On success each companion is moved beside ``path``, then ``path``'s
    own file last; on failure or signal the folder is removed (after SIGKILL, by the next run)."""
    p = check_output_path(path, what=what, flag=flag)
    clean_stale(p)
    tmp = _folder(p) / _tmp_name(p)
    _remove(tmp)
    try:
        os.mkdir(tmp, 0o700)
    except OSError as err:
        raise _folder_error(err, _folder(p), what, flag) from None
    try:
        yield tmp
        (tmp / COMMIT_MARK).touch()
        _move_out(tmp, p)
    except OSError as err:
        raise _write_error(err, p, what, flag) from None
    finally:
        _remove(tmp)
