"""lme4 formulas with several grouping factors on data in chunks (Parquet files, Dask
partitions): the blocked cross-products are sums over rows too (lmefast.multi.MultiSums).

Three passes: (a) every grouping factor's labels (codes fixed across chunks, sorted as in
memory); (b) the (first-factor level, trailing level) pairs that occur; (c) the sums. Memory is
the statistics — the first factor's per-level records, the pairs, the trailing block — plus one
chunk. Fixed effects and random terms must be plain numeric columns (their design must not
depend on the chunk). The model keeps no rows: fitted values and residuals need another pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd

from lmefast.chunked import ChunkSource
from lmefast.errors import RowsUnavailableError, SpecificationError
from lmefast.formula import _not_finite, _parse, _plain_columns, _rhs, design_matrix
from lmefast.lmer import RandomTerm, build_terms, factor_key
from lmefast.model import MixedLM
from lmefast.multi import (
    BlockedEngine,
    assemble_crossprods,
    multi_sums,
    pair_keys,
    sorted_unique,
)
from lmefast.structure import Term

Chunks = Callable[[Callable[[pd.DataFrame], Any]], list[Any]]   # map a function over the chunks


def _clean(df: pd.DataFrame, used: list[str], missing: str) -> pd.DataFrame:
    absent = sorted(c for c in used if c not in df.columns)
    if absent:
        raise SpecificationError(f"a chunk of the data has no column(s) {absent}")
    df = df[used]
    bad = {c: _not_finite(df[c]) for c in used}
    bad = {c: v for c, v in bad.items() if v.any()}
    if bad:
        if missing != "drop":
            raise SpecificationError(
                f"missing or infinite values in column(s) {sorted(bad)}; pass missing='drop' to "
                "drop incomplete rows")
        df = df.loc[~np.logical_or.reduce(list(bad.values()))]
    return df.reset_index(drop=True)


def _labels(df: pd.DataFrame, groups: list[str]) -> dict[str, np.ndarray]:
    return {g: pd.unique(factor_key(df, g)) for g in groups}


class CrossProductsOnly(ChunkSource):
    """The source of a fit with several grouping factors from chunks: only the cross-products
    were kept, so fitted values need another pass the model cannot make; predictions for new
    rows are made in memory (``res.predict(df)``)."""

    predicts = False

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def fitted(self, res: Any, resid: bool) -> Any:
        raise RowsUnavailableError(
            "the model was fitted from cross-products summed over chunks: the rows are not in "
            "memory; use res.predict(df) on the rows you need")

    def fitted_chunks(self, res: Any, progress: Any) -> Any:
        self.fitted(res, resid=False)


def multi_model_from_chunks(response: str, fixed: str, random: list[RandomTerm], used: list[str],
                            map_chunks: Chunks, missing: str, kind: str = "chunked data") -> MixedLM:
    """The three passes over the chunks (module docstring)."""
    groups = list(dict.fromkeys(t.group for t in random))

    def first(df: pd.DataFrame) -> tuple[dict[str, np.ndarray], bool]:
        df = _clean(df, used, missing)
        if not pd.api.types.is_numeric_dtype(df[response]) or pd.api.types.is_bool_dtype(df[response]):
            raise SpecificationError(f"response '{response}' is not numeric")
        plain = all(_plain_columns(_parse(_rhs(f)), df) is not None
                    for f in [fixed] + [t.expr for t in random])
        return _labels(df, groups), plain

    parts = map_chunks(first)
    if not parts:
        raise SpecificationError("the data are empty: no rows to fit")
    if not all(plain for _, plain in parts):
        raise SpecificationError(
            "for data in chunks the fixed effects and the random terms must be plain numeric "
            "columns (their design may not depend on the chunk): compute categorical dummies or "
            "transforms beforehand")
    labels = {}
    for g in groups:
        values = np.concatenate([np.asarray(p[0][g], dtype=object) for p in parts])
        labels[g] = pd.Index(pd.unique(values)).sort_values()

    def factor(df: pd.DataFrame, group: str) -> tuple[np.ndarray, np.ndarray]:
        codes = labels[group].get_indexer(factor_key(df, group))
        return codes.astype(np.int64), np.asarray(labels[group])

    def chunk_terms(df: pd.DataFrame) -> list[Term]:
        return build_terms(random, df, factor=factor)

    def second(df: pd.DataFrame) -> np.ndarray:
        df = _clean(df, used, missing)
        return pair_keys(chunk_terms(df)) if len(df) else np.zeros(0, dtype=np.int64)

    keys = sorted_unique(np.concatenate(map_chunks(second)))

    def third(df: pd.DataFrame):
        df = _clean(df, used, missing)
        if len(df) == 0:
            return None
        terms = chunk_terms(df)
        X, xnames = design_matrix(fixed, df)
        y = df[response].to_numpy(dtype=float)
        sizes = {t.name: np.bincount(t.codes, minlength=t.m) for t in terms}
        return multi_sums(y, X, terms, keys), sizes, xnames, [
            Term(t.name, np.zeros(0, dtype=np.int64), t.labels, np.zeros((0, t.k)), t.coef_names,
                 t.pattern) for t in terms], float(y.sum())

    results = [r for r in map_chunks(third) if r is not None]
    if not results:
        raise SpecificationError("the data are empty: no rows to fit")
    sums = reduce(lambda a, b: a + b, (r[0] for r in results))
    sizes = {name: sum(r[1][name] for r in results) for name in results[0][1]}
    xnames = ["(Intercept)" if c == "Intercept" else c for c in results[0][2]]
    terms = results[0][3]
    for t in terms:
        if t.m * t.k >= sums.n:
            raise SpecificationError(
                f"number of observations ({sums.n}) <= number of random effects ({t.m * t.k}) for "
                f"term (... | {t.name}): unidentifiable")
    mean = sum(r[4] for r in results) / sums.n
    if sums.yty / sums.n - mean * mean <= 1e-14 * max(1.0, sums.yty / sums.n):
        raise SpecificationError(f"the response '{response}' is constant: there is no variance to model")
    if np.linalg.matrix_rank(sums.XtX) < sums.XtX.shape[0]:
        raise SpecificationError(
            f"the fixed-effects design {xnames} is rank deficient: for data in chunks drop the "
            "dependent columns from the formula")
    engine = BlockedEngine(None, None, terms, crossprods=assemble_crossprods(sums, terms, keys),
                           group_sizes=sizes, nobs=sums.n, source=CrossProductsOnly(kind))
    return MixedLM.from_engine(engine, api="lme4", endog_name=response, exog_names=xnames)


def parquet_chunks(path: Any, used: list[str]) -> Chunks:
    from lmefast.outofcore import ParquetSource

    source = ParquetSource(path)

    def map_chunks(fn: Callable[[pd.DataFrame], Any]) -> list[Any]:
        return [fn(df) for _, df in source.chunks(used)]

    return map_chunks


def dask_chunks(ddf: Any, used: list[str]) -> Chunks:
    import dask

    absent = sorted(c for c in used if c not in ddf.columns)
    if absent:
        raise SpecificationError(f"column(s) {absent} not found in data")
    parts = ddf[used].to_delayed()

    def map_chunks(fn: Callable[[pd.DataFrame], Any]) -> list[Any]:
        return list(dask.compute(*[dask.delayed(fn)(part) for part in parts]))

    return map_chunks


def used_columns(response: str, fixed: str, random: Iterable[RandomTerm]) -> list[str]:
    used = {response} | {str(v) for v in _parse(_rhs(fixed)).required_variables}
    for t in random:
        used |= {str(v) for v in _parse(_rhs(t.expr)).required_variables}
        used |= set(t.group.split(":"))
    return sorted(used)
