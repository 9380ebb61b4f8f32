"""Fault injection for the multi-process engines' tests: kill or stop a Worker process and check
that the engine names it, quickly, and refuses further work."""

import os
import signal
import time

import pytest


def assert_killed_process_is_named(engine, proc, match: str, down: str, steps: int = 40) -> None:
    """SIGKILL ``proc``: within 60 s of stepping, an error matching ``match``; then every step
    raises ``down``. (Well below the 300 s a silent rank is given, so the error comes from the dead
    connection, not a timeout; a 20 s bound failed once on a 2-core CI machine, with the right
    error.)"""
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=match):
        for _ in range(steps):
            engine.step()
    assert time.monotonic() - t0 < 60
    with pytest.raises(RuntimeError, match=down):
        engine.step()


def assert_stopped_process_times_out(engine, proc, match: str, steps: int = 40) -> None:
    """SIGSTOP ``proc``: within 15 s of stepping, an error matching ``match``, and the process is
    gone (it is resumed if the engine left it)."""
    os.kill(proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=match):
            for _ in range(steps):
                engine.step()
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
    assert time.monotonic() - t0 < 15
    proc.join(timeout=5)
    assert not proc.is_alive()
