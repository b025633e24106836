"""Public behaviour against lme4 / lmerTest values made by tests/data/make_extra_reference.R
(tests/data/reference/extra.json): likelihood-ratio tests (anova(m0, m1)), type-3 ANOVA with
Kenward-Roger df, and parametric-bootstrap intervals (bootMer) in distribution; the refusals of anova."""
from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import pytest
from conftest import DATA_DIR, fit_case, fit_lmer_case, read_data
from test_inference import RTOL_DF, _check_p
from test_reference import LLF_TOL, OBJ_TOL

import lmefast
from lmefast.inference import InferenceError


@cache
def _extra() -> dict[str, Any]:
    with open(DATA_DIR / "reference" / "extra.json") as fh:
        return json.load(fh)


def _entry(section: str, case_id: str) -> dict[str, Any]:
    return next(e for e in _extra()[section] if e["id"] == case_id)


# -- likelihood-ratio tests -------------------------------------------------------------------------
LRT_IDS = [e["id"] for e in _extra()["lrtest"]]


@pytest.mark.parametrize("case_id", LRT_IDS)
def test_lrtest_matches_lme4_anova(case_id: str) -> None:
    """Both fits at the optimum (ours within OBJ_TOL of it, see test_reference): logLik to LLF_TOL,
    deviances, AIC, BIC and χ² to twice OBJ_TOL; the p-value as test_inference's _check_p."""
    ref = _entry("lrtest", case_id)
    df = read_data(ref["data"])
    fits = [lmefast.lmer(f, df, reml=ref["reml"]) for f in ref["formulas"]]
    tab = lmefast.lrtest(*fits, refit=False)
    np.testing.assert_array_equal(tab["npar"].to_numpy(), ref["npar"])
    tol = 2 * OBJ_TOL + 1e-11 * max(abs(v) for v in ref["deviance"])
    np.testing.assert_allclose(tab["logLik"], ref["logLik"], rtol=0, atol=LLF_TOL + tol / 2)
    for col in ("deviance", "AIC", "BIC"):
        np.testing.assert_allclose(tab[col], ref[col], rtol=0, atol=tol, err_msg=col)
    assert tab["Chisq"].iloc[1] == pytest.approx(ref["Chisq"], abs=tol)
    assert tab["Df"].iloc[1] == ref["Df"]
    _check_p(np.array([tab["Pr(>Chisq)"].iloc[1]]), np.array([ref["p"]]))


def test_lrtest_refits_reml_fits_by_ml_as_lme4() -> None:
    """REML fits with different fixed effects: lrtest refits them by ML (refit='auto'), giving lme4's
    anova of the ML fits."""
    ref = _entry("lrtest", "dietox_cu_ml")
    df = read_data(ref["data"])
    reml_fits = [lmefast.lmer(f, df) for f in ref["formulas"]]
    tab = lmefast.lrtest(*reml_fits)
    assert list(tab["method"]) == ["ML", "ML"]
    tol = 2 * OBJ_TOL + 1e-11 * max(abs(v) for v in ref["deviance"])
    np.testing.assert_allclose(tab["deviance"], ref["deviance"], rtol=0, atol=tol)
    assert tab["Chisq"].iloc[1] == pytest.approx(ref["Chisq"], abs=tol)
    _check_p(np.array([tab["Pr(>Chisq)"].iloc[1]]), np.array([ref["p"]]))


# -- ANOVA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", [e["id"] for e in _extra()["anova_kr"]])
def test_anova_kenward_roger_matches_lmertest(case_id: str) -> None:
    ref = _entry("anova_kr", case_id)
    _, res = fit_case(case_id, True)
    tab = res.anova(ddf="kenward-roger")
    assert list(tab.index) == ref["terms"]
    # F from the Kenward-Roger-adjusted covariance: as test_inference's Satterthwaite F (2.5e-4)
    np.testing.assert_allclose(tab["F"], ref["F"], rtol=2.5e-4)
    np.testing.assert_allclose(tab["num_df"], ref["NumDF"])
    np.testing.assert_allclose(tab["den_df"], ref["DenDF"], rtol=RTOL_DF)
    _check_p(tab["p"].to_numpy(), np.array(ref["p"], dtype=float))


def test_anova_refuses_what_it_does_not_compute() -> None:
    _, res = fit_case("dietox_cat", True)
    for t in (1, 2):
        with pytest.raises(InferenceError, match=f"only type=3 .* not type={t}"):
            res.anova(type=t)
    df = read_data("dietox")
    inter = lmefast.mixedlm("Weight ~ Time * Cu", df, groups="Pig", re_formula="~Time").fit()
    for ddf in ("satterthwaite", "kenward-roger"):
        with pytest.raises(InferenceError, match="contained in an interaction"):
            inter.anova(ddf=ddf)
    # the interaction's own columns can still be tested jointly, with either df
    cols = [c for c in inter.fe_params.index if ":" in c]
    assert len(cols) == 2
    L = np.zeros((2, len(inter.fe_params)))
    L[[0, 1], [list(inter.fe_params.index).index(c) for c in cols]] = 1.0
    for ddf in ("satterthwaite", "kenward-roger"):
        joint = inter.t_test(L, ddf=ddf, joint=True)
        assert joint["num_df"].iloc[0] == 2 and np.isfinite(joint["F"].iloc[0]) and joint["den_df"].iloc[0] > 0


# -- parametric bootstrap --------------------------------------------------------------------------------
def _quantile_se(x: np.ndarray, p: float, z: float = 2.0) -> float:
    """Distribution-free standard error of the p-quantile of a sample: half the spread of the order
    statistics at ranks N p ± z sqrt(N p (1 − p)), divided by z (the binomial count below the
    quantile has that standard deviation)."""
    x = np.sort(x)
    n = x.size
    m = z * np.sqrt(n * p * (1 - p))
    lo, hi = int(np.floor(n * p - m)), int(np.ceil(n * p + m))
    return float((x[min(hi, n - 1)] - x[max(lo, 0)]) / (2 * z))


BOOT = {"sleep_rs": 1000, "penicillin_crossed": 1000}


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(BOOT))
def test_bootstrap_intervals_match_bootmer_in_distribution(case_id: str) -> None:
    """Our percentile intervals (our seed) and lme4's bootMer's (its seed), each from 1000 replicates:
    independent estimates of the same quantiles, so they differ by a difference of two sample
    quantiles. Each end must be within 4 standard errors of that difference (a fixed seed on each side:
    the comparison is deterministic; at 4 SE a correct bootstrap fails with probability 6e-5 per end).
    The replicate spreads are compared too (a bootstrap without the residual or the random-effect
    noise is far outside)."""
    ref = _entry("bootstrap", case_id)
    res = fit_lmer_case(case_id, True)[1] if case_id == "penicillin_crossed" else fit_case(case_id, True)[1]
    boot = res.bootstrap(BOOT[case_id], seed=11)
    assert boot.converged.all()
    ours = boot.replicates
    rename = {"(Intercept)": "Intercept"} if "Intercept" in ours.columns else {}
    level = 0.95
    ci = boot.conf_int(level)
    for j, name in enumerate(ref["names"]):
        col = rename.get(name, name)
        theirs = np.asarray(ref["replicates"][j], dtype=float)
        theirs = theirs[np.isfinite(theirs)]
        mine = ours[col].to_numpy(dtype=float)
        for end, p in enumerate(((1 - level) / 2, (1 + level) / 2)):
            q_ref = float(np.quantile(theirs, p))
            se = np.hypot(_quantile_se(mine, p), _quantile_se(theirs, p))
            got = ci.loc[col].iloc[end]
            # a quantile at a boundary (a standard deviation at 0 in ≥ 2.5% of replicates) is exact
            assert abs(got - q_ref) <= 4 * se + 1e-9 * abs(q_ref), (
                f"{name}: our {p:.3f} quantile {got!r}, bootMer's {q_ref!r} (4 SE = {4 * se:.3g})")
        # spreads: sample standard deviations of N = 1000 replicates differ by ~sqrt(1/N) relative each
        assert np.std(mine) == pytest.approx(np.std(theirs), rel=4 * np.sqrt(2 / len(theirs)) + 0.05)


def test_percentile_intervals_are_quantiles_of_the_replicates() -> None:
    """conf_int's percentile ends are np.quantile of each replicate column at (1 ∓ level)/2; the
    shortest interval is the narrowest window holding ceil(level N) sorted replicates."""
    _, res = fit_case("sleep_rs", True)
    boot = res.bootstrap(101, seed=2)
    X = boot.replicates.to_numpy()
    for level in (0.5, 0.9, 0.95):
        a = (1 - level) / 2
        ci = boot.conf_int(level).to_numpy()
        np.testing.assert_allclose(ci[:, 0], np.quantile(X, a, axis=0), rtol=1e-14)
        np.testing.assert_allclose(ci[:, 1], np.quantile(X, 1 - a, axis=0), rtol=1e-14)
        short = boot.conf_int(level, kind="shortest").to_numpy()
        h = int(np.ceil(level * X.shape[0]))
        for j in range(X.shape[1]):
            x = np.sort(X[:, j])
            held = np.sum((X[:, j] >= short[j, 0]) & (X[:, j] <= short[j, 1]))
            assert held >= h
            assert short[j, 1] - short[j, 0] == pytest.approx(np.min(x[h - 1:] - x[:x.size - h + 1]), rel=1e-14)
