"""statsmodels' API, meaning for meaning (issue 9): the differences that used to be silent
(free=, variance components without re_formula, predict(), unknown keywords, start_params),
MixedLMParams, the model's statsmodels attributes and methods, contrast results, summaries,
save/load. statsmodels is the reference wherever the two models agree (a test-only
dependency)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import IgnoredArgumentWarning, MixedLM, MixedLMParams, SingularFitWarning

sm = pytest.importorskip("statsmodels.regression.mixed_linear_model")


# -- data -----------------------------------------------------------------------------------------
def _slopes_data(seed: int = 4279) -> tuple[np.ndarray, ...]:
    """statsmodels' test_vcomp_1 design: two random slopes per group, 100 groups of 4."""
    rs = np.random.RandomState(seed)
    exog = rs.normal(size=(400, 1))
    exog_re = rs.normal(size=(400, 2))
    groups = np.kron(np.arange(100), np.ones(4))
    slopes = rs.normal(size=(100, 2))
    slopes[:, 1] *= 2
    errors = (np.kron(slopes, np.ones((4, 1))) * exog_re).sum(1) + rs.normal(size=400)
    return exog.sum(1) + errors, exog, groups, exog_re


def _vc_dict(groups: np.ndarray, exog_re: np.ndarray) -> dict:
    out: dict = {"a": {}, "b": {}}
    for g in np.unique(groups):
        ix = np.flatnonzero(groups == g)
        out["a"][g] = exog_re[ix, 0:1]
        out["b"][g] = exog_re[ix, 1:2]
    return out


def _three_slopes(seed: int = 11) -> pd.DataFrame:
    rs = np.random.RandomState(seed)
    n, m = 600, 60
    g = np.repeat(np.arange(m), n // m)
    df = pd.DataFrame({"g": g, "x": rs.normal(size=n), "z1": rs.normal(size=n), "z2": rs.normal(size=n)})
    b = rs.normal(size=(m, 3)) * [1.0, 0.7, 0.5]
    df["y"] = (1 + df.x + b[g, 0] + b[g, 1] * df.z1 + b[g, 2] * df.z2 + rs.normal(size=n))
    return df


def _free(k_fe: int, cov: np.ndarray, k_vc: int = 0) -> MixedLMParams:
    free = MixedLMParams(k_fe, cov.shape[0], k_vc)
    free.fe_params = np.ones(k_fe)
    free.cov_re = cov
    free.vcomp = np.ones(k_vc)
    return free


# -- silent differences ---------------------------------------------------------------------------
def test_free_diagonal_is_the_constrained_fit() -> None:
    """fit(free=identity) fits uncorrelated slopes: statsmodels' log-likelihood, lme4's `||`
    model (the same fit by another front end), and the covariance held at 0."""
    endog, exog, groups, exog_re = _slopes_data()
    model = MixedLM(endog, exog, groups, exog_re=exog_re)
    res = model.fit(free=_free(1, np.eye(2)))
    full = model.fit()
    assert res.llf < full.llf - 1e-3       # the constraint binds on these data
    assert isinstance(res.params, np.ndarray)          # array data: arrays, as statsmodels
    assert res.cov_re[0, 1] == 0.0
    assert res.model.data.param_names == ["x1", "x_re1 Var", "x_re1 x x_re2 Cov", "x_re2 Var"]
    assert res.params[2] == 0.0
    smfree = sm.MixedLMParams.from_components(np.ones(1), np.eye(2), vcomp=np.zeros(0))
    smres = sm.MixedLM(endog, exog, groups, exog_re=exog_re).fit(free=smfree)
    assert res.llf == pytest.approx(smres.llf, abs=1e-4)
    assert res.llf >= smres.llf - 1e-8
    df = pd.DataFrame({"y": endog, "x": exog[:, 0], "g": groups, "z1": exog_re[:, 0], "z2": exog_re[:, 1]})
    lme4 = lmefast.lmer("y ~ 0 + x + (0 + z1 + z2 || g)", df)
    assert res.llf == pytest.approx(lme4.llf, abs=1e-8)
    np.testing.assert_allclose(np.diag(res.cov_re), np.diag(lme4.cov_re["g"]), rtol=1e-5)


def test_free_block_pattern_in_any_order() -> None:
    """Coefficients 0 and 2 correlated, 1 independent: the block-diagonal fit, whichever order
    the blocks are written in (checked against statsmodels' constrained fit)."""
    df = _three_slopes()
    model = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1 + z2")
    free = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    res = model.fit(free=_free(2, free))
    cov = res.cov_re.to_numpy()
    assert cov[0, 1] == 0.0 and cov[1, 2] == 0.0 and cov[0, 2] != 0.0
    smmodel = sm.MixedLM.from_formula("y ~ x", df, groups="g", re_formula="~z1 + z2")
    smfree = sm.MixedLMParams.from_components(np.ones(2), free.astype(float), vcomp=np.zeros(0))
    smres = smmodel.fit(free=smfree)
    assert res.llf >= smres.llf - 1e-6
    assert res.llf == pytest.approx(smres.llf, abs=1e-3)


def test_free_patterns_that_cannot_be_fitted_raise() -> None:
    df = _three_slopes()
    model = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1 + z2")
    chain = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    with pytest.raises(NotImplementedError, match="groups of mutually correlated"):
        model.fit(free=_free(2, chain))
    fixed_variance = np.diag([1.0, 0.0, 1.0])
    with pytest.raises(NotImplementedError, match="fixed"):
        model.fit(free=_free(2, fixed_variance))
    with pytest.raises(TypeError, match="MixedLMParams"):
        model.fit(free=np.eye(3))


def test_variance_components_without_re_formula_add_no_intercept() -> None:
    """statsmodels' test_vcomp_1: exog_vc alone is two variance components and nothing else
    (llf −773.73 with them alone; a random intercept besides gives another model)."""
    endog, exog, groups, exog_re = _slopes_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)     # the dict format is lmefast's own
        res = MixedLM(endog, exog, groups, exog_vc=_vc_dict(groups, exog_re)).fit()
    assert res.k_re == 0 and len(res.params) == 3
    with pytest.warns(FutureWarning):
        smres = sm.MixedLM(endog, exog, groups, exog_vc=_vc_dict(groups, exog_re)).fit()
    assert res.llf == pytest.approx(smres.llf, abs=1e-4)
    assert res.llf == pytest.approx(-774.150, abs=1e-3)     # statsmodels' test_vcomp_1
    with_intercept = MixedLM(endog, exog, groups, exog_re=np.ones(400), exog_vc=_vc_dict(groups, exog_re)).fit()
    assert with_intercept.llf == pytest.approx(-773.73, abs=5e-3)   # what lmefast fitted before
    # the formula spelling: vc_formula without re_formula
    df = pd.DataFrame({"y": endog, "x": exog[:, 0], "g": groups, "z1": exog_re[:, 0], "z2": exog_re[:, 1]})
    vcf = {"a": "0 + z1", "b": "0 + z2"}
    fres = lmefast.mixedlm("y ~ 0 + x", df, groups="g", vc_formula=vcf).fit()
    assert fres.llf == pytest.approx(res.llf, abs=1e-8)
    smf = sm.MixedLM.from_formula("y ~ 0 + x", df, groups="g", vc_formula=vcf).fit()
    assert fres.llf == pytest.approx(smf.llf, abs=1e-4)
    # with re_formula='1' the intercept is there, as in statsmodels
    both = lmefast.mixedlm("y ~ 0 + x", df, groups="g", re_formula="1", vc_formula=vcf).fit()
    assert both.k_re == 1


def test_predict_is_the_fixed_part() -> None:
    df = _three_slopes()
    res = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1").fit()
    X = np.column_stack([np.ones(len(df)), df.x])
    np.testing.assert_allclose(res.predict(), X @ res.fe_params.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.predict(df.iloc[:7]), X[:7] @ res.fe_params.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.predict(X[:5]), X[:5] @ res.fe_params.to_numpy(), rtol=1e-12)
    # the conditional prediction under its own argument
    np.testing.assert_allclose(res.predict(include_random=True), res.fittedvalues, rtol=1e-12)
    assert np.max(np.abs(res.predict(include_random=True) - res.predict())) > 0.1
    # the model's predict: statsmodels' predict(params, exog)
    np.testing.assert_allclose(res.model.predict(res.params), res.predict(), rtol=1e-12)
    np.testing.assert_allclose(res.model.predict(res.params_object, exog=X[:3]), res.predict()[:3], rtol=1e-12)


def test_unknown_keywords_raise_and_statsmodels_keywords_warn() -> None:
    df = _three_slopes()
    model = lmefast.mixedlm("y ~ x", df, groups="g")
    with pytest.raises(TypeError, match="maxiterr"):
        model.fit(maxiterr=1)
    with pytest.raises(TypeError, match="weightz"):
        lmefast.lmer("y ~ x + (1 | g)", df, weightz=np.ones(len(df)))
    with pytest.raises(TypeError, match="bogus"):
        lmefast.mixedlm("y ~ x", df, groups="g", bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        MixedLM.from_formula("y ~ x", df, groups="g", bogus=1)
    ref = model.fit()
    for kw in ({"cov_type": "hc1"}, {"gtol": 1e-7}, {"method": "cg"}, {"use_sqrt": False},
               {"method": ["bfgs", "lbfgs"], "maxls": 5}):
        with pytest.warns(IgnoredArgumentWarning, match="Argument.*" + next(iter(kw))):
            res = model.fit(**kw)
        assert res.llf == pytest.approx(ref.llf, abs=1e-10)
    with pytest.warns(IgnoredArgumentWarning, match="use_sparse"):
        MixedLM.from_formula("y ~ x", df, groups="g", use_sparse=True)
    with pytest.raises(NotImplementedError, match="penal"):
        model.fit(fe_pen=object())


def test_start_params_are_statsmodels_parameters() -> None:
    """A packed vector (with or without β; Cholesky factor by rows and √vcomp with use_sqrt,
    the default) or a MixedLMParams; θ under start_theta."""
    df = _three_slopes()
    model = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1")
    L = np.array([[1.5, 0.0], [0.3, 0.8]])
    packed = np.array([0.1, 0.2, L[0, 0], L[1, 0], L[1, 1]])
    theta = np.array([L[0, 0], L[1, 0], L[1, 1]])      # lme4's order: by column
    for start in (packed, packed[2:], MixedLMParams.from_components(np.zeros(2), cov_re_sqrt=L)):
        res = model.fit(start_params=start)
        np.testing.assert_allclose(res.optsummary.theta_initial, theta, rtol=1e-12)
    np.testing.assert_allclose(model.fit(start_theta=theta).optsummary.theta_initial, theta)
    plain = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1")
    plain.use_sqrt = False          # statsmodels' use_sqrt=False: cov_re's lower triangle
    cov = L @ L.T
    res = plain.fit(start_params=np.array([cov[0, 0], cov[1, 0], cov[1, 1]]))
    np.testing.assert_allclose(res.optsummary.theta_initial, theta, rtol=1e-12)
    with pytest.raises(ValueError, match="packed parameter vector"):
        model.fit(start_params=np.ones(4))
    with pytest.raises(TypeError, match="not both"):
        model.fit(start_params=packed, start_theta=theta)


def test_singular_fit_warns() -> None:
    """statsmodels' test_singular data, with the class means taken out of Y so that there is
    no group variance at all (on the raw data the REML optimum is interior, θ = 0.0222, as
    lme4 finds: statsmodels and lmefast before its second start stopped at θ = 0); lmefast's
    own warning class."""
    rs = np.random.RandomState(3423)
    df = pd.DataFrame(rs.randn(100, 2), columns=["Y", "X"])
    df["class"] = np.arange(100) % 3
    df["Y"] -= df.groupby("class")["Y"].transform("mean")
    with pytest.warns(SingularFitWarning, match="singular"):
        res = lmefast.mixedlm("Y ~ X", df, groups=df["class"]).fit()
    assert res.singular
    assert "singular" in str(res.summary())


def test_full_output_keeps_the_path() -> None:
    df = _three_slopes()
    res = lmefast.mixedlm("y ~ x", df, groups="g").fit(full_output=True)
    assert len(res.hist) == res.optsummary.n_iter
    assert res.hist[-1]["objective"] == pytest.approx(res.objective, rel=1e-10)


# -- MixedLMParams ------------------------------------------------------------------------------
@pytest.mark.parametrize("use_sqrt", [True, False])
@pytest.mark.parametrize("has_fe", [True, False])
def test_mixedlmparams_as_statsmodels(use_sqrt: bool, has_fe: bool) -> None:
    rs = np.random.RandomState(5)
    A = rs.normal(size=(3, 3))
    cov = A @ A.T
    fe, vc = rs.normal(size=2), rs.uniform(size=2)
    ours = MixedLMParams.from_components(fe, cov, vcomp=vc)
    theirs = sm.MixedLMParams.from_components(fe, cov, vcomp=vc)
    packed = ours.get_packed(use_sqrt=use_sqrt, has_fe=has_fe)
    np.testing.assert_allclose(packed, theirs.get_packed(use_sqrt=use_sqrt, has_fe=has_fe), rtol=1e-12)
    back = MixedLMParams.from_packed(packed, 2, 3, use_sqrt, has_fe)
    ref = sm.MixedLMParams.from_packed(packed, 2, 3, use_sqrt, has_fe)
    for name in ("fe_params", "cov_re", "vcomp"):
        np.testing.assert_allclose(getattr(back, name), getattr(ref, name), rtol=1e-12, atol=1e-14)
    assert (back.k_fe, back.k_re, back.k_vc, back.k_re2, back.k_tot) == (
        ref.k_fe, ref.k_re, ref.k_vc, ref.k_re2, ref.k_tot)


# -- the model in statsmodels' parametrisation ------------------------------------------------------
def _sm_pair(reml: bool):
    df = _three_slopes()
    df["v"] = np.tile([0, 1], len(df) // 2)
    df["y"] += np.random.RandomState(3).normal(size=(60, 2))[df.g, df.v]
    vcf = {"c": "0 + C(v)"}
    ours = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1", vc_formula=vcf)
    theirs = sm.MixedLM.from_formula("y ~ x", df, groups="g", re_formula="~z1", vc_formula=vcf)
    theirs.reml = reml
    theirs.cov_pen = theirs.fe_pen = None
    theirs._freepat = None
    return ours, theirs


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("profile_fe", [True, False])
def test_loglike_score_hessian_are_statsmodels(reml: bool, profile_fe: bool) -> None:
    ours, theirs = _sm_pair(reml)
    params = sm.MixedLMParams.from_components(np.array([0.8, 1.1]), np.array([[1.2, 0.3], [0.3, 0.6]]),
                                              vcomp=np.array([0.4]))
    mine = MixedLMParams.from_components(params.fe_params, params.cov_re, vcomp=params.vcomp)
    assert ours.loglike(mine, profile_fe=profile_fe, reml=reml) == pytest.approx(
        theirs.loglike(params, profile_fe=profile_fe), rel=1e-9)
    theirs.use_sqrt = ours.use_sqrt = False
    np.testing.assert_allclose(ours.score(mine, profile_fe=profile_fe, reml=reml),
                               theirs.score(params, profile_fe=profile_fe), rtol=1e-5, atol=1e-6)
    if not profile_fe:
        # statsmodels' Hessian is that of its log-likelihood at the estimate (its own test's
        # check), so both are taken at the estimate
        mine = ours.fit(reml=reml).params_object
        at = sm.MixedLMParams.from_components(mine.fe_params, mine.cov_re, vcomp=mine.vcomp)
        H, singular = ours.hessian(mine, reml=reml)
        Hs, _ = theirs.hessian(at)
        assert not singular
        np.testing.assert_allclose(H, Hs, rtol=1e-3, atol=1e-4 * np.abs(Hs).max())


def test_loglike_at_the_fit_and_helpers() -> None:
    ours, _ = _sm_pair(True)
    res = ours.fit()
    assert ours.loglike(res.params_object) == pytest.approx(res.llf, rel=1e-12)
    ml = ours.fit(reml=False)
    assert ours.loglike(ml.params_object) == pytest.approx(ml.llf, rel=1e-12)   # its criterion
    packed = res.params_object.get_packed(use_sqrt=True, has_fe=True)
    assert ours.loglike(packed, reml=True) == pytest.approx(res.llf, rel=1e-12)
    assert ours.loglike(res.params, reml=True) < res.llf    # ψ read as a Cholesky factor: another point
    po = res.params_object
    np.testing.assert_allclose(ours.get_fe_params(po.cov_re, po.vcomp), res.fe_params, rtol=1e-10)
    assert ours.get_scale(res.fe_params, po.cov_re, po.vcomp) == pytest.approx(res.scale, rel=1e-10)
    np.testing.assert_allclose(res.cov_re_unscaled, res.cov_re / res.scale, rtol=1e-14)
    np.testing.assert_allclose(po.cov_re, res.cov_re_unscaled, rtol=1e-12)
    np.testing.assert_allclose(po.vcomp, res.vcomp / res.scale, rtol=1e-12)


def test_model_attributes_are_statsmodels() -> None:
    ours, theirs = _sm_pair(True)
    np.testing.assert_array_equal(ours.endog, theirs.endog)
    np.testing.assert_array_equal(ours.exog, theirs.exog)
    np.testing.assert_array_equal(ours.exog_re, theirs.exog_re)
    np.testing.assert_array_equal(ours.groups, theirs.groups)
    assert ours.group_labels == list(theirs.group_labels)
    for i, lab in enumerate(theirs.group_labels):
        np.testing.assert_array_equal(ours.row_indices[lab], theirs.row_indices[lab])
        np.testing.assert_array_equal(ours.exog_vc["c"][lab], theirs.exog_vc.mats[0][i])
    for name in ("k_fe", "k_re", "k_vc", "n_groups"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.data.xnames == theirs.data.xnames
    assert ours.data.exog_re_names == theirs.data.exog_re_names
    assert ours.data.exog_re_names_full == theirs.data.exog_re_names_full
    assert ours.data.param_names == theirs.data.param_names
    # unnamed arrays: statsmodels' default names
    m = MixedLM(np.arange(10.0), np.column_stack([np.ones(10), np.arange(10.0) % 3]), np.repeat([0, 1], 5),
                exog_re=np.ones(10))
    assert m.exog_names == ["const", "x1"] and m.exog_re_names == ["x_re1"]


# -- results ------------------------------------------------------------------------------------
def test_t_test_is_a_contrast_results_object() -> None:
    df = _three_slopes()
    res = lmefast.mixedlm("y ~ x", df, groups="g").fit()
    tt = res.t_test(np.eye(2))
    np.testing.assert_allclose(tt.effect, res.fe_params, rtol=1e-14)
    np.testing.assert_allclose(tt.sd, res.bse_fe, rtol=1e-12)
    np.testing.assert_allclose(tt.tvalue, res.fe_params / res.bse_fe, rtol=1e-12)
    np.testing.assert_allclose(tt.pvalue, res.pvalues.iloc[:2], rtol=1e-10)   # z tests by default
    assert np.all(np.isinf(tt.df_denom))
    np.testing.assert_allclose(tt.conf_int(), res.conf_int().iloc[:2].to_numpy(), rtol=1e-12)
    assert "(z)" in tt.summary() and "(t)" in res.t_test(np.eye(2), ddf="residual").summary()
    sat = res.t_test("x = 0", ddf="satterthwaite")
    assert np.isfinite(sat.df_denom[0]) and sat.pvalue[0] >= tt.pvalue[1]
    with pytest.raises(ValueError, match="should have 2 columns"):
        res.t_test(np.eye(3))
    f = res.f_test(np.eye(2))
    w = res.wald_test(np.eye(2))
    assert w.statistic == pytest.approx(2 * f.fvalue, rel=1e-12)
    assert w.pvalue == pytest.approx(f.pvalue, rel=1e-10)
    b = res.fe_params.to_numpy()
    C = res.cov_params().iloc[:2, :2].to_numpy()
    assert w.statistic == pytest.approx(b @ np.linalg.solve(C, b), rel=1e-10)


def test_summary_object() -> None:
    df = _three_slopes()
    res = lmefast.mixedlm("y ~ x", df, groups="g").fit()
    s = res.summary()
    assert list(s.tables[1].index) == ["Intercept", "x", "g Var"]
    s2 = res.summary(xname_fe=["const", "slope"], xname_re=["group var"], title="My model")
    assert list(s2.tables[1].index) == ["const", "slope", "group var"]
    assert s2.title == "My model" and "My model" in s2.as_text() and "slope" in s2.as_html()
    assert "slope" in s2.as_latex()
    assert str(res.summary()) == s.as_text()
    with pytest.raises(ValueError, match="xname_fe"):
        res.summary(xname_fe=["one"])


def test_save_load_and_remove_data(tmp_path) -> None:
    df = _three_slopes()
    res = lmefast.mixedlm("y ~ x", df, groups="g", re_formula="~z1").fit()
    path = tmp_path / "res.pkl"
    res.save(path)
    back = lmefast.MixedLMResults.load(path)
    pd.testing.assert_series_equal(back.params, res.params)
    np.testing.assert_array_equal(back.fittedvalues, res.fittedvalues)
    res.remove_data()
    assert "Coef." in str(res.summary())
