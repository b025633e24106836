"""Threads: fork-safety of the OpenMP kernels, validation of n_threads, the package default.

A process forked after a parallel region inherits GNU OpenMP's thread pool without its
threads; its first parallel region would wait for them for ever. Every test that starts a
process waits with a timeout, so a hang fails the test instead of hanging the suite.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pytest

import lmefast

MANY_GROUPS = 5000          # above lmefast.parallel.PARALLEL_MIN_GROUPS: the default is parallel
TIMEOUT_S = 120


def one_factor_data(m: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, m, 5 * m)
    x = rng.standard_normal(g.size)
    y = 1.0 + x + rng.standard_normal(m)[g] + rng.standard_normal(g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def crossed_data(m: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, m, 4 * m)
    b = rng.integers(0, 40, a.size)
    x = rng.standard_normal(a.size)
    y = 1.0 + x + rng.standard_normal(m)[a] + 0.5 * rng.standard_normal(40)[b] + rng.standard_normal(a.size)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def fit_both(n_threads: int | None) -> tuple[float, float]:
    """Log-likelihoods of a one-factor and a crossed fit with many groups (what a worker does)."""
    kw = {} if n_threads is None else {"n_threads": n_threads}
    one = lmefast.mixedlm("y ~ x", one_factor_data(MANY_GROUPS, 2), groups="g").fit(**kw)
    crossed = lmefast.lmer("y ~ x + (1|a) + (1|b)", crossed_data(MANY_GROUPS, 3), **kw)
    return float(one.llf), float(crossed.llf)


def start_parallel_region() -> None:
    """A fit on two threads in this process, so that OpenMP's pool exists before a fork."""
    lmefast.mixedlm("y ~ x", one_factor_data(MANY_GROUPS, 1), groups="g").fit(n_threads=2)


@pytest.fixture(scope="module")
def expected() -> tuple[float, float]:
    """fit_both's log-likelihoods on one thread, in this process."""
    return fit_both(1)


@pytest.mark.parametrize("method,n_threads", [("fork", None), ("fork", 1), ("fork", 2),
                                              ("forkserver", None), ("spawn", 2)])
def test_child_process_fits_after_parallel_fit(method: str, n_threads: int | None,
                                               expected: tuple[float, float]) -> None:
    if method not in mp.get_all_start_methods():
        pytest.fail(f"start method {method} is not available on this platform")
    start_parallel_region()
    with mp.get_context(method).Pool(1) as pool:
        try:
            got = pool.apply_async(fit_both, (n_threads,)).get(timeout=TIMEOUT_S)
        except mp.TimeoutError:
            pool.terminate()
            pytest.fail(f"a {method} child hung in its fit (n_threads={n_threads})")
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def child_state(_: int) -> tuple[bool, int]:
    from lmefast._threads import forked_after_parallel

    from lmefast.parallel import resolve_threads

    return forked_after_parallel(), resolve_threads(2, MANY_GROUPS)


@pytest.mark.parametrize("method,serial", [("fork", True), ("forkserver", False), ("spawn", False)])
def test_only_a_child_forked_after_a_parallel_region_runs_serially(method: str, serial: bool) -> None:
    from lmefast._threads import entered_parallel

    start_parallel_region()
    assert entered_parallel()
    with mp.get_context(method).Pool(1) as pool:
        try:
            marked, nth = pool.apply_async(child_state, (0,)).get(timeout=TIMEOUT_S)
        except mp.TimeoutError:
            pool.terminate()
            pytest.fail(f"a {method} child hung")
    assert marked is serial
    assert nth == (1 if serial else 2)


def grandchild_fit(conn) -> None:
    with mp.get_context("fork").Pool(1) as pool:
        conn.send(pool.apply_async(fit_both, (2,)).get(timeout=TIMEOUT_S))


def test_grandchild_of_a_fork_fits(expected: tuple[float, float]) -> None:
    start_parallel_region()
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=grandchild_fit, args=(sender,))
    child.start()
    try:
        if not receiver.poll(2 * TIMEOUT_S):
            pytest.fail("a process forked from a forked child hung in its fit")
        got = receiver.recv()
        child.join(TIMEOUT_S)       # it closes its own pool on the way out
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
    np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize("backend", ["loky", "multiprocessing"])
def test_joblib_workers_fit_after_parallel_fit(backend: str, expected: tuple[float, float]) -> None:
    joblib = pytest.importorskip("joblib")  # in the test extra; skipped only outside it
    start_parallel_region()
    with joblib.Parallel(n_jobs=2, backend=backend, timeout=TIMEOUT_S) as parallel:
        got = parallel(joblib.delayed(fit_both)(nth) for nth in (None, 2))
    for pair in got:
        np.testing.assert_allclose(pair, expected, rtol=1e-9)


# ---------------------------------------------------------------------------- n_threads


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                       (True, TypeError), ("2", TypeError)])
def test_fit_rejects_bad_n_threads(bad: object, error: type[Exception]) -> None:
    df = one_factor_data(300, 4)
    with pytest.raises(error, match="n_threads"):
        lmefast.mixedlm("y ~ x", df, groups="g").fit(n_threads=bad)
    with pytest.raises(error, match="n_threads"):
        lmefast.lmer("y ~ x + (1|g)", df, n_threads=bad)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                       (True, TypeError), (None, TypeError)])
def test_check_and_resolve_threads(bad: object, error: type[Exception]) -> None:
    from lmefast.parallel import check_threads, resolve_threads

    with pytest.raises(error, match="n_threads"):
        check_threads(bad)
    if bad is not None:
        with pytest.raises(error, match="n_threads"):
            resolve_threads(bad, 10)
    assert check_threads(np.int64(3)) == 3


def test_row_pass_and_kernels_follow_n_threads() -> None:
    """The same fit on 1, 2 and 3 threads (rows, groups and levels split three ways)."""
    df = one_factor_data(MANY_GROUPS, 5)
    llf = [lmefast.mixedlm("y ~ x", df, groups="g").fit(n_threads=n).llf for n in (1, 2, 3)]
    np.testing.assert_allclose(llf, llf[0], rtol=1e-12)
    cdf = crossed_data(MANY_GROUPS, 6)
    llf = [lmefast.lmer("y ~ x + (1|a) + (1|b)", cdf, n_threads=n).llf for n in (1, 2, 3)]
    np.testing.assert_allclose(llf, llf[0], rtol=1e-12)


def test_accumulate_splits_rows_by_n_threads() -> None:
    from lmefast._crossprods import accumulate

    rng = np.random.default_rng(7)
    n, m, p, k = 2000, 50, 2, 2
    g = rng.integers(0, m, n)
    X = rng.standard_normal((n, p))
    Z = rng.standard_normal((n, k))
    y = rng.standard_normal(n)
    rec = k * k + k * p + k
    q_off = np.arange(m + 1, dtype=np.int64) * k
    s_off = np.arange(m + 1, dtype=np.int64) * rec
    none_i = np.zeros((0, n), dtype=np.int64)
    none_v = np.zeros((0, n))
    sums = []
    for nth in (1, 3, 200):
        S = np.zeros(m * rec)
        accumulate(y, X, Z, g.astype(np.int64), q_off, s_off, none_i, none_v, S, nth)
        sums.append(S)
    expected = np.zeros((m, rec))
    for r in range(n):
        z = Z[r]
        expected[g[r]] += np.concatenate([np.outer(z, z).ravel(), np.outer(z, X[r]).ravel(), z * y[r]])
    for S in sums:
        np.testing.assert_allclose(S, expected.ravel(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="n_threads"):
        accumulate(y, X, Z, g.astype(np.int64), q_off, s_off, none_i, none_v, np.zeros(m * rec), 0)


def test_set_num_threads_is_the_default_for_many_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmefast import parallel

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert parallel.get_num_threads() == parallel.available_cores()
    try:
        parallel.set_num_threads(3)
        assert parallel.get_num_threads() == 3
        assert parallel.resolve_threads(None, MANY_GROUPS) == 3
        assert parallel.resolve_threads(None, 10) == 1
        assert parallel.resolve_threads(2, 10) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        assert parallel.get_num_threads() == 3          # set_num_threads wins over the environment
        parallel.set_num_threads(None)
        assert parallel.get_num_threads() == 5
        monkeypatch.setenv("OMP_NUM_THREADS", "4,2")    # nested levels: the outer one
        assert parallel.get_num_threads() == 4
        with pytest.raises(ValueError, match="positive"):
            parallel.set_num_threads(0)
    finally:
        parallel.set_num_threads(None)


def test_omp_num_threads_sets_the_default_in_a_new_process() -> None:
    ctx = mp.get_context("spawn")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "3"
    try:
        with ctx.Pool(1) as pool:
            got = pool.apply_async(default_in_child, (0,)).get(timeout=TIMEOUT_S)
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    assert got == 3


def default_in_child(_: int) -> int:
    from lmefast.parallel import resolve_threads

    return resolve_threads(None, MANY_GROUPS)


def test_limit_blas_threads_holds_blas_and_restores_it() -> None:
    from threadpoolctl import threadpool_info

    from lmefast.parallel import fit_threads, limit_blas_threads

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    assert before, "no BLAS library found by threadpoolctl"
    with limit_blas_threads(1):
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    with fit_threads(1, MANY_GROUPS) as nth:
        assert nth == 1
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    with pytest.raises(TypeError, match="n_threads"), fit_threads(1.5, MANY_GROUPS):
        pass
