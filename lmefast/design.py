"""Designs for new rows: the fit's column names turned back into columns of new data.

The formula front end names columns 'Intercept' (or the grouping factor's name for the random
intercept, statsmodels' convention), a numeric column by its name, 'var[T.level]' for a level
of a categorical variable (treatment coding), and products 'a:b'.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from lmefast.errors import PredictionError

_LEVEL = re.compile(r"^(?P<var>.+?)\[(?:T\.)?(?P<level>.+)\]$")


def _column(df: pd.DataFrame, name: str, intercepts: set[str]) -> np.ndarray:
    if name in intercepts:
        return np.ones(len(df))
    if name in df.columns:
        col = df[name]
        if not pd.api.types.is_numeric_dtype(col):
            raise PredictionError(f"column {name!r} of newdata is not numeric")
        return col.to_numpy(dtype=float)
    m = _LEVEL.match(name)
    if m and m["var"] in df.columns:
        values = df[m["var"]].astype(str).to_numpy()
        return (values == m["level"]).astype(float)
    if ":" in name:
        out = np.ones(len(df))
        for part in name.split(":"):
            out = out * _column(df, part, intercepts)
        return out
    raise PredictionError(f"newdata has no column for {name!r}")


def _needed(names: list[str], intercepts: set[str]) -> set[str]:
    out = set()
    for name in names:
        for part in name.split(":"):
            if part in intercepts:
                continue
            m = _LEVEL.match(part)
            out.add(m["var"] if m else part)
    return out


def design(df: pd.DataFrame, names: list[str], intercepts: set[str], what: str) -> np.ndarray:
    missing = sorted(c for c in _needed(names, intercepts) if c not in df.columns)
    if missing:
        raise PredictionError(f"newdata is missing column(s) {missing} needed for the {what} "
                              f"(columns {names})")
    X = np.column_stack([_column(df, n, intercepts) for n in names]) if names else np.zeros((len(df), 0))
    bad = ~np.isfinite(X).all(axis=0)
    if bad.any():
        raise PredictionError(f"newdata has NaN or infinite values in {[names[j] for j in np.nonzero(bad)[0]]}")
    return X


def level_index(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value among the fit's labels (as stored, or by string form); −1 if new."""
    lookup = {lab: i for i, lab in enumerate(labels.tolist())}
    slookup = {str(lab): i for i, lab in enumerate(labels.tolist())}
    return np.array([lookup.get(v, slookup.get(str(v), -1)) for v in values], dtype=np.int64)
