"""statsmodels' parameter object, ``MixedLMParams``, and its map to θ.

statsmodels writes the variance parameters of one grouping factor as ψ = (cov_re, vcomp) on
the scale of the residual variance: cov_re = Σ/σ² (k_re × k_re) and vcomp = σ_vc²/σ². Its
"packed" vector is [β (when has_fe)] + [the lower triangle of cov_re by rows] + [vcomp], or,
with use_sqrt, [the lower triangle of the Cholesky factor L (cov_re = LL') by rows] +
[√vcomp]. lmefast's θ holds the same information: T with TT' = cov_re (lme4's order, by
column), and θ_vc = √vcomp. This module converts between them; it knows nothing of models.

``free`` (a MixedLMParams whose non-zero entries mark free parameters) becomes a pattern of
T: a covariance whose free entries connect the coefficients in groups that are fully
correlated within and uncorrelated between (a diagonal cov_re, a block-diagonal one in any
order) is T restricted to the same pattern, because the Cholesky factor of such a matrix has
no fill-in. Any other pattern (a chain of correlations with a zero between its ends, a fixed
variance) has no such T, and is refused rather than fitted as something else.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lmefast.errors import SpecificationError

__all__ = ["MixedLMParams", "free_pattern", "psd_cholesky"]


class MixedLMParams:
    """statsmodels' ``MixedLMParams``: fe_params (k_fe), cov_re (k_re × k_re) and vcomp
    (k_vc), the variance parameters relative to the residual variance."""

    def __init__(self, k_fe: int, k_re: int, k_vc: int) -> None:
        self.k_fe = int(k_fe)
        self.k_re = int(k_re)
        self.k_re2 = self.k_re * (self.k_re + 1) // 2
        self.k_vc = int(k_vc)
        self.k_tot = self.k_fe + self.k_re2 + self.k_vc
        self._ix = np.tril_indices(self.k_re)
        self.fe_params = np.zeros(self.k_fe)
        self.cov_re = np.zeros((self.k_re, self.k_re))
        self.vcomp = np.zeros(self.k_vc)

    @staticmethod
    def from_packed(params: Any, k_fe: int, k_re: int, use_sqrt: bool,
                    has_fe: bool) -> MixedLMParams:
        """From a packed vector (see the module docstring); k_vc is what remains."""
        params = np.asarray(params, dtype=float).ravel()
        k_re2 = k_re * (k_re + 1) // 2
        start = k_fe if has_fe else 0
        k_vc = params.shape[0] - start - k_re2
        if k_vc < 0:
            raise SpecificationError(
                f"a packed parameter vector needs at least {start + k_re2} entries, got {params.shape[0]}")
        out = MixedLMParams(k_fe, k_re, k_vc)
        out.fe_params = params[:k_fe].copy() if has_fe else np.zeros(k_fe)
        tri = np.zeros((k_re, k_re))
        tri[out._ix] = params[start:start + k_re2]
        if use_sqrt:
            out.cov_re = tri @ tri.T
        else:
            out.cov_re = tri + tri.T - np.diag(np.diag(tri))
        vc = params[start + k_re2:]
        out.vcomp = vc**2 if use_sqrt else vc.copy()
        return out

    @staticmethod
    def from_components(fe_params: Any = None, cov_re: Any = None, cov_re_sqrt: Any = None,
                        vcomp: Any = None) -> MixedLMParams:
        """From the parts; cov_re_sqrt is a lower-triangular L with cov_re = LL'."""
        fe = np.zeros(0) if fe_params is None else np.asarray(fe_params, dtype=float).ravel()
        vc = np.zeros(0) if vcomp is None else np.asarray(vcomp, dtype=float).ravel()
        if cov_re_sqrt is not None:
            L = np.atleast_2d(np.asarray(cov_re_sqrt, dtype=float))
            cov = L @ L.T
        elif cov_re is not None:
            cov = np.atleast_2d(np.asarray(cov_re, dtype=float))
        else:
            cov = np.zeros((0, 0))
        out = MixedLMParams(fe.shape[0], cov.shape[0], vc.shape[0])
        out.fe_params, out.cov_re, out.vcomp = fe.copy(), cov.copy(), vc.copy()
        return out

    def copy(self) -> MixedLMParams:
        return MixedLMParams.from_components(self.fe_params, self.cov_re, vcomp=self.vcomp)

    def get_packed(self, use_sqrt: bool, has_fe: bool = False) -> np.ndarray:
        """The packed vector (see the module docstring)."""
        cov = np.asarray(self.cov_re, dtype=float)
        tri = psd_cholesky(cov) if use_sqrt else cov
        vc = np.asarray(self.vcomp, dtype=float)
        parts = [tri[self._ix], np.sqrt(vc) if use_sqrt else vc]
        if has_fe:
            parts.insert(0, np.asarray(self.fe_params, dtype=float))
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return (f"MixedLMParams(fe_params={np.asarray(self.fe_params).tolist()}, "
                f"cov_re={np.asarray(self.cov_re).tolist()}, vcomp={np.asarray(self.vcomp).tolist()})")


def psd_cholesky(S: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Lower-triangular L with LL' = S for a positive semidefinite S (a zero column where a
    pivot vanishes). Raises SpecificationError when S is not positive semidefinite."""
    S = np.asarray(S, dtype=float)
    k = S.shape[0]
    L = np.zeros((k, k))
    scale = max(float(np.max(np.abs(np.diag(S)), initial=0.0)), 1.0)
    for j in range(k):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d < -tol * scale * 1e3:
            raise SpecificationError("the random-effects covariance is not positive semidefinite")
        if d <= tol * scale:
            rest = S[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]
            if np.any(np.abs(rest) > 1e-8 * scale):
                raise SpecificationError("the random-effects covariance is not positive semidefinite")
            continue
        L[j, j] = np.sqrt(d)
        L[j + 1:, j] = (S[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    return L


def free_pattern(free_cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pattern of T (rows, cols; by column then row, lme4's order) whose TT' has exactly
    the free entries of ``free_cov`` (non-zero = free). Refuses patterns no T gives."""
    free = np.asarray(free_cov) != 0
    k = free.shape[0]
    if free.shape != (k, k):
        raise SpecificationError(f"free.cov_re must be {k} × {k}")
    free = free | free.T
    if not np.all(np.diag(free)):
        fixed = np.nonzero(~np.diag(free))[0].tolist()
        raise NotImplementedError(
            f"free.cov_re holds the variance(s) of coefficient(s) {fixed} fixed: lmefast fits "
            "every variance (a variance held at a value is not supported)")
    component = np.full(k, -1)
    for start in range(k):
        if component[start] >= 0:
            continue
        stack = [start]
        component[start] = start
        while stack:
            i = stack.pop()
            for j in np.nonzero(free[i])[0]:
                if component[j] < 0:
                    component[j] = start
                    stack.append(j)
    same = component[:, None] == component[None, :]
    if np.any(same & ~free):
        raise NotImplementedError(
            "free.cov_re frees correlations that do not form groups of mutually correlated "
            "coefficients (e.g. a with b and b with c, but not a with c): no Cholesky-factor "
            "pattern fits that covariance; free whole blocks (or only the diagonal) instead")
    cols, rows = np.triu_indices(k)
    keep = same[rows, cols]
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)
