"""Issue 4: parametric bootstrap through the y-parts of the cross-products, simulation and
prediction."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import fit_case, read_data

import lmefast
from lmefast.bootstrap import BootstrapError
from lmefast.crossprods import compute_crossprods
from lmefast.predict import PredictionError


@pytest.mark.parametrize("case_id", ["sleep_rs", "pastes_nested", "dietox_cat"])
def test_drawn_crossproducts_are_those_of_a_response(case_id: str) -> None:
    model, res = fit_case(case_id, True)
    sim = res.engine.simulator(res.theta, res.fe_params.to_numpy(), res.sigma)
    rng = np.random.default_rng(3)
    d = sim.draw(rng, 2)
    for r in range(2):
        y = sim.response(d, r, rng)
        cp = compute_crossprods(replace(model.spec, y=y))
        drawn = sim.crossprods(d, r)
        np.testing.assert_allclose(drawn.S, cp.S, rtol=1e-10, atol=1e-8 * np.abs(cp.S).max())
        np.testing.assert_allclose(drawn.Xty, cp.Xty, rtol=1e-10)
        assert drawn.yty == pytest.approx(cp.yty, rel=1e-11)


def test_replicates_equal_a_plain_refit_on_the_simulated_response() -> None:
    _, res = fit_case("sleep_rs", True)
    boot = res.bootstrap(5, seed=11)
    # the same draws, materialised as responses and fitted from a DataFrame
    sim = res.engine.simulator(res.theta, res.fe_params.to_numpy(), res.sigma)
    d = sim.draw(np.random.default_rng(11), 5)
    rng = np.random.default_rng(0)
    df = read_data("sleepstudy")
    for r in range(5):
        y = sim.response(d, r, rng)
        data = df.copy()
        data["Reaction"] = y
        model = lmefast.mixedlm("Reaction ~ Days", data, groups="Subject", re_formula="~Days")
        refit = model.fit(start_theta=res.theta)      # the bootstrap starts at θ̂ too
        row = boot.replicates.iloc[r]
        np.testing.assert_allclose(boot.theta[r], refit.theta, rtol=1e-6, atol=1e-9)
        # from the default start: the same optimum, within the optimiser's tolerance
        np.testing.assert_allclose(boot.theta[r], model.fit().theta, atol=1e-5)
        assert row["sigma"] == pytest.approx(refit.sigma, rel=1e-7)
        np.testing.assert_allclose(row[["Intercept", "Days"]].to_numpy(float),
                                   refit.fe_params.to_numpy(), rtol=1e-7)
        assert boot.objective[r] == pytest.approx(refit.objective, rel=1e-10)


def test_bootstrap_is_reproducible_and_centred() -> None:
    _, res = fit_case("sleep_rs", True)
    a = res.bootstrap(200, seed=5)
    b = res.bootstrap(200, seed=5, n_jobs=2)
    np.testing.assert_allclose(a.replicates.to_numpy(), b.replicates.to_numpy(), rtol=1e-12)
    assert a.converged.all()
    assert list(a.replicates.columns) == ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject",
                                          "sd_Days|Subject", "sigma", "Intercept", "Days"]
    # replicate means of β are within 4 bootstrap standard errors of β̂
    m = a.replicates[["Intercept", "Days"]].mean()
    se = a.replicates[["Intercept", "Days"]].std() / np.sqrt(200)
    assert np.all(np.abs(m - res.fe_params) < 4 * se)
    ci = a.conf_int(0.9)
    short = a.conf_int(0.9, kind="shortest")
    assert np.all(ci.iloc[:, 0] < ci.iloc[:, 1])
    assert np.all((short.iloc[:, 1] - short.iloc[:, 0]) <= (ci.iloc[:, 1] - ci.iloc[:, 0]) + 1e-12)
    boot_ci = res.conf_int(method="bootstrap", n_boot=200, seed=5, level=0.9)
    np.testing.assert_allclose(boot_ci.to_numpy(), ci.to_numpy())
    with pytest.raises(BootstrapError):
        res.bootstrap(0)


def test_simulate() -> None:
    _, res = fit_case("sleep_rs", True)
    ys = res.simulate(400, seed=1)
    assert ys.shape == (400, res.nobs)
    np.testing.assert_array_equal(ys, res.simulate(400, seed=1))
    # marginal mean Xβ̂ and marginal variance of one row: σ²(1 + z'TT'z)
    mean = res.model.spec.X @ res.fe_params.to_numpy()
    assert np.abs(ys.mean(axis=0) - mean).max() < 6 * 40 / np.sqrt(400)
    cond = res.simulate(400, seed=1, include_random=False)
    assert np.abs(cond.mean(axis=0) - res.fittedvalues).max() < 6 * res.sigma / np.sqrt(400)
    # the spread. Each row's sample variance over 400 draws estimates its variance with relative SE
    # sqrt(2/399) = 0.071. Marginal: σ²(1 + z'ΛΛ'z), z = (1, Days); rows of the 18 subjects are
    # independent, so the mean ratio has SE ≤ 0.071/sqrt(18) = 0.017: 0.1 is 6 SE (a simulator without
    # the residual noise gives 0.67 here, one without the random effects 0.33).
    df = read_data("sleepstudy")
    days = df["Days"].to_numpy(dtype=float)
    Z = np.column_stack([np.ones_like(days), days])
    T = np.array([[res.theta[0], 0.0], [res.theta[1], res.theta[2]]])
    marginal = res.scale * (1 + np.sum((Z @ T) ** 2, axis=1))
    assert np.mean(ys.var(axis=0, ddof=1) / marginal) == pytest.approx(1.0, abs=0.1)
    # and the covariance of two rows of one subject (days 0 and 9): σ² z₀'ΛΛ'z₉
    rows = np.nonzero(df["Subject"].to_numpy() == df["Subject"].iloc[0])[0]
    r0, r9 = rows[np.argmin(days[rows])], rows[np.argmax(days[rows])]
    cov09 = res.scale * float((Z[r0] @ T) @ (Z[r9] @ T))
    se09 = np.sqrt(marginal[r0] * marginal[r9] / 399)
    assert np.cov(ys[:, r0], ys[:, r9])[0, 1] == pytest.approx(cov09, abs=6 * se09)
    # conditional on the modes: σ² per row, the 180 rows independent (SE of the mean ratio 0.0053)
    assert np.mean(cond.var(axis=0, ddof=1) / res.scale) == pytest.approx(1.0, abs=0.03)
    assert np.corrcoef(cond[:, r0], cond[:, r9])[0, 1] == pytest.approx(0.0, abs=6 / np.sqrt(400))


def test_predict() -> None:
    _, res = fit_case("dietox_cat", True)
    df = read_data("dietox")
    np.testing.assert_allclose(res.predict(df, include_random=True), res.fittedvalues, rtol=1e-12)
    np.testing.assert_allclose(res.predict(include_random=True), res.fittedvalues)
    pop = res.predict(df, include_random=False)
    np.testing.assert_allclose(pop, res.model.spec.X @ res.fe_params.to_numpy(), rtol=1e-12)
    new = df.head(5).copy()
    new["Pig"] = -1
    np.testing.assert_allclose(res.predict(new, include_random=True), pop[:5], rtol=1e-12)
    with pytest.raises(PredictionError, match="not in the fit"):
        res.predict(new, include_random=True, new_levels="error")
    with pytest.raises(PredictionError, match=r"missing column\(s\) \['Time'\]"):
        res.predict(include_random=True, exog=df.drop(columns="Time"))
    with pytest.raises(PredictionError, match="grouping column 'Pig'"):
        res.predict(include_random=True, exog=df.drop(columns="Pig"))
    arr = res.predict(exog=res.model.spec.X[:3], exog_re=np.column_stack([np.ones(3), df["Time"][:3]]),
                      groups=df["Pig"][:3], include_random=True)
    np.testing.assert_allclose(arr, res.fittedvalues[:3], rtol=1e-12)
