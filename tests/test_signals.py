"""bncompile._signals.installed: the one way the CLI and tuning install signal handlers."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from bncompile._signals import installed


def test_installed_for_the_block_then_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    got = []

    def handler(signum, frame):
        got.append(signum)

    with installed((signal.SIGTERM, signal.SIGHUP), handler) as previous:
        assert previous == before
        assert signal.getsignal(signal.SIGHUP) is handler
        os.kill(os.getpid(), signal.SIGHUP)
    assert got == [signal.SIGHUP]
    assert {s: signal.getsignal(s) for s in before} == before


def test_restored_when_the_block_raises():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), installed((signal.SIGTERM,), lambda *a: None):
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body():
        with installed((signal.SIGTERM,), lambda *a: None) as previous:
            seen["previous"] = previous
            seen["inside"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"previous": {}, "inside": before}


def test_cli_turns_sigterm_into_terminated_and_restores():
    from bncompile.cli import Terminated, _signals_unwind

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), _signals_unwind():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before
