"""Command-line entry point: ``bncompile <command> ...``.

One module per subcommand (``bncompile/cli/<name>.py``), each with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
their command runs, so ``bncompile fold`` never pays TVM's import time.
Exit codes: 0 ok, 1 verification failed, 2 bad usage or bad input.

The one path every command goes through (:func:`main`):

1. argparse with the shared value types of :mod:`bncompile.cli._args` (a bad value: exit 2, one line);
2. ``files(args)`` of the command: every file it reads and writes (:class:`bncompile._io.Files`;
   a model's external data files and a library's sidecars included), checked together by
   :func:`bncompile._io.check_files` before any work: an output that is an input, an input's data
   file or another output (or a link to one) is refused;
3. ``run(args)``, whose outputs are written through :func:`bncompile._io.atomic_output` /
   :func:`bncompile._io.atomic_output_dir` (nothing left behind on failure, signal or SIGKILL);
4. SIGTERM/SIGHUP unwind like Ctrl-C (temporaries removed); native libraries' stderr (TVM's log
   lines, g++) is kept off the terminal (replayed with ``-v``);
5. every exception becomes one line naming the problem and the fix (:func:`describe`): exit 2, or 1
   for a failed verification; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import tempfile
import warnings

from bncompile._io import check_files
from bncompile._version import __version__
from bncompile.errors import BncompileError, first_line, os_error_message, os_problem_in

#: name -> one-line help; the module bncompile.cli.<name> implements it.
COMMANDS = {
    "build": "build an ONNX BatchNormalization model from Keras layer arguments",
    "fold": "fold inference BatchNormalization into the layer before it",
    "inspect": "list the BatchNormalization nodes of a model and what fold would do",
    "inline": "inline bncompile's custom ops into standard ONNX ops",
    "compile": "compile an ONNX model into a TVM library",
    "tune": "tune a model's compiled functions with MetaSchedule into a database for compile --db",
    "run": "run a compiled library on inputs from .npy files",
    "bench": "compare runtimes against onnxruntime",
    "runner": "build the C++ runner (no Python needed) into a folder",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind like KeyboardInterrupt so every temporary is removed."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bncompile", description="Batch normalization meets ONNX and TVM.")
    parser.add_argument("--version", action="version", version=f"bncompile {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_ in COMMANDS.items():
        module = importlib.import_module(f"bncompile.cli.{name}")
        p = sub.add_parser(name, help=help_, description=getattr(module, "DESCRIPTION", help_))
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log details and show tracebacks")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:      # a bad argument (one line printed), --help, --version
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        print(f"bncompile: error: name a command ({', '.join(COMMANDS)}); "
              "see 'bncompile --help'", file=sys.stderr)
        return 2
    with _signals_unwind(), _native_stderr(replay=args.verbose), warnings.catch_warnings():
        if not args.verbose:    # a library's warning about a bad model would be a line beside the error
            warnings.simplefilter("ignore")
        _logging(args.verbose)
        try:
            files = getattr(args._module, "files", None)
            if files is not None:
                check_files(files(args))
            return int(args._module.run(args) or 0)
        except BncompileError as err:
            if args.verbose:
                raise
            _error(args, str(err))
            return err.exit_code
        except KeyboardInterrupt:
            print("bncompile: interrupted", file=sys.stderr)
            return 130
        except Terminated:
            print("bncompile: terminated", file=sys.stderr)
            return 143
        except Exception as err:  # noqa: BLE001 - the promise: one line, never a traceback
            if args.verbose:
                raise
            _error(args, describe(err))
            return 2


#: libraries whose log warnings are shown with -v only
_QUIET_LOGGERS = ("onnx_ir", "onnxscript", "tvm", "matplotlib")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it changes while a command runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _QUIET_LOGGERS:   # their warnings about a bad model would be lines beside the error
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


def _error(args, message: str) -> None:
    message = " ".join(message.split("\n"))
    print(f"bncompile {args.command}: error: {message}", file=sys.stderr)


def describe(err: BaseException) -> str:
    """One line for an exception no bncompile check caught: an OS error with its fix, out of memory,
    or a library's (onnx, onnxruntime, NumPy, TVM, the toolchain) first telling line."""
    if isinstance(err, OSError) and err.errno:
        return os_error_message(err, what="file")
    if isinstance(err, MemoryError):
        return ("out of memory (" + (first_line(err) if str(err) else "MemoryError")
                + "): use smaller inputs (--input-shape, --batch) or free memory")
    line = first_line(err)
    fix = os_problem_in(str(err))
    if fix:
        return f"{type(err).__name__}: {fix}"
    return (f"{type(err).__name__}: {line}: the input is likely malformed; check it, or re-run with -v "
            "for the traceback and report it")


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (SIGINT already raises
    KeyboardInterrupt), so outputs' temporaries are removed; restored afterwards."""
    from bncompile._signals import installed

    def handler(signum, frame):
        raise Terminated(signum)

    with installed((signal.SIGTERM, signal.SIGHUP), handler):
        yield


@contextlib.contextmanager
def _native_stderr(*, replay: bool):
    """Keep native libraries' log lines (TVM's ``block_builder.cc:67: Warning: ...``, g++) off the
    terminal: file descriptor 2 goes to an unnamed temporary while the command runs, Python's
    ``sys.stderr`` keeps writing to the real one. With ``-v`` the captured lines are replayed."""
    try:
        real_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real_fd2 = False
    try:
        saved = os.dup(2)
        capture = tempfile.TemporaryFile()
    except OSError:
        yield
        return
    old_stderr = sys.stderr
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    if real_fd2:
        sys.stderr = io.TextIOWrapper(io.FileIO(saved, "w", closefd=False), encoding=old_stderr.encoding,
                                      errors="backslashreplace", line_buffering=True)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        if real_fd2:
            sys.stderr = old_stderr
        os.close(saved)
        if replay:
            capture.seek(0)
            data = capture.read()
            if data:
                sys.stderr.write(data.decode(errors="replace"))
        capture.close()
