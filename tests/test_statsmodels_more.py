"""statsmodels features beyond the fit (issue 9): ``fit_regularized``, ``profile_re``,
``get_distribution`` and the formulas' ``eval_env``, checked against independent sources —
statsmodels itself (a test-only comparison peer), dense linear algebra written out here, and
statsmodels' own random draws — with tolerances that a 1% error cannot pass."""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest

statsmodels = pytest.importorskip("statsmodels")

import statsmodels.formula.api as smf  # noqa: E402
from statsmodels.base import _penalties as penalties  # noqa: E402
from statsmodels.regression.mixed_linear_model import MixedLM as SMMixedLM  # noqa: E402
from statsmodels.regression.mixed_linear_model import MixedLMParams as SMParams  # noqa: E402

import lmefast  # noqa: E402
from lmefast import datasets  # noqa: E402
from lmefast.errors import SpecificationError  # noqa: E402


def _quiet(f, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kwargs)


# -- data -----------------------------------------------------------------------------------------
def _five_predictors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """statsmodels' test_regularized data: two of five predictors matter."""
    rs = np.random.RandomState(3453)
    exog = rs.normal(size=(400, 5))
    groups = np.kron(np.arange(100), np.ones(4))
    endog = exog[:, 0] - exog[:, 2] + np.kron(rs.normal(size=100), np.ones(4)) + rs.normal(size=400)
    return endog, exog, groups


def _orthodont() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthodont with an intercept, age, a sex indicator and two pure-noise columns."""
    df = datasets.load_orthodont()
    rs = np.random.RandomState(17)
    n = len(df)
    exog = np.column_stack([np.ones(n), df["age"].to_numpy(float) - 11.0,
                            (df["Sex"] == "Female").to_numpy(float), rs.normal(size=(n, 2))])
    return df["distance"].to_numpy(float), exog, df["Subject"].to_numpy()


DATA = {"simulated": _five_predictors, "orthodont": _orthodont}
L1_CASES = [("simulated", 1.0), ("simulated", 40.0), ("simulated", "vector"),
            ("orthodont", 2.0), ("orthodont", "vector")]


def _alpha(name: str, alpha, k: int):
    if alpha == "vector":       # an unpenalised intercept, growing weights on the rest
        return np.concatenate([[0.0], np.linspace(2.0, 30.0, k - 1)])
    return alpha


def _dense_V_rel(model: lmefast.MixedLM, res: lmefast.MixedLMResults) -> np.ndarray:
    """I + Z Ψ Z' / σ² written out row by row (random intercepts and slopes only)."""
    Z = np.asarray(model.exog_re)
    psi = np.asarray(res.cov_re_unscaled)
    codes = pd.factorize(pd.Series(np.asarray(model.groups)))[0]
    same = codes[:, None] == codes[None, :]
    return np.eye(len(codes)) + same * (Z @ psi @ Z.T)


# -- fit_regularized: L1 --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "alpha"), L1_CASES)
def test_l1_matches_statsmodels(name: str, alpha) -> None:
    y, X, g = DATA[name]()
    a = _alpha(name, alpha, X.shape[1])
    ours = lmefast.MixedLM(y, X, g).fit_regularized(alpha=a)
    theirs = _quiet(SMMixedLM(y, X, g).fit_regularized, alpha=a)
    assert np.array_equal(np.asarray(ours.fe_params) == 0, theirs.fe_params == 0)
    np.testing.assert_allclose(ours.fe_params, theirs.fe_params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.scale, theirs.scale, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.cov_re_unscaled), np.asarray(theirs.cov_re_unscaled), rtol=1e-3)
    # the zeroed coefficients have no standard error, in both
    np.testing.assert_array_equal(np.isnan(np.asarray(ours.bse_fe)), np.isnan(theirs.bse_fe))
    assert 0 < ours.n_iter < 200 and ours.converged


@pytest.mark.parametrize(("name", "alpha"), L1_CASES)
def test_l1_optimality_by_dense_algebra(name: str, alpha) -> None:
    """The Karush-Kuhn-Tucker conditions of min (y − Xβ)'V⁻¹(y − Xβ) + Σ α_j|β_j| with V from
    the unpenalised fit, written out densely; then σ̃², the standard errors and the
    log-likelihood at β̃ by the textbook formulas."""
    y, X, g = DATA[name]()
    a = np.broadcast_to(np.asarray(_alpha(name, alpha, X.shape[1]), dtype=float), (X.shape[1],))
    model = lmefast.MixedLM(y, X, g)
    start = model.fit()
    res = model.fit_regularized(alpha=a, ptol=1e-12, maxit=10_000)
    beta = np.asarray(res.fe_params)
    Vr = _dense_V_rel(model, start)
    Vi = np.linalg.inv(start.scale * Vr)
    G, gvec = X.T @ Vi @ X, X.T @ Vi @ y
    grad = 2.0 * (G @ beta - gvec)
    on = beta != 0
    assert on.any()
    np.testing.assert_allclose(grad[on] + a[on] * np.sign(beta[on]), 0.0, atol=1e-7 * max(1.0, a.max()))
    assert np.all(np.abs(grad[~on]) <= a[~on] * (1 + 1e-9))
    # σ̃², standard errors (θ held, non-zero coefficients only) and the REML log-likelihood
    n, p = X.shape
    r = y - X @ beta
    Vri = np.linalg.inv(Vr)
    s2 = r @ Vri @ r / (n - p)
    np.testing.assert_allclose(res.scale, s2, rtol=1e-9)
    XS = X[:, on]
    se = np.sqrt(np.diag(s2 * np.linalg.inv(XS.T @ Vri @ XS)))
    np.testing.assert_allclose(np.asarray(res.bse_fe)[on], se, rtol=1e-8)
    assert np.all(np.isnan(np.asarray(res.bse_fe)[~on]))
    llf = -0.5 * ((n - p) * np.log(2 * np.pi * s2) + np.linalg.slogdet(Vr)[1]
                  + np.linalg.slogdet(X.T @ Vri @ X)[1] + (n - p))
    np.testing.assert_allclose(res.llf, llf, rtol=1e-9)


def test_l1_zero_penalty_is_the_unpenalised_fit() -> None:
    y, X, g = _five_predictors()
    model = lmefast.MixedLM(y, X, g)
    res, reg = model.fit(), model.fit_regularized()
    np.testing.assert_allclose(reg.fe_params, res.fe_params, rtol=1e-12)
    np.testing.assert_allclose(reg.bse_fe, res.bse_fe, rtol=1e-10)
    np.testing.assert_allclose(reg.llf, res.llf, rtol=1e-12)


def test_l1_ml_and_fit_keywords_reach_the_fit() -> None:
    y, X, g = _five_predictors()
    ours = lmefast.MixedLM(y, X, g).fit_regularized(alpha=5.0, reml=False)
    theirs = _quiet(SMMixedLM(y, X, g).fit_regularized, alpha=5.0, reml=False)
    assert ours.method == "ML"
    np.testing.assert_allclose(ours.fe_params, theirs.fe_params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.scale, theirs.scale, rtol=1e-4)


# -- fit_regularized: a smooth penalty object -----------------------------------------------------
def _sm_penalised_llf(y, X, g, pen, cov_re_unscaled, reml: bool = True) -> float:
    """statsmodels' penalised profile log-likelihood ℓ(ψ) − pen(β̂(ψ)) at a relative covariance."""
    m = SMMixedLM(y, X, g)
    m.reml, m.fe_pen, m.cov_pen = reml, pen, None
    po = SMParams.from_components(np.zeros(X.shape[1]), cov_re=np.atleast_2d(cov_re_unscaled),
                                  vcomp=np.zeros(0))
    return m.loglike(po, profile_fe=True)


# statsmodels' optimiser stops at its (unpenalised) start for the vector of weights: there
# lmefast is checked by statsmodels' penalised likelihood only
@pytest.mark.parametrize(("make", "alpha", "same_as_statsmodels"),
                         [(penalties.L2, 10.0, True), (lambda: penalties.PseudoHuber(0.3), 1.0, True),
                          (penalties.L2, 3.0 * np.arange(1, 6), False)])
def test_smooth_penalty_matches_statsmodels(make, alpha, same_as_statsmodels: bool) -> None:
    y, X, g = _five_predictors()
    pen_ours, pen_theirs = make(), make()
    ours = lmefast.MixedLM(y, X, g).fit_regularized(method=pen_ours, alpha=alpha)
    theirs = _quiet(SMMixedLM(y, X, g).fit_regularized, method=pen_theirs, alpha=alpha)
    assert pen_ours.alpha == 1.0            # the caller's object is not changed
    if same_as_statsmodels:
        np.testing.assert_allclose(ours.fe_params, theirs.fe_params, rtol=1e-4, atol=3e-5)
    # the fixed effects are the GLS estimate at lmefast's covariance (statsmodels' meaning)
    sm = SMMixedLM(y, X, g)
    psi = np.asarray(ours.cov_re_unscaled)
    np.testing.assert_allclose(ours.fe_params, sm.get_fe_params(psi, np.zeros(0))[0], rtol=1e-7, atol=1e-9)
    # lmefast's covariance maximises statsmodels' own penalised likelihood f: at least as good as
    # statsmodels' estimate, and stationary: ψ f'(ψ) ≈ 0 (central differences; a penalty 1% too
    # strong or weak gives 5e-5 and more)
    pen = make()
    pen.alpha = alpha
    best = _sm_penalised_llf(y, X, g, pen, psi)
    assert best >= _sm_penalised_llf(y, X, g, pen, np.asarray(theirs.cov_re_unscaled)) - 1e-7
    h = 1e-4
    up, down = (_sm_penalised_llf(y, X, g, pen, psi * (1 + s * h)) for s in (1, -1))
    slope = (up - down) / (2 * h)
    assert abs(slope) < 1e-5
    assert ours.converged and np.all(np.isfinite(np.asarray(ours.bse_fe)))


def test_penalty_changes_the_covariance_not_a_no_op() -> None:
    y, X, g = _five_predictors()
    model = lmefast.MixedLM(y, X, g)
    res, reg = model.fit(), model.fit_regularized(method=penalties.L2(), alpha=10.0)
    ratio = float(np.asarray(reg.cov_re_unscaled)[0, 0]) / float(np.asarray(res.cov_re_unscaled)[0, 0])
    assert abs(ratio - 1) > 1e-4


# -- fit_regularized: API -------------------------------------------------------------------------
def test_regularized_summary_and_names() -> None:
    y, X, g = _five_predictors()
    res = lmefast.MixedLM(y, X, g).fit_regularized(alpha=40.0)
    summ = res.summary(xname_fe=list("abcde"), xname_re=["G"], title="T")
    assert list(summ.tables[1].index) == [*"abcde", "G"] and summ.title == "T"
    row_b = [line for line in summ.as_text().splitlines() if line.startswith("b ")][0]
    assert row_b.split()[1:] == ["0.000"]       # a zeroed coefficient: no standard error, no test
    assert "penalty l1" in repr(res)


def test_regularized_bad_arguments() -> None:
    y, X, g = _five_predictors()
    model = lmefast.MixedLM(y, X, g)
    with pytest.raises(ValueError, match="Invalid regularization"):
        model.fit_regularized(method="l2")
    with pytest.raises(TypeError, match="penalty object"):
        model.fit_regularized(method=3)
    with pytest.raises(ValueError, match="one weight per fixed effect"):
        model.fit_regularized(alpha=np.ones(3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.fit_regularized(alpha=1.0, maxiterr=3)


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_regularized_results_round_trip(method: str) -> None:
    y, X, g = _five_predictors()
    model = lmefast.MixedLM(y, X, g)
    res = (model.fit_regularized(alpha=40.0) if method == "l1"
           else model.fit_regularized(method=penalties.L2(), alpha=10.0))
    text = str(res.summary())
    for back in (pickle.loads(pickle.dumps(res)), copy.deepcopy(res)):
        assert type(back) is type(res)
        np.testing.assert_array_equal(back.fe_params, res.fe_params)
        np.testing.assert_array_equal(back.bse_fe, res.bse_fe)
        np.testing.assert_array_equal(back.params, res.params)
        assert back.scale == res.scale and back.llf == res.llf and back.n_iter == res.n_iter
        np.testing.assert_array_equal(back.alpha, res.alpha)
        assert str(back.summary()) == text


# -- profile_re -----------------------------------------------------------------------------------
PROFILE_CASES = [("sleepstudy", "Reaction ~ Days", "~Days", True, 1, 10.0),
                 ("sleepstudy", "Reaction ~ Days", "~Days", True, 0, 200.0),
                 ("orthodont", "distance ~ age", "~age", False, 1, 0.02)]


@pytest.mark.parametrize(("data", "formula", "re", "reml", "ix", "dist"), PROFILE_CASES)
def test_profile_re_matches_statsmodels(data, formula, re, reml, ix, dist) -> None:
    """A random slope's and intercept's variance (the coefficient re-ordered first, its
    covariance re-fitted), REML and ML."""
    df = getattr(datasets, f"load_{data}")()
    ours = lmefast.mixedlm(formula, df, groups="Subject", re_formula=re).fit(reml=reml)
    theirs = _quiet(smf.mixedlm(formula, df, groups="Subject", re_formula=re).fit, reml=reml)
    kw = dict(num_low=2, dist_low=dist, num_high=2, dist_high=dist)
    a = ours.profile_re(ix, vtype="re", **kw)
    b = _quiet(theirs.profile_re, ix, vtype="re", **kw)
    assert a.shape == b.shape == (5, 2)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-3)
    np.testing.assert_allclose(a[:, 1], b[:, 1], rtol=1e-6)
    np.testing.assert_allclose(a[2], [np.asarray(ours.cov_re)[ix, ix], ours.llf], rtol=1e-12)
    assert np.all(a[:, 1] <= ours.llf + 1e-9)


@pytest.mark.parametrize("reml", [True, False])
def test_profile_re_random_intercept_by_statsmodels_loglike(reml: bool) -> None:
    """With one variance parameter nothing else is re-fitted: each row is statsmodels'
    log-likelihood and scale at the relative variance x of statsmodels' grid."""
    df = datasets.load_dyestuff()
    res = lmefast.mixedlm("Yield ~ 1", df, groups="Batch").fit(reml=reml)
    prof = res.profile_re(0, "re", num_low=3, dist_low=500.0, num_high=2, dist_high=1000.0)
    v, s = float(np.asarray(res.cov_re)[0, 0]), res.scale
    x = np.concatenate([np.linspace((v - 500.0) / s, v / s, 4), np.linspace(v / s, (v + 1000.0) / s, 3)[1:]])
    sm = SMMixedLM.from_formula("Yield ~ 1", df, groups="Batch")
    sm.reml, sm.fe_pen, sm.cov_pen = reml, None, None
    for (var, llf), xi in zip(prof, x, strict=True):
        po = SMParams.from_components(cov_re=np.array([[xi]]), vcomp=np.zeros(0))
        fe = sm.get_fe_params(po.cov_re, po.vcomp)[0]
        np.testing.assert_allclose(llf, sm.loglike(po, profile_fe=True), rtol=1e-10)
        np.testing.assert_allclose(var, xi * sm.get_scale(fe, po.cov_re, po.vcomp), rtol=1e-9)


def _profile_inference_data():
    """statsmodels' test_profile_inference model: a random intercept and two variance
    components (as many random effects as rows: fitted by both, with a warning)."""
    rs = np.random.RandomState(9814)
    n_grp, gsize = 100, 3
    exog = rs.normal(size=(n_grp * gsize, 2))
    exog_re = np.ones((n_grp * gsize, 1))
    groups = np.kron(np.arange(n_grp), np.ones(gsize))
    vca, vcb = rs.normal(size=n_grp * gsize), rs.normal(size=n_grp * gsize)
    errors = np.kron(rs.normal(size=100), np.ones(gsize)) + exog_re[:, 0]
    errors += np.kron(rs.normal(size=n_grp), np.ones(gsize)) * vca
    errors += np.kron(rs.normal(size=n_grp), np.ones(gsize)) * vcb
    endog = exog.sum(1) + errors + rs.normal(size=n_grp * gsize)
    vc = {"a": {}, "b": {}}
    for k in range(n_grp):
        ii = np.flatnonzero(groups == k)
        vc["a"][k], vc["b"][k] = vca[ii][:, None], vcb[ii][:, None]
    return endog, exog, groups, exog_re, vc


@pytest.mark.parametrize(("ix", "vtype", "dist"), [(0, "re", 1.0), ("b", "vc", 0.5), ("a", "vc", 0.4)])
def test_profile_re_variance_component(ix, vtype: str, dist: float) -> None:
    y, X, g, Z, vc = _profile_inference_data()
    ours = _quiet(lmefast.MixedLM(y, X, groups=g, exog_re=Z, exog_vc=vc).fit)
    theirs = _quiet(SMMixedLM(y, X, groups=g, exog_re=Z, exog_vc=vc).fit)
    kw = dict(num_low=3, dist_low=dist, num_high=3, dist_high=dist)
    a = ours.profile_re(ix, vtype=vtype, **kw)
    b = _quiet(theirs.profile_re, ix, vtype=vtype, **kw)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-3)
    np.testing.assert_allclose(a[:, 1], b[:, 1], rtol=1e-5)
    est = np.asarray(ours.cov_re)[0, 0] if vtype == "re" else ours.vcomp[["a", "b"].index(ix)]
    np.testing.assert_allclose(a[3], [est, ours.llf], rtol=1e-12)
    assert np.all(a[:, 1] <= ours.llf + 1e-9)


def test_profile_re_bad_arguments() -> None:
    res = lmefast.mixedlm("Reaction ~ Days", datasets.load_sleepstudy(), groups="Subject").fit()
    with pytest.raises(ValueError, match="vtype"):
        res.profile_re(0, vtype="not-a-vtype")
    with pytest.raises(ValueError, match="dist_low is too large"):
        res.profile_re(0, "re", dist_low=1e6)
    with pytest.raises(ValueError, match="re_ix"):
        res.profile_re(1, "re")
    with pytest.raises(ValueError, match="re_ix"):
        res.profile_re("Days", "vc")
    with pytest.raises(TypeError, match="unexpected keyword"):
        res.profile_re(0, "re", maxiterr=3)


# -- get_distribution -----------------------------------------------------------------------------
def _distribution_model():
    rs = np.random.RandomState(234)
    n, m = 120, 12
    df = pd.DataFrame(rs.normal(size=(n, 8)), columns=["x1", "x2", "z0", "z1", "z2", "z3", "z4", "z5"])
    df["grp"] = np.repeat(np.arange(m), n // m)
    df["y"] = rs.normal(size=n)
    vcf = {"a": "0 + z2 + z3", "b": "0 + z4 + z5"}
    kw = dict(groups="grp", re_formula="0 + z0 + z1", vc_formula=vcf, data=df)
    formula = "y ~ 0 + x1 + x2"
    return df, lmefast.MixedLM.from_formula(formula, **kw), SMMixedLM.from_formula(formula, **kw)


def _packed(scale: float) -> np.ndarray:
    po = SMParams.from_components(fe_params=np.r_[1.0, -2.0], cov_re=np.array([[1.0, 0.5], [0.5, 2.0]]),
                                  vcomp=np.r_[0.25, 2.25])
    pa = po.get_packed(has_fe=True, use_sqrt=False)
    pa[2:] /= scale
    return pa


def test_get_distribution_draws_statsmodels_draws() -> None:
    """Same parameters, same random stream: the same responses as statsmodels' (its draws are
    made in the same order: random coefficients, variance components by group, residuals)."""
    df, ours, theirs = _distribution_model()
    scale = 1.5
    pa = _packed(scale)
    for seed in (1, 2):
        a = ours.get_distribution(pa, scale).rvs(1, rng=np.random.RandomState(seed))
        b = theirs.get_distribution(pa, scale, None).rvs(1, rng=np.random.RandomState(seed))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    exog = np.asarray(df[["x1", "x2"]]) * 3.0
    a = ours.get_distribution(pa, scale, exog).rvs(0, rng=np.random.RandomState(3))
    b = theirs.get_distribution(pa, scale, exog).rvs(0, rng=np.random.RandomState(3))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_get_distribution_exog_re() -> None:
    """Doubling exog_re doubles the random coefficients' part of the same draw, which is
    u = N(0, I) draws (the first m × k of the stream) times the Cholesky factor of cov_re."""
    df, ours, _ = _distribution_model()
    scale = 1.5
    pa = _packed(scale)
    Z = np.asarray(df[["z0", "z1"]])
    y1 = ours.get_distribution(pa, scale, exog_re=Z).rvs(rng=np.random.RandomState(5))
    y2 = ours.get_distribution(pa, scale, exog_re=2 * Z).rvs(rng=np.random.RandomState(5))
    u = np.random.RandomState(5).normal(size=(12, 2)) @ np.linalg.cholesky(np.array([[1.0, 0.5], [0.5, 2.0]])).T
    np.testing.assert_allclose(y2 - y1, (u[df["grp"].to_numpy()] * Z).sum(1), rtol=1e-10, atol=1e-12)
    dist = ours.get_distribution(pa, scale)
    back = pickle.loads(pickle.dumps(dist))
    np.testing.assert_array_equal(back.rvs(rng=7), dist.rvs(rng=7))


def test_get_distribution_bad_arguments() -> None:
    _, ours, _ = _distribution_model()
    with pytest.raises(ValueError, match="scale"):
        ours.get_distribution(_packed(1.0), 0.0)
    res = lmefast.lmer("Reaction ~ Days + (1 | Subject)", datasets.load_sleepstudy())
    with pytest.raises(NotImplementedError):
        res.model.get_distribution(np.r_[250.0, 10.0, 1.0], 1.0)


# -- formulas' eval_env ---------------------------------------------------------------------------
def _env_data() -> pd.DataFrame:
    df = datasets.load_sleepstudy()
    return df.assign(x=df["Days"].astype(float))


def test_formulas_see_the_callers_functions() -> None:
    df = _env_data()

    def times_two(v):
        return 2 * v

    plain = lmefast.mixedlm("Reaction ~ x", df, groups="Subject").fit()
    for model in (lmefast.mixedlm("Reaction ~ times_two(x)", df, groups="Subject"),
                  lmefast.MixedLM.from_formula("Reaction ~ times_two(x)", df, groups="Subject")):
        assert model.exog_names == ["Intercept", "times_two(x)"]
        np.testing.assert_allclose(model.fit().fe_params["times_two(x)"] * 2, plain.fe_params["x"], rtol=1e-8)
    lm = lmefast.lmer("Reaction ~ times_two(x) + (times_two(x) | Subject)", df, reml=False)
    ref = lmefast.lmer("Reaction ~ x + (x | Subject)", df, reml=False)
    np.testing.assert_allclose(lm.fe_params.iloc[1] * 2, ref.fe_params.iloc[1], rtol=1e-7)
    np.testing.assert_allclose(lm.llf, ref.llf, rtol=1e-10)
    sm = smf.mixedlm("Reaction ~ times_two(x)", df, groups="Subject")
    assert sm.exog_names == lmefast.mixedlm("Reaction ~ times_two(x)", df, groups="Subject").exog_names


def test_eval_env_depth_and_mapping() -> None:
    df = _env_data()

    def outer():
        def shift(v):
            return v + 100.0

        def inner():
            return (lmefast.mixedlm("Reaction ~ shift(x)", df, groups="Subject", eval_env=1),
                    lmefast.lmer_model("Reaction ~ shift(x) + (1 | Subject)", df, eval_env=1))
        return inner()

    for model in outer():
        np.testing.assert_allclose(model.exog[:, 1], df["x"] + 100.0, rtol=1e-12)
    m = lmefast.mixedlm("Reaction ~ f(x)", df, groups="Subject", eval_env={"f": np.sqrt})
    np.testing.assert_allclose(m.exog[:, 1], np.sqrt(df["x"]), rtol=1e-12)
    x = "a local that a column of the same name hides"  # noqa: F841
    np.testing.assert_allclose(lmefast.mixedlm("Reaction ~ x", df, groups="Subject").exog[:, 1], df["x"])


def test_eval_env_errors() -> None:
    df = _env_data()
    with pytest.raises(SpecificationError, match="nowhere"):
        lmefast.mixedlm("Reaction ~ nowhere(x)", df, groups="Subject")
    with pytest.raises(SpecificationError, match="nowhere"):
        lmefast.lmer("Reaction ~ nowhere(x) + (1 | Subject)", df)
    with pytest.raises(TypeError, match="eval_env"):
        lmefast.mixedlm("Reaction ~ x", df, groups="Subject", eval_env="here")
    with pytest.raises(ValueError, match="eval_env"):
        lmefast.mixedlm("Reaction ~ x", df, groups="Subject", eval_env=-1)
