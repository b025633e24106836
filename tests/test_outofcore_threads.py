"""All cores (issue 5, item 3): the group loops run in parallel (OpenMP); fits running in several
Python threads at once give the same numbers as one at a time."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scaleout_cases import RTOL, assert_same_fit, close, synthetic, write_parquet

import lmefast
from lmefast.crossprods import compute_crossprods
from lmefast.outofcore import mixedlm_parquet
from lmefast.parallel import PARALLEL_MIN_GROUPS


@pytest.fixture(scope="module")
def big_frame():
    # enough groups for the parallel group loops (PARALLEL_MIN_GROUPS)
    return synthetic(60_000, 2 * PARALLEL_MIN_GROUPS, seed=21)


def same_numbers(a, b) -> None:
    """Two fits of the same data: equal to rounding. The same code on the same data at the same
    number of threads may still sum in another order (OpenMP's reductions, another BLAS): at one θ̂
    that is relative rounding (~1e-12 here); the fitted θ̂ is held to scaleout_cases.RTOL, which
    follows from how far the optimiser's last step can move under rounding (see there)."""
    close(a.llf, b.llf, 1e-10)
    for x, y in ((a.theta, b.theta), (a.fe_params, b.fe_params), (a.bse_fe, b.bse_fe), (a.scale, b.scale)):
        close(x, y, RTOL)


def test_crossproducts_do_not_depend_on_threads(big_frame) -> None:
    spec = lmefast.mixedlm("y ~ x1 + x2", big_frame, groups="g", re_formula="~x1").spec
    one = compute_crossprods(spec, 1)
    for n in (2, 3, 8):
        other = compute_crossprods(spec, n)
        np.testing.assert_array_equal(other.S, one.S)  # each group's rows summed in row order


def test_objective_threads_agree(big_frame) -> None:
    model = lmefast.mixedlm("y ~ x1 + x2", big_frame, groups="g", re_formula="~x1")
    theta = np.array([0.9, 0.1, 0.4])
    ref = model.objective(True, n_threads=1).solve(theta, want_grad=True)
    for n in (2, 4):
        sol = model.objective(True, n_threads=n).solve(theta, want_grad=True)
        close(sol.objective, ref.objective, 1e-12)
        close(sol.grad, ref.grad, 1e-9)
    r1 = model.fit(n_threads=1)
    r2 = model.fit(n_threads=2)
    close(r2.theta, r1.theta, 1e-8)
    close(r2.llf, r1.llf, 1e-12)


@pytest.mark.slow
def test_fits_in_python_threads_at_once_are_identical(big_frame) -> None:
    """Four fits at once (each using 2 OpenMP threads), on one shared model and on separate
    models: the numbers of a fit run alone, to rounding."""
    shared = lmefast.mixedlm("y ~ x1 + x2", big_frame, groups="g", re_formula="~x1")
    alone = shared.fit(n_threads=2)

    def fit_shared(_: int):
        return shared.fit(n_threads=2)

    def fit_own(_: int):
        model = lmefast.mixedlm("y ~ x1 + x2", big_frame, groups="g", re_formula="~x1")
        return model.fit(n_threads=2)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(fit_shared, range(4))) + list(pool.map(fit_own, range(4)))
    for r in results:
        same_numbers(r, alone)


@pytest.mark.slow
def test_parquet_fits_in_python_threads_at_once(big_frame, tmp_path: Path) -> None:
    d = write_parquet(big_frame, tmp_path / "d", n_files=4, row_group_size=5_000)
    alone = mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1", n_threads=2).fit(n_threads=2)

    def fit(_: int):
        return mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1", n_threads=2).fit(n_threads=2)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(fit, range(3)))
    for r in results:
        same_numbers(r, alone)
    mem = lmefast.mixedlm("y ~ x1 + x2", big_frame, groups="g", re_formula="~x1").fit()
    assert_same_fit(alone, mem)
