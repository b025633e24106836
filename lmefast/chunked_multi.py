"""lme4 formulas with several grouping factors on data in chunks (Parquet files, Dask
partitions): the blocked cross-products are sums over rows too (lmefast.multi.MultiSums).

Three passes: (a) every grouping factor's labels (codes fixed across chunks, sorted as in
memory); (b) the (first-factor level, trailing level) pairs that occur; (c) the sums. Memory is
the statistics — the first factor's per-level records, the pairs, the trailing block — plus one
chunk. Fixed effects and random terms must be plain numeric columns (their design must not
depend on the chunk). The model keeps no rows: fitted values and residuals need another pass.
Prior weights and an offset are columns: each chunk's rows enter the sums as the working rows
√w (y − o), √w X, √w Z (DESIGN.md §4); zero weights drop their rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from lmefast.checks import (
    check_not_constant,
    check_random_gram,
    check_rows,
    full_rank_columns_from_xtx,
    warn_dropped,
)
from lmefast.chunked import ChunkSource
from lmefast.errors import PredictionError, SpecificationError
from lmefast.formula import _parse, _plain_columns, _rhs, check_schema
from lmefast.lmer import LmerPlan, RandomTerm, factor_key
from lmefast.model import MixedLM
from lmefast.multi import (
    BlockedEngine,
    assemble_crossprods,
    multi_sums,
    pair_keys,
    sorted_unique,
)
from lmefast.progress import ProgressFn
from lmefast.scaling import DesignScaling, column_map_from_gram
from lmefast.structure import Term


def _labels(df: pd.DataFrame, groups: list[str]) -> dict[str, np.ndarray]:
    return {g: pd.unique(factor_key(df, g)) for g in groups}


@dataclass
class _Passes(LmerPlan):
    """lme4's evaluator (lmefast.lmer.LmerPlan) with what each chunk needs in the passes:
    the labels of pass (a) and the design maps (picklable: sent to the workers)."""

    #: (S, [C_j]): centring and scaling maps of X and of each term's Z (lmefast.scaling),
    #: applied to every chunk's designs; None: the designs as they are
    maps: tuple[np.ndarray, list[np.ndarray]] | None = None


@dataclass(frozen=True)
class MultiPayload:
    """What a chunk needs to predict from a fit with several grouping factors: the design rules
    and labels of the passes, β̂ on the design's columns (0 for a dropped column) and each
    factor's conditional modes (levels × k); shipped to every worker once."""

    passes: _Passes
    beta_full: np.ndarray
    modes: dict[str, np.ndarray]

    @property
    def columns(self) -> list[str]:
        return list(self.passes.used)

    @property
    def yname(self) -> str:
        return self.passes.response

    @property
    def fit_only_columns(self) -> list[str]:
        return self.passes.fit_only_columns

    @property
    def group_columns(self) -> list[str]:
        return self.passes.group_columns

    def predict(self, df: pd.DataFrame, where: str, *, include_random: bool, new_levels: str,
                resid: bool = False, fitted_rows: bool = False) -> np.ndarray:
        """Xβ̂ + Σ_j Z_j b̂_j for the rows of one chunk (NaN where a needed value is missing; a level
        not in the fit contributes 0 for its factor, or raises with new_levels='error')."""
        out = np.full(len(df), np.nan)
        need_y = resid or fitted_rows
        if self.passes.offset is not None and not need_y:
            raise PredictionError("predictions for new rows of a model with an offset are not implemented "
                                  "(the fitted rows' predictions include it: res.fittedvalues)")
        d = self.passes.evaluate(df, where, need_y=need_y, need_groups=include_random, missing="drop")
        if d is None:
            return out
        pred = d.X @ self.beta_full
        if d.offset is not None:
            pred = pred + d.offset
        for t in d.terms:
            new = t.codes < 0
            if new.any() and new_levels == "error":
                raise SpecificationError(
                    f"level(s) of {t.name!r} in {where} were not in the fit (pass new_levels='population')")
            b = self.modes[t.name]
            pred = pred + np.where(new, 0.0, np.einsum("ij,ij->i", t.Z, b[np.where(new, 0, t.codes)]))
        if resid:
            pred = d.y - pred
        out[d.keep] = pred
        return out


def multi_payload(res: Any, passes: _Passes, xnames: list[str]) -> MultiPayload:
    beta = np.zeros(len(xnames))
    pos = {n: j for j, n in enumerate(xnames)}
    for name, b in zip(res.model.exog_names, res._beta, strict=True):   # β on the user's scale
        beta[pos[name]] = b
    frames = res.engine.modes_by_factor(res._objective, res._sol)
    return MultiPayload(passes, beta, {name: np.ascontiguousarray(f.to_numpy()) for name, f in frames.items()})


def _labels_part(df: pd.DataFrame, where: str, plan: _Passes, formulas: list[str]
                 ) -> tuple[dict[str, np.ndarray], bool]:
    check_schema(df.dtypes, plan.used, plan.response, where, {"weights": plan.weights, "offset": plan.offset})
    keep = plan.rows_kept(df, where)
    if not keep.all():
        df = df.loc[keep]
    plain = all(_plain_columns(_parse(_rhs(f)), df) is not None for f in formulas)
    return _labels(df, plan.factors), plain


def _merge_labels(*parts: tuple[dict[str, np.ndarray], bool]) -> tuple[dict[str, np.ndarray], bool]:
    labels = {g: pd.unique(np.concatenate([np.asarray(p[0][g], dtype=object) for p in parts]))
              for g in parts[0][0]}
    return labels, all(p[1] for p in parts)


def _merge_keys(*parts: np.ndarray) -> np.ndarray:
    return sorted_unique(np.concatenate(parts))


def _merge_sums(*parts: tuple | None) -> tuple | None:
    parts = tuple(p for p in parts if p is not None)
    if not parts:
        return None
    sums, sizes, xnames, terms, (ymin, ymax), log_w, ztz = parts[0]
    for other in parts[1:]:
        if other[2] != xnames:
            raise SpecificationError(f"chunks give different fixed-effects columns: {xnames} and {other[2]}")
        sums = sums + other[0]
        sizes = {name: sizes[name] + other[1][name] for name in sizes}
        ymin, ymax = min(ymin, other[4][0]), max(ymax, other[4][1])
        log_w += other[5]
        ztz = [a + b for a, b in zip(ztz, other[6], strict=True)]
    return sums, sizes, xnames, terms, (ymin, ymax), log_w, ztz


def design_maps(XtX: np.ndarray, n: int, xnames: list[str], terms: list[Term], ztz: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The centring and scaling maps the rows in memory would get (model.blocked_engine), from
    the cross-products of a pass: S of X (X'X; unweighted-equivalent where there are no
    weights), C_j of each term's Z (its Z'Z, before weights); None when all are the identity."""
    c_x = next((j for j, c in enumerate(xnames) if c in ("Intercept", "(Intercept)")), None)
    S = column_map_from_gram(XtX, XtX[c_x, c_x] if c_x is not None else float(n), c_x, centre=True)
    Cs = []
    for t, G in zip(terms, ztz, strict=True):
        c_z = next((j for j, c in enumerate(t.coef_names) if c == "(Intercept)"), None)
        full = t.pattern[0].shape[0] == t.k * (t.k + 1) // 2
        Cs.append(column_map_from_gram(G, G[c_z, c_z] if c_z is not None else float(n), c_z, centre=full))
    if all(np.array_equal(M, np.eye(M.shape[0])) for M in [S, *Cs]):
        return None
    return S, Cs


def _pairs_part(df: pd.DataFrame, where: str, passes: _Passes) -> np.ndarray:
    d = passes.evaluate(df, where, need_x=False) if len(df) else None
    return np.zeros(0, dtype=np.int64) if d is None else pair_keys(d.terms)


def _sums_part(df: pd.DataFrame, where: str, passes: _Passes, keys: np.ndarray) -> tuple | None:
    d = passes.evaluate(df, where) if len(df) else None
    if d is None:
        return None
    terms, X, xnames = d.terms, d.X, d.xnames
    if passes.maps is not None:         # centred and scaled designs (multi_model_from_chunks)
        X = np.ascontiguousarray(X @ passes.maps[0])
        terms = [replace(t, Z=np.ascontiguousarray(t.Z @ C))
                 for t, C in zip(terms, passes.maps[1], strict=True)]
    # the terms' Z'Z (before weights): what the maps are chosen from (design_maps), and, on the
    # designs the engine sees, what the random-design check judges
    ztz = [t.Z.T @ t.Z for t in terms]
    raw_y = d.y
    y, log_w = raw_y, 0.0
    if d.offset is not None:
        y = y - d.offset
    if d.weights is not None:            # the working rows (module docstring)
        w = d.weights
        sw = np.sqrt(w)
        y, X = y * sw, np.ascontiguousarray(X * sw[:, None])
        terms = [replace(t, Z=np.ascontiguousarray(t.Z * sw[:, None])) for t in terms]
        log_w = float(np.sum(np.log(w)))
    sizes = {t.name: np.bincount(t.codes, minlength=t.m) for t in terms}
    rowless = [Term(t.name, np.zeros(0, dtype=np.int64), t.labels, np.zeros((0, t.k)), t.coef_names,
                    t.pattern) for t in terms]
    return (multi_sums(y, np.ascontiguousarray(X), terms, keys), sizes, list(xnames), rowless,
            (float(raw_y.min()), float(raw_y.max())), log_w, ztz)


def multi_model_from_chunks(response: str, fixed: str, random: list[RandomTerm], source: ChunkSource,
                            missing: str, progress: ProgressFn | None = None, weights: str | None = None,
                            offset: str | None = None) -> MixedLM:
    """The three passes over the chunks of any source (module docstring); ``weights`` and
    ``offset`` name columns of prior weights and of an offset."""
    rules = _Passes.from_parts(response, fixed, random, [], missing, weights, offset)
    rules.check_schema(source.dtypes(), source.kind)
    used = rules.used
    unit = source.unit
    first = source.map_reduce(used, _labels_part, (rules, [fixed] + [t.expr for t in random]), _merge_labels,
                              stage=f"pass 1/3 (labels), {unit}", progress=progress)
    if first is None:
        check_rows(0)
    values, plain = first
    if not plain:
        raise SpecificationError(
            "for data in chunks the fixed effects and the random terms must be plain numeric "
            "columns (their design may not depend on the chunk): compute categorical dummies or "
            "transforms beforehand")
    rules.labels = {g: pd.Index(values[g]).sort_values() for g in rules.factors}
    passes = source.shared(rules)
    keys = source.map_reduce(used, _pairs_part, (passes,), _merge_keys,
                             stage=f"pass 2/3 (level pairs), {unit}", progress=progress)
    result = source.map_reduce(used, _sums_part, (passes, source.shared(keys)), _merge_sums,
                               stage=f"pass 3/3 (cross-products), {unit}", progress=progress)
    if result is None:
        check_rows(0, missing == "drop" or weights is not None)
    maps = design_maps(result[0].XtX, result[0].n, result[2], result[3], result[6])
    if maps is not None:
        # columns far from zero or of extreme spread: the pass again on centred and scaled
        # designs, as the rows in memory are (lmefast.scaling), so that the fit does not depend
        # on the units
        rules.maps = maps
        passes = source.shared(rules)
        result = source.map_reduce(used, _sums_part, (passes, source.shared(keys)), _merge_sums,
                                   stage=f"pass 3/3 again (centred and scaled cross-products), {unit}",
                                   progress=progress)
    sums, sizes, xnames, terms, (ymin, ymax), log_w, ztz = result
    for t, G in zip(terms, ztz, strict=True):
        check_random_gram(G, sums.n, t.coef_names, f"({' + '.join(t.coef_names)} | {t.name})")
    design_names = list(xnames)
    xnames = ["(Intercept)" if c == "Intercept" else c for c in xnames]
    check_not_constant(ymin, ymax, response)
    cp = replace(assemble_crossprods(sums, terms, keys), log_weights=log_w)
    keep = full_rank_columns_from_xtx(sums.XtX, sums.n)
    dropped = tuple(xnames[j] for j in range(len(xnames)) if j not in set(keep.tolist()))
    if dropped:
        warn_dropped(dropped, stacklevel=4)
        cp = cp.keep_fixed(keep, terms[0].k)
        xnames = [xnames[j] for j in keep]
    source.make_payload = partial(multi_payload, passes=rules,
                                  xnames=["(Intercept)" if c == "Intercept" else c for c in design_names])
    engine = BlockedEngine(None, None, terms, crossprods=cp, group_sizes=sizes, nobs=sums.n, source=source)
    if maps is not None:
        engine.design_scaling = DesignScaling(maps[0][np.ix_(keep, keep)] if dropped else maps[0],
                                              tuple(maps[1]))
    return MixedLM.from_engine(engine, api="lme4", endog_name=response, exog_names=xnames,
                               dropped_exog=dropped)
