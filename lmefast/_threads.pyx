# cython: language_level=3
"""The one place where the kernels enter an OpenMP parallel region, and fork-safety.

Every kernel splits its work into `nth` chunks (ranges of groups, levels or rows) and hands a
function for one chunk to `run_chunks`, which runs the chunks on `nth` OpenMP threads, or one
after another on the calling thread. Both give the same partial sums, in the same order of
addition afterwards, so the result does not depend on which way they ran.

GNU libgomp is not fork-safe: a process forked after its parent started OpenMP's thread pool
inherits a pool whose threads do not exist, and its first parallel region waits for them for
ever. So the first parallel region marks the process, and a process forked from a marked one
(`os.register_at_fork`) runs every chunk serially, with a plain loop that never calls into
the OpenMP runtime. A process forked before any parallel region (forkserver's children) and a
fresh process (spawn, loky) keep their threads.
"""
import os

from cython.parallel cimport prange

cdef int openmp_entered = 0
cdef int serial_after_fork = 0


cdef bint may_use_threads(int nth) noexcept nogil:
    """Whether work split into nth chunks may run in a parallel region here (and mark the
    process as having entered one when it may)."""
    global openmp_entered
    if nth <= 1 or serial_after_fork:
        return False
    openmp_entered = 1
    return True


cdef void run_chunks(chunkfun fn, void* ctx, int nth) noexcept nogil:
    """fn(ctx, t) for t = 0 .. nth − 1: on nth threads, or serially (see module docstring)."""
    cdef int t
    if may_use_threads(nth):
        for t in prange(nth, schedule="static", num_threads=nth):
            fn(ctx, t)
    else:
        for t in range(nth):
            fn(ctx, t)


def _after_fork_in_child() -> None:
    global serial_after_fork
    if openmp_entered:
        serial_after_fork = 1


def forked_after_parallel() -> bool:
    """True in a process forked (at any depth) from one that had entered a parallel region:
    the kernels run serially there."""
    return bool(serial_after_fork)


def entered_parallel() -> bool:
    """True once this process (or the parent it was forked from) ran a parallel region."""
    return bool(openmp_entered)


os.register_at_fork(after_in_child=_after_fork_in_child)
