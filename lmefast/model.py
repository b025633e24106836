"""MixedLM: the one model class, whatever the front end, engine or data source.

    y = Xβ + Z b + ε,  b ~ N(0, σ²ΛΛ'),  ε ~ N(0, σ²I)

statsmodels' constructor takes arrays (one grouping factor: random coefficients exog_re with
T full lower triangular, variance components nested in the groups exog_vc, one θ each);
``MixedLM.from_engine`` takes a structure the other front ends built (lme4 formulas, chunked
data). The engine follows from the structure (one grouping factor, or several); everything
after that asks the engine (lmefast.engine.Engine), never the type of the model.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmefast._crossprods import MOMENT_COLUMNS, column_moments
from lmefast.checks import (
    check_identifiable,
    check_missing_policy,
    check_not_constant,
    check_random_design,
    check_rowwise,
    full_rank_columns,
    warn_dropped,
)
from lmefast.engine import Engine
from lmefast.errors import ConvergenceWarning, IgnoredArgumentWarning, SingularFitWarning, SpecificationError
from lmefast.multi import BlockedEngine
from lmefast.objective import KernelObjective
from lmefast.onefactor import OneFactorEngine
from lmefast.optimize import fit_theta
from lmefast.parallel import limit_blas_threads, resolve_threads
from lmefast.params import MixedLMParams, free_pattern
from lmefast.results import MixedLMResults
from lmefast.scaling import DesignScaling, Moments, column_map, component_scale, mapped_gram, random_map, scaled
from lmefast.smparams import loglike_at, theta_of, to_params, vc_order
from lmefast.spec import GroupThetaMap, ModelSpec, build_layout
from lmefast.structure import Term, factorize_groups
from lmefast.userobjective import UserScaleObjective

#: statsmodels' keywords of fit() and from_formula() that have no meaning here: accepted with
#: an IgnoredArgumentWarning (optimiser settings, covariance types, statsmodels' storage)
IGNORED_FIT_KEYWORDS = ("gtol", "eps", "maxcor", "ftol", "tol", "disp", "maxls", "retall",
                        "cov_type", "use_sqrt", "use_sparse")
IGNORED_FORMULA_KEYWORDS = ("use_sparse", "subset", "drop_cols")


@dataclass(frozen=True)
class ModelData:
    """statsmodels' ``model.data``: the names of the response, regressors and parameters."""

    ynames: str
    xnames: list[str]
    exog_re_names: list[str]
    exog_re_names_full: list[str]
    param_names: list[str]
    vcomp_names: list[str]

    @property
    def exog_names(self) -> list[str]:
        return self.xnames

    @property
    def endog_names(self) -> str:
        return self.ynames


def _names(obj: Any, default: list[str]) -> list[str]:
    if isinstance(obj, pd.DataFrame):
        return [str(c) for c in obj.columns]
    if isinstance(obj, pd.Series) and obj.name is not None:
        return [str(obj.name)]
    return default


def _rows(keep: np.ndarray, y: np.ndarray, X: np.ndarray, Zre: np.ndarray, w: np.ndarray | None,
          off: np.ndarray | None, g: pd.Series, vc_designs: list | None) -> tuple:
    """The rows ``keep`` of every per-row input of MixedLM (None stays None)."""
    return (y[keep], X[keep], Zre[keep], None if w is None else w[keep],
            None if off is None else off[keep], g[keep].reset_index(drop=True),
            [V[keep] for V in vc_designs] if vc_designs else vc_designs)


def as_matrix(obj: Any, what: str, n: int | None, rows_of: str = "the response",
              order: str = "C") -> np.ndarray:
    """A one- or two-dimensional numeric input as an n × k float matrix (a vector as one
    column) in memory order ``order``: a non-numeric DataFrame column (named, at most ten),
    another shape, or a number of rows other than ``rows_of``'s n raise."""
    if isinstance(obj, pd.DataFrame):
        bad = [str(c) for c, dt in zip(obj.columns, obj.dtypes, strict=True)
               if not pd.api.types.is_numeric_dtype(dt)]
        if bad:
            raise SpecificationError(f"{what}: column(s) {bad[:10]} are not numeric")
    try:
        arr = np.asarray(obj, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecificationError(f"{what} is not numeric: {exc}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise SpecificationError(f"{what} must be one- or two-dimensional, got {arr.ndim} dimensions")
    if n is not None and arr.shape[0] != n:
        raise SpecificationError(f"{what} has {arr.shape[0]} rows but {rows_of} has {n}")
    return np.asfortranarray(arr) if order == "F" else np.ascontiguousarray(arr)


def _default_exog_names(X: np.ndarray) -> list[str]:
    """statsmodels' names for the columns of an unnamed exog: 'const' for a constant column,
    x1, x2, ... for the others."""
    const = (np.ptp(X, axis=0) == 0) & np.any(X != 0, axis=0) if X.shape[0] else np.zeros(X.shape[1], bool)
    names, j = [], 0
    for c in range(X.shape[1]):
        if const[c] and "const" not in names:
            names.append("const")
        else:
            j += 1
            names.append(f"x{j}")
    return names


def _check_finite(arr: np.ndarray, what: str, names: list[str]) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        cols = np.nonzero(bad.any(axis=0))[0] if arr.ndim == 2 else [0]
        which = [names[c] for c in cols]
        nbad = int(bad.any(axis=1).sum()) if arr.ndim == 2 else int(bad.sum())
        raise SpecificationError(
            f"{what} has NaN or infinite values in column(s) {which} ({nbad} rows); "
            "pass missing='drop' to drop incomplete rows")


def _finite_moments(A: np.ndarray, what: str, names: list[str], y: np.ndarray | None = None,
                    yname: str = "") -> Moments:
    """column_moments of A (of [A | y] with ``y``), with the check of _check_finite: a NaN or an
    infinite value makes its column's sum NaN or infinite, so finite sums clear every column in
    the same pass; otherwise (or after an overflow) the check by element finds and names the
    columns (the response's first)."""
    moments = column_moments(A, y)
    if not np.isfinite(moments[0]).all():
        if y is not None:
            _check_finite(y, "the response", [yname])
        _check_finite(A, what, names)
    return moments


def _column_block(Z: Any, X: np.ndarray) -> int | None:
    """a when Z is X's columns a..a+k−1 in X's own memory (a view, or X itself), else None."""
    if not (isinstance(Z, np.ndarray) and Z.dtype == X.dtype == np.float64 and Z.ndim == 2
            and Z.shape[0] == X.shape[0] > 1 and 0 < Z.shape[1] <= X.shape[1]
            and Z.strides == X.strides):
        return None
    step = X.strides[1]
    offset = Z.__array_interface__["data"][0] - X.__array_interface__["data"][0]
    if step <= 0 or offset % step:
        return None
    a = offset // step
    return a if 0 <= a and a + Z.shape[1] <= X.shape[1] else None


def _column_block_moments(moments: Moments, first: int, k: int) -> Moments:
    """The column moments of columns first..first+k−1 from those of more columns (each
    column's sums, products and extremes are its own: the same numbers as a pass over them)."""
    sums, G, lo, hi = moments
    cols = slice(first, first + k)
    return sums[cols].copy(), G[cols, cols].copy(), lo[cols].copy(), hi[cols].copy()


def _split_moments(moments: Moments, p: int) -> tuple[Moments, float, float]:
    """The moments of [X | y] as (X's moments, min y, max y)."""
    sums, G, lo, hi = moments
    return (sums[:p], G[:p, :p], lo[:p], hi[:p]), float(lo[p]), float(hi[p])


def prior_weights_and_offset(weights: Any, offset: Any, n: int
                              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """lme4's prior weights (residual variance σ²/wᵢ) and offset (subtracted from y) as float
    arrays of n; negative or non-finite weights and non-finite offsets raise."""
    out = []
    for what, v in (("weights", weights), ("offset", offset)):
        if v is None:
            out.append(None)
            continue
        try:
            a = np.asarray(v, dtype=float).ravel()
        except (TypeError, ValueError) as exc:
            raise SpecificationError(f"{what} are not numeric: {exc}") from None
        if a.shape[0] != n:
            raise SpecificationError(f"{what} have {a.shape[0]} entries but the data have {n} rows")
        check_rowwise(a, what)
        out.append(a)
    return out[0], out[1]


def checked_response_and_design(y: np.ndarray, yname: str, X: np.ndarray, xnames: list[str],
                                stacklevel: int = 2
                                ) -> tuple[np.ndarray, list[str], tuple[str, ...], np.ndarray]:
    """Refuse a constant response; drop linearly dependent fixed-effects columns with a warning
    naming them (lme4's behaviour), judged on the centred and scaled columns (a change of units
    or origin does not make a column dependent). Returns (X, names, dropped names, the
    centring and scaling map of the kept columns, lmefast.scaling.column_map)."""
    X, xnames, dropped, S, _ = _checked_design(y, yname, X, xnames, stacklevel + 1)
    return X, xnames, dropped, S


def _checked_design(y: np.ndarray, yname: str, X: np.ndarray, xnames: list[str], stacklevel: int,
                    moments: Moments | None = None
                    ) -> tuple[np.ndarray, list[str], tuple[str, ...], np.ndarray, np.ndarray]:
    """checked_response_and_design, also returning the indices of the kept columns;
    ``moments``: column_moments of [X | y] when the caller has them."""
    if moments is None:
        ymin, ymax = float(np.min(y)), float(np.max(y))
        moments = column_moments(X)
    else:
        moments, ymin, ymax = _split_moments(moments, X.shape[1])
    check_not_constant(ymin, ymax, yname)
    S = column_map(X, centre=True, moments=moments)
    keep = full_rank_columns(scaled(X, S), XtX=mapped_gram(moments[1], S))
    dropped = tuple(xnames[j] for j in range(X.shape[1]) if j not in set(keep.tolist()))
    if dropped:
        warn_dropped(dropped, stacklevel=stacklevel)
        X = np.ascontiguousarray(X[:, keep])
        xnames = [xnames[j] for j in keep]
        S = column_map(X, centre=True)
    return X, list(xnames), dropped, S, keep


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
        use_sqrt: bool = True,
        weights: Any = None,
        offset: Any = None,
    ) -> None:
        self.use_sqrt = bool(use_sqrt)
        #: results as pandas objects for pandas or formula data, ndarrays for arrays (statsmodels)
        self.pandas_output = exog_names is not None or any(
            isinstance(a, pd.Series | pd.DataFrame) for a in (endog, exog))
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
        X = as_matrix(exog, "exog", n)
        xnames = exog_names or (_names(exog, []) if isinstance(exog, pd.DataFrame | pd.Series) else
                                [] ) or _default_exog_names(X)
        if exog_re is None and vc_designs is None and exog_vc is None:
            Zre, znames = np.ones((n, 1)), ["Group"]
        elif exog_re is None:   # variance components only: no random intercept (statsmodels)
            Zre, znames = np.zeros((n, 0)), []
        else:
            # columns side by side in exog (a formula's, or exog itself): a view, no copy
            Zre = exog_re if _column_block(exog_re, X) is not None else as_matrix(exog_re, "exog_re", n)
            znames = exog_re_names or _names(exog_re, [f"x_re{j + 1}" for j in range(Zre.shape[1])])
        g_arr = groups if isinstance(groups, pd.Series) else pd.Series(np.asarray(groups))
        if g_arr.ndim != 1 or g_arr.shape[0] != n:
            raise SpecificationError(f"groups must have one label per row ({n}), got shape {g_arr.shape}")
        if not (isinstance(g_arr.index, pd.RangeIndex) and g_arr.index.start == 0
                and g_arr.index.step == 1):
            g_arr = g_arr.reset_index(drop=True)
        gname = group_name or (str(groups.name) if isinstance(groups, pd.Series)
                               and groups.name is not None else "Group")
        yname = endog_name or (str(endog.name) if isinstance(endog, pd.Series)
                               and endog.name is not None else "y")

        w, off = prior_weights_and_offset(weights, offset, n)
        if w is not None and not np.all(w > 0):
            # zero weights: the rows carry no information; they are dropped (lme4 keeps them
            # in n and reports a log-likelihood of −Inf)
            if exog_vc is not None:
                raise SpecificationError("zero weights are not supported with exog_vc; drop those rows")
            y, X, Zre, w, off, g_arr, vc_designs = _rows(w > 0, y, X, Zre, w, off, g_arr, vc_designs)
            n = y.shape[0]
            if n == 0:
                raise SpecificationError("every weight is zero: no rows to fit")
        # numpy's integer labels cannot be missing (pandas' nullable ones can)
        g_missing = (np.zeros(n, dtype=bool)
                     if isinstance(g_arr.dtype, np.dtype) and g_arr.dtype.kind in "iub"
                     else g_arr.isna().to_numpy())
        # column_moments of [X | y] (when narrow enough for the one pass in C) and of Zre: the
        # finiteness checks, the centring and scaling maps, the rank checks and X'X, X'y, y'y
        moments_xy = moments_z = None
        if missing == "drop":
            keep = np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(Zre).all(axis=1)
            keep &= ~g_missing
            for V in vc_designs or []:
                keep &= np.isfinite(np.asarray(V.sum(axis=1)).ravel())
            if not keep.all():
                if exog_vc is not None:
                    raise SpecificationError("missing='drop' is not supported with exog_vc; "
                                             "drop incomplete rows before building exog_vc")
                y, X, Zre, w, off, g_arr, vc_designs = _rows(keep, y, X, Zre, w, off, g_arr, vc_designs)
                n = y.shape[0]
                if n == 0:
                    raise SpecificationError("no complete rows remain after dropping missing values")
        else:
            if X.shape[1] < MOMENT_COLUMNS:
                moments_xy = _finite_moments(X, "exog", xnames, y, yname)
            else:
                _check_finite(y, "the response", [yname])
                _check_finite(X, "exog", xnames)
            first = _column_block(Zre, X)
            if first is not None and moments_xy is not None:   # columns of X: checked with them
                moments_z = _column_block_moments(moments_xy, first, Zre.shape[1])
            else:
                moments_z = _finite_moments(Zre, "exog_re", znames)
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

        # the centring and scaling maps are chosen on the user's columns (before the prior
        # weights make the intercept column non-constant), applied to the working rows
        if moments_xy is None and X.shape[1] < MOMENT_COLUMNS:
            moments_xy = column_moments(X, y)
        X, xnames, dropped, S, kept = _checked_design(y, yname, X, xnames, 4, moments_xy)
        crossed = single_group_as_crossed(y, X, Zre, m, vnames, vmats, vcols)
        Z_user = Zre
        y, X, Zre, vmats = working_rows(y, X, Zre, vmats, w, off)
        Xs = scaled(X, S)
        if crossed is not None:
            if w is not None:
                crossed = [replace(t, Z=np.ascontiguousarray(t.Z * np.sqrt(w)[:, None])) for t in crossed]
            engine: Engine = BlockedEngine(y, Xs, crossed, statsmodels_group=labels[0],
                                           vc_order=tuple(vnames), weights=w, offset=off)
            engine.design_scaling = DesignScaling(S, tuple(np.eye(t.k) for t in crossed))
            self._init(engine, api, yname, xnames, dropped)
            return
        k = Zre.shape[1]
        if k and moments_z is None:
            moments_z = column_moments(Z_user)
        if k and not (np.any(moments_z[2] != 0) or np.any(moments_z[3] != 0)):   # minima, maxima
            raise SpecificationError("exog_re is all zero")
        if m < 2 and k > 0:
            raise SpecificationError(
                f"grouping factor '{gname}' has a single level: random coefficients need at "
                "least two groups (for crossed effects written as one group with variance "
                "components, pass re_formula='0')")
        theta_map = GroupThetaMap(k, len(vnames), tuple(znames), tuple(vnames), re_pattern)
        C = np.eye(0)
        if k:
            C = random_map(Z_user, theta_map.patterns[0], moments=moments_z)
            check_random_design(scaled(Z_user, C), znames, f"({' + '.join(znames)} | {gname})",
                                ZtZ=mapped_gram(moments_z[1], C))
        Zs = scaled(Zre, C)
        vc_scale = [component_scale(V) for V in vmats]
        vmats = [V if s == 1.0 else V * s for V, s in zip(vmats, vc_scale, strict=True)]
        layout = build_layout(codes, m, k, vmats)
        identifiable = check_identifiable(n, int(layout.q_off[-1]), f"grouping factor '{gname}'",
                                          refuse=api == "lme4")
        gram = None
        if moments_xy is not None and w is None and off is None:
            # the working rows are the user's: [X̃ | y]'[X̃ | y] from the moments, as the pass
            # over the rows would make it (the same sums; a map by powers of two is exact)
            gram = moments_xy[1]
            if kept.shape[0] < gram.shape[0] - 1:
                cols = np.append(kept, gram.shape[0] - 1)
                gram = gram[np.ix_(cols, cols)]
            map_xy = np.eye(gram.shape[0])
            map_xy[:-1, :-1] = S
            gram = mapped_gram(gram, map_xy)
        spec = ModelSpec(
            y=y, X=Xs, group_codes=codes, group_labels=labels, Zre=Zs,
            layout=layout, theta_map=theta_map,
            endog_name=yname, exog_names=tuple(xnames), group_name=gname,
            vc_col_names=tuple(vcols), dropped_exog=dropped,
            row_gram=None if gram is None else (Xs, y, gram))
        engine = OneFactorEngine(spec, lme4_names=api == "lme4", weights=w, offset=off)
        engine.identifiable = identifiable
        engine.design_scaling = DesignScaling(
            S, ((C,) if k else ()) + tuple(np.array([[s]]) for s in vc_scale))
        self._init(engine, api, yname, xnames, dropped)

    def _init(self, engine: Engine, api: str, endog_name: str, exog_names: list[str],
              dropped_exog: tuple[str, ...]) -> None:
        if api not in ("statsmodels", "lme4"):
            raise ValueError(f"api must be 'statsmodels' or 'lme4', not {api!r}")
        self.engine = engine
        self.api = api
        self.__dict__.setdefault("use_sqrt", True)
        self.__dict__.setdefault("pandas_output", True)
        self.endog_name = endog_name
        self._exog_names = list(exog_names)
        self.dropped_exog = tuple(dropped_exog)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling leaves out the cached objectives (C kernels): they are made again."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_objective_")}

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
        weights: Any = None,
        offset: Any = None,
        eval_env: Any = 0,
        **ignored: Any,
    ) -> MixedLM:
        """statsmodels' ``MixedLM.from_formula``: formulas evaluated by formulaic (data in
        memory; ``lmefast.mixedlm`` also takes Parquet paths and Dask DataFrames). As in
        statsmodels, variance components without ``re_formula`` add no random intercept.
        ``weights`` and ``offset``: lme4's prior weights and offset (a column name or one per
        row). ``eval_env``: where names that are not columns are found (statsmodels' meaning:
        frames above the caller, or a mapping; lmefast.formula). statsmodels' ``use_sparse``
        (lmefast's kernels are sparse in the groups anyway) is accepted with an
        IgnoredArgumentWarning; other keywords raise."""
        from lmefast.formula import formula_arrays, formula_environment, formula_namespace

        unknown = sorted(set(ignored) - set(IGNORED_FORMULA_KEYWORDS))
        if unknown:
            raise TypeError(f"from_formula() got unexpected keyword argument(s) {unknown}")
        if ignored:
            warnings.warn(f"Argument(s) {', '.join(sorted(ignored))} ignored by lmefast's "
                          "MixedLM.from_formula", IgnoredArgumentWarning, stacklevel=2)
        with formula_environment(formula_namespace(eval_env)):
            kwargs = formula_arrays(formula, data, groups, re_formula, vc_formula, missing, weights, offset)
        if re_formula is None and vc_formula:
            kwargs["exog_re"], kwargs["exog_re_names"] = None, None
        return cls(**kwargs)

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

    # -- statsmodels' parametrisation (lmefast.smparams) ---------------------------------------
    def _objective_for(self, reml: bool) -> KernelObjective:
        key = "_objective_reml" if reml else "_objective_ml"
        if key not in self.__dict__:
            self.__dict__[key] = self.objective(reml)
        return self.__dict__[key]

    def _solution_at(self, params: Any, reml: bool | None) -> tuple[KernelObjective, Any, MixedLMParams]:
        pa = to_params(self.engine, params, self.k_fe, self.use_sqrt)
        if reml is None:
            reml = getattr(pa, "reml", True)
        obj = self._objective_for(bool(reml))
        theta = theta_of(self.engine, pa.cov_re, pa.vcomp)
        return obj, obj.solve(theta), pa

    def loglike_theta(self, theta: np.ndarray, reml: bool = True) -> float:
        """Profiled log-likelihood at θ (β̂ and σ̂² at their optimum for this θ)."""
        return -0.5 * self._objective_for(reml).solve(np.asarray(theta, dtype=float)).objective

    def loglike(self, params: Any, profile_fe: bool = True, reml: bool | None = None) -> float:
        """statsmodels' ``loglike``: the log-likelihood at ``params`` (a MixedLMParams or a
        packed vector, cov_re and vcomp relative to σ²), σ² profiled out; β profiled out too
        when ``profile_fe``, else params' fixed effects. REML or ML as ``reml``; by default
        the criterion of the fit that made ``params`` (``res.params_object``), else REML."""
        obj, sol, pa = self._solution_at(params, reml)
        return loglike_at(obj, sol, None if profile_fe else pa.fe_params)

    def _packed_function(self, params: Any, profile_fe: bool, reml: bool | None,
                         use_sqrt: bool) -> tuple[Callable[[np.ndarray], float], np.ndarray]:
        pa = to_params(self.engine, params, self.k_fe, self.use_sqrt)
        crit = getattr(pa, "reml", True) if reml is None else reml
        k_re = pa.k_re

        def f(x: np.ndarray) -> float:
            q = MixedLMParams.from_packed(x, self.k_fe, k_re, use_sqrt, has_fe=not profile_fe)
            return self.loglike(q, profile_fe=profile_fe, reml=crit)

        return f, pa.get_packed(use_sqrt=use_sqrt, has_fe=not profile_fe)

    def score(self, params: Any, profile_fe: bool = True, reml: bool | None = None) -> np.ndarray:
        """statsmodels' ``score``: the gradient of ``loglike`` in the packed parametrisation
        (without the fixed effects when ``profile_fe``; Cholesky factor and √vcomp when the
        model's ``use_sqrt``), by central differences."""
        f, x = self._packed_function(params, profile_fe, reml, self.use_sqrt)
        g = np.empty_like(x)
        for i in range(x.shape[0]):
            h = 1e-6 * max(abs(x[i]), 1.0)
            up, dn = x.copy(), x.copy()
            up[i] += h
            dn[i] -= h
            g[i] = (f(up) - f(dn)) / (2 * h)
        return g

    def hessian(self, params: Any, reml: bool | None = None) -> tuple[np.ndarray, bool]:
        """statsmodels' ``hessian``: (Hessian of ``loglike`` in the packed parametrisation with
        the fixed effects and cov_re's lower triangle, central differences; whether it is
        singular)."""
        f, x = self._packed_function(params, False, reml, False)
        d = x.shape[0]
        h = 1e-4 * np.maximum(np.abs(x), 1.0)
        H = np.empty((d, d))
        f0 = f(x)
        for i in range(d):
            for j in range(i, d):
                if i == j:
                    up, dn = x.copy(), x.copy()
                    up[i] += h[i]
                    dn[i] -= h[i]
                    H[i, i] = (f(up) - 2 * f0 + f(dn)) / h[i] ** 2
                    continue
                val = 0.0
                for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                    z = x.copy()
                    z[i] += si * h[i]
                    z[j] += sj * h[j]
                    val += si * sj * f(z)
                H[i, j] = H[j, i] = val / (4 * h[i] * h[j])
        singular = bool(np.linalg.matrix_rank(H) < d)
        return H, singular

    def get_fe_params(self, cov_re: Any, vcomp: Any, tol: float = 1e-10) -> np.ndarray:
        """statsmodels' ``get_fe_params``: the GLS fixed effects at (cov_re, vcomp)."""
        theta = theta_of(self.engine, np.atleast_2d(np.asarray(cov_re, dtype=float)) if self.k_re
                         else np.zeros((0, 0)), vcomp)
        return self._objective_for(True).solve(theta).beta.copy()

    def get_scale(self, fe_params: Any, cov_re: Any, vcomp: Any, reml: bool = True) -> float:
        """statsmodels' ``get_scale``: σ̂² at (β, cov_re, vcomp): r²(β)/(n − p) (REML) or
        r²(β)/n (ML)."""
        obj = self._objective_for(reml)
        theta = theta_of(self.engine, cov_re if self.k_re else np.zeros((0, 0)), vcomp)
        sol = obj.solve(theta)
        d = sol.Lx.T @ (np.asarray(fe_params, dtype=float) - sol.beta)
        return float((sol.r2 + d @ d) / obj.dof)

    def predict(self, params: Any, exog: Any = None) -> np.ndarray:
        """statsmodels' ``MixedLM.predict``: Xβ for the fixed effects in ``params`` (a packed
        vector starting with them, or a MixedLMParams), on the model's exog or ``exog``."""
        beta = (np.asarray(params.fe_params, dtype=float) if isinstance(params, MixedLMParams)
                else np.asarray(params, dtype=float).ravel()[:self.k_fe])
        X = self.exog if exog is None else np.asarray(exog, dtype=float)
        return (X.reshape(-1, self.k_fe) if X.ndim == 1 else X) @ beta

    # -- statsmodels' data attributes ------------------------------------------------------------
    @property
    def exog_re(self) -> np.ndarray:
        """The random-coefficient design (n × k_re; one grouping factor)."""
        return self.engine.spec.Zre

    @property
    def groups(self) -> np.ndarray:
        """The group label of every row (one grouping factor)."""
        spec = self.engine.spec
        return spec.group_labels[spec.group_codes]

    @property
    def group_labels(self) -> list:
        return self.engine.spec.group_labels.tolist()

    @property
    def row_indices(self) -> dict[Any, np.ndarray]:
        """Group label → the row numbers of its rows."""
        spec = self.engine.spec
        order = np.argsort(spec.group_codes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(spec.group_codes, minlength=spec.n_groups))])
        return {lab: order[bounds[g]:bounds[g + 1]] for g, lab in enumerate(spec.group_labels.tolist())}

    @property
    def exog_vc(self) -> dict[str, dict[Any, np.ndarray]]:
        """The variance components' designs as statsmodels' exog_vc[name][group] (rows of
        the group, the component's columns present in it)."""
        spec = self.engine.spec
        lay, tm = spec.layout, spec.theta_map
        rows = self.row_indices
        out: dict[str, dict[Any, np.ndarray]] = {name: {} for name in tm.vc_names}
        for g, lab in enumerate(spec.group_labels.tolist()):
            idx = rows[lab]
            lo, hi = int(lay.q_off[g]) + tm.k, int(lay.q_off[g + 1])
            Z = np.zeros((idx.shape[0], hi - lo))
            for e in range(lay.vc_val.shape[0]):
                coord = lay.vc_coord[e, idx] - tm.k
                val = lay.vc_val[e, idx]
                nz = val != 0
                Z[np.nonzero(nz)[0], coord[nz]] += val[nz]
            comps = lay.comp[lo:hi]
            for v, name in enumerate(tm.vc_names):
                out[name][lab] = Z[:, comps == v]
        return out

    @property
    def data(self) -> ModelData:
        """statsmodels' ``model.data``: names of the response, regressors and parameters."""
        re_names = self.exog_re_names
        full = []
        for i, a in enumerate(re_names):
            for b in re_names[:i]:
                full.append(f"{b} x {a} Cov")
            full.append(f"{a} Var")
        vc = [f"{name} Var" for name in vc_order(self.engine)]
        return ModelData(ynames=self.endog_name, xnames=self.exog_names, exog_re_names=re_names,
                         exog_re_names_full=full, param_names=self.exog_names + full + vc,
                         vcomp_names=[name for name in vc_order(self.engine)])

    # -- fitting ---------------------------------------------------------------------------------
    def fit(
        self,
        start_params: Any = None,
        reml: bool = True,
        niter_sa: int = 0,
        do_cg: bool = True,
        fe_pen: Any = None,
        cov_pen: Any = None,
        free: MixedLMParams | None = None,
        full_output: bool = False,
        method: Any = None,
        *,
        start_theta: np.ndarray | None = None,
        maxiter: int = 500,
        verbose: bool = False,
        callback: Callable[[int, np.ndarray, float], None] | None = None,
        n_threads: int | None = None,
        **ignored: Any,
    ) -> MixedLMResults:
        """Fit by REML (default) or ML: statsmodels' signature, lmefast's optimiser.

        ``start_params``: statsmodels' starting values, a MixedLMParams or a packed vector
        (with or without the fixed effects; Cholesky factor and √vcomp when the model's
        ``use_sqrt``, as statsmodels). ``start_theta``: a starting θ (lme4's ``start``).
        ``free``: a MixedLMParams whose zero entries of cov_re hold those covariances at 0
        (e.g. an identity matrix: uncorrelated random coefficients); patterns that are not
        groups of mutually correlated coefficients, or fixed variances, raise
        NotImplementedError. ``full_output=True`` keeps the optimiser's path in ``res.hist``.

        ``verbose`` prints the objective per iteration; ``callback(iteration, θ, objective)``
        receives it (raise StopIteration to stop). ``n_threads``: threads for the group loops
        and, on the blocked engine, for BLAS (default: lmefast.parallel.get_num_threads() when
        there are many groups; a positive integer).

        statsmodels' optimiser settings (``method``, ``niter_sa``, ``gtol``, ``cov_type``,
        ``use_sqrt``, ...: IGNORED_FIT_KEYWORDS) are accepted with an IgnoredArgumentWarning;
        any other keyword raises TypeError. Penalties (``fe_pen``, ``cov_pen``) and
        ``do_cg=False`` change what is computed and raise NotImplementedError.
        """
        unknown = sorted(set(ignored) - set(IGNORED_FIT_KEYWORDS))
        if unknown:
            raise TypeError(f"fit() got unexpected keyword argument(s) {unknown}")
        given = [name for name, v in (("method", method), ("niter_sa", niter_sa or None))
                 if v is not None] + sorted(ignored)
        if given:
            warnings.warn(
                f"Argument{'s' if len(given) > 1 else ''} {', '.join(given)} ignored by lmefast's "
                "MixedLM.fit: the optimiser is always the bounded quasi-Newton on θ, run to "
                "convergence", IgnoredArgumentWarning, stacklevel=2)
        if fe_pen is not None or cov_pen is not None:
            raise NotImplementedError("penalised fits (fe_pen, cov_pen) are not supported by lmefast")
        if not do_cg:
            raise NotImplementedError("do_cg=False (results at the starting values) is not supported")
        model = self if free is None else self._constrained(free)
        nth = resolve_threads(n_threads, model.engine.n_levels)
        obj = model.engine.objective(reml, nth)   # the engine's θ (its centred, scaled designs)
        tm = model.engine.theta_map
        if start_params is not None and start_theta is not None:
            raise TypeError("give start_params (statsmodels' parameters) or start_theta (θ), not both")
        if start_params is not None:
            pa = to_params(model.engine, start_params, self.k_fe, self.use_sqrt)
            theta0 = theta_of(model.engine, pa.cov_re, pa.vcomp)
        elif start_theta is not None:
            theta0 = np.asarray(start_theta, dtype=float)
            if theta0.shape != (tm.n_theta,):
                raise SpecificationError(
                    f"start_theta must have {tm.n_theta} entries (θ), got {theta0.shape}")
        else:
            theta0 = tm.start()
        if (start_params is not None or start_theta is not None) and np.all(np.isfinite(theta0)):
            with np.errstate(all="ignore"):   # θ on the user's scale → the engine's
                theta0 = model.engine.scaling.theta_internal(tm, theta0)
        hist: list[dict] | None = [] if full_output else None
        user_callback = callback
        if hist is not None:   # the path on the user's scale (θ and objective)
            def callback(it: int, theta: np.ndarray, f: float) -> None:
                hist.append({"iteration": it, "theta": theta, "objective": f})
                if user_callback is not None:
                    user_callback(it, theta, f)
        with limit_blas_threads(nth) if model.engine.uses_blas else nullcontext():
            sol, opt = fit_theta(obj, theta0, maxiter=maxiter, verbose=verbose,
                                 callback=_user_callback(callback, model.engine, reml))
        if not opt.converged:
            warnings.warn(f"the optimiser did not converge: {opt.return_code}; max |gradient| "
                          f"{np.max(np.abs(opt.projected_gradient)):.3g}", ConvergenceWarning, stacklevel=2)
        if opt.singular:
            warnings.warn("boundary (singular) fit: a variance parameter of the random effects is "
                          "estimated as zero (res.singular; see res.summary())", SingularFitWarning,
                          stacklevel=2)
        res = MixedLMResults(model, obj, sol, opt)
        if hist is not None:
            res.hist = hist
        return res

    def _constrained(self, free: MixedLMParams) -> MixedLM:
        """The model with the covariance pattern of ``free`` (lmefast.params.free_pattern)."""
        if not isinstance(free, MixedLMParams):
            raise TypeError(f"free must be a MixedLMParams, not {type(free).__name__}")
        vfree = np.asarray(free.vcomp)
        if vfree.shape[0] != self.k_vc or np.any(vfree == 0):
            if vfree.shape[0] != self.k_vc:
                raise ValueError(f"free.vcomp must have {self.k_vc} entries, got {vfree.shape[0]}")
            raise NotImplementedError("free.vcomp holds a variance component fixed: lmefast fits "
                                      "every variance component")
        if self.k_re == 0:
            return self
        if not isinstance(self.engine, OneFactorEngine):
            raise NotImplementedError("free= is supported for one grouping factor")
        cov = np.atleast_2d(np.asarray(free.cov_re))
        if cov.shape != (self.k_re, self.k_re):
            raise ValueError(f"free.cov_re must be {self.k_re} × {self.k_re}, got {cov.shape}")
        pattern = free_pattern(cov)
        eng = self.engine
        tm = eng.theta_map
        if all(np.array_equal(a, b) for a, b in zip(pattern, tm.tril, strict=True)):
            return self
        spec = replace(eng.spec, theta_map=GroupThetaMap(tm.k, tm.n_vc, tm.re_names, tm.vc_names, pattern))
        engine = OneFactorEngine(spec, crossprods=eng.crossprods, group_sizes=eng._group_sizes,
                                 source=eng.source, lme4_names=eng.lme4_names)
        model = MixedLM.from_engine(engine, api=self.api, endog_name=self.endog_name,
                                    exog_names=self.exog_names, dropped_exog=self.dropped_exog)
        model.use_sqrt, model.pandas_output = self.use_sqrt, self.pandas_output
        return model

    def fit_regularized(self, start_params: Any = None, method: Any = "l1", alpha: Any = 0,
                        ceps: float = 1e-4, ptol: float = 1e-6, maxit: int = 200, **fit_kwargs: Any):
        """statsmodels' L1-penalised (or smooth-penalty) fixed effects: lmefast.regularized."""
        from lmefast.regularized import fit_regularized

        return fit_regularized(self, start_params, method, alpha, ceps, ptol, maxit, **fit_kwargs)

    def get_distribution(self, params: Any, scale: float, exog: Any = None, exog_re: Any = None):
        """statsmodels' ``get_distribution``: an object whose ``rvs`` draws responses from the
        model at ``params`` (lmefast.distribution)."""
        from lmefast.distribution import ModelDistribution

        return ModelDistribution(self, params, scale, exog, exog_re)


def working_rows(y: np.ndarray, X: np.ndarray, Z: np.ndarray, vc_designs: list,
                 weights: np.ndarray | None, offset: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The rows whose plain cross-products are the weighted ones: √w (y − o), √w X, √w Z and
    √w times each variance component's design (DESIGN.md §4)."""
    if offset is not None:
        y = y - offset
    if weights is None:
        return y, X, Z, vc_designs
    s = np.sqrt(weights)
    scale = sp.diags(s)
    vcs = [scale @ sp.csr_matrix(V) if sp.issparse(V) else np.asarray(V) * s[:, None] for V in vc_designs]
    return (np.ascontiguousarray(y * s), np.ascontiguousarray(X * s[:, None]),
            np.ascontiguousarray(Z * s[:, None]), vcs)


def _user_callback(callback: Callable[[int, np.ndarray, float], None] | None, engine: Engine,
                   reml: bool) -> Callable[[int, np.ndarray, float], None] | None:
    """The fit's callback given θ and the objective on the user's scale."""
    sc = engine.scaling
    if callback is None or sc.is_identity:
        return callback
    offset = sc.reml_offset() if reml else 0.0
    return lambda it, theta, f: callback(it, sc.theta(engine.theta_map, theta), f + offset)


def blocked_engine(y: np.ndarray, X: np.ndarray, terms: list[Term], weights: np.ndarray | None = None,
                   offset: np.ndarray | None = None, S: np.ndarray | None = None) -> BlockedEngine:
    """The engine of several grouping factors on the rows in memory: each term's design
    checked (lmefast.checks.check_random_design); the centring and scaling maps
    (lmefast.scaling) chosen on the user's columns and applied to the working rows (prior
    weights and offset, working_rows), the maps kept with the engine. ``S``: the fixed
    effects' map when the caller has it (checked_response_and_design)."""
    S = column_map(X, centre=True) if S is None else S
    Cs = []
    for t in terms:
        mz = column_moments(t.Z)
        C = random_map(t.Z, t.pattern, moments=mz)
        check_random_design(scaled(t.Z, C), t.coef_names, f"({' + '.join(t.coef_names)} | {t.name})",
                            ZtZ=mapped_gram(mz[1], C))
        Cs.append(C)
    y, X, _, _ = working_rows(y, X, np.zeros((len(y), 0)), [], weights, offset)
    sw = None if weights is None else np.sqrt(weights)[:, None]
    terms = [replace(t, Z=scaled(t.Z if sw is None else t.Z * sw, C)) for t, C in zip(terms, Cs, strict=True)]
    engine = BlockedEngine(y, scaled(X, S), terms, weights=weights, offset=offset)
    engine.design_scaling = DesignScaling(S, tuple(Cs))
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
