"""The optimiser driver: bounded quasi-Newton on θ with the analytic gradient, and one record
of the run (OptSummary), as MixedModels.jl keeps one."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmefast._bfgs import RETURN_MESSAGES
from lmefast.objective import ProfiledObjective, Solution

GRAD_TOL = 2e-3          # convergence check on max |projected gradient| (lme4 uses 2e-3, scaled)
SINGULAR_TOL = 1e-4      # lme4's isSingular tolerance on diagonal θ


@dataclass(frozen=True)
class OptSummary:
    """Record of one optimisation: start, end, evaluations, messages."""

    theta_initial: np.ndarray
    theta_final: np.ndarray
    objective_initial: float
    objective_final: float
    n_evals: int
    n_iter: int
    optimizer: str
    tolerances: dict
    return_code: str
    converged: bool
    projected_gradient: np.ndarray
    singular: bool
    log: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "theta_initial": self.theta_initial.tolist(),
            "theta_final": self.theta_final.tolist(),
            "objective_initial": self.objective_initial,
            "objective_final": self.objective_final,
            "n_evals": self.n_evals,
            "n_iter": self.n_iter,
            "optimizer": self.optimizer,
            "tolerances": dict(self.tolerances),
            "return_code": self.return_code,
            "converged": self.converged,
            "projected_gradient": self.projected_gradient.tolist(),
            "singular": self.singular,
        }


def projected_gradient(theta: np.ndarray, grad: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The gradient with components that push into an active lower bound set to zero."""
    at_bound = (theta <= lower) & (grad > 0)
    return np.where(at_bound, 0.0, grad)


def fit_theta(
    obj: ProfiledObjective,
    theta0: np.ndarray,
    *,
    maxiter: int = 500,
    verbose: bool = False,
    callback: Callable[[int, np.ndarray, float], None] | None = None,
) -> tuple[Solution, OptSummary]:
    """Minimise the profiled objective over θ (diagonal of T and θ_vc ≥ 0)."""
    lower = obj.theta_map.lower_bounds()
    theta0 = np.maximum(np.asarray(theta0, dtype=float), lower)
    log: list[tuple[int, float]] = []
    evals0 = obj.n_evals
    f0 = obj(theta0)

    def on_iter(it: int, x: np.ndarray, f: float) -> None:
        log.append((it, f))
        if verbose:
            print(f"iter {it:4d}  objective {f:.12g}")
        if callback is not None:
            callback(it, x.copy(), f)

    hook = on_iter if (verbose or callback is not None) else None
    theta, _, _, n_iter, code = obj.minimize(theta0, lower, gtol=1e-9, maxiter=maxiter,
                                             on_iter=hook)
    message = RETURN_MESSAGES[code]
    diag = obj.theta_map.diagonal_mask()
    snapped = np.where(diag & (theta < 1e-9), 0.0, theta)
    sol = obj.solve(theta, want_grad=True)
    if not np.array_equal(snapped, theta):
        sol_s = obj.solve(snapped, want_grad=True)
        if sol_s.objective <= sol.objective + 1e-10:
            theta, sol = snapped, sol_s
    grad = sol.grad
    pg = projected_gradient(theta, grad, lower)
    converged = bool(np.all(np.isfinite(pg)) and np.max(np.abs(pg), initial=0.0) < GRAD_TOL)
    singular = bool(np.any(theta[diag] < SINGULAR_TOL))
    summary = OptSummary(
        theta_initial=theta0,
        theta_final=theta,
        objective_initial=float(f0),
        objective_final=sol.objective,
        n_evals=obj.n_evals - evals0,
        n_iter=n_iter,
        optimizer="projected BFGS with analytic gradient",
        tolerances={"gtol": 1e-9, "grad_check": GRAD_TOL},
        return_code=message,
        converged=converged,
        projected_gradient=pg,
        singular=singular,
        log=log,
    )
    return sol, summary
