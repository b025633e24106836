"""The statsmodels-style API: names, shapes, consistency between attributes and between front ends,
and that fitting never changes the model."""
from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference
from test_reference import LLF_TOL, theta_from_lme4

import lmefast
from lmefast import SpecificationError

PASTES_VC = {"cask": "0 + C(cask)"}


@pytest.fixture
def dietox_rs(dietox: pd.DataFrame) -> lmefast.MixedLM:
    return lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig", re_formula="~Time")


@pytest.fixture
def pastes_model(pastes: pd.DataFrame) -> lmefast.MixedLM:
    return lmefast.mixedlm("strength ~ 1", pastes, groups="batch", re_formula="1", vc_formula=PASTES_VC)


@pytest.fixture
def sleep_zc(sleepstudy: pd.DataFrame) -> lmefast.MixedLM:
    return lmefast.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="1",
                           vc_formula={"Days": "0 + Days"})


def _snapshot(obj: Any) -> dict[str, Any]:
    """Deep copy of a frozen dataclass's fields (arrays copied)."""
    return {f.name: copy.deepcopy(getattr(obj, f.name)) for f in fields(obj)}


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, tuple | list) and a and isinstance(a[0], np.ndarray | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        _assert_same(_snapshot(a), _snapshot(b), path)
    else:
        assert a == b, path


# -- fitting does not change the model --------------------------------------------------------------
@pytest.mark.parametrize("which", ["dietox_rs", "pastes_model", "sleep_zc"])
def test_fit_does_not_change_the_model(which: str, request: pytest.FixtureRequest) -> None:
    model: lmefast.MixedLM = request.getfixturevalue(which)
    before = _snapshot(model.spec)
    cp_before = _snapshot(model.crossprods)
    r1 = model.fit(reml=True)
    r_ml = model.fit(reml=False)
    r2 = model.fit(reml=True)
    _assert_same(before, _snapshot(model.spec))
    _assert_same(cp_before, _snapshot(model.crossprods))
    # two fits give identical results; the ML fit in between changed nothing
    assert r1.llf == r2.llf
    np.testing.assert_array_equal(r1.theta, r2.theta)
    pd.testing.assert_series_equal(r1.params, r2.params)
    pd.testing.assert_frame_equal(r1.cov_params(), r2.cov_params())
    np.testing.assert_array_equal(r1.fittedvalues, r2.fittedvalues)
    assert r1.method == "REML" and r_ml.method == "ML"
    # each fit is lme4's fit of its own criterion (the ML fit is not a copy of the REML one)
    case = {"dietox_rs": "dietox_rs", "pastes_model": "pastes_nested", "sleep_zc": "sleep_zc"}[which]
    for res, reml in ((r1, True), (r_ml, False)):
        ref = load_reference(case, reml)
        assert abs(res.llf - ref.loglik) <= 1e-6 * abs(ref.loglik), (which, reml, res.llf, ref.loglik)
    # results are independent objects: the θ they hand out is a copy
    th = r1.theta
    th[:] = 123.0
    np.testing.assert_array_equal(r1.theta, r2.theta)


def test_results_cached_attributes_are_stable(dietox_rs: lmefast.MixedLM) -> None:
    res = dietox_rs.fit()
    first = {k: v.copy() for k, v in res.random_effects.items()}
    fitted = res.fittedvalues.copy()
    _ = res.summary(), res.cov_params(), res.conf_int(), res.random_effects_cov
    for k, v in res.random_effects.items():
        pd.testing.assert_series_equal(v, first[k])
    np.testing.assert_array_equal(res.fittedvalues, fitted)


# -- fitted values ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dietox_rs", "pastes_model", "sleep_zc"])
def test_fitted_plus_resid_is_y(which: str, request: pytest.FixtureRequest) -> None:
    model: lmefast.MixedLM = request.getfixturevalue(which)
    res = model.fit()
    y = model.spec.y
    assert res.fittedvalues.shape == y.shape == res.resid.shape
    np.testing.assert_allclose(res.fittedvalues + res.resid, y, rtol=1e-13, atol=1e-10 * np.max(np.abs(y)))


def test_fitted_values_from_random_effects(sleep_zc: lmefast.MixedLM, sleepstudy: pd.DataFrame) -> None:
    """Xβ̂ + intercept BLUP + Days × Days-BLUP, rebuilt from the public attributes."""
    res = sleep_zc.fit()
    fe = res.fe_params
    expected = np.empty(len(sleepstudy))
    for i, (subj, days) in enumerate(zip(sleepstudy["Subject"], sleepstudy["Days"], strict=True)):
        re = res.random_effects[subj]
        expected[i] = fe["Intercept"] + fe["Days"] * days + re["Subject"] + re["Days[Days]"] * days
    np.testing.assert_allclose(res.fittedvalues, expected, rtol=1e-12)


def test_fitted_values_random_slopes(dietox_rs: lmefast.MixedLM, dietox: pd.DataFrame) -> None:
    res = dietox_rs.fit()
    fe = res.fe_params
    re = res.random_effects_frame.loc[dietox["Pig"].to_numpy()]
    t = dietox["Time"].to_numpy(dtype=float)
    expected = fe["Intercept"] + fe["Time"] * t + re["Pig"].to_numpy() + re["Time"].to_numpy() * t
    np.testing.assert_allclose(res.fittedvalues, expected, rtol=1e-12)


# -- names -----------------------------------------------------------------------------------
def test_param_names_random_slopes(dietox_rs: lmefast.MixedLM) -> None:
    res = dietox_rs.fit()
    assert list(res.params.index) == ["Intercept", "Time", "Pig Var", "Pig x Time Cov", "Time Var"]
    assert list(res.fe_params.index) == ["Intercept", "Time"]
    assert list(res.bse_fe.index) == ["Intercept", "Time"]
    assert list(res.cov_re.index) == list(res.cov_re.columns) == ["Pig", "Time"]
    assert list(res.random_effects_frame.columns) == ["Pig", "Time"]
    assert (res.k_fe, res.k_re, res.k_vc, res.n_groups, res.nobs) == (2, 2, 0, 72, 861)
    # params' variance part is cov_re / scale, lower triangle by rows
    cov = res.cov_re.to_numpy() / res.scale
    np.testing.assert_allclose(res.params.iloc[2:].to_numpy(), cov[np.tril_indices(2)], rtol=1e-13)


def test_param_names_variance_components(pastes_model: lmefast.MixedLM) -> None:
    res = pastes_model.fit()
    assert list(res.params.index) == ["Intercept", "batch Var", "cask Var"]
    assert res.k_vc == 1 and res.vcomp.shape == (1,)
    assert res.params["cask Var"] == pytest.approx(res.vcomp[0] / res.scale, rel=1e-13)
    assert res.params["batch Var"] == pytest.approx(res.cov_re.iloc[0, 0] / res.scale, rel=1e-13)
    assert list(res.random_effects["A"].index) == ["batch", "cask[a]", "cask[b]", "cask[c]"]


@pytest.mark.parametrize("which", ["dietox_rs", "pastes_model"])
def test_summary_mentions_every_parameter(which: str, request: pytest.FixtureRequest, reml: bool) -> None:
    model: lmefast.MixedLM = request.getfixturevalue(which)
    res = model.fit(reml=reml)
    text = str(res.summary())
    for name in res.params.index:
        assert name in text, name
    assert ("REML" if reml else "ML") in text
    assert model.endog_names in text


# -- the two front ends agree ---------------------------------------------------------------------
def test_arrays_api_matches_formula_api(dietox: pd.DataFrame, dietox_rs: lmefast.MixedLM) -> None:
    exog = pd.DataFrame({"Intercept": 1.0, "Time": dietox["Time"].astype(float)})
    exog_re = pd.DataFrame({"Pig": 1.0, "Time": dietox["Time"].astype(float)})
    arrays = lmefast.MixedLM(dietox["Weight"], exog, dietox["Pig"], exog_re=exog_re)
    for reml in (True, False):
        a, f = arrays.fit(reml=reml), dietox_rs.fit(reml=reml)
        assert a.llf == pytest.approx(f.llf, rel=1e-12)
        np.testing.assert_allclose(a.theta, f.theta, rtol=1e-8)
        pd.testing.assert_series_equal(a.params, f.params, rtol=1e-7)
        pd.testing.assert_series_equal(a.bse_fe, f.bse_fe, rtol=1e-7)
        pd.testing.assert_frame_equal(a.cov_re, f.cov_re, rtol=1e-7)
        pd.testing.assert_frame_equal(a.random_effects_frame, f.random_effects_frame, rtol=1e-7)
        np.testing.assert_allclose(a.fittedvalues, f.fittedvalues, rtol=1e-10)


def test_arrays_api_plain_ndarrays(dietox: pd.DataFrame, dietox_rs: lmefast.MixedLM) -> None:
    """Plain arrays work too; names default, numbers are the same."""
    t = dietox["Time"].to_numpy(dtype=float)
    X = np.column_stack([np.ones_like(t), t])
    model = lmefast.MixedLM(dietox["Weight"].to_numpy(), X, dietox["Pig"].to_numpy(), exog_re=X.copy())
    res, ref = model.fit(), dietox_rs.fit()
    assert res.llf == pytest.approx(ref.llf, rel=1e-12)
    np.testing.assert_allclose(res.params.to_numpy(), ref.params.to_numpy(), rtol=1e-7)
    assert len(set(res.params.index)) == len(res.params)


def test_default_random_intercept(dietox: pd.DataFrame) -> None:
    """exog_re=None is a random intercept, as re_formula=None is."""
    X = np.column_stack([np.ones(len(dietox)), dietox["Time"].to_numpy(dtype=float)])
    a = lmefast.MixedLM(dietox["Weight"], X, dietox["Pig"]).fit()
    f = lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig").fit()
    assert a.k_re == f.k_re == 1
    assert a.llf == pytest.approx(f.llf, rel=1e-12)
    np.testing.assert_allclose(a.params.to_numpy(), f.params.to_numpy(), rtol=1e-7)


def test_exog_vc_dict_matches_vc_formula(pastes: pd.DataFrame, pastes_model: lmefast.MixedLM) -> None:
    """statsmodels' exog_vc[name][group] (that group's rows, in data order) ≡ vc_formula."""
    perm = np.random.default_rng(1).permutation(len(pastes))  # rows not sorted by group
    shuffled = pastes.iloc[perm].reset_index(drop=True)
    exog_vc = {"cask": {b: pd.get_dummies(g["cask"]).to_numpy(dtype=float)
                        for b, g in shuffled.groupby("batch", sort=False)}}
    n = len(shuffled)
    arrays = lmefast.MixedLM(shuffled["strength"], np.ones((n, 1)), shuffled["batch"],
                             exog_re=np.ones((n, 1)), exog_vc=exog_vc)
    for reml in (True, False):
        a, f = arrays.fit(reml=reml), pastes_model.fit(reml=reml)
        assert a.llf == pytest.approx(f.llf, rel=1e-12)
        np.testing.assert_allclose(a.theta, f.theta, rtol=1e-7)
        np.testing.assert_allclose(a.vcomp, f.vcomp, rtol=1e-7)
        np.testing.assert_allclose(a.cov_re.to_numpy(), f.cov_re.to_numpy(), rtol=1e-7)
        np.testing.assert_allclose(a.fe_params.to_numpy(), f.fe_params.to_numpy(), rtol=1e-10)
        assert a.random_effects.keys() == f.random_effects.keys()
        for lab in f.random_effects:
            np.testing.assert_allclose(a.random_effects[lab].to_numpy(), f.random_effects[lab].to_numpy(),
                                       rtol=1e-6, atol=1e-9)
        # fitted values are per row: compare in the same row order
        np.testing.assert_allclose(a.fittedvalues, f.fittedvalues[perm], rtol=1e-9)


# -- covariance, tests, intervals -------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dietox_rs", "pastes_model", "sleep_zc"])
def test_cov_params(which: str, request: pytest.FixtureRequest) -> None:
    res = request.getfixturevalue(which).fit()
    cp = res.cov_params()
    d = len(res.params)
    assert cp.shape == (d, d)
    assert list(cp.index) == list(cp.columns) == list(res.params.index)
    C = cp.to_numpy()
    np.testing.assert_allclose(C, C.T, rtol=0, atol=1e-12 * np.max(np.abs(C)))
    assert np.all(np.diag(C) > 0)
    np.testing.assert_allclose(res.bse.to_numpy(), np.sqrt(np.diag(C)), rtol=1e-14)
    np.testing.assert_allclose(res.tvalues.to_numpy(), (res.params / res.bse).to_numpy(), rtol=1e-14)
    p = res.pvalues.to_numpy()
    assert np.all((p >= 0) & (p <= 1))
    ci = res.conf_int()
    assert ci.shape == (d, 2)
    assert np.all(ci[0].to_numpy() < res.params.to_numpy()) and np.all(res.params.to_numpy() < ci[1].to_numpy())
    assert np.all(np.linalg.eigvalsh(C) > 0)


# -- likelihood bookkeeping --------------------------------------------------------------------------
def test_llf_aic_bic(case: dict[str, Any], reml: bool, fitted: Callable, reference: Callable) -> None:
    """Every one-grouping-factor case of cases.json."""
    model, res = fitted(case["id"], reml)
    ref = reference(case["id"], reml)
    # lme4's logLik (at the optimum: test_reference's tolerance)
    assert res.llf == pytest.approx(ref.loglik, abs=LLF_TOL + 1e-11 * abs(ref.loglik))
    n_params = res.k_fe + model.spec.theta_map.n_theta + 1
    assert res.aic == pytest.approx(-2 * res.llf + 2 * n_params, rel=1e-14)
    assert res.bic == pytest.approx(-2 * res.llf + math.log(res.nobs) * n_params, rel=1e-14)
    # lme4's AIC and BIC (which for REML fits use the REML criterion) up to the llf difference
    assert res.aic - ref.raw["aic"] == pytest.approx(-2 * (res.llf - ref.loglik), abs=1e-8)
    assert res.bic - ref.raw["bic"] == pytest.approx(-2 * (res.llf - ref.loglik), abs=1e-8)
    # model.loglike at lme4's θ̂ is lme4's logLik (an independent point, not our own fit's)
    assert model.loglike(theta_from_lme4(model, ref), reml) == pytest.approx(ref.loglik, rel=1e-10)
    np.testing.assert_allclose(res.fittedvalues + res.resid, model.spec.y, rtol=1e-13,
                               atol=1e-10 * np.max(np.abs(model.spec.y)))
    text = str(res.summary())
    assert all(name in text for name in res.params.index)


# -- optsummary and random effects --------------------------------------------------------------------
def test_optsummary_is_json_serialisable(dietox_rs: lmefast.MixedLM) -> None:
    res = dietox_rs.fit()
    d = res.optsummary.as_dict()
    back = json.loads(json.dumps(d))
    np.testing.assert_array_equal(np.array(back["theta_final"]), res.theta)
    assert back["converged"] is True and back["singular"] is False
    assert back["n_evals"] > 0
    assert np.array(back["theta_initial"]).shape == res.theta.shape
    assert res.optsummary.objective_final == pytest.approx(res.objective, rel=1e-15)


def test_callback_sees_the_iterations(dietox_rs: lmefast.MixedLM) -> None:
    seen: list[tuple[int, float]] = []
    res = dietox_rs.fit(callback=lambda it, theta, f: seen.append((it, f)))
    assert seen
    assert all(np.isfinite(f) for _, f in seen)
    assert min(f for _, f in seen) >= res.objective - 1e-6 * abs(res.objective)


def test_callback_stop_iteration_stops_the_fit(dietox_rs: lmefast.MixedLM) -> None:
    def stop(it: int, theta: np.ndarray, f: float) -> None:
        if it >= 2:
            raise StopIteration

    with pytest.warns(UserWarning, match="converge"):
        res = dietox_rs.fit(callback=stop)
    assert res.converged is False
    assert np.isfinite(res.llf)


def test_callback_exception_propagates(dietox_rs: lmefast.MixedLM) -> None:
    """An error in the user's callback must reach the caller (as in scipy.optimize), not be printed as
    'Exception ignored' while the fit carries on and reports success."""
    calls: list[int] = []

    def broken(it: int, theta: np.ndarray, f: float) -> None:
        calls.append(it)
        raise ValueError("broken callback")

    with pytest.raises(ValueError, match="broken callback"):
        dietox_rs.fit(callback=broken)
    assert calls


def test_maxiter_reached_warns(dietox_rs: lmefast.MixedLM) -> None:
    with pytest.warns(UserWarning, match="converge"):
        res = dietox_rs.fit(maxiter=1)
    assert res.converged is False
    assert res.optsummary.converged is False
    assert re.search(r"Converged:\s+No\b", str(res.summary()))


def test_verbose_prints_iterations(dietox_rs: lmefast.MixedLM, capsys: pytest.CaptureFixture[str]) -> None:
    res = dietox_rs.fit(verbose=True)
    out = capsys.readouterr().out
    assert "objective" in out
    assert len(res.optsummary.log) == out.count("objective") > 0


@pytest.mark.parametrize("which", ["dietox_rs", "pastes_model", "sleep_zc"])
def test_random_effects_keys_are_group_labels(which: str, request: pytest.FixtureRequest) -> None:
    model: lmefast.MixedLM = request.getfixturevalue(which)
    res = model.fit()
    labels = model.spec.group_labels.tolist()
    assert list(res.random_effects.keys()) == labels
    assert list(res.random_effects_cov.keys()) == labels
    assert list(res.random_effects_frame.index) == labels
    assert res.random_effects_frame.shape == (len(labels), res.k_re)
    for lab in labels:
        re, cov = res.random_effects[lab], res.random_effects_cov[lab]
        assert list(cov.index) == list(cov.columns) == list(re.index)
        np.testing.assert_allclose(res.random_effects_frame.loc[lab].to_numpy(), re.iloc[:res.k_re].to_numpy(),
                                   rtol=0, atol=0)
        C = cov.to_numpy()
        np.testing.assert_allclose(C, C.T, atol=1e-12 * max(1.0, np.max(np.abs(C))))


def test_group_labels_keep_their_type(dietox: pd.DataFrame, sleep_zc: lmefast.MixedLM) -> None:
    """Integer groups (Pig) give integer keys; string groups give string keys."""
    res = lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig").fit()
    assert set(res.random_effects) == set(dietox["Pig"].unique().tolist())
    pastes = sleep_zc.fit()  # Subject is an int column too
    assert all(isinstance(k, int) for k in pastes.random_effects)


# -- start_params -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.ones(2), np.ones(4), np.ones((3, 1)), np.ones(0)],
                         ids=["2", "4", "3x1", "0"])
def test_start_params_shape_error(dietox_rs: lmefast.MixedLM, bad: np.ndarray) -> None:
    with pytest.raises(SpecificationError, match="start_params"):
        dietox_rs.fit(start_params=bad)


def test_start_params_good(dietox_rs: lmefast.MixedLM) -> None:
    ref = dietox_rs.fit()
    res = dietox_rs.fit(start_params=np.array([2.0, 0.1, 0.5]))
    assert res.converged
    assert res.llf == pytest.approx(ref.llf, abs=1e-6)
    res2 = dietox_rs.fit(start_params=ref.theta)
    assert res2.llf >= ref.llf - 1e-9


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_fit_validates_n_threads(bad: object, sleepstudy: pd.DataFrame) -> None:
    df = sleepstudy
    with pytest.raises((ValueError, TypeError), match="n_threads"):
        lmefast.mixedlm("Reaction ~ Days", df, groups="Subject").fit(n_threads=bad)
    with pytest.raises((ValueError, TypeError), match="n_threads"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject) + (1 | Days)", df, n_threads=bad)
