"""``freeze_startup_heap`` (called by ``flashserve serve`` before it listens): the objects alive
at startup leave the cyclic collector's generations, so a full collection no longer walks them.
In a subprocess, since a frozen heap would stay frozen in the test process."""

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

CHECK = """
import gc
from flashserve.server.cli import freeze_startup_heap
heap = [[i] for i in range(200_000)]  # tracked containers, like a model's and a tokenizer's
before = len(gc.get_objects())
freeze_startup_heap()
after = len(gc.get_objects())
assert gc.get_freeze_count() >= 200_000, gc.get_freeze_count()
assert before >= 200_000 and after < before - 200_000, (before, after)
print("ok")
"""


def test_startup_heap_is_frozen():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
