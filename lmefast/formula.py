"""Formula front end (statsmodels' spelling): formula, groups, re_formula, vc_formula → arrays.

``FormulaPlan`` turns one chunk of rows into designs; every source calls it (a DataFrame in
memory is the one chunk, ``formula_arrays``; Parquet and Dask data call it per chunk,
lmefast.chunked). The rules it applies — the schema (``check_schema``), the missing-value
policy (``complete_rows``), positive weights — are written here once, for lme4's spelling
too (lmefast.lmer.LmerPlan). Used columns are checked first, so that a missing column, a NaN
or a non-numeric response is reported by name. Formulas are parsed once (cached); terms that
are plain numeric columns are copied directly, anything else (categoricals, transforms,
interactions) is evaluated by formulaic.

Names that are not columns of the data (a function like ``times_two(x)``, a constant) are
looked up in the formula's environment, statsmodels' ``eval_env``: by default the namespace
(locals, then globals) of the code that called the front end (``mixedlm``, ``lmer``,
``MixedLM.from_formula``, ``lmer_model``). A front end resolves it once
(``formula_namespace``) and evaluates its formulas inside ``formula_environment``.
"""
from __future__ import annotations

import re
import sys
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from formulaic import Formula, model_matrix
from formulaic.parser.types.factor import Factor

from lmefast._crossprods import rows_from_columns
from lmefast.checks import (
    check_missing_policy,
    check_nonnegative_weights,
    check_rows,
    check_unique_columns,
)
from lmefast.errors import SpecificationError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: the environment of the formulas being evaluated (set by a front end: formula_environment)
_ENVIRONMENT: ContextVar[Mapping[str, object] | None] = ContextVar("lmefast_formula_environment",
                                                                   default=None)


def formula_namespace(eval_env: object = 0, depth: int = 1) -> Mapping[str, object]:
    """statsmodels' ``eval_env`` as a mapping of the names a formula may use besides the data's
    columns. A mapping (or an object with a ``namespace`` mapping, like patsy's
    EvalEnvironment) is used as it is; an integer n means the namespace of the frame n levels
    above the front end's caller, the front end being ``depth`` frames above the caller of
    this function (1: the function that calls this)."""
    if isinstance(eval_env, Mapping):
        return eval_env
    namespace = getattr(eval_env, "namespace", None)
    if isinstance(namespace, Mapping):
        return namespace
    if isinstance(eval_env, bool) or not isinstance(eval_env, int):
        raise TypeError(f"eval_env must be an integer (frames above the caller) or a mapping of "
                        f"names, not {type(eval_env).__name__}")
    if eval_env < 0:
        raise ValueError(f"eval_env must be >= 0, got {eval_env}")
    try:
        frame = sys._getframe(depth + eval_env + 1)
    except ValueError:
        raise ValueError(f"eval_env={eval_env} reaches above the outermost frame") from None
    return ChainMap(dict(frame.f_locals), frame.f_globals)


@contextmanager
def formula_environment(namespace: Mapping[str, object]) -> Iterator[None]:
    """Formulas evaluated inside see ``namespace`` (after the data's columns)."""
    token = _ENVIRONMENT.set(namespace)
    try:
        yield
    finally:
        _ENVIRONMENT.reset(token)


def in_environment(name: str) -> bool:
    """Whether a name a formula uses is defined in the current formula environment."""
    env = _ENVIRONMENT.get()
    return env is not None and name in env


def formula_error(action: str, formula: str, exc: Exception) -> SpecificationError:
    """formulaic's message without its terminal colour codes; a bar `|` gets a hint (lme4's
    random-effects syntax is for ``lmer``)."""
    text = _ANSI.sub("", str(exc)).strip()
    hint = ""
    if "|" in formula:
        hint = (" — random-effects terms like (1 | g) are lme4's syntax: use lmefast.lmer(formula, data) "
                "(or give the groups with groups=/re_formula= and no bar)")
    return SpecificationError(f"cannot {action} formula {formula!r}: {text}{hint}")


@lru_cache(maxsize=512)
def _parse(formula: str) -> Formula:
    """Parsed formula, cached: parsing costs more than evaluating a small model."""
    try:
        return Formula(formula)
    except Exception as exc:  # formulaic raises several types for malformed formulas
        raise formula_error("parse", formula, exc) from None


@lru_cache(maxsize=512)
def _variables(formula: str) -> frozenset[str]:
    """The names a formula uses (cached, as its parse)."""
    return frozenset(str(v) for v in _parse(formula).required_variables)


def _rhs(formula: str) -> str:
    f = formula.strip()
    return f if f.startswith("~") else "~" + f


class Columns(dict):
    """The columns of a DataFrame as Series, each looked up once when first asked for (a
    DataFrame lookup costs more than a small model's arithmetic)."""

    def __init__(self, data: pd.DataFrame) -> None:
        super().__init__()
        self.data = data

    def __missing__(self, name: str) -> pd.Series:
        col = self[name] = self.data[name]
        return col


def _plain_columns(formula: Formula, df: pd.DataFrame, columns: Columns | None = None
                   ) -> list[str | None] | None:
    """Column names (None for the intercept) when every term is the intercept or a numeric
    column taken as is; None otherwise. ``columns``: df's columns already looked up."""
    columns = Columns(df) if columns is None else columns
    out: list[str | None] = []
    for term in formula:
        if len(term.factors) != 1:
            return None
        factor = term.factors[0]
        if factor.eval_method == Factor.EvalMethod.LITERAL and factor.expr == "1":
            out.append(None)
        elif (factor.eval_method == Factor.EvalMethod.LOOKUP and factor.expr in df.columns
              and _numeric(columns[factor.expr].dtype)):
            out.append(factor.expr)
        else:
            return None
    return out


_C_OF_COLUMN = re.compile(r"C\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")


def _indicator_column(formula: Formula, data: pd.DataFrame) -> tuple[Any, list[str]] | None:
    """`0 + C(x)` (or `0 + x` for a string column): the indicator matrix of x's levels (sorted),
    built directly — statsmodels' variance-component idiom, where formulaic costs most of a
    small fit. None for anything else."""
    terms = list(formula)
    if len(terms) != 1 or len(terms[0].factors) != 1:
        return None
    factor = terms[0].factors[0]
    match = _C_OF_COLUMN.fullmatch(factor.expr)
    if match is not None and factor.eval_method == Factor.EvalMethod.PYTHON:
        col = match.group(1)
    elif factor.eval_method == Factor.EvalMethod.LOOKUP:
        col = factor.expr
    else:
        return None
    if col not in data.columns:
        return None
    values = data[col]
    text = pd.api.types.is_string_dtype(values) or values.dtype.kind in "OUS"
    if isinstance(values.dtype, pd.CategoricalDtype) or values.isna().any():
        return None                    # formulaic keeps the categories' order and missing levels
    if not text and (match is None or values.dtype.kind not in "iub"):
        return None                    # a number without C() is a regressor; floats go to formulaic
    codes, levels = pd.factorize(values, sort=True)
    n = len(values)
    matrix = sp.csr_matrix((np.ones(n), codes, np.arange(n + 1)), shape=(n, len(levels)))
    return matrix, [f"{factor.expr}[{lev}]" for lev in levels]


def _numeric(dtype: Any) -> bool:
    """A numeric dtype that is not boolean (booleans are factors in a formula)."""
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def column_kind(dtype: Any) -> str:
    """'numeric' (a number, as a formula takes it) or 'categorical' (anything else)."""
    return "numeric" if _numeric(dtype) else "categorical"


def design_matrix(formula: str, data: pd.DataFrame, *, sparse: bool = False,
                  columns: Columns | None = None) -> tuple[Any, list[str]]:
    """Evaluate a one-sided formula: (n × p matrix, column names); scipy CSR when sparse.
    ``columns``: the data's columns already looked up (Columns over the same data)."""
    parsed = _parse(_rhs(formula))
    if sparse:
        indicator = _indicator_column(parsed, data)
        if indicator is not None:
            return indicator
    cols = Columns(data) if columns is None else columns
    plain = None if sparse else _plain_columns(parsed, data, cols)
    if plain is not None:
        X = rows_from_columns([None if col is None else cols[col].to_numpy(dtype=float)
                               for col in plain], len(data))
        return X, ["Intercept" if c is None else c for c in plain]
    try:
        mm = model_matrix(parsed, data, na_action="ignore", output="sparse" if sparse else "pandas",
                          context=_ENVIRONMENT.get() or {})
    except Exception as exc:
        raise formula_error("evaluate", formula, exc) from None
    names = [str(c) for c in mm.model_spec.column_names]
    if sparse:
        return getattr(mm, "__wrapped__", mm).tocsr(), names
    return rows_from_columns([mm[col].to_numpy(dtype=float) for col in mm.columns], mm.shape[0]), names


def _random_design(re_formula: str, rhs: str, X: np.ndarray, df: pd.DataFrame,
                   columns: Columns) -> tuple[np.ndarray, list[str]]:
    """design_matrix(re_formula): when its columns are plain columns that the fixed-effects
    design X (of ``rhs``) holds side by side, the view of those columns of X (no copy; the
    model then takes their statistics from X's, MixedLM)."""
    plain_z = _plain_columns(_parse(_rhs(re_formula)), df, columns)
    plain_x = _plain_columns(_parse(_rhs(rhs)), df, columns) if plain_z else None
    if plain_z and plain_x:
        k = len(plain_z)
        for a in range(len(plain_x) - k + 1):
            if plain_x[a:a + k] == plain_z:
                return X[:, a:a + k], ["Intercept" if c is None else c for c in plain_z]
    return design_matrix(re_formula, df, columns=columns)


def as_dataframe(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        return pd.DataFrame(dict(data))
    raise SpecificationError(f"data must be a pandas DataFrame or a mapping of columns, "
                             f"not {type(data).__name__}")


# -- one chunk of rows → designs: the rules of statsmodels' spelling, written once -------------
_C_CALL = re.compile(r"\bC\(\s*([A-Za-z_][A-Za-z0-9_.]*)")
_STATEFUL = ("center(", "scale(", "standardize(", "poly(", "bs(", "cr(", "cs(", "cc(", "te(",
             "hashed(", "lag(")
#: the columns that formula_arrays adds for groups, weights and an offset given as arrays
ADDED_COLUMNS = {"__lmefast_groups__": "groups", "__lmefast_weights__": "weights",
          "__lmefast_offset__": "offset"}


@dataclass
class Designs:
    """One chunk's arrays, for the rows kept (``keep``: which rows of the chunk those are):
    the response, the fixed-effects design X, the random coefficients' design Z (a view of
    X's columns where it is a run of them), the group labels, the variance components'
    sparse designs, the prior weights and the offset (None when the plan has none)."""

    y: np.ndarray | None
    X: np.ndarray
    Z: np.ndarray
    groups: pd.Series | None
    keep: np.ndarray
    V: list
    weights: np.ndarray | None = None
    offset: np.ndarray | None = None


class RowRules:
    """Which rows of a chunk a fit uses, for both spellings' plans (FormulaPlan here,
    lmefast.lmer.LmerPlan): the missing-value policy over the used columns, and positive
    weights."""

    used: list[str]
    missing: str
    weights: str | None

    def _name(self, column: str) -> str:
        """A column as the user knows it (the added columns by what they hold)."""
        return ADDED_COLUMNS.get(column, column)

    def rows_kept(self, df: pd.DataFrame, where: str, cols: Iterable[str] | None = None,
                  missing: str | None = None, *, weighted: bool = True,
                  columns: Columns | None = None) -> np.ndarray:
        """The rows a fit uses: complete (``complete_rows``, by the plan's missing-value policy
        or ``missing``) and, when ``weighted``, of positive weight (``positive_weights``).
        ``cols``: the columns to judge (default: every used one)."""
        columns = Columns(df) if columns is None else columns
        keep = complete_rows(columns, self.used if cols is None else cols,
                             self.missing if missing is None else missing, where, self._name)
        if weighted and self.weights is not None:
            keep &= positive_weights(columns[self.weights], where, keep)
        return keep


@dataclass
class FormulaPlan(RowRules):
    """statsmodels' spelling (formula, groups, re_formula, vc_formula, weights, offset) resolved
    into the rules that turn one chunk of rows into designs (``design``). Every source calls
    it: a DataFrame in memory once, with all its rows (``all_rows``: levels and the state of
    transforms such as center() are taken from the data, by formulaic), data in chunks once
    per chunk, with the levels of each categorical variable fixed by a first pass over all
    chunks (``levels``, lmefast.chunked.ChunkPlan).

    ``kinds``: each used column's kind ('numeric' or 'categorical'), from the schema
    (``set_kinds``). ``xnames``/``znames``/``vnames``: the design's columns, set by the first
    chunk evaluated; every other chunk must give the same.
    """

    formula: str
    yname: str
    rhs: str
    re_formula: str | None
    group: str
    missing: str
    used: list[str]
    c_vars: frozenset[str]
    vc_names: tuple[str, ...] = ()
    vc_formulas: tuple[str, ...] = ()
    weights: str | None = None         # columns of prior weights and of an offset
    offset: str | None = None
    all_rows: bool = False
    group_name: str | None = None      # the group's name in the results (default: its column's)
    kinds: dict[str, str] = field(default_factory=dict)
    levels: dict[str, list] = field(default_factory=dict)
    xnames: list[str] | None = None
    znames: list[str] | None = None
    vnames: list[tuple[str, ...]] | None = None

    @classmethod
    def from_formula(cls, formula: str, groups: Any, re_formula: str | None, vc_formula: Any,
                     missing: str, weights: Any = None, offset: Any = None, *,
                     all_rows: bool = False, group_name: str | None = None) -> Any:
        """The plan; ``groups``, ``weights`` and ``offset`` are names of columns (formula_arrays
        adds arrays as columns first). With ``all_rows`` False (data in chunks) transforms that
        depend on all rows are refused, and a column may not be both inside C() and a number."""
        check_missing_policy(missing)
        rowwise = check_rowwise_columns(weights, offset)
        vc_formula = dict(vc_formula or {})
        if not isinstance(formula, str) or "~" not in formula:
            raise SpecificationError(f"formula {formula!r} has no '~'")
        lhs, rhs = formula.split("~", 1)
        yname = lhs.strip()
        if not yname:
            raise SpecificationError(f"formula {formula!r} has no response")
        if groups is None:
            raise SpecificationError("groups is required: a column name or one label per row")
        if not isinstance(groups, str):
            raise SpecificationError("groups must be the name of a column for Parquet or Dask data")
        texts = [formula] + ([] if re_formula is None else [re_formula]) + list(vc_formula.values())
        used = set(_variables(formula))
        if re_formula is not None:
            used |= _variables(_rhs(re_formula))
        for vf in vc_formula.values():
            used |= _variables(_rhs(vf))
        used.add(groups)
        used |= set(rowwise)
        c_vars: set[str] = set()
        if not all_rows:
            _check_chunkwise(texts)
            for text in texts:
                c_vars |= set(_C_CALL.findall(text))
                stripped = _C_CALL.sub("C(", text)
                outside = set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", re.sub(r"\bC\([^)]*\)", "", stripped)))
                both = c_vars & outside
                if both:
                    raise SpecificationError(f"column(s) {sorted(both)} used both inside C() and as "
                                             "numbers: not supported for Parquet or Dask data")
        return cls(formula=formula, yname=yname, rhs=rhs, re_formula=re_formula, group=groups,
                   missing=missing, used=sorted(used), c_vars=frozenset(c_vars),
                   vc_names=tuple(str(k) for k in vc_formula), vc_formulas=tuple(vc_formula.values()),
                   weights=weights, offset=offset, all_rows=all_rows, group_name=group_name)

    @property
    def group_label(self) -> str:
        return self.group if self.group_name is None else self.group_name

    @property
    def fit_only_columns(self) -> list[str]:
        """Columns a fit reads that predictions for new data do not: the response, weights, offset."""
        return [c for c in (self.yname, self.weights, self.offset) if c is not None]

    def _name(self, column: str) -> str:
        return self.group_label if column == self.group else super()._name(column)

    # -- the schema -------------------------------------------------------------------------------
    def set_kinds(self, dtypes: Any, where: str) -> None:
        """Each used column's kind from a schema (``check_schema``)."""
        self.used, self.kinds = check_schema(dtypes, self.used, self.yname, where,
                                             {"weights": self.weights, "offset": self.offset},
                                             keep=(self.group,))

    @property
    def level_vars(self) -> list[str]:
        """Predictors whose levels are fixed across chunks: categorical columns and C() arguments."""
        return sorted(c for c in self.used if c != self.group and c not in self.fit_only_columns
                      and (self.kinds.get(c) == "categorical" or c in self.c_vars))

    # -- one chunk → arrays -------------------------------------------------------------------
    def check_columns(self, df: pd.DataFrame, cols: Iterable[str], where: str) -> None:
        """A chunk has the columns, each of the schema's kind."""
        check_has_columns(df.columns, cols, where)
        for c in cols:
            kind = self.kinds.get(c)
            if kind is None:
                continue
            got = column_kind(df[c].dtype)
            if got != kind and not (c == self.group or df[c].isna().all()):
                raise SpecificationError(f"column {c!r} is {got} (dtype {df[c].dtype}) in {where} but "
                                         f"{kind} elsewhere; give it one type in every file or partition")

    def categorise(self, df: pd.DataFrame, where: str) -> pd.DataFrame:
        """Categorical predictors as pandas Categoricals with the plan's levels."""
        if not self.levels:
            return df
        df = df.copy(deep=False)
        for c, lev in self.levels.items():
            if c not in df.columns:
                continue
            col = df[c]
            if isinstance(col.dtype, pd.CategoricalDtype):
                col = col.astype(col.dtype.categories.dtype)
            unseen = ~(col.isin(lev).to_numpy() | col.isna().to_numpy())
            if unseen.any():
                new = sorted({str(v) for v in col[unseen].unique()})[:10]
                raise SpecificationError(f"column {c!r} has level(s) {new} in {where} that are not "
                                         f"among the levels of the model ({lev[:10]})")
            df[c] = pd.Categorical(col, categories=lev)
        return df

    def vc_designs(self, df: pd.DataFrame, where: str) -> list:
        """The variance components' sparse designs (their column names checked)."""
        out, names = [], []
        for vf in self.vc_formulas:
            V, vn = design_matrix(vf, df, sparse=True)
            out.append(V)
            names.append(tuple(_vc_column_label(c) for c in vn))
        if self.vnames is None:
            self.vnames = names
        elif names != self.vnames:
            raise SpecificationError(f"{where} gives variance-component columns {names}, other chunks "
                                     f"{self.vnames}")
        return out

    def design(self, df: pd.DataFrame, where: str, *, need_y: bool = True, need_group: bool = True,
               missing: str | None = None, columns: Columns | None = None) -> Designs:
        """One chunk's designs, for its rows kept: complete rows (or an error, by the missing
        policy: the plan's, or ``missing``) and, with ``need_y`` (the rows of the fit), of
        positive weight. Without ``need_y`` (new data) the response, weights and offset are not
        read; without ``need_group`` neither are the groups (nor the variance components).
        ``columns``: df's columns already looked up."""
        cols = [c for c in self.used if (need_y or c not in self.fit_only_columns)
                and (need_group or c != self.group)]
        if not self.all_rows:
            self.check_columns(df, cols, where)
        columns = Columns(df) if columns is None else columns
        keep = self.rows_kept(df, where, cols, missing, weighted=need_y, columns=columns)
        if self.all_rows and need_y and not keep.any():
            check_rows(0, dropped=len(df) > 0)
        if not keep.all():
            df = df.loc[keep]
            columns = Columns(df)
        if self.levels:
            df = self.categorise(df[cols], where)
            columns = Columns(df)
        X, xnames = design_matrix(self.rhs, df, columns=columns)
        Z, znames = _random_design("1" if self.re_formula is None else self.re_formula, self.rhs, X,
                                   df, columns)
        znames = [self.group_label if c == "Intercept" else c for c in znames]
        if self.xnames is None:
            self.xnames, self.znames = xnames, znames
        elif xnames != self.xnames or znames != self.znames:
            raise SpecificationError(f"{where} gives design columns {xnames} / {znames}, other chunks "
                                     f"{self.xnames} / {self.znames}")
        y = columns[self.yname].to_numpy(dtype=float) if need_y else None
        V = self.vc_designs(df, where) if self.vc_formulas and need_group else []
        out = Designs(y, X, Z, columns[self.group] if need_group else None, keep, V)
        if need_y:
            if self.weights is not None:
                out.weights = columns[self.weights].to_numpy(dtype=float)
            if self.offset is not None:
                out.offset = columns[self.offset].to_numpy(dtype=float)
        return out


def check_schema(dtypes: Any, used: list[str], yname: str, where: str, rowwise: Mapping[str, str | None],
                 keep: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The checks of the columns a model uses against a schema (pandas dtypes by column name:
    a Series, or an object with ``in``, ``[]`` and ``names``), for every source: no duplicate
    names, every used column present (absent ones named; a name that the formula's environment
    defines is not a column, unless in ``keep``), a numeric response and numeric ``rowwise``
    columns (what → column: weights, offset). Returns the used columns that are columns of the
    data and each one's kind ('numeric' or 'categorical'). ``where``: the data as errors name
    them."""
    names = dtypes.index if isinstance(dtypes, pd.Series) else dtypes.names
    check_unique_columns(names, set(used) | {yname})
    absent = [c for c in used if c not in dtypes]
    if absent:
        missing_cols = sorted(c for c in absent if not in_environment(c) or c in keep)
        if missing_cols:
            raise SpecificationError(f"column(s) {missing_cols} not found in {where} "
                                     f"(columns are {[str(c) for c in names][:20]})")
        used = [c for c in used if c in dtypes]
    if yname not in dtypes:
        raise SpecificationError(f"response {yname!r} must be a column of data")
    kinds = {c: column_kind(dtypes[c]) for c in used}
    if kinds[yname] != "numeric":
        raise SpecificationError(f"response '{yname}' is not numeric (dtype {dtypes[yname]})")
    for what, c in rowwise.items():
        if c is not None and kinds[c] != "numeric":
            raise SpecificationError(f"{what} column {ADDED_COLUMNS.get(c, c)!r} is not numeric "
                                     f"(dtype {dtypes[c]})")
    return used, kinds


def check_has_columns(names: Iterable[Any], cols: Iterable[str], where: str) -> None:
    """One chunk (or file, partition) of data in chunks has the used columns: an error naming
    the absent ones."""
    have = set(names)
    absent = sorted(c for c in cols if c not in have)
    if absent:
        raise SpecificationError(f"{where} has no column(s) {absent} (its columns are "
                                 f"{[str(c) for c in names][:20]})")


def complete_rows(columns: Columns, cols: Iterable[str], missing: str, where: str,
                  name: Callable[[str], str] = str) -> np.ndarray:
    """The missing-value policy, for every source: rows with every value of ``cols`` present
    (and finite when numeric); unless ``missing`` is 'drop', an error naming the incomplete
    columns (``name``: a column as the user knows it) with their counts."""
    na = {}
    for c in cols:
        v = _not_finite(columns[c])
        if v is not None and v.any():
            na[c] = v
    if not na:
        return np.ones(len(columns.data), dtype=bool)
    if missing != "drop":
        bad = {name(c): int(v.sum()) for c, v in na.items()}
        raise SpecificationError(
            f"missing or infinite values in column(s) {bad} (count per column) in {where}; "
            "pass missing='drop' to drop incomplete rows")
    return ~np.logical_or.reduce(list(na.values()))


def _check_chunkwise(texts: list[str]) -> None:
    """Transforms whose state depends on all rows cannot be evaluated chunk by chunk."""
    for text in texts:
        low = text.replace(" ", "")
        bad = [s[:-1] for s in _STATEFUL if s in low]
        if bad:
            raise SpecificationError(
                f"stateful transform(s) {bad} in {text!r} depend on all rows and cannot be "
                "evaluated chunk by chunk; compute the column beforehand")


def check_rowwise_columns(weights: Any, offset: Any) -> list[str]:
    """The names of the weights and offset columns (None: not given); anything but a name raises."""
    out = []
    for what, v in (("weights", weights), ("offset", offset)):
        if v is None:
            continue
        if not isinstance(v, str):
            raise SpecificationError(f"{what} for Parquet or Dask data must be the name of a column, "
                                     f"not a {type(v).__name__}")
        out.append(v)
    return out


def positive_weights(w: pd.Series, where: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of positive weight (zero weights drop their rows); negative weights (among ``rows``)
    raise. Missing weights are not positive (the missing-value policy decides about them)."""
    v = w.to_numpy(dtype=float, na_value=np.nan)
    check_nonnegative_weights(v, where, rows)
    return v > 0


def as_column(df: pd.DataFrame, values: Any, what: str) -> tuple[pd.DataFrame, str]:
    """``values`` (a column's name, or one value per row) as a column of the data: (the data,
    the column's name)."""
    if isinstance(values, str):
        if values not in df.columns:
            raise SpecificationError(f"{what}={values!r} is not a column of data")
        return df, values
    name = next(k for k, v in ADDED_COLUMNS.items() if v == what)
    if what == "groups":
        v = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
        if v.ndim != 1:
            v = v.ravel()
    else:
        v = np.asarray(values, dtype=float).ravel()
    if v.shape[0] != len(df):
        if what == "groups":
            raise SpecificationError(f"groups has {v.shape[0]} labels; data has {len(df)} rows")
        raise SpecificationError(f"{what} have {v.shape[0]} entries but data has {len(df)} rows")
    df = df.copy(deep=False)
    df[name] = v
    return df, name


def formula_arrays(
    formula: str,
    data: Any,
    groups: Any,
    re_formula: str | None,
    vc_formula: Mapping[str, str] | None,
    missing: str,
    weights: Any = None,
    offset: Any = None,
) -> dict[str, Any]:
    """Evaluate statsmodels-style formulas into the keyword arguments of ``MixedLM``: the data
    are the one chunk of ``FormulaPlan`` (all rows: levels from the data). ``groups``,
    ``weights`` and ``offset`` (a column's name, or one value per row) follow the rows kept."""
    df = as_dataframe(data)
    check_missing_policy(missing)
    if groups is None:
        raise SpecificationError("groups is required: a column name or one label per row")
    gname = groups if isinstance(groups, str) else str(getattr(groups, "name", None) or "Group")
    if not isinstance(groups, str):
        df, groups = as_column(df, groups, "groups")
    if weights is not None:
        df, weights = as_column(df, weights, "weights")
    if offset is not None:
        df, offset = as_column(df, offset, "offset")
    plan = FormulaPlan.from_formula(formula, groups, re_formula, vc_formula, missing, weights, offset,
                                    all_rows=True, group_name=gname)
    columns = Columns(df)
    plan.set_kinds(DtypesOf(columns), "data")
    d = plan.design(df, "data", columns=columns)
    kwargs: dict[str, Any] = {
        "endog": d.y, "exog": d.X, "groups": _indexed_from_zero(d.groups), "missing": "raise",
        "endog_name": plan.yname, "exog_names": plan.xnames, "group_name": gname, "exog_re": d.Z,
        "exog_re_names": plan.znames, "weights": d.weights, "offset": d.offset,
    }
    if vc_formula:
        kwargs["vc_designs"] = d.V
        kwargs["vc_names"] = list(plan.vc_names)
        kwargs["vc_col_names"] = list(plan.vnames or [])
    return kwargs


class DtypesOf:
    """The dtypes of a DataFrame's columns as a mapping, each looked up when asked for (the
    schema of data in memory, without building df.dtypes)."""

    def __init__(self, columns: Columns) -> None:
        self.columns = columns

    def __contains__(self, name: object) -> bool:
        return name in self.columns.data.columns

    def __getitem__(self, name: str) -> Any:
        return self.columns[name].dtype

    @property
    def names(self) -> pd.Index:
        return self.columns.data.columns


def _not_finite(col: pd.Series) -> np.ndarray | None:
    """Rows where a column is missing, or infinite when numeric; None for a column that cannot
    be (numpy integers and booleans)."""
    if isinstance(col.dtype, np.dtype):
        if col.dtype.kind == "f":               # numpy floats: missing is NaN (no copy made)
            return ~np.isfinite(col.to_numpy())
        if col.dtype.kind in "iub":
            return None
    if pd.api.types.is_float_dtype(col):
        return ~np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
    return col.isna().to_numpy()


def _indexed_from_zero(s: pd.Series) -> pd.Series:
    """s with the index 0..n−1 (s itself when it has it already: no copy)."""
    index = s.index
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return s
    return s.reset_index(drop=True)


def _vc_column_label(name: str) -> str:
    """'C(cask)[a]' → 'a'; other column names unchanged."""
    if name.endswith("]") and "[" in name:
        return name[name.rindex("[") + 1:-1].removeprefix("T.")
    return name
