"""The optimiser's first Hessian from a sample of blocks (lmefast.optimize.start_hessian,
CrossProducts.sample_of_blocks): the sample is the full objective when it keeps every group,
and its curvature divided by the fraction kept is close to the full objective's."""
from __future__ import annotations

import numpy as np
import pytest

import lmefast
from lmefast._testing import random_slopes as random_slopes_frame
from lmefast.optimize import hessian_fd


@pytest.fixture(scope="module")
def objective():
    df = random_slopes_frame(60_000, 6_000, seed=3)
    model = lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1")
    return model.engine.objective(reml=True)


def test_a_sample_of_every_group_is_the_objective(objective) -> None:
    cp, f = objective.cp.sample_of_blocks(1)
    full_cp = objective.cp
    assert f == 1.0
    np.testing.assert_array_equal(cp.S, full_cp.S)
    np.testing.assert_array_equal(cp.layout.q_off, full_cp.layout.q_off)
    theta = np.array([0.8, 0.1, 0.4])
    same = objective.with_crossprods(cp)
    assert same.solve(theta).objective == pytest.approx(objective.solve(theta).objective, rel=1e-13)


def test_sampled_curvature_is_close_to_the_full_one(objective) -> None:
    theta = np.array([0.8, 0.1, 0.4])
    free = np.ones(3, dtype=bool)
    H = hessian_fd(objective, theta, objective.solve(theta, want_grad=True).grad, free)
    sub, f = objective.sample(1_000)
    assert 0.15 < f < 0.25
    assert sub.n_blocks == pytest.approx(f * objective.n_blocks, abs=1)
    Hs = hessian_fd(sub, theta, sub.solve(theta, want_grad=True).grad, free) / f
    # a fifth of the groups: the curvature agrees to sampling error (diagonal within 15%,
    # off-diagonal entries within 5% of the largest entry), far closer than a Hessian that
    # ignored the fraction (5× off)
    np.testing.assert_allclose(np.diag(Hs), np.diag(H), rtol=0.15)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(Hs[off], H[off], atol=0.05 * np.abs(H).max())


def test_large_fits_start_from_the_sampled_hessian_and_reach_the_same_optimum() -> None:
    import lmefast.optimize as opt

    df = random_slopes_frame(120_000, 30_000, seed=4)
    model = lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1")
    sampled = model.fit()
    saved = opt.HESSIAN_SAMPLE_BLOCKS
    try:
        opt.HESSIAN_SAMPLE_BLOCKS = 10**9          # the full Hessian
        full = model.fit()
    finally:
        opt.HESSIAN_SAMPLE_BLOCKS = saved
    assert sampled.converged and full.converged
    assert sampled.llf == pytest.approx(full.llf, rel=1e-12)
    np.testing.assert_allclose(sampled.theta, full.theta, rtol=1e-5)


def test_start_hessian_from_values_on_several_factors() -> None:
    """Several factors (a gradient costs several evaluations): the first Hessian comes from
    differences of values (optimize.hessian_from_values), close to the one from differences of
    the analytic gradient, in d(d + 1)/2 evaluations without the gradient."""
    from lmefast._testing import crossed
    from lmefast.optimize import hessian_from_values, start_hessian

    df = crossed(20_000, 800, 60, 5)
    model = lmefast.lmer_model("y ~ x + (1|a) + (1|b)", df)
    obj = model.engine.objective(True)
    assert obj.lazy_gradient
    theta = np.array([0.7, 0.9])
    sol = obj.solve(theta, want_grad=True)
    free = np.ones(2, dtype=bool)
    by_grad = hessian_fd(obj, theta, sol.grad, free)
    by_values = hessian_from_values(obj, theta, sol.grad, free, sol.objective)
    np.testing.assert_allclose(by_values, by_grad, rtol=5e-3, atol=1e-3 * np.abs(by_grad).max())
    np.testing.assert_allclose(hessian_from_values(obj, theta, sol.grad, free), by_values, rtol=1e-12)
    n0 = obj.n_evals
    np.testing.assert_allclose(start_hessian(obj, theta, sol.grad, free, sol.objective), by_values, rtol=1e-12)
    assert obj.n_evals - n0 == 3           # d(d + 1)/2 evaluations, no gradient
