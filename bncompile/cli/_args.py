"""Argument types shared by the commands: a bad value is refused by argparse itself (exit 2, one line
``bncompile CMD: error: argument --seed: ...``) before any work."""

from __future__ import annotations

import argparse
import math

#: NumPy seeds are non-negative; 2**63 keeps them in an int64 for reports and JSON
MAX_SEED = 2**63 - 1


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def seed(text: str) -> int:
    value = _int(text, "--seed")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not a seed: give an integer from 0 to 2**63-1, e.g. --seed 0")
    return value


def tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a tolerance: give a finite number >= 0, e.g. 1e-4")
    return value


def count(minimum: int, maximum: int = 10**6, what: str = "a count"):
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        value = _int(text, what)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value}: give {what} from {minimum} to {maximum}")
        return value
    parse.__name__ = what
    return parse
