"""flashserve.bench: the ``flashserve bench`` commands, and what several of them share."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (every CPU figure names its CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
