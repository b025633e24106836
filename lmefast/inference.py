"""Small-sample inference for the fixed effects: Satterthwaite and Kenward-Roger denominator
degrees of freedom, coefficient tables, contrasts (t and F tests), type-3 ANOVA tables, and
likelihood-ratio tests between nested models.

Satterthwaite (as lmerTest): the variance parameters are varpar = (θ, σ); their covariance is
A = 2 H⁻¹, H the Hessian of the deviance d(θ, σ) (ML, or REML for REML fits) with β profiled
out but σ free:

    ML:    d = log|L|² + r²(θ)/σ² + n log(2πσ²)
    REML:  d = log|L|² + log|Rx|² + r²(θ)/σ² + (n−p) log(2πσ²)

and for a contrast l, with C(varpar) = σ²(Rx'Rx)⁻¹ and g = ∂(l'Cl)/∂varpar,
df = 2 (l'Cl)² / (g'Ag). All of it is computed from the profiled objective (θ → Solution),
so it works for any model that provides one. H and ∂C/∂θ are taken by central differences
with Richardson extrapolation (lmerTest uses numDeriv, also Richardson).

Kenward-Roger (as pbkrtest): the covariance parameters γ are the variances and covariances of
the random-effects terms and σ², V = Σ_r γ_r G_r. For one grouping factor V is block-diagonal,
so every quantity pbkrtest forms (the traces tr(G_r V⁻¹ G_s V⁻¹), P_r = −X'V⁻¹G_rV⁻¹X,
Q_rs = X'V⁻¹G_rV⁻¹G_sV⁻¹X) is a sum over groups of n_i × n_i products. Cost:
O(Σ_i n_i³ + R² Σ_i n_i² (n_i + p)) time for R covariance parameters, memory for a chunk of
groups at a time; refused above lmefast.onefactor.KR_MAX_GROUP_ROWS rows in one group or KR_MAX_FLOPS work.

Kenward-Roger with several grouping factors (crossed or nested, lmefast.multi.MultiLM): V is
not block-diagonal, but V = σ²(I + ZΛΛ'Z') so every quantity above is a product of the q × q
cross-products Z'Z, Z'X, X'X and S = Λ(Λ'Z'ZΛ + I)⁻¹Λ' (Woodbury), q = Σ_j m_j k_j the number
of random effects: W = Z'V⁻¹Z = σ⁻²(Z'Z − Z'Z S Z'Z), Z'V⁻¹X, Z'V⁻²Z, tr V⁻² etc., and a
parameter's G_r = Z D_r Z' only selects rows and columns of them. No n × n matrix is formed.
Cost: one pass over the rows for Z'Z (O(n (Σk_j)²)), then O(q³) for S and the q × q products
and O(R² (m² + m p + p²)) for the traces (m the levels of the factors involved); memory about
eight dense q × q matrices (q = 2,000: 2.6 s on 2 cores). Refused above lmefast.multi.KR_MAX_RANDOM_EFFECTS (q).
The traces are the engines' (Engine.kenward_roger_traces); the adjustment is here.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from lmefast.errors import InferenceError

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults

DDF_METHODS = ("satterthwaite", "kenward-roger", "residual", None)


def normalize_ddf(ddf: str | None) -> str | None:
    if ddf is None:
        return None
    key = str(ddf).lower().replace("_", "-").replace(" ", "-")
    aliases = {"satterthwaite": "satterthwaite", "kenward-roger": "kenward-roger", "kr": "kenward-roger",
               "kenwardroger": "kenward-roger", "residual": "residual", "none": None, "z": None,
               "wald": None}
    if key not in aliases:
        raise InferenceError(f"ddf must be one of 'satterthwaite', 'kenward-roger', 'residual' or None, "
                             f"not {ddf!r}")
    return aliases[key]


# -- numerical derivatives ------------------------------------------------------------------------
def _steps(x: np.ndarray, rel: float, floor: float) -> np.ndarray:
    return rel * np.maximum(np.abs(x), floor)


def hessian(f: Callable[[np.ndarray], float], x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Hessian by central differences at steps h and h/2, Richardson-extrapolated (O(h⁴))."""
    def central(hh: np.ndarray) -> np.ndarray:
        d = x.size
        H = np.empty((d, d))
        f0 = f(x)
        for i in range(d):
            ei = np.zeros(d)
            ei[i] = hh[i]
            H[i, i] = (f(x + ei) - 2 * f0 + f(x - ei)) / hh[i] ** 2
            for j in range(i):
                ej = np.zeros(d)
                ej[j] = hh[j]
                H[i, j] = H[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej)
                                     + f(x - ei - ej)) / (4 * hh[i] * hh[j])
        return H

    H1, H2 = central(h), central(h / 2)
    H = (4 * H2 - H1) / 3
    return 0.5 * (H + H.T)


def jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """∂f/∂x (f vector-valued; result len(f) × len(x)), central differences + Richardson."""
    cols = []
    for i in range(x.size):
        ei = np.zeros(x.size)
        ei[i] = h[i]
        d1 = (f(x + ei) - f(x - ei)) / (2 * h[i])
        d2 = (f(x + ei / 2) - f(x - ei / 2)) / h[i]
        cols.append((4 * d2 - d1) / 3)
    return np.stack(cols, axis=-1)


# -- Satterthwaite ------------------------------------------------------------------------------
def varpar_deviance(obj: Any, varpar: np.ndarray) -> float:
    """lmerTest's deviance in varpar = (θ, σ): β profiled out, σ free (REML or ML as obj)."""
    theta, sigma = varpar[:-1], varpar[-1]
    sol = obj.solve(theta)
    s2 = sigma * sigma
    n, p = obj.cp.n, obj.cp.p
    dev = sol.logdet_L + sol.r2 / s2
    if obj.reml:
        logdet_rx = 2.0 * float(np.sum(np.log(np.diag(sol.Lx)))) if p else 0.0
        return dev + logdet_rx + (n - p) * np.log(2 * np.pi * s2)
    return dev + n * np.log(2 * np.pi * s2)


def _vcov_beta_at(obj: Any, varpar: np.ndarray) -> np.ndarray:
    sol = obj.solve(varpar[:-1])
    Linv = np.linalg.inv(sol.Lx)
    return varpar[-1] ** 2 * (Linv.T @ Linv)


def satterthwaite_parts(res: MixedLMResults) -> tuple[np.ndarray, np.ndarray]:
    """(A, J): A = 2 H⁻¹ the covariance of varpar = (θ, σ); J (p × p × len(varpar)) the
    derivatives of vcov(β̂) with respect to varpar. Cached on the results object."""
    def make():
        obj = res._objective
        varpar = np.concatenate([res._sol.theta, [res.sigma]])
        h = _steps(varpar, 1e-2, 0.05)
        H = hessian(lambda v: varpar_deviance(obj, v), varpar, h)
        try:
            A = 2.0 * np.linalg.inv(H)
        except np.linalg.LinAlgError:
            A = 2.0 * np.linalg.pinv(H)
        p = res.k_fe
        J = jacobian(lambda v: _vcov_beta_at(obj, v).ravel(), varpar, h).reshape(p, p, -1)
        return A, J

    return res.derived("satt", make)


def satterthwaite_df(res: MixedLMResults, L: np.ndarray) -> float:
    """Satterthwaite df of one contrast l (length p) of the user's β (as l S of the engine's)."""
    A, J = satterthwaite_parts(res)
    L = res._scaling.contrast(L)
    var = float(L @ res._cov_fe_engine @ L)
    g = np.einsum("i,ijk,j->k", L, J, L)
    denom = float(g @ A @ g)
    if denom <= 0:
        return np.inf
    return 2.0 * var * var / denom


# -- Kenward-Roger ------------------------------------------------------------------------------
def kenward_roger_parts(res: MixedLMResults) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(PhiA, P, W) of pbkrtest's vcovAdj: the adjusted covariance of β̂, the P_r matrices and
    W = 2 IE2⁻¹ (IE2 the expected REML information of γ), from the engine's traces. Kept with
    the results."""
    if not res.reml:
        raise InferenceError("Kenward-Roger's method is only available for REML fits "
                             "(as in pbkrtest/lmerTest): refit with reml=True")

    def make():
        Ktr, P, Q = res.engine.kenward_roger_traces(res._sol.theta, res.scale)
        return _kr_finish(res, Ktr, P, Q)

    return res.derived("kr", make)


def _kr_finish(res: MixedLMResults, Ktr: np.ndarray, P: list[np.ndarray], Q: dict
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """pbkrtest's vcovAdj from the traces tr(G_r V⁻¹ G_s V⁻¹) (upper triangle), the P_r and the
    Q_rs (r ≤ s), all on the engine's design (β̃; the user's contrasts enter as L S)."""
    R = len(P)
    p = res.k_fe
    Ktr = np.triu(Ktr) + np.triu(Ktr, 1).T
    P = [0.5 * (Pr + Pr.T) for Pr in P]
    Phi = res._cov_fe_engine
    IE2 = np.empty((R, R))
    for r in range(R):
        PhiPr = Phi @ P[r]
        for s in range(r, R):
            IE2[r, s] = IE2[s, r] = (Ktr[r, s] - 2 * np.sum(Phi * Q[(r, s)])
                                     + np.sum(PhiPr * (P[s] @ Phi)))
    ev = np.linalg.eigvalsh(IE2)
    W = 2 * (np.linalg.inv(IE2) if np.min(np.abs(ev)) > 1e-10 else np.linalg.pinv(IE2))
    W = 0.5 * (W + W.T)
    U = np.zeros((p, p))
    for r in range(R - 1):
        for s in range(r + 1, R):
            U += W[r, s] * (Q[(r, s)] - P[r] @ Phi @ P[s])
    U = U + U.T
    for r in range(R):
        U += W[r, r] * (Q[(r, r)] - P[r] @ Phi @ P[r])
    PhiA = Phi + 2 * (Phi @ U @ Phi)
    return PhiA, P, W


def _kr_stats(res: MixedLMResults, L: np.ndarray) -> tuple[float, float, float]:
    """pbkrtest's .KR_adjust for the rows of L: (ddf, F scaling, A2/q)."""
    PhiA, P, W = kenward_roger_parts(res)
    Phi = res._cov_fe_engine
    L = res._scaling.contrast(np.atleast_2d(np.asarray(L, dtype=float)))
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    TPhi = Theta @ Phi
    R = len(P)
    u = [TPhi @ P[r] @ Phi for r in range(R)]
    A1 = A2 = 0.0
    for r in range(R):
        for s in range(r, R):
            e = 1.0 if r == s else 2.0
            A1 += e * W[r, s] * np.trace(u[r]) * np.trace(u[s])
            A2 += e * W[r, s] * np.sum(u[r] * u[s].T)
    q = int(np.linalg.matrix_rank(L))
    B = (A1 + 6 * A2) / (2 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    c1 = g / (3 * q + 2 * (1 - g))
    c2 = (q - g) / (3 * q + 2 * (1 - g))
    c3 = (q + 2 - g) / (3 * q + 2 * (1 - g))
    V0 = 1 + c1 * B
    V1 = 1 - c2 * B
    V2 = 1 - c3 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    ratio = 0.0 if V1 == 0 else (1 - A2 / q) / V1
    rho = ratio ** 2 * V0 / V2 / q
    df2 = 4 + (q + 2) / (q * rho - 1)
    scaling = 1.0 if abs(df2 - 4) < 1e-2 else df2 * (1 - A2 / q) / (df2 - 2)
    return float(df2), float(scaling), q


def kenward_roger_df(res: MixedLMResults, L: np.ndarray) -> float:
    return _kr_stats(res, L)[0]


# -- tables -------------------------------------------------------------------------------------
def _ddf_of(res: MixedLMResults, L: np.ndarray, ddf: str | None) -> float:
    if ddf is None:
        return np.inf
    if ddf == "residual":
        return float(res.nobs - res.k_fe)
    if ddf == "satterthwaite":
        return satterthwaite_df(res, L)
    return kenward_roger_df(res, L)


def _vcov(res: MixedLMResults, ddf: str | None) -> np.ndarray:
    if ddf == "kenward-roger":
        return res._scaling.cov_beta(kenward_roger_parts(res)[0])
    return res._cov_fe


def _t_rows(res: MixedLMResults, L: np.ndarray, rhs: np.ndarray, ddf: str | None, alpha: float,
            names: Sequence[str]) -> pd.DataFrame:
    C = _vcov(res, ddf)
    beta = res._beta
    est = L @ beta
    se = np.sqrt(np.einsum("ij,jk,ik->i", L, C, L))
    df = np.array([_ddf_of(res, L[i], ddf) for i in range(L.shape[0])])
    t = (est - rhs) / se
    if ddf is None:
        p = 2 * stats.norm.sf(np.abs(t))
        qq = np.full(t.shape, stats.norm.ppf(1 - alpha / 2))
    else:
        p = 2 * stats.t.sf(np.abs(t), df)
        qq = stats.t.ppf(1 - alpha / 2, df)
    stat = "z" if ddf is None else "t"
    return pd.DataFrame({"estimate": est, "std_err": se, "df": df, stat: t, "p": p,
                         "ci_lower": est - qq * se, "ci_upper": est + qq * se},
                        index=pd.Index(list(names)))


def coef_table(res: MixedLMResults, ddf: str | None = "satterthwaite", alpha: float = 0.05) -> pd.DataFrame:
    """One row per fixed effect: estimate, std_err, df, t (z when ddf is None), p, interval.

    ddf: 'satterthwaite' (lmerTest), 'kenward-roger' (pbkrtest/lmerTest: adjusted standard
    errors, REML fits only), 'residual' (n − p), None (statsmodels' z-table, df = inf)."""
    ddf = normalize_ddf(ddf)
    if not 0 < alpha < 1:
        raise InferenceError(f"alpha must be in (0, 1), got {alpha}")
    p = res.k_fe
    return _t_rows(res, np.eye(p), np.zeros(p), ddf, alpha, res.model.exog_names)


# -- contrasts ----------------------------------------------------------------------------------
_NUM = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _parse_side(text: str, names: list[str], placeholders: dict[str, int], what: str
                ) -> tuple[np.ndarray, float]:
    """A linear expression 'a*x + y - 2 z + 3' → (coefficients, constant)."""
    coef = np.zeros(len(names))
    const = 0.0
    s = text.replace(" ", "")
    if not s:
        raise InferenceError(f"empty side in contrast {what!r}")
    if s[0] not in "+-":
        s = "+" + s
    term_re = re.compile(rf"([+-])(?:({_NUM})\*?)?(@\d+@)?")
    i = 0
    while i < len(s):
        mt = term_re.match(s, i)
        if mt is None or mt.end() == i or (mt.group(2) is None and mt.group(3) is None):
            raise InferenceError(f"cannot parse contrast {what!r} near {s[i:]!r}; write e.g. "
                                 f"'{names[-1]} = 0' or '{names[-1]} - 2*{names[0]} = 1' with names "
                                 f"from {names}")
        sign = -1.0 if mt.group(1) == "-" else 1.0
        val = float(mt.group(2)) if mt.group(2) else 1.0
        if mt.group(3):
            coef[placeholders[mt.group(3)]] += sign * val
        else:
            const += sign * val
        i = mt.end()
    return coef, const


def parse_contrast(contrast: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """'Time = 0', 'Time - Cu[T.Cu035] = 1', 'a = b, c = 0' (one row per comma/semicolon) →
    (L, rhs). Names are the fixed-effect names."""
    placeholders = {}
    rows, rhs = [], []
    for part in re.split(r"[;,]", contrast):
        expr = part
        # longest names first, so that 'Time2' is not read as 'Time' followed by '2'
        for j in sorted(range(len(names)), key=lambda j: -len(names[j])):
            token = f"@{j}@"
            placeholders[token] = j
            expr = expr.replace(names[j], token)
        if re.search(r"[A-Za-z_]", re.sub(r"@\d+@|[eE][-+]?\d", "", expr)):
            unknown = re.sub(r"@\d+@", " ", expr)
            raise InferenceError(f"unknown term in contrast {part.strip()!r} (left after the known names: "
                                 f"{unknown.strip()!r}); fixed effects are {names}")
        sides = expr.split("=")
        if len(sides) > 2:
            raise InferenceError(f"contrast {part.strip()!r} has more than one '='")
        lc, lk = _parse_side(sides[0], names, placeholders, part.strip())
        rc, rk = (np.zeros(len(names)), 0.0) if len(sides) == 1 else _parse_side(
            sides[1], names, placeholders, part.strip())
        row = lc - rc
        if not np.any(row):
            raise InferenceError(f"contrast {part.strip()!r} involves no fixed effect")
        rows.append(row)
        rhs.append(rk - lk)
    return np.array(rows), np.array(rhs)


def _as_contrast(res: MixedLMResults, contrast: Any, rhs: Any = None) -> tuple[np.ndarray, np.ndarray, list]:
    names = res.model.exog_names
    p = len(names)
    if isinstance(contrast, str):
        L, r = parse_contrast(contrast, names)
        labels = [s.strip() for s in re.split(r"[;,]", contrast)]
        if rhs is not None:
            raise InferenceError("give the right-hand side in the string ('Time = 1'), not as rhs")
        return L, r, labels
    if isinstance(contrast, pd.DataFrame | pd.Series):
        C = contrast if isinstance(contrast, pd.DataFrame) else contrast.to_frame().T
        unknown = [c for c in C.columns if c not in names]
        if unknown:
            raise InferenceError(f"unknown fixed effect(s) {unknown} in contrast; fixed effects are {names}")
        L = C.reindex(columns=names, fill_value=0.0).to_numpy(dtype=float)
        labels = [str(i) for i in C.index]
    else:
        try:
            L = np.atleast_2d(np.asarray(contrast, dtype=float))
        except (TypeError, ValueError) as exc:
            raise InferenceError(f"contrast must be a string, a matrix or a DataFrame: {exc}") from None
        if L.ndim != 2 or L.shape[1] != p:
            raise InferenceError(f"contrast matrix should have {p} columns (one per fixed effect "
                                 f"{names}), got shape {np.shape(contrast)}")
        labels = [f"c{i}" for i in range(L.shape[0])]
    if not np.all(np.isfinite(L)):
        raise InferenceError("contrast has NaN or infinite entries")
    if rhs is None:
        r = np.zeros(L.shape[0])
    else:
        r = np.broadcast_to(np.asarray(rhs, dtype=float), (L.shape[0],)).copy()
    return L, r, labels


def t_test(res: MixedLMResults, contrast: Any, ddf: str | None = "satterthwaite", rhs: Any = None,
           alpha: float = 0.05, joint: bool = False) -> pd.DataFrame:
    """Contrasts l'β = rhs: one t test per row (lmerTest's contest1D), or with joint=True one
    F test of all rows (lmerTest's contestMD)."""
    ddf = normalize_ddf(ddf)
    L, r, labels = _as_contrast(res, contrast, rhs)
    if joint:
        return f_test(res, L, r, ddf)
    out = _t_rows(res, L, r, ddf, alpha, labels)
    out.insert(1, "rhs", r)
    return out


def _get_fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    E = np.sum(nu / (nu - 2))
    return float(2 * E / (E - nu.size))


def f_test(res: MixedLMResults, L: np.ndarray, rhs: np.ndarray | None = None,
           ddf: str | None = "satterthwaite", name: str = "contrast") -> pd.DataFrame:
    """Joint test of L β = rhs: lmerTest's contestMD (Satterthwaite) or pbkrtest's KRmodcomp
    (Kenward-Roger); 'residual' uses n − p, None the χ²/q approximation (df inf)."""
    ddf = normalize_ddf(ddf)
    L = np.atleast_2d(np.asarray(L, dtype=float))
    rhs = np.zeros(L.shape[0]) if rhs is None else np.asarray(rhs, dtype=float)
    beta = res._beta
    if np.any(rhs != 0):
        beta = beta - np.linalg.pinv(L) @ rhs
    C = res._cov_fe
    if ddf == "kenward-roger":
        df2, scaling, q = _kr_stats(res, L)
        PhiA = res._scaling.cov_beta(kenward_roger_parts(res)[0])
        Lb = L @ beta
        Fu = float(Lb @ np.linalg.solve(L @ PhiA @ L.T, Lb)) / q
        F = Fu * scaling
        p = stats.f.sf(F, q, df2)
        return pd.DataFrame({"F": [F], "num_df": [q], "den_df": [df2], "p": [p]}, index=[name])
    VL = L @ C @ L.T
    d, Pm = np.linalg.eigh(VL)
    d, Pm = d[::-1], Pm[:, ::-1]
    tol = max(np.sqrt(np.finfo(float).eps) * d[0], 0.0)
    q = int(np.sum(d > tol))
    if q == 0:
        raise InferenceError("the contrast has no estimable direction (L vcov L' is zero)")
    PtL = (Pm.T @ L)[:q]
    t2 = (PtL @ beta) ** 2 / d[:q]
    F = float(np.sum(t2) / q)
    if ddf is None:
        den = np.inf
        p = stats.chi2.sf(F * q, q)
    else:
        if ddf == "residual":
            den = float(res.nobs - res.k_fe)
        elif q == 1:
            den = satterthwaite_df(res, PtL[0])
        else:
            den = _get_fstat_ddf(np.array([satterthwaite_df(res, PtL[i]) for i in range(q)]))
        p = stats.f.sf(F, q, den)
    return pd.DataFrame({"F": [F], "num_df": [q], "den_df": [den], "p": [p]}, index=[name])


# -- statsmodels' contrast results -------------------------------------------------------------------
class ContrastResults:
    """statsmodels' ``ContrastResults`` for tests of the fixed effects: for t tests
    ``effect``, ``sd``, ``tvalue``, ``pvalue``, ``df_denom`` (inf for z tests) and
    ``conf_int(alpha)``; for joint tests ``fvalue`` (or ``statistic`` for χ²), ``pvalue``,
    ``df_num``, ``df_denom``. ``summary_frame()`` (and indexing, ``t["p"]``) gives the table."""

    def __init__(self, table: pd.DataFrame, kind: str, alpha: float = 0.05) -> None:
        self.table = table
        self.kind = kind                   # 't', 'z', 'F' or 'chi2'
        self.alpha = alpha
        if kind in ("t", "z"):
            self.effect = table["estimate"].to_numpy()
            self.sd = table["std_err"].to_numpy()
            self.tvalue = table[kind].to_numpy()
            self.statistic = self.tvalue
            self.pvalue = table["p"].to_numpy()
            self.df_denom = table["df"].to_numpy()
            self.distribution = "t" if kind == "t" else "norm"
        else:
            self.df_num = float(table["num_df"].iloc[0])
            self.df_denom = float(table["den_df"].iloc[0])
            stat = float(table["F"].iloc[0])
            self.fvalue = stat
            self.statistic = stat * self.df_num if kind == "chi2" else stat
            self.pvalue = float(table["p"].iloc[0])
            self.distribution = "chi2" if kind == "chi2" else "F"

    def conf_int(self, alpha: float | None = None) -> np.ndarray:
        """Intervals for the effects (t tests only): one row per contrast."""
        if self.kind not in ("t", "z"):
            raise InferenceError("conf_int is for t or z tests, not joint tests")
        a = self.alpha if alpha is None else alpha
        q = (stats.norm.ppf(1 - a / 2) if self.kind == "z"
             else stats.t.ppf(1 - a / 2, self.df_denom))
        return np.column_stack([self.effect - q * self.sd, self.effect + q * self.sd])

    def summary_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def __getitem__(self, key: Any) -> Any:
        return self.table[key]

    def summary(self) -> str:
        head = {"t": "Test for Constraints (t)", "z": "Test for Constraints (z)",
                "F": "F test", "chi2": "Wald test (chi2)"}[self.kind]
        return f"{head}\n{self.table.to_string()}"

    def __str__(self) -> str:
        return self.summary()

    __repr__ = __str__


def contrast_test(res: MixedLMResults, contrast: Any, ddf: str | None = None, rhs: Any = None,
                  alpha: float = 0.05, joint: bool = False, chi2: bool = False) -> ContrastResults:
    """t (z when ddf is None) tests of the rows of a contrast, or one joint F (χ² with
    ``chi2``) test, as statsmodels' contrast results."""
    ddf = normalize_ddf(ddf)
    if joint:
        L, r, _ = _as_contrast(res, contrast, rhs)
        return ContrastResults(f_test(res, L, r, ddf), "chi2" if chi2 else "F", alpha)
    return ContrastResults(t_test(res, contrast, ddf, rhs, alpha), "z" if ddf is None else "t", alpha)


# -- ANOVA ---------------------------------------------------------------------------------------
_LEVEL = re.compile(r"\[[^\]]*\]$")


def term_of(column: str) -> str | None:
    """The formula term a design column belongs to: 'Cu[T.Cu035]' → 'Cu',
    'a[T.x]:b' → 'a:b'; None for the intercept."""
    if column in ("Intercept", "(Intercept)", "const"):
        return None
    return ":".join(_LEVEL.sub("", part) for part in column.split(":"))


def terms(res: MixedLMResults) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for j, name in enumerate(res.model.exog_names):
        t = term_of(name)
        if t is not None:
            out.setdefault(t, []).append(j)
    return out


def anova(res: MixedLMResults, ddf: str | None = "satterthwaite", type: int = 3) -> pd.DataFrame:
    """lmerTest's anova(type=3): one F test per term of the fixed effects (all of the term's
    columns = 0). Terms are read from the column names ('Cu[T.Cu035]' belongs to 'Cu').

    Type 3 tests of a term that is contained in an interaction depend on the contrast coding
    (lmerTest derives special contrasts for treatment coding); they are refused here rather
    than reported differently: test them with t_test and an explicit contrast matrix."""
    if type != 3:
        raise InferenceError(f"only type=3 ANOVA tables are implemented, not type={type!r}")
    ddf = normalize_ddf(ddf)
    tt = terms(res)
    p = res.k_fe
    rows = []
    for name, cols in tt.items():
        parts = set(name.split(":"))
        if any(o != name and parts < set(o.split(":")) for o in tt):
            raise InferenceError(
                f"term {name!r} is contained in an interaction: its type-3 test depends on the "
                "contrast coding and is not implemented; use t_test with an explicit contrast")
        L = np.zeros((len(cols), p))
        L[np.arange(len(cols)), cols] = 1.0
        rows.append(f_test(res, L, None, ddf, name))
    if not rows:
        return pd.DataFrame({"F": [], "num_df": [], "den_df": [], "p": []})
    return pd.concat(rows)


# -- likelihood-ratio tests ----------------------------------------------------------------------
def _same_fixed(a: MixedLMResults, b: MixedLMResults) -> bool:
    Xa, Xb = a.model.exog, b.model.exog
    return Xa.shape == Xb.shape and bool(np.array_equal(Xa, Xb))


def lrtest(*results: MixedLMResults, refit: bool | str = "auto", names: Sequence[str] | None = None
           ) -> pd.DataFrame:
    """Likelihood-ratio tests between nested fits, as lme4's anova(m1, m2, ...): models sorted
    by their number of parameters; df, logLik, AIC, BIC, deviance, chi² = difference of
    deviances (−2 logLik, floored at 0), its df and p.

    refit: 'auto' (default) refits REML fits by ML when the fixed effects differ (a REML
    comparison is then meaningless) and keeps REML when all fits are REML with the same fixed
    effects; True always refits REML fits by ML (lme4's default); False never does."""
    if len(results) < 2:
        raise InferenceError("lrtest needs at least two fitted models")
    from lmefast.results import MixedLMResults

    for r in results:
        if not isinstance(r, MixedLMResults):
            raise InferenceError(f"lrtest takes fitted models (MixedLMResults), not {type(r).__name__}")
    n = {r.nobs for r in results}
    if len(n) > 1:
        raise InferenceError(f"models were not all fitted to the same number of rows: {sorted(n)}")
    y0 = results[0].model.endog
    if not all(np.array_equal(r.model.endog, y0) for r in results[1:]):
        raise InferenceError("models were not all fitted to the same response")
    labels = list(names) if names is not None else [f"model{i + 1}" for i in range(len(results))]
    if len(labels) != len(results):
        raise InferenceError("names must have one entry per model")
    if refit == "auto":
        do_refit = any(not _same_fixed(results[0], r) for r in results[1:])
    else:
        do_refit = bool(refit)
    fits = list(results)
    if do_refit:
        fits = [r.model.fit(reml=False) if r.reml else r for r in fits]
    methods = {r.reml for r in fits}
    if len(methods) > 1:
        raise InferenceError("some models are REML fits and some ML fits: pass refit=True")
    npar = np.array([r.df_modelwc for r in fits])
    order = np.argsort(npar, kind="stable")
    fits = [fits[i] for i in order]
    labels = [labels[i] for i in order]
    npar = npar[order]
    llf = np.array([r.llf for r in fits])
    dev = -2 * llf
    chisq = np.concatenate([[np.nan], np.maximum(0.0, -np.diff(dev))])
    dfc = np.concatenate([[np.nan], np.diff(npar).astype(float)])
    with np.errstate(invalid="ignore"):
        p = np.where(dfc == 0, np.nan, stats.chi2.sf(chisq, np.where(dfc > 0, dfc, np.nan)))
    p[0] = np.nan
    return pd.DataFrame({"npar": npar, "AIC": [r.aic for r in fits], "BIC": [r.bic for r in fits],
                         "logLik": llf, "deviance": dev, "Chisq": chisq, "Df": dfc, "Pr(>Chisq)": p,
                         "method": [r.method for r in fits]}, index=labels)
