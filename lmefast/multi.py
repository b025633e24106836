"""Several grouping factors (crossed, nested, partially crossed): the blocked Cholesky.

Terms are sorted by levels, largest first (lme4's order, and θ's). The first term's block of
Z'Z is block-diagonal, one k1 × k1 block per level, and is factored level by level in C
(lmefast._multi); the trailing terms share one dense block of q2 = Σ m_j k_j coordinates,
updated by the Schur complement and factored by LAPACK. Every evaluation uses only the
cross-products, computed once from the rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmefast._multi import MultiKernel
from lmefast.checks import check_identifiable
from lmefast.design import design, level_index
from lmefast.engine import CovarianceTerm, Engine
from lmefast.errors import InferenceError, ObjectiveError, PredictionError, SpecificationError
from lmefast.objective import KernelObjective, Solution, relative_factor, relative_scalars
from lmefast.parallel import default_threads
from lmefast.structure import Term, ThetaMap

MAX_DENSE_TRAILING = 12_000


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
    #: Σ log wᵢ of prior weights (lme4 subtracts it from the deviance; 0 without weights)
    log_weights: float = 0.0

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])

    @property
    def q2(self) -> int:
        return int(self.c2.shape[0])

    def scalar_moments(self, terms: list) -> tuple[np.ndarray, float] | None:
        """Moment estimates (ψ_j per term, σ²) for several grouping factors with one random
        coefficient each (``scalar_moments_many`` with this response)."""
        if any(t.k != 1 for t in terms):
            return None
        p = self.p
        c1 = self.S1.reshape(terms[0].m, 2 + p)[:, 1 + p]
        est = self.scalar_moments_many(terms, c1[:, None], self.c2[:, None], self.Xty[:, None],
                                       np.array([self.yty]))
        return None if est is None else (est[0][:, 0], float(est[1][0]))

    def scalar_moments_many(self, terms: list, Z1y: np.ndarray, Z2y: np.ndarray, XtY: np.ndarray,
                            yty: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Moment estimates (ψ_j per term: J × m, σ²: m) for m responses on this design, each
        given by its parts Z_1'y (m1 × m), trailing Z'y (q2 × m), X'y (p × m), y'y (m); several
        grouping factors with one random coefficient each, else None. With r = (I − H)y the
        OLS residuals, u_j = Z_j'r and C_jl = Z_j'Z_l,
        E[u_j'u_j] = Σ_l ψ_l ‖Z_j'(I − H)Z_l‖² + σ² tr(Z_j'(I − H)Z_j) and
        E[r'r] = Σ_l ψ_l tr(Z_l'(I − H)Z_l) + (n − p) σ², where
        Z_j'(I − H)Z_l = C_jl − B_j (X'X)⁻¹ B_l': one linear system of J + 1 equations, whose
        matrix is the design's and whose right-hand side is each response's."""
        J, p = len(terms), self.p
        if any(t.k != 1 for t in terms):
            return None
        try:
            W = np.linalg.inv(self.XtX)
        except np.linalg.LinAlgError:
            return None
        beta = W @ XtY
        rr = yty - 2.0 * np.einsum("lm,lm->m", beta, XtY) + np.einsum("lm,lm->m", beta, self.XtX @ beta)
        rec = self.S1.reshape(terms[0].m, 2 + p)
        a, B = [rec[:, 0]], [rec[:, 1:1 + p]]
        u = [Z1y - B[0] @ beta]
        diag22, u2 = self.A22.diagonal(), Z2y - self.B2 @ beta
        for c0, t in zip(self.trail_c0, terms[1:], strict=True):
            a.append(diag22[c0:c0 + t.m])
            B.append(self.B2[c0:c0 + t.m])
            u.append(u2[c0:c0 + t.m])
        BW = [b @ W for b in B]
        P = [W @ (b.T @ b) for b in B]
        G = np.array([[np.sum(Pj * Pi.T) for Pi in P] for Pj in P])
        for j in range(J):
            G[j, j] += a[j] @ a[j] - 2.0 * a[j] @ np.einsum("ij,ij->i", BW[j], B[j])
        # pairs (level of the first factor, level of a trailing one): A21, one value per pair
        first = np.repeat(np.arange(terms[0].m), np.diff(self.ptr))
        for j in range(1, J):
            sel = self.pair_term == j - 1
            c = self.A21[self.pair_voff[sel]]
            h = np.einsum("ij,ij->i", BW[0][first[sel]], self.B2[self.pair_c0[sel]])
            G[0, j] += c @ c - 2.0 * c @ h
            G[j, 0] = G[0, j]
        if J > 2:   # pairs of levels of two trailing factors: off-diagonal A22
            coo = self.A22.tocoo()
            term_of = np.repeat(np.arange(1, J), [t.m for t in terms[1:]])
            tr, tc = term_of[coo.row], term_of[coo.col]
            off = tr != tc
            c = coo.data[off]
            h = np.einsum("ij,ij->i", self.B2[coo.row[off]] @ W, self.B2[coo.col[off]])
            np.add.at(G, (tr[off], tc[off]), c * c - 2.0 * c * h)
        tr_j = np.array([x.sum() - np.trace(Pj) for x, Pj in zip(a, P, strict=True)])
        M = np.empty((J + 1, J + 1))
        M[:J, :J] = G
        M[:J, J] = M[J, :J] = tr_j
        M[J, J] = self.n - p
        rhs = np.vstack([np.einsum("lm,lm->m", x, x) for x in u] + [rr[None, :]])
        try:
            sol = np.linalg.solve(M, rhs)
        except np.linalg.LinAlgError:
            return None
        return sol[:J], sol[J]

    def with_response(self, S1_y: np.ndarray, c2: np.ndarray, Xty: np.ndarray, yty: float,
                      k1: int) -> MultiCrossProducts:
        """The same design with another response: the first factor's Z_1'y (m1 × k1), the
        trailing Z'y, X'y and y'y replaced."""
        S1 = self.S1.reshape(S1_y.shape[0], -1).copy()
        S1[:, -k1:] = S1_y
        return replace(self, S1=S1.ravel(), c2=np.ascontiguousarray(c2),
                       Xty=np.ascontiguousarray(Xty), yty=float(yty))

    def keep_fixed(self, keep: np.ndarray, k1: int) -> MultiCrossProducts:
        """The cross-products with only the ``keep`` columns of X."""
        p = self.p
        rec = k1 * k1 + k1 * p + k1
        S1 = self.S1.reshape(-1, rec)
        B = S1[:, k1 * k1:k1 * k1 + k1 * p].reshape(-1, k1, p)[:, :, keep]
        S0 = np.concatenate([S1[:, :k1 * k1], B.reshape(S1.shape[0], -1), S1[:, k1 * k1 + k1 * p:]], axis=1)
        return replace(self, S1=np.ascontiguousarray(S0.ravel()),
                       B2=np.ascontiguousarray(self.B2[:, keep]),
                       XtX=np.ascontiguousarray(self.XtX[np.ix_(keep, keep)]),
                       Xty=np.ascontiguousarray(self.Xty[keep]))

    def with_fixed_map(self, N: np.ndarray, d: np.ndarray, k1: int) -> MultiCrossProducts:
        """β = d + Nγ: the design X N and the response y − X d."""
        p = self.p
        rec = k1 * k1 + k1 * p + k1
        S1 = self.S1.reshape(-1, rec)
        B = S1[:, k1 * k1:k1 * k1 + k1 * p].reshape(-1, k1, p)
        c1 = S1[:, k1 * k1 + k1 * p:] - B @ d
        S0 = np.concatenate([S1[:, :k1 * k1], (B @ N).reshape(S1.shape[0], -1), c1], axis=1)
        XtX = self.XtX
        return replace(self, S1=np.ascontiguousarray(S0.ravel()),
                       B2=np.ascontiguousarray(self.B2 @ N),
                       c2=np.ascontiguousarray(self.c2 - self.B2 @ d),
                       XtX=np.ascontiguousarray(N.T @ XtX @ N),
                       Xty=np.ascontiguousarray(N.T @ (self.Xty - XtX @ d)),
                       yty=float(self.yty - 2 * d @ self.Xty + d @ XtX @ d))

    def without_fixed(self, j: int, value: float, k1: int) -> MultiCrossProducts:
        """β_j held at value: column j of X removed, value · x_j taken from the response."""
        p = self.p
        rec = k1 * k1 + k1 * p + k1
        S1 = self.S1.reshape(-1, rec)
        B = S1[:, k1 * k1:k1 * k1 + k1 * p].reshape(-1, k1, p)
        keep = [c for c in range(p) if c != j]
        c1 = S1[:, k1 * k1 + k1 * p:] - value * B[:, :, j]
        S0 = np.concatenate([S1[:, :k1 * k1], B[:, :, keep].reshape(S1.shape[0], -1), c1], axis=1)
        XtX = self.XtX
        return replace(self, S1=np.ascontiguousarray(S0.ravel()),
                       B2=np.ascontiguousarray(self.B2[:, keep]),
                       c2=np.ascontiguousarray(self.c2 - value * self.B2[:, j]),
                       XtX=np.ascontiguousarray(XtX[np.ix_(keep, keep)]),
                       Xty=np.ascontiguousarray(self.Xty[keep] - XtX[keep, j] * value),
                       yty=float(self.yty - 2 * value * self.Xty[j] + value * value * XtX[j, j]))


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on 1e6 keys)."""
    s = np.sort(a)
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if s.size else s


def pair_keys(terms: list[Term]) -> np.ndarray:
    """The (level of the first factor, level of a trailing factor) pairs that share a row, as
    sorted unique keys i · L + (offset of the factor's levels) + level, L = all trailing levels."""
    trail = terms[1:]
    level_off = np.concatenate([[0], np.cumsum([t.m for t in trail])]).astype(np.int64)
    n_tl = int(level_off[-1])
    return sorted_unique(np.concatenate([terms[0].codes * n_tl + level_off[j] + t.codes
                                         for j, t in enumerate(trail)]))


@dataclass
class MultiSums:
    """The additive part of the cross-products for given pairs: sums over rows, so chunks of
    rows (Parquet row groups, Dask partitions) are added with `+`."""

    S1: np.ndarray
    A21: np.ndarray
    a22_keys: np.ndarray
    a22_vals: np.ndarray
    B2: np.ndarray
    c2: np.ndarray
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float
    n: int

    def __add__(self, other: MultiSums) -> MultiSums:
        keys, inv = np.unique(np.concatenate([self.a22_keys, other.a22_keys]), return_inverse=True)
        vals = np.bincount(inv, np.concatenate([self.a22_vals, other.a22_vals]), keys.shape[0])
        return MultiSums(self.S1 + other.S1, self.A21 + other.A21, keys, vals,
                         self.B2 + other.B2, self.c2 + other.c2, self.XtX + other.XtX,
                         self.Xty + other.Xty, self.yty + other.yty, self.n + other.n)


def trailing_offsets(terms: list[Term]) -> tuple[np.ndarray, int]:
    sizes = np.array([t.m * t.k for t in terms[1:]], dtype=np.int64)
    q2 = int(sizes.sum())
    if q2 > MAX_DENSE_TRAILING:
        names = [t.name for t in terms[1:]]
        raise SpecificationError(
            f"the grouping factors after the largest ({names}) have {q2} random effects in all; "
            f"the dense trailing block is limited to {MAX_DENSE_TRAILING} (a sparse "
            "factorisation for larger crossed designs is not implemented yet)")
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), q2


def _pair_voff(keys: np.ndarray, terms: list[Term]) -> np.ndarray:
    trail = terms[1:]
    level_off = np.concatenate([[0], np.cumsum([t.m for t in trail])]).astype(np.int64)
    tl = keys % int(level_off[-1])
    ks = np.array([t.k for t in trail], dtype=np.int64)[np.searchsorted(level_off, tl, side="right") - 1]
    return np.concatenate([[0], np.cumsum(ks * terms[0].k)]).astype(np.int64)


def multi_sums(y: np.ndarray, X: np.ndarray, terms: list[Term], keys: np.ndarray) -> MultiSums:
    """The sums over these rows (terms' codes are global; `keys` are all pairs, from pair_keys
    of every chunk): bincounts over each term's level codes."""
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
    trail_c0, q2 = trailing_offsets(terms)
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
    level_off = np.concatenate([[0], np.cumsum([t.m for t in trail])]).astype(np.int64)
    n_tl = int(level_off[-1])
    voff = _pair_voff(keys, terms)
    A21 = np.zeros(int(voff[-1]))
    for j, t in enumerate(trail):
        base = voff[np.searchsorted(keys, c1 * n_tl + level_off[j] + t.codes)]
        for a in range(t.k):
            for b in range(k1):
                A21 += np.bincount(base + a * k1 + b, t.Z[:, a] * Z1[:, b], A21.shape[0])
    return MultiSums(S1, A21, keys22, vals22, B2, c2, X.T @ X, X.T @ y, float(y @ y), n)


def assemble_crossprods(sums: MultiSums, terms: list[Term], keys: np.ndarray) -> MultiCrossProducts:
    """The blocked layout (pairs grouped by first-factor level) around the sums."""
    trail = terms[1:]
    trail_c0, q2 = trailing_offsets(terms)
    level_off = np.concatenate([[0], np.cumsum([t.m for t in trail])]).astype(np.int64)
    n_tl = int(level_off[-1])
    pair_i, tl = keys // n_tl, keys % n_tl
    pair_term = np.searchsorted(level_off, tl, side="right") - 1
    pair_k = np.array([t.k for t in trail], dtype=np.int32)[pair_term]
    pair_c0 = trail_c0[pair_term] + (tl - level_off[pair_term]) * pair_k
    voff = _pair_voff(keys, terms)
    A22 = sp.csr_matrix((sums.a22_vals, (sums.a22_keys // q2, sums.a22_keys % q2)), shape=(q2, q2))
    return MultiCrossProducts(
        S1=np.ascontiguousarray(sums.S1.ravel()),
        ptr=np.searchsorted(pair_i, np.arange(terms[0].m + 1)).astype(np.int64),
        pair_c0=pair_c0.astype(np.int64), pair_k=pair_k, pair_term=pair_term.astype(np.int64),
        pair_voff=voff[:-1].copy(), A21=sums.A21, A22=A22, B2=sums.B2, c2=sums.c2,
        XtX=sums.XtX, Xty=sums.Xty, yty=sums.yty, n=sums.n, trail_c0=trail_c0)


def compute_multi_crossprods(y: np.ndarray, X: np.ndarray, terms: list[Term]) -> MultiCrossProducts:
    """All cross-products from the rows (in memory: the rows are one chunk)."""
    keys = pair_keys(terms)
    return assemble_crossprods(multi_sums(y, X, terms, keys), terms, keys)


class MultiObjective(KernelObjective):
    """θ → the profiled objective for several grouping factors, evaluated by the C kernel
    lmefast._multi.MultiKernel (its blocks are the first factor's levels, then the trailing
    block, reported as a level beyond the last)."""

    # an evaluation costs far more per block than one factor's (the trailing block's
    # factorisation and its level loops): the moment start pays from ~50 blocks (a 100 × 6
    # crossed design: 16.9 → 9.7 evaluations, 1.12 → 0.95 ms per fit with df)
    moment_start_blocks = 50

    block_name = "level of the first factor"
    lazy_gradient = True

    @property
    def n_blocks(self) -> int:
        return int(self.cp.ptr.shape[0] - 1 + self.cp.q2)

    def moment_theta(self) -> np.ndarray | None:
        """√(ψ_j/σ²) per term from moment estimates (terms of one coefficient only)."""
        est = self.cp.scalar_moments(list(self.terms))
        rel = None if est is None else relative_factor(np.diag(est[0]), est[1])
        return None if rel is None else np.sqrt(np.diag(rel))

    def __init__(self, cp: MultiCrossProducts, terms: tuple[Term, ...], reml: bool,
                 n_threads: int | None = None) -> None:
        self.cp = cp
        self.terms = terms
        self.theta_map = ThetaMap.of_terms(terms)
        self.reml = reml
        self.dof = cp.n - cp.p if reml else cp.n
        trail = terms[1:]
        t_off = np.concatenate([[0], np.cumsum([t.k * t.k for t in terms])]).astype(np.int64)
        sizes = [t.m * t.k for t in trail]
        bterm = np.repeat(np.arange(1, len(terms), dtype=np.int32), sizes)
        bk = np.repeat(np.array([t.k for t in trail], dtype=np.int32), sizes)
        local = np.arange(cp.q2) - np.repeat(cp.trail_c0, sizes)
        bstart = (np.arange(cp.q2) - local % bk).astype(np.int64)
        coo = cp.A22.tocoo()
        arrays = (t_off[1 + cp.pair_term].astype(np.int64), bstart, bk,
                  t_off[bterm].astype(np.int64), bterm, coo.row.astype(np.int64),
                  coo.col.astype(np.int64), np.ascontiguousarray(coo.data, dtype=float))
        per_level = np.add.reduceat(cp.pair_k, cp.ptr[:-1]) if cp.pair_k.size else np.zeros(1)
        per_level = np.where(np.diff(cp.ptr) > 0, per_level, 0)
        th_term = np.concatenate([np.full(t.pattern[0].shape[0], j, dtype=np.int32)
                                  for j, t in enumerate(terms)])
        th_row = np.concatenate([t.pattern[0] for t in terms]).astype(np.int32)
        th_col = np.concatenate([t.pattern[1] for t in terms]).astype(np.int32)
        self._kernel_args = (
            arrays, terms[0].k, cp.p, cp.q2, max(t.k for t in trail), int(per_level.max()),
            th_term, th_row, th_col, t_off, np.array([t.k for t in terms], dtype=np.int32),
            reml, default_threads(terms[0].m) if n_threads is None else n_threads)
        self.kernel = MultiKernel(cp, *self._kernel_args)

    def _respond(self, cp: MultiCrossProducts) -> MultiObjective:
        self.kernel.set_response(cp)
        self.cp = cp
        return self

    def with_crossprods(self, cp: MultiCrossProducts) -> MultiObjective:
        """The same objective on cross-products that differ from these in the response parts
        only (Z'y, X'y, y'y): the layout's arrays are shared, only the kernel is new."""
        obj = object.__new__(MultiObjective)
        obj.__dict__.update(self.__dict__)
        obj.cp = cp
        obj.kernel = MultiKernel(cp, *self._kernel_args)
        return obj

    def conditional_variances(self, sol: Solution) -> list[np.ndarray]:
        """Conditional covariances σ²Λ_j (M⁻¹)_ℓℓ Λ_j' of every level ℓ of every term j
        (lme4's condVar): one (m_j, k_j, k_j) array per term."""
        try:
            M1, B2 = self.kernel.conditional_variances(sol.theta)
        except FloatingPointError as exc:
            raise ObjectiveError(str(exc)) from None
        Ts = self.theta_map.Ts(sol.theta)
        out = [sol.sigma2 * np.einsum("ab,ibc,dc->iad", Ts[0], M1, Ts[0])]
        for j, t in enumerate(self.terms[1:]):
            c0 = self.cp.trail_c0[j]
            blocks = B2[c0:c0 + t.m * t.k, :t.k].reshape(t.m, t.k, t.k)
            T = Ts[j + 1]
            out.append(sol.sigma2 * np.einsum("ab,ibc,dc->iad", T, blocks, T))
        return out

    def modes(self, sol: Solution) -> list[np.ndarray]:
        """Conditional modes b_j (m_j × k_j) of every term, at the solution."""
        try:
            b1, b2 = self.kernel.modes(sol.theta)
        except FloatingPointError as exc:
            raise ObjectiveError(str(exc)) from None
        out = [b1]
        for j, t in enumerate(self.terms[1:]):
            c0 = self.cp.trail_c0[j]
            out.append(b2[c0:c0 + t.m * t.k].reshape(t.m, t.k))
        return out




class BlockedEngine(Engine):
    """Several grouping factors (the blocked Cholesky; module docstring).

    Prior weights w and an offset o (lme4's): y, X and the terms' Z are the working rows
    √w (y − o), √w X, √w Z, so every cross-product is Σ w a b (DESIGN.md §4); ``weights`` and
    ``offset`` turn fitted values and the response back to the data's scale.

    ``statsmodels_group`` / ``vc_order``: set when the model came from statsmodels' one-group
    spelling of crossed effects (the group's label and the variance components in the user's
    order), so that statsmodels' shapes can be given (random_effects of the one group)."""

    def __init__(self, y: np.ndarray | None, X: np.ndarray | None, terms: list[Term], *,
                 crossprods: MultiCrossProducts | None = None,
                 group_sizes: dict[str, np.ndarray] | None = None, nobs: int | None = None,
                 source: Any = None, statsmodels_group: Any = None,
                 vc_order: tuple[str, ...] = (), weights: np.ndarray | None = None,
                 offset: np.ndarray | None = None) -> None:
        self.weights = weights
        self.offset = offset
        self.y = y
        self.X = X
        self.terms = tuple(terms)
        self.theta_map = ThetaMap.of_terms(self.terms)
        self.source = source
        self.statsmodels_group = statsmodels_group
        self.vc_order = tuple(vc_order)
        self._nobs = int(y.shape[0]) if nobs is None else int(nobs)
        self._group_sizes = group_sizes
        if crossprods is not None:
            self.__dict__["crossprods"] = crossprods
        # lme4 refuses a term with as many random effects as observations; statsmodels'
        # spelling of crossed effects fits it with a warning
        self.identifiable = all([check_identifiable(self._nobs, t.m * t.k, f"term (... | {t.name})",
                                                    refuse=statsmodels_group is None)
                                 for t in self.terms])

    uses_blas = True   # the dense trailing block: LAPACK's Cholesky and inverse

    # -- structure -------------------------------------------------------------------------
    @property
    def nobs(self) -> int:
        return self._nobs

    @property
    def k_fe(self) -> int:
        return int(self.crossprods.XtX.shape[0]) if self.X is None else int(self.X.shape[1])

    @property
    def has_rows(self) -> bool:
        return self.source is None

    @property
    def n_levels(self) -> int:
        return self.terms[0].m     # the largest factor: the kernel's level loop

    def covariance_terms(self) -> list[CovarianceTerm]:
        out = []
        for t, free in zip(self.terms, self.theta_map.free_masks(), strict=True):
            role = "vc" if self.statsmodels_group is not None else "coef"
            out.append(CovarianceTerm(t.name, tuple(t.coef_names), free, role,
                                      t.name if role == "vc" else ""))
        return out

    def variance_params(self) -> list[tuple[int, int, int]]:
        return [(j, int(r), int(c)) for j, t in enumerate(self.terms)
                for r, c in zip(*t.pattern, strict=True)]

    def group_sizes(self) -> dict[str, np.ndarray]:
        if self._group_sizes is not None:
            return self._group_sizes
        return {t.name: np.bincount(t.codes, minlength=t.m) for t in self.terms}

    @cached_property
    def crossprods(self) -> MultiCrossProducts:
        cp = compute_multi_crossprods(self.y, self.X, list(self.terms))
        return self.with_log_weights(cp)

    def objective(self, reml: bool = True, n_threads: int | None = None,
                  crossprods: MultiCrossProducts | None = None) -> MultiObjective:
        return MultiObjective(self.crossprods if crossprods is None else crossprods, self.terms,
                              reml, n_threads)

    # -- many responses on this design -----------------------------------------------------
    def response_design(self) -> tuple[np.ndarray, sp.csr_matrix]:
        """X and Z (sparse, n × q, columns in the cross-products' coordinate order: the first
        factor's levels × k1, then the trailing block): the designs that multiply a response
        in X'y and Z'y."""
        if not self.has_rows:
            raise self.no_rows("the design")
        n = self.nobs
        t1 = self.terms[0]
        off = [0] + [t1.m * t1.k + int(c0) for c0 in self.crossprods.trail_c0]
        rows, cols, vals = [], [], []
        for t, c0 in zip(self.terms, off, strict=True):
            for a in range(t.k):
                rows.append(np.arange(n))
                cols.append(c0 + t.codes * t.k + a)
                vals.append(t.Z[:, a])
        q = t1.m * t1.k + self.crossprods.q2
        Z = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, q))
        Z.eliminate_zeros()
        return self.X, Z

    def with_response(self, zty: np.ndarray, xty: np.ndarray, yty: float) -> MultiCrossProducts:
        """The cross-products of another response on this design (Z'y in the coordinate
        order of ``response_design``)."""
        t1 = self.terms[0]
        q1 = t1.m * t1.k
        return self.crossprods.with_response(np.reshape(zty[:q1], (t1.m, t1.k)), zty[q1:], xty,
                                             yty, t1.k)

    def moment_thetas(self, zty: np.ndarray, xty: np.ndarray, yty: np.ndarray) -> np.ndarray | None:
        t1 = self.terms[0]
        q1 = t1.m * t1.k
        est = self.crossprods.scalar_moments_many(list(self.terms), zty[:q1], zty[q1:], xty, yty)
        return None if est is None else relative_scalars(*est)

    def weighted_crossprods(self, y: np.ndarray, weights: np.ndarray) -> MultiCrossProducts:
        """The cross-products of response y with prior weights w (all > 0) on this design's
        rows, which carry no weights of their own: the sums over √w y, √w X, √w Z."""
        s = np.sqrt(weights)
        terms = [replace(t, Z=np.ascontiguousarray(t.Z * s[:, None])) for t in self.terms]
        cp = compute_multi_crossprods(y * s, np.ascontiguousarray(self.X * s[:, None]), terms)
        return replace(cp, log_weights=float(np.sum(np.log(weights))))

    # -- at a solution -----------------------------------------------------------------------
    def modes_by_factor(self, obj: MultiObjective, sol: Solution) -> dict[str, pd.DataFrame]:
        sc = self.scaling
        return {t.name: pd.DataFrame(sc.modes(j, b), index=pd.Index(t.labels, name=t.name),
                                     columns=list(t.coef_names))
                for j, (t, b) in enumerate(zip(self.terms, self._modes(obj, sol), strict=True))}

    def condvar_by_factor(self, obj: MultiObjective, sol: Solution) -> dict[str, np.ndarray]:
        cvs = obj.conditional_variances(sol)
        sc = self.scaling
        return {t.name: sc.condvar(j, cv) for j, (t, cv) in enumerate(zip(self.terms, cvs, strict=True))}

    def modes_by_group(self, obj: MultiObjective, sol: Solution) -> dict[Any, pd.Series]:
        """statsmodels' one-group spelling: {group: Series indexed "name[level]"}; otherwise
        every factor's levels under its own name."""
        frames = self.modes_by_factor(obj, sol)
        order = self.vc_order or tuple(frames)
        parts = [pd.Series(frames[name].iloc[:, 0].to_numpy(),
                           index=[f"{name}[{lab}]" for lab in frames[name].index])
                 for name in order]
        return {self.statsmodels_group: pd.concat(parts)}

    def condvar_by_group(self, obj: MultiObjective, sol: Solution) -> dict[Any, np.ndarray]:
        return self.condvar_by_factor(obj, sol)

    def fitted(self, obj: MultiObjective, sol: Solution) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the fitted values (the rows)")
        fit = self.X @ sol.beta
        for t, b in zip(self.terms, self._modes(obj, sol), strict=True):
            fit += np.einsum("ij,ij->i", t.Z, b[t.codes])
        return self.to_data_scale(fit)

    def fixed_part(self, beta: np.ndarray) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the fixed-effects design")
        return self.to_data_scale(self.X @ self.scaling.beta_internal(beta), offset=False)

    def response(self) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the response")
        return self.to_data_scale(self.y)

    # -- inference ---------------------------------------------------------------------------
    def without_fixed(self, j: int, value: float) -> MultiCrossProducts:
        k, v, N, d = self.scaling.fixed_constraint(j, value)
        if N is None:
            return self.crossprods.without_fixed(k, v, self.terms[0].k)
        return self.crossprods.with_fixed_map(N, d, self.terms[0].k)

    def simulator(self, theta: np.ndarray, beta: np.ndarray, sigma: float) -> MultiSimulator:
        if not self.has_rows:
            raise self.no_rows("the design")
        return MultiSimulator(self, theta, beta, sigma)

    def kenward_roger_traces(self, theta: np.ndarray, sigma2: float
                             ) -> tuple[np.ndarray, list[np.ndarray], dict]:
        """In the space of the q random effects (lmefast.inference's module docstring):
        V = σ²(I + ZΛΛ'Z'), every product from Z'Z, Z'X, X'X and S = Λ(Λ'Z'ZΛ + I)⁻¹Λ'."""
        from scipy.linalg import cho_factor, cho_solve

        if not self.has_rows:
            raise self.no_rows("the design")
        # prior weights: on the working rows (√w X, √w Z, errors σ²I) V is S(ZΣZ' + σ²W⁻¹)S,
        # S = diag(√w), and every trace and X'V⁻¹…V⁻¹X below is unchanged by S: these are the
        # weighted model's, with ∂V/∂σ² = W⁻¹
        terms = self.terms
        sizes = [t.m * t.k for t in terms]
        q = int(sum(sizes))
        if q > KR_MAX_RANDOM_EFFECTS:
            raise InferenceError(
                f"Kenward-Roger with several grouping factors uses dense q × q matrices of the q = {q} "
                f"random effects (O(q³) time, about 8 q² doubles of memory); the limit is "
                f"KR_MAX_RANDOM_EFFECTS = {KR_MAX_RANDOM_EFFECTS}: use ddf='satterthwaite' (cost "
                "independent of the number of rows)")
        n, p = self.nobs, self.k_fe
        X = self.X
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows, cols, vals = [], [], []
        for j, t in enumerate(terms):
            for a in range(t.k):
                rows.append(np.arange(n))
                cols.append(off[j] + t.codes * t.k + a)
                vals.append(t.Z[:, a])
        Z = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, q))
        A = (Z.T @ Z).toarray()
        B = np.asarray(Z.T @ X)
        XtX = X.T @ X
        Lam = sp.block_diag([sp.kron(sp.identity(t.m), T) for t, T in
                             zip(terms, self.theta_map.Ts(theta), strict=True)], format="csr")
        LtA = np.asarray(Lam.T @ A)                  # Λ'A
        M = np.asarray(Lam.T @ LtA.T)                # Λ'AΛ (symmetric)
        del LtA
        M = 0.5 * (M + M.T)
        M[np.diag_indices(q)] += 1.0
        S = np.asarray(Lam @ cho_solve(cho_factor(M, lower=True), Lam.T.toarray()))
        del M
        S = 0.5 * (S + S.T)                          # Λ (Λ'AΛ + I)⁻¹ Λ'
        s2 = sigma2
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
        return Ktr, P, Q

    def random_prediction(self, modes: dict[str, pd.DataFrame], newdata: Any, exog_re: Any,
                          groups: Any, new_levels: str) -> np.ndarray:
        """Each factor contributes Z_j b̂_j of the row's level; a level not in the fit
        contributes nothing for that factor only (lme4's allow.new.levels=TRUE)."""
        if newdata is None:
            raise PredictionError("with several grouping factors, conditional predictions need newdata "
                                  "(a DataFrame with the grouping columns); use include_random=False "
                                  "for population predictions from exog")
        pred = np.zeros(len(newdata))
        for t in self.terms:
            b = modes[t.name].to_numpy()
            cols = t.name.split(":")
            missing = [c for c in cols if c not in newdata.columns]
            if missing:
                raise PredictionError(f"newdata is missing the grouping column(s) {missing} of the "
                                      f"grouping factor {t.name!r}")
            if len(cols) == 1:
                key = newdata[cols[0]].to_numpy()
            else:
                key = newdata[cols[0]].astype(str)
                for c in cols[1:]:
                    key = key + ":" + newdata[c].astype(str)
                key = key.to_numpy()
            idx = level_index(np.asarray(t.labels), key)
            new = idx < 0
            if new.any() and new_levels == "error":
                raise PredictionError(f"level(s) {sorted({str(v) for v in key[new]})[:10]} of {t.name!r} "
                                      "were not in the fit (pass new_levels='population' for population "
                                      "predictions)")
            Z = design(newdata, list(t.coef_names), _INTERCEPTS, f"random effects of {t.name!r}")
            pred = pred + np.where(new, 0.0, np.einsum("ij,ij->i", Z, b[np.where(new, 0, idx)]))
        return pred


KR_MAX_RANDOM_EFFECTS = 4_000      # several factors: q = Σ m_j k_j (dense q × q matrices)
_INTERCEPTS = {"Intercept", "(Intercept)", "const"}


class MultiSimulator:
    """Responses simulated from a fit with several grouping factors, and their cross-products:
    each replicate draws y* = Xβ̂ + Σ_j Z_j b_j* + ε* from its own seed and makes one pass over
    the rows for its y-parts only (Z'Z, Z'X, X'X and the layout are reused)."""

    def __init__(self, engine: BlockedEngine, theta: np.ndarray, beta: np.ndarray,
                 sigma: float) -> None:
        self.engine = engine
        self.cp = engine.crossprods
        self.terms = engine.terms
        self.Ts = engine.theta_map.Ts(theta)
        self.beta = np.asarray(beta, dtype=float).copy()
        self.sigma = float(sigma)
        self.fixed = engine.X @ self.beta
        self.q2 = self.cp.q2
        self.coords = [int(c0) + t.codes * t.k for c0, t in zip(self.cp.trail_c0, self.terms[1:], strict=True)]

    @staticmethod
    def seeds(seed: int | np.random.Generator | None, n: int) -> np.ndarray:
        """The per-replicate seeds of a bootstrap of n replicates."""
        return np.random.default_rng(seed).integers(0, 2**63 - 1, size=n)

    def draws(self, seed: int | np.random.Generator | None, n: int) -> np.ndarray:
        return self.seeds(seed, n)

    def one_random_part(self, rng: np.random.Generator) -> np.ndarray:
        """Σ_j Z_j b_j*, b_j* ~ N(0, σ̂² T_j T_j') per level (rows in the data's order)."""
        out = np.zeros(self.engine.nobs)
        for t, T in zip(self.terms, self.Ts, strict=True):
            b = self.sigma * rng.standard_normal((t.m, t.k)) @ T.T
            out += np.einsum("ij,ij->i", t.Z, b[t.codes])
        return out

    def random_part(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.stack([self.one_random_part(rng) for _ in range(n)])

    def response(self, rng: np.random.Generator) -> np.ndarray:
        """One simulated response y* = Xβ̂ + Zb* + ε* (new random effects, as lme4's simulate)."""
        mu = self.fixed + self.one_random_part(rng)
        return mu + self.sigma * rng.standard_normal(mu.shape[0])

    def crossprods_of(self, y: np.ndarray) -> MultiCrossProducts:
        """The model's cross-products with the response replaced by y (only the y-parts are
        recomputed)."""
        t1 = self.terms[0]
        S1_y = np.column_stack([np.bincount(t1.codes, t1.Z[:, a] * y, t1.m) for a in range(t1.k)])
        c2 = np.zeros(self.q2)
        for c0, t in zip(self.coords, self.terms[1:], strict=True):
            for a in range(t.k):
                c2 += np.bincount(c0 + a, t.Z[:, a] * y, self.q2)
        return self.cp.with_response(S1_y, c2, self.engine.X.T @ y, float(y @ y), t1.k)

    def crossprods(self, seeds: np.ndarray, r: int) -> MultiCrossProducts:
        return self.crossprods_of(self.response(np.random.default_rng(seeds[r])))
