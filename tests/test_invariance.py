"""Fits that must not change under re-parametrisations of the same model: shifting a covariate that has
a random slope (with an intercept in both parts, the model is the same, only its coordinates move),
rescaling the response, permuting the rows, relabelling the groups."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

import lmefast

RANDOM_SLOPES = {
    "sleepstudy": ("Reaction", "Days", "Subject"),
    "dietox": ("Weight", "Time", "Pig"),
}


def _fit(df: pd.DataFrame, data: str, reml: bool) -> lmefast.MixedLMResults:
    y, x, g = RANDOM_SLOPES[data]
    return lmefast.mixedlm(f"{y} ~ {x}", df, groups=g, re_formula=f"~{x}").fit(reml=reml)


@pytest.mark.parametrize(
    ("name", "shift"),
    [("sleepstudy", 3.0), ("sleepstudy", 7.0), ("sleepstudy", 10.0), ("dietox", 10.0), ("dietox", 20.0)],
)
def test_shifting_a_random_slope_covariate(data: Callable, name: str, reml: bool, shift: float) -> None:
    """x → x + c with random intercept and slope: the same model (b₀' = b₀ − c b₁). The maximised
    (REML) log-likelihood, the slope, its SE, the slope variance and σ² are unchanged."""
    _, x, _ = RANDOM_SLOPES[name]
    df = data(name)
    base = _fit(df, name, reml)
    df[x] = df[x] + shift
    moved = _fit(df, name, reml)
    assert moved.converged
    assert moved.llf == pytest.approx(base.llf, abs=1e-6), (
        f"{name} with {x} + {shift}: llf {moved.llf!r} vs {base.llf!r} unshifted (θ̂ {moved.theta} vs "
        f"{base.theta}); fit reported converged={moved.converged}")
    assert moved.fe_params[x] == pytest.approx(base.fe_params[x], rel=1e-5)
    assert moved.bse_fe[x] == pytest.approx(base.bse_fe[x], rel=1e-4)
    assert moved.cov_re.loc[x, x] == pytest.approx(base.cov_re.loc[x, x], rel=1e-4)
    assert moved.scale == pytest.approx(base.scale, rel=1e-4)


@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e4])
def test_rescaling_the_response(sleepstudy: pd.DataFrame, reml: bool, factor: float) -> None:
    """y → c y: θ̂ unchanged, β̂ and BLUPs × c, variances × c², llf − d log c (d = n, or n − p for REML)."""
    base = _fit(sleepstudy, "sleepstudy", reml)
    sleepstudy["Reaction"] = sleepstudy["Reaction"] * factor
    res = _fit(sleepstudy, "sleepstudy", reml)
    d = res.nobs - (res.k_fe if reml else 0)
    assert res.llf == pytest.approx(base.llf - d * np.log(factor), abs=1e-6)
    np.testing.assert_allclose(res.theta, base.theta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.fe_params.to_numpy(), factor * base.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(res.cov_re.to_numpy(), factor**2 * base.cov_re.to_numpy(), rtol=1e-4)
    assert res.scale == pytest.approx(factor**2 * base.scale, rel=1e-4)


def test_row_order_and_group_labels(dietox: pd.DataFrame, reml: bool) -> None:
    """Permuting the rows and renaming the groups changes nothing but the labels."""
    base = _fit(dietox, "dietox", reml)
    perm = np.random.default_rng(3).permutation(len(dietox))
    shuffled = dietox.iloc[perm].reset_index(drop=True)
    shuffled["Pig"] = shuffled["Pig"].map(lambda p: f"pig-{p}")
    res = _fit(shuffled, "dietox", reml)
    assert res.llf == pytest.approx(base.llf, abs=1e-8)
    np.testing.assert_allclose(res.fe_params.to_numpy(), base.fe_params.to_numpy(), rtol=1e-7)
    np.testing.assert_allclose(res.cov_re.to_numpy(), base.cov_re.to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.fittedvalues, base.fittedvalues[perm], rtol=1e-7)
    for pig, re in base.random_effects.items():
        np.testing.assert_allclose(res.random_effects[f"pig-{pig}"].to_numpy(), re.to_numpy(), rtol=1e-4,
                                   atol=1e-6 * float(np.max(np.abs(base.random_effects_frame.to_numpy()))))


@pytest.mark.parametrize(("name", "shift"), [("sleepstudy", 10.0), ("dietox", 20.0)])
def test_boundary_fit_is_a_minimum_not_a_saddle(data: Callable, name: str, shift: float, reml: bool) -> None:
    """A diagonal θ at its bound 0 has zero derivative there (the objective is even in it), so a zero
    projected gradient does not make a minimum: the objective must not decrease into the interior."""
    _, x, _ = RANDOM_SLOPES[name]
    df = data(name)
    df[x] = df[x] + shift
    y, _, g = RANDOM_SLOPES[name]
    model = lmefast.mixedlm(f"{y} ~ {x}", df, groups=g, re_formula=f"~{x}")
    res = model.fit(reml=reml)
    assert res.converged
    # no other start does better
    other = model.fit(reml=reml, start_theta=np.array([2.0, 0.0, 0.5]))
    assert res.objective <= other.objective + 1e-6, (
        f"default start: θ̂ {res.theta}, objective {res.objective:.10g}; start [2, 0, 0.5]: θ̂ {other.theta}, "
        f"objective {other.objective:.10g}")
    obj = model.objective(reml)
    diag = model.spec.theta_map.diagonal_mask()
    for i in np.nonzero(diag & (res.theta == 0.0))[0]:
        for eps in (1e-3, 1e-2):
            th = res.theta.copy()
            th[i] = eps
            assert obj(th) >= res.objective - 1e-10, (
                f"θ̂ = {res.theta} (converged={res.converged}) is a saddle: θ[{i}] = {eps} lowers the "
                f"objective by {res.objective - obj(th):.3g}")


def _no_slope_sleepstudy(sleepstudy: pd.DataFrame) -> pd.DataFrame:
    """sleepstudy's design with a response that has random intercepts but no random slope: the fit of
    (1 + Days | Subject) puts the slope's diagonal θ at 0 (with the off-diagonal θ free)."""
    rng = np.random.default_rng(1)
    codes = sleepstudy["Subject"].astype("category").cat.codes.to_numpy()
    intercepts = rng.normal(0.0, 30.0, codes.max() + 1)
    sleepstudy["Reaction"] = 250 + 10 * sleepstudy["Days"] + intercepts[codes] + rng.normal(0, 25, len(codes))
    return sleepstudy


SINGULAR = {
    # name: (data, formula, groups, re_formula)
    "dyestuff2": ("Dyestuff2", "Yield ~ 1", "Batch", None),
    "sleep_no_slope": ("sleepstudy", "Reaction ~ Days", "Subject", "~Days"),
}


@pytest.mark.parametrize("name", list(SINGULAR))
def test_singular_fit_is_a_minimum_not_a_saddle(data: Callable, name: str, reml: bool) -> None:
    """Fits with a diagonal θ at exactly 0 (asserted, so the probe runs): moving that entry into the
    interior, alone or with a small change of the other entries, never lowers the objective."""
    source, formula, groups, re_formula = SINGULAR[name]
    df = data(source)
    if name == "sleep_no_slope":
        df = _no_slope_sleepstudy(df)
    model = lmefast.mixedlm(formula, df, groups=groups, re_formula=re_formula)
    res = model.fit(reml=reml)
    assert res.converged and res.singular
    diag = model.spec.theta_map.diagonal_mask()
    zeros = np.nonzero(diag & (res.theta == 0.0))[0]
    assert zeros.size >= 1, f"θ̂ = {res.theta}: no diagonal entry at 0, the probe would not run"
    obj = model.objective(reml)
    lower = model.spec.theta_map.lower_bounds()
    for i in zeros:
        others = np.arange(res.theta.size) != i
        for eps in (1e-4, 1e-3, 1e-2, 1e-1):
            th = res.theta.copy()
            th[i] = eps
            assert obj(th) >= res.objective - 1e-10, (
                f"θ̂ = {res.theta} is a saddle: θ[{i}] = {eps} lowers the objective by "
                f"{res.objective - obj(th):.3g}")
            if not others.any():
                continue
            # the profile along θ[i]: the other entries re-optimised (a saddle need not be axis-aligned)
            def along(x: np.ndarray, th: np.ndarray = th, others: np.ndarray = others) -> float:
                t = th.copy()
                t[others] = x
                return float(obj(t))
            best = optimize.minimize(along, th[others], method="L-BFGS-B",
                                     bounds=[(lo, None) for lo in lower[others]])
            assert best.fun >= res.objective - 1e-10, (
                f"θ̂ = {res.theta} is a saddle: θ[{i}] = {eps} with the others at {best.x} lowers the "
                f"objective by {res.objective - best.fun:.3g}")
