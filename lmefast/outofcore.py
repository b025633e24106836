"""Out of core on one machine: fit from a Parquet file or a directory of Parquet files.

    model = lmefast.outofcore.mixedlm_parquet("y ~ x1 + x2", "data/", groups="g", re_formula="~x1")
    # or, the same: lmefast.mixedlm("y ~ x1 + x2", "data/", groups="g", re_formula="~x1")
    res = model.fit(verbose=True)

The files are read with pyarrow, only the used columns, row group by row group (a row group
larger than ``batch_rows`` in slices of that many rows), in two passes (lmefast.chunked):
(a) the group column and the categorical predictors, for the sorted group labels and the
levels; with variance components, (a') the group and the components' columns, for each
group's block; (b) every used column, added chunk by chunk into one set of per-group
cross-products.
Memory: the statistics (about 8 (k² + kp + k + 2) bytes per group) plus one chunk; never
the rows. The fit then runs on the statistics only.

Fitted values and residuals need the rows again: ``res.fittedvalues`` / ``res.resid`` raise
``RowsUnavailableError`` (an O(rows) array is what out of core avoids); stream them instead with
``res.fitted_chunks()`` (one DataFrame per chunk, in file order) or write them with
``res.write_fitted(path)``. ``res.predict(newdata)`` works for a pandas (or Dask) DataFrame.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from lmefast.chunked import (
    ChunkPlan,
    ChunkSource,
    model_from_chunks,
    predict_pandas,
)
from lmefast.errors import RowsUnavailableError, SpecificationError
from lmefast.formula import check_has_columns, column_kind
from lmefast.model import MixedLM
from lmefast.progress import ProgressFn, progress_function
from lmefast.results import MixedLMResults

DEFAULT_BATCH_ROWS = 1_000_000
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def parquet_files(path: str | os.PathLike | list) -> list[Path]:
    """A file, a directory (its Parquet files, recursively, sorted), or a list of files."""
    if isinstance(path, list | tuple):
        files = [Path(p) for p in path]
    else:
        p = Path(path)
        if not p.exists():
            raise SpecificationError(f"data path {str(path)!r} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in PARQUET_SUFFIXES
                           and not any(part.startswith(("_", ".")) for part in f.relative_to(p).parts))
            if not files:
                raise SpecificationError(f"directory {str(path)!r} has no Parquet files "
                                         f"({', '.join(PARQUET_SUFFIXES)})")
        else:
            files = [p]
    for f in files:
        if not f.is_file():
            raise SpecificationError(f"data file {str(f)!r} does not exist")
    return files


class ParquetSource(ChunkSource):
    """Chunks of a set of Parquet files: (description, pandas DataFrame) per row group."""

    kind = "Parquet files"
    unit = "rows"
    merge_every = 16   # partial results held before they are merged (fn/merge passes)

    def __init__(self, path: str | os.PathLike | list, batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        import pyarrow.parquet as pq

        self.files = parquet_files(path)
        self.batch_rows = int(batch_rows)
        if self.batch_rows < 1:
            raise SpecificationError(f"batch_rows must be positive, got {batch_rows}")
        self._pq = pq
        self.meta = []
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
                raise SpecificationError(f"cannot read {str(f)!r} as Parquet ({exc}); only Parquet is read "
                                         "out of core: read other formats with pandas or Dask") from None
            self.meta.append((pf.metadata.num_rows, pf.schema_arrow))
        self.total_rows = sum(n for n, _ in self.meta)

    def __getstate__(self) -> dict:
        """Pickled without the pyarrow module (imported again on loading)."""
        return {k: v for k, v in self.__dict__.items() if k != "_pq"}

    def __setstate__(self, state: dict) -> None:
        import pyarrow.parquet as pq

        self.__dict__.update(state)
        self._pq = pq

    def dtypes(self, i: int = 0) -> pd.Series:
        return self.meta[i][1].empty_table().to_pandas().dtypes

    def check_plan(self, plan: ChunkPlan) -> None:
        """Column kinds from the first file; every file must have the used columns, each of
        one kind (numeric or not) in every file."""
        first = self.files[0].name
        plan.set_kinds(self.dtypes(0), f"file {first!r}")
        for i, f in enumerate(self.files[1:], start=1):
            dt = self.dtypes(i)
            check_has_columns(dt.index, plan.used, f"file {f.name!r}")
            for c in plan.used:
                if column_kind(dt[c]) != plan.kinds[c]:
                    what = "group column" if c == plan.group else "column"
                    raise SpecificationError(
                        f"{what} {c!r} has type {self.meta[i][1].field(c).type} in file {f.name!r} but "
                        f"{self.meta[0][1].field(c).type} in file {first!r}; give it one type in "
                        "every file")

    def chunks(self, columns: list[str], progress: ProgressFn | None = None,
               stage: str = "") -> Iterator[tuple[str, pd.DataFrame]]:
        done = 0
        if progress:
            progress(stage, 0, self.total_rows)
        for f in self.files:
            pf = self._pq.ParquetFile(f)
            for rg in range(pf.metadata.num_row_groups):
                nrg = pf.metadata.row_group(rg).num_rows
                if nrg == 0:
                    continue
                start = 0
                for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[rg],
                                             columns=columns, use_threads=True):
                    where = f"file {f.name!r} row group {rg}"
                    if batch.num_rows < nrg:
                        where += f" rows {start}-{start + batch.num_rows - 1}"
                    start += batch.num_rows
                    df = batch.to_pandas()
                    yield where, df
                    done += batch.num_rows
                    if progress:
                        progress(stage, done, self.total_rows)

    def map_reduce(self, columns: list[str], fn: Any, args: tuple, merge: Any, *, stage: str,
                   progress: ProgressFn | None = None, fold: Any = None) -> Any:
        """The chunks one after another: folded into one accumulator when ``fold`` is given,
        else fn per chunk, merged every ``merge_every`` chunks (bounded memory)."""
        acc: Any = None
        parts: list[Any] = []
        for where, df in self.chunks(columns, progress, stage):
            if fold is not None:
                acc = fold(acc, df, where, *args)
                continue
            parts.append(fn(df, where, *args))
            if len(parts) >= self.merge_every:
                acc, parts = merge(*([acc] if acc is not None else []), *parts), []
        if parts:
            acc = merge(*([acc] if acc is not None else []), *parts)
        return acc

    # -- passes over the rows for a fitted model ---------------------------------------------------
    def fitted(self, res: MixedLMResults, resid: bool):
        what = "resid" if resid else "fittedvalues"
        raise RowsUnavailableError(
            f"{what}: the model was fitted out of core from Parquet and the rows are not in memory; "
            "use res.fitted_chunks() to stream fitted values and residuals chunk by chunk, "
            "res.write_fitted(path) to write them to Parquet, or res.predict(newdata) for a DataFrame")

    def fitted_chunks(self, res: MixedLMResults, progress: ProgressFn | None
                      ) -> Iterator[pd.DataFrame]:
        payload = self.payload(res)
        for where, df in self.chunks(payload.columns, progress, "fitted values"):
            fit = payload.predict(df, where, include_random=True, new_levels="population",
                                  fitted_rows=True)
            y = df[payload.yname].to_numpy(dtype=float)
            yield pd.DataFrame({"fittedvalues": fit, "resid": y - fit})

    def predict(self, res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str):
        if newdata is None:
            self.fitted(res, resid=False)
        return predict_any(res, newdata, include_random, new_levels)

    def write_fitted(self, res: MixedLMResults, path: Any, progress: ProgressFn | None) -> int:
        """Fitted values and residuals written to one Parquet file (one row group per chunk, in
        the order of the data); returns the number of rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        n = 0
        try:
            for df in self.fitted_chunks(res, progress):
                table = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(str(path), table.schema)
                writer.write_table(table)
                n += len(df)
        finally:
            if writer is not None:
                writer.close()
        return n


def predict_any(res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str):
    """pandas → numpy array; Dask → lazy Dask Series."""
    if isinstance(newdata, pd.DataFrame):
        return predict_pandas(res, newdata, include_random, new_levels)
    if type(newdata).__module__.startswith("dask."):
        from lmefast.dask import predict_lazy

        return predict_lazy(res, newdata, include_random, new_levels)
    raise SpecificationError(f"newdata must be a pandas or Dask DataFrame, not {type(newdata).__name__}")


def mixedlm_parquet(
    formula: str,
    path: str | os.PathLike | list,
    groups: str,
    re_formula: str | None = None,
    vc_formula: Any = None,
    missing: str = "raise",
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool | ProgressFn | None = None,
    n_threads: int | None = None,
    weights: str | None = None,
    offset: str | None = None,
) -> MixedLM:
    """statsmodels' ``mixedlm`` on Parquet data, out of core: reads the data (two passes) and
    returns a model whose ``fit()`` uses the cross-products only.

    ``path``: a Parquet file, a directory of Parquet files (read recursively, in sorted order)
    or a list of files. ``groups``: the grouping column's name. ``re_formula``: the random
    coefficients (default a random intercept); ``vc_formula``: variance components nested in the
    groups (then a third pass finds each group's columns). ``batch_rows``:
    rows per chunk at most (row groups are read whole up to this size). ``progress``: True prints
    the data passes' progress to stderr; a callable receives (stage, rows done, total rows).
    ``n_threads``: threads for the pass over each chunk (default: all cores for many groups).
    ``weights``, ``offset``: names of columns of prior weights and of an offset (lme4's meaning;
    zero weights drop their rows).
    """
    plan = ChunkPlan.from_formula(formula, groups, re_formula, vc_formula, missing, weights, offset)
    return model_from_chunks(plan, ParquetSource(path, batch_rows), progress_function(progress), n_threads)


def write_fitted(res: MixedLMResults, path: str | os.PathLike,
                 progress: bool | ProgressFn | None = None) -> int:
    """Fitted values and residuals of a Parquet fit, written to one Parquet file."""
    return res.write_fitted(path, progress)
