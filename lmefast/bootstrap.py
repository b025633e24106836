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
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lmefast.objective import ObjectiveError, ProfiledObjective
from lmefast.optimize import fit_theta

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


class BootstrapError(ValueError):
    """The bootstrap or simulation cannot be run as asked."""


def _is_multi(res: MixedLMResults) -> bool:
    """A model with several grouping factors (lmefast.multi.MultiLM)."""
    return hasattr(res.model, "terms") and not hasattr(res.model, "spec")


class MultiSimulator:
    """Responses simulated from a fit with several grouping factors, and their
    cross-products (see the module docstring)."""

    def __init__(self, res: MixedLMResults) -> None:
        model = res.model
        self.res = res
        self.model = model
        self.cp = model.crossprods
        self.terms = model.terms
        self.Ts = model.theta_map.Ts(res.theta)
        self.beta = res._sol.beta.copy()
        self.sigma = res.sigma
        self.fixed = model.X @ self.beta
        t1 = self.terms[0]
        p = self.cp.p
        self.k1, self.m1 = t1.k, t1.m
        self.rec = t1.k * t1.k + t1.k * p + t1.k
        self.q2 = self.cp.q2
        self.coords = [int(c0) + t.codes * t.k for c0, t in zip(self.cp.trail_c0, self.terms[1:], strict=True)]

    @staticmethod
    def seeds(seed: int | np.random.Generator | None, n: int) -> np.ndarray:
        """The per-replicate seeds of a bootstrap of n replicates."""
        return np.random.default_rng(seed).integers(0, 2**63 - 1, size=n)

    def random_part(self, rng: np.random.Generator) -> np.ndarray:
        """Σ_j Z_j b_j*, b_j* ~ N(0, σ̂² T_j T_j') per level (rows in the data's order)."""
        out = np.zeros(self.model.nobs)
        for t, T in zip(self.terms, self.Ts, strict=True):
            b = self.sigma * rng.standard_normal((t.m, t.k)) @ T.T
            out += np.einsum("ij,ij->i", t.Z, b[t.codes])
        return out

    def response(self, rng: np.random.Generator) -> np.ndarray:
        """One simulated response y* = Xβ̂ + Zb* + ε* (new random effects, as lme4's simulate)."""
        mu = self.fixed + self.random_part(rng)
        return mu + self.sigma * rng.standard_normal(mu.shape[0])

    def crossprods(self, y: np.ndarray):
        """The model's cross-products with the response replaced by y (only the y-parts are
        recomputed)."""
        cp, k1, m1, rec = self.cp, self.k1, self.m1, self.rec
        t1 = self.terms[0]
        S1 = cp.S1.reshape(m1, rec).copy()
        for a in range(k1):
            S1[:, rec - k1 + a] = np.bincount(t1.codes, t1.Z[:, a] * y, m1)
        c2 = np.zeros(self.q2)
        for c0, t in zip(self.coords, self.terms[1:], strict=True):
            for a in range(t.k):
                c2 += np.bincount(c0 + a, t.Z[:, a] * y, self.q2)
        return replace(cp, S1=S1.ravel(), c2=c2, Xty=self.model.X.T @ y, yty=float(y @ y))


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


def _refit_multi(sim: MultiSimulator, seeds: np.ndarray, rows: range, theta0: np.ndarray, reml: bool,
                 out_theta: np.ndarray, out_beta: np.ndarray, out_s2: np.ndarray, out_f: np.ndarray,
                 out_conv: np.ndarray) -> None:
    from lmefast.multi import MultiObjective

    tm = sim.model.theta_map
    for r in rows:
        cp = sim.crossprods(sim.response(np.random.default_rng(seeds[r])))
        _store_refit(MultiObjective(cp, tm, reml, n_threads=1), theta0, r, out_theta, out_beta,
                     out_s2, out_f, out_conv)


def _one_factor(res: MixedLMResults):
    spec = res.model.spec
    if not all(hasattr(spec, a) for a in ("Zre", "group_codes", "layout")):
        raise BootstrapError("the cross-product bootstrap is implemented for one grouping factor")
    return spec


def design_blocks(res: MixedLMResults) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by group: (order, position in group, Z padded per row (n × qmax), sizes)."""
    spec = _one_factor(res)
    lay, codes = spec.layout, spec.group_codes
    n, m, k = spec.nobs, spec.n_groups, spec.k_re
    qmax = lay.qmax
    Z = np.zeros((n, qmax))
    Z[:, :k] = spec.Zre
    for e in range(lay.vc_val.shape[0]):
        val = lay.vc_val[e]
        nz = val != 0
        Z[np.nonzero(nz)[0], lay.vc_coord[e, nz]] += val[nz]
    sizes = np.bincount(codes, minlength=m)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n) - starts[codes[order]]
    return order, pos, Z, sizes


@dataclass
class Draw:
    """One batch of simulated y-parts (R replicates)."""

    b: np.ndarray        # R × m × qmax, random effects (0 in padded coordinates)
    z: np.ndarray        # R × m × D, standard normals (0 where G_i has no rank)
    chi2: np.ndarray     # R, the χ²_{n − Σr_i} draws
    c: np.ndarray        # R × m × qmax, Z_i'y*
    Xty: np.ndarray      # R × p
    yty: np.ndarray      # R


class YPartSimulator:
    """Draws (Z'y*, X'y*, y*'y*) for responses simulated from a fit, exactly in distribution."""

    def __init__(self, res: MixedLMResults) -> None:
        spec = _one_factor(res)
        self.res = res
        cp = res.model.crossprods
        self.cp = cp
        lay = cp.layout
        m, p, k = spec.n_groups, spec.k_fe, spec.k_re
        q = np.diff(lay.q_off)
        qmax = lay.qmax
        self.m, self.p, self.qmax, self.q = m, p, qmax, q
        D = qmax + p
        self.D = D
        # c positions in S, padded (m × qmax; −1 where q_i < qmax)
        loc = np.arange(qmax)
        valid = loc[None, :] < q[:, None]
        self.valid = valid
        cstart = cp.s_off[:-1] + q * q + q * p
        self.cpos = np.where(valid, cstart[:, None] + loc[None, :], -1)
        # per-group A_i (padded) and B_i
        A = np.zeros((m, qmax, qmax))
        B = np.zeros((m, qmax, p))
        S, s_off = cp.S, cp.s_off
        for qi in np.unique(q):
            gs = np.nonzero(q == qi)[0]
            qi = int(qi)
            idxA = s_off[gs][:, None] + np.arange(qi * qi)[None, :]
            A[gs, :qi, :qi] = S[idxA].reshape(-1, qi, qi)
            idxB = s_off[gs][:, None] + qi * qi + np.arange(qi * p)[None, :]
            B[gs, :qi, :] = S[idxB].reshape(-1, qi, p)
        self.A, self.B = A, B
        # X_i'X_i per group: one pass over the rows
        codes = spec.group_codes
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=m))])[:-1]
        Xs = spec.X[order]
        XX = np.add.reduceat(Xs[:, :, None] * Xs[:, None, :], starts, axis=0) if p else np.zeros((m, 0, 0))
        G = np.zeros((m, D, D))
        G[:, :qmax, :qmax] = A
        G[:, :qmax, qmax:] = B
        G[:, qmax:, :qmax] = B.transpose(0, 2, 1)
        G[:, qmax:, qmax:] = XX
        self.G = G
        lam, U = np.linalg.eigh(G)
        tol = np.finfo(float).eps * D * 100 * np.maximum(lam.max(axis=1, keepdims=True), 1e-300)
        keep = lam > tol
        self.keep = keep
        self.U = U * keep[:, None, :]
        self.sqrt_lam = np.where(keep, np.sqrt(np.where(keep, lam, 1.0)), 0.0)
        self.F = self.U * self.sqrt_lam[:, None, :]
        self.chi_df = int(spec.nobs - keep.sum())
        # the fit: β̂, σ̂, Λ_i
        self.beta = res._sol.beta.copy()
        self.sigma = res.sigma
        T, tvc = spec.theta_map.split(res.theta)
        Lam = np.zeros((m, qmax, qmax))
        Lam[:, :k, :k] = T
        comp = np.where(valid & (loc[None, :] >= k),
                        lay.comp[np.minimum(lay.q_off[:-1, None] + loc[None, :], lay.comp.shape[0] - 1)], -1)
        dvc = np.where(comp >= 0, np.concatenate([tvc, [0.0]])[comp], 0.0)
        Lam[:, loc, loc] += dvc
        self.Lam = Lam
        self.Bbeta = B @ self.beta if p else np.zeros((m, qmax))

    def draw(self, rng: np.random.Generator, R: int) -> Draw:
        m, qmax, D, p = self.m, self.qmax, self.D, self.p
        s = self.sigma
        u = rng.standard_normal((R, m, qmax)) * self.valid
        b = s * np.einsum("gij,rgj->rgi", self.Lam, u)
        z = rng.standard_normal((R, m, D)) * self.keep
        w = s * np.einsum("gij,rgj->rgi", self.F, z)
        chi2 = rng.chisquare(self.chi_df, R) if self.chi_df > 0 else np.zeros(R)
        c = self.Bbeta[None] + np.einsum("gij,rgj->rgi", self.A, b) + w[:, :, :qmax]
        c *= self.valid
        XtXb = self.cp.XtX @ self.beta
        Xty = XtXb[None, :] + np.einsum("gia,rgi->ra", self.B, b) + w[:, :, qmax:].sum(axis=1)
        v = np.concatenate([b, np.broadcast_to(self.beta, (R, m, p))], axis=2)
        mumu = np.einsum("rgi,gij,rgj->r", v, self.G, v)
        yty = mumu + 2 * np.einsum("rgi,rgi->r", v, w) + s * s * (np.einsum("rgi,rgi->r", z, z) + chi2)
        return Draw(b=b, z=z, chi2=chi2, c=c, Xty=Xty, yty=yty)

    def crossprods(self, d: Draw, r: int):
        """The cross-products of replicate r of a draw."""
        S = self.cp.S.copy()
        S[self.cpos[self.valid]] = d.c[r][self.valid]
        return replace(self.cp, S=S, Xty=d.Xty[r].copy(), yty=float(d.yty[r]))

    def response(self, d: Draw, r: int, rng: np.random.Generator) -> np.ndarray:
        """A response vector (original row order) whose cross-products are exactly those of
        replicate r: y* = Xβ̂ + Zb* + ε*, with ε* = σ M_i U_i λ_i^{-1/2} z_i plus a part
        orthogonal to the columns of M_i carrying the χ² draw. For tests and inspection."""
        res = self.res
        spec = res.model.spec
        order, pos, Z, sizes = design_blocks(res)
        codes = spec.group_codes
        n = spec.nobs
        M = np.concatenate([Z, spec.X], axis=1)                        # n × D
        inv_sqrt = np.where(self.keep, 1.0 / np.where(self.keep, self.sqrt_lam, 1.0), 0.0)
        coef = np.einsum("gij,gj->gi", self.U, inv_sqrt * d.z[r])  # m × D: U λ^{-1/2} z
        eps = self.sigma * np.einsum("ij,ij->i", M, coef[codes])
        xi = rng.standard_normal(n)
        # project xi off the columns of M_i, group by group
        Mxi = np.zeros((self.m, self.D))
        np.add.at(Mxi, codes, M * xi[:, None])
        Gp = np.einsum("gij,gj,gkj->gik", self.U, inv_sqrt ** 2, self.U)
        proj = np.einsum("ij,ij->i", M, np.einsum("gij,gj->gi", Gp, Mxi)[codes])
        u = xi - proj
        nu = float(u @ u)
        if self.chi_df > 0 and nu > 0:
            u *= self.sigma * np.sqrt(d.chi2[r] / nu)
        else:
            u[:] = 0.0
        mu = spec.X @ self.beta + np.einsum("ij,ij->i", Z, d.b[r][codes])
        return mu + eps + u


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


def _refit_chunk(sim: YPartSimulator, d: Draw, rows: range, theta0: np.ndarray, reml: bool,
                 out_theta: np.ndarray, out_beta: np.ndarray, out_s2: np.ndarray, out_f: np.ndarray,
                 out_conv: np.ndarray) -> None:
    tm = sim.res.model.spec.theta_map
    for r in rows:
        cp = sim.crossprods(d, r)
        _store_refit(ProfiledObjective(cp, tm, reml, n_threads=1), theta0, r, out_theta, out_beta,
                     out_s2, out_f, out_conv)


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
    cache = res.__dict__.setdefault("_inference_cache", {})
    multi = _is_multi(res)
    sim = cache.get("ysim")
    if sim is None:
        sim = cache["ysim"] = MultiSimulator(res) if multi else YPartSimulator(res)
    if multi:
        refit, draws = _refit_multi, MultiSimulator.seeds(seed, int(n))
    else:
        refit, draws = _refit_chunk, sim.draw(np.random.default_rng(seed), int(n))
    nt = res.model.theta_map.n_theta
    th = np.empty((n, nt))
    beta = np.empty((n, res.k_fe))
    s2 = np.empty(n)
    f = np.empty(n)
    conv = np.ones(n, dtype=bool)
    jobs = max(1, min(int(n_jobs or os.cpu_count() or 1), n))
    theta0 = res.theta
    with _single_threaded_blas() if multi else nullcontext():
        if jobs == 1:
            refit(sim, draws, range(n), theta0, res.reml, th, beta, s2, f, conv)
        else:
            bounds = np.linspace(0, n, jobs + 1).astype(int)
            with ThreadPoolExecutor(jobs) as ex:
                futs = [ex.submit(refit, sim, draws, range(bounds[i], bounds[i + 1]), theta0, res.reml,
                                  th, beta, s2, f, conv) for i in range(jobs)]
                for fu in futs:
                    fu.result()
    names, _ = sdcor_names_values(res, res.theta, res.sigma)
    vals = np.array([sdcor_names_values(res, th[r], np.sqrt(s2[r]))[1] if np.isfinite(s2[r])
                     else np.full(len(names), np.nan) for r in range(n)])
    fe = list(res.model.exog_names)
    table = pd.DataFrame(np.concatenate([vals.reshape(n, len(names)), beta], axis=1), columns=names + fe)
    est_names, est_vals = sdcor_names_values(res, res.theta, res.sigma)
    estimate = pd.Series(np.concatenate([est_vals, res._sol.beta]), index=est_names + fe)
    return BootstrapResult(replicates=table, theta=th, objective=f, converged=conv, estimate=estimate,
                           seconds=time.perf_counter() - t0)


def simulate(res: MixedLMResults, n: int = 1, seed: int | np.random.Generator | None = None,
             include_random: bool = True) -> np.ndarray:
    """n responses simulated from the fit, n × nobs (rows in the data's order):
    Xβ̂ + Zb* + ε* with new random effects b* (include_random=True, lme4's simulate) or
    conditional on the estimated modes b̂ (include_random=False: Xβ̂ + Zb̂ + ε*)."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise BootstrapError(f"n must be a positive integer, got {n!r}")
    if _is_multi(res):
        rng = np.random.default_rng(seed)
        msim = MultiSimulator(res)
        out = np.empty((n, res.nobs))
        for r in range(n):
            out[r] = msim.fixed + msim.random_part(rng) if include_random else res.fittedvalues
        out += res.sigma * rng.standard_normal(out.shape)
        return out
    spec = _one_factor(res)
    rng = np.random.default_rng(seed)
    order, pos, Z, sizes = design_blocks(res)
    codes = spec.group_codes
    fixed = spec.X @ res._sol.beta
    s = res.sigma
    out = np.empty((n, spec.nobs))
    if include_random:
        sim = YPartSimulator(res)
        u = rng.standard_normal((n, spec.n_groups, sim.qmax)) * sim.valid
        b = s * np.einsum("gij,rgj->rgi", sim.Lam, u)
        for r in range(n):
            out[r] = fixed + np.einsum("ij,ij->i", Z, b[r][codes])
    else:
        out[:] = res.fittedvalues
    out += s * rng.standard_normal(out.shape)
    return out
