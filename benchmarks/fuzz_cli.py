"""Fuzz the CLI with mutated bytes of a shipped model: every run must exit 0, 1 or 2, print no
traceback, and finish within a timeout (issue 12).

    python benchmarks/fuzz_cli.py --count 200 [--seed 0] [--model models/cnn_nhwc.onnx] [--command fold]

Each case flips, inserts, deletes or overwrites a few bytes (seeded), writes the mutant to a
temporary folder and runs ``python -m bncompile COMMAND mutant.onnx`` in a subprocess. Prints one
line per failure and a summary; exits 1 when any case broke the promise. ``tests/cli/test_fuzz.py``
runs a few dozen of these cases.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "fold": lambda m, d: ["fold", m, "-o", str(Path(d) / "out.onnx"), "-q"],
    "inspect": lambda m, d: ["inspect", m],
    "inline": lambda m, d: ["inline", m, "-o", str(Path(d) / "out.onnx")],
}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A few seeded byte-level edits: flip bits, overwrite, insert, delete, truncate."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        kind = int(rng.integers(0, 5))
        pos = int(rng.integers(0, max(len(b), 1)))
        if kind == 0 and b:
            b[pos % len(b)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and b:
            n = int(rng.integers(1, 16))
            b[pos:pos + n] = rng.bytes(min(n, len(b) - pos))
        elif kind == 2:
            b[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
        elif kind == 3 and b:
            del b[pos:pos + int(rng.integers(1, 16))]
        elif kind == 4 and len(b) > 16:
            del b[int(rng.integers(len(b) // 2, len(b))):]
    return bytes(b)


def run_case(model: Path, command: str, seed: int, timeout: float = 120.0) -> str | None:
    """None when the case kept the promise, else what went wrong."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="bncompile-fuzz-") as d:
        mutant = Path(d) / "mutant.onnx"
        mutant.write_bytes(mutate(model.read_bytes(), rng))
        try:
            r = subprocess.run([sys.executable, "-m", "bncompile", *COMMANDS[command](str(mutant), d)],
                               capture_output=True, text=True, timeout=timeout, cwd=d)
        except subprocess.TimeoutExpired:
            return f"seed {seed}: no answer within {timeout:.0f} s"
        if r.returncode not in (0, 1, 2):
            return f"seed {seed}: exit {r.returncode}: {r.stderr.strip()[-300:]}"
        if "Traceback" in r.stderr or "Traceback" in r.stdout:
            return f"seed {seed}: traceback: {r.stderr.strip().splitlines()[-1]}"
        if r.returncode != 0 and r.stderr.count("\n") != 1:
            return f"seed {seed}: exit {r.returncode} with {r.stderr.count(chr(10))} stderr lines: {r.stderr[:300]!r}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=str(ROOT / "models" / "cnn_nhwc.onnx"))
    p.add_argument("--command", choices=sorted(COMMANDS), default="fold")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    seeds = range(args.seed, args.seed + args.count)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        failures = [f for f in pool.map(lambda s: run_case(Path(args.model), args.command, s), seeds) if f]
    for f in failures:
        print(f)
    print(f"{args.count} mutants of {Path(args.model).name} through bncompile {args.command}: "
          f"{len(failures)} broke the promise")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
