"""Invariance by construction: the engine works on centred and scaled designs, results are on
the user's scale (DESIGN.md §4).

A change of units or origin of a predictor is an invertible linear map of the design columns
that leaves the model unchanged:

    X̃ = X S          β = S β̃          cov(β̂) = S cov(β̃) S'
    Z̃_j = Z_j C_j    b_j = C_j b̃_j     Σ_j = C_j Σ̃_j C_j',  T_j = tri(C_j T̃_j)

where tri(A) is the lower-triangular factor with a non-negative diagonal of A A'. The map is
chosen from the data so that the columns the optimiser sees are centred (where the model has
a constant column to absorb the centre) and of unit spread:

* fixed effects: with a constant column, other columns far from zero are centred
  (S upper-triangular in the constant's row, diagonal 1/s_j); without, scaled only;
* a random-effects term whose T is a full lower triangle and that has a constant column: its
  other columns are centred where far from zero (Σ_j is unstructured, so any such C_j keeps
  the model); any other term (uncorrelated blocks, a variance component): scaled only (C_j
  diagonal keeps the pattern of T);
* a column is scaled when its spread is far from 1 (column_map has the thresholds): columns
  already well conditioned are left as they are, so ordinary data are fitted on their own
  design (and data in chunks with one pass: the chunk paths choose the same maps from their
  cross-products, column_map_from_gram, and repeat the pass only when a map is needed).

Scale factors are powers of two, so scaling alone is exact in floating point. The ML deviance
is invariant; the REML criterion changes by the constant log|S'S| (it holds log|X'V⁻¹X|),
which ``reml_offset`` gives back. One object per model (``DesignScaling``), held by its
engine: applied once where the structure is compiled, undone by the results.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lmefast._crossprods import column_moments

# (column sums, A'A, column minima, column maxima): lmefast._crossprods.column_moments
Moments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

CENTRE_RATIO = 8.0      # centre a column whose |mean| exceeds this many standard deviations
SCALE_RANGE = 4         # scale a column whose spread is outside 2^-4 .. 2^4


def _pow2(s: np.ndarray) -> np.ndarray:
    """Scale factors rounded to powers of two (1 where a column has no spread)."""
    s = np.asarray(s, dtype=float)
    ok = np.isfinite(s) & (s > 0)
    return np.where(ok, np.exp2(np.round(np.log2(np.where(ok, s, 1.0)))), 1.0)


def constant_column(A: np.ndarray, moments: Moments | None = None) -> int | None:
    """Index of the first column that is constant and non-zero (an intercept), or None."""
    if A.shape[0] == 0:
        return None
    _, _, lo, hi = column_moments(A) if moments is None else moments
    idx = np.nonzero((lo == hi) & (lo != 0))[0]
    return int(idx[0]) if idx.size else None


def _scale_of(spread: float) -> float:
    """The power of two a column is divided by: 1 while its spread is within the range where
    the optimiser is well conditioned, else the power of two nearest its spread."""
    s = float(_pow2(spread))
    return s if not 2.0 ** -SCALE_RANGE <= s <= 2.0 ** SCALE_RANGE else 1.0


def column_map(A: np.ndarray, centre: bool, moments: Moments | None = None) -> np.ndarray:
    """The k × k map M (Ã = A M) that centres (when ``centre`` and A has a constant column)
    and scales the columns of A where they need it: a column whose mean is more than
    CENTRE_RATIO of its standard deviations from zero is centred; a column whose spread
    (standard deviation when centred, else root mean square) is outside 2^±SCALE_RANGE is
    divided by the power of two nearest it. Other columns, and columns without spread, are
    left as they are (the common case: no copy, and one pass for data in chunks). Exact for
    the model: any invertible M is.

    The statistics come from one pass over the rows (``column_moments``, or ``moments`` when
    the caller has them): the variance from the second moment, except for a column whose
    variance is small beside its mean square (more than six digits cancel), which gets a
    second, exact pass; constant columns are told by their minimum and maximum."""
    k = A.shape[1]
    M = np.eye(k)
    if k == 0 or A.shape[0] == 0:
        return M
    n = A.shape[0]
    moments = column_moments(A) if moments is None else moments
    sums, G, lo_col, hi_col = moments
    mean = sums / n
    second = G.diagonal() / n
    var = second - mean * mean
    constant = lo_col == hi_col
    var[constant] = 0.0
    for j in np.nonzero(~constant & ~(var > 1e-6 * second))[0]:
        dev = A[:, j] - mean[j]
        var[j] = float(dev @ dev) / n
    c0 = constant_column(A, moments) if centre else None
    return _map_from_moments(mean, var, second, c0, float(A[0, c0]) if c0 is not None else 1.0)


def column_map_from_gram(G: np.ndarray, n: float, constant: int | None, centre: bool) -> np.ndarray:
    """column_map from A'A alone (data seen only through their cross-products: Parquet, Dask),
    where column ``constant`` (or None) is a column of ones: means from its row of A'A. The
    variance of a column far from zero loses digits to cancellation here, but the map needs
    only its power of two; exact for the model whatever it is."""
    k = G.shape[0]
    if k == 0 or n <= 0:
        return np.eye(k)
    second = G.diagonal() / n
    mean = G[constant] / n if constant is not None else np.zeros(k)
    var = np.maximum(second - mean * mean, 0.0) if constant is not None else second.copy()
    if constant is not None:
        var[constant] = 0.0
    return _map_from_moments(mean, var, second, constant if centre else None, 1.0)


def _map_from_moments(mean: np.ndarray, var: np.ndarray, second: np.ndarray, c0: int | None,
                      c0_value: float) -> np.ndarray:
    """The map of column_map from the columns' means, variances and mean squares; c0: the
    constant column (value c0_value) that absorbs the centres, or None (scaling only)."""
    k = mean.shape[0]
    M = np.eye(k)
    sd = np.sqrt(np.maximum(var, 0.0))
    rms = np.sqrt(second)
    # nothing to centre or scale (the common case): every |mean| within CENTRE_RATIO sd, every
    # root mean square within 2^±(SCALE_RANGE + 1/2) or zero
    lo, hi = 2.0 ** (-2 * SCALE_RANGE - 1), 2.0 ** (2 * SCALE_RANGE + 1)
    if ((var <= 0) | (mean * mean <= CENTRE_RATIO * CENTRE_RATIO * var)).all() and (
            ((second >= lo) & (second <= hi)) | (second == 0)).all():
        return M
    ok = np.isfinite(sd) & np.isfinite(rms) & (rms > 0)
    centred = ok & (sd > 0) & (np.abs(mean) > CENTRE_RATIO * sd) if c0 is not None else np.zeros(k, bool)
    spread = np.where(centred, sd, rms)
    s = _pow2(spread)
    s = np.where(ok & ((s < 2.0 ** -SCALE_RANGE) | (s > 2.0 ** SCALE_RANGE)), s, 1.0)
    if c0 is not None:
        centred[c0] = False
        s[c0] = 1.0
    if not centred.any() and np.all(s == 1.0):
        return M
    M[np.diag_indices(k)] = 1.0 / s
    if c0 is not None and centred.any():
        M[c0, centred] = -mean[centred] / (c0_value * s[centred])
    return M


def mapped_gram(G: np.ndarray, M: np.ndarray) -> np.ndarray | None:
    """(AM)'(AM) from A'A when that is exact: M diagonal with powers of two (or the
    identity); None when M centres (then the Gram matrix of AM must be formed from its rows:
    from A'A it would lose the digits the centring is there to keep)."""
    d = M.diagonal()
    if np.count_nonzero(M) > np.count_nonzero(d):
        return None
    return G if (d == 1.0).all() else G * np.outer(d, d)


def tri(A: np.ndarray) -> np.ndarray:
    """The lower-triangular L with a non-negative diagonal and L L' = A A'."""
    k = A.shape[0]
    if k <= 1:
        return np.abs(A)
    # already lower triangular with a non-negative diagonal (C_j T̃_j and C_j⁻¹T_j are, for
    # the lower-triangular maps of lmefast.scaling): checked entry by entry, k is small
    if (all(A[i, j] == 0 for i in range(k) for j in range(i + 1, k))
            and all(A[i, i] >= 0 for i in range(k))):
        return A.copy()
    R = np.linalg.qr(A.T, mode="r")
    L = R.T
    sign = np.where(np.diag(L) < 0, -1.0, 1.0)
    return np.tril(L * sign[None, :])


@dataclass(frozen=True, eq=False)
class DesignScaling:
    """The linear maps between the user's designs and the engine's: ``fixed`` S (p × p) and one
    C_j per covariance term of the θ map (k_j × k_j). Identity when nothing is mapped."""

    fixed: np.ndarray
    terms: tuple[np.ndarray, ...]

    @classmethod
    def identity(cls, p: int, ks: tuple[int, ...]) -> DesignScaling:
        return cls(np.eye(p), tuple(np.eye(k) for k in ks))

    @cached_property
    def is_identity(self) -> bool:
        return (np.array_equal(self.fixed, np.eye(self.fixed.shape[0]))
                and self.terms_identity)

    @cached_property
    def terms_identity(self) -> bool:
        """Whether every C_j is the identity (θ is then the same on both scales)."""
        return all(np.array_equal(C, np.eye(C.shape[0])) for C in self.terms)

    # -- fixed effects -----------------------------------------------------------------------
    def beta(self, beta_internal: np.ndarray) -> np.ndarray:
        """β = S β̃ (a vector, or one β̃ per row)."""
        return np.asarray(beta_internal, dtype=float) @ self.fixed.T

    def beta_internal(self, beta: np.ndarray) -> np.ndarray:
        """β̃ = S⁻¹β (a vector, or one β per column)."""
        return np.linalg.solve(self.fixed, np.asarray(beta, dtype=float))

    def cov_beta(self, cov_internal: np.ndarray) -> np.ndarray:
        return self.fixed @ cov_internal @ self.fixed.T

    def contrast(self, L: np.ndarray) -> np.ndarray:
        """A contrast of the user's β as a contrast of β̃: L β = (L S) β̃."""
        return np.asarray(L, dtype=float) @ self.fixed

    def fixed_constraint(self, j: int, value: float
                         ) -> tuple[int, float, np.ndarray | None, np.ndarray | None]:
        """The user's β_j held at value, as a constraint on β̃: (k, v, None, None) when it fixes
        one coordinate β̃_k = v (column k moves to the response); else (−1, nan, N, d) with
        β̃ = d + N γ, N an orthonormal basis of the other directions (X̃ → X̃N, y → y − X̃d)."""
        row = self.fixed[j]
        nz = np.nonzero(row)[0]
        if nz.size == 1:
            k = int(nz[0])
            return k, float(value) / float(row[k]), None, None
        d = float(value) * row / float(row @ row)
        Q, _ = np.linalg.qr(np.column_stack([row, np.eye(row.shape[0])]))
        return -1, float("nan"), np.ascontiguousarray(Q[:, 1:row.shape[0]]), d

    def reml_offset(self) -> float:
        """REML criterion on the user's scale minus the engine's: −log|S'S|."""
        p = self.fixed.shape[0]
        if p == 0:
            return 0.0
        return -2.0 * float(np.sum(np.log(np.abs(np.diag(np.linalg.qr(self.fixed, mode="r"))))))

    # -- random effects ----------------------------------------------------------------------
    def Ts(self, Ts_internal: list[np.ndarray]) -> list[np.ndarray]:
        """T_j = tri(C_j T̃_j)."""
        return [tri(C @ T) for C, T in zip(self.terms, Ts_internal, strict=True)]

    def Ts_internal(self, Ts: list[np.ndarray]) -> list[np.ndarray]:
        return [tri(np.linalg.solve(C, T)) for C, T in zip(self.terms, Ts, strict=True)]

    def theta(self, theta_map, theta_internal: np.ndarray) -> np.ndarray:
        """θ on the user's scale (lme4's: the free entries of each tri(C_j T̃_j))."""
        return _pack(theta_map, self.Ts(theta_map.Ts(theta_internal)))

    def theta_internal(self, theta_map, theta: np.ndarray) -> np.ndarray:
        return _pack(theta_map, self.Ts_internal(theta_map.Ts(theta)))

    def modes(self, j: int, b_internal: np.ndarray) -> np.ndarray:
        """Modes of term j (levels × k_j): b = C_j b̃."""
        return np.asarray(b_internal) @ self.terms[j].T

    def condvar(self, j: int, cv_internal: np.ndarray) -> np.ndarray:
        """Conditional covariances of term j (levels × k_j × k_j): C_j V C_j'."""
        C = self.terms[j]
        return np.einsum("ab,ibc,dc->iad", C, np.asarray(cv_internal), C)


def _pack(theta_map, Ts: list[np.ndarray]) -> np.ndarray:
    parts = [T[pattern] for T, pattern in zip(Ts, theta_map.patterns, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0)


def random_map(Z: np.ndarray, pattern: tuple[np.ndarray, np.ndarray],
               moments: Moments | None = None) -> np.ndarray:
    """C_j for a term with design Z (n × k) and the free entries ``pattern`` of its T: centre
    and scale when T is a full lower triangle (unstructured Σ_j), else scale only."""
    k = Z.shape[1]
    full = pattern[0].shape[0] == k * (k + 1) // 2
    return column_map(Z, centre=full, moments=moments)


def scaled(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """A M (contiguous), or A itself when M is the identity (the common case: no copy)."""
    return A if _is_eye(M) else np.ascontiguousarray(A @ M)


def _is_eye(M: np.ndarray) -> bool:
    return bool(np.count_nonzero(M) == M.shape[0] and (M.diagonal() == 1.0).all())


def component_scale(V) -> float:
    """The factor 1/s that scales a variance component's design (dense or scipy.sparse): s the
    power of two near the root mean square of its non-zero values when that is outside
    2^±SCALE_RANGE, else 1 (indicators, ordinary covariates)."""
    vals = V.data if hasattr(V, "tocsr") else np.asarray(V)[np.asarray(V) != 0]
    if vals.size == 0:
        return 1.0
    return 1.0 / _scale_of(float(np.sqrt(np.mean(np.square(vals)))))
