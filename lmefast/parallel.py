"""How many threads a fit uses: OpenMP threads of the kernels and BLAS threads, governed together.

* ``set_num_threads(n)`` / ``get_num_threads()``: the package default for fits with many groups
  (at least ``PARALLEL_MIN_GROUPS``); unset, it is ``OMP_NUM_THREADS`` when that is set, else
  the cores this process may run on.
* ``resolve_threads(n_threads, n_groups)``: what a fit calls with the user's ``n_threads``: the
  validated value, or the default (one thread for fewer groups, where starting threads costs
  more than it saves).
* ``limit_blas_threads(n)``: a context manager holding BLAS (OpenBLAS, MKL, BLIS, ...) to at
  most n threads for the duration of a fit. Without it, BLAS threads of the dense trailing
  factorisation fight a busy core even when the kernels run on one thread.

Fork-safety: a process forked after a parallel region (``multiprocessing`` with the fork start
method) runs every kernel serially (lmefast._threads); ``resolve_threads`` gives 1 there.

Thread limits are process-wide (as OpenMP's and BLAS's own settings are): fits running at the
same time in several Python threads share them.
"""
from __future__ import annotations

import operator
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

from lmefast._threads import forked_after_parallel

PARALLEL_MIN_GROUPS = 4096

_num_threads: int | None = None
_controller: ThreadpoolController | None = None
_controller_lock = threading.Lock()


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(n_threads: object, name: str = "n_threads") -> int:
    """n_threads as a positive int; TypeError for anything that is not an integer (floats and
    booleans included), ValueError for an integer below 1. ``name`` names it in the message."""
    if isinstance(n_threads, bool):
        raise TypeError(f"{name} must be a positive integer, got {n_threads!r}")
    try:
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {n_threads!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n}")
    return n


def _env_threads() -> int | None:
    """OMP_NUM_THREADS's first (outermost) level, when it is a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_num_threads(n: int | None) -> None:
    """Threads of fits with many groups when ``fit`` is not given ``n_threads``. None
    restores the default (``OMP_NUM_THREADS`` if set, else all available cores)."""
    global _num_threads
    _num_threads = None if n is None else check_threads(n, "n")


def get_num_threads() -> int:
    """The package default: set_num_threads's value, else OMP_NUM_THREADS, else the cores."""
    if _num_threads is not None:
        return _num_threads
    return _env_threads() or available_cores()


def resolve_threads(n_threads: object, n_groups: int) -> int:
    """The threads one fit uses: ``n_threads`` validated (``check_threads``), or when None the
    default: get_num_threads() for at least PARALLEL_MIN_GROUPS groups, else 1. Always 1 in
    a process forked after a parallel region (OpenMP cannot start threads there)."""
    n = default_threads(n_groups) if n_threads is None else check_threads(n_threads)
    return 1 if forked_after_parallel() else n


def default_threads(n_groups: int) -> int:
    """get_num_threads() for many groups; one thread below PARALLEL_MIN_GROUPS groups, where
    starting threads costs more than it saves."""
    return 1 if n_groups < PARALLEL_MIN_GROUPS else get_num_threads()


def _blas_controller() -> ThreadpoolController:
    """One inspection of the loaded BLAS libraries per process (a few milliseconds), made
    when first needed: after numpy and scipy's LAPACK have been loaded by the kernels."""
    global _controller
    with _controller_lock:
        if _controller is None:
            _controller = ThreadpoolController()
        return _controller


@contextmanager
def limit_blas_threads(n: int) -> Iterator[None]:
    """BLAS libraries use at most n threads inside the block (then their previous settings)."""
    with _blas_controller().limit(limits=check_threads(n, "n"), user_api="blas"):
        yield


@contextmanager
def fit_threads(n_threads: object, n_groups: int) -> Iterator[int]:
    """``resolve_threads`` and ``limit_blas_threads`` together, for the duration of one fit::

        with fit_threads(n_threads, n_groups) as nth:
            ...  # kernels built with n_threads=nth, BLAS held to nth threads
    """
    nth = resolve_threads(n_threads, n_groups)
    with limit_blas_threads(nth):
        yield nth


def _reset_after_fork() -> None:
    # the BLAS libraries found by the parent are the child's too; the lock may have been held
    global _controller_lock
    _controller_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
