"""Formula front end (statsmodels' spelling): formula, groups, re_formula, vc_formula → arrays.

Used columns are checked first, so that a missing column, a NaN or a non-numeric response is
reported by name. Formulas are parsed once (cached); terms that are plain numeric columns are
copied directly, anything else (categoricals, transforms, interactions) is evaluated by
formulaic.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from formulaic import Formula, model_matrix
from formulaic.parser.types.factor import Factor

from lmefast._crossprods import rows_from_columns
from lmefast.checks import check_missing_policy, check_unique_columns
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


def _variables(formula: str) -> set[str]:
    return {str(v) for v in _parse(formula).required_variables}


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
    """Evaluate statsmodels-style formulas into the keyword arguments of ``MixedLM``;
    ``weights`` and ``offset`` (a column name or one value per row) follow the rows kept."""
    df = as_dataframe(data)
    extra = {}
    for key, values in (("weights", weights), ("offset", offset)):
        if values is None:
            continue
        col = f"__lmefast_{key}__"
        v = df[values] if isinstance(values, str) and values in df.columns else values
        v = np.asarray(v, dtype=float).ravel()
        if v.shape[0] != len(df):
            raise SpecificationError(f"{key} have {v.shape[0]} entries but data has {len(df)} rows")
        df = df.copy(deep=False)
        df[col] = v
        extra[key] = col
    check_missing_policy(missing)
    if not isinstance(formula, str) or "~" not in formula:
        raise SpecificationError(f"formula {formula!r} has no '~'")
    lhs, rhs = formula.split("~", 1)
    yname = lhs.strip()
    if not yname:
        raise SpecificationError(f"formula {formula!r} has no response")
    used = _variables(formula)
    if re_formula is not None:
        used |= _variables(_rhs(re_formula))
    for vf in (vc_formula or {}).values():
        used |= _variables(_rhs(vf))
    used |= set(extra.values())
    if isinstance(groups, str):
        gname = groups
        used.add(groups)
    elif groups is None:
        raise SpecificationError("groups is required: a column name or one label per row")
    else:
        gname = str(getattr(groups, "name", None) or "Group")
    check_unique_columns(df.columns, used | {yname})
    missing_cols = sorted(c for c in used if c not in df.columns and not in_environment(c))
    if missing_cols:
        raise SpecificationError(f"column(s) {missing_cols} not found in data "
                                 f"(columns are {[str(c) for c in df.columns][:20]})")
    used = {c for c in used if c in df.columns}
    if yname not in df.columns:
        raise SpecificationError(f"response {yname!r} must be a column of data")
    columns = Columns(df)
    if not _numeric(columns[yname].dtype):
        raise SpecificationError(f"response '{yname}' is not numeric (dtype {columns[yname].dtype})")
    g = columns[groups] if isinstance(groups, str) else pd.Series(np.asarray(groups))
    if len(g) != len(df):
        raise SpecificationError(f"groups has {len(g)} labels; data has {len(df)} rows")
    g = _indexed_from_zero(g)
    g_na = _missing(g)
    na = {c: g_na if c == gname else _not_finite(columns[c]) for c in sorted(used)}
    na[gname] = g_na
    bad = {c: int(v.sum()) for c, v in na.items() if v.any()}
    if bad:
        if missing != "drop":
            raise SpecificationError(
                f"missing or infinite values in column(s) {bad} (count per column); "
                "pass missing='drop' to drop incomplete rows")
        keep = ~np.logical_or.reduce([na[c] for c in bad])
        df = df.loc[keep]
        columns = Columns(df)
        g = g.loc[keep].reset_index(drop=True)
    if len(df) == 0:
        raise SpecificationError("the data are empty: no rows to fit"
                                 + (" after dropping missing values" if bad else ""))
    X, xnames = design_matrix(rhs, df, columns=columns)
    Zre, re_names = _random_design("1" if re_formula is None else re_formula, rhs, X, df, columns)
    kwargs: dict[str, Any] = {
        "endog": columns[yname].to_numpy(dtype=float), "exog": X, "groups": g, "missing": "raise",
        "endog_name": yname, "exog_names": xnames, "group_name": gname, "exog_re": Zre,
        "exog_re_names": [gname if c == "Intercept" else c for c in re_names],
    }
    for key, col in extra.items():
        kwargs[key] = columns[col].to_numpy(dtype=float)
    if vc_formula:
        designs, names, colnames = [], [], []
        for name, vf in vc_formula.items():
            V, vnames = design_matrix(vf, df, sparse=True)
            designs.append(V)
            names.append(str(name))
            colnames.append(tuple(_vc_column_label(c) for c in vnames))
        kwargs["vc_designs"] = designs
        kwargs["vc_names"] = names
        kwargs["vc_col_names"] = colnames
    return kwargs


def _not_finite(col: pd.Series) -> np.ndarray:
    """Rows where a column is missing, or infinite when numeric."""
    if isinstance(col.dtype, np.dtype):
        if col.dtype.kind == "f":               # numpy floats: missing is NaN (no copy made)
            return ~np.isfinite(col.to_numpy())
        if col.dtype.kind in "iub":             # numpy integers and booleans: never missing
            return np.zeros(len(col), dtype=bool)
    if pd.api.types.is_float_dtype(col):
        return ~np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
    return col.isna().to_numpy()


def _missing(col: pd.Series) -> np.ndarray:
    """Rows where a column is missing (numpy integers and booleans never are)."""
    if isinstance(col.dtype, np.dtype) and col.dtype.kind in "iub":
        return np.zeros(len(col), dtype=bool)
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
