"""Issue 4 for models with several grouping factors (lmer fits on the blocked engine): Satterthwaite and
Kenward-Roger tests, Wald and profile intervals against lmerTest / pbkrtest / lme4 on the crossed
(penicillin) and nested (pastes) reference cases; Kenward-Roger against a dense n × n transliteration
of pbkrtest; parametric bootstrap, simulation, prediction and likelihood-ratio tests."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import case_by_id, fit_lmer_case, load_reference, read_data

import lmefast
from lmefast import multi
from lmefast.inference import InferenceError, kenward_roger_parts
from lmefast.multi import BlockedEngine, MultiSimulator, compute_multi_crossprods
from lmefast.predict import PredictionError
from lmefast.profile import canonical_name, sdcor_from_theta, theta_from_sdcor

MULTI_IDS = ["penicillin_crossed", "pastes_nested"]
RTOL_DF = 1e-3
RTOL_P = 1e-3
RTOL_PROFILE = 1e-3
RTOL_WALD = 1e-5


def _fit(case_id: str, reml: bool) -> lmefast.MixedLMResults:
    _, res = fit_lmer_case(case_id, reml)
    assert isinstance(res.engine, BlockedEngine)
    return res


def _at_lme4_theta(case_id: str, reml: bool) -> lmefast.MixedLMResults:
    """Our results object evaluated at lme4's θ̂ (isolates the inference code from the optimum)."""
    res = _fit(case_id, reml)
    obj = res.model.objective(reml)
    sol = obj.solve(load_reference(case_id, reml).theta)
    return lmefast.MixedLMResults(res.model, obj, sol, res.optsummary)


def _ours(names: list[str], ours: list[str]) -> list[str]:
    """lme4's parameter names → ours (the same; the parts of an interaction factor in any order)."""
    canon = {canonical_name(o): o for o in ours}
    return [canon[canonical_name(n)] for n in names]


# -- Satterthwaite and Kenward-Roger --------------------------------------------------------------
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_satterthwaite_matches_lmertest(case_id: str, reml: bool) -> None:
    ref = load_reference(case_id, reml)
    df_ref = float(np.ravel(ref.raw["df_satterthwaite"])[0])
    p_ref = float(np.ravel(ref.raw["p_satterthwaite"])[0])
    # at lme4's θ̂ the computation itself agrees far inside the targets
    exact = _at_lme4_theta(case_id, reml).coef_table(ddf="satterthwaite")
    assert exact["df"].iloc[0] == pytest.approx(df_ref, rel=1e-5)
    assert exact["p"].iloc[0] == pytest.approx(p_ref, rel=1e-4)
    res = _fit(case_id, reml)
    ct = res.coef_table(ddf="satterthwaite")
    assert ct["df"].iloc[0] == pytest.approx(df_ref, rel=RTOL_DF)
    if ct["p"].iloc[0] != pytest.approx(p_ref, rel=RTOL_P):
        # penicillin REML: p ≈ 4e-7 moves by 1e-3 relative for a 1e-4 change in df; lme4 stopped
        # short of the optimum (its REML criterion is higher than ours), and at its θ̂ p agrees
        assert res.objective < ref.objective
        assert ct["p"].iloc[0] == pytest.approx(p_ref, rel=2 * RTOL_P)


@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_kenward_roger_matches_pbkrtest(case_id: str) -> None:
    ref = load_reference(case_id, True)
    kr_ref = float(np.ravel(ref.raw["df_kenward_roger"])[0])
    ct = _fit(case_id, True).coef_table(ddf="kenward-roger")
    assert ct["df"].iloc[0] == pytest.approx(kr_ref, rel=RTOL_DF)
    exact = _at_lme4_theta(case_id, True).coef_table(ddf="kenward-roger")
    assert exact["df"].iloc[0] == pytest.approx(kr_ref, rel=1e-8)
    assert list(ct.columns) == ["estimate", "std_err", "df", "t", "p", "ci_lower", "ci_upper"]


def _crossed_sleepstudy() -> pd.DataFrame:
    """sleepstudy with a crossed factor 'site' (7 levels) that carries signal."""
    df = read_data("sleepstudy")
    rng = np.random.default_rng(4)
    df["site"] = [f"s{i % 7}" for i in range(len(df))]
    df["Reaction"] += rng.normal(0, 15, 7)[np.arange(len(df)) % 7] + rng.normal(0, 3, 7)[
        np.arange(len(df)) % 7] * df["Days"]
    return df


def _dense_pbkrtest(res: lmefast.MixedLMResults) -> tuple[np.ndarray, np.ndarray]:
    """pbkrtest's vcovAdj transliterated with dense n × n matrices: (PhiA, W)."""
    model = res.model
    X = model.X
    n = X.shape[0]
    V = res.scale * np.eye(n)
    G = []
    for t, T in zip(model.terms, model.theta_map.Ts(res.theta), strict=True):
        Zfull = np.zeros((n, t.m * t.k))
        for a in range(t.k):
            Zfull[np.arange(n), t.codes * t.k + a] = t.Z[:, a]
        V += Zfull @ np.kron(np.eye(t.m), res.scale * T @ T.T) @ Zfull.T
        for a, b in zip(*t.pattern, strict=True):
            E = np.zeros((t.k, t.k))
            E[a, b] = E[b, a] = 1.0
            G.append(Zfull @ np.kron(np.eye(t.m), E) @ Zfull.T)
    G.append(np.eye(n))
    Vi = np.linalg.inv(V)
    Phi = np.linalg.inv(X.T @ Vi @ X)
    R = len(G)
    P = [-X.T @ Vi @ Gr @ Vi @ X for Gr in G]
    Q = [[X.T @ Vi @ Gr @ Vi @ Gs @ Vi @ X for Gs in G] for Gr in G]
    IE2 = np.array([[np.trace(Vi @ G[r] @ Vi @ G[s]) - 2 * np.trace(Phi @ Q[r][s])
                     + np.trace(Phi @ P[r] @ Phi @ P[s]) for s in range(R)] for r in range(R)])
    W = 2 * np.linalg.inv(IE2)
    U = sum(W[r, s] * (Q[r][s] - P[r] @ Phi @ P[s]) for r in range(R) for s in range(R))
    return Phi + 2 * Phi @ U @ Phi, W


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (Days | Subject) + (1 | site)",
                                     "Reaction ~ Days + (1 | Subject) + (1 + Days || site)"])
def test_kenward_roger_equals_dense_pbkrtest(formula: str) -> None:
    res = lmefast.lmer(formula, _crossed_sleepstudy())
    assert isinstance(res.engine, BlockedEngine) and not res.singular
    PhiA, _, W = kenward_roger_parts(res)
    PhiA_d, W_d = _dense_pbkrtest(res)
    np.testing.assert_allclose(PhiA, PhiA_d, rtol=1e-8)
    np.testing.assert_allclose(W, W_d, rtol=1e-7, atol=1e-10 * np.abs(W_d).max())
    ct = res.coef_table(ddf="kenward-roger")
    np.testing.assert_allclose(ct["std_err"], np.sqrt(np.diag(PhiA_d)), rtol=1e-8)
    assert np.all(ct["df"] > 1) and np.all(np.isfinite(ct["df"]))
    joint = res.t_test("(Intercept) = 0, Days = 0", ddf="kenward-roger", joint=True)
    assert joint["num_df"].iloc[0] == 2 and np.isfinite(joint["den_df"].iloc[0])


def test_kenward_roger_needs_reml_and_states_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InferenceError, match="only available for REML"):
        _fit("penicillin_crossed", False).coef_table(ddf="kenward-roger")
    case = case_by_id("penicillin_crossed")
    res = lmefast.lmer(case["lme4"], read_data(case["data"]))
    monkeypatch.setattr(multi, "KR_MAX_RANDOM_EFFECTS", 10)
    limit = "q = 30 random effects.*KR_MAX_RANDOM_EFFECTS = 10.*satterthwaite"
    with pytest.raises(InferenceError, match=limit):
        res.coef_table(ddf="kenward-roger")


def test_tests_and_anova_with_a_covariate() -> None:
    res = lmefast.lmer("Reaction ~ Days + (Days | Subject) + (1 | site)", _crossed_sleepstudy())
    ct = res.coef_table(ddf="satterthwaite")
    tab = res.anova()
    assert list(tab.index) == ["Days"]
    assert tab.loc["Days", "F"] == pytest.approx(ct.loc["Days", "t"] ** 2, rel=1e-10)
    assert tab.loc["Days", "den_df"] == pytest.approx(ct.loc["Days", "df"], rel=1e-10)
    t = res.t_test("Days = 0")
    assert t["p"].iloc[0] == pytest.approx(ct.loc["Days", "p"], rel=1e-12)
    with pytest.raises(InferenceError, match="2 columns"):
        res.t_test(np.ones((1, 3)))
    assert "P>|t|" in str(res.summary(ddf="satterthwaite"))


# -- intervals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_wald_intervals_match_lme4(case_id: str, reml: bool) -> None:
    res = _fit(case_id, reml)
    ref = load_reference(case_id, reml).raw["confint_wald"]
    ci = res.conf_int(method="wald")
    got = ci.loc[_ours(ref["names"], list(ci.index))].to_numpy()
    want = np.column_stack([[np.nan if v is None else v for v in ref[s]] for s in ("lower", "upper")])
    np.testing.assert_allclose(got, want.astype(float), rtol=RTOL_WALD, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_profile_intervals_match_lme4(case_id: str) -> None:
    res = _fit(case_id, True)          # lme4 profiles REML fits on the ML deviance, as we do
    ref = load_reference(case_id, True).raw["confint_profile"]
    ci = res.conf_int(method="profile")
    assert list(ci.index)[-1] == "(Intercept)" and "sigma" in ci.index
    got = ci.loc[_ours(ref["names"], list(ci.index))].to_numpy()
    want = np.column_stack([ref["lower"], ref["upper"]]).astype(float)
    for g, w in zip(got.ravel(), want.ravel(), strict=True):
        if w == 0.0:
            assert g == 0.0                                # pastes: sd of batch, interval starts at 0
        else:
            assert g == pytest.approx(w, rel=RTOL_PROFILE)


@pytest.mark.slow
def test_parameter_names_and_profile_traces() -> None:
    res = _fit("pastes_nested", True)
    names = ["sd_(Intercept)|cask:batch", "sd_(Intercept)|batch", "sigma", "(Intercept)"]   # lme4's
    assert list(res.conf_int(method="wald").index) == names
    # the other order of the interaction's parts is accepted too
    a = res.conf_int(method="wald", parm="sd_(Intercept)|batch:cask")
    assert list(a.index) == ["sd_(Intercept)|cask:batch"]
    with pytest.raises(ValueError, match="unknown parameter"):
        res.conf_int(method="wald", parm="sd_(Intercept)|cask")
    tr = res.profile(parm=["sd_(Intercept)|batch:cask", "(Intercept)"], n_points=5)
    assert set(tr["parameter"]) == {"sd_(Intercept)|cask:batch", "(Intercept)"}
    for _, g in tr.groupby("parameter"):
        assert np.all(np.diff(g["zeta"].to_numpy()) > 0) and g["zeta"].abs().min() < 1e-6


def test_parameters_follow_theta_for_merged_uncorrelated_terms() -> None:
    """(1 + Days || site) after the larger factor Subject: lme4 orders θ as (0 + Days|site),
    (1|site); names, values and the map back to θ follow that order."""
    res = lmefast.lmer("Reaction ~ Days + (1 + Days || site) + (1 | Subject)", _crossed_sleepstudy())
    names, values = sdcor_from_theta(res, res.theta, res.sigma)
    assert names == ["sd_(Intercept)|Subject", "sd_Days|site", "sd_(Intercept)|site", "sigma"]
    vc = res.varcorr().set_index(["grp", "var1"])
    assert values[1] == pytest.approx(vc.loc[("site", "Days"), "sdcor"], rel=1e-12)
    theta, sigma = theta_from_sdcor(res, values)
    np.testing.assert_allclose(theta, res.theta, rtol=1e-12)
    ci = res.conf_int(method="profile", parm="sd_Days|site")
    assert ci.iloc[0, 0] < values[1] < ci.iloc[0, 1]


# -- bootstrap and simulation ---------------------------------------------------------------------
@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_replicate_crossproducts_are_those_of_the_response(case_id: str) -> None:
    res = _fit(case_id, True)
    sim = res.engine.simulator(res.theta, res.fe_params.to_numpy(), res.sigma)
    y = sim.response(np.random.default_rng(2))
    cp = compute_multi_crossprods(y, res.model.X, list(res.model.terms))
    got = sim.crossprods_of(y)
    np.testing.assert_allclose(got.S1, cp.S1, rtol=1e-12)
    np.testing.assert_allclose(got.c2, cp.c2, rtol=1e-12)
    np.testing.assert_allclose(got.Xty, cp.Xty, rtol=1e-12)
    assert got.yty == pytest.approx(cp.yty, rel=1e-12)


@pytest.mark.parametrize("case_id", MULTI_IDS)
def test_replicates_equal_a_plain_refit_on_the_simulated_response(case_id: str) -> None:
    res = _fit(case_id, True)
    case = case_by_id(case_id)
    boot = res.bootstrap(4, seed=7)
    seeds = MultiSimulator.seeds(7, 4)
    sim = res.engine.simulator(res.theta, res.fe_params.to_numpy(), res.sigma)
    response = res.model.endog_name
    for r in range(4):
        data = read_data(case["data"])
        data[response] = sim.response(np.random.default_rng(seeds[r]))
        refit = lmefast.lmer(case["lme4"], data, start_params=res.theta)   # started at θ̂, as the bootstrap
        np.testing.assert_allclose(boot.theta[r], refit.theta, rtol=1e-8, atol=1e-10)
        assert boot.objective[r] == pytest.approx(refit.objective, rel=1e-12)
        row = boot.replicates.iloc[r]
        assert row["sigma"] == pytest.approx(refit.sigma, rel=1e-8)
        assert row["(Intercept)"] == pytest.approx(refit.fe_params.iloc[0], rel=1e-10)
        # from the default start: the same optimum, within the optimiser's tolerance
        np.testing.assert_allclose(boot.theta[r], lmefast.lmer(case["lme4"], data).theta, atol=1e-4)


def test_bootstrap_is_reproducible_and_named() -> None:
    res = _fit("penicillin_crossed", True)
    a = res.bootstrap(100, seed=3)
    b = res.bootstrap(100, seed=3, n_jobs=1)
    # the same draws refitted on other threads: the same sums, but another thread's BLAS may round
    # differently, and each refit stops within the optimiser's tolerance (scaleout_cases.RTOL)
    A, B = a.replicates.to_numpy(), b.replicates.to_numpy()
    err = np.abs(A - B) / np.abs(A).max(axis=0)
    assert err.max() <= 1e-7, f"replicates differ by {err.max():.3g} of their column's scale"
    assert a.converged.all()
    assert list(a.replicates.columns) == ["sd_(Intercept)|plate", "sd_(Intercept)|sample", "sigma",
                                          "(Intercept)"]
    m, se = a.replicates["(Intercept)"].mean(), a.replicates["(Intercept)"].std() / 10
    assert abs(m - res.fe_params.iloc[0]) < 4 * se
    ci = res.conf_int(method="bootstrap", n_boot=100, seed=3, level=0.9)
    np.testing.assert_allclose(ci.to_numpy(), a.conf_int(0.9).to_numpy())
    assert np.all(ci.iloc[:, 0] < ci.iloc[:, 1])


def test_simulate() -> None:
    res = _fit("penicillin_crossed", True)
    ys = res.simulate(400, seed=1)
    assert ys.shape == (400, res.nobs)
    np.testing.assert_array_equal(ys, res.simulate(400, seed=1))
    # marginal mean Xβ̂; marginal variance σ²(1 + θ_plate² + θ_sample²)
    sd = res.sigma * np.sqrt(1 + np.sum(res.theta ** 2))
    assert np.abs(ys.mean(axis=0) - res.fe_params.iloc[0]).max() < 6 * sd / np.sqrt(400)
    assert np.median(ys.var(axis=0)) == pytest.approx(sd ** 2, rel=0.25)
    cond = res.simulate(400, seed=1, include_random=False)
    assert np.abs(cond.mean(axis=0) - res.fittedvalues).max() < 6 * res.sigma / np.sqrt(400)


# -- prediction ------------------------------------------------------------------------------------
def test_predict_nested() -> None:
    res = _fit("pastes_nested", True)
    df = read_data("Pastes")
    np.testing.assert_allclose(res.predict(df), res.fittedvalues, rtol=1e-12)
    np.testing.assert_allclose(res.predict(), res.fittedvalues)
    pop = res.predict(df, include_random=False)
    np.testing.assert_allclose(pop, res.fe_params.iloc[0])
    # a new cask in a known batch: the batch's effect only
    new = df.head(3).copy()
    new["cask"] = "zz"
    want = res.fe_params.iloc[0] + res.random_effects["batch"].loc[new["batch"], "(Intercept)"].to_numpy()
    np.testing.assert_allclose(res.predict(new), want, rtol=1e-12)
    with pytest.raises(PredictionError, match="not in the fit"):
        res.predict(new, new_levels="error")
    with pytest.raises(PredictionError, match=r"grouping column\(s\) \['cask'\]"):
        res.predict(df.drop(columns="cask"))
    with pytest.raises(PredictionError, match="need newdata"):
        res.predict(exog=np.ones((2, 1)))
    np.testing.assert_allclose(res.predict(exog=np.ones((2, 1)), include_random=False), pop[:2])


def test_predict_crossed_with_a_slope() -> None:
    df = _crossed_sleepstudy()
    res = lmefast.lmer("Reaction ~ Days + (Days | Subject) + (1 | site)", df)
    np.testing.assert_allclose(res.predict(df), res.fittedvalues, rtol=1e-12)
    with pytest.raises(PredictionError, match=r"missing column\(s\) \['Days'\]"):
        res.predict(df.drop(columns="Days"))
    new = df.head(2).copy()
    new["Subject"] = -1
    site = res.random_effects["site"].loc[new["site"], "(Intercept)"].to_numpy()
    np.testing.assert_allclose(res.predict(new), res.predict(new, include_random=False) + site, rtol=1e-12)


# -- likelihood-ratio tests -------------------------------------------------------------------------
def test_lrtest_between_one_and_several_factors() -> None:
    df = read_data("Pastes")
    one = lmefast.lmer("strength ~ 1 + (1 | batch)", df, reml=False)
    two = lmefast.lmer("strength ~ 1 + (1 | batch/cask)", df, reml=False)
    tab = lmefast.lrtest(two, one)
    assert list(tab["npar"]) == [3, 4]
    assert tab["Chisq"].iloc[1] == pytest.approx(one.objective - two.objective, rel=1e-12)
    reml = [lmefast.lmer(f, df) for f in ("strength ~ 1 + (1 | batch)", "strength ~ 1 + (1 | batch/cask)")]
    assert list(lmefast.lrtest(*reml)["method"]) == ["REML", "REML"]       # same fixed effects
    assert list(lmefast.lrtest(*reml, refit=True)["method"]) == ["ML", "ML"]
