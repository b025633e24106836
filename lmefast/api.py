"""The front door: ``mixedlm``, ``lmer``, ``lmer_model`` — the only module that knows every front
end (statsmodels' formulas and arrays, lme4's formulas) and every data source (a DataFrame in
memory, Parquet files, a Dask DataFrame), and sends each call to the right one. Layers below
never dispatch on the kind of data (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from lmefast.chunked import ChunkSource
from lmefast.chunked_multi import multi_model_from_chunks
from lmefast.dask import DaskSource
from lmefast.dask import mixedlm as dask_mixedlm
from lmefast.errors import SpecificationError
from lmefast.formula import (
    Columns,
    DtypesOf,
    as_column,
    as_dataframe,
    formula_environment,
    formula_namespace,
)
from lmefast.lmer import LmerPlan, parse_lmer, split_offsets
from lmefast.model import MixedLM, blocked_engine, checked_response_and_design
from lmefast.outofcore import ParquetSource, mixedlm_parquet
from lmefast.progress import ProgressFn, progress_function
from lmefast.results import MixedLMResults
from lmefast.spec import GroupThetaMap


def _is_scale_out(data: Any) -> bool:
    return isinstance(data, str | os.PathLike) or type(data).__module__.startswith("dask.")


def chunk_source(data: Any, *, progress: Any = None, client: Any = None, batch_rows: int | None = None,
                 split_every: int | None = None) -> tuple[ChunkSource, ProgressFn | None]:
    """The chunk source for a Parquet path or a Dask DataFrame, with its options."""
    if isinstance(data, str | os.PathLike):
        if client is not None or split_every is not None:
            raise SpecificationError("client and split_every are options of Dask data, not of Parquet files")
        source: ChunkSource = ParquetSource(data) if batch_rows is None else ParquetSource(data, batch_rows)
    else:
        if batch_rows is not None:
            raise SpecificationError("batch_rows is an option of Parquet files, not of Dask data")
        source = DaskSource(data, client=client, split_every=8 if split_every is None else split_every)
    return source, progress_function(progress)


def mixedlm(
    formula: str,
    data: Any,
    groups: Any = None,
    re_formula: str | None = None,
    vc_formula: Mapping[str, str] | None = None,
    missing: str = "raise",
    **scale_out: Any,
) -> MixedLM:
    """statsmodels' ``smf.mixedlm``: a MixedLM from formulas (call ``.fit()`` on it).

    ``data`` may also be a path to Parquet data (lmefast.outofcore.mixedlm_parquet) or a Dask
    DataFrame (lmefast.dask.mixedlm); ``scale_out`` keywords (progress=...) go to those."""
    if _is_scale_out(data):
        _refuse_eval_env(scale_out.pop("eval_env", 0))
        if type(data).__module__.startswith("dask."):
            return dask_mixedlm(formula, data, groups, re_formula, vc_formula, missing, **scale_out)
        return mixedlm_parquet(formula, data, groups, re_formula, vc_formula, missing, **scale_out)
    # data in memory: weights, offset and statsmodels' from_formula keywords (warned about there);
    # others raise. Formulas see the caller's names (eval_env, lmefast.formula).
    scale_out["eval_env"] = formula_namespace(scale_out.get("eval_env", 0))
    return MixedLM.from_formula(formula, data, groups=groups, re_formula=re_formula,
                                vc_formula=vc_formula, missing=missing, **scale_out)


def _refuse_eval_env(eval_env: Any) -> None:
    """Formulas on Parquet and Dask data are evaluated chunk by chunk from their columns
    only: an eval_env other than the default would be ignored, so it raises."""
    if not (eval_env is None or (isinstance(eval_env, int) and not isinstance(eval_env, bool))):
        raise SpecificationError("eval_env: formulas on Parquet and Dask data see only the data's "
                                 "columns (transform the columns first)")


def lmer_model(formula: str, data: Any, missing: str = "raise", weights: Any = None,
               offset: Any = None, eval_env: Any = 0) -> MixedLM:
    """The model of an lme4 formula (not yet fitted). One grouping factor (after merging terms
    on the same factor) runs on the one-factor engine, several on the blocked one.

    ``weights`` (prior weights: residual variance σ²/wᵢ; a column name or one per row; zero
    weights drop their rows) and ``offset`` (subtracted from y, like ``offset(x)`` terms of
    the formula) have lme4's meaning. ``eval_env``: where names that are not columns are found
    (statsmodels' meaning: frames above the caller, or a mapping; lmefast.formula)."""
    with formula_environment(formula_namespace(eval_env)):
        return _lmer_model(formula, data, missing, weights, offset)


def _lmer_model(formula: str, data: Any, missing: str, weights: Any, offset: Any) -> MixedLM:
    """The DataFrame as the one chunk of lme4's evaluator (lmefast.lmer.LmerPlan: the levels
    from the data), then the model."""
    df = as_dataframe(data)
    if weights is not None:
        df, weights = as_column(df, weights, "weights")
    if offset is not None:
        df, offset = as_column(df, offset, "offset")
    plan = LmerPlan.from_formula(formula, missing, weights, offset)
    columns = Columns(df)
    plan.check_schema(DtypesOf(columns), "data")
    d = plan.evaluate(df, "data", columns=columns)
    y, X, xnames, terms = d.y, d.X, d.xnames, d.terms
    if len(terms) == 1:
        t = terms[0]
        return MixedLM(y, X, pd.Series(t.labels[t.codes]), exog_re=t.Z, endog_name=plan.response,
                       exog_names=xnames, exog_re_names=list(t.coef_names), group_name=t.name,
                       re_pattern=t.pattern, api="lme4", weights=d.weights, offset=d.offset)
    X, xnames, dropped, S = checked_response_and_design(y, plan.response, X, xnames, stacklevel=4)
    engine = blocked_engine(y, np.ascontiguousarray(X), terms, weights=d.weights, offset=d.offset, S=S)
    return MixedLM.from_engine(engine, api="lme4", endog_name=plan.response, exog_names=xnames,
                               dropped_exog=dropped)


SCALE_OUT_OPTIONS = ("progress", "client", "batch_rows", "split_every")


def scale_out_lmer_model(formula: str, data: Any, missing: str, weights: str | None = None,
                         offset: str | None = None, **options: Any):
    """An lme4 formula on a Parquet path or a Dask DataFrame. One grouping factor (a plain
    column): its first term as the random coefficients and any further terms of one numeric
    column as variance components — so ``(x|g)`` and ``(1 + x || g)`` are fitted out of core,
    θ in statsmodels' order (coefficients, then components). Several factors (or a:b): the
    blocked cross-products summed over the chunks (lmefast.chunked_multi). ``weights`` and
    ``offset`` name columns (prior weights, an offset)."""
    response, fixed, random = parse_lmer(formula)
    fixed, offset_terms = split_offsets(fixed)
    if offset_terms:        # offset(o) of one column: the same as offset="o"
        if offset is not None or len(offset_terms) > 1 or not offset_terms[0].isidentifier():
            raise SpecificationError(
                f"for Parquet or Dask data the offset is one column, given once: offset(o) in the "
                f"formula or offset='o' (got {['offset(' + t + ')' for t in offset_terms]}"
                f"{'' if offset is None else f' and offset={offset!r}'})")
        offset = offset_terms[0]
    groups = list(dict.fromkeys(t.group for t in random))
    if len(groups) != 1 or ":" in groups[0]:
        source, progress = chunk_source(data, **options)
        return multi_model_from_chunks(response, fixed, random, source, missing, progress, weights, offset)
    vc = {}
    for t in random[1:]:
        parts = [p.strip() for p in t.expr.split("+")]
        if len(parts) != 2 or parts[0] != "0" or not parts[1].isidentifier():
            raise SpecificationError(
                f"lmer on Parquet or Dask data: the term ({t.expr} | {t.group}) after the first "
                "must be a single uncorrelated column like (0 + x | g)")
        vc[parts[1]] = t.expr
    model = mixedlm(f"{response} ~ {fixed}", data, groups=groups[0], re_formula=random[0].expr,
                    vc_formula=vc or None, missing=missing, weights=weights, offset=offset, **options)
    # the same structure, in lme4's shapes and names (as lmer on rows in memory)
    engine = model.engine
    tm = engine.spec.theta_map
    re_names = tuple("(Intercept)" if c == groups[0] else c for c in tm.re_names)
    engine.spec = replace(engine.spec, theta_map=GroupThetaMap(tm.k, tm.n_vc, re_names, tm.vc_names, tm.tril))
    engine.theta_map = engine.spec.theta_map
    engine.lme4_names = True
    return MixedLM.from_engine(model.engine, api="lme4", endog_name=model.endog_name,
                               exog_names=["(Intercept)" if c == "Intercept" else c
                                           for c in model.exog_names],
                               dropped_exog=model.dropped_exog)


def lmer(formula: str, data: Any, reml: bool = True, missing: str = "raise",
         **kwargs: Any) -> MixedLMResults:
    """Fit an lme4-style formula, e.g. ``lmer("y ~ x + (1 + x | g) + (1 | h)", data)``.

    Terms: ``(1|g)``, ``(x|g)`` (intercept and slope, correlated), ``(0 + x|g)``,
    ``(1 + x || g)`` (uncorrelated), ``(1|a/b)`` (a and a:b), ``(1|a:b)``, several terms on a
    factor, crossed factors. Results follow lme4's shapes (random effects per grouping factor).

    ``data`` may also be a Parquet path or a Dask DataFrame; ``progress``, ``client``,
    ``batch_rows``, ``split_every`` and ``weights``/``offset`` (then names of columns) go to the
    data pass, the other keywords to ``fit``."""
    if _is_scale_out(data):
        _refuse_eval_env(kwargs.pop("eval_env", 0))
        options = {k: kwargs.pop(k) for k in SCALE_OUT_OPTIONS + ("weights", "offset") if k in kwargs}
        return scale_out_lmer_model(formula, data, missing, **options).fit(reml=reml, **kwargs)
    weights, offset = kwargs.pop("weights", None), kwargs.pop("offset", None)
    env = formula_namespace(kwargs.pop("eval_env", 0))
    return lmer_model(formula, data, missing, weights, offset, env).fit(reml=reml, **kwargs)
