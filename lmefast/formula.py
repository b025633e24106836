"""Formula front end (statsmodels' spelling): formula, groups, re_formula, vc_formula → arrays.

Formulas are evaluated by formulaic. Used columns are checked first, so that a missing column,
a NaN or a non-numeric response is reported by name.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from formulaic import Formula, model_matrix

from lmefast.spec import SpecificationError


def _variables(formula: str) -> set[str]:
    try:
        return {str(v) for v in Formula(formula).required_variables}
    except Exception as exc:  # formulaic raises several types for malformed formulas
        raise SpecificationError(f"cannot parse formula {formula!r}: {exc}") from None


def _rhs(formula: str) -> str:
    f = formula.strip()
    return f if f.startswith("~") else "~" + f


def _matrix(formula: str, data: pd.DataFrame, *, sparse: bool = False):
    try:
        return model_matrix(_rhs(formula), data, na_action="ignore",
                            output="sparse" if sparse else "pandas")
    except Exception as exc:
        raise SpecificationError(f"cannot evaluate formula {formula!r}: {exc}") from None


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
) -> dict[str, Any]:
    """Evaluate statsmodels-style formulas into the keyword arguments of ``MixedLM``."""
    df = as_dataframe(data)
    if "~" not in formula:
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
    if isinstance(groups, str):
        gname = groups
        used.add(groups)
    elif groups is None:
        raise SpecificationError("groups is required: a column name or one label per row")
    else:
        gname = getattr(groups, "name", None) or "Group"
    missing_cols = sorted(c for c in used if c not in df.columns)
    if missing_cols:
        raise SpecificationError(f"column(s) {missing_cols} not found in data "
                                 f"(columns are {[str(c) for c in df.columns][:20]})")
    if yname not in df.columns:
        raise SpecificationError(f"response {yname!r} must be a column of data")
    if not pd.api.types.is_numeric_dtype(df[yname]) or pd.api.types.is_bool_dtype(df[yname]):
        raise SpecificationError(f"response '{yname}' is not numeric (dtype {df[yname].dtype})")
    cols = sorted(used)
    sub = df[cols]
    g = df[groups] if isinstance(groups, str) else pd.Series(np.asarray(groups), index=df.index)
    if len(g) != len(df):
        raise SpecificationError(f"groups has {len(g)} labels; data has {len(df)} rows")
    na = sub.isna()
    g_na = g.isna().to_numpy()
    if na.to_numpy().any() or g_na.any():
        if missing == "drop":
            keep = ~(na.to_numpy().any(axis=1) | g_na)
            df = df.loc[keep]
            g = g.loc[keep]
            if len(df) == 0:
                raise SpecificationError("no complete rows remain after dropping missing values")
        else:
            bad = [c for c in cols if na[c].any()] + ([gname] if g_na.any() else [])
            counts = {c: int(na[c].sum()) if c in na else int(g_na.sum()) for c in bad}
            raise SpecificationError(
                f"missing values in column(s) {counts} (count per column); "
                "pass missing='drop' to drop incomplete rows")
    if len(df) == 0:
        raise SpecificationError("the data are empty: no rows to fit")
    mm = _matrix(rhs, df)
    y = df[yname].to_numpy(dtype=float)
    X = np.ascontiguousarray(mm.to_numpy(dtype=float))
    xnames = [str(c) for c in mm.columns]
    if re_formula is None:
        re_formula = "1"
    kwargs: dict[str, Any] = {
        "endog": y, "exog": X, "groups": g.to_numpy(), "missing": "raise",
        "endog_name": yname, "exog_names": xnames, "group_name": gname,
    }
    re_mm = _matrix(re_formula, df)
    re_names = [gname if c == "Intercept" else str(c) for c in re_mm.columns]
    kwargs["exog_re"] = np.ascontiguousarray(re_mm.to_numpy(dtype=float)) if re_names \
        else np.zeros((len(df), 0))
    kwargs["exog_re_names"] = re_names
    if vc_formula:
        designs, names, colnames = [], [], []
        for name, vf in vc_formula.items():
            mm_vc = _matrix(vf, df, sparse=True)
            designs.append(getattr(mm_vc, "__wrapped__", mm_vc).tocsr())
            names.append(str(name))
            colnames.append(tuple(_vc_column_label(str(c)) for c in mm_vc.model_spec.column_names))
        kwargs["vc_designs"] = designs
        kwargs["vc_names"] = names
        kwargs["vc_col_names"] = colnames
    return kwargs


def _vc_column_label(name: str) -> str:
    """'C(cask)[a]' → 'a'; other column names unchanged."""
    if name.endswith("]") and "[" in name:
        return name[name.rindex("[") + 1:-1].removeprefix("T.")
    return name
