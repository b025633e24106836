"""Likelihood profiles and confidence intervals (lme4's profile() and confint()).

Parameters are lme4's: per random-effects term the standard deviations and correlations
('sd_Days|Subject', 'cor_Days.(Intercept)|Subject'), then 'sigma', then the fixed effects.
The profile of a parameter fixes it and minimises the ML deviance over all the others;
ζ = sign(value − estimate) √(deviance − minimum), and the interval is where |ζ| reaches
√χ²₁(level). As lme4 does, REML fits are profiled on the ML deviance (around the ML
optimum). A fixed effect's profile refits θ on cross-products with that column moved to the
response (the C objective, analytic gradient); a variance parameter's profile minimises the
deviance d(θ, σ) = log|L|² + r²(θ)/σ² + n log(2πσ²) over the other standard deviations,
correlations and σ. Where the deviance stays below the cut-off up to a boundary (a standard
deviation at 0, a correlation at ±1), the interval ends at that boundary.

Several grouping factors (lmer fits, the blocked engine): the same, on the blocked objective; a fixed
effect's profile moves its column into the first factor's per-level records and the trailing
block's Z'y (MultiCrossProducts), no pass over the rows. Parameters are named by lmefast's
grouping-factor names, which are lme4's except for nested factors: ``(1|batch/cask)`` gives
the factor ``batch:cask`` (lme4: ``cask:batch``), so its parameter is
'sd_(Intercept)|batch:cask'. ``parm`` also accepts lme4's spelling (the parts of an
interaction factor in any order).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import optimize, stats

from lmefast.errors import IgnoredArgumentWarning, ProfileError
from lmefast.model import IGNORED_FIT_KEYWORDS
from lmefast.optimize import central_gradient, fit_theta
from lmefast.smparams import theta_of, vc_order

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


def _coef_label(name: str, group: str) -> str:
    return "(Intercept)" if name in (group, "Intercept", "Group") else name


def _term_entries(res: MixedLMResults, theta: np.ndarray
                  ) -> list[tuple[str, list[str], np.ndarray, list[tuple[int, int]]]]:
    """(group, coefficient names, T on the user's scale, free entries of T in θ's order) per
    term, at the engine's θ."""
    terms = res.model.covariance_terms(np.asarray(theta, dtype=float))
    patterns = res.engine.theta_map.patterns
    return [(g, c, T, list(zip(rows.tolist(), cols.tolist(), strict=True)))
            for (g, c, T, _), (rows, cols) in zip(terms, patterns, strict=True)]


def canonical_name(name: str) -> str:
    """'sd_(Intercept)|cask:batch' → 'sd_(Intercept)|batch:cask': the parts of an interaction
    factor sorted, so that lme4's and lmefast's spellings of a nested factor compare equal."""
    if "|" not in name:
        return name
    head, group = name.rsplit("|", 1)
    return f"{head}|{':'.join(sorted(group.split(':')))}"


def resolve_names(names: list[str], items: list[str]) -> list[str]:
    """Each requested name as it appears in `names` (exact, or lme4's spelling of a nested
    factor); ProfileError naming the unknown ones."""
    canon: dict[str, list[str]] = {}
    for n in names:
        canon.setdefault(canonical_name(n), []).append(n)
    out, bad = [], []
    for it in items:
        if it in names:
            out.append(it)
        elif len(canon.get(canonical_name(str(it)), [])) == 1:
            out.append(canon[canonical_name(str(it))][0])
        else:
            bad.append(it)
    if bad:
        raise ProfileError(f"unknown parameter(s) {bad}; parameters are {names}")
    return out


def sdcor_from_theta(res: MixedLMResults, theta: np.ndarray, sigma: float) -> tuple[list[str], np.ndarray]:
    names, vals = [], []
    for group, coefs, T, entries in _term_entries(res, theta):
        cov = sigma * sigma * (T @ T.T)
        sd = np.sqrt(np.diag(cov))
        labels = [_coef_label(c, group) for c in coefs]
        for i, j in entries:
            if i == j:
                names.append(f"sd_{labels[i]}|{group}")
                vals.append(sd[i])
            else:
                names.append(f"cor_{labels[i]}.{labels[j]}|{group}")
                vals.append(cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else 0.0)
    names.append("sigma")
    vals.append(sigma)
    return names, np.array(vals, dtype=float)


def _psd_cholesky(C: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a positive semidefinite matrix (zero columns where a pivot
    vanishes: a zero standard deviation or a correlation of ±1)."""
    k = C.shape[0]
    L = np.zeros((k, k))
    for j in range(k):
        d = C[j, j] - L[j, :j] @ L[j, :j]
        if d <= 1e-14 * max(C[j, j], 1e-300):
            continue
        L[j, j] = np.sqrt(d)
        for i in range(j + 1, k):
            L[i, j] = (C[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    return L


def theta_from_sdcor(res: MixedLMResults, values: np.ndarray) -> tuple[np.ndarray, float]:
    """Inverse of sdcor_from_theta: (the engine's θ, σ)."""
    sigma = float(values[-1])
    out = []
    pos = 0
    structure = res.derived("term_sizes_entries", lambda: [
        (T.shape[0], e) for _g, _c, T, e in _term_entries(res, res._sol.theta)])
    for k, entries in structure:
        sd = np.zeros(k)
        cor = np.eye(k)
        for (i, j), v in zip(entries, values[pos:pos + len(entries)], strict=True):
            if i == j:
                sd[i] = v
            else:
                cor[i, j] = cor[j, i] = v
        pos += len(entries)
        Tn = _psd_cholesky(cor * np.outer(sd, sd)) / sigma
        out.extend(Tn[i, j] for i, j in entries)
    return res._scaling.theta_internal(res.engine.theta_map, np.array(out)), sigma


class Profiler:
    """ζ of each lme4 parameter of a fit (ML deviance)."""

    def __init__(self, res: MixedLMResults) -> None:
        self.res = res
        if res.reml:
            obj = res.engine.objective(False)
            sol, _ = fit_theta(obj, res._sol.theta)
        else:
            obj, sol = res._objective, res._sol
        self.obj, self.sol = obj, sol
        self.dmin = sol.objective
        sigma = float(np.sqrt(sol.sigma2))
        self.sd_names, self.sd_hat = sdcor_from_theta(res, sol.theta, sigma)
        th, s = theta_from_sdcor(res, self.sd_hat)
        if not np.allclose(np.abs(th), np.abs(sol.theta), rtol=1e-8, atol=1e-10):
            raise ProfileError("cannot map this model's θ to standard deviations and correlations")
        self.fe_names = list(res.model.exog_names)
        self.names = self.sd_names + self.fe_names
        self.kind = []
        for nm in self.sd_names:
            self.kind.append("sigma" if nm == "sigma" else nm.split("_", 1)[0])
        self.kind += ["beta"] * len(self.fe_names)
        self.estimate = np.concatenate([self.sd_hat, res._scaling.beta(sol.beta)])
        self._warm: dict[int, np.ndarray] = {}

    # -- deviance with variance parameters fixed ------------------------------------------------
    def deviance_sdcor(self, values: np.ndarray) -> float:
        theta, sigma = theta_from_sdcor(self.res, values)
        if sigma <= 0:
            return np.inf
        try:
            sol = self.obj.solve(theta)
        except FloatingPointError:
            return np.inf
        n = self.obj.cp.n
        return sol.logdet_L + sol.r2 / sigma**2 + n * np.log(2 * np.pi * sigma**2)

    def _bounds(self, j: int) -> tuple[float, float]:
        kind = self.kind[j]
        if kind == "sd":
            return 0.0, np.inf
        if kind == "cor":
            return -1.0, 1.0
        if kind == "sigma":
            return 1e-12 * self.sd_hat[-1], np.inf
        return -np.inf, np.inf

    def deviance(self, j: int, value: float) -> float:
        """Minimum ML deviance with parameter j held at value."""
        if self.kind[j] == "beta":
            return self._deviance_beta(j - len(self.sd_names), value)
        nv = len(self.sd_hat)
        others = [i for i in range(nv) if i != j]
        x0 = self._warm.get(j, self.sd_hat[others])
        bounds = [self._bounds(i) for i in others]
        scale = np.maximum(np.abs(self.sd_hat[others]), 1e-2 * self.sd_hat[-1])
        scale = np.where(np.array([self.kind[i] for i in others]) == "cor", 1.0, scale)

        def f(u: np.ndarray) -> float:
            v = np.empty(nv)
            v[others] = u * scale
            v[j] = value
            return self.deviance_sdcor(v)

        if not others:
            return f(np.zeros(0))
        sb = [(lo / s if np.isfinite(lo) else None, hi / s if np.isfinite(hi) else None)
              for (lo, hi), s in zip(bounds, scale, strict=True)]
        start = np.clip(x0 / scale, [b[0] if b[0] is not None else -np.inf for b in sb],
                        [b[1] if b[1] is not None else np.inf for b in sb])
        r = optimize.minimize(f, start, method="L-BFGS-B", bounds=sb,
                              options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500})
        best = r
        if not r.success and j in self._warm:
            # a poor warm start: start again from the estimate
            r2 = optimize.minimize(f, np.clip(self.sd_hat[others] / scale,
                                              [b[0] if b[0] is not None else -np.inf for b in sb],
                                              [b[1] if b[1] is not None else np.inf for b in sb]),
                                   method="L-BFGS-B", bounds=sb,
                                   options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500})
            if r2.fun < best.fun:
                best = r2
        self._warm[j] = best.x * scale
        return float(best.fun)

    def _deviance_beta(self, jb: int, value: float) -> float:
        """Minimum ML deviance with β_jb held at value: θ refitted on the cross-products with
        that column moved to the response (the engine's ``without_fixed``)."""
        obj = self.res.engine.objective(False, n_threads=1,
                                        crossprods=self.res.engine.without_fixed(jb, value))
        # the warm start, the estimate and the default start: a θ near a boundary can leave
        # the optimiser at a saddle, so keep the best of the three
        starts = [self._warm.get(("theta", jb), self.sol.theta), self.sol.theta, obj.theta_map.start()]
        sol = min((fit_theta(obj, s)[0] for s in starts), key=lambda x: x.objective)
        self._warm[("theta", jb)] = sol.theta
        return sol.objective

    def zeta(self, j: int, value: float) -> float:
        d = self.deviance(j, value) - self.dmin
        return float(np.sign(value - self.estimate[j]) * np.sqrt(max(d, 0.0)))

    # -- intervals ------------------------------------------------------------------------------
    def _scale(self, j: int) -> float:
        est = self.estimate[j]
        if self.kind[j] == "beta":
            C = self.res._cov_fe if not self.res.reml else None
            jb = j - len(self.sd_names)
            if C is None:
                Linv = np.linalg.inv(self.sol.Lx)
                C = self.res._scaling.cov_beta(self.sol.sigma2 * (Linv.T @ Linv))
            return float(np.sqrt(C[jb, jb]))
        if self.kind[j] == "cor":
            return 0.1
        return 0.1 * max(abs(est), 1e-3 * self.sd_hat[-1])

    def _check_conditioned(self, j: int) -> None:
        """Refuse the profile of a variance parameter of a term whose correlation is within
        1e-6 of ±1 on the user's scale while the engine centred it (a predictor far from its
        origin): the sd/cor parametrisation the profile moves in is degenerate there, and its
        search would stop at the estimate."""
        if self.kind[j] in ("beta", "sigma"):
            return
        sc, pos = self.res._scaling, 0
        for C, (_group, _coefs, _T, entries) in zip(sc.terms, _term_entries(self.res, self.sol.theta),
                                                   strict=True):
            idx = range(pos, pos + len(entries))
            pos += len(entries)
            if j not in idx or np.count_nonzero(np.triu(C, 1)) == 0:
                continue
            cors = [self.sd_hat[i] for i in idx if self.kind[i] == "cor"]
            if cors and np.max(np.abs(cors)) > 1 - 1e-6:
                raise ProfileError(
                    f"the profile of {self.names[j]} is not available: the term's correlation is "
                    f"{max(cors, key=abs):.9g} on the data's scale (a predictor far from its origin), "
                    "where standard deviations and correlations are degenerate; centre the "
                    "predictor, or use method='bootstrap'")

    def endpoint(self, j: int, target: float) -> float:
        """The value where ζ = target (target < 0: below the estimate), or the boundary."""
        self._check_conditioned(j)
        est = self.estimate[j]
        lo_b, hi_b = self._bounds(j)
        side = np.sign(target)
        boundary = hi_b if side > 0 else lo_b
        step = self._scale(j)
        a = est
        self._warm.pop(j, None)
        for _ in range(60):
            b = est + side * step
            if (side > 0 and b >= boundary) or (side < 0 and b <= boundary):
                b = boundary
            zb = self.zeta(j, b)
            if abs(zb) >= abs(target):
                break
            if b == boundary:
                return float(boundary)
            a = b
            # extrapolate ζ linearly from the estimate, with a floor on the growth
            step = max(2 * step, abs(b - est) * abs(target) / max(abs(zb), 1e-8) * 1.1) \
                if abs(zb) < 0.5 * abs(target) else abs(b - est) * abs(target) / max(abs(zb), 1e-8) * 1.05
        else:
            raise ProfileError(f"profile of {self.names[j]} did not reach the cut-off")
        return float(optimize.brentq(lambda v: self.zeta(j, v) - target, a, b,
                                     xtol=1e-10 * max(abs(est), step), rtol=1e-12))


def _which(prof: Profiler, parm) -> list[int]:
    if parm is None:
        return list(range(len(prof.names)))
    items = [parm] if isinstance(parm, str | int) else list(parm)
    out = []
    for it in items:
        if isinstance(it, int | np.integer):
            if not 0 <= it < len(prof.names):
                raise ProfileError(f"parameter index {it} out of range (0..{len(prof.names) - 1})")
            out.append(int(it))
        else:
            out.append(prof.names.index(resolve_names(prof.names, [it])[0]))
    return out


def _profiler(res: MixedLMResults) -> Profiler:
    return res.derived("profiler", lambda: Profiler(res))


def _labels(level: float) -> list[str]:
    a = (1 - level) / 2
    return [f"{100 * a:.1f} %", f"{100 * (1 - a):.1f} %"]


def profile_intervals(res: MixedLMResults, level: float = 0.95, parm=None) -> pd.DataFrame:
    prof = _profiler(res)
    cut = float(np.sqrt(stats.chi2.ppf(level, 1)))
    idx = _which(prof, parm)
    lo = [prof.endpoint(j, -cut) for j in idx]
    hi = [prof.endpoint(j, cut) for j in idx]
    return pd.DataFrame(dict(zip(_labels(level), [lo, hi], strict=True)), index=[prof.names[j] for j in idx])


def wald_intervals(res: MixedLMResults, level: float = 0.95) -> pd.DataFrame:
    """lme4's confint(method='Wald'): β̂ ± z se for the fixed effects, NaN for the variance
    parameters."""
    names, _ = sdcor_from_theta(res, res._sol.theta, res.sigma)
    z = stats.norm.ppf(1 - (1 - level) / 2)
    se = np.sqrt(np.diag(res._cov_fe))
    beta = res._beta
    lo = np.concatenate([np.full(len(names), np.nan), beta - z * se])
    hi = np.concatenate([np.full(len(names), np.nan), beta + z * se])
    return pd.DataFrame(dict(zip(_labels(level), [lo, hi], strict=True)),
                        index=names + list(res.model.exog_names))


def conf_int(res: MixedLMResults, method: str = "profile", level: float = 0.95, parm=None,
             n_boot: int = 1000, seed=None, boot_kind: str = "percentile", n_jobs: int | None = None
             ) -> pd.DataFrame:
    """lme4's confint: method 'profile' (default, as lme4), 'wald' or 'bootstrap'
    (percentile or shortest intervals of n_boot parametric-bootstrap replicates)."""
    if not 0 < level < 1:
        raise ProfileError(f"level must be in (0, 1), got {level}")
    method = str(method).lower()
    if method == "profile":
        return profile_intervals(res, level, parm)
    if method == "wald":
        out = wald_intervals(res, level)
    elif method in ("bootstrap", "boot"):
        from lmefast.bootstrap import bootstrap

        out = bootstrap(res, n_boot, seed=seed, n_jobs=n_jobs).conf_int(level, boot_kind)
    else:
        raise ProfileError(f"method must be 'profile', 'wald' or 'bootstrap', not {method!r}")
    if parm is not None:
        names = list(out.index)
        items = [parm] if isinstance(parm, str) else list(parm)
        out = out.loc[resolve_names(names, items)]
    return out


def profile_grid(lo: float, hi: float, estimate: float, n_points: int) -> np.ndarray:
    """n_points evenly from lo to hi, with the estimate added: a grid point within a
    millionth of the spacing of the estimate is the estimate (endpoints that land on it,
    e.g. at a boundary, would otherwise appear twice, differing in the last bits)."""
    grid = np.linspace(lo, hi, n_points)
    spacing = (hi - lo) / max(n_points - 1, 1)
    grid = grid[np.abs(grid - estimate) > 1e-6 * max(spacing, abs(estimate) * 1e-12)]
    return np.sort(np.append(grid, estimate))


def profile(res: MixedLMResults, parm=None, alphamax: float = 0.01, n_points: int = 21) -> pd.DataFrame:
    """Profile traces (long format: parameter, value, ζ, deviance) on a grid spanning the
    (1 − alphamax) profile interval of each parameter, as lme4's profile()."""
    prof = _profiler(res)
    cut = float(np.sqrt(stats.chi2.ppf(1 - alphamax, 1)))
    rows = []
    for j in _which(prof, parm):
        lo, hi = prof.endpoint(j, -cut), prof.endpoint(j, cut)
        grid = profile_grid(lo, hi, prof.estimate[j], n_points)
        prof._warm.pop(j, None)
        for v in grid:
            d = prof.deviance(j, float(v))
            z = float(np.sign(v - prof.estimate[j]) * np.sqrt(max(d - prof.dmin, 0.0)))
            rows.append((prof.names[j], float(v), z, d))
    return pd.DataFrame(rows, columns=["parameter", "value", "zeta", "deviance"])


# -- statsmodels' profile_re ----------------------------------------------------------------------
def _covariance_pattern(free_T: np.ndarray) -> np.ndarray:
    """Which entries of cov = TT' can be non-zero, from the free entries of T."""
    F = np.asarray(free_T, dtype=float) != 0
    return (F.astype(float) @ F.T.astype(float)) > 0


def _profile_point(obj, engine, unpack, u0: np.ndarray, bounds: list) -> tuple[np.ndarray, object]:
    """Minimise the objective over the free parameters u (L-BFGS-B, central differences) from
    u0; returns (u, solution)."""
    def f(u: np.ndarray) -> float:
        cov, vcomp = unpack(u)
        return obj(theta_of(engine, cov, vcomp))

    lower = np.array([-np.inf if lo is None else lo for lo, _ in bounds], dtype=float)

    def grad(u: np.ndarray) -> np.ndarray:
        return central_gradient(f, u, lower)

    if u0.shape[0]:
        out = optimize.minimize(f, u0, jac=grad, method="L-BFGS-B", bounds=bounds,
                                options={"ftol": 1e-14, "gtol": 1e-9, "maxiter": 1000})
        u = out.x if out.fun <= f(u0) else u0
    else:
        u = u0
    cov, vcomp = unpack(u)
    return u, obj.solve(theta_of(engine, cov, vcomp))


def profile_re(res: MixedLMResults, re_ix, vtype: str, num_low: int = 5, dist_low: float = 1.0,
               num_high: int = 5, dist_high: float = 1.0, **fit_kwargs) -> np.ndarray:
    """statsmodels' ``profile_re``: the profile log-likelihood of one variance parameter.

    ``vtype='re'``: the variance of random coefficient ``re_ix`` (an index); ``'vc'``: the
    variance component named ``re_ix``. As statsmodels, the parameter is held on the scale of
    the residual variance: at values x from (v̂ − dist_low)/σ̂² to v̂/σ̂² (num_low + 1 points)
    and on to (v̂ + dist_high)/σ̂² (num_high more), with v̂ its estimate, x is fixed and every
    other covariance parameter, σ² and β are re-fitted by the fit's criterion (REML or ML).
    Returns an array of rows (x σ̃², llf) with σ̃² the re-fitted residual variance.

    A coefficient's variance is fixed by ordering it first: with P the Cholesky factor of the
    reordered relative covariance (on the fit's pattern), x = P₀₀², and the free entries of P
    and √vcomp are optimised (θ follows by lmefast.smparams.theta_of); each point starts
    from its neighbour nearer the estimate; the point at the estimate is the fit itself.
    ``fit_kwargs``: statsmodels' optimiser settings
    (lmefast.model.IGNORED_FIT_KEYWORDS) are accepted with an IgnoredArgumentWarning."""
    unknown = sorted(set(fit_kwargs) - set(IGNORED_FIT_KEYWORDS))
    if unknown:
        raise TypeError(f"profile_re() got unexpected keyword argument(s) {unknown}")
    if fit_kwargs:
        warnings.warn(f"Argument(s) {', '.join(sorted(fit_kwargs))} ignored by lmefast's profile_re",
                      IgnoredArgumentWarning, stacklevel=3)
    if vtype not in ("re", "vc"):
        raise ValueError(f"vtype must be 're' or 'vc', not {vtype!r}")
    if int(num_low) < 0 or int(num_high) < 0:
        raise ValueError("num_low and num_high must be non-negative")
    engine, obj = res.engine, res._objective
    pa = res.params_object
    C = np.atleast_2d(np.asarray(pa.cov_re, dtype=float))
    vcomp0 = np.asarray(pa.vcomp, dtype=float).ravel()
    k = C.shape[0] if pa.k_re else 0
    names = list(vc_order(engine))
    coef = [c for c in engine.covariance_terms() if c.role == "coef"]
    pattern = _covariance_pattern(coef[0].free) if coef else np.zeros((0, 0), dtype=bool)
    order = np.arange(k)
    if vtype == "re":
        if not (isinstance(re_ix, int | np.integer) and 0 <= re_ix < k):
            raise ValueError(f"re_ix must be the index of a random coefficient (0 to {k - 1}), got {re_ix!r}")
        order[0], order[re_ix] = re_ix, 0
        x0 = float(C[re_ix, re_ix])
    else:
        if re_ix not in names:
            raise ValueError(f"re_ix must name a variance component ({names}), got {re_ix!r}")
        x0 = float(vcomp0[names.index(re_ix)])
    scale = res.scale
    low, high = (scale * x0 - dist_low) / scale, (scale * x0 + dist_high) / scale
    if low <= 0:
        raise ValueError("dist_low is too large and would result in a negative variance; "
                         "try a smaller value")
    values = np.concatenate([np.linspace(low, x0, int(num_low) + 1),
                             np.linspace(x0, high, int(num_high) + 1)[1:]])
    # the free parameters u: entries of P (lower, on the reordered pattern) then √vcomp
    mask = np.tril(pattern[np.ix_(order, order)])
    rows, cols = np.nonzero(mask)
    fixed_p = (vtype == "re")
    keep_p = ~((rows == 0) & (cols == 0)) if fixed_p else np.ones(rows.shape[0], dtype=bool)
    fixed_vc = names.index(re_ix) if vtype == "vc" else -1
    keep_vc = np.array([i != fixed_vc for i in range(len(names))], dtype=bool)
    inverse = np.argsort(order)

    def pack(P: np.ndarray, sqrt_vc: np.ndarray) -> np.ndarray:
        return np.concatenate([P[rows, cols][keep_p], sqrt_vc[keep_vc]])

    def unpacker(x: float):
        def unpack(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            P = np.zeros((k, k))
            n_p = int(keep_p.sum())
            vals = np.empty(rows.shape[0])
            vals[keep_p] = u[:n_p]
            if fixed_p:
                vals[~keep_p] = np.sqrt(x)
            P[rows, cols] = vals
            sqrt_vc = np.empty(len(names))
            sqrt_vc[keep_vc] = u[n_p:]
            if fixed_vc >= 0:
                sqrt_vc[fixed_vc] = np.sqrt(x)
            cov = (P @ P.T)[np.ix_(inverse, inverse)]
            return cov, sqrt_vc ** 2
        return unpack

    bounds = [(0.0, None) if r == c else (None, None) for r, c in zip(rows[keep_p], cols[keep_p], strict=True)]
    bounds += [(0.0, None)] * int(keep_vc.sum())
    u_hat = pack(_psd_cholesky(C[np.ix_(order, order)]) if k else np.zeros((0, 0)), np.sqrt(vcomp0))
    out = np.empty((values.shape[0], 2))
    n_left = int(num_low) + 1
    for idx in [*range(n_left - 1, -1, -1), *range(n_left, values.shape[0])]:
        x = float(values[idx])
        if idx == n_left - 1:            # the estimate itself: the fit
            u_prev, sol = u_hat, res._sol
        else:
            start = u_hat if idx == n_left else u_prev
            u_prev, sol = _profile_point(obj, engine, unpacker(x), start, bounds)
        out[idx] = (x * sol.sigma2, -0.5 * sol.objective)
    return out
