"""Command-line entry point: ``bncompile <command> ...``.

One module per subcommand (``bncompile/cli/<name>.py``), each with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
their command runs, so ``bncompile fold`` never pays TVM's import time.
Exit codes: 0 ok, 1 verification failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bncompile._version import __version__
from bncompile.errors import BncompileError

#: name -> one-line help; the module bncompile.cli.<name> implements it.
COMMANDS = {
    "build": "build an ONNX BatchNormalization model from Keras layer arguments",
    "fold": "fold inference BatchNormalization into the layer before it",
    "inspect": "list the BatchNormalization nodes of a model and what fold would do",
    "inline": "inline bncompile's custom ops into standard ONNX ops",
    "compile": "compile an ONNX model into a TVM library",
    "run": "run a compiled library on inputs from .npy files",
    "bench": "compare runtimes against onnxruntime",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    args = parser.parse_args(argv)
    if args.command is None:
        print(f"bncompile: error: name a command ({', '.join(COMMANDS)}); "
              "see 'bncompile --help'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._module.run(args) or 0)
    except BncompileError as err:
        if args.verbose:
            raise
        print(f"bncompile {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bncompile: interrupted", file=sys.stderr)
        return 130
