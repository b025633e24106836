"""The checks every front end makes, written once: the missing-value policy, a constant
response, identifiability (observations against random effects), and the rank-deficiency
policy (lme4's: linearly dependent fixed-effects columns are dropped with a warning naming
them), from the rows or from the cross-products X'X of chunked data."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as sla

from lmefast.errors import SpecificationError, UnidentifiableWarning

RANK_TOL = 1e-7
MISSING_POLICIES = ("raise", "none", "drop")


def check_missing_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise SpecificationError(f"missing must be 'raise', 'none' or 'drop', not {missing!r}")


def check_nonnegative_weights(w: np.ndarray, where: str, rows: np.ndarray | None = None) -> None:
    """The one rule on prior weights' signs, for every source: none negative (among ``rows``);
    zero weights drop their rows where the rows are kept."""
    neg = w < 0 if rows is None else (w < 0) & rows
    if neg.any():
        raise SpecificationError(f"weights must be non-negative ({int(neg.sum())} are negative "
                                 f"in {where})")


def check_rowwise(a: np.ndarray, what: str, where: str = "data") -> None:
    """Weights or an offset given as numbers (not as a column, whose missing values the
    missing-value policy judges): finite, and weights non-negative."""
    bad = ~np.isfinite(a)
    if bad.any():
        raise SpecificationError(f"{what} have {int(bad.sum())} NaN or infinite values")
    if what == "weights":
        check_nonnegative_weights(a, where)


def check_rows(n: int, dropped: bool = False) -> None:
    """Rows to fit: none is an error (``dropped``: the data had rows, but none was complete or
    of positive weight)."""
    if n == 0:
        raise SpecificationError("the data are empty: no rows to fit"
                                 + (" after dropping incomplete rows and rows of zero weight"
                                    if dropped else ""))


def check_not_constant(ymin: float, ymax: float, name: str) -> None:
    if ymin == ymax:
        raise SpecificationError(f"the response '{name}' is constant: there is no variance to model")


def check_identifiable(n: int, n_re: int, what: str, *, refuse: bool = True) -> bool:
    """More observations than random effects in a term (or group's block), else the random
    effects and the residual variance are not identifiable: refused (lme4's
    check.nobs.vs.nRE = "stop", its default), or with ``refuse=False`` (statsmodels' API, which
    fits such models) a warning. Returns whether the model is identifiable."""
    if n > n_re:
        return True
    message = (f"number of observations ({n}) <= number of random effects ({n_re}) for {what}: "
               "the random-effects parameters and the residual variance are unidentifiable")
    if refuse:
        raise SpecificationError(message)
    warnings.warn(message + "; fitted anyway (statsmodels' behaviour), results flagged "
                  "res.unidentifiable", UnidentifiableWarning, stacklevel=4)
    return False


def warn_dropped(dropped: list[str] | tuple[str, ...], stacklevel: int = 3) -> None:
    if dropped:
        warnings.warn(f"fixed-effects design is rank deficient: dropping column(s) {list(dropped)}",
                      stacklevel=stacklevel + 1)


def full_rank_columns(X: np.ndarray, XtX: np.ndarray | None = None) -> np.ndarray:
    """Indices of a maximal set of linearly independent columns (pivoted QR, lme4's tol);
    ``XtX``: X'X when the caller has it."""
    p = X.shape[1]
    if p == 0:
        return np.arange(0)
    if XtX is None:
        XtX = X.T @ X
    scale = np.sqrt(np.diag(XtX))
    if np.any(scale == 0):
        nz = np.nonzero(scale)[0]
        keep = full_rank_columns(X[:, nz]) if nz.size else np.arange(0)
        return nz[keep]
    if well_conditioned(XtX / np.outer(scale, scale)):
        return np.arange(p)               # clearly of full rank: no pivoted QR needed to say so
    if X.shape[0] <= 200_000:
        R, piv = sla.qr(X / scale, mode="r", pivoting=True)
        d = np.abs(np.diag(R))
        rank = int(np.sum(d > RANK_TOL * d[0])) if d.size else 0
    else:
        XtX = XtX / np.outer(scale, scale)
        R, piv = sla.qr(XtX, mode="r", pivoting=True)
        d = np.abs(np.diag(R))
        rank = int(np.sum(d > RANK_TOL**2 * d[0]))
    return np.sort(piv[:rank])


def well_conditioned(C: np.ndarray) -> bool:
    """Whether a Gram matrix with unit diagonal is clearly of full rank: every pivot of its
    Cholesky factor above 1e-3 (each column keeps at least 0.1% of its length off the span of
    the ones before it: far above the rank tolerances, so the pivoted factorisations would keep
    every column)."""
    try:
        return bool(np.min(np.diag(np.linalg.cholesky(C)), initial=np.inf) > 1e-3)
    except np.linalg.LinAlgError:
        return False


def full_rank_columns_from_xtx(XtX: np.ndarray, n: int) -> np.ndarray:
    """The columns ``full_rank_columns`` keeps, from X'X: its pivoted QR of X (n ≤ 200,000)
    is a pivoted Cholesky of X'X here (same pivots: the largest remaining column norm); above,
    its pivoted QR of X'X."""
    p = XtX.shape[0]
    if p == 0:
        return np.arange(0)
    scale = np.sqrt(np.diag(XtX))
    nz = np.nonzero(scale)[0]
    if nz.size < p:
        keep = full_rank_columns_from_xtx(XtX[np.ix_(nz, nz)], n) if nz.size else np.arange(0)
        return nz[keep]
    G = XtX / np.outer(scale, scale)
    if n > 200_000:
        R, piv = sla.qr(G, mode="r", pivoting=True)
        d = np.abs(np.diag(R))
        return np.sort(piv[:int(np.sum(d > RANK_TOL**2 * d[0]))])
    G = G.copy()
    piv = np.arange(p)
    d = np.zeros(p)
    for j in range(p):
        rest = np.diag(G)[j:]
        i = j + int(np.argmax(rest))
        piv[[j, i]] = piv[[i, j]]
        G[[j, i], :] = G[[i, j], :]
        G[:, [j, i]] = G[:, [i, j]]
        d[j] = np.sqrt(max(G[j, j], 0.0))
        if d[j] <= RANK_TOL * d[0] or d[j] == 0.0:
            break
        G[j + 1:, j + 1:] -= np.outer(G[j + 1:, j], G[j, j + 1:]) / G[j, j]
    return np.sort(piv[:int(np.sum(d > RANK_TOL * d[0]))])


def check_unique_columns(columns, used) -> None:
    """A column name that appears more than once in the data and is used by a formula is
    ambiguous: an error naming it (rather than one of the columns taken silently)."""
    names = [str(c) for c in columns]
    seen: set[str] = set()
    dup = sorted({c for c in names if c in seen or seen.add(c)} & {str(u) for u in used})
    if dup:
        raise SpecificationError(f"data have more than one column named {dup}: the formula "
                                 "cannot tell which to use; rename or drop the duplicates")


def check_random_design(Z: np.ndarray, names: list[str] | tuple[str, ...], term: str,
                        ZtZ: np.ndarray | None = None) -> None:
    """The design of one random-effects term (n × k, as the engine sees it: centred and scaled
    where it needs it, lmefast.scaling): an all-zero column, or columns that are linearly
    dependent (a constant slope beside an intercept, a slope repeated or a multiple of
    another), leave a variance that the data cannot inform: an error naming the term and the
    columns."""
    check_random_gram(Z.T @ Z if ZtZ is None else ZtZ, Z.shape[0], names, term)


def check_random_gram(G: np.ndarray, n: int, names: list[str] | tuple[str, ...], term: str) -> None:
    """check_random_design from the term's Z'Z over n rows (data in chunks)."""
    k = G.shape[0]
    zero = [str(names[j]) for j in range(k) if G[j, j] == 0]
    if zero:
        raise SpecificationError(
            f"random-effects term {term}: column(s) {zero} are all zero, so their variance is not "
            "identifiable; remove them from the term")
    if k < 2:
        return
    d = 1.0 / np.sqrt(np.diag(G))
    if well_conditioned(G * np.outer(d, d)):   # no pivoting needed to say so
        return
    keep = full_rank_columns_from_xtx(G, n)
    if keep.shape[0] < k:
        dropped = [str(names[j]) for j in range(k) if j not in set(keep.tolist())]
        raise SpecificationError(
            f"random-effects term {term}: column(s) {dropped} are linearly dependent on the term's "
            "other columns (e.g. a constant slope beside an intercept), so the covariance of the "
            "term is not identifiable; remove them from the term")
