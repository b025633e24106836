"""The profiled objective θ → −2 log-likelihood (ML) or REML criterion, and its gradient.

DESIGN.md §2: with L_i L_i' = Λ_i'A_iΛ_i + I per group,
    Rx Rx' = X'X − Σ Rzx_i'Rzx_i,   Rx Rx' β̂ = X'y − Σ Rzx_i'rzy_i,
    r² = y'y − Σ rzy_i'rzy_i − β̂'(X'y − Σ Rzx_i'rzy_i),
    ML:   log|L|² + n (1 + log(2π r²/n))
    REML: log|L|² + log|Rx|² + (n−p)(1 + log(2π r²/(n−p))).
One call of the C kernel (OneFactorKernel) computes all of it, and the gradient, from the
cross-products: no evaluation touches the rows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmefast.errors import ObjectiveError

__all__ = ["KernelObjective", "ObjectiveError", "Solution", "relative_factor", "relative_factors",
           "relative_scalars"]

MOMENT_FLOOR = 1e-2      # eigenvalues of the moment estimate of Ψ/σ² floored at this × largest


@dataclass(frozen=True)
class Solution:
    """Everything the objective produces at one θ."""

    theta: np.ndarray
    objective: float
    beta: np.ndarray
    Lx: np.ndarray          # lower Cholesky factor of X'V⁻¹X (relative scale): Lx Lx'
    r2: float               # penalised residual sum of squares
    logdet_L: float         # log|L|²
    sigma2: float
    grad: np.ndarray | None = None


class KernelObjective:
    """θ in, objective (and gradient) out, from the cross-products only: the part shared by
    the C kernels (one grouping factor, several). A subclass sets `cp`, `theta_map`, `reml`,
    `dof` and `kernel` (with evaluate, minimize, n_evals) and says what a failing block is."""

    cp: Any
    theta_map: Any
    reml: bool
    dof: int
    kernel: Any
    block_name = "group"
    #: trial points of a line search may be evaluated without the gradient (the kernel keeps
    #: its factorisation, so an accepted point's gradient is cheap afterwards)
    lazy_gradient = False

    #: from this many blocks (n_blocks) the optimiser starts at the moment estimates
    #: (moment_theta) instead of lme4's start: where the evaluations it saves cost more than
    #: computing them (engine-specific; the Python-driven BFGS with a finite-difference
    #: Hessian only from lmefast.optimize.MOMENT_MIN_BLOCKS)
    moment_start_blocks: int = 2_000

    @property
    def n_blocks(self) -> int:
        """How many blocks an evaluation factorises (its cost grows with it)."""
        return 1

    def moment_theta(self) -> np.ndarray | None:
        """A start for θ from moment estimates of the random effects' covariance relative to
        σ² (from the cross-products alone), or None where the engine has none."""
        return None

    #: the moment start of this objective's response when its caller has computed it (for many
    #: responses at once, ``Engine.moment_thetas``), finite and already rounded as
    #: ``optimize.significant`` rounds: used in place of ``moment_theta()``
    given_moment_theta: np.ndarray | None = None

    @property
    def starts_at_moments(self) -> bool:
        """Whether the optimiser starts at the moment estimates rather than at lme4's start
        (from ``moment_start_blocks`` blocks). Not where a caller has given them: a fit of
        one response in fit_many takes the path of lmer on it (from another start the C
        optimiser stops ~1e-6 away in θ)."""
        return self.n_blocks >= self.moment_start_blocks

    def respond(self, cp: Any, moment_theta: np.ndarray | None = None) -> KernelObjective:
        """This objective on cross-products that differ in the response parts only (Z'y, X'y,
        y'y): a new objective (``with_crossprods``), or this one changed in place where the
        kernel can swap them without new buffers (one response after another on one thread,
        as fit_many does). ``moment_theta``: that response's moment start, when known (finite,
        rounded by ``optimize.significant``), else None."""
        obj = self._respond(cp)
        obj.given_moment_theta = moment_theta
        return obj

    def _respond(self, cp: Any) -> KernelObjective:
        return self.with_crossprods(cp)

    def sample(self, n_blocks: int) -> tuple[KernelObjective, float] | None:
        """The objective on a sample of about ``n_blocks`` of its blocks, and the fraction f
        kept (its curvature is about f times this one's): for the optimiser's first Hessian,
        at a fraction of an evaluation's cost. None where the engine has no such sample."""
        return None

    @property
    def n_evals(self) -> int:
        return int(self.kernel.n_evals)

    def solve(self, theta: np.ndarray, want_grad: bool = False) -> Solution:
        """The profiled solution at θ (β̂, σ̂², Lx, objective; gradient if asked)."""
        theta = np.array(theta, dtype=float)
        return self._solution(theta, *self.kernel.evaluate(theta, want_grad))

    def _solution(self, theta: np.ndarray, obj: float, r2: float, logdet: float, status: int,
                  beta: np.ndarray, Lx: np.ndarray, grad: np.ndarray | None) -> Solution:
        """The Solution from what the kernel gives at θ, or the ObjectiveError its status names."""
        p = self.cp.p
        if status > 0:
            raise ObjectiveError(f"block of {self.block_name} {status - 1} is not positive definite")
        if status == -(p + 1):
            raise ObjectiveError("penalised residual sum of squares is not positive")
        if status < 0:
            raise ObjectiveError(f"fixed-effects column {-status - 1} is linearly dependent")
        obj -= self.cp.log_weights      # prior weights: lme4's −Σ log wᵢ (0 without weights)
        return Solution(theta=theta, objective=obj, beta=beta, Lx=Lx, r2=r2, logdet_L=logdet,
                        sigma2=r2 / self.dof, grad=grad)

    def __call__(self, theta: np.ndarray) -> float:
        try:
            return self.solve(theta).objective
        except ObjectiveError:
            return np.inf

    def gradient(self, sol: Solution) -> np.ndarray:
        """∂objective/∂θ at a solution (envelope theorem: β̂ and σ̂² held at their optimum)."""
        if sol.grad is not None:
            return sol.grad
        return self.solve(sol.theta, want_grad=True).grad

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            sol = self.solve(theta, want_grad=True)
            return sol.objective, sol.grad
        except ObjectiveError:
            return np.inf, np.zeros(self.theta_map.n_theta)

    def minimize(self, theta0: np.ndarray, lower: np.ndarray, *, gtol: float, maxiter: int,
                 on_iter: Callable | None
                 ) -> tuple[np.ndarray, float, np.ndarray, float, np.ndarray, int, int,
                            Solution | None]:
        """Projected BFGS (lmefast._bfgs) with the objective in C: (θ, f, g, f at θ0,
        inverse-Hessian approximation, iterations, return code, the Solution at θ with the
        gradient g, or None where θ is not a point of the objective)."""
        theta, f, g, f0, H, n_iter, code, at = self.kernel.minimize(theta0, lower, gtol, maxiter,
                                                                    on_iter, True)
        g = np.asarray(g, dtype=float).copy()
        try:
            sol = self._solution(np.array(theta, dtype=float), *at, g)
        except ObjectiveError:
            sol = None
        return theta, f - self.cp.log_weights, g, f0 - self.cp.log_weights, H, n_iter, code, sol


def relative_factor(psi: np.ndarray, sigma2: float) -> np.ndarray | None:
    """Ψ/σ² with its eigenvalues floored at MOMENT_FLOOR × the largest (a start strictly
    inside the bounds), or None when σ² or every eigenvalue is not positive."""
    rel = relative_factors(np.asarray(psi, dtype=float)[None], np.array([sigma2], dtype=float))[0]
    return None if np.isnan(rel).any() else rel


def relative_factors(psi: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """``relative_factor`` of many (Ψ, σ²) at once: psi (R × q × q), sigma2 (R) → R × q × q,
    NaN where relative_factor gives None."""
    R = psi.shape[0]
    out = np.full(psi.shape, np.nan)
    ok = (sigma2 > 0) & np.all(np.isfinite(psi.reshape(R, -1)), axis=1)
    if not ok.any():
        return out
    w, V = np.linalg.eigh(0.5 * (psi[ok] + np.swapaxes(psi[ok], 1, 2)) / sigma2[ok, None, None])
    top = w[:, -1:]
    pos = top[:, 0] > 0
    rel = np.einsum("rij,rj,rkj->rik", V, np.maximum(w, MOMENT_FLOOR * top), V)
    rel[~pos] = np.nan
    out[ok] = rel
    return out


def relative_scalars(psi: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """``relative_factor`` of diagonal Ψ for many responses at once, as θ: psi (J × m) and
    sigma2 (m) → √ of the diagonal of the floored Ψ/σ² (m × J), a row of NaN where
    relative_factor gives None."""
    J, m = psi.shape
    D = np.zeros((m, J, J))
    D[:, np.arange(J), np.arange(J)] = psi.T
    return np.sqrt(np.einsum("rii->ri", relative_factors(D, sigma2)))
