"""lmefast against lme4 1.1-31 on the one-grouping-factor cases of tests/data/cases.json, REML and
ML, fitted from the statsmodels form ("sm" fields). The crossed case (Penicillin, statsmodels' idiom:
one group spanning the data, each factor a variance component) is fitted as a model with several
grouping factors and checked against lme4 in test_lmer.py.

lme4 is only as accurate as its optimiser's tolerance. Where our fit reaches a strictly better
objective than lme4's, lme4's parameters can be off by more than the tolerances below; then a value
passes if it is within tolerance of lme4's OR (our objective is better AND it is within the same
tolerance of the exact optimum, found by polishing our θ with Newton steps). How far lme4 was from the
polished optimum is recorded (printed at the end of the run) and checked to be within lme4's
optimiser tolerance in test_lme4_is_near_the_polished_optimum.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import lmefast

RTOL_FE = 1e-5
RTOL_SE = 1e-4
RTOL_VC = 1e-4
ATOL_ZERO = 1e-6
RTOL_BLUP = 1e-4
LLF_TOL = 1e-6

_LEVEL = re.compile(r"^(?P<var>.+?)\[T\.(?P<level>.+)\]$")


# -- names ------------------------------------------------------------------------------------
def fe_name(lme4_name: str, ours: list[str]) -> str:
    """lme4's fixed-effect name → ours: '(Intercept)' → 'Intercept', 'CuCu035' → 'Cu[T.Cu035]'."""
    if lme4_name == "(Intercept)":
        return "Intercept"
    if lme4_name in ours:
        return lme4_name
    matches = [n for n in ours if (m := _LEVEL.match(n)) and m["var"] + m["level"] == lme4_name]
    assert len(matches) == 1, f"no unique fixed effect of ours for lme4's {lme4_name!r} (ours: {ours})"
    return matches[0]


def re_name(lme4_term: str, group_name: str) -> str:
    """lme4's random term → ours: '(Intercept)' is named after the grouping factor (statsmodels)."""
    return group_name if lme4_term == "(Intercept)" else lme4_term


def vc_of(grp: str, var1: str, vc_names: list[str]) -> str:
    """Which of our variance components is lme4's term (grp, var1): 'Subject.1'/'Days' → 'Days',
    'cask:batch'/'(Intercept)' → 'cask'."""
    if var1 in vc_names:
        return var1
    hits = [f for f in grp.split(":") if f in vc_names]
    assert len(hits) == 1, f"cannot map lme4 term {grp}/{var1} to one of {vc_names}"
    return hits[0]


# -- quantities of a fit, in lme4's layout ------------------------------------------------------
def fixef_of(res: lmefast.MixedLMResults, ref: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ours = list(res.fe_params.index)
    names = [fe_name(n, ours) for n in ref.fixef]
    return res.fe_params[names].to_numpy(), res.bse_fe[names].to_numpy(), names


def varcorr_of(res: lmefast.MixedLMResults, ref: Any) -> tuple[np.ndarray, list[str]]:
    """Our value of each lme4 varcorr 'vcov' entry (variances, covariances, residual variance)."""
    model = res.model
    g = model.spec.group_name
    vc_names = list(model.spec.theta_map.vc_names)
    cov = res.cov_re
    out, labels = [], []
    for e in ref.varcorr:
        grp, v1, v2 = e["grp"], e["var1"], e["var2"]
        if grp == "Residual":
            val = res.scale
        elif v2 is not None:
            val = cov.loc[re_name(v1, g), re_name(v2, g)]
        elif grp == g and re_name(v1, g) in cov.index:
            val = cov.loc[re_name(v1, g), re_name(v1, g)]
        else:
            val = res.vcomp[vc_names.index(vc_of(grp, v1, vc_names))]
        out.append(float(val))
        labels.append(f"{grp}/{v1}/{v2}")
    return np.array(out), labels


def _coordinate(res: lmefast.MixedLMResults, grp: str, level: str, term: str) -> tuple[Any, str]:
    """(our group label, our random_effects index entry) of lme4's ranef[grp][level, term]."""
    model = res.model
    g = model.spec.group_name
    vc_names = list(model.spec.theta_map.vc_names)
    labels = {str(lab): lab for lab in model.spec.group_labels.tolist()}
    if grp == g:
        label = labels[level]
        index = list(res.random_effects[label].index)
        name = re_name(term, g)
        if name in index:
            return label, name
        vc = vc_of(grp, term, vc_names)
        hits = [i for i in index if i.startswith(f"{vc}[")]
        assert len(hits) == 1, (grp, level, term, index)
        return label, hits[0]
    if grp in vc_names and g not in grp.split(":"):
        # a crossed factor, fitted as a variance component of one group spanning all rows
        assert len(labels) == 1, labels
        return next(iter(labels.values())), f"{grp}[{level}]"
    factors = grp.split(":")
    parts = level.split(":")
    assert g in factors and len(parts) == len(factors), (grp, level, g)
    assert term == "(Intercept)", term
    label = labels[parts[factors.index(g)]]
    vc = vc_of(grp, term, vc_names)
    return label, f"{vc}[{parts[factors.index(vc)]}]"


def ranef_of(res: lmefast.MixedLMResults, grp: str, rt: Any) -> np.ndarray:
    out = np.empty_like(rt.values)
    for i, level in enumerate(rt.levels):
        for j, term in enumerate(rt.terms):
            label, key = _coordinate(res, grp, level, term)
            out[i, j] = res.random_effects[label][key]
    return out


def condvar_of(res: lmefast.MixedLMResults, grp: str, rt: Any) -> np.ndarray:
    nt = len(rt.terms)
    out = np.empty((len(rt.levels), nt, nt))
    for i, level in enumerate(rt.levels):
        keys = [_coordinate(res, grp, level, t) for t in rt.terms]
        label = keys[0][0]
        cov = res.random_effects_cov[label]
        for a in range(nt):
            for b in range(nt):
                out[i, a, b] = cov.loc[keys[a][1], keys[b][1]]
    return out


# -- the two-tier comparison ----------------------------------------------------------------------
def two_tier(what: str, ours: np.ndarray, lme4: np.ndarray, exact: np.ndarray, scale_lme4: np.ndarray,
             scale_exact: np.ndarray, rtol: float, better: bool, labels: list[str] | None = None
             ) -> tuple[int, float]:
    """Each value must be within rtol × scale of lme4's, or (our objective better and) within
    rtol × scale of the exact optimum's. Returns (how many values needed the second tier, max
    |lme4 − exact| / scale: lme4's distance from the optimum in the units of the tolerance)."""
    ours, lme4, exact = (np.asarray(a, dtype=float).ravel() for a in (ours, lme4, exact))
    s_l = np.broadcast_to(np.asarray(scale_lme4, dtype=float).ravel(), ours.shape)
    s_e = np.broadcast_to(np.asarray(scale_exact, dtype=float).ravel(), ours.shape)
    near_lme4 = np.abs(ours - lme4) <= rtol * s_l
    near_exact = np.abs(ours - exact) <= rtol * s_e
    ok = near_lme4 | (better & near_exact)
    if not ok.all():
        bad = np.nonzero(~ok)[0]
        lines = [f"{what}: {bad.size} of {ours.size} values off (our objective better than lme4's: {better})"]
        for i in bad[:10]:
            lab = labels[i] if labels else str(i)
            lines.append(f"  {lab}: ours {ours[i]!r}, lme4 {lme4[i]!r} (tol {rtol * s_l[i]:.3g}), "
                         f"exact {exact[i]!r} (tol {rtol * s_e[i]:.3g})")
        pytest.fail("\n".join(lines))
    dist = float(np.max(np.abs(lme4 - exact) / s_e, initial=0.0))
    return int(np.sum(~near_lme4)), dist


def rel_scale(base: np.ndarray, rtol: float, atol_at_zero: float = 0.0) -> np.ndarray:
    """|base|, or atol/rtol where base is 0 (so that rtol × scale is the absolute tolerance)."""
    base = np.abs(np.asarray(base, dtype=float))
    return np.where(base == 0.0, atol_at_zero / rtol, base)


def term_scale(values: np.ndarray) -> np.ndarray:
    """Per term (column), the scale its BLUPs are compared on: max |value| over levels."""
    s = np.max(np.abs(values), axis=0, keepdims=True)
    return np.broadcast_to(np.where(s == 0, 1.0, s), values.shape)


def record(fits: dict[str, Any], quantity: str, result: tuple[int, float]) -> None:
    """Log lme4's distance from the exact optimum, and how many values passed only by the second tier."""
    n_tier2, dist = result
    log = fits["log"]
    log[quantity] = max(dist, log.get(quantity, 0.0))
    if n_tier2:
        log[f"{quantity}:n_exact_only"] = log.get(f"{quantity}:n_exact_only", 0) + n_tier2


# -- tests -------------------------------------------------------------------------------------
@pytest.fixture
def fits(case: dict[str, Any], reml: bool, fitted: Callable, polished: Callable, reference: Callable,
         lme4_distance_log: dict) -> dict[str, Any]:
    model, res = fitted(case["id"], reml)
    ref = reference(case["id"], reml)
    exact = polished(case["id"], reml)
    key = f"{case['id']}/{'REML' if reml else 'ML'}"
    log = lme4_distance_log.setdefault(key, {})
    log["objective(lme4-exact)"] = ref.objective - exact.objective
    log["objective(ours-exact)"] = res.objective - exact.objective
    return {"model": model, "res": res, "ref": ref, "exact": exact, "better": res.llf > ref.loglik,
            "log": log}


def test_converged(fits: dict[str, Any]) -> None:
    res = fits["res"]
    assert res.converged is True
    assert res.optsummary.converged is True
    assert np.all(np.isfinite(res.optsummary.projected_gradient))


def test_loglik_at_least_lme4s(fits: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    assert res.llf >= ref.loglik - LLF_TOL, f"llf {res.llf!r} < lme4's {ref.loglik!r}"
    assert res.objective == pytest.approx(-2 * res.llf, rel=1e-14, abs=1e-12)


def test_lme4_is_near_the_polished_optimum(fits: dict[str, Any]) -> None:
    """The polished optimum is at least as good as both fits, our fit is at it (to rounding), and
    lme4's objective is within its optimiser's tolerance of it. Distances are logged."""
    res, ref, exact, model = fits["res"], fits["ref"], fits["exact"], fits["model"]
    scale = max(1.0, abs(exact.objective))
    assert exact.objective <= ref.objective + 1e-10 * scale
    assert exact.objective <= res.objective + 1e-10 * scale
    assert res.objective - exact.objective <= 1e-8 * scale
    assert ref.objective - exact.objective <= 1e-5 * scale, "lme4 far from the optimum: polish wrong?"
    # exact is a stationary point (projected gradient ~ 0 on free coordinates)
    th = exact.theta
    g = model.objective(res.reml).solve(th, want_grad=True).grad
    lower = model.spec.theta_map.lower_bounds()
    pg = np.where((th <= lower) & (g >= 0), 0.0, g)
    assert np.max(np.abs(pg), initial=0.0) < 1e-5
    fits["log"]["theta(ours-exact)"] = float(np.max(np.abs(res.theta - th), initial=0.0))
    # ... and a minimum: the Hessian on the free coordinates (central differences of the analytic
    # gradient) is positive definite
    obj = model.objective(res.reml)
    free = np.nonzero(~((th <= lower) & (g >= 0)))[0]
    H = np.empty((free.size, free.size))
    for col, i in enumerate(free):
        h = 1e-5 * max(abs(th[i]), 1e-2)
        e = np.zeros_like(th)
        e[i] = h
        H[:, col] = ((obj.solve(th + e, want_grad=True).grad - obj.solve(th - e, want_grad=True).grad)
                     / (2 * h))[free]
    if free.size:
        assert np.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0, f"polished θ {th} is not a minimum"


def test_other_starting_points_do_no_better(fits: dict[str, Any]) -> None:
    """Fits from other starting θ reach no better objective than the default start."""
    model, res = fits["model"], fits["res"]
    start = model.spec.theta_map.start()
    for factor in (0.3, 3.0):
        other = model.fit(reml=res.reml, start_params=start * factor)
        assert res.objective <= other.objective + 1e-7 * max(1.0, abs(res.objective)), (
            f"start ×{factor}: objective {other.objective!r} at θ {other.theta} beats the default fit's "
            f"{res.objective!r} at θ {res.theta}")


def test_fixed_effects(fits: dict[str, Any]) -> None:
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    ours, _, names = fixef_of(res, ref)
    lme4 = np.array(list(ref.fixef.values()))
    best, _, _ = fixef_of(exact, ref)
    record(fits, "fixef", two_tier("fixed effects", ours, lme4, best, rel_scale(lme4, RTOL_FE, ATOL_ZERO),
                                   rel_scale(best, RTOL_FE, ATOL_ZERO), RTOL_FE, fits["better"], names))


def test_fixed_effect_standard_errors(fits: dict[str, Any]) -> None:
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    _, ours, names = fixef_of(res, ref)
    lme4 = np.array([ref.se_fixef[n] for n in ref.fixef])
    _, best, _ = fixef_of(exact, ref)
    record(fits, "se_fixef", two_tier("fixed-effect SEs", ours, lme4, best, np.abs(lme4), np.abs(best), RTOL_SE,
                                      fits["better"], names))
    # cov_params' fixed-effect block is the covariance the SEs come from
    cp = res.cov_params()
    np.testing.assert_allclose(np.sqrt(np.diag(cp.loc[names, names].to_numpy())), ours, rtol=1e-12)


def test_variance_components(fits: dict[str, Any]) -> None:
    """lme4's varcorr vcov (variances, covariances, residual variance) vs cov_re / vcomp / scale."""
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    ours, labels = varcorr_of(res, ref)
    lme4 = np.array([float(e["vcov"]) for e in ref.varcorr])
    best, _ = varcorr_of(exact, ref)
    # a covariance is compared on the scale of the variances it couples (it may be near 0)
    sl, se = rel_scale(lme4, RTOL_VC, ATOL_ZERO), rel_scale(best, RTOL_VC, ATOL_ZERO)
    diag = {(e["grp"], e["var1"]): i for i, e in enumerate(ref.varcorr) if e["var2"] is None}
    for i, e in enumerate(ref.varcorr):
        if e["var2"] is not None:
            a, b = diag[(e["grp"], e["var1"])], diag[(e["grp"], e["var2"])]
            sl[i] = max(sl[i], np.sqrt(lme4[a] * lme4[b]))
            se[i] = max(se[i], np.sqrt(best[a] * best[b]))
    record(fits, "varcorr", two_tier("variance components", ours, lme4, best, sl, se, RTOL_VC, fits["better"],
                                     labels))


def test_residual_variance(fits: dict[str, Any]) -> None:
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    lme4, best = np.array([ref.sigma**2]), np.array([exact.scale])
    record(fits, "sigma2", two_tier("residual variance", np.array([res.scale]), lme4, best,
                                    rel_scale(lme4, RTOL_VC, ATOL_ZERO), rel_scale(best, RTOL_VC, ATOL_ZERO),
                                    RTOL_VC, fits["better"]))
    assert res.sigma == pytest.approx(np.sqrt(res.scale), rel=1e-14)


def test_blups(fits: dict[str, Any]) -> None:
    """lme4's ranef: each term compared on the scale of that term's values."""
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    for grp, rt in ref.ranef.items():
        ours = ranef_of(res, grp, rt)
        best = ranef_of(exact, grp, rt)
        labels = [f"{grp}[{lev}, {t}]" for lev in rt.levels for t in rt.terms]
        record(fits, "ranef", two_tier(f"BLUPs of {grp}", ours, rt.values, best, term_scale(rt.values),
                                       term_scale(best), RTOL_BLUP, fits["better"], labels))


def test_conditional_variances(fits: dict[str, Any]) -> None:
    """lme4's condVar (where the reference has it) vs random_effects_cov."""
    res, ref, exact = fits["res"], fits["ref"], fits["exact"]
    with_cv = {g: rt for g, rt in ref.ranef.items() if rt.condvar is not None}
    if ref.raw["id"] == "sleep_zc":
        assert not with_cv  # lme4 1.1-31 gives no condVar for (Days||Subject)
    for grp, rt in with_cv.items():
        ours = condvar_of(res, grp, rt)
        best = condvar_of(exact, grp, rt)
        # entry (a, b) on the scale sd_a sd_b of its level's conditional sds (absolute 1e-10 when 0)
        d = np.sqrt(np.einsum("ijj->ij", np.abs(rt.condvar)))
        db = np.sqrt(np.einsum("ijj->ij", np.abs(best)))
        s_l = np.maximum(np.einsum("ij,ik->ijk", d, d), 1e-10 / RTOL_VC)
        s_e = np.maximum(np.einsum("ij,ik->ijk", db, db), 1e-10 / RTOL_VC)
        record(fits, "condvar", two_tier(f"condVar of {grp}", ours, rt.condvar, best, s_l, s_e, RTOL_VC,
                                         fits["better"]))


def test_singular_flag(fits: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    assert res.singular == ref.singular
    assert res.optsummary.singular == ref.singular


def test_nobs_and_groups(fits: dict[str, Any], case: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    assert res.nobs == ref.raw["nobs"]
    groups = case["sm"]["groups"]
    if groups is None:  # crossed factors: one group, each factor a variance component with all its levels
        assert res.n_groups == 1
        coords = res.random_effects[res.model.spec.group_labels[0]].index
        for factor, n_levels in ref.raw["ngroups"].items():
            assert sum(c.startswith(f"{factor}[") for c in coords) == n_levels
    else:
        assert res.n_groups == ref.raw["ngroups"][groups]


def theta_from_lme4(model: lmefast.MixedLM, ref: Any) -> np.ndarray:
    """lme4's θ in our order: lme4 lists θ term by term (its varcorr order), each term's lower triangle by
    columns; ours is the group's T, then the variance components in vc_formula order."""
    g = model.spec.group_name
    tm = model.spec.theta_map
    vc_names = list(tm.vc_names)
    nt = tm.k * (tm.k + 1) // 2
    terms: dict[str, list[str]] = {}
    for e in ref.varcorr:
        if e["grp"] != "Residual" and e["var2"] is None:
            terms.setdefault(e["grp"], []).append(e["var1"])
    theta = np.full(tm.n_theta, np.nan)
    pos = 0
    for grp, names in terms.items():
        size = len(names) * (len(names) + 1) // 2
        block = ref.theta[pos:pos + size]
        if grp == g:
            assert [re_name(n, g) for n in names] == list(tm.re_names), (names, tm.re_names)
            theta[:nt] = block
        else:
            assert size == 1, (grp, names)
            theta[nt + vc_names.index(vc_of(grp, names[0], vc_names))] = block[0]
        pos += size
    assert pos == ref.theta.size and not np.isnan(theta).any()
    return theta


def test_objective_at_lme4s_theta(fits: dict[str, Any]) -> None:
    """Our profiled objective, evaluated at lme4's θ̂, is lme4's reported objective: an independent
    check of the function both optimise (and of the θ order), which the second tier relies on."""
    model, res, ref = fits["model"], fits["res"], fits["ref"]
    theta = theta_from_lme4(model, ref)
    sol = model.objective(res.reml).solve(theta)
    assert sol.objective == pytest.approx(ref.objective, rel=1e-10, abs=1e-9)
    assert np.sqrt(sol.sigma2) == pytest.approx(ref.sigma, rel=1e-7)
    ours, _, names = fixef_of(res, ref)
    beta = pd.Series(sol.beta, index=res.fe_params.index)[names].to_numpy()
    np.testing.assert_allclose(beta, list(ref.fixef.values()), rtol=1e-7, atol=1e-9)
