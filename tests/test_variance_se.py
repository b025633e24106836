"""Standard errors of the variance parameters (bse_re, the variance block of cov_params(), the
statsmodels-layout conf_int()) against the inverse of a numerical Hessian of the log-likelihood,
written here densely in statsmodels' parametrisation (fixed effects, cov_re/scale by rows,
vcomp/scale) with σ² profiled out, as statsmodels' MixedLM.loglike does; that function is itself
checked against statsmodels' (a test-only dependency).

Profiling σ² (and, for REML, β) out leaves the inverse Hessian's block of the remaining parameters
unchanged, so the inverse of −∇²ℓ over ψ (β and σ² profiled) is the covariance lmefast reports."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import fit_case, read_data
from scipy import stats
from statsmodels.regression import mixed_linear_model as sm

# Central second differences with relative step H_STEP: truncation error ~H_STEP² = 1e-6 relative;
# rounding ~ε |ℓ| / (H_STEP² x² |∂²ℓ/∂x²|), with |ℓ| ≈ 900: ~1e-7 at this step (at 1e-4 it grows to
# ~1e-3 on the covariance entry, measured). The SEs then agree to ~5e-6 (measured, REML and ML);
# RTOL_SE = 1e-4 leaves a margin and is far below any error of the delta method or of the Hessian's
# scaling (a factor 2 in the information moves the SEs by 41%).
H_STEP = 1e-3
RTOL_SE = 1e-4


def _sleepstudy() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    df = read_data("sleepstudy")
    y = df["Reaction"].to_numpy(dtype=float)
    days = df["Days"].to_numpy(dtype=float)
    X = np.column_stack([np.ones_like(days), days])
    groups = [np.nonzero(df["Subject"].to_numpy() == s)[0] for s in df["Subject"].unique()]
    return y, X, X.copy(), groups


def profiled_loglik(beta: np.ndarray | None, psi: np.ndarray, reml: bool,
                    data: tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]) -> float:
    """ℓ at (β, ψ) with σ² at its maximum, ψ = (Ψ₀₀, Ψ₁₀, Ψ₁₁) = cov_re/scale by rows, β = None for
    its maximum (GLS). V = σ² W, W_i = I + Z_i Ψ Z_i'. ML: ℓ = −½[n log(2π σ²) + log|W| + n],
    σ² = r'W⁻¹r/n, r = y − Xβ. REML (β is not a parameter; REML needs β = None):
    ℓ_R = −½[(n−p) log(2π σ²) + log|W| + log|X'W⁻¹X| + n − p], σ² = r'W⁻¹r/(n−p), r the GLS
    residual (lme4's REML criterion, no log|X'X| term)."""
    y, X, Z, groups = data
    Psi = np.array([[psi[0], psi[1]], [psi[1], psi[2]]])
    n, p = X.shape
    logdet, XtWX, XtWy, ytWy = 0.0, np.zeros((p, p)), np.zeros(p), 0.0
    Winv = []
    for rows in groups:
        Zi = Z[rows]
        W = np.eye(rows.size) + Zi @ Psi @ Zi.T
        sign, ld = np.linalg.slogdet(W)
        if sign <= 0:
            return -np.inf
        logdet += ld
        Wi = np.linalg.inv(W)
        Winv.append(Wi)
        XtWX += X[rows].T @ Wi @ X[rows]
        XtWy += X[rows].T @ Wi @ y[rows]
        ytWy += y[rows] @ Wi @ y[rows]
    n_eff = n - p if reml else n
    if beta is None:   # β at its maximum: generalised least squares
        beta = np.linalg.solve(XtWX, XtWy)
    q = sum(float((y[r] - X[r] @ beta) @ Wi @ (y[r] - X[r] @ beta)) for r, Wi in zip(groups, Winv, strict=True))
    out = -0.5 * (n_eff * np.log(2 * np.pi * q / n_eff) + logdet + n_eff)
    return out - 0.5 * np.linalg.slogdet(XtWX)[1] if reml else out


def numerical_hessian(f, x: np.ndarray) -> np.ndarray:
    h = H_STEP * np.maximum(np.abs(x), 1e-2 * np.max(np.abs(x)))
    d = x.size
    H = np.empty((d, d))
    for i in range(d):
        for j in range(i, d):
            ei, ej = np.zeros(d), np.zeros(d)
            ei[i], ej[j] = h[i], h[j]
            second = f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)
            H[i, j] = H[j, i] = second / (4 * h[i] * h[j])
    return H


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_variance_parameter_ses_are_the_inverse_hessian(reml: bool) -> None:
    _, res = fit_case("sleep_rs", reml)
    data = _sleepstudy()
    p = res.k_fe
    psi = res.params.to_numpy()[p:]
    assert psi.size == 3
    # β profiled out too (GLS β̂(ψ)): the ψ block of the inverse Hessian is unchanged, and the steps
    # need no common scale for β and ψ
    cov = np.linalg.inv(-numerical_hessian(lambda x: profiled_loglik(None, x, reml, data), psi))
    se = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(res.bse_re.to_numpy(), se, rtol=RTOL_SE)
    got = res.cov_params().to_numpy()[p:, p:]
    scale = np.sqrt(np.outer(se, se))
    np.testing.assert_allclose(got / scale, cov / scale, atol=RTOL_SE)
    # statsmodels' conf_int layout: params ± z SE
    ci = res.conf_int().to_numpy()[p:]
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(ci[:, 0], psi - z * se, rtol=0, atol=RTOL_SE * z * se.max())
    np.testing.assert_allclose(ci[:, 1], psi + z * se, rtol=0, atol=RTOL_SE * z * se.max())


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_dense_loglik_is_statsmodels(reml: bool) -> None:
    """The dense function above is statsmodels' MixedLM.loglike (σ² profiled, β given) at our
    estimates, and its maximum is our llf."""
    _, res = fit_case("sleep_rs", reml)
    df = read_data("sleepstudy")
    model = sm.MixedLM.from_formula("Reaction ~ Days", df, groups="Subject", re_formula="~Days")
    model.reml = reml
    p = res.k_fe
    psi = res.params.to_numpy()[p:]
    cov_re = np.array([[psi[0], psi[1]], [psi[1], psi[2]]])
    params = sm.MixedLMParams.from_components(res.fe_params.to_numpy(), cov_re=cov_re)
    ours = profiled_loglik(res.fe_params.to_numpy(), psi, reml, _sleepstudy())
    assert ours == pytest.approx(res.llf, rel=1e-10)
    model.cov_pen = model.fe_pen = None      # set by statsmodels' fit(), which is not run here
    assert model.loglike(params, profile_fe=False) == pytest.approx(ours, rel=1e-10)
