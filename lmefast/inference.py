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
groups at a time; refused above KR_MAX_GROUP_ROWS rows in one group or KR_MAX_FLOPS work.

Kenward-Roger with several grouping factors (crossed or nested, lmefast.multi.MultiLM): V is
not block-diagonal, but V = σ²(I + ZΛΛ'Z') so every quantity above is a product of the q × q
cross-products Z'Z, Z'X, X'X and S = Λ(Λ'Z'ZΛ + I)⁻¹Λ' (Woodbury), q = Σ_j m_j k_j the number
of random effects: W = Z'V⁻¹Z = σ⁻²(Z'Z − Z'Z S Z'Z), Z'V⁻¹X, Z'V⁻²Z, tr V⁻² etc., and a
parameter's G_r = Z D_r Z' only selects rows and columns of them. No n × n matrix is formed.
Cost: one pass over the rows for Z'Z (O(n (Σk_j)²)), then O(q³) for S and the q × q products
and O(R² (m² + m p + p²)) for the traces (m the levels of the factors involved); memory about
eight dense q × q matrices (q = 2,000: 2.6 s on 2 cores). Refused above KR_MAX_RANDOM_EFFECTS (q).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults

DDF_METHODS = ("satterthwaite", "kenward-roger", "residual", None)
KR_MAX_GROUP_ROWS = 5_000          # rows in one group (an n_i × n_i inverse per group)
KR_MAX_FLOPS = 2e11                # estimated floating-point work of the Kenward-Roger pass
_KR_CHUNK_ELEMENTS = 4_000_000     # n_i × n_i entries held per chunk of groups and matrix
KR_MAX_RANDOM_EFFECTS = 4_000      # several factors: q = Σ m_j k_j (dense q × q matrices)


class InferenceError(ValueError):
    """A test or interval that cannot be computed as asked (the message says why)."""


def _cache(res: MixedLMResults) -> dict:
    return res.__dict__.setdefault("_inference_cache", {})


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
    cache = _cache(res)
    if "satt" not in cache:
        obj = res._objective
        varpar = np.concatenate([res.theta, [res.sigma]])
        h = _steps(varpar, 1e-2, 0.05)
        H = hessian(lambda v: varpar_deviance(obj, v), varpar, h)
        try:
            A = 2.0 * np.linalg.inv(H)
        except np.linalg.LinAlgError:
            A = 2.0 * np.linalg.pinv(H)
        p = res.k_fe
        J = jacobian(lambda v: _vcov_beta_at(obj, v).ravel(), varpar, h).reshape(p, p, -1)
        cache["satt"] = (A, J)
    return cache["satt"]


def satterthwaite_df(res: MixedLMResults, L: np.ndarray) -> float:
    """Satterthwaite df of one contrast l (length p)."""
    A, J = satterthwaite_parts(res)
    L = np.asarray(L, dtype=float)
    var = float(L @ res._cov_fe @ L)
    g = np.einsum("i,ijk,j->k", L, J, L)
    denom = float(g @ A @ g)
    if denom <= 0:
        return np.inf
    return 2.0 * var * var / denom


# -- Kenward-Roger ------------------------------------------------------------------------------
def _is_multi(res: MixedLMResults) -> bool:
    """A model with several grouping factors (lmefast.multi.MultiLM)."""
    return hasattr(res.model, "terms") and not hasattr(res.model, "spec")


def _kr_spec(res: MixedLMResults):
    """The one-grouping-factor ModelSpec (rows, Zre, layout) Kenward-Roger needs."""
    spec = res.model.spec
    if not all(hasattr(spec, a) for a in ("Zre", "group_codes", "layout")):
        raise InferenceError("Kenward-Roger is implemented for one grouping factor only; "
                             "use ddf='satterthwaite'")
    return spec


def _kr_params(res: MixedLMResults) -> tuple[list[np.ndarray], np.ndarray, int]:
    """The covariance parameters γ (pbkrtest's order does not matter): per parameter the
    (qmax × qmax) pattern D_r of the term's covariance, as a function of the coordinate's
    component, and the current values. Returns (patterns for the k×k block, vc list, R)."""
    k = res.k_re
    rows, cols = np.tril_indices(k)
    pats = []
    for r, c in zip(rows, cols, strict=True):
        D = np.zeros((k, k))
        D[r, c] = D[c, r] = 1.0
        pats.append(D)
    return pats, np.arange(res.k_vc), len(pats) + res.k_vc + 1


def kenward_roger_parts(res: MixedLMResults) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(PhiA, P, W) of pbkrtest's vcovAdj: the adjusted covariance of β̂, the P_r matrices and
    W = 2 IE2⁻¹ (IE2 the expected REML information of γ). Cached on the results object."""
    cache = _cache(res)
    if "kr" in cache:
        return cache["kr"]
    if not res.reml:
        raise InferenceError("Kenward-Roger's method is only available for REML fits "
                             "(as in pbkrtest/lmerTest): refit with reml=True")
    if _is_multi(res):
        cache["kr"] = _kr_multi(res)
        return cache["kr"]
    spec = _kr_spec(res)
    lay = spec.layout
    codes = spec.group_codes
    m, n, p, k = spec.n_groups, spec.nobs, spec.k_fe, res.k_re
    sizes = np.bincount(codes, minlength=m)
    nmax = int(sizes.max())
    pats, vcs, R = _kr_params(res)
    flops = float(np.sum(sizes.astype(float) ** 3)) * 4 + R * R * float(
        np.sum(sizes.astype(float) ** 2 * (sizes + p)))
    if nmax > KR_MAX_GROUP_ROWS or flops > KR_MAX_FLOPS:
        raise InferenceError(
            f"Kenward-Roger needs per-group {nmax} × {nmax} inverses and about {flops:.2g} "
            f"floating-point operations (O(Σ n_i³ + R² Σ n_i²(n_i + p)), R = {R} covariance "
            f"parameters); the limits are {KR_MAX_GROUP_ROWS} rows per group and {KR_MAX_FLOPS:.0e} "
            "operations: use ddf='satterthwaite' (cost independent of the number of rows)")
    sigma2 = res.scale
    T, tvc = res.model.spec.theta_map.split(res.theta)
    cov_k = sigma2 * (T @ T.T)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n) - starts[codes[order]]
    q = np.diff(lay.q_off)
    qmax = int(q.max())
    ne = lay.vc_val.shape[0]
    Ktr = np.zeros((R, R))
    P = [np.zeros((p, p)) for _ in range(R)]
    Q = {(r, s): np.zeros((p, p)) for r in range(R) for s in range(r, R)}
    per_group = nmax * nmax * (R + 4) + nmax * qmax
    chunk = max(1, _KR_CHUNK_ELEMENTS // max(per_group, 1))
    for g0 in range(0, m, chunk):
        g1 = min(m, g0 + chunk)
        mc = g1 - g0
        rows_c = order[starts[g0]:starts[g1]]
        gi = codes[rows_c] - g0
        pi = pos[rows_c]
        Z = np.zeros((mc, nmax, qmax))
        X = np.zeros((mc, nmax, p))
        mask = np.zeros((mc, nmax))
        mask[gi, pi] = 1.0
        X[gi, pi] = spec.X[rows_c]
        if k:
            Z[gi, pi, :k] = spec.Zre[rows_c]
        for e in range(ne):
            val = lay.vc_val[e, rows_c]
            nz = val != 0
            Z[gi[nz], pi[nz], lay.vc_coord[e, rows_c][nz]] = val[nz]
        # the variance component of each (group, coordinate); −1 for the k coefficients/padding
        local = np.arange(qmax)
        valid = (local[None, :] >= k) & (local[None, :] < q[g0:g1, None])
        gidx = np.minimum(lay.q_off[g0:g1, None] + local[None, :], lay.comp.shape[0] - 1)
        comp = np.where(valid, lay.comp[gidx], -1)
        # Ψ per group
        Psi = np.zeros((mc, qmax, qmax))
        Psi[:, :k, :k] = cov_k
        diag_vc = np.where(comp >= 0, sigma2 * np.concatenate([tvc**2, [0.0]])[comp], 0.0)
        idx = np.arange(qmax)
        Psi[:, idx, idx] += diag_vc
        V = Z @ Psi @ Z.transpose(0, 2, 1)
        ii = np.arange(nmax)
        V[:, ii, ii] += sigma2 * mask + (1.0 - mask)
        Vi = np.linalg.inv(V)
        Vi[:, ii, ii] -= (1.0 - mask)  # padded rows: no contribution
        Vi *= mask[:, :, None] * mask[:, None, :]
        G = []
        for D in pats:
            Dq = np.zeros((qmax, qmax))
            Dq[:k, :k] = D
            G.append(Z @ Dq @ Z.transpose(0, 2, 1))
        for c in vcs:
            w = (comp == c).astype(float)
            G.append((Z * w[:, None, :]) @ Z.transpose(0, 2, 1))
        G.append(None)  # residual: the identity on the group's rows
        H = [Vi if Gr is None else Gr @ Vi for Gr in G]
        TT = Vi @ X
        HX = [Hr @ X for Hr in H]
        ViHX = [Vi @ Or for Or in HX]
        for r in range(R):
            P[r] -= np.einsum("gia,gib->ab", HX[r], TT)
            for s in range(r, R):
                Ktr[r, s] += np.einsum("gij,gji->", H[r], H[s])
                Q[(r, s)] += np.einsum("gia,gib->ab", HX[r], ViHX[s])
    cache["kr"] = _kr_finish(res, Ktr, P, Q)
    return cache["kr"]


def _kr_finish(res: MixedLMResults, Ktr: np.ndarray, P: list[np.ndarray], Q: dict
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """pbkrtest's vcovAdj from the traces tr(G_r V⁻¹ G_s V⁻¹) (upper triangle), the P_r and the
    Q_rs (r ≤ s)."""
    R = len(P)
    p = res.k_fe
    Ktr = np.triu(Ktr) + np.triu(Ktr, 1).T
    P = [0.5 * (Pr + Pr.T) for Pr in P]
    Phi = res._cov_fe
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


def _kr_multi(res: MixedLMResults) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Kenward-Roger for several grouping factors, in the space of the q random effects (see
    the module docstring)."""
    import scipy.sparse as sp
    from scipy.linalg import cho_factor, cho_solve

    model = res.model
    terms = model.terms
    sizes = [t.m * t.k for t in terms]
    q = int(sum(sizes))
    if q > KR_MAX_RANDOM_EFFECTS:
        raise InferenceError(
            f"Kenward-Roger with several grouping factors uses dense q × q matrices of the q = {q} "
            f"random effects (O(q³) time, about 8 q² doubles of memory); the limit is "
            f"KR_MAX_RANDOM_EFFECTS = {KR_MAX_RANDOM_EFFECTS}: use ddf='satterthwaite' (cost "
            "independent of the number of rows)")
    n, p = model.nobs, model.k_fe
    X = model.X
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows, cols, vals = [], [], []
    for j, t in enumerate(terms):
        for a in range(t.k):
            rows.append(np.arange(n))
            cols.append(off[j] + t.codes * t.k + a)
            vals.append(t.Z[:, a])
    Z = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, q))
    A = (Z.T @ Z).toarray()
    B = np.asarray(Z.T @ X)
    XtX = X.T @ X
    Lam = sp.block_diag([sp.kron(sp.identity(t.m), T) for t, T in
                         zip(terms, model.theta_map.Ts(res.theta), strict=True)], format="csr")
    LtA = np.asarray(Lam.T @ A)                  # Λ'A
    M = np.asarray(Lam.T @ LtA.T)                # Λ'AΛ (symmetric)
    del LtA
    M = 0.5 * (M + M.T)
    M[np.diag_indices(q)] += 1.0
    S = np.asarray(Lam @ cho_solve(cho_factor(M, lower=True), Lam.T.toarray()))
    del M
    S = 0.5 * (S + S.T)                          # Λ (Λ'AΛ + I)⁻¹ Λ'
    s2 = res.scale
    SA = S @ A
    SB = S @ B
    W = (A - A @ SA) / s2                        # Z'V⁻¹Z
    W = 0.5 * (W + W.T)
    E = (B - A @ SB) / s2                        # Z'V⁻¹X
    K = (np.eye(q) - SA) / s2                    # V⁻¹Z = Z K
    U = K.T @ A @ K                              # Z'V⁻²Z
    F = K.T @ E                                  # Z'V⁻²X
    XV2X = (XtX - 2 * B.T @ SB + SB.T @ A @ SB) / s2 ** 2
    XV3X = (XV2X - E.T @ S @ E) / s2
    trV2 = (n - 2 * np.trace(SA) + np.sum(SA * SA.T)) / s2 ** 2
    # the covariance parameters: per term the free entries (a, b) of its covariance matrix;
    # D_r = Σ_t e_{x_t} e_{y_t}' over the term's levels (both orders for a ≠ b)
    idx = []
    for j, t in enumerate(terms):
        base = off[j] + np.arange(t.m) * t.k
        for a, b in zip(t.pattern[0].tolist(), t.pattern[1].tolist(), strict=True):
            xr, yr = base + a, base + b
            idx.append((xr, yr) if a == b else (np.concatenate([xr, yr]), np.concatenate([yr, xr])))
    R = len(idx) + 1
    Ktr = np.zeros((R, R))
    P = [np.zeros((p, p)) for _ in range(R)]
    Q = {}
    for r, (xr, yr) in enumerate(idx):
        P[r] = -(E[xr].T @ E[yr])
        for s_, (xs, ys) in enumerate(idx[r:], start=r):
            Wrs = W[np.ix_(yr, xs)]
            Ktr[r, s_] = np.sum(Wrs * W[np.ix_(ys, xr)].T)
            Q[(r, s_)] = E[xr].T @ Wrs @ E[ys]
        Ktr[r, R - 1] = np.sum(U[yr, xr])
        Q[(r, R - 1)] = E[xr].T @ F[yr]
    P[R - 1] = -XV2X
    Ktr[R - 1, R - 1] = trV2
    Q[(R - 1, R - 1)] = XV3X
    return _kr_finish(res, Ktr, P, Q)


def _kr_stats(res: MixedLMResults, L: np.ndarray) -> tuple[float, float, float]:
    """pbkrtest's .KR_adjust for the rows of L: (ddf, F scaling, A2/q)."""
    PhiA, P, W = kenward_roger_parts(res)
    Phi = res._cov_fe
    L = np.atleast_2d(np.asarray(L, dtype=float))
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
    return kenward_roger_parts(res)[0] if ddf == "kenward-roger" else res._cov_fe


def _t_rows(res: MixedLMResults, L: np.ndarray, rhs: np.ndarray, ddf: str | None, alpha: float,
            names: Sequence[str]) -> pd.DataFrame:
    C = _vcov(res, ddf)
    beta = res._sol.beta
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
            raise InferenceError(f"contrast matrix must have {p} columns (one per fixed effect "
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
    beta = res._sol.beta
    if np.any(rhs != 0):
        beta = beta - np.linalg.pinv(L) @ rhs
    C = res._cov_fe
    if ddf == "kenward-roger":
        df2, scaling, q = _kr_stats(res, L)
        PhiA = kenward_roger_parts(res)[0]
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
def _data(res: MixedLMResults):
    """The object holding the model's y and X: the spec (one factor) or the MultiLM itself."""
    return getattr(res.model, "spec", res.model)


def _same_fixed(a: MixedLMResults, b: MixedLMResults) -> bool:
    Xa, Xb = _data(a).X, _data(b).X
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
    y0 = _data(results[0]).y
    if not all(np.array_equal(_data(r).y, y0) for r in results[1:]):
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
