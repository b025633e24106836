"""Simulation and the parametric bootstrap of fits with prior weights and offsets (lme4's meaning:
y* = o + Xβ̂ + Zb* + ε*, ε*ᵢ ~ N(0, σ̂²/wᵢ)). Each assertion fails when the weights or the offset
are left out of the simulation."""
from __future__ import annotations

import numpy as np
import pytest

import lmefast
from lmefast.datasets import load_sleepstudy


def weighted_sleep():
    """sleepstudy with two classes of weights (1 and 4, alternating rows) and a large offset."""
    ss = load_sleepstudy()
    rng = np.random.default_rng(4)
    ss["w"] = np.where(np.arange(len(ss)) % 2 == 0, 1.0, 4.0)
    ss["o"] = rng.normal(0, 30, len(ss))
    res = lmefast.lmer("Reaction ~ Days + (Days | Subject)", ss, weights="w", offset="o")
    return ss, res


def test_simulated_residual_variance_is_sigma2_over_w() -> None:
    ss, res = weighted_sleep()
    w = ss.w.to_numpy()
    R = 1000
    cond = res.simulate(R, seed=3, include_random=False)
    resid = cond - np.asarray(res.fittedvalues)
    # the conditional mean is the fit (offset included): 6 standard errors of a mean of R draws
    assert np.abs(resid.mean(axis=0)).max() < 6 * res.sigma / np.sqrt(R)
    # per weight class, var/(σ²/w) averages 1 (relative SE of one row's variance sqrt(2/999) = 0.045,
    # 90 rows per class: 0.05 is > 10 SE); ignoring the weights gives 1 and 4 for the two classes
    ratio = resid.var(axis=0, ddof=1) / (res.scale / w)
    for c in (1.0, 4.0):
        assert np.mean(ratio[w == c]) == pytest.approx(1.0, abs=0.05)


def test_simulated_marginal_mean_has_the_offset_and_variance_the_weights() -> None:
    ss, res = weighted_sleep()
    w = ss.w.to_numpy()
    R = 1000
    ys = res.simulate(R, seed=8)
    days = ss.Days.to_numpy(dtype=float)
    X = np.column_stack([np.ones_like(days), days])
    mean = ss.o.to_numpy() + X @ res.fe_params.to_numpy()
    T = np.array([[res.theta[0], 0.0], [res.theta[1], res.theta[2]]])
    marginal = res.scale * (1 / w + np.sum((X @ T) ** 2, axis=1))
    assert np.all(np.abs(ys.mean(axis=0) - mean) < 6 * np.sqrt(marginal / R))   # the offset is 30 sd
    assert np.mean(ys.var(axis=0, ddof=1) / marginal) == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("case", ["one factor", "crossed"])
def test_bootstrap_of_a_weighted_fit_is_centred_on_it(case: str) -> None:
    if case == "one factor":
        _, res = weighted_sleep()
    else:
        from conftest import read_data
        pen = read_data("Penicillin")
        rng = np.random.default_rng(6)
        pen["w"] = np.where(np.arange(len(pen)) % 3 == 0, 0.5, 5.0)
        pen["o"] = rng.normal(0, 2, len(pen))
        res = lmefast.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, weights="w", offset="o")
    R = 300
    boot = res.bootstrap(R, seed=12)
    assert boot.converged.all()
    reps = boot.replicates
    # β̂: replicate means within 4 bootstrap standard errors; their spread near lme4's SE
    for name in res.fe_params.index:
        x = reps[name].to_numpy()
        assert abs(x.mean() - res.fe_params[name]) < 4 * x.std(ddof=1) / np.sqrt(R)
        assert x.std(ddof=1) == pytest.approx(res.bse_fe[name], rel=0.25)
    # σ̂: simulated with variance σ̂²/w, refitted with the weights, it comes back (ignoring the
    # weights in the simulation inflates it by about √(mean w) ≥ 1.6 here)
    assert reps["sigma"].mean() == pytest.approx(res.sigma, rel=0.05)
