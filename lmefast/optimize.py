"""The optimiser driver: bounded quasi-Newton on θ with the analytic gradient, and one record
of the run (OptSummary), as MixedModels.jl keeps one."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from lmefast._bfgs import RETURN_MESSAGES
from lmefast.objective import KernelObjective, Solution

GRAD_TOL = 2e-3          # convergence check on max |projected gradient| (lme4 uses 2e-3, scaled)
DECREMENT_TOL = 1e-6     # or: the Newton decrement g'H⁻¹g (objective units) below this
DECREMENT_RTOL = 1e-13   # ... or below this × |objective| (its rounding level at 1e8 rows)
SINGULAR_TOL = 1e-4      # lme4's isSingular tolerance on diagonal θ
UNMOVED_RTOL = 1e-6      # a θ entry within this of a (non-default) start is checked (fit_theta)


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
    newton_decrement: float
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
            "newton_decrement": self.newton_decrement,
            "singular": self.singular,
        }


def projected_gradient(theta: np.ndarray, grad: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The gradient with components that push into an active lower bound set to zero."""
    at_bound = (theta <= lower) & (grad > 0)
    return np.where(at_bound, 0.0, grad)


def hessian_fd(obj: KernelObjective, theta: np.ndarray, grad: np.ndarray,
               free: np.ndarray) -> np.ndarray:
    """Hessian of the objective on the free coordinates by forward differences of the
    analytic gradient (one gradient per free coordinate), symmetrised."""
    idx = np.nonzero(free)[0]
    H = np.empty((idx.size, idx.size))
    for col, j in enumerate(idx):
        h = 1e-6 * max(abs(theta[j]), 1e-2)
        th = theta.copy()
        th[j] += h
        _, g = obj.value_and_grad(th)
        H[:, col] = (g[idx] - grad[idx]) / h
    return 0.5 * (H + H.T)


def newton_check(obj: KernelObjective, sol: Solution, lower: np.ndarray
                 ) -> tuple[Solution, float]:
    """The convergence test and a last Newton step on the free θ.

    Returns the better of the solution and the Newton-polished one, and the Newton decrement
    g'H⁻¹g of the solution (twice the objective decrease a Newton step predicts; inf when
    H is not positive definite)."""
    theta, grad = sol.theta, sol.grad
    free = ~((theta <= lower) & (grad > 0))
    if not free.any():
        return sol, 0.0
    H = hessian_fd(obj, theta, grad, free)
    try:
        c = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return sol, np.inf
    step = np.linalg.solve(c.T, np.linalg.solve(c, grad[free]))
    decrement = float(grad[free] @ step)
    th = theta.copy()
    th[free] -= step
    th = np.maximum(th, lower)
    try:
        polished = obj.solve(th, want_grad=True)
    except FloatingPointError:
        return sol, decrement
    return (polished if polished.objective < sol.objective else sol), decrement


def fit_theta(
    obj: KernelObjective,
    theta0: np.ndarray,
    *,
    maxiter: int = 500,
    verbose: bool = False,
    callback: Callable[[int, np.ndarray, float], None] | None = None,
) -> tuple[Solution, OptSummary]:
    """Minimise the profiled objective over θ (diagonal of T and θ_vc ≥ 0).

    A start that is not finite, or where the objective is not finite, is replaced by the
    default start (with a warning). A fit from another start whose result left some θ entries
    exactly at their start is checked against a fit from the default start, and the better is
    kept (a flat or overflowing region can stop the optimiser without moving them)."""
    lower = obj.theta_map.lower_bounds()
    default = obj.theta_map.start()
    theta0 = usable_start(np.asarray(theta0, dtype=float), lower, default, "")
    sol, summary = _fit_from(obj, theta0, lower, maxiter, verbose, callback)
    if summary.return_code == RETURN_MESSAGES[5] and not np.array_equal(theta0, default):
        theta0 = usable_start(theta0, lower, default, "the objective is not finite there")
        sol, summary = _fit_from(obj, theta0, lower, maxiter, verbose, callback)
    if not np.array_equal(theta0, default):
        moved = np.abs(summary.theta_final - theta0)
        unmoved = np.nonzero((moved <= UNMOVED_RTOL * np.abs(theta0)) & (theta0 > lower))[0]
        if unmoved.size or not summary.converged:
            sol_d, summary_d = _fit_from(obj, default, lower, maxiter, False, None)
            tol = 1e-8 * max(1.0, abs(sol_d.objective))
            if np.isfinite(sol_d.objective) and not sol_d.objective >= sol.objective - tol:
                what = (f"θ entries {unmoved.tolist()} (0-based) never moved from their start"
                        if unmoved.size else f"it did not converge ({summary.return_code})")
                warnings.warn(
                    f"the fit from the given start stopped at a worse point: {what}; the fit from "
                    f"the default start, lower by {sol.objective - sol_d.objective:.6g} in the "
                    "objective (−2 log-likelihood), is kept", stacklevel=3)
                sol = sol_d
                summary = replace(summary_d, theta_initial=theta0, log=summary.log + summary_d.log,
                                  n_evals=summary.n_evals + summary_d.n_evals,
                                  n_iter=summary.n_iter + summary_d.n_iter)
    return sol, summary


def usable_start(theta0: np.ndarray, lower: np.ndarray, default: np.ndarray,
                 reason: str) -> np.ndarray:
    """θ0 within its bounds, or the default start (with a warning naming the reason) when θ0
    is not finite or ``reason`` says why it cannot start the fit."""
    if not reason and theta0.shape == default.shape and not np.all(np.isfinite(theta0)):
        reason = "it has entries that are not finite"
    if not reason:
        return np.maximum(theta0, lower)
    warnings.warn(f"the starting θ cannot start the fit ({reason}): using the default start",
                  stacklevel=4)
    return default.copy()


def _fit_from(obj: KernelObjective, theta0: np.ndarray, lower: np.ndarray, maxiter: int,
              verbose: bool, callback: Callable[[int, np.ndarray, float], None] | None
              ) -> tuple[Solution, OptSummary]:
    """One run of the optimiser from θ0, its checks and its record."""
    log: list[tuple[int, float]] = []
    evals0 = obj.n_evals

    raised: list[BaseException] = []

    def on_iter(it: int, x: np.ndarray, f: float) -> None:
        log.append((len(log) + 1, f))
        if verbose:
            print(f"iter {len(log):4d}  objective {f:.12g}")
        if callback is not None:
            try:
                callback(len(log), x.copy(), f)
            except StopIteration:
                raise
            except BaseException as exc:  # re-raised below, once the C loop has stopped
                raised.append(exc)
                raise StopIteration from exc

    hook = on_iter if (verbose or callback is not None) else None
    theta, _, grad, f0, Hinv, n_iter, code = obj.minimize(theta0, lower, gtol=1e-9,
                                                          maxiter=maxiter, on_iter=hook)
    diag = obj.theta_map.diagonal_mask()
    # A diagonal θ at zero can be a saddle, not a minimum: the objective is even in the last
    # diagonal entry of each T, so its gradient there is exactly zero. Probe away from zero
    # and restart from any better point.
    for _ in range(3):
        if raised or code == 6:
            break
        zero = np.nonzero(diag & (theta <= lower))[0]
        if zero.size == 0:
            break
        f_here = obj(theta)
        best_f, best_x = f_here, None
        for i in zero:
            for delta in (0.05, 0.5):
                x = theta.copy()
                x[i] = delta
                fx = obj(x)
                if fx < best_f - 1e-10 * max(1.0, abs(f_here)):
                    best_f, best_x = fx, x
        if best_x is None:
            break
        theta, _, grad, _, Hinv, more_iter, code = obj.minimize(best_x, lower, gtol=1e-9,
                                                                 maxiter=maxiter, on_iter=hook)
        n_iter += more_iter
    if raised:
        raise raised[0]
    message = RETURN_MESSAGES[code]
    snapped = np.where(diag & (theta < 1e-9), 0.0, theta)
    # the optimiser returns the gradient at θ: the final solve needs only the objective's parts
    sol = replace(obj.solve(theta), grad=np.asarray(grad, dtype=float).copy())
    if not np.array_equal(snapped, theta):
        sol_s = obj.solve(snapped, want_grad=True)
        if sol_s.objective <= sol.objective + 1e-10:
            theta, sol = snapped, sol_s
    # Newton decrement from the quasi-Newton inverse Hessian; only when that does not show
    # convergence, a finite-difference Hessian (one gradient per θ) checks and polishes.
    free = ~((theta <= lower) & (sol.grad > 0))
    decrement = float(sol.grad[free] @ Hinv[np.ix_(free, free)] @ sol.grad[free])
    dec_tol = max(DECREMENT_TOL, DECREMENT_RTOL * abs(sol.objective))
    if not 0.0 <= decrement < dec_tol:
        sol, decrement = newton_check(obj, sol, lower)
    theta = sol.theta
    pg = projected_gradient(theta, sol.grad, lower)
    # converged: the gradient or Newton-decrement test passed, at a finite objective
    converged = bool(np.isfinite(sol.objective) and np.all(np.isfinite(pg))
                     and (np.max(np.abs(pg), initial=0.0) < GRAD_TOL or decrement < dec_tol))
    singular = bool(np.any(theta[diag] < SINGULAR_TOL))
    summary = OptSummary(
        theta_initial=theta0,
        theta_final=theta,
        objective_initial=float(f0),
        objective_final=sol.objective,
        n_evals=obj.n_evals - evals0,
        n_iter=n_iter,
        optimizer="projected BFGS with analytic gradient",
        tolerances={"gtol": 1e-9, "grad_check": GRAD_TOL, "newton_decrement": dec_tol},
        return_code=message,
        converged=converged,
        projected_gradient=pg,
        newton_decrement=decrement,
        singular=singular,
        log=log,
    )
    return sol, summary
