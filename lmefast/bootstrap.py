"""Parametric bootstrap and simulation from a fitted model, through the y-parts of the
cross-products.

A simulated response y* = Xβ̂ + Zb* + ε*, b* ~ N(0, σ̂²ΛΛ'), ε* ~ N(0, σ̂²I), enters the
profiled objective only through c_i* = Z_i'y*, X'y* and y*'y*. Per group, with
M_i = [Z_i X_i] and G_i = M_i'M_i = [[A_i, B_i], [B_i', X_i'X_i]] (rank r_i):

    M_i'ε_i = σ F_i z_i,          F_i F_i' = G_i,  z_i ~ N(0, I_{r_i})
    ε_i'ε_i = σ² (z_i'z_i + χ²)   (the part of ε_i outside the columns of M_i, independent)

so (c*, X'y*, y*'y*) are drawn exactly in distribution from the per-group blocks and one
χ²_{n − Σ r_i} per replicate: a replicate costs O(groups) to draw and one optimisation, with
no pass over the rows. The G_i factors (an eigendecomposition per group, X_i'X_i from one pass)
are computed once per fit.

Several grouping factors (lmefast.multi.MultiLM, crossed or nested): the joint distribution of
(Z'ε, X'ε, ε'ε) would need a factor of the whole (q + p) × (q + p) matrix [Z X]'[Z X], which
couples the factors. Instead each replicate draws its response y* = Xβ̂ + Σ_j Z_j b_j* + ε*
and makes one cheap pass over the rows for its y-parts only — the first factor's Z_1'y*
(bincount per level), the trailing block's Z'y*, X'y*, y*'y*: O(n (Σk_j + p)) per replicate —
while Z'Z, Z'X and X'X (and the kernel's layout) are reused. Replicate r uses the generator
seeded with the r-th of n integers drawn from `seed` (MultiSimulator.seeds), so results do
not depend on n_jobs and a replicate's response can be rebuilt (MultiSimulator.response).

Prior weights w and an offset o: the engines' rows are the working rows √w (y − o), √w X,
√w Z, on which the weighted model is an unweighted one (errors N(0, σ²I)). Drawing and
refitting there is lme4's simulation on the data's scale, y* = o + Xβ̂ + Zb* + ε*,
ε*ᵢ ~ N(0, σ̂²/wᵢ), with nothing else to change; ``simulate`` returns the data's scale.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lmefast.errors import BootstrapError, ObjectiveError
from lmefast.optimize import fit_theta

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


@contextmanager
def _single_threaded_blas():
    """OpenBLAS limited to one thread while replicates are refitted in parallel (what
    threadpoolctl does; best effort, Linux only, restored afterwards). The blocked kernel
    factors the trailing block with LAPACK: multithreaded OpenBLAS called from several refit
    threads at once oversubscribes the cores (about 30× slower on 2 cores with q2 = 500)."""
    saved = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln})
        for path in paths:
            lib = ctypes.CDLL(path)
            for get, put in (("openblas_get_num_threads", "openblas_set_num_threads"),
                             ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                             ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                             ("openblas_get_num_threads64_", "openblas_set_num_threads64_")):
                if hasattr(lib, get) and hasattr(lib, put):
                    saved.append((getattr(lib, put), int(getattr(lib, get)())))
                    getattr(lib, put)(1)
                    break
    except OSError:
        pass
    try:
        yield
    finally:
        for put, n in saved:
            put(n)


def _store_refit(obj, theta0: np.ndarray, r: int, out_theta: np.ndarray, out_beta: np.ndarray,
                 out_s2: np.ndarray, out_f: np.ndarray, out_conv: np.ndarray) -> None:
    """Refit one replicate from θ0 and store it in row r (NaN and not converged on failure)."""
    try:
        sol, opt = fit_theta(obj, theta0)
    except (ObjectiveError, FloatingPointError):
        out_conv[r] = False
        for out in (out_theta, out_beta, out_s2, out_f):
            out[r] = np.nan
        return
    out_theta[r] = sol.theta
    out_beta[r] = sol.beta
    out_s2[r] = sol.sigma2
    out_f[r] = sol.objective
    out_conv[r] = opt.converged


@dataclass
class BootstrapResult:
    """Replicates of a parametric bootstrap (one row per replicate) and their intervals."""

    replicates: pd.DataFrame     # lme4-named parameters (sd_..., cor_..., sigma, fixed effects)
    theta: np.ndarray            # replicates × θ
    objective: np.ndarray
    converged: np.ndarray
    estimate: pd.Series          # the fit's values of the same parameters
    seconds: float

    def conf_int(self, level: float = 0.95, kind: str = "percentile") -> pd.DataFrame:
        """Percentile intervals (lme4's confint(method='boot', boot.type='perc')) or the
        shortest intervals holding `level` of the replicates."""
        if not 0 < level < 1:
            raise BootstrapError(f"level must be in (0, 1), got {level}")
        X = self.replicates.to_numpy()
        lo, hi = [], []
        a = (1 - level) / 2
        for j in range(X.shape[1]):
            x = np.sort(X[:, j][np.isfinite(X[:, j])])
            if x.size == 0:
                lo.append(np.nan)
                hi.append(np.nan)
            elif kind == "percentile":
                lo.append(float(np.quantile(x, a)))
                hi.append(float(np.quantile(x, 1 - a)))
            elif kind == "shortest":
                h = max(1, int(np.ceil(level * x.size)))
                widths = x[h - 1:] - x[:x.size - h + 1]
                i = int(np.argmin(widths))
                lo.append(float(x[i]))
                hi.append(float(x[i + h - 1]))
            else:
                raise BootstrapError(f"kind must be 'percentile' or 'shortest', not {kind!r}")
        pct = [f"{100 * a:.1f} %", f"{100 * (1 - a):.1f} %"]
        return pd.DataFrame({pct[0]: lo, pct[1]: hi}, index=self.replicates.columns)


def _refit(res: MixedLMResults, sim, draws, rows: range, theta0: np.ndarray,
           out_theta: np.ndarray, out_beta: np.ndarray, out_s2: np.ndarray, out_f: np.ndarray,
           out_conv: np.ndarray) -> None:
    """Refit replicates `rows` of a draw, each on its own cross-products (which differ from the
    fit's in the response parts only: one objective per thread takes each replicate's in
    place, KernelObjective.respond)."""
    obj = res.engine.objective(res.reml, n_threads=1)
    for r in rows:
        obj = obj.respond(sim.crossprods(draws, r))
        _store_refit(obj, theta0, r, out_theta, out_beta, out_s2, out_f, out_conv)


def sdcor_names_values(res: MixedLMResults, theta: np.ndarray, sigma: float
                       ) -> tuple[list[str], np.ndarray]:
    """lme4's confint names and values of the variance parameters: per term the standard
    deviations and correlations ('sd_Days|Subject', 'cor_Days.(Intercept)|Subject'), then
    'sigma'."""
    from lmefast.profile import sdcor_from_theta

    names, vals = sdcor_from_theta(res, theta, sigma)
    return names, vals


def bootstrap(res: MixedLMResults, n: int, seed: int | np.random.Generator | None = None,
              n_jobs: int | None = None) -> BootstrapResult:
    """Parametric bootstrap: n responses simulated from the fit (β̂, σ̂, θ̂), each refitted
    (same REML/ML criterion, started at θ̂). Replicates are drawn in the cross-products
    (no pass over the rows) and refitted on n_jobs threads (default: all cores)."""
    import time

    if not isinstance(n, int | np.integer) or n < 1:
        raise BootstrapError(f"n must be a positive integer, got {n!r}")
    t0 = time.perf_counter()
    sim = res.derived("simulator", lambda: res.engine.simulator(res._sol.theta, res._sol.beta, res.sigma))
    draws = sim.draws(seed, int(n))
    nt = res.engine.theta_map.n_theta
    th = np.empty((n, nt))
    beta = np.empty((n, res.k_fe))
    s2 = np.empty(n)
    f = np.empty(n)
    conv = np.ones(n, dtype=bool)
    jobs = max(1, min(int(n_jobs or os.cpu_count() or 1), n))
    theta0 = res._sol.theta
    with _single_threaded_blas() if jobs > 1 else nullcontext():
        if jobs == 1:
            _refit(res, sim, draws, range(n), theta0, th, beta, s2, f, conv)
        else:
            bounds = np.linspace(0, n, jobs + 1).astype(int)
            with ThreadPoolExecutor(jobs) as ex:
                futs = [ex.submit(_refit, res, sim, draws, range(bounds[i], bounds[i + 1]), theta0,
                                  th, beta, s2, f, conv) for i in range(jobs)]
                for fu in futs:
                    fu.result()
    names, _ = sdcor_names_values(res, theta0, res.sigma)
    vals = np.array([sdcor_names_values(res, th[r], np.sqrt(s2[r]))[1] if np.isfinite(s2[r])
                     else np.full(len(names), np.nan) for r in range(n)])
    fe = list(res.model.exog_names)
    sc, tm = res._scaling, res.engine.theta_map      # replicates on the user's scale
    beta = sc.beta(beta)
    th = np.array([sc.theta(tm, t) if np.all(np.isfinite(t)) else t for t in th]).reshape(n, nt)
    table = pd.DataFrame(np.concatenate([vals.reshape(n, len(names)), beta], axis=1), columns=names + fe)
    est_names, est_vals = sdcor_names_values(res, theta0, res.sigma)
    estimate = pd.Series(np.concatenate([est_vals, res._beta]), index=est_names + fe)
    return BootstrapResult(replicates=table, theta=th, objective=f, converged=conv, estimate=estimate,
                           seconds=time.perf_counter() - t0)


def simulate(res: MixedLMResults, n: int = 1, seed: int | np.random.Generator | None = None,
             include_random: bool = True) -> np.ndarray:
    """n responses simulated from the fit, n × nobs (rows in the data's order):
    o + Xβ̂ + Zb* + ε* with new random effects b* (include_random=True, lme4's simulate) or
    conditional on the estimated modes b̂ (include_random=False: o + Xβ̂ + Zb̂ + ε*), with
    ε*ᵢ ~ N(0, σ̂²/wᵢ) under prior weights w and o the offset (0 without one): lme4's meaning.

    On the working scale of a weighted fit (rows √w, DESIGN.md §4) the errors are N(0, σ̂²I)
    and Zb* is √w Z b*, so both are drawn there and divided by √w."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise BootstrapError(f"n must be a positive integer, got {n!r}")
    engine = res.engine
    rng = np.random.default_rng(seed)
    if include_random:
        sim = engine.simulator(res._sol.theta, res._sol.beta, res.sigma)
        working = sim.random_part(rng, int(n))
        working += res.sigma * rng.standard_normal(working.shape)
        return engine.fixed_part(res._beta)[None, :] + engine.to_data_scale(working)
    fitted = np.asarray(res.fittedvalues, dtype=float)
    noise = res.sigma * rng.standard_normal((int(n), fitted.shape[0]))
    return fitted[None, :] + engine.to_data_scale(noise, offset=False)
