"""How many threads the group loops use."""
from __future__ import annotations

import os

PARALLEL_MIN_GROUPS = 4096


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(n_groups: int) -> int:
    """All cores for many groups; one thread below PARALLEL_MIN_GROUPS groups, where starting
    threads costs more than it saves."""
    return 1 if n_groups < PARALLEL_MIN_GROUPS else available_cores()
