"""lmefast.lmer (lme4's formula syntax) against lme4 1.1-31 on every case of tests/data/cases.json, REML and
ML, fitted from the case's "lme4" formula; the lmer fit against the statsmodels-form fit of the same model;
the results interface of lmer fits (lme4's shapes: random effects per grouping factor).

The comparison with lme4 is test_reference's: the reference values are at the optimum (lme4 refitted at
tight tolerances) and every value is compared with lme4's directly, with test_reference's tolerances
(justified there by how far from the optimum our optimiser may stop). θ follows lme4's order, so
res.theta is compared with lme4's theta directly.

Names: lme4 calls a second uncorrelated term on a factor 'Subject.1' (we merge it into 'Subject'), and
the nested factor of (1|batch/cask) 'cask:batch' with levels 'a:A' (ours: 'batch:cask', levels 'A:a').
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import (
    ALL_IDS,
    ONE_FACTOR_IDS,
    Reference,
    case_by_id,
    fit_case,
    fit_lmer_case,
    load_reference,
    read_data,
)
from test_reference import (
    ATOL_ZERO,
    LLF_TOL,
    OBJ_TOL,
    RTOL_BLUP,
    RTOL_FE,
    RTOL_SE,
    RTOL_SIGMA2,
    RTOL_VC,
    assert_near,
    fe_name,
    rel_scale,
    term_scale,
)

import lmefast
from lmefast.multi import BlockedEngine

RTOL_THETA = 1e-4   # θ moves at most sqrt(OBJ_TOL) = 1e-4 of its standard error (see test_reference)


# -- names: lme4's → ours ----------------------------------------------------------------------------------
def coef_name(lme4_name: str, ours: list[str]) -> str:
    """A fixed or random coefficient: same name, or lme4's 'CuCu035' → our 'Cu[T.Cu035]'."""
    return lme4_name if lme4_name in ours else fe_name(lme4_name, ours)


def factor_name(lme4_grp: str, ours: list[str]) -> str:
    """A grouping factor: same name; 'Subject.1' (lme4's name for the second of several terms on
    Subject) → 'Subject'; 'cask:batch' → 'batch:cask' (the same factors, in the order of a/b)."""
    if lme4_grp in ours:
        return lme4_grp
    base = re.sub(r"\.\d+$", "", lme4_grp)
    if base in ours:
        return base
    hits = [o for o in ours if sorted(o.split(":")) == sorted(lme4_grp.split(":"))]
    assert len(hits) == 1, f"no grouping factor of ours for lme4's {lme4_grp!r} (ours: {ours})"
    return hits[0]


def level_name(lme4_grp: str, our_grp: str, level: str) -> str:
    """lme4's level of an interaction factor → ours ('a:A' of cask:batch → 'A:a' of batch:cask)."""
    theirs, mine = lme4_grp.split(":"), our_grp.split(":")
    if len(theirs) == 1 or theirs == mine:
        return level
    parts = dict(zip(theirs, level.split(":"), strict=True))
    return ":".join(parts[f] for f in mine)


def factor_names(res: lmefast.MixedLMResults) -> list[str]:
    return list(res.random_effects)


def ranef_frames(res: lmefast.MixedLMResults) -> dict[str, pd.DataFrame]:
    """Conditional modes per grouping factor: levels (as strings) × coefficient names."""
    return {g: df.set_axis([str(i) for i in df.index], axis=0) for g, df in res.random_effects.items()}


# -- quantities in lme4's layout ---------------------------------------------------------------------------
def fixef_of(res: lmefast.MixedLMResults, ref: Reference) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ours = list(res.fe_params.index)
    names = [coef_name(n, ours) for n in ref.fixef]
    return res.fe_params[names].to_numpy(), res.bse_fe[names].to_numpy(), names


def varcorr_key(res: lmefast.MixedLMResults, e: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """Our varcorr row (grp, var1, var2) for lme4's row e."""
    if e["grp"] == "Residual":
        return ("Residual", None, None)
    grp = factor_name(e["grp"], factor_names(res))
    coefs = list(res.varcorr().query("grp == @grp")["var1"])
    return (grp, coef_name(e["var1"], coefs), None if e["var2"] is None else coef_name(e["var2"], coefs))


def our_varcorr(res: lmefast.MixedLMResults) -> dict[tuple[str, str | None, str | None], tuple[float, float]]:
    out = {}
    for row in res.varcorr().itertuples(index=False):
        v1 = None if row.var1 is None or (isinstance(row.var1, float) and np.isnan(row.var1)) else row.var1
        v2 = None if row.var2 is None or (isinstance(row.var2, float) and np.isnan(row.var2)) else row.var2
        key = (row.grp, v1, v2)
        assert key not in out, f"duplicate varcorr row {key}"
        out[key] = (float(row.vcov), float(row.sdcor))
    return out


def varcorr_of(res: lmefast.MixedLMResults, ref: Reference) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Our (vcov, sdcor) for each of lme4's varcorr rows, in lme4's order."""
    ours = our_varcorr(res)
    vcov, sdcor, labels = [], [], []
    for e in ref.varcorr:
        key = varcorr_key(res, e)
        assert key in ours, f"lme4's varcorr row {e} (ours {key}) missing from {list(ours)}"
        vcov.append(ours[key][0])
        sdcor.append(ours[key][1])
        labels.append("/".join(str(k) for k in key))
    return np.array(vcov), np.array(sdcor), labels


def ranef_of(res: lmefast.MixedLMResults, grp: str, rt: Any) -> np.ndarray:
    frames = ranef_frames(res)
    ours = factor_name(grp, list(frames))
    frame = frames[ours]
    cols = [coef_name(t, list(frame.columns)) for t in rt.terms]
    rows = [level_name(grp, ours, lev) for lev in rt.levels]
    return frame.loc[rows, cols].to_numpy(dtype=float)


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(params=ALL_IDS)
def case_id(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lfits(case_id: str, reml: bool) -> dict[str, Any]:
    model, res = fit_lmer_case(case_id, reml)
    return {"model": model, "res": res, "ref": load_reference(case_id, reml)}


# -- 1. every case from its lme4 formula vs lme4 -----------------------------------------------------------
def test_model_and_results_types(lfits: dict[str, Any]) -> None:
    """Every lmer model is a MixedLM on lme4's API; several grouping factors run on the blocked engine
    (a MixedLMResults too)."""
    model, res, ref = lfits["model"], lfits["res"], lfits["ref"]
    assert isinstance(res, lmefast.MixedLMResults)
    assert isinstance(model, lmefast.MixedLM) and model.api == "lme4"
    assert isinstance(model.engine, BlockedEngine) == (len(ref.raw["ngroups"]) > 1)


def test_converged(lfits: dict[str, Any]) -> None:
    res = lfits["res"]
    assert res.converged is True
    assert np.all(np.isfinite(res.optsummary.projected_gradient))


def test_loglik_is_lme4s(lfits: dict[str, Any]) -> None:
    """lme4's reference is at the optimum: our log-likelihood is no better (to rounding) and within
    LLF_TOL of it."""
    res, ref = lfits["res"], lfits["ref"]
    rounding = 1e-11 * abs(ref.loglik)
    assert res.llf <= ref.loglik + rounding, "better than the optimum: reference not at it?"
    assert res.llf >= ref.loglik - LLF_TOL - rounding, f"llf {res.llf!r} < lme4's {ref.loglik!r}"


def test_aic_bic_are_lme4s(lfits: dict[str, Any]) -> None:
    """aic/bic are lme4's (same parameter count), to the objectives' gap."""
    res, ref = lfits["res"], lfits["ref"]
    tol = OBJ_TOL + 1e-11 * abs(ref.objective)
    assert res.aic == pytest.approx(float(ref.raw["aic"]), abs=tol)
    assert res.bic == pytest.approx(float(ref.raw["bic"]), abs=tol)


def test_objective_at_lme4s_theta(lfits: dict[str, Any]) -> None:
    """θ is in lme4's order: our objective at lme4's θ̂ is lme4's objective, with lme4's σ and β."""
    model, res, ref = lfits["model"], lfits["res"], lfits["ref"]
    assert res.theta.shape == ref.theta.shape
    sol = model.objective(res.reml).solve(ref.theta)
    assert sol.objective == pytest.approx(ref.objective, rel=1e-10, abs=1e-9)
    assert np.sqrt(sol.sigma2) == pytest.approx(ref.sigma, rel=1e-7)
    _, _, names = fixef_of(res, ref)
    beta = pd.Series(sol.beta, index=res.fe_params.index)[names].to_numpy()
    np.testing.assert_allclose(beta, list(ref.fixef.values()), rtol=1e-7, atol=1e-9)


def test_fixed_effects(lfits: dict[str, Any]) -> None:
    res, ref = lfits["res"], lfits["ref"]
    ours, _, names = fixef_of(res, ref)
    lme4 = np.array(list(ref.fixef.values()))
    assert_near("fixed effects", ours, lme4, rel_scale(lme4, RTOL_FE, ATOL_ZERO), RTOL_FE, names)


def test_fixed_effect_standard_errors(lfits: dict[str, Any]) -> None:
    res, ref = lfits["res"], lfits["ref"]
    _, ours, names = fixef_of(res, ref)
    lme4 = np.array([ref.se_fixef[n] for n in ref.fixef])
    assert_near("fixed-effect SEs", ours, lme4, np.abs(lme4), RTOL_SE, names)
    cp = res.cov_params()
    np.testing.assert_allclose(np.sqrt(np.diag(cp.loc[names, names].to_numpy())), ours, rtol=1e-12)


def test_theta(lfits: dict[str, Any]) -> None:
    res, ref = lfits["res"], lfits["ref"]
    assert_near("theta", res.theta, ref.theta, rel_scale(ref.theta, RTOL_THETA, ATOL_ZERO), RTOL_THETA)


def test_sigma(lfits: dict[str, Any]) -> None:
    res, ref = lfits["res"], lfits["ref"]
    # σ² to RTOL_SIGMA2, so σ to half of it
    assert res.sigma == pytest.approx(ref.sigma, rel=RTOL_SIGMA2 / 2)
    assert res.scale == pytest.approx(res.sigma**2, rel=1e-14)


def test_varcorr_rows_are_lme4s(lfits: dict[str, Any]) -> None:
    """Exactly lme4's rows: one per variance, one per correlated pair, the residual; no more."""
    res, ref = lfits["res"], lfits["ref"]
    theirs = [varcorr_key(res, e) for e in ref.varcorr]
    assert len(set(theirs)) == len(theirs)
    assert set(our_varcorr(res)) == set(theirs)
    assert list(res.varcorr().columns) == ["grp", "var1", "var2", "vcov", "sdcor"]


def test_varcorr_values(lfits: dict[str, Any]) -> None:
    """vcov and sdcor of every row. A covariance is compared on the scale of the variances it couples
    and a correlation on the scale 1 (the same tolerance, in correlation units)."""
    res, ref = lfits["res"], lfits["ref"]
    ours_v, ours_s, labels = varcorr_of(res, ref)
    lme4_v = np.array([float(e["vcov"]) for e in ref.varcorr])
    lme4_s = np.array([float(e["sdcor"]) for e in ref.varcorr])
    sl_v, sl_s = rel_scale(lme4_v, RTOL_VC, ATOL_ZERO), rel_scale(lme4_s, RTOL_VC, ATOL_ZERO)
    diag = {(e["grp"], e["var1"]): i for i, e in enumerate(ref.varcorr) if e["var2"] is None}
    for i, e in enumerate(ref.varcorr):
        if e["var2"] is not None:
            a, b = diag[(e["grp"], e["var1"])], diag[(e["grp"], e["var2"])]
            sl_v[i] = max(sl_v[i], np.sqrt(lme4_v[a] * lme4_v[b]))
            sl_s[i] = 1.0
    assert_near("varcorr vcov", ours_v, lme4_v, sl_v, RTOL_VC, labels)
    assert_near("varcorr sdcor", ours_s, lme4_s, sl_s, RTOL_VC, labels)


def fresh_lmer_fit(case_id: str, reml: bool) -> lmefast.MixedLMResults:
    """A new lmer fit of a case (not the session's cached one): nothing asked of it yet."""
    case = case_by_id(case_id)
    return lmefast.lmer(case["lme4"], read_data(case["data"]), reml=reml)


def test_blups(lfits: dict[str, Any], case_id: str, reml: bool) -> None:
    """lme4's ranef, per factor and term, on the scale of that term's values: random_effects is the
    first thing asked of a new fit (nothing else evaluated the objective since the optimiser stopped)."""
    ref = lfits["ref"]
    res = fresh_lmer_fit(case_id, reml)
    assert res.llf == pytest.approx(lfits["res"].llf, rel=1e-14)
    assert ref.ranef
    for grp, rt in ref.ranef.items():
        ours = ranef_of(res, grp, rt)
        labels = [f"{grp}[{lev}, {t}]" for lev in rt.levels for t in rt.terms]
        assert_near(f"BLUPs of {grp}", ours, rt.values, term_scale(rt.values), RTOL_BLUP, labels)


def test_singular_flag(lfits: dict[str, Any]) -> None:
    res, ref = lfits["res"], lfits["ref"]
    assert res.singular == ref.singular
    assert res.optsummary.singular == ref.singular


def test_groups(lfits: dict[str, Any]) -> None:
    """random_effects: per grouping factor (lme4's API, whatever the number of factors), with lme4's
    levels."""
    res, ref = lfits["res"], lfits["ref"]
    assert res.nobs == ref.raw["nobs"]
    frames = ranef_frames(res)
    ngroups = {factor_name(g, factor_names(res)): n for g, n in ref.raw["ngroups"].items()}
    assert {g: len(f) for g, f in frames.items()} == ngroups
    assert res.n_groups == ngroups
    for grp, rt in ref.ranef.items():
        ours = factor_name(grp, list(frames))
        assert sorted(frames[ours].index) == sorted(level_name(grp, ours, lev) for lev in rt.levels)


# -- 2. lmer form == statsmodels form ----------------------------------------------------------------------
SM_IDS = [*ONE_FACTOR_IDS, "pastes_nested", "penicillin_crossed"]


def _intercept(name: str) -> str:
    return "Intercept" if name == "(Intercept)" else name


@pytest.mark.parametrize("sm_id", SM_IDS)
def test_lmer_equals_statsmodels_form(sm_id: str, reml: bool) -> None:
    _, sm = fit_case(sm_id, reml)
    _, lm = fit_lmer_case(sm_id, reml)
    assert lm.llf == pytest.approx(sm.llf, rel=0, abs=1e-8)
    assert [_intercept(n) for n in lm.fe_params.index] == list(sm.fe_params.index)
    np.testing.assert_allclose(lm.fe_params.to_numpy(), sm.fe_params.to_numpy(), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(lm.bse_fe.to_numpy(), sm.bse_fe.to_numpy(), rtol=1e-6)
    assert lm.scale == pytest.approx(sm.scale, rel=1e-6)
    # the same variance parameters (statsmodels' form orders a nested factor after its parent)
    np.testing.assert_allclose(np.sort(lm.theta), np.sort(sm.theta), rtol=1e-5, atol=1e-7)
    assert lm.singular == sm.singular
    assert lm.nobs == sm.nobs


# -- 6. results of lmer fits -------------------------------------------------------------------------------
def test_fitted_plus_resid_is_y(case_id: str, reml: bool) -> None:
    _, res = fit_lmer_case(case_id, reml)
    case = case_by_id(case_id)
    y = read_data(case["data"])[case["lme4"].split("~")[0].strip()].to_numpy(dtype=float)
    fitted, resid = np.asarray(res.fittedvalues), np.asarray(res.resid)
    assert fitted.shape == resid.shape == y.shape
    np.testing.assert_allclose(fitted + resid, y, rtol=1e-13, atol=1e-10 * np.max(np.abs(y)))


def x_beta_plus_z_b(df: pd.DataFrame, X: np.ndarray, beta: np.ndarray,
                    modes: dict[str, pd.DataFrame]) -> np.ndarray:
    """Xβ + Σ_factors Z b, from the data: modes[grp] has one row per level ('a:b' for an interaction
    factor 'f:g', in that order) and one column per coefficient ('(Intercept)' or a data column)."""
    out = X @ beta
    for grp, frame in modes.items():
        key = df[grp.split(":")[0]].astype(str)
        for part in grp.split(":")[1:]:
            key = key + ":" + df[part].astype(str)
        b = frame.loc[key.to_list()]
        for coef in frame.columns:
            z = np.ones(len(df)) if coef == "(Intercept)" else df[coef].to_numpy(dtype=float)
            out = out + z * b[coef].to_numpy()
    return out


def test_fitted_values_at_the_optimum(case_id: str, reml: bool) -> None:
    """fittedvalues and resid of a new fit (asked first) are lme4's Xβ̂ + Zb̂ (from the reference's
    fixef and ranef) and y minus it, to RTOL_BLUP of the response's spread (β̂ and b̂ are held to
    RTOL_FE and RTOL_BLUP of their own sizes)."""
    res = fresh_lmer_fit(case_id, reml)
    ref = load_reference(case_id, reml)
    case = case_by_id(case_id)
    df = read_data(case["data"])
    model = fit_lmer_case(case_id, reml)[0]
    X = model.exog
    ours = list(res.fe_params.index)
    beta = pd.Series(list(ref.fixef.values()), index=[coef_name(n, ours) for n in ref.fixef])
    modes = {g: pd.DataFrame(rt.values, index=rt.levels, columns=rt.terms) for g, rt in ref.ranef.items()}
    lme4 = x_beta_plus_z_b(df, X, beta[list(res.fe_params.index)].to_numpy(), modes)
    y = df[case["lme4"].split("~")[0].strip()].to_numpy(dtype=float)
    tol = RTOL_BLUP * np.std(y)
    assert np.max(np.abs(np.asarray(res.fittedvalues) - lme4)) <= tol
    assert np.max(np.abs(np.asarray(res.resid) - (y - lme4))) <= tol


def test_fitted_values_are_x_beta_plus_z_b(case_id: str, reml: bool) -> None:
    """fittedvalues = Xβ̂ + Σ_factors Z b̂, built here from the data and random_effects."""
    model, res = fit_lmer_case(case_id, reml)
    df = read_data(case_by_id(case_id)["data"])
    X = model.exog
    expected = x_beta_plus_z_b(df, X, res.fe_params.to_numpy(), ranef_frames(res))
    np.testing.assert_allclose(res.fittedvalues, expected, rtol=1e-10, atol=1e-10)


def test_varcorr_of_crossed_and_nested_models(reml: bool) -> None:
    """One row per factor (in θ order: most levels first), then the residual; consistent with cov_re,
    theta and sigma."""
    for case_id, factors in [("penicillin_crossed", ["plate", "sample"]),
                             ("pastes_nested", ["cask:batch", "batch"])]:     # lme4's names
        _, res = fit_lmer_case(case_id, reml)
        vc = res.varcorr()
        assert list(vc["grp"]) == [*factors, "Residual"]
        assert list(res.cov_re) == factors
        for i, f in enumerate(factors):
            assert vc["vcov"].iloc[i] == pytest.approx(res.cov_re[f].iloc[0, 0], rel=1e-12)
            assert vc["vcov"].iloc[i] == pytest.approx(res.scale * res.theta[i] ** 2, rel=1e-12)
            assert vc["sdcor"].iloc[i] == pytest.approx(np.sqrt(vc["vcov"].iloc[i]), rel=1e-12)
        assert vc["vcov"].iloc[-1] == pytest.approx(res.scale, rel=1e-14)
        assert vc["sdcor"].iloc[-1] == pytest.approx(res.sigma, rel=1e-14)


def test_summary_mentions_every_term(case_id: str, reml: bool) -> None:
    """Every grouping factor and every random coefficient appears in summary(), as do the fixed effects."""
    _, res = fit_lmer_case(case_id, reml)
    text = str(res.summary())
    for name in res.fe_params.index:
        assert name in text
    for grp, frame in ranef_frames(res).items():
        assert grp in text, f"grouping factor {grp!r} not in the summary:\n{text}"
        for coef in frame.columns:
            assert coef in text


def test_params_bse_cov_params(case_id: str, reml: bool) -> None:
    _, res = fit_lmer_case(case_id, reml)
    p = len(res.fe_params)
    assert list(res.params.index[:p]) == list(res.fe_params.index)
    np.testing.assert_array_equal(res.params.to_numpy()[:p], res.fe_params.to_numpy())
    assert len(res.params) == p + res.theta.size
    cp = res.cov_params()
    assert list(cp.index) == list(cp.columns) == list(res.params.index)
    np.testing.assert_allclose(cp.to_numpy()[:p, :p], cp.to_numpy()[:p, :p].T, rtol=1e-12)
    np.testing.assert_allclose(res.bse.to_numpy()[:p], res.bse_fe.to_numpy(), rtol=1e-12)
    if not res.singular:
        assert np.all(np.isfinite(res.bse.to_numpy())) and np.all(res.bse.to_numpy() > 0)


def test_cov_re_is_scale_t_tprime(case_id: str, reml: bool) -> None:
    """cov_re (per factor: lme4's API) agrees with varcorr's variances and covariances."""
    _, res = fit_lmer_case(case_id, reml)
    cov = res.cov_re
    vc = our_varcorr(res)
    for grp, c in cov.items():
        names = list(c.index)
        for i, a in enumerate(names):
            assert vc[(grp, a, None)][0] == pytest.approx(c.loc[a, a], rel=1e-12, abs=1e-300)
            for b in names[i + 1:]:
                if (grp, a, b) in vc:
                    assert vc[(grp, a, b)][0] == pytest.approx(c.loc[a, b], rel=1e-12, abs=1e-300)
                else:  # uncorrelated terms: no row, and a zero covariance
                    assert c.loc[a, b] == 0.0


def test_lmer_passes_fit_kwargs(reml: bool) -> None:
    """lmer(..., reml=, **fit_kwargs) is lmer_model(...).fit(reml=, **fit_kwargs)."""
    case = case_by_id("penicillin_crossed")
    df = read_data(case["data"])
    _, cached = fit_lmer_case("penicillin_crossed", reml)
    start = np.array([0.5, 2.0])
    a = lmefast.lmer(case["lme4"], df, reml=reml, start_params=start)
    b = lmefast.lmer_model(case["lme4"], df).fit(reml=reml, start_params=start)
    assert a.reml is reml and a.llf == b.llf
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.llf == pytest.approx(cached.llf, abs=1e-7)
