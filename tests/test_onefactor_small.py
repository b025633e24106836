"""The one-factor kernel's small-block path (every group a random intercept, or a random
intercept and slope, no variance components) against its general loops: both evaluate the same
per-group factorisation, so on the same cross-products they must give the same objective,
gradient, β̂, Lx, r² and log|L|² (to rounding). lmefast._kernels.SMALL_BLOCK_PATH = False
builds kernels that take the general loops."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kernel_compare import assert_same_evaluation

import lmefast
from lmefast import _kernels
from lmefast.datasets import load_dietox, load_dyestuff, load_sleepstudy

RTOL = 1e-10


def unbalanced(seed: int = 2, slope: bool = True) -> pd.DataFrame:
    """300 groups of 1 to 20 rows, two covariates, prior weights; a random intercept and (with
    ``slope``) a random slope on x1 correlated with it."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 21, 300)
    g = np.repeat(np.arange(sizes.size), sizes)
    n = g.size
    x1 = rng.standard_normal(n)
    x2 = rng.uniform(-1.0, 2.0, n)
    b0 = rng.normal(0.0, 1.0, sizes.size)
    b1 = (0.4 * b0 + rng.normal(0.0, 0.5, sizes.size)) if slope else np.zeros(sizes.size)
    y = 1.0 + b0[g] + (0.5 + b1[g]) * x1 - 0.3 * x2 + rng.standard_normal(n)
    df = pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": g.astype(str),
                       "w": rng.uniform(0.2, 3.0, n)})
    for j in range(3, 18):                 # further covariates (wider X), unrelated to y
        df[f"x{j}"] = rng.standard_normal(n) + 0.3 * x1
    return df


def covariates(n: int) -> str:
    return " + ".join(f"x{j}" for j in range(1, n + 1))


def dietox() -> pd.DataFrame:
    return load_dietox().dropna(subset=["Weight", "Time", "Pig"])


CASES = {
    "sleepstudy": (load_sleepstudy, "Reaction ~ Days + (Days | Subject)", None),
    "sleepstudy_intercept": (load_sleepstudy, "Reaction ~ Days + (1 | Subject)", None),
    "dietox": (dietox, "Weight ~ Time + (Time | Pig)", None),
    "dyestuff": (load_dyestuff, "Yield ~ 1 + (1 | Batch)", None),
    "unbalanced_weighted": (unbalanced, "y ~ x1 + x2 + (1 + x1 | g)", "w"),
    "unbalanced_intercept_weighted": (lambda: unbalanced(5, slope=False),
                                      "y ~ x1 + x2 + (1 | g)", "w"),
    "no_fixed_effects": (lambda: unbalanced(7), "y ~ 0 + (1 + x1 | g)", None),
    # p = 4 (the largest p of a copy with p a constant) and p = 6 (p a variable)
    "four_columns": (lambda: unbalanced(8), f"y ~ {covariates(3)} + (1 + x1 | g)", "w"),
    "four_columns_intercept": (lambda: unbalanced(9), f"y ~ {covariates(3)} + (1 | g)", "w"),
    "six_columns": (lambda: unbalanced(10), f"y ~ {covariates(5)} + (1 + x1 | g)", "w"),
    "six_columns_intercept": (lambda: unbalanced(11), f"y ~ {covariates(5)} + (1 | g)", None),
}


def kernels(case: str, reml: bool, n_threads: int, monkeypatch: pytest.MonkeyPatch):
    make, formula, weights = CASES[case]
    model = lmefast.lmer_model(formula, make(), weights=weights)
    fast = model.engine.objective(reml, n_threads).kernel
    monkeypatch.setattr(_kernels, "SMALL_BLOCK_PATH", False)
    general = model.engine.objective(reml, n_threads).kernel
    return fast, general


def n_theta(case: str) -> int:
    return 1 if "intercept" in case or case == "dyestuff" else 3


def thetas(nt: int) -> list[np.ndarray]:
    """Points inside, on the boundary (a zero diagonal entry of T) and with a negative
    correlation; nt = 1 (a random intercept) or 3 ([t00, t10, t11])."""
    if nt == 1:
        return [np.array([0.7]), np.array([2.3]), np.array([0.0]), np.array([0.05])]
    return [np.array([0.7, 0.2, 0.5]), np.array([1.8, -0.6, 0.3]), np.array([0.0, 0.4, 0.9]),
            np.array([1.1, 0.3, 0.0]), np.array([0.9993, -0.000418, 0.4986]),
            np.array([0.0, 0.0, 0.0])]


def assert_same(fast, general, theta: np.ndarray, want_grad: bool) -> None:
    g1, g2 = assert_same_evaluation(fast.evaluate(theta, want_grad),
                                    general.evaluate(theta, want_grad), RTOL)
    if want_grad:
        # at θ = 0 the gradient is zero (the objective is even in T): both must say so
        assert np.abs(g2).max() > 0.0 or not np.any(theta)
        np.testing.assert_allclose(g1, g2, rtol=RTOL, atol=RTOL * np.abs(g2).max())


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_block_path_equals_general_path(case: str, reml: bool, n_threads: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fast, general = kernels(case, reml, n_threads, monkeypatch)
    assert fast.small_block_path and not general.small_block_path
    assert fast.n_threads == general.n_threads
    for theta in thetas(n_theta(case)):
        for want_grad in (False, True):
            assert_same(fast, general, theta, want_grad)


def test_small_block_path_gradient_matches_finite_differences(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's gradient against central differences of its own objective (not only
    against the general loops)."""
    fast, _ = kernels("unbalanced_weighted", True, 1, monkeypatch)
    theta = np.array([0.8, -0.3, 0.6])
    g = fast.evaluate(theta, True)[6]
    h = 1e-5
    fd = np.array([(fast.evaluate(theta + h * e)[0] - fast.evaluate(theta - h * e)[0]) / (2 * h)
                   for e in np.eye(3)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


@pytest.mark.parametrize("case", ["sleepstudy", "dyestuff"])
def test_small_block_path_log_determinant_at_large_theta(case: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """log|L|² is summed as logs of running products of the |L_i|², or one log per group when
    |L_i|² is beyond 1e100: both compared with the general path's sum of logs. (At such θ the
    rest is ill-conditioned and differs between the paths by more than rounding.)"""
    fast, general = kernels(case, True, 1, monkeypatch)
    for t in (300.0, 1e4, 1e30, 1e52):
        theta = np.array([t, 0.5, t]) if case == "sleepstudy" else np.array([t])
        ld1 = fast.evaluate(theta)[2]
        ld2 = general.evaluate(theta)[2]
        assert ld2 > 10.0
        np.testing.assert_allclose(ld1, ld2, rtol=RTOL)


@pytest.mark.parametrize(("case", "theta", "failed"), [
    ("sleepstudy", [np.nan, 0.0, 1.0], True),
    ("sleepstudy", [1.0, 0.0, 1e300], True),     # m11 overflows: m11 − m10²/m00 is NaN
    ("sleepstudy", [1e300, 0.0, 1.0], False),    # m00 overflows: log|L|² is infinite
    ("dyestuff", [np.nan], True),
    ("dyestuff", [1e300], False),
])
def test_small_block_path_failure_and_overflow_alike(case: str, theta: list, failed: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A θ that is not a number, or so large that M_i overflows: the same status on both
    paths (the first group's factor fails), or no failure and an infinite log|L|²."""
    fast, general = kernels(case, False, 1, monkeypatch)
    f1, _, ld1, s1 = fast.evaluate(np.array(theta))[:4]
    f2, _, ld2, s2 = general.evaluate(np.array(theta))[:4]
    assert s1 == s2
    assert (s1 != 0) == failed
    if not failed:
        assert ld1 == ld2 == np.inf
        assert f1 == f2 == np.inf


@pytest.mark.parametrize("case", ["unbalanced_weighted", "unbalanced_intercept_weighted",
                                  "sleepstudy"])
def test_small_block_path_fit_equals_general_fit(case: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole fit (optimiser, β̂, σ², standard errors, conditional modes) on the two paths."""
    make, formula, weights = CASES[case]
    data = make()
    fast_model = lmefast.lmer_model(formula, data, weights=weights)
    assert fast_model.engine.objective(True, 1).kernel.small_block_path
    fast = fast_model.fit()
    monkeypatch.setattr(_kernels, "SMALL_BLOCK_PATH", False)
    general_model = lmefast.lmer_model(formula, data, weights=weights)
    assert not general_model.engine.objective(True, 1).kernel.small_block_path
    general = general_model.fit()
    np.testing.assert_allclose(fast.llf, general.llf, rtol=1e-10)
    np.testing.assert_allclose(fast.fe_params, general.fe_params, rtol=1e-7)
    np.testing.assert_allclose(fast.bse_fe, general.bse_fe, rtol=1e-7)
    np.testing.assert_allclose(fast.theta, general.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fast.scale, general.scale, rtol=1e-7)


@pytest.mark.parametrize("formula,kwargs", [
    ("Reaction ~ Days", {"re_formula": "~Days + I(Days ** 2)"}),
    ("Reaction ~ Days", {"vc_formula": {"Days": "0 + Days"}}),
])
def test_small_block_path_not_taken_beyond_small_blocks(formula: str, kwargs: dict) -> None:
    """Three random coefficients, or a variance component: the general loops."""
    model = lmefast.mixedlm(formula, load_sleepstudy(), groups="Subject", **kwargs)
    assert not model.engine.objective(True, 1).kernel.small_block_path


@pytest.mark.parametrize(("n_cov", "taken"), [(15, True), (16, False)])
def test_small_block_path_holds_up_to_sixteen_fixed_effects(n_cov: int, taken: bool) -> None:
    """p = 16 (the stack arrays' size) takes the path, p = 17 the general loops."""
    model = lmefast.lmer_model(f"y ~ {covariates(n_cov)} + (1 + x1 | g)", unbalanced())
    assert model.engine.objective(True, 1).kernel.small_block_path == taken


def test_small_block_path_argument_overrides_module_switch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = lmefast.lmer_model("Reaction ~ Days + (Days | Subject)", load_sleepstudy())
    obj = model.engine.objective(True, 1)
    cp, tm, lay = obj.cp, obj.theta_map, obj.cp.layout
    rows, cols = tm.tril

    def build(**kw) -> _kernels.OneFactorKernel:
        return _kernels.OneFactorKernel(
            cp.S, cp.s_off, lay.q_off, lay.comp, tm.k, cp.p, lay.qmax,
            np.ascontiguousarray(cp.XtX).ravel(), np.ascontiguousarray(cp.Xty), cp.yty,
            float(cp.n), True, rows.astype(np.int64), cols.astype(np.int64), tm.n_vc, 1, **kw)

    assert build().small_block_path
    assert not build(small_block_path=False).small_block_path
    monkeypatch.setattr(_kernels, "SMALL_BLOCK_PATH", False)
    assert not build().small_block_path
    assert build(small_block_path=True).small_block_path
