"""MixedLM: statsmodels' model for one grouping factor, fitted by the profiled objective.

    y = Xβ + Z b + ε,  b ~ N(0, σ²ΛΛ'),  ε ~ N(0, σ²I)

with Z the random-coefficient design (exog_re, T full lower triangular) and variance
components nested in the groups (exog_vc, one θ each).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg as sla

from lmefast.crossprods import CrossProducts, compute_crossprods
from lmefast.objective import ProfiledObjective
from lmefast.optimize import fit_theta
from lmefast.spec import BlockLayout, ModelSpec, SpecificationError, ThetaMap, build_layout

RANK_TOL = 1e-7


def _names(obj: Any, default: list[str]) -> list[str]:
    if isinstance(obj, pd.DataFrame):
        return [str(c) for c in obj.columns]
    if isinstance(obj, pd.Series) and obj.name is not None:
        return [str(obj.name)]
    return default


def _as_matrix(obj: Any, what: str, n: int | None) -> np.ndarray:
    if isinstance(obj, pd.DataFrame):
        bad = [str(c) for c in obj.columns if not pd.api.types.is_numeric_dtype(obj[c])]
        if bad:
            raise SpecificationError(f"{what}: column(s) {bad} are not numeric")
    try:
        arr = np.asarray(obj, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecificationError(f"{what} is not numeric: {exc}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise SpecificationError(f"{what} must be one- or two-dimensional, got {arr.ndim} dimensions")
    if n is not None and arr.shape[0] != n:
        raise SpecificationError(f"{what} has {arr.shape[0]} rows but the response has {n}")
    return np.ascontiguousarray(arr)


def _check_finite(arr: np.ndarray, what: str, names: list[str]) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        cols = np.nonzero(bad.any(axis=0))[0] if arr.ndim == 2 else [0]
        which = [names[c] for c in cols]
        nbad = int(bad.any(axis=1).sum()) if arr.ndim == 2 else int(bad.sum())
        raise SpecificationError(
            f"{what} has NaN or infinite values in column(s) {which} ({nbad} rows); "
            "pass missing='drop' to drop incomplete rows")


def _full_rank_columns(X: np.ndarray) -> np.ndarray:
    """Indices of a maximal set of linearly independent columns (pivoted QR, lme4's tol)."""
    p = X.shape[1]
    if p == 0:
        return np.arange(0)
    XtX = X.T @ X
    scale = np.sqrt(np.diag(XtX))
    if np.any(scale == 0):
        nz = np.nonzero(scale)[0]
        keep = _full_rank_columns(X[:, nz]) if nz.size else np.arange(0)
        return nz[keep]
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


def checked_response_and_design(y: np.ndarray, yname: str, X: np.ndarray, xnames: list[str],
                                stacklevel: int = 2) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Refuse a constant response; drop linearly dependent fixed-effects columns with a warning
    naming them (lme4's behaviour). Returns (X, names, dropped names)."""
    if np.ptp(y) == 0.0:
        raise SpecificationError(f"the response '{yname}' is constant: there is no variance to model")
    keep = _full_rank_columns(X)
    dropped = tuple(xnames[j] for j in range(X.shape[1]) if j not in set(keep.tolist()))
    if dropped:
        warnings.warn(f"fixed-effects design is rank deficient: dropping column(s) "
                      f"{list(dropped)}", stacklevel=stacklevel)
        X = np.ascontiguousarray(X[:, keep])
        xnames = [xnames[j] for j in keep]
    return X, list(xnames), dropped


def factorize_groups(groups: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Group codes 0..m−1 (int64) in sorted label order, and the labels.

    Non-negative integer keys not much larger than the number of rows are coded by counting
    (O(n), no sort); anything else by pandas' hash factorisation."""
    values = groups.to_numpy() if groups.dtype.kind in "iu" else None
    if values is not None and values.size and values.min() >= 0 and values.max() < 4 * values.size + 1024:
        present = np.bincount(values) > 0
        code_of = np.cumsum(present, dtype=np.int64) - 1
        return code_of[values], np.nonzero(present)[0].astype(values.dtype)
    codes, labels = pd.factorize(groups, sort=True)
    return codes.astype(np.int64), np.asarray(labels)


def _vc_matrices(exog_vc: Mapping, codes: np.ndarray, labels: np.ndarray,
                 n: int) -> tuple[list[str], list[np.ndarray], list[tuple[str, ...]]]:
    """statsmodels' exog_vc[name][group] (n_g × K matrices, rows in data order) → n × K."""
    rows_of = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=labels.shape[0])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    index = {lab: i for i, lab in enumerate(labels.tolist())}
    names, mats, colnames = [], [], []
    for name, per_group in exog_vc.items():
        if not isinstance(per_group, Mapping):
            raise SpecificationError(f"exog_vc['{name}'] must map group labels to matrices")
        K = max((np.atleast_2d(np.asarray(m)).shape[1] for m in per_group.values()), default=0)
        V = np.zeros((n, K))
        for lab, mat in per_group.items():
            if lab not in index:
                raise SpecificationError(f"exog_vc['{name}'] names group {lab!r}, not in groups")
            g = index[lab]
            rows = rows_of[starts[g]:starts[g + 1]]
            arr = np.asarray(mat, dtype=float)
            arr = arr.reshape(len(rows), -1) if arr.ndim < 2 else arr
            if arr.shape[0] != rows.shape[0]:
                raise SpecificationError(
                    f"exog_vc['{name}'][{lab!r}] has {arr.shape[0]} rows; group has {rows.shape[0]}")
            V[rows, :arr.shape[1]] = arr
        names.append(str(name))
        mats.append(V)
        colnames.append(tuple(str(j) for j in range(K)))
    return names, mats, colnames


class MixedLM:
    """Linear mixed model with one grouping factor (statsmodels' ``MixedLM``).

    Parameters follow statsmodels: ``endog`` (n), ``exog`` (n × p), ``groups`` (n labels),
    ``exog_re`` (n × k random-coefficient design; default a random intercept), ``exog_vc``
    (variance components: ``exog_vc[name][group]`` a matrix for that group's rows, each column
    an independent draw with the component's variance). ``missing='drop'`` drops rows with
    NaN in used data; the default raises an error naming the column.

    Fitting never changes the model: ``fit()`` returns a new results object.
    """

    def __init__(
        self,
        endog: Any,
        exog: Any,
        groups: Any,
        exog_re: Any = None,
        exog_vc: Mapping | None = None,
        *,
        missing: str = "raise",
        vc_designs: list | None = None,
        vc_names: list[str] | None = None,
        vc_col_names: list[tuple[str, ...]] | None = None,
        endog_name: str | None = None,
        exog_names: list[str] | None = None,
        exog_re_names: list[str] | None = None,
        group_name: str | None = None,
        re_pattern: tuple[np.ndarray, np.ndarray] | None = None,
        lme4_names: bool = False,
    ) -> None:
        if missing not in ("raise", "none", "drop"):
            raise SpecificationError(f"missing must be 'raise', 'none' or 'drop', not {missing!r}")
        self.lme4_names = lme4_names  # parameter names carry the factor's name (lmer models)
        y_arr = endog.to_numpy() if isinstance(endog, pd.Series | pd.DataFrame) else np.asarray(endog)
        if y_arr.ndim == 2 and y_arr.shape[1] == 1:
            y_arr = y_arr[:, 0]
        if y_arr.ndim != 1:
            raise SpecificationError(f"endog must be one-dimensional, got shape {y_arr.shape}")
        if not (np.issubdtype(y_arr.dtype, np.number) or np.issubdtype(y_arr.dtype, np.bool_)):
            raise SpecificationError(f"the response is not numeric (dtype {y_arr.dtype})")
        n = y_arr.shape[0]
        if n == 0:
            raise SpecificationError("the data are empty: no rows to fit")
        y = np.ascontiguousarray(y_arr, dtype=float)
        X = _as_matrix(exog, "exog", n)
        xnames = exog_names or _names(exog, [f"x{j + 1}" for j in range(X.shape[1])])
        if exog_re is None and vc_designs is None and exog_vc is None:
            Zre, znames = np.ones((n, 1)), ["Group"]
        elif exog_re is None:
            Zre, znames = np.ones((n, 1)), ["Group"]
        else:
            Zre = _as_matrix(exog_re, "exog_re", n)
            znames = exog_re_names or _names(exog_re, [f"Z{j + 1}" for j in range(Zre.shape[1])])
        g_arr = groups if isinstance(groups, pd.Series) else pd.Series(np.asarray(groups))
        if g_arr.ndim != 1 or g_arr.shape[0] != n:
            raise SpecificationError(f"groups must have one label per row ({n}), got shape {g_arr.shape}")
        g_arr = g_arr.reset_index(drop=True)
        gname = group_name or (str(groups.name) if isinstance(groups, pd.Series)
                               and groups.name is not None else "Group")
        yname = endog_name or (str(endog.name) if isinstance(endog, pd.Series)
                               and endog.name is not None else "y")

        g_missing = g_arr.isna().to_numpy()
        if missing == "drop":
            keep = np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(Zre).all(axis=1)
            keep &= ~g_missing
            for V in vc_designs or []:
                keep &= np.isfinite(np.asarray(V.sum(axis=1)).ravel())
            if not keep.all():
                if exog_vc is not None:
                    raise SpecificationError("missing='drop' is not supported with exog_vc; "
                                             "drop incomplete rows before building exog_vc")
                y, X, Zre = y[keep], X[keep], Zre[keep]
                g_arr = g_arr[keep].reset_index(drop=True)
                vc_designs = [V[keep] for V in vc_designs] if vc_designs else vc_designs
                n = y.shape[0]
                if n == 0:
                    raise SpecificationError("no complete rows remain after dropping missing values")
        else:
            _check_finite(y, "the response", [yname])
            _check_finite(X, "exog", xnames)
            _check_finite(Zre, "exog_re", znames)
            if g_missing.any():
                raise SpecificationError(f"groups has {int(g_missing.sum())} missing labels")
        codes, labels = factorize_groups(g_arr)
        m = labels.shape[0]

        if vc_designs is not None:
            vnames, vmats, vcols = list(vc_names or []), list(vc_designs), list(vc_col_names or [])
            for name, V in zip(vnames, vmats, strict=True):
                if missing != "drop":
                    dense_check = V.data if hasattr(V, "data") else np.asarray(V)
                    if not np.all(np.isfinite(dense_check)):
                        raise SpecificationError(f"variance component '{name}' has NaN or infinite values")
        elif exog_vc is not None:
            vnames, vmats, vcols = _vc_matrices(exog_vc, codes, labels, n)
            for name, V in zip(vnames, vmats, strict=True):
                _check_finite(V, f"exog_vc['{name}']", [f"column {j}" for j in range(V.shape[1])])
        else:
            vnames, vmats, vcols = [], [], []

        X, xnames, dropped = checked_response_and_design(y, yname, X, xnames, stacklevel=3)
        k = Zre.shape[1]
        if k and not np.any(Zre):
            raise SpecificationError("exog_re is all zero")
        if m < 2 and k > 0:
            raise SpecificationError(
                f"grouping factor '{gname}' has a single level: random coefficients need at "
                "least two groups (for crossed effects written as one group with variance "
                "components, pass re_formula='0')")
        layout = build_layout(codes, m, k, vmats)
        n_re = int(layout.q_off[-1])
        if n <= n_re:
            raise SpecificationError(
                f"number of observations ({n}) <= number of random effects ({n_re}) for "
                f"grouping factor '{gname}': the random-effects parameters and the residual "
                "variance are unidentifiable")
        self.spec = ModelSpec(
            y=y, X=X, group_codes=codes, group_labels=labels, Zre=np.ascontiguousarray(Zre),
            layout=layout,
            theta_map=ThetaMap(k, len(vnames), tuple(znames), tuple(vnames), re_pattern),
            endog_name=yname, exog_names=tuple(xnames), group_name=gname,
            vc_col_names=tuple(vcols), dropped_exog=dropped)

    @classmethod
    def from_formula(
        cls,
        formula: str,
        data: Any,
        groups: Any = None,
        re_formula: str | None = None,
        vc_formula: Mapping[str, str] | None = None,
        missing: str = "raise",
    ) -> MixedLM:
        """statsmodels' ``MixedLM.from_formula``: formulas evaluated by formulaic.

        statsmodels' spelling of crossed effects (a single group for all rows, one factor
        variance component per crossed factor) is recognised and returns the equivalent
        model with several grouping factors (``lmefast.multi.MultiLM``)."""
        from lmefast.api_lmer import single_group_as_crossed
        from lmefast.formula import formula_arrays

        kwargs = formula_arrays(formula, data, groups, re_formula, vc_formula, missing)
        crossed = single_group_as_crossed(kwargs)
        return cls(**kwargs) if crossed is None else crossed

    # -- data derived once ----------------------------------------------------------------
    @cached_property
    def crossprods(self) -> CrossProducts:
        """Per-group and global cross-products: the one pass over the rows."""
        return compute_crossprods(self.spec)

    @property
    def theta_map(self) -> ThetaMap:
        return self.spec.theta_map

    def covariance_terms(self, theta: np.ndarray
                         ) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
        """(group, coefficient names, T, free entries of T) per term: the random
        coefficients, then each variance component as a one-coefficient term."""
        tm = self.spec.theta_map
        T, tvc = tm.split(np.asarray(theta, dtype=float))
        out = []
        if self.k_re:
            free = np.zeros((tm.k, tm.k), dtype=bool)
            free[tm.tril] = True
            out.append((self.spec.group_name, self.exog_re_names, T, free))
        for name, t in zip(tm.vc_names, tvc, strict=True):
            out.append((f"{self.spec.group_name}:{name}", [name], np.array([[t]]),
                        np.ones((1, 1), dtype=bool)))
        return out

    @property
    def layout(self) -> BlockLayout:
        return self.spec.layout

    @property
    def nobs(self) -> int:
        return self.spec.nobs

    @property
    def n_groups(self) -> int:
        return self.spec.n_groups

    @property
    def k_fe(self) -> int:
        return self.spec.k_fe

    @property
    def k_re(self) -> int:
        return self.spec.k_re

    @property
    def k_vc(self) -> int:
        return self.spec.theta_map.n_vc

    @property
    def exog_names(self) -> list[str]:
        return list(self.spec.exog_names)

    @property
    def exog_re_names(self) -> list[str]:
        return list(self.spec.theta_map.re_names)

    @property
    def endog_names(self) -> str:
        return self.spec.endog_name

    def objective(self, reml: bool = True, n_threads: int | None = None) -> ProfiledObjective:
        """The profiled objective θ → −2 log-likelihood (ML) or REML criterion."""
        return ProfiledObjective(self.crossprods, self.spec.theta_map, reml, n_threads)

    def loglike(self, theta: np.ndarray, reml: bool = True) -> float:
        """Profiled log-likelihood at θ (β̂ and σ̂² at their optimum for this θ)."""
        return -0.5 * self.objective(reml).solve(np.asarray(theta, dtype=float)).objective

    def fit(
        self,
        reml: bool = True,
        start_params: np.ndarray | None = None,
        maxiter: int = 500,
        verbose: bool = False,
        callback: Callable[[int, np.ndarray, float], None] | None = None,
        n_threads: int | None = None,
        **kwargs: Any,
    ):
        """Fit by REML (default) or ML. ``start_params`` is a starting θ.

        ``verbose`` prints the objective per iteration; ``callback(iteration, θ, objective)``
        receives it (raise StopIteration to stop). ``n_threads``: threads for the group loops
        (default: all cores when there are many groups). Extra statsmodels keywords
        (``method``, ``full_output``, ``niter_sa``...) are accepted and ignored: the
        optimiser is always the bounded quasi-Newton on θ.
        """
        from lmefast.results import MixedLMResults

        obj = self.objective(reml, n_threads)
        theta0 = self.spec.theta_map.start() if start_params is None else np.asarray(start_params, dtype=float)
        if theta0.shape != (self.spec.theta_map.n_theta,):
            raise SpecificationError(
                f"start_params must have {self.spec.theta_map.n_theta} entries (θ), got {theta0.shape}")
        sol, opt = fit_theta(obj, theta0, maxiter=maxiter, verbose=verbose, callback=callback)
        if not opt.converged:
            warnings.warn(f"the optimiser did not converge: {opt.return_code}; max |gradient| "
                          f"{np.max(np.abs(opt.projected_gradient)):.3g}", stacklevel=2)
        return MixedLMResults(self, obj, sol, opt)


def mixedlm(
    formula: str,
    data: Any,
    groups: Any = None,
    re_formula: str | None = None,
    vc_formula: Mapping[str, str] | None = None,
    missing: str = "raise",
    **scale_out: Any,
) -> MixedLM:
    """statsmodels' ``smf.mixedlm``: a MixedLM from formulas (call ``.fit()`` on it).

    ``data`` may also be a path to Parquet data (lmefast.outofcore.mixedlm_parquet) or a Dask
    DataFrame (lmefast.dask.mixedlm); ``scale_out`` keywords (progress=...) go to those."""
    if isinstance(data, str | os.PathLike) or type(data).__module__.startswith("dask."):
        from lmefast.chunked import scale_out_model

        return scale_out_model(formula, data, groups, re_formula, vc_formula, missing, **scale_out)
    if scale_out:
        raise TypeError(f"mixedlm() got unexpected keyword argument(s) {sorted(scale_out)}")
    return MixedLM.from_formula(formula, data, groups=groups, re_formula=re_formula,
                                vc_formula=vc_formula, missing=missing)
