"""``lmer``: lme4's formula syntax, fitted by the one-factor engine or the blocked one."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from lmefast.formula import design_matrix
from lmefast.lmer import build_terms, lmer_frame
from lmefast.model import MixedLM, _full_rank_columns
from lmefast.multi import MultiLM
from lmefast.spec import SpecificationError


def lmer_model(formula: str, data: Any, missing: str = "raise") -> MixedLM | MultiLM:
    """The model of an lme4 formula (not yet fitted).

    One grouping factor (after merging terms on the same factor) gives a ``MixedLM`` with
    the random coefficients of that factor; several give a ``MultiLM``."""
    df, response, fixed, random = lmer_frame(formula, data, missing)
    X, xnames = design_matrix(fixed, df)
    xnames = ["(Intercept)" if c == "Intercept" else c for c in xnames]
    y = df[response].to_numpy(dtype=float)
    terms = build_terms(random, df)
    if len(terms) == 1:
        t = terms[0]
        return MixedLM(y, X, pd.Series(t.labels[t.codes]), exog_re=t.Z, endog_name=response,
                       exog_names=xnames, exog_re_names=list(t.coef_names), group_name=t.name,
                       re_pattern=t.pattern)
    if np.ptp(y) == 0.0:
        raise SpecificationError(f"the response '{response}' is constant: there is no variance "
                                 "to model")
    keep = _full_rank_columns(X)
    dropped = tuple(xnames[j] for j in range(X.shape[1]) if j not in set(keep.tolist()))
    if dropped:
        warnings.warn(f"fixed-effects design is rank deficient: dropping column(s) "
                      f"{list(dropped)}", stacklevel=3)
        X = np.ascontiguousarray(X[:, keep])
        xnames = [xnames[j] for j in keep]
    return MultiLM(y, X, terms, endog_name=response, exog_names=xnames, dropped_exog=dropped)


def lmer(formula: str, data: Any, reml: bool = True, missing: str = "raise", **fit_kwargs: Any):
    """Fit an lme4-style formula, e.g. ``lmer("y ~ x + (1 + x | g) + (1 | h)", data)``.

    Terms: ``(1|g)``, ``(x|g)`` (intercept and slope, correlated), ``(0 + x|g)``,
    ``(1 + x || g)`` (uncorrelated), ``(1|a/b)`` (a and a:b), ``(1|a:b)``, several terms on a
    factor, crossed factors. Returns the same results type as ``mixedlm(...).fit()``."""
    return lmer_model(formula, data, missing).fit(reml=reml, **fit_kwargs)
