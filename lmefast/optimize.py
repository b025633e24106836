"""The optimiser driver: bounded quasi-Newton on θ with the analytic gradient, and one record
of the run (OptSummary), as MixedModels.jl keeps one.

From the default start, θ first comes from moment estimates (the cross-products give them
without a pass over the rows, see `moment_start`); there, a finite-difference Hessian of the
analytic gradient (one gradient per θ) gives BFGS its initial inverse Hessian, so that the
first steps are Newton steps. From a start of the caller's, BFGS starts from the identity.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from lmefast._bfgs import RETURN_MESSAGES, minimize_bounded
from lmefast.objective import KernelObjective, ObjectiveError, Solution

GRAD_TOL = 2e-3          # convergence check on max |projected gradient| (lme4 uses 2e-3, scaled)
DECREMENT_TOL = 1e-6     # or: the Newton decrement g'H⁻¹g (objective units) below this
DECREMENT_RTOL = 1e-13   # ... or below this × |objective| (its rounding level at 1e8 rows)
SINGULAR_TOL = 1e-4      # lme4's isSingular tolerance on diagonal θ
UNMOVED_RTOL = 1e-6      # a θ entry within this of a (non-default) start is checked (fit_theta)
MAX_THETA_FD_START = 6   # finite-difference Hessian at the moment start up to this many θ
MOMENT_MIN_BLOCKS = 2_000  # the moment start (driven from Python) only for objectives of at least
                           # this many blocks: below, an evaluation costs less than the Python
                           # around it, and the optimiser runs in C from lme4's start
INTERIOR_DIAGONAL = 0.5        # interior_start: zero diagonal entries of T restart here
HESSIAN_SAMPLE_BLOCKS = 5_000  # blocks in the sample whose Hessian starts BFGS (start_hessian)
VALUE_HESSIAN_MAX_THETA = 4    # ... from values, not gradients, up to this many free θ where the
                               # gradient costs several evaluations (start_hessian)
POLISH_STEPS = 3         # at most this many quasi-Newton steps past the BFGS test (`polish`)
POLISH_RTOL = 1e-18      # ... while the predicted decrease is above this × |objective|
POLISH_WORSE = 1e-10     # a step worse than this × |objective| is never taken


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


def central_gradient(f: Callable[[np.ndarray], float], x: np.ndarray,
                     lower: np.ndarray | None = None) -> np.ndarray:
    """∇f(x) by central differences (step 1e-6 × max(|x_i|, 0.01)), the lower point held at
    its bound where ``lower`` has one (the difference is then over the shorter interval)."""
    g = np.empty_like(x, dtype=float)
    for i in range(x.shape[0]):
        h = 1e-6 * max(abs(x[i]), 1e-2)
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        if lower is not None and np.isfinite(lower[i]):
            dn[i] = max(dn[i], lower[i])
        g[i] = (f(up) - f(dn)) / (up[i] - dn[i])
    return g


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


def hessian_from_values(obj: KernelObjective, theta: np.ndarray, grad: np.ndarray,
                        free: np.ndarray, f0: float | None = None) -> np.ndarray:
    """Hessian of the objective on the free coordinates by forward differences of its values
    (step 1e-3 × max(|θ_j|, 0.01); the gradient, and the value f0 when known, at θ given):
    d(d + 1)/2 evaluations without the gradient, H_jj = 2(f(θ + h_j e_j) − f(θ) − h_j g_j)/h_j²
    and H_jk = (f(θ + h_j e_j + h_k e_k) − f(θ + h_j e_j) − f(θ + h_k e_k) + f(θ))/(h_j h_k).
    Accurate to O(h): for a start of BFGS, on objectives whose gradient costs several
    evaluations (the several-factor kernel's)."""
    idx = np.nonzero(free)[0]
    h = 1e-3 * np.maximum(np.abs(theta[idx]), 1e-2)
    if f0 is None:
        f0 = obj.solve(theta).objective
    fi = np.empty(idx.size)
    for a, j in enumerate(idx):
        th = theta.copy()
        th[j] += h[a]
        fi[a] = obj.solve(th).objective
    H = np.empty((idx.size, idx.size))
    for a, j in enumerate(idx):
        H[a, a] = 2.0 * (fi[a] - f0 - h[a] * grad[j]) / h[a] ** 2
        for b in range(a):
            th = theta.copy()
            th[j] += h[a]
            th[idx[b]] += h[b]
            H[a, b] = H[b, a] = (obj.solve(th).objective - fi[a] - fi[b] + f0) / (h[a] * h[b])
    return H


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


def moment_start(obj: KernelObjective) -> np.ndarray | None:
    """θ from moment estimates of the covariance of the random effects relative to σ² (the
    Cholesky factor of Ψ/σ², or √(ψ/σ²) for diagonal T), or None where they are not
    available (variance components, several factors with random slopes) or not positive."""
    if obj.given_moment_theta is not None:      # rounded by its giver (KernelObjective.respond)
        return obj.given_moment_theta
    start = obj.moment_theta()
    if start is None:
        return None
    return significant(start)


def significant(a: np.ndarray, digits: int = 4) -> np.ndarray:
    """a rounded to a few significant digits. The moment start and the finite-difference
    Hessian there are rounded, so that cross-products that differ in their last bits (sums
    over chunks in another order) give the same start, the same path and the same optimum
    to the last digits, as from the fixed default start."""
    a = np.asarray(a, dtype=float)
    out = np.zeros_like(a)
    nz = a != 0
    x = a[nz]
    scale = 10.0 ** (np.floor(np.log10(np.abs(x))) - (digits - 1))
    out[nz] = np.round(x / scale) * scale
    return out


def start_hessian(obj: KernelObjective, theta: np.ndarray, grad: np.ndarray,
                  free: np.ndarray, f: float | None = None) -> np.ndarray:
    """The Hessian that starts BFGS (f: the objective at θ, when known). Where a gradient
    costs several evaluations (``lazy_gradient`` objectives: several factors) and θ has at most
    VALUE_HESSIAN_MAX_THETA free entries, by differences of values (``hessian_from_values``:
    InstEval's two θ take three evaluations, 36 ms, against two gradients, 70 ms). Else by
    differences of gradients on a sample of HESSIAN_SAMPLE_BLOCKS blocks, divided by the
    fraction sampled, where the engine has such a sample and the objective has at least five
    times as many blocks (each gradient of the sample costs a small part of a full one; the
    curvature of a sum over groups is about proportional to the groups in it); else on the
    full objective."""
    if obj.lazy_gradient and free.sum() <= VALUE_HESSIAN_MAX_THETA:
        try:
            H = hessian_from_values(obj, theta, grad, free, f)
            if np.all(np.isfinite(H)):
                return H
        except (ObjectiveError, FloatingPointError):
            pass
    sampled = obj.sample(HESSIAN_SAMPLE_BLOCKS) if obj.n_blocks >= 5 * HESSIAN_SAMPLE_BLOCKS else None
    if sampled is not None:
        sub, f = sampled
        try:
            g = sub.solve(theta, want_grad=True).grad
            H = hessian_fd(sub, theta, g, free) / f
            if np.all(np.isfinite(H)):
                return H
        except (ObjectiveError, FloatingPointError):
            pass
    return hessian_fd(obj, theta, grad, free)


def bfgs_from_moments(obj: KernelObjective, start: np.ndarray, lower: np.ndarray,
                      maxiter: int, on_iter: Callable | None
                      ) -> tuple[np.ndarray, float, np.ndarray, float, np.ndarray, int, int,
                                 Solution]:
    """BFGS from a moment start with a finite-difference Hessian there as its initial inverse
    Hessian, driven from Python (each evaluation is one call of obj.solve, whose Solutions are
    kept: the one at the result is returned, and needs no evaluation of its own). Trial points
    are evaluated without the gradient when the objective keeps its factorisation (several
    factors), as obj.minimize does. Same return as obj.minimize, plus the Solution."""
    lazy = obj.lazy_gradient
    kept: dict[bytes, Solution] = {}

    def fg(x: np.ndarray, want_grad: bool) -> tuple[float, np.ndarray | None]:
        key = x.tobytes()
        sol = kept.get(key)
        if sol is None or (want_grad and sol.grad is None):
            try:
                sol = obj.solve(x, want_grad)
            except ObjectiveError:
                return np.inf, np.zeros_like(x)
            kept[key] = sol
        return sol.objective, sol.grad

    fg(start, True)
    free = np.ones(start.shape[0], dtype=bool)
    H0 = None
    if np.isfinite(kept[start.tobytes()].objective):
        at = kept[start.tobytes()]
        H = significant(start_hessian(obj, start, at.grad, free, at.objective))
        try:
            np.linalg.cholesky(H)
            H0 = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            H0 = None
    theta, f, grad, f0, Hinv, n_iter, code = minimize_bounded(
        fg, start, lower, 1e-9, maxiter, on_iter, H0, lazy)
    sol = kept.get(np.asarray(theta).tobytes())
    if sol is None or sol.grad is None:
        sol = obj.solve(theta, want_grad=True)
    return theta, f, grad, f0, Hinv, n_iter, code, sol


def polish(obj: KernelObjective, theta: np.ndarray, f: float, grad: np.ndarray,
           Hinv: np.ndarray, lower: np.ndarray, have_solution: bool = False
           ) -> tuple[Solution | None, np.ndarray]:
    """Quasi-Newton steps −H g (free θ, projected on the bounds) past the BFGS stopping test,
    with the Solution (and gradient) at the last one kept, or None when the first is not
    kept; and the inverse Hessian, BFGS-updated.

    BFGS stops at a predicted decrease g'Hg of 1e-12 |f|, where θ can still be ~1e-6 from
    the optimum. The steps go on while g'Hg > POLISH_RTOL |f| (at most POLISH_STEPS), so
    that fits of one model along different paths (another spelling, another engine,
    another start) agree to many more digits. The first step costs the evaluation that the
    solution at θ would cost otherwise. A step is kept when it lowers g'Hg: at the rounding
    level of the objective a comparison of objectives would keep it or not by chance.
    ``have_solution``: the caller holds the Solution at θ, so that even the first step is
    taken only while the predicted decrease is above the threshold."""
    best: Solution | None = None
    H = Hinv.copy()
    for _ in range(POLISH_STEPS):
        free = ~((theta <= lower) & (grad > 0))
        step = np.zeros_like(theta)
        step[free] = -H[np.ix_(free, free)] @ grad[free]
        if (best is not None or have_solution) and -(grad @ step) < POLISH_RTOL * max(1.0, abs(f)):
            break
        new_theta = np.maximum(theta + step, lower)
        if np.array_equal(new_theta, theta) or not np.all(np.isfinite(new_theta)):
            break
        try:
            sol = obj.solve(new_theta, want_grad=True)
        except ObjectiveError:
            break
        # kept when it lowers the decrement g'Hg (near the optimum a comparison of gradients
        # is far less noisy than one of objectives), unless the objective is clearly worse
        new_free = ~((new_theta <= lower) & (sol.grad > 0))
        g_old, g_new = np.where(free, grad, 0.0), np.where(new_free, sol.grad, 0.0)
        if not (g_new @ H @ g_new < g_old @ H @ g_old
                and sol.objective <= f + POLISH_WORSE * max(1.0, abs(f))):
            break
        s, y = new_theta - theta, sol.grad - grad
        sy = float(s @ y)
        if sy > 1e-12 * np.linalg.norm(s) * np.linalg.norm(y):
            Hy = H @ y
            H += (sy + y @ Hy) / sy**2 * np.outer(s, s) - (np.outer(Hy, s) + np.outer(s, Hy)) / sy
        theta, f, grad, best = new_theta, sol.objective, sol.grad, sol
    return best, H


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
        stopped = summary.return_code in (RETURN_MESSAGES[3], RETURN_MESSAGES[6])  # as asked
        if not stopped and (unmoved.size or not summary.converged):
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
    stopped = summary.return_code in (RETURN_MESSAGES[3], RETURN_MESSAGES[6])
    if summary.singular and not stopped:
        # A boundary fit can be a local optimum of the boundary (a covariance of lower rank,
        # e.g. T = [[0, 0], [t, 0]]) rather than the optimum: a second fit from an interior
        # start, the better of the two kept (a true boundary optimum is found again).
        began_at_moments = obj.starts_at_moments and np.array_equal(summary.theta_initial, default)
        second = interior_start(obj, summary.theta_final, lower, not began_at_moments)
        if second is not None:
            sol_2, summary_2 = _fit_from(obj, second, lower, maxiter, False, None)
            tol = 1e-8 * max(1.0, abs(sol.objective))
            n_evals = summary.n_evals + summary_2.n_evals
            if np.isfinite(sol_2.objective) and sol_2.objective < sol.objective - tol:
                sol = sol_2
                summary = replace(summary_2, theta_initial=summary.theta_initial,
                                  log=summary.log + summary_2.log,
                                  n_iter=summary.n_iter + summary_2.n_iter)
            summary = replace(summary, n_evals=n_evals)
    return sol, summary


def interior_start(obj: KernelObjective, theta: np.ndarray, lower: np.ndarray,
                   moments: bool = True) -> np.ndarray | None:
    """A second start for a fit that ended on the boundary: the moment start where the
    objective has one (and ``moments``: the fit did not begin there), else θ with its zero
    diagonal entries at INTERIOR_DIAGONAL and off-diagonal entries at zero."""
    start = moment_start(obj) if moments else None
    if start is not None and np.all(np.isfinite(start)) and np.all(start >= lower):
        return np.maximum(start, lower)
    diag = obj.theta_map.diagonal_mask()
    x = np.where(diag, np.maximum(theta, INTERIOR_DIAGONAL), 0.0)
    return None if np.array_equal(x, theta) else x


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
    large = obj.n_blocks >= MOMENT_MIN_BLOCKS
    start = (moment_start(obj) if obj.starts_at_moments and np.array_equal(theta0, obj.theta_map.start())
             else None)
    kept: Solution | None = None
    if large and start is not None and start.shape[0] <= MAX_THETA_FD_START:
        theta, f, grad, f0, Hinv, n_iter, code, kept = bfgs_from_moments(obj, start, lower,
                                                                         maxiter, hook)
    else:
        theta, f, grad, f0, Hinv, n_iter, code, kept = obj.minimize(
            theta0 if start is None else start, lower, gtol=1e-9, maxiter=maxiter, on_iter=hook)
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
        theta, f, grad, _, Hinv, more_iter, code, kept = obj.minimize(best_x, lower, gtol=1e-9,
                                                                       maxiter=maxiter, on_iter=hook)
        n_iter += more_iter
    if raised:
        raise raised[0]
    message = RETURN_MESSAGES[code]
    polished = None
    if large and code in (0, 1, 2):   # small objectives: the C optimiser's answer, as it was
        polished, Hinv = polish(obj, theta, f, grad, Hinv, lower, kept is not None)
    if polished is not None:
        theta, sol = polished.theta, polished
    elif kept is not None:      # the optimiser's Solution at θ
        sol = kept
    else:   # the optimiser returns the gradient at θ: the solve needs the objective's parts only
        sol = replace(obj.solve(theta), grad=np.asarray(grad, dtype=float).copy())
    tiny = diag & (theta < 1e-9) & (theta != 0.0)
    if tiny.any():
        snapped = np.where(tiny, 0.0, theta)
        sol_s = obj.solve(snapped, want_grad=True)
        if sol_s.objective <= sol.objective + 1e-10:
            theta, sol = snapped, sol_s
    # Newton decrement from the quasi-Newton inverse Hessian; only when that does not show
    # convergence, a finite-difference Hessian (one gradient per θ) checks and polishes.
    free = ~((theta <= lower) & (sol.grad > 0))
    g_free = np.where(free, sol.grad, 0.0)      # g'H⁻¹g over the free θ (rows/columns of
    decrement = float(g_free @ Hinv @ g_free)   # fixed ones meet zeros)
    dec_tol = max(DECREMENT_TOL, DECREMENT_RTOL * abs(sol.objective))
    if not 0.0 <= decrement < dec_tol:
        sol, decrement = newton_check(obj, sol, lower)
    theta = sol.theta
    pg = projected_gradient(theta, sol.grad, lower)
    # converged: the gradient or Newton-decrement test passed, at a finite objective; a run
    # stopped by the iteration limit or the callback is not, wherever it stopped
    pg_max = float(np.abs(pg).max(initial=0.0))       # NaN when an entry is NaN
    converged = bool(code not in (3, 6) and math.isfinite(sol.objective) and math.isfinite(pg_max)
                     and (pg_max < GRAD_TOL or decrement < dec_tol))
    singular = bool(theta[diag].min(initial=np.inf) < SINGULAR_TOL)
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
