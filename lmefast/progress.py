"""Progress reports of passes over chunked data: ``progress=True`` prints to stderr, a callable
``progress(stage, done, total)`` receives them."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from lmefast.errors import SpecificationError

ProgressFn = Callable[[str, int, int], None]


class PrintProgress:
    """``progress=True``: progress on stderr, at most every ``every`` s and at the end of each
    stage (one line per stage, rewritten in place, on a terminal)."""

    def __init__(self, every: float = 1.0, stream: Any = None) -> None:
        self.every = every
        self.stream = stream
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        out = self.stream or sys.stderr
        tty = getattr(out, "isatty", lambda: False)()
        end = "\n" if done >= total or not tty else ""
        start = "\r" if tty else ""
        print(f"{start}lmefast {stage}: {done:,}/{total:,} ({pct:.0f}%)", end=end, file=out, flush=True)


def progress_function(progress: bool | ProgressFn | None) -> ProgressFn | None:
    """None/False: silent; True: print to stderr; a callable: called as (stage, done, total)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return PrintProgress()
    if callable(progress):
        return progress
    raise SpecificationError(f"progress must be True, False or a callable(stage, done, total), "
                             f"not {type(progress).__name__}")

