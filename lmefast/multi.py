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
import scipy.sparse as sp

from lmefast._multi import MultiKernel
from lmefast.lmer import Term
from lmefast.objective import KernelObjective, ObjectiveError, Solution
from lmefast.optimize import fit_theta
from lmefast.parallel import default_threads
from lmefast.spec import SpecificationError

MAX_DENSE_TRAILING = 12_000


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

    block_name = "level of the first factor"

    def __init__(self, cp: MultiCrossProducts, theta_map: MultiThetaMap, reml: bool,
                 n_threads: int | None = None) -> None:
        self.cp = cp
        self.theta_map = theta_map
        self.reml = reml
        self.dof = cp.n - cp.p if reml else cp.n
        terms = theta_map.terms
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
        self.kernel = MultiKernel(
            cp, arrays, terms[0].k, cp.p, cp.q2, max(t.k for t in trail), int(per_level.max()),
            th_term, th_row, th_col, t_off, np.array([t.k for t in terms], dtype=np.int32),
            reml, default_threads(terms[0].m) if n_threads is None else n_threads)

    def conditional_variances(self, sol: Solution) -> list[np.ndarray]:
        """Conditional covariances σ²Λ_j (M⁻¹)_ℓℓ Λ_j' of every level ℓ of every term j
        (lme4's condVar): one (m_j, k_j, k_j) array per term."""
        try:
            M1, B2 = self.kernel.conditional_variances(sol.theta)
        except FloatingPointError as exc:
            raise ObjectiveError(str(exc)) from None
        Ts = self.theta_map.Ts(sol.theta)
        out = [sol.sigma2 * np.einsum("ab,ibc,dc->iad", Ts[0], M1, Ts[0])]
        for j, t in enumerate(self.theta_map.terms[1:]):
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
        for j, t in enumerate(self.theta_map.terms[1:]):
            c0 = self.cp.trail_c0[j]
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
        for t in terms:
            if t.m * t.k >= y.shape[0]:
                raise SpecificationError(
                    f"number of observations ({y.shape[0]}) <= number of random effects "
                    f"({t.m * t.k}) for term (... | {t.name}): the random-effects parameters "
                    "and the residual variance are unidentifiable")

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
        return MultiObjective(self.crossprods, self.theta_map, reml, n_threads)

    def fit(self, reml: bool = True, start_params: np.ndarray | None = None, maxiter: int = 500,
            verbose: bool = False, callback: Callable | None = None, **kwargs: Any):
        from lmefast.results_multi import MultiResults

        obj = self.objective(reml, kwargs.get("n_threads"))
        theta0 = self.theta_map.start() if start_params is None else np.asarray(start_params, float)
        if theta0.shape != (self.theta_map.n_theta,):
            raise SpecificationError(f"start_params must have {self.theta_map.n_theta} entries")
        sol, opt = fit_theta(obj, theta0, maxiter=maxiter, verbose=verbose, callback=callback)
        if not opt.converged:
            warnings.warn(f"the optimiser did not converge: {opt.return_code}", stacklevel=2)
        return MultiResults(self, obj, sol, opt)

    def group_sizes(self) -> dict[str, np.ndarray]:
        """Rows per level of every grouping factor."""
        return {t.name: np.bincount(t.codes, minlength=t.m) for t in self.terms}

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
