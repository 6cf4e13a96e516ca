"""``bncompile tune model.onnx --trials 64 --db tuned/``: MetaSchedule tuning into a database for ``compile --db``."""

from __future__ import annotations

import sys
from pathlib import Path

from bncompile._io import Files
from bncompile.cli import _args
from bncompile.errors import InputError

DESCRIPTION = (
    "Tune the model's compiled functions with TVM's MetaSchedule and keep the results in a tuning database "
    "folder (MetaSchedule's JSON database; created, or added to); `bncompile compile --db DIR` applies it, "
    "and functions it lacks keep bncompile's hand schedules. The tasks are the functions `bncompile compile` "
    "builds (after folding and fusion; bncompile's BN kernels excluded); each one's hand schedule is measured "
    "first, so the database never prefers a slower schedule. Ctrl-C or --time-budget stops it with "
    "everything measured so far kept. Measure on a remote board with TVM's RPC tracker (--rpc-tracker, "
    "--rpc-key). Exit 0 ok (130 interrupted), 2 bad input.")


def add_arguments(p) -> None:
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--trials", type=_args.count(1, what="a number of trials"), required=True,
                   help="measured candidates in all (MetaSchedule's max_trials_global)")
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database folder (created, or added to)")
    p.add_argument("--target", default="llvm", help="llvm (default, this CPU), x86_64 or aarch64")
    p.add_argument("--time-budget", type=_positive_seconds, metavar="SECONDS",
                   help="stop after this many seconds (after the batch of candidates being measured)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="static shape of an input (repeatable); tuning needs static shapes to measure")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="do not fold inference BatchNormalization (tune what compile --no-fold builds)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a board through TVM's RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the board's RPC server registered with")
    p.add_argument("--trials-per-iter", type=_args.count(1, what="a batch size"), default=16,
                   help="candidates measured per batch (default 16)")
    p.add_argument("--num-cores", type=_args.count(1, 4096, what="a core count"),
                   help="cores of the board the code runs on (default: this machine's)")
    p.add_argument("--all-functions", action="store_true",
                   help="tune element-wise and layout functions too (by default only those with a reduction)")
    p.add_argument("--population", type=_args.count(2, 100000, what="a population size"), default=512,
                   help="evolutionary search population (default 512; smaller: quicker batches, coarser search)")
    p.add_argument("--seed", type=_args.seed, help="seed of the search (default: random)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _positive_seconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number of seconds, e.g. 600")
    return value


def files(args) -> Files:
    """The model and its external data (read); the database folder's two files (written: appended to)."""
    from bncompile import onnx_utils
    from bncompile.lower.tuning import DB_FILES

    f = Files()
    for k, p in enumerate(onnx_utils.model_files(args.model)):
        f.read(p, "model" if k == 0 else "model's external data file")
    db = Path(args.db)
    if db.exists() and not db.is_dir():
        raise InputError(f"--db {args.db!r} is a file: give a folder (created when missing)")
    if db.is_dir():
        for name in DB_FILES:
            f.write(db / name, "tuning database file", flag="--db")
    else:
        f.write(db, "tuning database folder", flag="--db")
    return f


def run(args) -> int:
    from bncompile import onnx_utils
    from bncompile._io import check_input_file
    from bncompile.lower import tuning

    src = check_input_file(args.model, "model")
    if args.rpc_tracker is not None:
        tuning.parse_tracker(args.rpc_tracker)
        if not args.rpc_key:
            raise InputError("--rpc-tracker needs --rpc-key (the key the board's RPC server registered with)")
    elif args.rpc_key is not None:
        raise InputError("--rpc-key applies with --rpc-tracker HOST:PORT only")
    shapes = onnx_utils.parse_input_shapes(args.input_shape, dynamic=True, named=True)
    try:
        result = tuning.tune(str(src), args.db, trials=args.trials, target=args.target,
                             input_shapes=shapes or None, fold=args.fold, time_budget=args.time_budget,
                             rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                             trials_per_iter=args.trials_per_iter, num_cores=args.num_cores, seed=args.seed,
                             all_functions=args.all_functions, progress=args.progress,
                             population=args.population)
    except KeyboardInterrupt as err:
        result = getattr(err, "result", None)
        kept = f"{result.trials} trial(s) measured are kept in {args.db}" if result else f"{args.db} is kept"
        print(f"bncompile tune: interrupted; {kept}", file=sys.stderr)
        return 130
    if not result.tasks:
        print(f"{src.name}: nothing to tune (no function with a reduction outside bncompile's kernels)")
        return 0
    print(f"tuned {src.name}: {result.summary()}")
    return 0
