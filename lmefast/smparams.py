"""statsmodels' parametrisation of a model: θ ↔ MixedLMParams, and the log-likelihood at
(β, cov_re, vcomp) with σ² (and optionally β) profiled out.

With ψ = (cov_re, vcomp) relative to σ², T is the Cholesky factor of cov_re on the term's
pattern and θ_vc = √vcomp (lmefast.params). At θ the profiled solution gives β̂, the penalised
residual sum of squares r², log|L|² and Lx (X'V⁻¹X = LxLx', V relative). For another β,

    r²(β) = r² + ‖Lx'(β − β̂)‖²
    ML:   −2ℓ = log|L|² + n (1 + log(2π r²(β)/n))
    REML: −2ℓ = log|L|² + log|Lx|² + (n−p)(1 + log(2π r²(β)/(n−p)))

which at β = β̂ is the objective itself (DESIGN.md §2). The score and Hessian in the packed
parametrisation are central differences of this function (statsmodels' analytic ones are
what it checks against finite differences too).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lmefast.engine import Engine
from lmefast.objective import KernelObjective, Solution
from lmefast.params import MixedLMParams, psd_cholesky

__all__ = ["loglike_at", "params_at", "theta_of", "to_params", "vc_order"]


def vc_order(engine: Engine) -> tuple[str, ...]:
    """The variance components in the order the user gave them (statsmodels' vcomp)."""
    names = tuple(c.vc_name for c in engine.covariance_terms() if c.role == "vc")
    return tuple(engine.vc_order or names)


def _coef_terms(engine: Engine) -> list[int]:
    coef = [j for j, c in enumerate(engine.covariance_terms()) if c.role == "coef"]
    if len(coef) > 1:
        raise NotImplementedError(
            "statsmodels' parametrisation (cov_re, vcomp) is for one grouping factor; this model "
            "has several with random coefficients (use θ: res.theta, fit(start_theta=...))")
    return coef


def theta_of(engine: Engine, cov_re: np.ndarray, vcomp: np.ndarray) -> np.ndarray:
    """θ for ψ = (cov_re, vcomp) relative to σ²: T = the Cholesky factor of cov_re on the
    term's pattern, θ_vc = √vcomp."""
    _coef_terms(engine)
    tm = engine.theta_map
    names = vc_order(engine)
    vcomp = np.asarray(vcomp, dtype=float).ravel()
    if vcomp.shape[0] != len(names):
        raise ValueError(f"vcomp must have {len(names)} entries, got {vcomp.shape[0]}")
    if np.any(vcomp < 0):
        raise ValueError("vcomp must be non-negative")
    parts = []
    for c, pattern in zip(engine.covariance_terms(), tm.patterns, strict=True):
        if c.role == "coef":
            cov = np.atleast_2d(np.asarray(cov_re, dtype=float))
            k = len(c.coef_names)
            if cov.shape != (k, k):
                raise ValueError(f"cov_re must be {k} × {k}, got {cov.shape}")
            T = psd_cholesky(0.5 * (cov + cov.T))
        else:
            T = np.sqrt(np.array([[vcomp[names.index(c.vc_name)]]]))
        parts.append(T[pattern])
    return np.concatenate(parts) if parts else np.zeros(0)


def params_at(engine: Engine, theta: np.ndarray, beta: np.ndarray) -> MixedLMParams:
    """MixedLMParams at θ and β: cov_re = TT', vcomp = θ_vc² (relative to σ²)."""
    coef = _coef_terms(engine)
    terms = engine.covariance_terms()
    Ts = engine.theta_map.Ts(theta)
    cov = Ts[coef[0]] @ Ts[coef[0]].T if coef else np.zeros((0, 0))
    var = {c.vc_name: float(Ts[j][0, 0] ** 2) for j, c in enumerate(terms) if c.role == "vc"}
    vcomp = np.array([var[name] for name in vc_order(engine)])
    return MixedLMParams.from_components(np.asarray(beta, dtype=float), cov, vcomp=vcomp)


def to_params(engine: Engine, params: Any, k_fe: int, use_sqrt: bool) -> MixedLMParams:
    """A MixedLMParams as it is, or statsmodels' packed vector with (k_fe + k_re2 + k_vc
    entries) or without (k_re2 + k_vc) the fixed effects, read as statsmodels reads it."""
    if isinstance(params, MixedLMParams):
        return params
    k_re = sum(len(c.coef_names) for c in engine.covariance_terms() if c.role == "coef")
    k_vc = len(vc_order(engine))
    k_re2 = k_re * (k_re + 1) // 2
    vec = np.asarray(params, dtype=float).ravel()
    if vec.shape[0] == k_fe + k_re2 + k_vc:
        return MixedLMParams.from_packed(vec, k_fe, k_re, use_sqrt, has_fe=True)
    if vec.shape[0] == k_re2 + k_vc:
        return MixedLMParams.from_packed(vec, k_fe, k_re, use_sqrt, has_fe=False)
    raise ValueError(f"a packed parameter vector has {k_fe + k_re2 + k_vc} entries (fixed effects, "
                     f"cov_re's lower triangle, vcomp) or {k_re2 + k_vc} (without the fixed "
                     f"effects), got {vec.shape[0]}")


def loglike_at(obj: KernelObjective, sol: Solution, beta: np.ndarray | None = None) -> float:
    """The log-likelihood (REML or ML, as obj) at the θ of ``sol``, σ² profiled out, at β
    (β̂ when None)."""
    if beta is None:
        return -0.5 * sol.objective
    n, p = obj.cp.n, obj.cp.p
    d = sol.Lx.T @ (np.asarray(beta, dtype=float) - sol.beta)
    r2 = sol.r2 + float(d @ d)
    if obj.reml:
        logdet_x = 2.0 * float(np.sum(np.log(np.diag(sol.Lx))))
        m2 = sol.logdet_L + logdet_x + (n - p) * (1.0 + np.log(2.0 * np.pi * r2 / (n - p)))
    else:
        m2 = sol.logdet_L + n * (1.0 + np.log(2.0 * np.pi * r2 / n))
    return -0.5 * float(m2)
