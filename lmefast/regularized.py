"""Penalised fixed effects: statsmodels' ``MixedLM.fit_regularized``.

**L1** (``method='l1'``, statsmodels' default). The model is first fitted without penalty
(REML or ML, ``fit_kwargs``); the marginal covariance V = σ̂²(I + ZΨZ') of that fit is then
held fixed, and the fixed effects minimise

    (y − Xβ)' V⁻¹ (y − Xβ) + Σ_j α_j |β_j|

by cyclic coordinate descent (Friedman, Hastie & Tibshirani 2010, J. Stat. Softw. 33(1)).
The quadratic form needs only G = X'V⁻¹X = Lx Lx'/σ̂² and G β̂ (β̂ the GLS estimate): the
coordinate-wise minimiser is the soft threshold

    β_j = S(c_j, α_j/2) / G_jj,   c_j = (Gβ̂)_j − Σ_{k≠j} G_jk β_k,   S(c, t) = sign(c) max(|c| − t, 0),

so no sweep touches the rows. As statsmodels: the sweeps start at β̂, a coefficient below
``ceps`` in magnitude is left at zero, and they stop when no coefficient moves by ``ptol``
(or after ``maxit`` sweeps). The residual variance is then re-estimated at the penalised β̃
with θ (Ψ/σ²) held: σ̃² = r²(β̃)/(n − p) for REML, /n for ML, with
r²(β) = r² + ‖Lx'(β − β̂)‖² (lmefast.smparams). The results carry θ̂, β̃ and σ̃², so
cov_re = σ̃² TT' (statsmodels keeps σ̂² TT' there, beside its σ̃² scale; the relative
covariance cov_re_unscaled is the same in both). Standard errors are lme4's, conditional on θ̂,
for the non-zero coefficients only: σ̃² [(Lx Lx')_SS]⁻¹ on the set S with |β̃_j| > ceps, NaN
elsewhere (statsmodels inverts its joint Hessian restricted the same way).

**A smooth penalty object** (``method=`` an object with ``func(β)``, e.g. statsmodels'
``penalties.L2()`` or ``PseudoHuber``; its ``alpha`` is set to ``alpha`` on a copy, the
caller's object is not changed). As statsmodels: the fixed effects stay the GLS estimate
β̂(θ) and the covariance parameters maximise the penalised profiled log-likelihood
ℓ(θ) − pen(β̂(θ)), i.e. θ̃ minimises objective(θ) + 2 pen(β̂(θ)), from the unpenalised θ̂.
"""
from __future__ import annotations

import copy
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import optimize

from lmefast.objective import KernelObjective, Solution
from lmefast.optimize import central_gradient
from lmefast.results import MixedLMResults
from lmefast.smparams import loglike_at

if TYPE_CHECKING:
    from lmefast.model import MixedLM

__all__ = ["RegularizedResults", "fit_regularized", "soft_threshold_descent"]

#: a smooth-penalty fit has converged when its projected gradient (on the −2 log-likelihood
#: scale, per unit of θ) is below this, whatever the line search reported
GRADIENT_TOLERANCE = 1e-4


class RegularizedResults(MixedLMResults):
    """Results of ``MixedLM.fit_regularized``: the MixedLMResults API at the penalised
    estimates. ``alpha`` (the weights per fixed effect), ``penalty`` ('l1' or the penalty
    object), ``n_iter`` (coordinate-descent sweeps; 0 for a smooth penalty) and
    ``converged`` describe the penalised fit; ``unpenalized_llf`` is the fit it started from."""

    def __init__(self, model: MixedLM, objective: KernelObjective, solution: Solution, start: MixedLMResults,
                 *, penalty: Any, alpha: np.ndarray, active: np.ndarray, n_iter: int,
                 converged: bool) -> None:
        super().__init__(model, objective, solution, start.optsummary)
        self.penalty = penalty
        self.alpha = alpha
        self.active = active
        self.n_iter = n_iter
        self._penalized_converged = converged
        self.unpenalized_llf = start.llf

    @property
    def converged(self) -> bool:
        return self.optsummary.converged and self._penalized_converged

    @cached_property
    def _cov_fe(self) -> np.ndarray:
        """σ̃² [(Lx Lx')_SS]⁻¹ on the non-zero coefficients S, NaN for the others."""
        p = self.k_fe
        out = np.full((p, p), np.nan)
        S = np.flatnonzero(self.active)
        if S.size:
            G = self._sol.Lx @ self._sol.Lx.T
            out[np.ix_(S, S)] = self.scale * np.linalg.inv(G[np.ix_(S, S)])
        return out

    def __repr__(self) -> str:
        name = self.penalty if isinstance(self.penalty, str) else type(self.penalty).__name__
        return (f"<RegularizedResults {self.method}, penalty {name}: llf={self.llf:.4f}, "
                f"{int(np.sum(self.active))} of {self.k_fe} fixed effects non-zero>")


def soft_threshold_descent(G: np.ndarray, g: np.ndarray, alpha: np.ndarray, start: np.ndarray,
                           ceps: float, ptol: float, maxit: int) -> tuple[np.ndarray, int, bool]:
    """Cyclic coordinate descent for min_β β'Gβ − 2g'β + Σ α_j|β_j| from ``start``; a
    coordinate below ``ceps`` in magnitude stays at zero. Returns (β, sweeps, converged:
    the last sweep moved no coordinate by ``ptol`` or more)."""
    beta = np.array(start, dtype=float)
    for sweep in range(1, maxit + 1):
        before = beta.copy()
        for j in range(beta.shape[0]):
            if abs(beta[j]) < ceps:
                beta[j] = 0.0
                continue
            c = g[j] - G[j] @ beta + G[j, j] * beta[j]
            beta[j] = np.sign(c) * max(abs(c) - 0.5 * alpha[j], 0.0) / G[j, j]
        if np.max(np.abs(beta - before), initial=0.0) < ptol:
            return beta, sweep, True
    return beta, maxit, False


def _l1_solution(obj: KernelObjective, sol: Solution, beta: np.ndarray) -> Solution:
    """The solution at θ̂ with β held at ``beta``: r²(β), σ̃² = r²(β)/dof, the objective
    −2ℓ(θ̂, β) (σ² profiled; prior weights' term kept as in sol.objective)."""
    d = sol.Lx.T @ (beta - sol.beta)
    r2 = sol.r2 + float(d @ d)
    objective = sol.objective - 2.0 * (loglike_at(obj, sol, beta) - loglike_at(obj, sol, sol.beta))
    return Solution(theta=sol.theta.copy(), objective=objective, beta=beta, Lx=sol.Lx, r2=r2,
                    logdet_L=sol.logdet_L, sigma2=r2 / obj.dof)


def _weights(alpha: Any, k_fe: int) -> np.ndarray:
    a = np.asarray(alpha, dtype=float)
    if a.ndim == 0:
        return np.full(k_fe, float(a))
    a = a.ravel()
    if a.shape[0] != k_fe:
        raise ValueError(f"alpha must be a scalar or have one weight per fixed effect ({k_fe}), "
                         f"got {a.shape[0]}")
    return a


def _penalized_theta(obj: KernelObjective, theta0: np.ndarray, lower: np.ndarray,
                     penalty: Any) -> tuple[np.ndarray, bool]:
    """θ̃ = argmin objective(θ) + 2 pen(β̂(θ)) by L-BFGS-B from θ0 (central differences);
    (θ̃, converged)."""
    def f(theta: np.ndarray) -> float:
        sol = obj.solve(np.maximum(theta, lower))
        return sol.objective + 2.0 * float(penalty.func(sol.beta))

    def grad(theta: np.ndarray) -> np.ndarray:
        return central_gradient(f, theta, lower)

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    out = optimize.minimize(f, theta0, jac=grad, method="L-BFGS-B", bounds=bounds,
                            options={"ftol": 1e-13, "gtol": 1e-8, "maxiter": 500})
    theta = np.maximum(out.x, lower) if out.fun <= f(theta0) else np.array(theta0, dtype=float)
    g = grad(theta)
    g[(theta <= lower) & (g > 0)] = 0.0          # projected: a bound may hold the optimum
    return theta, bool(out.success or np.max(np.abs(g), initial=0.0) < GRADIENT_TOLERANCE)


def fit_regularized(model: MixedLM, start_params: Any = None, method: Any = "l1", alpha: Any = 0.0,
                    ceps: float = 1e-4, ptol: float = 1e-6, maxit: int = 200,
                    **fit_kwargs: Any) -> RegularizedResults:
    """statsmodels' ``fit_regularized`` (module docstring): ``method`` 'l1' or a smooth
    penalty object, ``alpha`` a scalar or one weight per fixed effect; ``start_params`` and
    ``fit_kwargs`` go to the unpenalised ``model.fit`` (an unknown keyword raises TypeError
    there)."""
    is_penalty = callable(getattr(method, "func", None))
    if isinstance(method, str):
        if method.lower() != "l1":
            raise ValueError(f"Invalid regularization method {method!r}: 'l1' or a penalty object")
    elif not is_penalty:
        raise TypeError(f"method must be 'l1' or a penalty object with func(params), "
                        f"not {type(method).__name__}")
    if ceps < 0 or ptol <= 0 or int(maxit) < 1:
        raise ValueError("ceps must be >= 0, ptol > 0 and maxit >= 1")
    start = model.fit(start_params=start_params, **fit_kwargs)
    obj, sol = start._objective, start._sol
    k_fe = model.k_fe
    weights = _weights(alpha, k_fe)
    if is_penalty:
        penalty = copy.copy(method)
        penalty.alpha = alpha if np.ndim(alpha) == 0 else weights
        lower = model.engine.theta_map.lower_bounds()
        theta, ok = _penalized_theta(obj, sol.theta, lower, penalty)
        return RegularizedResults(model, obj, obj.solve(theta), start, penalty=penalty, alpha=weights,
                                  active=np.ones(k_fe, dtype=bool), n_iter=0, converged=ok)
    G = sol.Lx @ sol.Lx.T / sol.sigma2
    beta, n_iter, ok = soft_threshold_descent(G, G @ sol.beta, weights, sol.beta, ceps, ptol, int(maxit))
    return RegularizedResults(model, obj, _l1_solution(obj, sol, beta), start, penalty="l1",
                              alpha=weights, active=np.abs(beta) > ceps, n_iter=n_iter, converged=ok)
