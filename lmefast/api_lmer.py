"""``lmer``: lme4's formula syntax, fitted by the one-factor engine or the blocked one."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from lmefast.formula import design_matrix
from lmefast.lmer import build_terms, lmer_frame, parse_lmer
from lmefast.model import MixedLM, checked_response_and_design
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
                       re_pattern=t.pattern, lme4_names=True)
    X, xnames, dropped = checked_response_and_design(y, response, X, xnames, stacklevel=4)
    return MultiLM(y, X, terms, endog_name=response, exog_names=xnames, dropped_exog=dropped)


def single_group_as_crossed(kwargs: dict[str, Any]) -> MixedLM | MultiLM | None:
    """statsmodels' spelling of crossed effects — one group for all rows, one variance
    component per crossed factor — as the equivalent lme4 model, fitted natively.

    Returns None when the data have more than one group (then the variance components are
    nested in the groups and the one-factor engine fits them)."""
    groups = pd.Series(kwargs["groups"])
    if groups.nunique(dropna=False) != 1 or not kwargs.get("vc_designs"):
        return None
    y, X = kwargs["endog"], np.asarray(kwargs["exog"], dtype=float)
    Zre = np.asarray(kwargs.get("exog_re"), dtype=float)
    has_constant = bool(np.any(np.ptp(X, axis=0) == 0) and np.any(X != 0)) if X.size else False
    if Zre.shape[1] > 1 or (Zre.shape[1] == 1 and not (np.ptp(Zre[:, 0]) == 0 and has_constant)):
        raise SpecificationError(
            "with a single group, random coefficients other than an intercept are not "
            "identifiable; write crossed effects as variance components with re_formula='0'")
    from lmefast.lmer import Term

    terms = []
    for name, V, cols in zip(kwargs["vc_names"], kwargs["vc_designs"], kwargs["vc_col_names"],
                             strict=True):
        V = V.tocsr()
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
    if len(terms) == 1:
        t = terms[0]
        return MixedLM(y, X, pd.Series(t.labels[t.codes]), exog_re=t.Z,
                       endog_name=kwargs["endog_name"], exog_names=kwargs["exog_names"],
                       exog_re_names=[t.name], group_name=t.name)
    return MultiLM(np.asarray(y, dtype=float), np.ascontiguousarray(X), terms,
                   endog_name=kwargs["endog_name"], exog_names=kwargs["exog_names"],
                   statsmodels_group=groups.iloc[0],
                   vc_order=tuple(str(v) for v in kwargs["vc_names"]))


SCALE_OUT_OPTIONS = ("progress", "client", "batch_rows", "split_every")


def _is_scale_out(data: Any) -> bool:
    return isinstance(data, str | os.PathLike) or type(data).__module__.startswith("dask.")


def scale_out_lmer_model(formula: str, data: Any, missing: str, **options: Any):
    """An lme4 formula on a Parquet path or a Dask DataFrame. One grouping factor (a plain
    column): its first term as the random coefficients and any further terms of one numeric
    column as variance components — so ``(x|g)`` and ``(1 + x || g)`` are fitted out of core,
    θ in statsmodels' order (coefficients, then components). Several factors (or a:b): the
    blocked cross-products summed over the chunks (lmefast.chunked_multi)."""
    from lmefast.model import mixedlm

    response, fixed, random = parse_lmer(formula)
    groups = list(dict.fromkeys(t.group for t in random))
    if len(groups) != 1 or ":" in groups[0]:
        from lmefast.chunked_multi import (
            dask_chunks,
            multi_model_from_chunks,
            parquet_chunks,
            used_columns,
        )

        if options:
            raise SpecificationError(f"options {sorted(options)} are not supported for several "
                                     "grouping factors on Parquet or Dask data")
        used = used_columns(response, fixed, random)
        chunks = (parquet_chunks(data, used) if isinstance(data, str | os.PathLike)
                  else dask_chunks(data, used))
        return multi_model_from_chunks(response, fixed, random, used, chunks, missing)
    vc = {}
    for t in random[1:]:
        parts = [p.strip() for p in t.expr.split("+")]
        if len(parts) != 2 or parts[0] != "0" or not parts[1].isidentifier():
            raise SpecificationError(
                f"lmer on Parquet or Dask data: the term ({t.expr} | {t.group}) after the first "
                "must be a single uncorrelated column like (0 + x | g)")
        vc[parts[1]] = t.expr
    return mixedlm(f"{response} ~ {fixed}", data, groups=groups[0], re_formula=random[0].expr,
                   vc_formula=vc or None, missing=missing, **options)


def lmer(formula: str, data: Any, reml: bool = True, missing: str = "raise", **kwargs: Any):
    """Fit an lme4-style formula, e.g. ``lmer("y ~ x + (1 + x | g) + (1 | h)", data)``.

    Terms: ``(1|g)``, ``(x|g)`` (intercept and slope, correlated), ``(0 + x|g)``,
    ``(1 + x || g)`` (uncorrelated), ``(1|a/b)`` (a and a:b), ``(1|a:b)``, several terms on a
    factor, crossed factors. Returns the same results type as ``mixedlm(...).fit()``.

    ``data`` may also be a Parquet path or a Dask DataFrame, for one grouping factor
    (scale_out_lmer_model); ``progress``, ``client``, ``batch_rows``, ``split_every`` then go to
    the data pass, the other keywords to ``fit``."""
    if _is_scale_out(data):
        options = {k: kwargs.pop(k) for k in SCALE_OUT_OPTIONS if k in kwargs}
        return scale_out_lmer_model(formula, data, missing, **options).fit(reml=reml, **kwargs)
    return lmer_model(formula, data, missing).fit(reml=reml, **kwargs)
