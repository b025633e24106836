"""Predictions from a fit: Xβ̂ (population) or Xβ̂ + Zb̂ (conditional on the groups' modes).

New data are turned into design columns from the fit's column names, as the formula front end
names them: 'Intercept' (or the grouping factor's name for the random intercept, statsmodels'
convention), a numeric column by its name, 'var[T.level]' for a level of a categorical
variable (treatment coding), and products 'a:b'. A row whose group was not in the fit gets the
population prediction (new_levels='population') or raises (new_levels='error').

Several grouping factors (lmer fits): newdata needs every grouping factor's column(s) (both
'batch' and 'cask' for the nested factor 'batch:cask'); each factor contributes Z_j b̂_j of
the row's level, and a level not in the fit contributes nothing for that factor only (lme4's
allow.new.levels=TRUE), or raises with new_levels='error'.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


class PredictionError(ValueError):
    """New data that cannot be used for prediction (the message names the column)."""


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


def predict(res: MixedLMResults, newdata: Any = None, include_random: bool = True,
            new_levels: str = "population", exog: Any = None, exog_re: Any = None,
            groups: Any = None) -> np.ndarray:
    """Predictions for the fitted rows (newdata None) or for new rows: a DataFrame, or the
    arrays exog (n × p) / exog_re (n × k) / groups (n labels)."""
    if new_levels not in ("population", "error"):
        raise PredictionError(f"new_levels must be 'population' or 'error', not {new_levels!r}")
    if not hasattr(res.model, "spec"):
        return _predict_multi(res, newdata, include_random, new_levels, exog)
    spec = res.model.spec
    beta = res._sol.beta
    if newdata is None and exog is None:
        return res.fittedvalues.copy() if include_random else spec.X @ beta
    gname = spec.group_name
    intercepts = {"Intercept", "(Intercept)", "const"}
    if newdata is not None:
        if not isinstance(newdata, pd.DataFrame):
            raise PredictionError(f"newdata must be a pandas DataFrame, not {type(newdata).__name__}")
        X = design(newdata, list(res.model.exog_names), intercepts, "fixed effects")
    else:
        X = np.atleast_2d(np.asarray(exog, dtype=float))
        if X.shape[1] != res.k_fe:
            raise PredictionError(f"exog must have {res.k_fe} columns {res.model.exog_names}, got {X.shape[1]}")
    pred = X @ beta
    if not include_random:
        return pred
    if getattr(spec, "theta_map", None) is not None and spec.theta_map.n_vc:
        raise PredictionError("conditional predictions on new data are not implemented for models with "
                              "variance components; use include_random=False")
    re_names = list(res.model.exog_re_names)
    if newdata is not None:
        if gname not in newdata.columns:
            raise PredictionError(f"newdata is missing the grouping column {gname!r}")
        Z = design(newdata, re_names, intercepts | {gname}, "random effects")
        g = newdata[gname].to_numpy()
    else:
        if groups is None:
            raise PredictionError("groups is required with exog when include_random=True")
        g = np.asarray(groups)
        Z = np.ones((len(X), 1)) if exog_re is None else np.atleast_2d(np.asarray(exog_re, dtype=float))
        if Z.shape[1] != res.k_re:
            raise PredictionError(f"exog_re must have {res.k_re} columns {re_names}, got {Z.shape[1]}")
    if len(g) != len(X):
        raise PredictionError(f"groups has {len(g)} labels for {len(X)} rows")
    re = res.random_effects_frame
    labels = re.index
    # match labels as the fit stored them, and by their string form
    lookup = {lab: i for i, lab in enumerate(labels.tolist())}
    slookup = {str(lab): i for i, lab in enumerate(labels.tolist())}
    idx = np.array([lookup.get(v, slookup.get(str(v), -1)) for v in g], dtype=np.int64)
    new = idx < 0
    if new.any() and new_levels == "error":
        raise PredictionError(f"group level(s) {sorted({str(v) for v in np.asarray(g)[new]})[:10]} were "
                              "not in the fit (pass new_levels='population' for population predictions)")
    B = re.to_numpy()
    contrib = np.einsum("ij,ij->i", Z, B[np.where(new, 0, idx)])
    return pred + np.where(new, 0.0, contrib)


def _level_index(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value among the fit's labels (as stored, or by string form); −1 if new."""
    lookup = {lab: i for i, lab in enumerate(labels.tolist())}
    slookup = {str(lab): i for i, lab in enumerate(labels.tolist())}
    return np.array([lookup.get(v, slookup.get(str(v), -1)) for v in values], dtype=np.int64)


def _predict_multi(res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str,
                   exog: Any) -> np.ndarray:
    """predict() for a fit with several grouping factors (see the module docstring)."""
    model = res.model
    beta = res._sol.beta
    intercepts = {"Intercept", "(Intercept)", "const"}
    if newdata is None and exog is None:
        return res.fittedvalues.copy() if include_random else model.X @ beta
    if newdata is None:
        X = np.atleast_2d(np.asarray(exog, dtype=float))
        if X.shape[1] != res.k_fe:
            raise PredictionError(f"exog must have {res.k_fe} columns {res.model.exog_names}, got {X.shape[1]}")
        if include_random:
            raise PredictionError("with several grouping factors, conditional predictions need newdata "
                                  "(a DataFrame with the grouping columns); use include_random=False "
                                  "for population predictions from exog")
        return X @ beta
    if not isinstance(newdata, pd.DataFrame):
        raise PredictionError(f"newdata must be a pandas DataFrame, not {type(newdata).__name__}")
    pred = design(newdata, list(model.exog_names), intercepts, "fixed effects") @ beta
    if not include_random:
        return pred
    for t, b in zip(model.terms, res._modes_list, strict=True):
        cols = t.name.split(":")
        missing = [c for c in cols if c not in newdata.columns]
        if missing:
            raise PredictionError(f"newdata is missing the grouping column(s) {missing} of the "
                                  f"grouping factor {t.name!r}")
        if len(cols) == 1:
            key = newdata[cols[0]].to_numpy()
        else:
            key = newdata[cols[0]].astype(str)
            for c in cols[1:]:
                key = key + ":" + newdata[c].astype(str)
            key = key.to_numpy()
        idx = _level_index(np.asarray(t.labels), key)
        new = idx < 0
        if new.any() and new_levels == "error":
            raise PredictionError(f"level(s) {sorted({str(v) for v in key[new]})[:10]} of {t.name!r} were "
                                  "not in the fit (pass new_levels='population' for population "
                                  "predictions)")
        Z = design(newdata, list(t.coef_names), intercepts, f"random effects of {t.name!r}")
        pred = pred + np.where(new, 0.0, np.einsum("ij,ij->i", Z, b[np.where(new, 0, idx)]))
    return pred
