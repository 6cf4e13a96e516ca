"""Signal handlers installed for the length of a ``with`` block and restored afterwards: the one place
the CLI (SIGTERM/SIGHUP unwind like Ctrl-C) and tuning (a signal stops after the batch) install theirs."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def installed(signals, handler):
    """Install ``handler`` for each of ``signals`` and yield ``{signal: previous handler}``; the previous
    handlers come back when the block ends. Outside the main thread (where Python cannot install
    handlers) and for signals the platform lacks, nothing is installed."""
    saved: dict = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            try:
                saved[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
    try:
        yield saved
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
