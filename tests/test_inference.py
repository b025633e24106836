"""Issue 4: Satterthwaite / Kenward-Roger tests, contrasts, ANOVA, LRT, Wald and profile
intervals against lmerTest / pbkrtest / lme4 (tests/data/reference), on the one-factor cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ONE_FACTOR_IDS, fit_case, load_reference, read_data
from test_reference import RTOL_FE, RTOL_SE, fe_name

import lmefast
from lmefast import onefactor
from lmefast.inference import InferenceError

RTOL_DF = 1e-3
RTOL_P = 1e-3
RTOL_PROFILE = 1e-3
REML_IDS = ONE_FACTOR_IDS


def _vals(raw, names):
    if isinstance(raw, dict):
        return np.array([raw[n] for n in names], dtype=float)
    return np.array(raw if isinstance(raw, list) else [raw], dtype=float)


def _ref_names(ref):
    return list(ref.fixef)


def _check_p(ours: np.ndarray, theirs: np.ndarray) -> None:
    """p within 1e-3 relative; below 1e-9 (where a 1e-5 relative change in t moves p by more
    than 1e-3 relative, beyond the agreement of lme4's own optimum) log p within 1e-4."""
    for a, b in zip(ours, theirs, strict=True):
        if b == 0:
            assert a < 1e-300
        elif b >= 1e-9:
            assert a == pytest.approx(b, rel=RTOL_P)
        else:
            assert np.log(a) == pytest.approx(np.log(b), rel=1e-4)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case_id", ONE_FACTOR_IDS)
def test_satterthwaite_matches_lmertest(case_id: str, reml: bool) -> None:
    _, res = fit_case(case_id, reml)
    ref = load_reference(case_id, reml)
    names = _ref_names(ref)
    ours = [fe_name(n, list(res.fe_params.index)) for n in names]
    ct = res.coef_table(ddf="satterthwaite").loc[ours]
    np.testing.assert_allclose(ct["df"], _vals(ref.raw["df_satterthwaite"], names), rtol=RTOL_DF)
    _check_p(ct["p"].to_numpy(), _vals(ref.raw["p_satterthwaite"], names))
    assert list(ct.columns) == ["estimate", "std_err", "df", "t", "p", "ci_lower", "ci_upper"]


@pytest.mark.parametrize("case_id", ONE_FACTOR_IDS)
def test_kenward_roger_matches_pbkrtest(case_id: str) -> None:
    _, res = fit_case(case_id, True)
    ref = load_reference(case_id, True)
    names = _ref_names(ref)
    ours = [fe_name(n, list(res.fe_params.index)) for n in names]
    ct = res.coef_table(ddf="kenward-roger").loc[ours]
    np.testing.assert_allclose(ct["df"], _vals(ref.raw["df_kenward_roger"], names), rtol=RTOL_DF)
    # adjusted standard errors are at least the unadjusted ones
    assert np.all(ct["std_err"].to_numpy() >= res.bse_fe[ours].to_numpy() * (1 - 1e-12))


def test_kenward_roger_needs_reml_and_states_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ml = fit_case("sleep_rs", False)
    with pytest.raises(InferenceError, match="only available for REML"):
        ml.coef_table(ddf="kenward-roger")
    model = fit_case("dietox_rs", True)[0]
    res = model.fit()
    monkeypatch.setattr(onefactor, "KR_MAX_FLOPS", 1e3)
    with pytest.raises(InferenceError, match="limits are .* use ddf='satterthwaite'"):
        res.coef_table(ddf="kenward-roger")


def test_z_and_residual_tables() -> None:
    _, res = fit_case("sleep_rs", True)
    z = res.coef_table(ddf=None)
    assert "z" in z.columns and np.all(np.isinf(z["df"]))
    np.testing.assert_allclose(z["std_err"], res.bse_fe, rtol=1e-12)
    np.testing.assert_allclose(z["p"], res.pvalues.iloc[:2], rtol=1e-10)
    r = res.coef_table(ddf="residual")
    assert np.all(r["df"] == res.nobs - res.k_fe)
    with pytest.raises(InferenceError, match="ddf must be one of"):
        res.coef_table(ddf="bogus")


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case_id", ["dietox_cat", "orthodont", "sleep_rs", "dietox_ri"])
def test_anova_type3_matches_lmertest(case_id: str, reml: bool) -> None:
    _, res = fit_case(case_id, reml)
    ref = load_reference(case_id, reml).raw["anova_type3_satterthwaite"]
    terms = ref["terms"] if isinstance(ref["terms"], list) else [ref["terms"]]
    tab = res.anova()
    assert list(tab.index) == terms
    # F = t²: twice the standard errors' agreement with lme4 (1e-4 in test_reference)
    np.testing.assert_allclose(tab["F"], _vals(ref["F"], None), rtol=2.5e-4)
    np.testing.assert_allclose(tab["num_df"], _vals(ref["NumDF"], None))
    np.testing.assert_allclose(tab["den_df"], _vals(ref["DenDF"], None), rtol=RTOL_DF)
    _check_p(tab["p"].to_numpy(), _vals(ref["p"], None))


def test_t_test_string_and_matrix_agree_with_the_table() -> None:
    _, res = fit_case("dietox_cat", True)
    ct = res.coef_table()
    t = res.t_test("Time = 0", ddf="satterthwaite")
    assert t["t"].iloc[0] == pytest.approx(ct.loc["Time", "t"], rel=1e-12)
    assert t["df"].iloc[0] == pytest.approx(ct.loc["Time", "df"], rel=1e-12)
    L = np.array([[0, 0, 1, -1.0]])
    a = res.t_test(L, ddf="satterthwaite")
    b = res.t_test("Cu[T.Cu035] - Cu[T.Cu175] = 0", ddf="satterthwaite")
    np.testing.assert_allclose(a[["estimate", "std_err", "df", "p"]].to_numpy(),
                               b[["estimate", "std_err", "df", "p"]].to_numpy(), rtol=1e-12)
    shifted = res.t_test("2*Time = 14", ddf="satterthwaite")
    assert shifted["estimate"].iloc[0] == pytest.approx(2 * res.fe_params["Time"])
    assert shifted["t"].iloc[0] == pytest.approx((2 * res.fe_params["Time"] - 14) / (2 * res.bse_fe["Time"]))
    # a joint test of the Cu columns is the anova row
    joint = res.t_test("Cu[T.Cu035] = 0, Cu[T.Cu175] = 0", ddf="satterthwaite", joint=True)
    row = res.anova().loc["Cu"]
    assert joint["F"].iloc[0] == pytest.approx(row["F"], rel=1e-12)
    assert joint["den_df"].iloc[0] == pytest.approx(row["den_df"], rel=1e-12)


def test_bad_contrasts() -> None:
    _, res = fit_case("dietox_cat", True)
    with pytest.raises(InferenceError, match="4 columns"):
        res.t_test(np.ones((1, 3)))
    with pytest.raises(InferenceError, match="unknown term"):
        res.t_test("Weight = 0")
    with pytest.raises(InferenceError, match="unknown fixed effect"):
        res.t_test(pd.DataFrame({"Cu": [1.0]}))
    with pytest.raises(InferenceError, match="more than one '='"):
        res.t_test("Time = = 0")
    with pytest.raises(InferenceError, match="cannot parse"):
        res.t_test("Time * * 2 = 0")
    with pytest.raises(InferenceError, match="no fixed effect"):
        res.t_test("3 = 0")


def test_summary_with_ddf_shows_df_and_t() -> None:
    _, res = fit_case("sleep_rs", True)
    text = str(res.summary(ddf="satterthwaite"))
    assert "P>|t|" in text and " df " in text and "17.00" in text
    assert "P>|z|" in str(res.summary())


# -- likelihood-ratio tests -------------------------------------------------------------------------
def test_lrtest_is_the_difference_of_deviances() -> None:
    df = read_data("dietox")
    small = lmefast.mixedlm("Weight ~ Time", df, groups="Pig").fit(reml=False)
    big = lmefast.mixedlm("Weight ~ Time", df, groups="Pig", re_formula="~Time").fit(reml=False)
    tab = lmefast.lrtest(big, small, names=["slope", "intercept"])
    assert list(tab.index) == ["intercept", "slope"]          # sorted by parameters, as lme4
    assert tab["Chisq"].iloc[1] == pytest.approx(small.objective - big.objective, rel=1e-12)
    assert tab["Df"].iloc[1] == 2
    assert tab["logLik"].iloc[1] == pytest.approx(big.llf)
    assert tab["AIC"].iloc[0] == pytest.approx(small.aic)
    assert tab["BIC"].iloc[1] == pytest.approx(big.bic)


def test_lrtest_refits_reml_by_ml_when_fixed_effects_differ() -> None:
    df = read_data("dietox")
    a = lmefast.mixedlm("Weight ~ Time", df, groups="Pig", re_formula="~Time").fit()
    b = lmefast.mixedlm("Weight ~ Time + Cu", df, groups="Pig", re_formula="~Time").fit()
    tab = lmefast.lrtest(a, b)
    assert list(tab["method"]) == ["ML", "ML"]
    a_ml, b_ml = a.model.fit(reml=False), b.model.fit(reml=False)
    assert tab["Chisq"].iloc[1] == pytest.approx(a_ml.objective - b_ml.objective, rel=1e-8)
    # same fixed effects: the REML fits are compared as they are (refit='auto')
    c = lmefast.mixedlm("Weight ~ Time", df, groups="Pig").fit()
    tab2 = lmefast.lrtest(c, a)
    assert list(tab2["method"]) == ["REML", "REML"]
    assert tab2["Chisq"].iloc[1] == pytest.approx(c.objective - a.objective, rel=1e-12)
    assert list(lmefast.lrtest(c, a, refit=True)["method"]) == ["ML", "ML"]
    with pytest.raises(InferenceError, match="at least two"):
        lmefast.lrtest(a)
    other = lmefast.mixedlm("Yield ~ 1", read_data("Dyestuff"), groups="Batch").fit()
    with pytest.raises(InferenceError, match="same number of rows"):
        lmefast.lrtest(a, other)


# -- intervals ------------------------------------------------------------------------------------
def _lme4_to_ours(name: str, ours: list[str], fe: list[str]) -> str:
    if name in ours:
        return name
    if name == "(Intercept)" or name in fe or not name.startswith(("sd_", "cor_")):
        return fe_name(name, fe)
    coef, grp = name[3:].split("|")
    hits = [o for o in ours if o.startswith("sd_")
            and (o[3:].split("|")[0] == coef and o.split("|")[1].split(":")[0] == grp
                 or o[3:].split("|")[0] in grp.split(":"))]
    assert len(hits) == 1, (name, ours)
    return hits[0]


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case_id", ONE_FACTOR_IDS)
def test_wald_intervals_match_lme4(case_id: str, reml: bool) -> None:
    _, res = fit_case(case_id, reml)
    ref = load_reference(case_id, reml).raw["confint_wald"]
    ci = res.conf_int(method="wald")
    names = [_lme4_to_ours(n, list(ci.index), list(res.fe_params.index)) for n in ref["names"]]
    want = np.column_stack([[np.nan if v is None else v for v in ref[s]] for s in ("lower", "upper")])
    got = ci.loc[names].to_numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want.astype(float)))
    # β̂ ± z SE: each end moves by the error of β̂ plus z times that of the SE, both held to
    # test_reference's tolerances (RTOL_FE of |β̂|, RTOL_SE of the SE; β̂ is the middle, z SE the half-width)
    want = want.astype(float)
    rows = ~np.isnan(want[:, 0])
    got, want = got[rows], want[rows]
    mid, half = want.mean(axis=1, keepdims=True), np.diff(want, axis=1) / 2
    tol = RTOL_FE * np.abs(mid) + RTOL_SE * half
    assert np.all(np.abs(got - want) <= tol), (names, got, want, tol)


def test_conf_int_without_method_is_statsmodels_layout() -> None:
    _, res = fit_case("sleep_rs", True)
    ci = res.conf_int()
    assert list(ci.columns) == [0, 1] and list(ci.index) == list(res.params.index)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ONE_FACTOR_IDS)
def test_profile_intervals_match_lme4(case_id: str) -> None:
    # lme4 profiles REML fits on the ML deviance: both references agree; check the REML fit
    _, res = fit_case(case_id, True)
    ref = load_reference(case_id, True).raw["confint_profile"]
    ci = res.conf_int(method="profile")
    names = [_lme4_to_ours(n, list(ci.index), list(res.fe_params.index)) for n in ref["names"]]
    got = ci.loc[names].to_numpy()
    want = np.column_stack([ref["lower"], ref["upper"]]).astype(float)
    for g, w, n in zip(got.ravel(), want.ravel(), np.repeat(names, 2), strict=True):
        if w in (0.0, -1.0, 1.0) and not n.startswith(("sigma",)) and n not in res.fe_params.index:
            assert g == pytest.approx(w, abs=1e-9), n     # the interval ends at the boundary
        else:
            assert g == pytest.approx(w, rel=RTOL_PROFILE), n


def test_profile_traces_and_boundary() -> None:
    _, res = fit_case("dyestuff2_singular", True)
    ci = res.conf_int(method="profile", level=0.9)
    assert ci.loc["sd_(Intercept)|Batch"].iloc[0] == 0.0     # a zero variance: starts at 0
    assert list(ci.columns) == ["5.0 %", "95.0 %"]
    tr = res.profile(parm="sigma", n_points=7)
    assert set(tr["parameter"]) == {"sigma"}
    assert np.all(np.diff(tr["zeta"].to_numpy()) > 0)       # ζ increases through the estimate
    assert tr["zeta"].abs().min() < 1e-6
    with pytest.raises(ValueError, match="unknown parameter"):
        res.conf_int(method="profile", parm="sd_nothing")
    with pytest.raises(ValueError, match="method must be"):
        res.conf_int(method="bayes")
