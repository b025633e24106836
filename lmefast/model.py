"""MixedLM: the one model class, whatever the front end, engine or data source.

    y = Xβ + Z b + ε,  b ~ N(0, σ²ΛΛ'),  ε ~ N(0, σ²I)

statsmodels' constructor takes arrays (one grouping factor: random coefficients exog_re with
T full lower triangular, variance components nested in the groups exog_vc, one θ each);
``MixedLM.from_engine`` takes a structure the other front ends built (lme4 formulas, chunked
data). The engine follows from the structure (one grouping factor, or several); everything
after that asks the engine (lmefast.engine.Engine), never the type of the model.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmefast.checks import (
    check_identifiable,
    check_missing_policy,
    check_not_constant,
    check_random_design,
    full_rank_columns,
    warn_dropped,
)
from lmefast.engine import Engine
from lmefast.errors import SpecificationError
from lmefast.multi import BlockedEngine
from lmefast.objective import KernelObjective
from lmefast.onefactor import OneFactorEngine
from lmefast.optimize import fit_theta
from lmefast.parallel import limit_blas_threads, resolve_threads
from lmefast.results import MixedLMResults
from lmefast.scaling import DesignScaling, column_map, component_scale, scale_fixed, scale_random
from lmefast.spec import GroupThetaMap, ModelSpec, build_layout
from lmefast.structure import Term, factorize_groups
from lmefast.userobjective import UserScaleObjective


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


def checked_response_and_design(y: np.ndarray, yname: str, X: np.ndarray, xnames: list[str],
                                stacklevel: int = 2) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Refuse a constant response; drop linearly dependent fixed-effects columns with a warning
    naming them (lme4's behaviour), judged on the centred and scaled columns (a change of units
    or origin does not make a column dependent). Returns (X, names, dropped names)."""
    check_not_constant(float(np.min(y)), float(np.max(y)), yname)
    S = column_map(X, centre=True)
    keep = full_rank_columns(X if np.array_equal(S, np.eye(S.shape[0])) else X @ S)
    dropped = tuple(xnames[j] for j in range(X.shape[1]) if j not in set(keep.tolist()))
    if dropped:
        warn_dropped(dropped, stacklevel=stacklevel)
        X = np.ascontiguousarray(X[:, keep])
        xnames = [xnames[j] for j in keep]
    return X, list(xnames), dropped


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
        api: str = "statsmodels",
    ) -> None:
        check_missing_policy(missing)
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
                    dense_check = V.data if sp.issparse(V) else np.asarray(V)
                    if not np.all(np.isfinite(dense_check)):
                        raise SpecificationError(f"variance component '{name}' has NaN or infinite values")
        elif exog_vc is not None:
            vnames, vmats, vcols = _vc_matrices(exog_vc, codes, labels, n)
            for name, V in zip(vnames, vmats, strict=True):
                _check_finite(V, f"exog_vc['{name}']", [f"column {j}" for j in range(V.shape[1])])
        else:
            vnames, vmats, vcols = [], [], []

        X, xnames, dropped = checked_response_and_design(y, yname, X, xnames, stacklevel=3)
        crossed = single_group_as_crossed(y, X, Zre, m, vnames, vmats, vcols)
        Xs, S = scale_fixed(X)
        if crossed is not None:
            engine: Engine = BlockedEngine(y, Xs, crossed, statsmodels_group=labels[0],
                                           vc_order=tuple(vnames))
            engine.design_scaling = DesignScaling(S, tuple(np.eye(t.k) for t in crossed))
            self._init(engine, api, yname, xnames, dropped)
            return
        k = Zre.shape[1]
        if k and not np.any(Zre):
            raise SpecificationError("exog_re is all zero")
        if m < 2 and k > 0:
            raise SpecificationError(
                f"grouping factor '{gname}' has a single level: random coefficients need at "
                "least two groups (for crossed effects written as one group with variance "
                "components, pass re_formula='0')")
        theta_map = GroupThetaMap(k, len(vnames), tuple(znames), tuple(vnames), re_pattern)
        Zs, C = scale_random(Zre, theta_map.patterns[0]) if k else (Zre, np.eye(0))
        if k:
            check_random_design(Zs, znames, f"({' + '.join(znames)} | {gname})")
        vc_scale = [component_scale(V) for V in vmats]
        vmats = [V if s == 1.0 else V * s for V, s in zip(vmats, vc_scale, strict=True)]
        layout = build_layout(codes, m, k, vmats)
        check_identifiable(n, int(layout.q_off[-1]), f"grouping factor '{gname}'")
        spec = ModelSpec(
            y=y, X=Xs, group_codes=codes, group_labels=labels, Zre=Zs,
            layout=layout, theta_map=theta_map,
            endog_name=yname, exog_names=tuple(xnames), group_name=gname,
            vc_col_names=tuple(vcols), dropped_exog=dropped)
        engine = OneFactorEngine(spec, lme4_names=api == "lme4")
        engine.design_scaling = DesignScaling(
            S, ((C,) if k else ()) + tuple(np.array([[s]]) for s in vc_scale))
        self._init(engine, api, yname, xnames, dropped)

    def _init(self, engine: Engine, api: str, endog_name: str, exog_names: list[str],
              dropped_exog: tuple[str, ...]) -> None:
        if api not in ("statsmodels", "lme4"):
            raise ValueError(f"api must be 'statsmodels' or 'lme4', not {api!r}")
        self.engine = engine
        self.api = api
        self.endog_name = endog_name
        self._exog_names = list(exog_names)
        self.dropped_exog = tuple(dropped_exog)

    @classmethod
    def from_engine(cls, engine: Engine, *, api: str, endog_name: str, exog_names: list[str],
                    dropped_exog: tuple[str, ...] = ()) -> MixedLM:
        """A model over a structure another front end built (lme4 formulas, chunked data)."""
        model = cls.__new__(cls)
        model._init(engine, api, endog_name, exog_names, dropped_exog)
        return model

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
        """statsmodels' ``MixedLM.from_formula``: formulas evaluated by formulaic (data in
        memory; ``lmefast.mixedlm`` also takes Parquet paths and Dask DataFrames)."""
        from lmefast.formula import formula_arrays

        return cls(**formula_arrays(formula, data, groups, re_formula, vc_formula, missing))

    # -- the structure, from the engine ------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        """The one-grouping-factor structure (engines for one factor only)."""
        return self.engine.spec

    @property
    def terms(self) -> tuple[Term, ...]:
        """The grouping factors of a model with several (the blocked engine only)."""
        return self.engine.terms

    @property
    def crossprods(self) -> Any:
        """The cross-products: the one pass over the rows."""
        return self.engine.crossprods

    @property
    def theta_map(self):
        return self.engine.theta_map

    @property
    def endog(self) -> np.ndarray:
        return self.engine.response()

    @property
    def exog(self) -> np.ndarray:
        return self.engine.fixed_part(np.eye(self.k_fe)) if self.k_fe else np.zeros((self.nobs, 0))

    y = endog
    X = exog

    def covariance_terms(self, theta: np.ndarray
                         ) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
        """(factor, coefficient names, T on the user's scale, free entries of T) per block of
        the engine's θ."""
        Ts = self.engine.scaling.Ts(self.engine.theta_map.Ts(np.asarray(theta, dtype=float)))
        return [(c.factor, list(c.coef_names), T, c.free)
                for c, T in zip(self.engine.covariance_terms(), Ts, strict=True)]

    def group_sizes(self) -> dict[str, np.ndarray]:
        return self.engine.group_sizes()

    @property
    def source(self) -> Any:
        """The data source of a model fitted from chunks (None for data in memory)."""
        return self.engine.source

    @property
    def nobs(self) -> int:
        return self.engine.nobs

    @property
    def n_groups(self) -> int | dict[str, int]:
        sizes = self.engine.group_sizes()
        if self.api == "lme4":
            return {name: len(v) for name, v in sizes.items()}
        if isinstance(self.engine, BlockedEngine):
            return 1
        return len(next(iter(sizes.values())))

    @property
    def k_fe(self) -> int:
        return len(self._exog_names)

    @property
    def k_re(self) -> int:
        return sum(len(c.coef_names) for c in self.engine.covariance_terms() if c.role == "coef")

    @property
    def k_vc(self) -> int:
        return sum(1 for c in self.engine.covariance_terms() if c.role == "vc")

    @property
    def exog_names(self) -> list[str]:
        return list(self._exog_names)

    @property
    def exog_re_names(self) -> list[str]:
        return [n for c in self.engine.covariance_terms() if c.role == "coef" for n in c.coef_names]

    @property
    def endog_names(self) -> str:
        return self.endog_name

    def objective(self, reml: bool = True, n_threads: int | None = None) -> KernelObjective:
        """The profiled objective θ → −2 log-likelihood (ML) or REML criterion, θ and β on the
        user's scale (lmefast.userobjective; the engine's own is ``engine.objective``)."""
        inner = self.engine.objective(reml, n_threads)
        sc = self.engine.scaling
        return inner if sc.is_identity else UserScaleObjective(inner, sc)

    def loglike(self, theta: np.ndarray, reml: bool = True) -> float:
        """Profiled log-likelihood at θ on the user's scale (β̂ and σ̂² at their optimum for
        this θ)."""
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
    ) -> MixedLMResults:
        """Fit by REML (default) or ML. ``start_params`` is a starting θ.

        ``verbose`` prints the objective per iteration; ``callback(iteration, θ, objective)``
        receives it (raise StopIteration to stop). ``n_threads``: threads for the group loops
        and, on the blocked engine, for BLAS (default: lmefast.parallel.get_num_threads() when
        there are many groups; a positive integer). Extra statsmodels keywords
        (``method``, ``full_output``, ``niter_sa``...) are accepted and ignored: the
        optimiser is always the bounded quasi-Newton on θ.
        """
        nth = resolve_threads(n_threads, self.engine.n_levels)
        obj = self.engine.objective(reml, nth)   # the engine's θ (its centred, scaled designs)
        tm = self.engine.theta_map
        theta0 = tm.start() if start_params is None else np.asarray(start_params, dtype=float)
        if theta0.shape != (tm.n_theta,):
            raise SpecificationError(
                f"start_params must have {tm.n_theta} entries (θ), got {theta0.shape}")
        if start_params is not None and np.all(np.isfinite(theta0)):
            with np.errstate(all="ignore"):   # θ on the user's scale → the engine's
                theta0 = self.engine.scaling.theta_internal(tm, theta0)
        with limit_blas_threads(nth) if self.engine.uses_blas else nullcontext():
            sol, opt = fit_theta(obj, theta0, maxiter=maxiter, verbose=verbose,
                                 callback=_user_callback(callback, self.engine, reml))
        if not opt.converged:
            warnings.warn(f"the optimiser did not converge: {opt.return_code}; max |gradient| "
                          f"{np.max(np.abs(opt.projected_gradient)):.3g}", stacklevel=2)
        return MixedLMResults(self, obj, sol, opt)


def _user_callback(callback: Callable[[int, np.ndarray, float], None] | None, engine: Engine,
                   reml: bool) -> Callable[[int, np.ndarray, float], None] | None:
    """The fit's callback given θ and the objective on the user's scale."""
    sc = engine.scaling
    if callback is None or sc.is_identity:
        return callback
    offset = sc.reml_offset() if reml else 0.0
    return lambda it, theta, f: callback(it, sc.theta(engine.theta_map, theta), f + offset)


def blocked_engine(y: np.ndarray, X: np.ndarray, terms: list[Term]) -> BlockedEngine:
    """The engine of several grouping factors on the rows in memory: each term's design
    checked (lmefast.checks.check_random_design), then the fixed and random designs centred and
    scaled (lmefast.scaling), the map kept with the engine."""
    Xs, S = scale_fixed(X)
    scaled = [scale_random(t.Z, t.pattern) for t in terms]
    for t, (Zs, _) in zip(terms, scaled, strict=True):
        check_random_design(Zs, t.coef_names, f"({' + '.join(t.coef_names)} | {t.name})")
    engine = BlockedEngine(y, Xs, [dataclasses.replace(t, Z=Zs)
                                   for t, (Zs, _) in zip(terms, scaled, strict=True)])
    engine.design_scaling = DesignScaling(S, tuple(C for _, C in scaled))
    return engine


def single_group_as_crossed(y: np.ndarray, X: np.ndarray, Zre: np.ndarray, m: int,
                            vc_names: list[str], vc_designs: list, vc_col_names: list
                            ) -> list[Term] | None:
    """statsmodels' spelling of crossed effects — one group for all rows, one variance
    component per crossed factor — as the equivalent terms of several grouping factors.

    Returns None when the data have more than one group (then the variance components are
    nested in the groups and the one-factor engine fits them) or no variance component."""
    if m != 1 or not vc_designs:
        return None
    has_constant = bool(np.any(np.ptp(X, axis=0) == 0) and np.any(X != 0)) if X.size else False
    if Zre.shape[1] > 1 or (Zre.shape[1] == 1 and not (np.ptp(Zre[:, 0]) == 0 and has_constant)):
        raise SpecificationError(
            "with a single group, random coefficients other than an intercept are not "
            "identifiable; write crossed effects as variance components with re_formula='0'")
    terms = []
    for name, V, cols in zip(vc_names, vc_designs, vc_col_names, strict=True):
        V = sp.csr_matrix(V)
        V.eliminate_zeros()
        if not (np.all(np.diff(V.indptr) == 1) and np.all(V.data == 1.0)):
            raise SpecificationError(
                f"variance component '{name}' is not a factor (each row needs exactly one "
                "indicator): with a single group only factor variance components (crossed "
                "effects, e.g. '0 + C(x)') can be fitted")
        used = np.unique(V.indices)
        code_of = np.full(V.shape[1], -1, dtype=np.int64)
        code_of[used] = np.arange(used.shape[0])
        labels = np.asarray(cols, dtype=object)[used]
        if labels.shape[0] < 2:
            raise SpecificationError(f"variance component '{name}' has a single level")
        terms.append(Term(str(name), code_of[V.indices], labels, np.ones((len(y), 1)),
                          ("(Intercept)",), (np.array([0]), np.array([0]))))
    terms.sort(key=lambda t: -t.m)
    return terms
