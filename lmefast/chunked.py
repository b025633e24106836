"""Fitting from data that arrive in chunks (Parquet row groups, Dask partitions): the shared logic.

DESIGN.md §2, "Distributed and out-of-core": the cross-products are sums over rows, so they
are computed chunk by chunk and added. Two passes over the chunks (three with variance
components):

(a) the labels: the sorted group labels (global codes 0..m−1, as ``factorize_groups`` gives
    them in memory) and the levels of every categorical predictor (fixed once, so that each
    chunk's design has the same columns);
(a') with variance components only: which columns of each component are non-zero in which
    group (each group's block of random effects, as ``build_layout`` lays it out in memory);
(b) the cross-products: each chunk's rows are added into one set of per-group records
    [A_i | B_i | c_i] (``lmefast._crossprods.accumulate``) and into X'X, X'y, y'y, n.

Memory is bounded by the statistics, O(groups), plus one chunk. The model built from them
(``ChunkedMixedLM``) is a ``MixedLM`` without rows: the objective, the optimiser and the
results (``ChunkedMixedLMResults``, a ``MixedLMResults``) work unchanged. What needs the rows
again (fitted values, residuals, predictions) is another pass, delegated to the data source.

One grouping factor: random coefficients (``re_formula``) and variance components nested in
the groups (``vc_formula``). statsmodels' spelling of crossed effects (a single group) is not
supported here.

Prior weights and an offset (lme4's meaning) are columns named by the plan (``weights``,
``offset``): each chunk's rows enter the sums as the working rows √w (y − o), √w X, √w Z
(DESIGN.md §4), zero weights drop their rows, and Σ log w is summed with the rest.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmefast._crossprods import accumulate
from lmefast.checks import (
    check_identifiable,
    check_not_constant,
    check_random_gram,
    check_rows,
    full_rank_columns_from_xtx,
    warn_dropped,
)
from lmefast.crossprods import CrossProducts, record_offsets
from lmefast.errors import PredictionError, RowsUnavailableError, SpecificationError
from lmefast.formula import FormulaPlan, _rhs, _variables
from lmefast.model import MixedLM
from lmefast.onefactor import OneFactorEngine
from lmefast.parallel import resolve_threads
from lmefast.progress import ProgressFn, progress_function
from lmefast.results import MixedLMResults
from lmefast.scaling import DesignScaling, column_map_from_gram
from lmefast.spec import (
    BlockLayout,
    GroupThetaMap,
    ModelSpec,
    build_layout,
    row_entries,
)

__all__ = ["ChunkSource", "ProgressFn", "RowsUnavailableError", "build_model", "progress_function"]


class ChunkSource:
    """A data source that arrives in chunks (Parquet files, a Dask DataFrame, ...). It maps a
    function over its chunks and merges the results (``map_reduce``: the passes of a fit), and
    makes the passes that a fit from cross-products cannot (fitted values, residuals,
    predictions). ``plan`` and ``coder`` (the design rules and group labels fixed by the fit)
    are set when the model is built. A new source implements ``map_reduce`` and ``dtypes``."""

    kind = "chunked data"
    unit = "chunks"          # what progress counts
    predicts = True
    plan: Any = None
    coder: Any = None
    #: results → what each chunk needs to predict (``columns``, ``yname``, ``group_columns``,
    #: ``predict(df, where, ...)``); set by the model built from this source
    make_payload: Callable[[MixedLMResults], Any] | None = None

    def payload(self, res: MixedLMResults) -> Any:
        """The fit's prediction payload, made once and kept with the results."""
        return res.derived("predict_payload", lambda: self.make_payload(res))

    def map_reduce(self, columns: list[str], fn: Callable, args: tuple, merge: Callable, *,
                   stage: str, progress: ProgressFn | None = None, fold: Callable | None = None) -> Any:
        """merge(fn(chunk, where, *args) for every chunk, only ``columns`` read); None without
        chunks. ``stage`` names the pass for progress reports. A source that reads its chunks
        one after another may use ``fold(acc, chunk, where, *args) -> acc`` instead (one
        accumulator updated in place: no partial result per chunk)."""
        raise NotImplementedError

    def dtypes(self) -> pd.Series:
        """The columns' dtypes (one chunk's, or the metadata's)."""
        raise NotImplementedError

    def check_plan(self, plan: ChunkPlan) -> None:
        """Column kinds (numeric or categorical) for the plan, checked across the source."""
        plan.set_kinds(self.dtypes(), self.kind)

    def shared(self, obj: Any) -> Any:
        """A large argument of fn, sent to the workers once (as is, for local sources)."""
        return obj

    def fitted(self, res: MixedLMResults, resid: bool) -> Any:
        raise NotImplementedError

    def fitted_chunks(self, res: MixedLMResults, progress: ProgressFn | None) -> Any:
        raise NotImplementedError

    def predict(self, res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str) -> Any:
        raise NotImplementedError

    def write_fitted(self, res: MixedLMResults, path: Any, progress: ProgressFn | None) -> int:
        raise SpecificationError(f"write_fitted writes fitted values of Parquet fits; for {self.kind} "
                                 "use res.fittedvalues.to_frame().to_parquet(...)")


def check_frame(df: Any, where: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise SpecificationError(f"{where} is a {type(df).__name__}, not a pandas DataFrame")


# -- the passes, on any source ----------------------------------------------------------------
def labels_part(df: pd.DataFrame, where: str, plan: ChunkPlan) -> dict[str, LabelSet]:
    check_frame(df, where)
    sets = plan.new_label_sets()
    plan.collect_labels(df, sets, where)
    return sets


def merge_labels(*parts: dict[str, LabelSet]) -> dict[str, LabelSet]:
    out = parts[0]
    for other in parts[1:]:
        for name, ls in other.items():
            out[name].merge(ls)
    return out


def vc_part(df: pd.DataFrame, where: str, ctx: tuple[ChunkPlan, LabelCoder]) -> list[np.ndarray]:
    check_frame(df, where)
    plan, coder = ctx
    return plan.collect_vc_keys(df, coder, where)


def stats_part(df: pd.DataFrame, where: str, ctx: tuple[ChunkPlan, LabelCoder],
               n_threads: int) -> ChunkStats | None:
    check_frame(df, where)
    plan, coder = ctx
    return chunk_stats(plan, coder, df, where, None, n_threads)


def stats_fold(acc: ChunkStats | None, df: pd.DataFrame, where: str,
               ctx: tuple[ChunkPlan, LabelCoder], n_threads: int) -> ChunkStats | None:
    plan, coder = ctx
    return chunk_stats(plan, coder, df, where, acc, n_threads)


def merge_stats(*parts: ChunkStats | None) -> ChunkStats | None:
    out = None
    for s in parts:
        if s is None:
            continue
        out = s if out is None else out.merge(s)
    return out


def model_from_chunks(plan: ChunkPlan, source: ChunkSource, progress: ProgressFn | None,
                      n_threads: int | None) -> MixedLM:
    """The passes of the module docstring over any chunk source, then the model."""
    source.check_plan(plan)
    n_pass = 3 if plan.vc_formulas else 2
    unit = source.unit
    sets = source.map_reduce(plan.label_columns(), labels_part, (plan,), merge_labels,
                             stage=f"pass 1/{n_pass} (labels), {unit}", progress=progress)
    if sets is None:
        check_rows(0)
    labels = plan.fix_levels(sets, source.dtypes())
    coder = LabelCoder(labels)
    if plan.vc_formulas:
        keys = source.map_reduce(plan.vc_columns, vc_part, (source.shared((plan, coder)),), merge_keys,
                                 stage=f"pass 2/3 (variance-component structure), {unit}",
                                 progress=progress)
        plan.set_vc_layout(keys, labels.shape[0])
    nth = resolve_threads(n_threads, labels.shape[0])
    stats = source.map_reduce(plan.used, stats_part, (source.shared((plan, coder)), nth), merge_stats,
                              stage=f"pass {n_pass}/{n_pass} (cross-products), {unit}",
                              progress=progress, fold=stats_fold)
    maps = design_maps(plan, stats)
    if maps is not None:
        # columns far from zero or of extreme spread (a year-like origin, seconds since 1970,
        # micrometres): the pass again on centred and scaled designs, as the rows in memory are
        # (lmefast.scaling), so that the fit does not depend on the units
        plan.maps = maps
        stats = source.map_reduce(plan.used, stats_part, (source.shared((plan, coder)), nth), merge_stats,
                                  stage=f"pass {n_pass}/{n_pass} again (centred and scaled "
                                        f"cross-products), {unit}", progress=progress, fold=stats_fold)
    return build_model(plan, labels, stats, source)


def design_maps(plan: ChunkPlan, stats: ChunkStats | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The centring and scaling maps (S of X, C of the random coefficients' Z) that the rows in
    memory would get, from the cross-products of a pass (lmefast.scaling.column_map_from_gram);
    None when both are the identity (the common case)."""
    if stats is None or stats.n == 0 or stats.xnames is None:
        return None
    xnames, znames = list(stats.xnames), list(stats.znames or [])
    c_x = next((j for j, c in enumerate(xnames) if c in ("Intercept", "(Intercept)")), None)
    n_x = stats.XtX[c_x, c_x] if c_x is not None else float(stats.n)
    S = column_map_from_gram(stats.XtX, n_x, c_x, centre=True)
    k = len(znames)
    C = np.eye(k)
    if k:
        q = np.diff(plan.layout(stats.counts.shape[0]).q_off)
        s_off = record_offsets(plan.layout(stats.counts.shape[0]), stats.p)
        rc = np.arange(k)
        ZtZ = np.array([[stats.S[s_off[:-1] + r * q + c].sum() for c in rc] for r in rc])
        c_z = znames.index(plan.group) if plan.group in znames else None
        n_z = ZtZ[c_z, c_z] if c_z is not None else float(stats.n)
        C = column_map_from_gram(ZtZ, n_z, c_z, centre=True)
    if _identity(S) and _identity(C):
        return None
    return S, C


def _identity(M: np.ndarray) -> bool:
    return bool(np.array_equal(M, np.eye(M.shape[0])))


def label_kind(values: pd.Series, what: str, where: str) -> str | None:
    """'numeric', 'string', 'boolean', 'datetime' ... for the non-missing values of a column
    (None when there are none); an error for a column mixing kinds (e.g. 1 and "1")."""
    v = values.dropna()
    if len(v) == 0:
        return None
    dtype = v.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return label_kind(pd.Series(dtype.categories), what, where)
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_numeric_dtype(dtype):
        return "numeric"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if isinstance(dtype, pd.StringDtype):
        return "string"
    inferred = pd.api.types.infer_dtype(v, skipna=True)
    kind = {"string": "string", "unicode": "string", "bytes": "bytes", "integer": "numeric",
            "floating": "numeric", "mixed-integer-float": "numeric", "decimal": "numeric",
            "boolean": "boolean", "datetime64": "datetime", "datetime": "datetime",
            "date": "date"}.get(inferred)
    if kind is None:
        raise SpecificationError(f"{what} mixes values of different types ({inferred}) in {where}; "
                                 f"convert it to one type first (e.g. .astype(str))")
    return kind


@dataclass
class LabelSet:
    """The distinct values of one column over all chunks, with their kind checked.

    ``where`` records, per kind, the first chunk it was seen in (for the error message)."""

    name: str
    what: str
    parts: list = field(default_factory=list)
    size: int = 0
    kinds: dict = field(default_factory=dict)

    def add(self, values: pd.Series, where: str) -> None:
        kind = label_kind(values, self.what, where)
        if kind is None:
            return
        self.kinds.setdefault(kind, where)
        self._check()
        v = values.dropna()
        if isinstance(v.dtype, pd.CategoricalDtype):
            u = np.asarray(v.cat.remove_unused_categories().cat.categories)
        else:
            u = pd.unique(v)
            u = np.asarray(u, dtype=object if u.dtype.kind not in "iufbM" else u.dtype)
        self.parts.append(u)
        self.size += u.shape[0]
        if len(self.parts) > 1 and self.size > 4 * max(len(p) for p in self.parts):
            self._compact()

    def _check(self) -> None:
        if len(self.kinds) > 1:
            order = sorted(self.kinds.items(), key=lambda kw: [int(t) if t.isdigit() else t
                                                              for t in re.split(r"(\d+)", kw[1])])
            desc = " and ".join(f"{k} labels (first in {w})" for k, w in order)
            raise SpecificationError(
                f"{self.what} has values of different types across chunks: {desc}; convert the "
                f"column to one type in every partition or file (e.g. .astype(str))")

    def _compact(self) -> None:
        u = _unique(self.parts)
        self.parts, self.size = [u], u.shape[0]

    def merge(self, other: LabelSet) -> LabelSet:
        for kind, where in other.kinds.items():
            self.kinds.setdefault(kind, where)
        self._check()
        self.parts.extend(other.parts)
        self.size += other.size
        self._compact()
        return self

    def sorted(self) -> np.ndarray:
        """The distinct values, sorted (the order ``pd.factorize(sort=True)`` gives)."""
        if not self.parts:
            return np.zeros(0)
        u = _unique(self.parts)
        try:
            return np.sort(u) if u.dtype != object else np.asarray(sorted(u.tolist()), dtype=object)
        except TypeError as exc:
            raise SpecificationError(f"{self.what}: labels cannot be ordered ({exc}); convert the "
                                     "column to one type first") from None


def _unique(parts: list) -> np.ndarray:
    if not parts:
        return np.zeros(0)
    kinds = {p.dtype.kind for p in parts}
    if kinds <= set("iuf") and len(kinds) > 0:  # (np.unique sorts: slower than hashing here)
        return pd.unique(np.concatenate(parts))
    cat = np.concatenate([np.asarray(p, dtype=object) for p in parts])
    return np.asarray(pd.unique(cat), dtype=object)


class LabelCoder:
    """Label → global code (sorted order); −1 for a label not in the set."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self._table = None
        if labels.dtype.kind in "iu" and labels.size and labels.min() >= 0 \
                and labels.max() < 4 * labels.size + 1024:
            table = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
            table[labels] = np.arange(labels.size)
            self._table = table

    @cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.labels)

    def __getstate__(self) -> dict:
        return {"labels": self.labels, "_table": self._table}

    def codes(self, values: pd.Series) -> np.ndarray:
        if self._table is not None and values.dtype.kind in "iu":
            v = values.to_numpy()
            out = np.full(v.shape[0], -1, dtype=np.int64)
            ok = (v >= 0) & (v < self._table.shape[0])
            out[ok] = self._table[v[ok]]
            return out
        if isinstance(values.dtype, pd.CategoricalDtype):
            values = values.astype(values.dtype.categories.dtype)
        return np.asarray(self._index.get_indexer(values), dtype=np.int64)


# -- the formula, fixed once for every chunk ------------------------------------------------
@dataclass
class ChunkPlan(FormulaPlan):
    """The formula plan of data in chunks (lmefast.formula.FormulaPlan, evaluated chunk by
    chunk) with the passes that fix what every chunk must share: after pass (a) ``levels``
    holds the levels of each categorical variable and ``xnames``/``znames``/``vnames`` the
    design's columns (evaluated on an empty frame of the schema); after pass (a') ``vcmap``
    the variance components' layout.
    """

    vcmap: VCMap | None = None
    #: (S, C): the centring and scaling maps of X and of the random coefficients' Z
    #: (lmefast.scaling), applied to every chunk's design; None: the designs as they are
    maps: tuple[np.ndarray, np.ndarray] | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # -- kinds and levels ---------------------------------------------------------------------
    def label_columns(self) -> list[str]:
        """Columns read in pass (a): everything used when incomplete rows are dropped (their
        labels must not count), else the group and the categorical predictors."""
        if self.missing == "drop":
            return list(self.used)
        return [self.group, *self.level_vars, *([self.weights] if self.weights is not None else [])]

    def new_label_sets(self) -> dict[str, LabelSet]:
        out = {self.group: LabelSet(self.group, f"group column {self.group!r}")}
        for c in self.level_vars:
            out[c] = LabelSet(c, f"column {c!r}")
        return out

    def collect_labels(self, df: pd.DataFrame, sets: dict[str, LabelSet], where: str) -> int:
        """Pass (a) on one chunk: add its labels; returns its number of rows."""
        if len(df) == 0:
            return 0
        cols = self.label_columns()
        self.check_columns(df, cols, where)
        keep = self.rows_kept(df, where, cols)
        if not keep.all():
            df = df.loc[keep]
        for name, ls in sets.items():
            ls.add(df[name], where)
        return len(df)

    def fix_levels(self, sets: dict[str, LabelSet], dtypes: pd.Series) -> np.ndarray:
        """After pass (a): fix the levels, then the design's columns (from an empty frame of the
        schema's dtypes); returns the sorted group labels."""
        for c in self.level_vars:
            self.levels[c] = sets[c].sorted().tolist()
        template = pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in self.used})
        self.design(template, "the schema")
        return sets[self.group].sorted()

    @property
    def vc_columns(self) -> list[str]:
        """Columns read in pass (a'): the group and the variance components' variables."""
        if self.missing == "drop":
            return list(self.used)
        cols = {self.group} | ({self.weights} if self.weights is not None else set())
        for vf in self.vc_formulas:
            cols |= _variables(_rhs(vf))
        return sorted(cols)

    def collect_vc_keys(self, df: pd.DataFrame, coder: LabelCoder, where: str) -> list[np.ndarray]:
        """Pass (a') on one chunk: per component, the distinct (group code · K + column) of its
        non-zero entries."""
        if len(df) == 0 or not self.vc_formulas:
            return [np.zeros(0, dtype=np.int64) for _ in self.vc_formulas]
        cols = self.vc_columns
        self.check_columns(df, cols, where)
        keep = self.rows_kept(df, where, cols)
        if not keep.all():
            df = df.loc[keep]
        df = self.categorise(df[cols], where)
        codes = _group_codes(coder, df[self.group], where)
        out = []
        for V in self.vc_designs(df, where):
            K = max(V.shape[1], 1)
            coo = V.tocoo()
            nz = coo.data != 0
            out.append(pd.unique(codes[coo.row[nz]] * K + coo.col[nz].astype(np.int64)))
        return out

    def set_vc_layout(self, keys: list[np.ndarray], m: int) -> None:
        """After pass (a'): each group's block (the layout ``build_layout`` makes in memory)."""
        self.vcmap = VCMap.from_keys(keys, [len(v) for v in self.vnames or []], m, len(self.znames or []))

    def layout(self, m: int) -> BlockLayout:
        if self.vcmap is not None:
            return self.vcmap.layout
        key = ("layout", m, len(self.znames or []))
        if key not in self._cache:
            self._cache[key] = build_layout(np.zeros(0, dtype=np.int64), m, len(self.znames or []), [])
        return self._cache[key]

    def offsets(self, m: int, p: int) -> tuple[BlockLayout, np.ndarray]:
        """The layout and the record offsets of a chunk's statistics (computed once)."""
        layout = self.layout(m)
        key = ("s_off", id(layout), p)
        if key not in self._cache:
            self._cache[key] = record_offsets(layout, p)
        return layout, self._cache[key]


# -- variance components: where each (group, column) lands --------------------------------------
@dataclass
class VCMap:
    """Per variance component j: the sorted keys g·K_j + column of its non-zero (group, column)
    pairs and each pair's coordinate within its group's block; and the model's layout."""

    K: list[int]
    keys: list[np.ndarray]
    coord: list[np.ndarray]
    layout: BlockLayout

    @classmethod
    def from_keys(cls, keys: list[np.ndarray], ncols: list[int], m: int, k: int) -> VCMap:
        """The layout ``build_layout`` gives for data with these (group, column) pairs: it is
        built from one pseudo-row per pair (the layout depends on the pairs only)."""
        K = [max(n, 1) for n in ncols]
        keys = [np.sort(np.asarray(kj, dtype=np.int64)) for kj in keys]
        codes = np.concatenate([kj // Kj for kj, Kj in zip(keys, K, strict=True)]) if keys else \
            np.zeros(0, dtype=np.int64)
        n = codes.shape[0]
        designs, start = [], 0
        for kj, Kj in zip(keys, K, strict=True):
            rows = np.arange(start, start + kj.shape[0])
            designs.append(sp.csr_matrix((np.ones(kj.shape[0]), (rows, kj % Kj)), shape=(n, Kj)))
            start += kj.shape[0]
        layout = build_layout(codes.astype(np.int64), m, k, designs)
        lay = BlockLayout(layout.q_off, layout.a_off, layout.comp, layout.col,
                          np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0)))
        # coordinate of each pair: the layout's coordinates beyond k, by (component, column)
        q = np.diff(lay.q_off)
        group_of = np.repeat(np.arange(m, dtype=np.int64), q)
        local = np.arange(int(lay.q_off[-1]), dtype=np.int64) - lay.q_off[group_of]
        vc = local >= k
        coord = []
        for j, (kj, Kj) in enumerate(zip(keys, K, strict=True)):
            sel = vc & (lay.comp == j)
            key_here = group_of[sel] * Kj + lay.col[sel]
            order = np.argsort(key_here, kind="stable")
            if not np.array_equal(key_here[order], kj):
                raise AssertionError("variance-component layout does not match its pairs")
            coord.append(local[sel][order])
        return cls(K, keys, coord, lay)

    def entries(self, codes: np.ndarray, designs: list, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(vc_coord, vc_val), ne × n: each row's entries (coordinate in its group's block,
        value), as ``build_layout`` makes them for the kernel."""
        n = codes.shape[0]
        rows_all, coord_all, val_all = [], [], []
        for j, V in enumerate(designs):
            coo = V.tocoo()
            nz = coo.data != 0
            rows = coo.row[nz].astype(np.int64)
            key = codes[rows] * self.K[j] + coo.col[nz].astype(np.int64)
            kj = self.keys[j]
            pos_c = np.minimum(np.searchsorted(kj, key), max(kj.shape[0] - 1, 0))
            if key.size and (kj.shape[0] == 0 or not np.array_equal(kj[pos_c], key)):
                raise SpecificationError(f"{where}: variance-component entries that the first passes did "
                                         "not see (the data changed between passes)")
            rows_all.append(rows)
            coord_all.append(self.coord[j][pos_c])
            val_all.append(coo.data[nz].astype(float))
        if not rows_all:
            return np.zeros((0, n), dtype=np.int64), np.zeros((0, n))
        return row_entries(np.concatenate(rows_all), np.concatenate(coord_all),
                           np.concatenate(val_all), n)


def merge_keys(*parts: list[np.ndarray]) -> list[np.ndarray]:
    """Per component, the distinct keys of several chunks' pass (a')."""
    parts = [q for q in parts if q is not None]
    return [pd.unique(np.concatenate([q[j] for q in parts])) for j in range(len(parts[0]))]


def _group_codes(coder: LabelCoder, g: pd.Series, where: str) -> np.ndarray:
    codes = coder.codes(g)
    if (codes < 0).any():
        bad = g[codes < 0].unique()[:10].tolist()
        raise SpecificationError(f"group label(s) {bad} in {where} were not seen in the first pass: "
                                 "the data changed between passes")
    return codes


# -- the statistics -----------------------------------------------------------------------------
@dataclass
class ChunkStats:
    """Sums over rows: per-group records [A_i | B_i | c_i] in one flat array S at offsets
    s_off (the model's layout), X'X, X'y, y'y, n, rows per group, min and max of y."""

    p: int
    S: np.ndarray
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float = 0.0
    n: int = 0
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    ymin: float = np.inf
    ymax: float = -np.inf
    log_weights: float = 0.0
    xnames: list[str] | None = None
    znames: list[str] | None = None
    vnames: list[tuple[str, ...]] | None = None

    @classmethod
    def zeros(cls, s_off: np.ndarray, p: int) -> ChunkStats:
        m = s_off.shape[0] - 1
        return cls(p=p, S=np.zeros(int(s_off[-1])), XtX=np.zeros((p, p)), Xty=np.zeros(p),
                   counts=np.zeros(m, dtype=np.int64))

    def add(self, y: np.ndarray, X: np.ndarray, Zre: np.ndarray, codes: np.ndarray, q_off: np.ndarray,
            s_off: np.ndarray, vc_coord: np.ndarray, vc_val: np.ndarray, n_threads: int = 1,
            raw_y: np.ndarray | None = None, log_weights: float = 0.0) -> None:
        """Rows (working rows with weights or an offset; ``raw_y`` the response as given, for
        its range) added in place."""
        if y.shape[0] == 0:
            return
        accumulate(y, X, Zre, codes, q_off, s_off, vc_coord, vc_val, self.S, n_threads)
        self.XtX += X.T @ X
        self.Xty += X.T @ y
        self.yty += float(y @ y)
        self.n += int(y.shape[0])
        self.counts += np.bincount(codes, minlength=self.counts.shape[0])
        raw_y = y if raw_y is None else raw_y
        self.ymin = min(self.ymin, float(raw_y.min()))
        self.ymax = max(self.ymax, float(raw_y.max()))
        self.log_weights += log_weights

    def merge(self, other: ChunkStats) -> ChunkStats:
        """In place: self += other (the names must agree)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        if (other.xnames, other.znames, other.vnames) != (self.xnames, self.znames, self.vnames):
            raise SpecificationError(f"chunks give different design columns: {self.xnames} / "
                                     f"{self.znames} and {other.xnames} / {other.znames}")
        self.S += other.S
        self.XtX += other.XtX
        self.Xty += other.Xty
        self.yty += other.yty
        self.n += other.n
        self.log_weights += other.log_weights
        self.counts += other.counts
        self.ymin = min(self.ymin, other.ymin)
        self.ymax = max(self.ymax, other.ymax)
        return self


def chunk_stats(plan: ChunkPlan, coder: LabelCoder, df: pd.DataFrame, where: str,
                stats: ChunkStats | None, n_threads: int = 1) -> ChunkStats | None:
    """Pass (b) on one chunk: its rows added into ``stats`` (created at the first non-empty
    chunk). Empty chunks add nothing."""
    if len(df) == 0:
        return stats
    d = plan.design(df, where, need_y=True)
    y, X, Zre = d.y, d.X, d.Z
    if y.shape[0] == 0:
        return stats
    if plan.maps is not None:                  # centred and scaled designs (design_maps)
        X, Zre = X @ plan.maps[0], Zre @ plan.maps[1]
    raw_y, log_w = y, 0.0
    codes = _group_codes(coder, d.groups, where)
    m = coder.labels.shape[0]
    layout, s_off = plan.offsets(m, X.shape[1])
    if plan.vcmap is not None:
        vc_coord, vc_val = plan.vcmap.entries(codes, d.V, where)
    else:
        vc_coord, vc_val = np.zeros((0, y.shape[0]), dtype=np.int64), np.zeros((0, y.shape[0]))
    if d.offset is not None:
        y = y - d.offset
    if d.weights is not None:          # the working rows (module docstring)
        w = d.weights
        sw = np.sqrt(w)
        y, X, Zre, vc_val = y * sw, X * sw[:, None], Zre * sw[:, None], vc_val * sw
        log_w = float(np.sum(np.log(w)))
    if stats is None:
        stats = ChunkStats.zeros(s_off, X.shape[1])
        stats.xnames, stats.znames, stats.vnames = plan.xnames, plan.znames, plan.vnames
    stats.add(np.ascontiguousarray(y), np.ascontiguousarray(X), np.ascontiguousarray(Zre), codes,
              layout.q_off, s_off, vc_coord, np.ascontiguousarray(vc_val), n_threads, raw_y, log_w)
    return stats


# -- the model without rows -------------------------------------------------------------------
@dataclass(frozen=True)
class StatsSpec:
    """What ``ModelSpec`` says about a model, without its rows (y, X, Zre, group codes)."""

    group_labels: np.ndarray
    layout: BlockLayout
    theta_map: GroupThetaMap
    endog_name: str
    exog_names: tuple[str, ...]
    group_name: str
    n: int
    vc_col_names: tuple[tuple[str, ...], ...] = ()
    dropped_exog: tuple[str, ...] = ()
    source_kind: str = "chunked data"

    coord_names = ModelSpec.coord_names

    @property
    def nobs(self) -> int:
        return self.n

    @property
    def n_groups(self) -> int:
        return int(self.group_labels.shape[0])

    @property
    def k_fe(self) -> int:
        return len(self.exog_names)

    @property
    def k_re(self) -> int:
        return self.theta_map.k

    def _no_rows(self, what: str):
        raise RowsUnavailableError(
            f"{what} is not in memory: the model was fitted from {self.source_kind} and kept only the "
            "cross-products, so what needs the rows (simulation, bootstrap, Kenward-Roger, ...) is "
            "not available; fitted values, residuals and predictions are another pass over the data "
            "(the results' fittedvalues, fitted_chunks(), predict(newdata))")

    @property
    def y(self) -> np.ndarray:
        self._no_rows("the response")

    @property
    def X(self) -> np.ndarray:
        self._no_rows("the fixed-effects design")

    @property
    def Zre(self) -> np.ndarray:
        self._no_rows("the random-effects design")

    @property
    def group_codes(self) -> np.ndarray:
        self._no_rows("the group codes")


def build_model(plan: ChunkPlan, labels: np.ndarray, stats: ChunkStats | None,
                source: ChunkSource) -> MixedLM:
    """The checks ``MixedLM`` makes, then the model from the statistics."""
    check_rows(0 if stats is None else stats.n, plan.missing == "drop" or plan.weights is not None)
    gname, yname = plan.group, plan.yname
    xnames, znames = list(stats.xnames or []), list(stats.znames or [])
    vnames = list(stats.vnames or [])
    k, p = len(znames), stats.p
    S, counts = stats.S, stats.counts
    layout = plan.layout(labels.shape[0])
    present = counts > 0
    if not present.all():  # groups without rows (missing='drop' dropped them all)
        if plan.vcmap is not None:
            raise SpecificationError(f"{int((~present).sum())} group(s) have no rows in the last pass "
                                     "but had some in the first: the data changed between passes")
        S = S.reshape(labels.shape[0], -1)[present].reshape(-1)
        counts, labels = counts[present], labels[present]
        layout = build_layout(np.zeros(0, dtype=np.int64), labels.shape[0], k, [])
    m = labels.shape[0]
    check_not_constant(stats.ymin, stats.ymax, yname)
    cp = CrossProducts(S=np.ascontiguousarray(S), s_off=record_offsets(layout, p), XtX=stats.XtX,
                       Xty=stats.Xty, yty=stats.yty, n=stats.n, layout=layout,
                       log_weights=stats.log_weights)
    keep = full_rank_columns_from_xtx(stats.XtX, stats.n)
    dropped = tuple(xnames[j] for j in range(p) if j not in set(keep.tolist()))
    if dropped:
        warn_dropped(dropped, stacklevel=4)
        cp = cp.keep_fixed(keep)
        xnames = [xnames[j] for j in keep]
    S, s_off = cp.S, cp.s_off
    q = np.diff(layout.q_off)
    if k and not np.any(S[s_off[:-1, None] + np.arange(k) * (q[:, None] + 1)]):
        raise SpecificationError("exog_re is all zero")
    if k:     # the random coefficients' Z'Z (as the engine sees Z), as MixedLM checks it
        rc = np.arange(k)
        ztz = np.array([[S[s_off[:-1] + r * q + c].sum() for c in rc] for r in rc])
        coef = ["(Intercept)" if c == gname else c for c in znames]
        check_random_gram(ztz, stats.n, coef, f"({' + '.join(coef)} | {gname})")
    if m < 2 and k > 0:
        raise SpecificationError(f"grouping factor '{gname}' has a single level: random coefficients "
                                 "need at least two groups")
    if m < 2 and plan.vc_formulas:
        raise SpecificationError("statsmodels' spelling of crossed effects (one group, variance "
                                 "components) is not supported for Parquet or Dask data")
    check_identifiable(stats.n, int(layout.q_off[-1]), f"grouping factor '{gname}'")
    spec = StatsSpec(group_labels=labels, layout=layout,
                     theta_map=GroupThetaMap(k, len(plan.vc_names), tuple(znames), plan.vc_names),
                     endog_name=yname, exog_names=tuple(xnames), group_name=gname, n=stats.n,
                     vc_col_names=tuple(vnames), dropped_exog=dropped, source_kind=source.kind)
    source.plan, source.coder = plan, LabelCoder(labels)
    source.make_payload = one_factor_payload
    engine = OneFactorEngine(spec, crossprods=cp, group_sizes=counts, source=source)
    if plan.maps is not None:
        S_map, C_map = plan.maps
        if dropped:
            S_map = S_map[np.ix_(keep, keep)]
        engine.design_scaling = DesignScaling(
            S_map, ((C_map,) if k else ()) + tuple(np.eye(1) for _ in plan.vc_names))
    return MixedLM.from_engine(engine, api="statsmodels", endog_name=yname, exog_names=xnames,
                               dropped_exog=dropped)


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictPayload:
    """What a chunk needs to predict from a fit with one grouping factor: β̂ (on the design's
    full columns), the modes of the random coefficients (m × k), of every coordinate (b,
    offsets q_off: variance components) and the label coder; shipped to every worker once."""

    beta_full: np.ndarray
    modes: np.ndarray
    b: np.ndarray
    coder: LabelCoder
    plan: ChunkPlan

    @property
    def columns(self) -> list[str]:
        return list(self.plan.used)

    @property
    def yname(self) -> str:
        return self.plan.yname

    @property
    def fit_only_columns(self) -> list[str]:
        return self.plan.fit_only_columns

    @property
    def group_columns(self) -> list[str]:
        return [self.plan.group]

    def predict(self, df: pd.DataFrame, where: str, *, include_random: bool, new_levels: str,
                resid: bool = False, fitted_rows: bool = False) -> np.ndarray:
        return predict_chunk(self, df, where, include_random=include_random, new_levels=new_levels,
                             resid=resid, fitted_rows=fitted_rows)


def predict_chunk(payload: PredictPayload, df: pd.DataFrame, where: str, *, include_random: bool,
                  new_levels: str, resid: bool = False, fitted_rows: bool = False) -> np.ndarray:
    """Predictions (or residuals) for one chunk; NaN for rows with missing values (with
    ``fitted_rows``, for every row the fit did not use, a missing response included)."""
    out = np.full(len(df), np.nan)
    if len(df) == 0:
        return out
    plan = payload.plan
    if plan.offset is not None and not (resid or fitted_rows):
        raise PredictionError("predictions for new rows of a model with an offset are not implemented "
                              "(the fitted rows' predictions include it: res.fittedvalues)")
    d = plan.design(df, where, need_y=resid or fitted_rows, need_group=include_random, missing="drop")
    y, X, Zre, g, keep, V = d.y, d.X, d.Z, d.groups, d.keep, d.V
    pred = X @ payload.beta_full
    if d.offset is not None:
        pred = pred + d.offset
    if include_random:
        codes = payload.coder.codes(g)
        new = codes < 0
        if new.any() and new_levels == "error":
            raise SpecificationError(f"group level(s) {sorted({str(v) for v in g[new]})[:10]} in {where} "
                                     "were not in the fit (pass new_levels='population')")
        if plan.vcmap is not None:
            if not fitted_rows:
                raise SpecificationError("conditional predictions on new data are not implemented for "
                                         "models with variance components; use include_random=False")
            vc_coord, vc_val = plan.vcmap.entries(codes, V, where)
            base = plan.vcmap.layout.q_off[codes]
            pred = pred + np.sum(vc_val * payload.b[base[None, :] + vc_coord], axis=0)
        contrib = np.einsum("ij,ij->i", Zre, payload.modes[np.where(new, 0, codes)])
        pred = pred + np.where(new, 0.0, contrib)
    out[keep] = y - pred if resid else pred
    return out


def one_factor_payload(res: MixedLMResults) -> PredictPayload:
    source = res.model.source
    plan = source.plan
    beta = np.zeros(len(plan.xnames or []))
    pos = {n: j for j, n in enumerate(plan.xnames or [])}
    pos.setdefault("(Intercept)", pos.get("Intercept", -1))      # lme4's name of the intercept
    for name, b in zip(res.model.exog_names, res._beta, strict=True):   # β on the user's scale
        beta[pos[name]] = b
    modes = res.engine.coefficient_modes(res._objective, res._sol).to_numpy()
    b = res.engine._modes(res._objective, res._sol)[0] if plan.vcmap is not None else np.zeros(0)
    return PredictPayload(beta, np.ascontiguousarray(modes), b, source.coder, plan)


def predict_pandas(res: MixedLMResults, newdata: pd.DataFrame, include_random: bool,
                   new_levels: str) -> np.ndarray:
    return res.model.source.payload(res).predict(newdata, "newdata", include_random=include_random,
                                                  new_levels=new_levels)
