"""Several grouping factors (crossed, nested, partially crossed): the blocked Cholesky.

Terms are sorted by levels, largest first (lme4's order, and θ's). The first term's block of
Z'Z is block-diagonal, one k1 × k1 block per level, and is factored level by level in C
(lmefast._multi); the trailing terms share one dense block of q2 = Σ m_j k_j coordinates,
updated by the Schur complement and factored by LAPACK. Every evaluation uses only the
cross-products, computed once from the rows.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg as sla
import scipy.sparse as sp

from lmefast._bfgs import minimize_bounded
from lmefast._multi import (
    apply_A,
    first_factor_backsolve,
    first_factor_grad_blocks,
    first_factor_pass,
)
from lmefast.lmer import Term
from lmefast.objective import ObjectiveError, Solution
from lmefast.optimize import fit_theta
from lmefast.spec import SpecificationError

MAX_DENSE_TRAILING = 12_000
LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class MultiThetaMap:
    """θ = the free entries of each term's T in turn (terms in sorted order)."""

    terms: tuple[Term, ...]

    @cached_property
    def offsets(self) -> np.ndarray:
        sizes = [t.pattern[0].shape[0] for t in self.terms]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def n_theta(self) -> int:
        return int(self.offsets[-1])

    def diagonal_mask(self) -> np.ndarray:
        return np.concatenate([t.pattern[0] == t.pattern[1] for t in self.terms])

    def lower_bounds(self) -> np.ndarray:
        return np.where(self.diagonal_mask(), 0.0, -np.inf)

    def start(self) -> np.ndarray:
        return self.diagonal_mask().astype(float)

    def Ts(self, theta: np.ndarray) -> list[np.ndarray]:
        out = []
        for j, t in enumerate(self.terms):
            T = np.zeros((t.k, t.k))
            T[t.pattern] = theta[self.offsets[j]:self.offsets[j + 1]]
            out.append(T)
        return out


@dataclass(frozen=True)
class MultiCrossProducts:
    """Cross-products for the blocked factorisation (see the module docstring)."""

    S1: np.ndarray          # (m1, k1² + k1 p + k1): [A11_i | B1_i | c1_i]
    ptr: np.ndarray         # (m1 + 1) pairs of level i: ptr[i]:ptr[i+1]
    pair_c0: np.ndarray     # first trailing coordinate of each pair's level
    pair_k: np.ndarray      # its term's k (int32)
    pair_term: np.ndarray   # its trailing term (index into terms[1:])
    pair_voff: np.ndarray   # offset of its k_j × k1 block in A21
    A21: np.ndarray
    A22: sp.csr_matrix      # (q2, q2) sparse: within a factor it is diagonal by levels
    B2: np.ndarray          # (q2, p)
    c2: np.ndarray          # (q2)
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float
    n: int
    trail_c0: np.ndarray    # first coordinate of each trailing term

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])

    @property
    def q2(self) -> int:
        return int(self.c2.shape[0])


def compute_multi_crossprods(y: np.ndarray, X: np.ndarray, terms: list[Term]) -> MultiCrossProducts:
    """All cross-products from the rows (bincount sums over each term's level codes)."""
    n, p = X.shape
    t1, trail = terms[0], terms[1:]
    k1, m1 = t1.k, t1.m
    c1, Z1 = t1.codes, t1.Z
    rec = k1 * k1 + k1 * p + k1
    S1 = np.empty((m1, rec))
    for a in range(k1):
        for b in range(k1):
            S1[:, a * k1 + b] = np.bincount(c1, Z1[:, a] * Z1[:, b], m1)
        for col in range(p):
            S1[:, k1 * k1 + a * p + col] = np.bincount(c1, Z1[:, a] * X[:, col], m1)
        S1[:, k1 * k1 + k1 * p + a] = np.bincount(c1, Z1[:, a] * y, m1)
    sizes = np.array([t.m * t.k for t in trail], dtype=np.int64)
    trail_c0 = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    q2 = int(sizes.sum())
    if q2 > MAX_DENSE_TRAILING:
        names = [t.name for t in trail]
        raise SpecificationError(
            f"the grouping factors after the largest ({names}) have {q2} random effects in all; "
            f"the dense trailing block is limited to {MAX_DENSE_TRAILING} (a sparse "
            "factorisation for larger crossed designs is not implemented yet)")
    coords = [trail_c0[j] + t.codes * t.k for j, t in enumerate(trail)]
    a22_keys, a22_vals = [], []
    B2 = np.zeros((q2, p))
    c2 = np.zeros(q2)
    for j, t in enumerate(trail):
        for a in range(t.k):
            rows = coords[j] + a
            for col in range(p):
                B2[:, col] += np.bincount(rows, t.Z[:, a] * X[:, col], q2)
            c2 += np.bincount(rows, t.Z[:, a] * y, q2)
            for j2, t2 in enumerate(trail):
                for b in range(t2.k):
                    a22_keys.append(rows * q2 + coords[j2] + b)
                    a22_vals.append(t.Z[:, a] * t2.Z[:, b])
    keys22, inv22 = np.unique(np.concatenate(a22_keys), return_inverse=True)
    vals22 = np.bincount(inv22, np.concatenate(a22_vals), keys22.shape[0])
    A22 = sp.csr_matrix((vals22, (keys22 // q2, keys22 % q2)), shape=(q2, q2))
    # pairs: (level of the first factor, level of a trailing factor) that share a row
    level_off = np.concatenate([[0], np.cumsum([t.m for t in trail])]).astype(np.int64)
    n_tl = int(level_off[-1])
    keys = np.concatenate([c1 * n_tl + level_off[j] + t.codes for j, t in enumerate(trail)])
    uniq, inv = np.unique(keys, return_inverse=True)
    pair_i = uniq // n_tl
    tl = uniq % n_tl
    pair_term = np.searchsorted(level_off, tl, side="right") - 1
    ks = np.array([t.k for t in trail], dtype=np.int32)
    pair_k = ks[pair_term]
    pair_c0 = trail_c0[pair_term] + (tl - level_off[pair_term]) * pair_k
    pair_voff = np.concatenate([[0], np.cumsum(pair_k.astype(np.int64) * k1)]).astype(np.int64)
    A21 = np.zeros(int(pair_voff[-1]))
    for j, t in enumerate(trail):
        base = pair_voff[inv[j * n:(j + 1) * n]]
        for a in range(t.k):
            for b in range(k1):
                A21 += np.bincount(base + a * k1 + b, t.Z[:, a] * Z1[:, b], A21.shape[0])
    ptr = np.searchsorted(pair_i, np.arange(m1 + 1)).astype(np.int64)
    return MultiCrossProducts(
        S1=np.ascontiguousarray(S1.ravel()), ptr=ptr, pair_c0=pair_c0.astype(np.int64),
        pair_k=pair_k, pair_term=pair_term.astype(np.int64), pair_voff=pair_voff[:-1].copy(),
        A21=A21, A22=A22, B2=B2, c2=c2, XtX=X.T @ X, Xty=X.T @ y,
        yty=float(y @ y), n=n, trail_c0=trail_c0)


class MultiObjective:
    """θ → the profiled objective for several grouping factors (same interface as
    ProfiledObjective: solve, __call__, value_and_grad, minimize, modes)."""

    def __init__(self, cp: MultiCrossProducts, theta_map: MultiThetaMap, reml: bool) -> None:
        self.cp = cp
        self.theta_map = theta_map
        self.reml = reml
        self.dof = cp.n - cp.p if reml else cp.n
        self.n_evals = 0
        terms = theta_map.terms
        t1 = terms[0]
        self.k1 = t1.k
        m1, p = t1.m, cp.p
        self.L11c = np.empty(m1 * t1.k * t1.k)
        self.Rzx1c = np.empty(m1 * t1.k * p)
        self.rzy1c = np.empty(m1 * t1.k)
        self.L21c = np.empty(cp.A21.shape[0])
        trail = terms[1:]
        self.t_off = np.concatenate([[0], np.cumsum([t.k * t.k for t in trail])]).astype(np.int64)
        self.pair_toff = self.t_off[cp.pair_term]
        self.all_scalar = all(t.k == 1 for t in trail)
        if not self.all_scalar:
            rows, cols, src = [], [], []
            for j, t in enumerate(trail):
                r, c = np.tril_indices(t.k)
                base = cp.trail_c0[j] + np.arange(t.m)[:, None] * t.k
                rows.append((base + r).ravel())
                cols.append((base + c).ravel())
                src.append(np.tile(self.t_off[j] + r * t.k + c, t.m))
            self._lam_idx = (np.concatenate(rows), np.concatenate(cols), np.concatenate(src))
        self._last: tuple | None = None
        coo = cp.A22.tocoo()
        self._a22_coo = (coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data)
        self._M22 = np.empty((cp.q2, cp.q2))
        self._diag = np.arange(cp.q2)
        # first coordinate of each trailing coordinate's level block, and one past its end
        ks = np.concatenate([np.full(t.m * t.k, t.k) for t in trail]) if trail else np.zeros(0, int)
        self._block_start = (np.arange(cp.q2) - (np.arange(cp.q2) - np.repeat(
            cp.trail_c0, [t.m * t.k for t in trail])) % np.maximum(ks, 1)).astype(np.int64)
        self._block_end = self._block_start + ks

    def _lambda2(self, Ttrail: np.ndarray):
        cp = self.cp
        if self.all_scalar:
            trail = self.theta_map.terms[1:]
            return np.repeat(Ttrail, [t.m for t in trail])
        rows, cols, src = self._lam_idx
        return sp.csr_matrix((Ttrail[src], (rows, cols)), shape=(cp.q2, cp.q2))

    def _factor(self, theta: np.ndarray):
        cp, tm = self.cp, self.theta_map
        Ts = tm.Ts(theta)
        T1 = np.ascontiguousarray(Ts[0]).ravel()
        Ttrail = np.concatenate([T.ravel() for T in Ts[1:]]) if len(Ts) > 1 else np.zeros(0)
        lam2 = self._lambda2(Ttrail)
        M22 = self._M22
        M22.fill(0.0)
        if self.all_scalar:
            lam_a22 = self._a22_coo[2] * lam2[self._a22_coo[0]] * lam2[self._a22_coo[1]]
            M22[self._a22_coo[0], self._a22_coo[1]] = lam_a22
            R2x = cp.B2 * lam2[:, None]
            r2y = cp.c2 * lam2
        else:
            prod = (lam2.T @ cp.A22 @ lam2).tocoo()
            M22[prod.row, prod.col] = prod.data
            R2x = np.asarray(lam2.T @ cp.B2)
            r2y = np.asarray(lam2.T @ cp.c2)
        M22[self._diag, self._diag] += 1.0
        R2x = np.ascontiguousarray(R2x)
        r2y = np.ascontiguousarray(r2y)
        p = cp.p
        RzxRzx = np.zeros((p, p))
        Rzxrzy = np.zeros(p)
        logdet1, rr1, status = first_factor_pass(
            cp.S1, self.k1, p, cp.ptr, cp.pair_c0, cp.pair_k, self.pair_toff, cp.pair_voff,
            cp.A21, T1, Ttrail, M22, R2x, r2y, self.L11c, self.Rzx1c, self.rzy1c, self.L21c,
            RzxRzx, Rzxrzy)
        if status:
            raise ObjectiveError(f"block of level {status - 1} of the first factor failed")
        try:
            L22 = sla.cholesky(M22, lower=True, overwrite_a=True, check_finite=False)
        except sla.LinAlgError:
            raise ObjectiveError("the trailing block is not positive definite") from None
        Rzx2 = sla.solve_triangular(L22, R2x, lower=True, check_finite=False)
        rzy2 = sla.solve_triangular(L22, r2y, lower=True, check_finite=False)
        logdet = logdet1 + 2.0 * float(np.sum(np.log(np.diag(L22))))
        RzxRzx += Rzx2.T @ Rzx2
        Rzxrzy += Rzx2.T @ rzy2
        rr = rr1 + float(rzy2 @ rzy2)
        return Ts, lam2, L22, Rzx2, rzy2, logdet, RzxRzx, Rzxrzy, rr

    def solve(self, theta: np.ndarray, want_grad: bool = False) -> Solution:
        theta = np.array(theta, dtype=float)
        self.n_evals += 1
        parts = self._factor(theta)
        logdet, RzxRzx, Rzxrzy, rr = parts[5], parts[6], parts[7], parts[8]
        cp = self.cp
        p = cp.p
        try:
            Lx = np.linalg.cholesky(cp.XtX - RzxRzx) if p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            raise ObjectiveError("fixed-effects columns are linearly dependent") from None
        rhs = cp.Xty - Rzxrzy
        beta = sla.cho_solve((Lx, True), rhs, check_finite=False) if p else np.zeros(0)
        r2 = cp.yty - rr - float(beta @ rhs)
        if not r2 > 0.0:
            raise ObjectiveError("penalised residual sum of squares is not positive")
        dof = self.dof
        obj = logdet + dof * (1.0 + LOG_2PI + np.log(r2 / dof))
        if self.reml and p:
            obj += 2.0 * float(np.sum(np.log(np.diag(Lx))))
        self._last = (theta, parts, beta)
        sol = Solution(theta=theta, objective=float(obj), beta=beta, Lx=Lx, r2=float(r2),
                       logdet_L=logdet, sigma2=float(r2 / dof))
        if want_grad:
            sol = Solution(**{**sol.__dict__, "grad": self._gradient(sol)})
        return sol

    def _solve_u_H(self, beta: np.ndarray, parts: tuple) -> tuple[np.ndarray, np.ndarray]:
        """[u | H] = L⁻ᵀ [rzy − Rzx β | Rzx]: first factor (m1 × k1 × (1+p)), trailing (q2 × (1+p))."""
        cp = self.cp
        p, k1 = cp.p, self.k1
        L22, Rzx2, rzy2 = parts[2], parts[3], parts[4]
        rhs2 = np.column_stack([rzy2 - Rzx2 @ beta, Rzx2])
        X2 = np.ascontiguousarray(sla.solve_triangular(L22, rhs2, lower=True, trans="T",
                                                       check_finite=False))
        Rzx1 = self.Rzx1c.reshape(-1, k1, p)
        X1 = np.concatenate([(self.rzy1c.reshape(-1, k1) - Rzx1 @ beta)[:, :, None], Rzx1], axis=2)
        X1 = np.ascontiguousarray(X1).ravel()
        first_factor_backsolve(k1, p + 1, cp.ptr, cp.pair_c0, cp.pair_k, cp.pair_voff, self.L11c,
                               self.L21c, X1, X2)
        return X1.reshape(-1, k1, p + 1), X2

    def _gradient(self, sol: Solution) -> np.ndarray:
        """∂objective/∂θ (DESIGN.md §2): per term, Σ over its levels of the diagonal blocks of
        2 Z'ZΛM⁻¹ − 2κ s u' − [REML] 2 E C⁻¹ H', where s = Z'(y − Xβ) − Z'ZΛu and
        E = Z'X − Z'ZΛH; M⁻¹'s blocks come from L11, L21 and P22 = (L22 L22')⁻¹."""
        cp, tm = self.cp, self.theta_map
        p, k1 = cp.p, self.k1
        Ts, lam2, L22 = self._last[1][0], self._last[1][1], self._last[1][2]
        terms = tm.terms
        X1, X2 = self._solve_u_H(sol.beta, self._last[1])           # [u | H]
        # V = Λ [u | H]
        V1 = np.ascontiguousarray(np.einsum("ab,ibl->ial", Ts[0], X1)).ravel()
        V2 = np.ascontiguousarray(lam2[:, None] * X2 if self.all_scalar else lam2 @ X2)
        # Y − Z'Z V with Y = [c − Bβ | B]
        out1 = np.empty_like(V1)
        out2 = np.ascontiguousarray(np.asarray(cp.A22 @ V2))
        apply_A(cp.S1, k1, p, cp.ptr, cp.pair_c0, cp.pair_k, cp.pair_voff, cp.A21, p + 1,
                V1, V2, out1, out2)
        S1 = cp.S1.reshape(-1, k1 * k1 + k1 * p + k1)
        B1 = S1[:, k1 * k1:k1 * k1 + k1 * p].reshape(-1, k1, p)
        c1 = S1[:, k1 * k1 + k1 * p:]
        Y1 = np.concatenate([(c1 - B1 @ sol.beta)[:, :, None], B1], axis=2)
        Y2 = np.column_stack([cp.c2 - cp.B2 @ sol.beta, cp.B2])
        R1 = Y1 - out1.reshape(-1, k1, p + 1)                        # [s | E], first factor
        R2 = Y2 - out2                                               # [s | E], trailing
        kappa = self.dof / sol.r2
        # the s u' and E C⁻¹ H' parts, as outer products per coordinate pair of a block
        if p:
            Linv = np.linalg.inv(sol.Lx)
            Cinv = Linv.T @ Linv
        else:
            Cinv = np.zeros((0, 0))
        def data_part(R: np.ndarray, X: np.ndarray) -> np.ndarray:
            """Σ over blocks of −2κ s u' − [REML] 2 F H' (R, X: blocks × k × (1+p))."""
            out = -2.0 * kappa * np.einsum("ia,ib->ab", R[:, :, 0], X[:, :, 0])
            if self.reml and p:
                F = R[:, :, 1:] @ Cinv
                out -= 2.0 * np.einsum("ial,ibl->ab", F, X[:, :, 1:])
            return out
        # P22 and the diagonal blocks of Z'ZΛM⁻¹
        q2 = cp.q2
        P22, info = sla.lapack.dpotri(L22, lower=1)   # lower triangle used; L22 kept for modes
        if info != 0:
            raise ObjectiveError("could not invert the trailing block")
        width = int(np.max(np.add.reduceat(cp.pair_k, cp.ptr[:-1])
                           if cp.pair_k.size else [0], initial=0)) if cp.pair_k.size else 0
        kmax = max([t.k for t in terms[1:]], default=1)
        G1 = np.zeros(k1 * k1)
        G2 = np.zeros((q2, kmax))
        Ttrail = np.concatenate([T.ravel() for T in Ts[1:]]) if len(Ts) > 1 else np.zeros(0)
        first_factor_grad_blocks(cp.S1, k1, p, cp.ptr, cp.pair_c0, cp.pair_k, cp.pair_voff,
                                 self.pair_toff, cp.A21, self.L11c, self.L21c,
                                 np.ascontiguousarray(Ts[0]).ravel(), Ttrail,
                                 np.ascontiguousarray(P22.T), width, G1, G2)
        # diagonal blocks of A22 Λ2 P22: entry (r, b) = Σ_c (A22Λ2)[r, c] P22[c, start(r) + b]
        W = (cp.A22 @ sp.diags(lam2) if self.all_scalar else cp.A22 @ lam2).tocoo()
        for b in range(kmax):
            col = self._block_start[W.row] + b
            ok = col < self._block_end[W.row]
            r, c = W.row[ok], W.col[ok]
            G2[:, b] += np.bincount(r, W.data[ok] * P22[np.maximum(c, col[ok]),
                                                          np.minimum(c, col[ok])], q2)
        grads = [2.0 * G1.reshape(k1, k1) + data_part(R1, X1)]
        for j, t in enumerate(terms[1:]):
            c0, k, m = int(cp.trail_c0[j]), t.k, t.m
            rows = slice(c0, c0 + m * k)
            Gj = G2[rows, :k].reshape(m, k, k).sum(axis=0)
            grads.append(2.0 * Gj + data_part(R2[rows].reshape(m, k, p + 1),
                                               X2[rows].reshape(m, k, p + 1)))
        return np.concatenate([g[t.pattern] for g, t in zip(grads, terms, strict=True)])

    def __call__(self, theta: np.ndarray) -> float:
        try:
            return self.solve(theta).objective
        except ObjectiveError:
            return np.inf

    def gradient(self, sol: Solution) -> np.ndarray:
        return sol.grad if sol.grad is not None else self.solve(sol.theta, want_grad=True).grad

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            sol = self.solve(theta, want_grad=True)
            return sol.objective, sol.grad
        except ObjectiveError:
            return np.inf, np.zeros(self.theta_map.n_theta)

    def minimize(self, theta0: np.ndarray, lower: np.ndarray, *, gtol: float, maxiter: int,
                 on_iter: Callable | None):
        return minimize_bounded(self.value_and_grad, theta0, lower, gtol, maxiter, on_iter)

    def modes(self, sol: Solution) -> list[np.ndarray]:
        """Conditional modes b_j (m_j × k_j) of every term, at the solution."""
        if self._last is None or not np.array_equal(self._last[0], sol.theta):
            self.solve(sol.theta)
        _, parts, beta = self._last
        Ts, lam2 = parts[0], parts[1]
        cp = self.cp
        X1, X2 = self._solve_u_H(beta, parts)
        u1, u2 = X1[:, :, 0], X2[:, 0]
        b1 = u1 @ Ts[0].T
        b2 = lam2 * u2 if self.all_scalar else np.asarray(lam2 @ u2)
        out = [b1]
        for j, t in enumerate(self.theta_map.terms[1:]):
            c0 = cp.trail_c0[j]
            out.append(b2[c0:c0 + t.m * t.k].reshape(t.m, t.k))
        return out


class MultiLM:
    """A linear mixed model with several grouping factors (from ``lmer``)."""

    def __init__(self, y: np.ndarray, X: np.ndarray, terms: list[Term], *, endog_name: str,
                 exog_names: list[str], dropped_exog: tuple[str, ...] = (),
                 statsmodels_group: Any = None, vc_order: tuple[str, ...] = ()) -> None:
        """statsmodels_group / vc_order: set when the model came from statsmodels' one-group
        spelling (the group's label and the variance components in the user's order), so that
        results keep statsmodels' shapes (vcomp, random_effects of the one group)."""
        self.y = y
        self.X = X
        self.terms = tuple(terms)
        self.endog_name = endog_name
        self._exog_names = list(exog_names)
        self.dropped_exog = dropped_exog
        self.statsmodels_group = statsmodels_group
        self.vc_order = tuple(vc_order)
        self.theta_map = MultiThetaMap(self.terms)
        n_re = sum(t.m * t.k for t in terms)
        for t in terms:
            if t.m * t.k >= y.shape[0]:
                raise SpecificationError(
                    f"number of observations ({y.shape[0]}) <= number of random effects "
                    f"({t.m * t.k}) for term (... | {t.name}): the random-effects parameters "
                    "and the residual variance are unidentifiable")
        self.n_random_effects = n_re

    @cached_property
    def crossprods(self) -> MultiCrossProducts:
        return compute_multi_crossprods(self.y, self.X, list(self.terms))

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def k_fe(self) -> int:
        return int(self.X.shape[1])

    @property
    def exog_names(self) -> list[str]:
        return list(self._exog_names)

    @property
    def endog_names(self) -> str:
        return self.endog_name

    def objective(self, reml: bool = True, n_threads: int | None = None) -> MultiObjective:
        return MultiObjective(self.crossprods, self.theta_map, reml)

    def fit(self, reml: bool = True, start_params: np.ndarray | None = None, maxiter: int = 500,
            verbose: bool = False, callback: Callable | None = None, **kwargs: Any):
        from lmefast.results_multi import MultiResults

        obj = self.objective(reml)
        theta0 = self.theta_map.start() if start_params is None else np.asarray(start_params, float)
        if theta0.shape != (self.theta_map.n_theta,):
            raise SpecificationError(f"start_params must have {self.theta_map.n_theta} entries")
        sol, opt = fit_theta(obj, theta0, maxiter=maxiter, verbose=verbose, callback=callback)
        if not opt.converged:
            warnings.warn(f"the optimiser did not converge: {opt.return_code}", stacklevel=2)
        return MultiResults(self, obj, sol, opt)

    def covariance_terms(self, theta: np.ndarray
                         ) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
        """(group, coefficient names, T, free entries of T) per term."""
        out = []
        for t, T in zip(self.terms, self.theta_map.Ts(np.asarray(theta, float)), strict=True):
            free = np.zeros((t.k, t.k), dtype=bool)
            free[t.pattern] = True
            out.append((t.name, list(t.coef_names), T, free))
        return out

    def fitted(self, beta: np.ndarray, modes: list[np.ndarray]) -> np.ndarray:
        fit = self.X @ beta
        for t, b in zip(self.terms, modes, strict=True):
            fit += np.einsum("ij,ij->i", t.Z, b[t.codes])
        return fit

    def random_effects_frames(self, modes: list[np.ndarray]) -> dict[str, pd.DataFrame]:
        return {t.name: pd.DataFrame(b, index=pd.Index(t.labels, name=t.name),
                                     columns=list(t.coef_names))
                for t, b in zip(self.terms, modes, strict=True)}
