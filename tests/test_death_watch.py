"""DeathWatch: when one Worker process ends and the engine has not failed within the grace
period, the other processes are killed; once the engine has failed (or shut down), they are left
to it. Real processes (spawn), killed with SIGKILL."""

import multiprocessing as mp
import os
import signal
import time

from flashserve.distributed.executor import DeathWatch


def _sleepers(n):
    ctx = mp.get_context("spawn")
    procs = {r: ctx.Process(target=time.sleep, args=(60,), daemon=True) for r in range(1, n + 1)}
    for p in procs.values():
        p.start()
    return procs


def _wait_for(cond, limit_s):
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < limit_s:
        time.sleep(0.02)
    return cond()


def test_survivors_are_killed_after_the_grace_period():
    procs = _sleepers(3)
    try:
        watch = DeathWatch(procs, failed=lambda: False, grace_s=0.5)
        os.kill(procs[2].pid, signal.SIGKILL)
        assert _wait_for(lambda: not procs[1].is_alive() and not procs[3].is_alive(), 20)
        assert watch.first == 2
        assert procs[1].exitcode == -signal.SIGKILL and procs[3].exitcode == -signal.SIGKILL
    finally:
        for p in procs.values():
            p.kill()


def test_survivors_are_left_once_the_engine_has_failed():
    procs = _sleepers(2)
    try:
        watch = DeathWatch(procs, failed=lambda: True, grace_s=0.2)
        os.kill(procs[1].pid, signal.SIGKILL)
        assert _wait_for(lambda: watch.first == 1, 20)
        time.sleep(1.0)
        assert procs[2].is_alive()
    finally:
        for p in procs.values():
            p.kill()
