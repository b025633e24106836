"""Issue 10, items 1-3: the same fit in any units or origin of a predictor; honest convergence
from bad starts; loud errors on nonsense designs.

A change of units or origin of a random slope's predictor leaves the model unchanged (the
unstructured covariance transforms with it), so the maximised ML log-likelihood must not change,
and every estimate must map exactly: β_slope × (units factor), the slope's variance × factor²,
the intercept's moments at the new origin. The expected values below are derived from the
untransformed fit by that algebra, not from our own fit of the transformed data.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import datasets
from lmefast.errors import ProfileError, SpecificationError

# (name, a, b): x → a + b·x
TRANSFORMS = [("origin+2000", 2000.0, 1.0), ("x1e-6", 0.0, 1e-6), ("x1e6", 0.0, 1e6),
              ("epoch-seconds", 1.7e9, 86400.0), ("year-like", 1990.0, 1 / 365.25)]
CASES = {
    "dietox": (datasets.load_dietox, "Weight", "Time", "Pig"),
    "sleepstudy": (datasets.load_sleepstudy, "Reaction", "Days", "Subject"),
    "orthodont": (datasets.load_orthodont, "distance", "age", "Subject"),
}
LLF_RTOL = 1e-7


def _data(case: str, a: float = 0.0, b: float = 1.0) -> pd.DataFrame:
    load, _, x, _ = CASES[case]
    df = load().copy()
    df[x] = a + b * df[x].astype(float)
    return df


def _fit(case: str, api: str, df: pd.DataFrame, reml: bool = False) -> lmefast.MixedLMResults:
    _, y, x, g = CASES[case]
    if api == "lmer":
        return lmefast.lmer(f"{y} ~ {x} + ({x} | {g})", df, reml=reml)
    return lmefast.mixedlm(f"{y} ~ {x}", df, groups=g, re_formula=f"~{x}").fit(reml=reml)


def _cov_re(res: lmefast.MixedLMResults) -> np.ndarray:
    cov = res.cov_re
    return (next(iter(cov.values())) if isinstance(cov, dict) else cov).to_numpy()


def _expected_cov(cov: np.ndarray, a: float, b: float) -> np.ndarray:
    """(b0, b1) at x → (b0 − b1 a/b, b1/b) at x' = a + b x: Σ' = M Σ M'."""
    M = np.array([[1.0, -a / b], [0.0, 1.0 / b]])
    return M @ cov @ M.T


@pytest.mark.parametrize("api", ["mixedlm", "lmer"])
@pytest.mark.parametrize("case", list(CASES))
def test_loglik_and_estimates_do_not_depend_on_units_or_origin(case: str, api: str) -> None:
    base = _fit(case, api, _data(case))
    beta0, beta1 = base.fe_params.to_numpy()
    cov0 = _cov_re(base)
    for name, a, b in TRANSFORMS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # no warning: nothing failed
            res = _fit(case, api, _data(case, a, b))
        assert res.converged, name
        assert res.llf == pytest.approx(base.llf, rel=LLF_RTOL), name
        # β: intercept at the new origin, slope per new unit
        np.testing.assert_allclose(res.fe_params.to_numpy(), [beta0 - beta1 * a / b, beta1 / b],
                                   rtol=1e-5, atol=1e-9 * abs(beta0), err_msg=name)
        np.testing.assert_allclose(res.bse_fe.iloc[1], base.bse_fe.iloc[1] / b, rtol=1e-4, err_msg=name)
        # the random effects' covariance transforms with the predictor
        expected = _expected_cov(cov0, a, b)
        scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
        # the optimiser stops within a Newton decrement of 1e-6: θ agrees to ~1e-5 between two
        # designs, covariances (quadratic in θ) to ~1e-4 of their scale
        np.testing.assert_allclose(_cov_re(res) / scale, expected / scale, atol=1e-4, err_msg=name)
        assert res.scale == pytest.approx(base.scale, rel=1e-5), name


@pytest.mark.parametrize("api", ["mixedlm", "lmer"])
def test_reml_criterion_moves_by_the_design_jacobian_only(api: str) -> None:
    """REML holds log|X'V⁻¹X|, which changes by 2 log|b| when x is multiplied by b (and not at
    all with a new origin): llf' = llf − log|b|, with β, σ² and Σ mapped as under ML."""
    base = _fit("sleepstudy", api, _data("sleepstudy"), reml=True)
    for name, a, b in TRANSFORMS:
        res = _fit("sleepstudy", api, _data("sleepstudy", a, b), reml=True)
        assert res.converged, name
        assert res.llf == pytest.approx(base.llf - np.log(abs(b)), rel=LLF_RTOL, abs=1e-7), name
        assert res.scale == pytest.approx(base.scale, rel=1e-5), name


def test_several_grouping_factors_with_a_random_slope() -> None:
    """The blocked engine (two grouping factors, a random slope on one) in any units."""
    df0 = datasets.load_dietox()
    formula = "Weight ~ Time + (Time | Pig) + (1 | Litter)"
    base = lmefast.lmer(formula, df0, reml=False)
    for name, a, b in TRANSFORMS:
        df = df0.copy()
        df["Time"] = a + b * df["Time"].astype(float)
        res = lmefast.lmer(formula, df, reml=False)
        assert res.converged, name
        assert res.llf == pytest.approx(base.llf, rel=LLF_RTOL), name
        assert res.fe_params.iloc[1] == pytest.approx(base.fe_params.iloc[1] / b, rel=1e-5), name
        assert res.cov_re["Litter"].iloc[0, 0] == pytest.approx(base.cov_re["Litter"].iloc[0, 0],
                                                                rel=1e-4), name
        slope_var = res.cov_re["Pig"].iloc[1, 1]
        assert slope_var == pytest.approx(base.cov_re["Pig"].iloc[1, 1] / b**2, rel=1e-4), name


def test_inference_maps_back_to_the_users_scale() -> None:
    """Satterthwaite and Kenward-Roger df do not depend on the units; t statistics of the slope
    neither; predictions and conditional modes map back; profile intervals scale with b."""
    a, b = 1.7e9, 86400.0
    base = _fit("sleepstudy", "lmer", _data("sleepstudy"), reml=True)
    res = _fit("sleepstudy", "lmer", _data("sleepstudy", a, b), reml=True)
    for ddf in ("satterthwaite", "kenward-roger"):
        t0, t1 = base.coef_table(ddf=ddf), res.coef_table(ddf=ddf)
        np.testing.assert_allclose(t1.iloc[:, :].filter(like="df").to_numpy(),
                                   t0.filter(like="df").to_numpy(), rtol=1e-4)
        assert t1.iloc[1]["t"] == pytest.approx(t0.iloc[1]["t"], rel=1e-4)
    # predictions follow θ̂, which two designs reach to the optimiser's tolerance (~1e-5)
    np.testing.assert_allclose(res.predict(), base.predict(), rtol=1e-5)
    new = _data("sleepstudy", a, b).iloc[:10]
    np.testing.assert_allclose(res.predict(new), base.predict(_data("sleepstudy").iloc[:10]), rtol=1e-5)
    re0, re1 = base.random_effects["Subject"], res.random_effects["Subject"]
    np.testing.assert_allclose(re1.iloc[:, 1].to_numpy(), re0.iloc[:, 1].to_numpy() / b, rtol=1e-4,
                               atol=1e-6 * np.abs(re0.iloc[:, 1]).max() / b)
    np.testing.assert_allclose(res.fittedvalues, base.fittedvalues, rtol=1e-5)
    ci0 = base.conf_int(method="profile", parm="Days")
    ci1 = res.conf_int(method="profile", parm="Days")
    np.testing.assert_allclose(ci1.to_numpy(), ci0.to_numpy() / b, rtol=1e-4)
    # far from the origin the sd/cor parametrisation is degenerate (correlation −1 + 2e-8):
    # refused with a reason, not a collapsed interval
    with pytest.raises(ProfileError, match="correlation"):
        res.conf_int(method="profile", parm="sd_Days|Subject")
    # in other units it maps
    res_units = _fit("sleepstudy", "lmer", _data("sleepstudy", 0.0, 1e-6), reml=True)
    sd0 = base.conf_int(method="profile", parm="sd_Days|Subject")
    sd1 = res_units.conf_int(method="profile", parm="sd_Days|Subject")
    np.testing.assert_allclose(sd1.to_numpy(), sd0.to_numpy() / 1e-6, rtol=1e-4)


# -- item 2: honest convergence ------------------------------------------------------------------
@pytest.mark.parametrize("start", [[1e300, 0.0, 1.0], [np.nan, 0.0, 1.0], [np.inf, 0.0, 1.0]])
def test_a_start_that_cannot_start_falls_back_with_a_warning(start: list[float]) -> None:
    model = lmefast.lmer_model("Reaction ~ Days + (Days | Subject)", datasets.load_sleepstudy())
    default = model.fit()
    with pytest.warns(UserWarning, match="cannot start the fit"):
        res = model.fit(start_theta=start)
    assert np.isfinite(res.llf)
    assert res.converged
    assert res.llf == pytest.approx(default.llf, rel=1e-9)


@pytest.mark.parametrize("api", ["mixedlm", "lmer"])
def test_a_start_in_a_flat_region_is_examined_not_trusted(api: str) -> None:
    """From θ = (1e6, 0, 1) the optimiser stops without moving θ_1 (the objective is flat
    there); the fit is checked against the default start and the better one kept."""
    df = datasets.load_sleepstudy()
    if api == "lmer":
        model = lmefast.lmer_model("Reaction ~ Days + (Days | Subject)", df)
    else:
        model = lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days")
    default = model.fit()
    with pytest.warns(UserWarning, match="never moved from their start"):
        res = model.fit(start_theta=[1e6, 0.0, 1.0])
    assert res.llf == pytest.approx(default.llf, rel=1e-9)


def test_converged_needs_a_finite_objective() -> None:
    from lmefast.optimize import fit_theta

    model = lmefast.lmer_model("Reaction ~ Days + (Days | Subject)", datasets.load_sleepstudy())
    obj = model.engine.objective(True)
    with pytest.warns(UserWarning):
        sol, opt = fit_theta(obj, np.array([1e300, 0.0, 1.0]))
    assert np.isfinite(sol.objective) and opt.converged


# -- item 3: loud on nonsense ----------------------------------------------------------------------
def _duplicated_days() -> pd.DataFrame:
    df = datasets.load_sleepstudy()
    extra = pd.DataFrame({"Days": np.zeros(len(df))})
    return pd.concat([df, extra], axis=1)


def test_duplicated_column_names_are_an_error_in_both_apis() -> None:
    df = _duplicated_days()
    with pytest.raises(SpecificationError, match=r"more than one column named \['Days'\]"):
        lmefast.lmer("Reaction ~ Days + (Days | Subject)", df)
    with pytest.raises(SpecificationError, match=r"more than one column named \['Days'\]"):
        lmefast.mixedlm("Reaction ~ Days", df, groups="Subject")
    # a duplicated column the formula does not use is no problem
    df2 = pd.concat([datasets.load_sleepstudy(), pd.DataFrame({"other": np.zeros(180)}),
                     pd.DataFrame({"other": np.ones(180)})], axis=1)
    assert lmefast.lmer("Reaction ~ Days + (1 | Subject)", df2).converged


@pytest.mark.parametrize("kind", ["zero", "constant", "collinear"])
def test_degenerate_random_slopes_are_an_error_naming_the_term(kind: str) -> None:
    df = datasets.load_sleepstudy().copy()
    df["z"] = {"zero": 0.0, "constant": 3.0, "collinear": 0.0}[kind]
    if kind == "collinear":
        df["z"] = 2.0 * df["Days"] - 1.0
        lme4_term, re_formula = "(1 + Days + z | Subject)", "~Days + z"
    else:
        lme4_term, re_formula = "(1 + z | Subject)", "~z"
    what = "all zero" if kind == "zero" else "linearly dependent"
    named = r"\['z'\]" if kind != "collinear" else r"\['(z|Days)'\]"   # one of the dependent pair
    with pytest.raises(SpecificationError, match=rf"random-effects term .*Subject.*{named}.*{what}"):
        lmefast.lmer(f"Reaction ~ Days + {lme4_term}", df)
    with pytest.raises(SpecificationError, match=rf"random-effects term .*Subject.*{named}.*{what}"):
        lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula=re_formula)


def test_degenerate_slope_with_several_grouping_factors() -> None:
    df = datasets.load_dietox().copy()
    df["z"] = 0.0
    with pytest.raises(SpecificationError, match=r"random-effects term .*Pig.*\['z'\].*all zero"):
        lmefast.lmer("Weight ~ Time + (1 + z | Pig) + (1 | Litter)", df)


@pytest.mark.parametrize("spelling", ["lmer ||", "vc_formula"])
@pytest.mark.parametrize("b", [1e-6, 1e6])
def test_uncorrelated_slopes_and_variance_components_in_other_units(spelling: str, b: float) -> None:
    """Uncorrelated terms and variance components are only scaled (a new origin would change
    those models): in other units the ML fit is the same, the slope's variance × 1/b²."""
    def fit(df: pd.DataFrame) -> lmefast.MixedLMResults:
        if spelling == "lmer ||":
            return lmefast.lmer("Reaction ~ Days + (1 + Days || Subject)", df, reml=False)
        return lmefast.mixedlm("Reaction ~ Days", df, groups="Subject",
                               vc_formula={"Days": "0 + Days"}).fit(reml=False)

    base = fit(_data("sleepstudy"))
    res = fit(_data("sleepstudy", 0.0, b))
    assert res.converged
    assert res.llf == pytest.approx(base.llf, rel=LLF_RTOL)
    assert res.fe_params.iloc[1] == pytest.approx(base.fe_params.iloc[1] / b, rel=1e-5)
    if spelling == "lmer ||":
        var0, var1 = base.cov_re["Subject"].iloc[1, 1], res.cov_re["Subject"].iloc[1, 1]
    else:
        var0, var1 = base.vcomp[0], res.vcomp[0]
    assert var1 == pytest.approx(var0 / b**2, rel=1e-4)


@pytest.mark.parametrize("formula", ["Weight ~ Time + (Time | Pig)",
                                     "Weight ~ Time + (Time | Pig) + (1 | Litter)"])
def test_weighted_and_offset_fits_do_not_depend_on_units_or_origin(formula: str) -> None:
    """The centring map is chosen on the user's columns, before the prior weights make the
    intercept column non-constant: weighted fits (one and several factors, with an offset) are
    invariant too, and mixedlm's spelling of the one-factor model agrees."""
    df0 = datasets.load_dietox()
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 2.0, len(df0))
    off = rng.normal(0.0, 1.0, len(df0))
    base = lmefast.lmer(formula, df0, reml=False, weights=w, offset=off)
    for name, a, b in TRANSFORMS:
        df = df0.copy()
        df["Time"] = a + b * df["Time"].astype(float)
        res = lmefast.lmer(formula, df, reml=False, weights=w, offset=off)
        assert res.converged, name
        assert res.llf == pytest.approx(base.llf, rel=LLF_RTOL), name
        assert res.fe_params.iloc[1] == pytest.approx(base.fe_params.iloc[1] / b, rel=1e-5), name
        if "Litter" not in formula:
            sm = lmefast.mixedlm("Weight ~ Time", df, groups="Pig", re_formula="~Time",
                                 weights=w, offset=off).fit(reml=False)
            assert sm.llf == pytest.approx(base.llf, rel=LLF_RTOL), name


def test_fit_many_in_other_units_equals_lmer() -> None:
    """fit_many maps its per-response estimates back as lmer does (β, covariance, llf)."""
    df = datasets.load_dietox().copy()
    df["Time"] = 1.7e9 + 86400.0 * df["Time"].astype(float)
    rng = np.random.default_rng(5)
    Y = pd.DataFrame({"a": df["Weight"], "b": df["Weight"] + rng.normal(0, 3, len(df))})
    many = lmefast.fit_many("~ Time + (Time | Pig)", df, Y, ddf="satterthwaite")
    table = many.coef_table().set_index(["response", "term"])
    for name in Y.columns:
        ref = lmefast.lmer("y ~ Time + (Time | Pig)", df.assign(y=Y[name]))
        assert many.llf[name] == pytest.approx(ref.llf, rel=1e-8)
        np.testing.assert_allclose(table.loc[name, "estimate"].to_numpy(), ref.fe_params.to_numpy(),
                                   rtol=1e-6)
        np.testing.assert_allclose(table.loc[name, "std_err"].to_numpy(), ref.bse_fe.to_numpy(),
                                   rtol=1e-5)
        ct = ref.coef_table(ddf="satterthwaite")
        np.testing.assert_allclose(table.loc[name, "df"].to_numpy(), ct["df"].to_numpy(), rtol=1e-4)


def test_profile_of_a_centred_fixed_effect_keeps_the_prior_weights_term() -> None:
    """A weighted fit whose intercept is profiled through the centring map (β held by a linear
    constraint, CrossProducts.with_fixed_map): the constrained objective keeps Σ log w, so the
    interval is a real interval around the estimate, as wide as the Wald interval to a few per
    cent (it collapsed to the estimate when the term was lost)."""
    df = datasets.load_dietox().copy()
    w = np.random.default_rng(3).uniform(0.5, 2.0, len(df))
    df["Time"] = df["Time"].astype(float) + 2000.0
    res = lmefast.lmer("Weight ~ Time + (1 | Pig)", df, weights=w)
    assert not res.model.engine.scaling.is_identity
    lo, hi = res.conf_int(method="profile", parm="(Intercept)").to_numpy()[0]
    est, se = res.fe_params.iloc[0], res.bse_fe.iloc[0]
    assert lo < est < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.05)
