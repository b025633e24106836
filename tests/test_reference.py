"""lmefast against lme4 1.1-31 on the one-grouping-factor cases of tests/data/cases.json, REML and
ML, fitted from the statsmodels form ("sm" fields). The crossed case (Penicillin, statsmodels' idiom:
one group spanning the data, each factor a variance component) is fitted as a model with several
grouping factors and checked against lme4 in test_lmer.py.

The reference values are at the optimum: make_lme4_reference.R refits lme4 from its default answer
at tight tolerances (lme4_default_loglik records where the default stopped). Every value is compared
with lme4's directly, within a tolerance set by how far from the optimum our optimiser may stop (see
the constants below); there is no other target.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import read_data

import lmefast

# Tolerances. The references are at the optimum (lme4 refitted at tight tolerances); our fit stops when
# its Newton decrement is small, and test_at_lme4s_optimum asserts that its objective (−2ℓ) is within
# OBJ_TOL of the optimum. Near the optimum −2ℓ is quadratic with Hessian H and cov(θ̂) ≈ 2H⁻¹, so a
# distance Δ in −2ℓ moves each parameter by at most sqrt(Δ) of its standard error: 1e-4 SE at Δ = 1e-8.
# Variances, covariances, σ², BLUPs and conditional variances are smooth functions of θ whose standard
# errors are below their size here, so they agree to 1e-4 relative (measured: ≤ 4e-5, sleep_rs ML);
# fixed effects, their SEs and σ² move much less than θ (measured: ≤ 2e-6, 4e-6, 8e-7) and are held
# tighter. Every tolerance is at least 10x below the mutations the suite must catch (1% on SEs, BLUPs,
# 5% on conditional variances, 0.1% on σ²).
OBJ_TOL = 1e-8
RTOL_FE = 1e-5
RTOL_SE = 3e-5
RTOL_SIGMA2 = 1e-5
RTOL_VC = 1e-4
ATOL_ZERO = 1e-6
RTOL_BLUP = 1e-4
LLF_TOL = OBJ_TOL / 2

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


# -- the comparison ---------------------------------------------------------------------------------
def assert_near(what: str, ours: np.ndarray, lme4: np.ndarray, scale: np.ndarray, rtol: float,
                labels: list[str] | None = None) -> None:
    """Each value within rtol × scale of lme4's (the reference is at the optimum: no other target)."""
    ours, lme4 = (np.asarray(a, dtype=float).ravel() for a in (ours, lme4))
    s = np.broadcast_to(np.asarray(scale, dtype=float).ravel(), ours.shape)
    ok = np.abs(ours - lme4) <= rtol * s
    if not ok.all():
        bad = np.nonzero(~ok)[0]
        lines = [f"{what}: {bad.size} of {ours.size} values off by more than {rtol:g} of their scale"]
        for i in bad[:10]:
            lab = labels[i] if labels else str(i)
            lines.append(f"  {lab}: ours {ours[i]!r}, lme4 {lme4[i]!r} (tol {rtol * s[i]:.3g})")
        pytest.fail("\n".join(lines))


def rel_scale(base: np.ndarray, rtol: float, atol_at_zero: float = 0.0) -> np.ndarray:
    """|base|, or atol/rtol where base is 0 (so that rtol × scale is the absolute tolerance)."""
    base = np.abs(np.asarray(base, dtype=float))
    return np.where(base == 0.0, atol_at_zero / rtol, base)


def term_scale(values: np.ndarray) -> np.ndarray:
    """Per term (column), the scale its BLUPs are compared on: max |value| over levels."""
    s = np.max(np.abs(values), axis=0, keepdims=True)
    return np.broadcast_to(np.where(s == 0, 1.0, s), values.shape)


# -- tests -------------------------------------------------------------------------------------
@pytest.fixture
def fits(case: dict[str, Any], reml: bool, fitted: Callable, reference: Callable) -> dict[str, Any]:
    model, res = fitted(case["id"], reml)
    return {"model": model, "res": res, "ref": reference(case["id"], reml)}


def test_converged(fits: dict[str, Any]) -> None:
    res = fits["res"]
    assert res.converged is True
    assert res.optsummary.converged is True
    assert np.all(np.isfinite(res.optsummary.projected_gradient))


def test_at_lme4s_optimum(fits: dict[str, Any]) -> None:
    """lme4's reference objective is the optimum (refitted at tight tolerances): ours is no better (to
    rounding) and within OBJ_TOL of it. OBJ_TOL is what the parameter tolerances below rest on."""
    res, ref = fits["res"], fits["ref"]
    # lme4's logLik, AIC and BIC (same parameter count): they differ from ours by the objectives' gap
    assert res.llf == pytest.approx(ref.loglik, abs=LLF_TOL + 1e-11 * abs(ref.loglik))
    assert res.aic == pytest.approx(float(ref.raw["aic"]), abs=OBJ_TOL + 1e-11 * abs(ref.objective))
    assert res.bic == pytest.approx(float(ref.raw["bic"]), abs=OBJ_TOL + 1e-11 * abs(ref.objective))
    rounding = 1e-11 * abs(ref.objective)
    assert res.objective >= ref.objective - rounding, "better than the optimum: reference not at it?"
    assert res.objective - ref.objective <= OBJ_TOL + rounding, (
        f"objective {res.objective!r} vs lme4's optimum {ref.objective!r}")
    # where lme4's default stopping rule had stopped: never better than the optimum
    assert float(ref.raw["lme4_default_loglik"]) <= ref.loglik + 1e-9 * abs(ref.loglik)


def test_lme4s_theta_is_a_minimum_of_our_objective(fits: dict[str, Any]) -> None:
    """At lme4's θ̂ our analytic gradient vanishes on the free coordinates and the Hessian there (central
    differences of the gradient) is positive definite: our objective and lme4's share the minimum."""
    model, res, ref = fits["model"], fits["res"], fits["ref"]
    th = theta_from_lme4(model, ref)
    obj = model.objective(res.reml)
    g = np.asarray(obj.solve(th, want_grad=True).grad, dtype=float)
    lower = model.spec.theta_map.lower_bounds()
    at_bound = (th <= lower + 1e-12) & (g >= 0)
    free = np.nonzero(~at_bound)[0]
    H = np.empty((free.size, free.size))
    for col, i in enumerate(free):
        h = 1e-5 * max(abs(th[i]), 1e-2)
        e = np.zeros_like(th)
        e[i] = h
        H[:, col] = ((obj.solve(th + e, want_grad=True).grad - obj.solve(th - e, want_grad=True).grad)
                     / (2 * h))[free]
    if free.size:
        H = 0.5 * (H + H.T)
        assert np.linalg.eigvalsh(H).min() > 0, f"lme4's θ {th} is not a minimum of our objective"
        # the Newton step from lme4's θ would lower the objective by g'H⁻¹g/2: below OBJ_TOL
        decrement = float(g[free] @ np.linalg.solve(H, g[free]))
        assert decrement < OBJ_TOL, f"Newton decrement {decrement:.3g} at lme4's θ: not its optimum"


def test_other_starting_points_do_no_better(fits: dict[str, Any]) -> None:
    """Fits from other starting θ reach no better objective than the default start."""
    model, res = fits["model"], fits["res"]
    start = model.spec.theta_map.start()
    for factor in (0.3, 3.0):
        other = model.fit(reml=res.reml, start_theta=start * factor)
        assert res.objective <= other.objective + 1e-7 * max(1.0, abs(res.objective)), (
            f"start ×{factor}: objective {other.objective!r} at θ {other.theta} beats the default fit's "
            f"{res.objective!r} at θ {res.theta}")


def test_fixed_effects(fits: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    ours, _, names = fixef_of(res, ref)
    lme4 = np.array(list(ref.fixef.values()))
    assert_near("fixed effects", ours, lme4, rel_scale(lme4, RTOL_FE, ATOL_ZERO), RTOL_FE, names)


def test_fixed_effect_standard_errors(fits: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    _, ours, names = fixef_of(res, ref)
    lme4 = np.array([ref.se_fixef[n] for n in ref.fixef])
    assert_near("fixed-effect SEs", ours, lme4, np.abs(lme4), RTOL_SE, names)
    # cov_params' fixed-effect block is lme4's vcov
    cp = res.cov_params().loc[names, names].to_numpy()
    vc = np.array(ref.raw["vcov_fixef"], dtype=float).reshape(len(names), len(names))
    d = np.sqrt(np.diag(vc))
    np.testing.assert_allclose(cp, vc, rtol=0, atol=2 * RTOL_SE * float(np.max(np.outer(d, d))))
    np.testing.assert_allclose(np.sqrt(np.diag(cp)), ours, rtol=1e-12)


def test_variance_components(fits: dict[str, Any]) -> None:
    """lme4's varcorr vcov (variances, covariances, residual variance) vs cov_re / vcomp / scale."""
    res, ref = fits["res"], fits["ref"]
    ours, labels = varcorr_of(res, ref)
    lme4 = np.array([float(e["vcov"]) for e in ref.varcorr])
    # a covariance is compared on the scale of the variances it couples (it may be near 0)
    scale = rel_scale(lme4, RTOL_VC, ATOL_ZERO)
    diag = {(e["grp"], e["var1"]): i for i, e in enumerate(ref.varcorr) if e["var2"] is None}
    for i, e in enumerate(ref.varcorr):
        if e["var2"] is not None:
            a, b = diag[(e["grp"], e["var1"])], diag[(e["grp"], e["var2"])]
            scale[i] = max(scale[i], np.sqrt(lme4[a] * lme4[b]))
    assert_near("variance components", ours, lme4, scale, RTOL_VC, labels)


def test_residual_variance(fits: dict[str, Any]) -> None:
    res, ref = fits["res"], fits["ref"]
    assert res.scale == pytest.approx(ref.sigma**2, rel=RTOL_SIGMA2)
    assert res.sigma == pytest.approx(np.sqrt(res.scale), rel=1e-14)


def test_blups(fits: dict[str, Any]) -> None:
    """lme4's ranef: each term compared on the scale of that term's values."""
    res, ref = fits["res"], fits["ref"]
    assert ref.ranef
    for grp, rt in ref.ranef.items():
        ours = ranef_of(res, grp, rt)
        labels = [f"{grp}[{lev}, {t}]" for lev in rt.levels for t in rt.terms]
        assert_near(f"BLUPs of {grp}", ours, rt.values, term_scale(rt.values), RTOL_BLUP, labels)


def test_conditional_variances(fits: dict[str, Any]) -> None:
    """lme4's condVar (where the reference has it) vs random_effects_cov."""
    res, ref = fits["res"], fits["ref"]
    with_cv = {g: rt for g, rt in ref.ranef.items() if rt.condvar is not None}
    if ref.raw["id"] == "sleep_zc":
        # lme4 1.1-31 gives no condVar for (Days||Subject): build it from lme4's θ̂ and σ̂ instead,
        # σ² Λ (Λ'Z_i'Z_iΛ + I)⁻¹ Λ' per subject (Z_i = [1, Days]; lme4's condVar is conditional on β̂)
        assert not with_cv
        rt = ref.ranef["Subject"]
        df = read_data("sleepstudy")
        lam = np.diag(ref.theta)
        cv = np.empty((len(rt.levels), 2, 2))
        for i, level in enumerate(rt.levels):
            days = df.loc[df["Subject"].astype(str) == level, "Days"].to_numpy(dtype=float)
            z = np.column_stack([np.ones_like(days), days])
            cv[i] = ref.sigma**2 * lam @ np.linalg.solve(lam @ z.T @ z @ lam + np.eye(2), lam)
        with_cv = {"Subject": replace(rt, condvar=cv)}
    assert with_cv
    for grp, rt in with_cv.items():
        ours = condvar_of(res, grp, rt)
        # entry (a, b) on the scale sd_a sd_b of its level's conditional sds (absolute 1e-10 when 0)
        d = np.sqrt(np.einsum("ijj->ij", np.abs(rt.condvar)))
        scale = np.maximum(np.einsum("ij,ik->ijk", d, d), 1e-10 / RTOL_VC)
        assert_near(f"condVar of {grp}", ours, rt.condvar, scale, RTOL_VC)


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
    check of the function both optimise (and of the θ order)."""
    model, res, ref = fits["model"], fits["res"], fits["ref"]
    theta = theta_from_lme4(model, ref)
    sol = model.objective(res.reml).solve(theta)
    assert sol.objective == pytest.approx(ref.objective, rel=1e-10, abs=1e-9)
    assert np.sqrt(sol.sigma2) == pytest.approx(ref.sigma, rel=1e-7)
    ours, _, names = fixef_of(res, ref)
    beta = pd.Series(sol.beta, index=res.fe_params.index)[names].to_numpy()
    np.testing.assert_allclose(beta, list(ref.fixef.values()), rtol=1e-7, atol=1e-9)
