"""How many CPU cores this process may use: the default number of scoring workers."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores in this process's affinity mask (a container's or taskset's limit), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
