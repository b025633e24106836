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

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lmefast.design import design
from lmefast.errors import PredictionError

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


def predict(res: MixedLMResults, newdata: Any = None, include_random: bool = True,
            new_levels: str = "population", exog: Any = None, exog_re: Any = None,
            groups: Any = None) -> np.ndarray:
    """Predictions for the fitted rows (newdata None) or for new rows: a DataFrame, or the
    arrays exog (n × p) / exog_re (n × k) / groups (n labels)."""
    if new_levels not in ("population", "error"):
        raise PredictionError(f"new_levels must be 'population' or 'error', not {new_levels!r}")
    beta = res._beta
    engine = res.engine
    if newdata is None and exog is None:
        return res._fitted.copy() if include_random else engine.fixed_part(beta)
    if engine.offset is not None:
        raise PredictionError("predictions for new rows of a model with an offset are not implemented "
                              "(the fitted rows' predictions include it: res.fittedvalues)")
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
    modes = engine.modes_by_factor(res._objective, res._sol)
    return pred + engine.random_prediction(modes, newdata, exog_re, groups, new_levels)
