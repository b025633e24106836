"""Dask: fit a mixed model to a ``dask.dataframe.DataFrame`` (data beyond one machine).

    import dask.dataframe as dd, distributed, lmefast
    client = distributed.Client(distributed.LocalCluster(n_workers=2))
    ddf = dd.read_parquet("data/")
    model = lmefast.dask.mixedlm("y ~ x1 + x2", ddf, groups="g", re_formula="~x1", progress=True)
    # or, the same: lmefast.mixedlm("y ~ x1 + x2", ddf, groups="g", re_formula="~x1")
    res = model.fit(verbose=True)
    res.fittedvalues            # lazy Dask Series (one partition per partition of ddf)

Two passes over the partitions, each a map on the workers and a tree reduction
(lmefast.chunked): (a) the labels of the group column (a group may span partitions; the codes
are global, in sorted label order, as in memory) and the levels of categorical predictors;
(b) per partition, the per-group cross-products, summed. Only the statistics (O(groups))
come back to the client, where the optimiser runs. With a ``distributed`` client (the default
client, or ``client=``) partial sums are merged as partitions finish; with Dask's local
schedulers the reduction is a tree of ``split_every`` at a time.

Fitted values, residuals and predictions are lazy Dask Series (``map_partitions`` with β̂ and
the conditional modes); rows with missing values get NaN.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from lmefast.chunked import (
    ChunkPlan,
    ChunkSource,
    model_from_chunks,
    predict_pandas,
)
from lmefast.errors import SpecificationError
from lmefast.model import MixedLM
from lmefast.progress import ProgressFn, progress_function
from lmefast.results import MixedLMResults

_token = itertools.count()


# -- work on one partition (runs on the workers) ------------------------------------------------
def _partition(df: pd.DataFrame, i: int, fn: Any, *args: Any) -> Any:
    return fn(df, f"partition {i}", *args)


def _fitted_part(df: pd.DataFrame, payload: Any, resid: bool, fitted_rows: bool,
                 include_random: bool, new_levels: str, name: str,
                 partition_info: dict | None = None) -> pd.Series:
    where = f"partition {partition_info['number']}" if partition_info else "a partition"
    out = payload.predict(df, where, include_random=include_random, new_levels=new_levels,
                          resid=resid, fitted_rows=fitted_rows)
    return pd.Series(out, index=df.index, name=name)


# -- map and reduce ---------------------------------------------------------------------------------
def _default_client(client: Any) -> Any:
    """The given client; None for client=False (Dask's configured local scheduler); else the
    current distributed client if there is one."""
    if client is False:
        return None
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _project(data: Any, columns: list[str]) -> list:
    """One delayed pandas DataFrame per partition, with only ``columns`` (read only those)."""
    return list(data[columns].to_delayed())


def _missing_column_error(exc: KeyError, columns: list[str], stage: str) -> Exception:
    text = str(exc.args[0]) if exc.args else ""
    if "not in index" not in text and not any(repr(c) in text or c == text for c in columns):
        return exc
    return SpecificationError(
        f"a partition of the Dask DataFrame lacks a used column (pandas: {text}) although the "
        f"DataFrame's metadata lists it ({stage}); every partition must have the metadata's columns")


def _map_reduce(data: Any, columns: list[str], fn: Any, args: tuple, merge: Any, *, client: Any,
                progress: ProgressFn | None, stage: str, split_every: int) -> Any:
    """fn(partition, "partition i", *args) on every partition (only ``columns`` read), merged
    by ``merge``."""
    import dask

    parts = _project(data, columns)
    if not parts:
        return None
    tok = next(_token)
    prefix = f"lmefast-{stage.split()[0]}-{tok}"
    tasks = [dask.delayed(_partition, pure=False)(p, i, fn, *args, dask_key_name=f"{prefix}-{i}")
             for i, p in enumerate(parts)]
    total = len(tasks)
    if progress:
        progress(stage, 0, total)
    try:
        if client is not None:
            return _reduce_distributed(client, tasks, merge, progress, stage)
        return _reduce_local(tasks, merge, progress, stage, prefix, split_every)
    except KeyError as exc:
        raise _missing_column_error(exc, columns, stage) from None


def _reduce_distributed(client: Any, tasks: list, merge: Any, progress: ProgressFn | None,
                        stage: str) -> Any:
    """Partial results merged as they arrive, two on the same worker at a time (no transfer;
    merges before new partitions: bounded memory on the workers); then across workers."""
    from distributed import as_completed

    futures = client.compute(tasks)
    leaves = {f.key for f in futures}
    total, done = len(futures), 0
    seq = as_completed(futures)
    pending: dict[Any, Any] = {}  # worker → its partial result
    for fut in seq:
        if fut.status == "error":
            fut.result()  # raises the worker's exception; the other futures are released
        if fut.key in leaves:
            done += 1
            if progress:
                progress(stage, done, total)
        holders = client.who_has([fut]).get(fut.key) or [None]
        worker = holders[0]
        if worker in pending:
            seq.add(client.submit(merge, pending.pop(worker), fut, priority=100, pure=False,
                                  workers=None if worker is None else [worker], allow_other_workers=True))
        else:
            pending[worker] = fut
    del futures
    rest = list(pending.values())
    if len(rest) == 1:
        return rest[0].result()
    return client.submit(merge, *rest, priority=100, pure=False).result()


def _reduce_local(tasks: list, merge: Any, progress: ProgressFn | None, stage: str, prefix: str,
                  split_every: int) -> Any:
    import dask
    from dask.callbacks import Callback

    level = tasks
    while len(level) > 1:
        level = [dask.delayed(merge, pure=False)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    total = len(tasks)

    class _Progress(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.done = 0

        def _posttask(self, key, result, dsk, state, id) -> None:  # noqa: A002 (dask's signature)
            if isinstance(key, str) and key.startswith(prefix + "-") and progress:
                self.done += 1
                progress(stage, self.done, total)

    with _Progress():
        return dask.compute(level[0])[0]


def _shared(obj: Any, client: Any) -> Any:
    """A large argument sent once: scattered to the workers, or one key of the graph."""
    import dask

    if client is not None:
        return client.scatter(obj, broadcast=True, hash=False)
    return dask.delayed(obj, pure=True)


def is_dask_dataframe(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("dask.") and hasattr(obj, "map_partitions") and hasattr(obj, "columns")


# -- the front end -----------------------------------------------------------------------------
def mixedlm(
    formula: str,
    data: Any,
    groups: str,
    re_formula: str | None = None,
    vc_formula: Any = None,
    missing: str = "raise",
    *,
    client: Any = None,
    progress: bool | ProgressFn | None = None,
    n_threads: int = 1,
    split_every: int = 8,
    weights: str | None = None,
    offset: str | None = None,
) -> MixedLM:
    """statsmodels' ``mixedlm`` on a Dask DataFrame: reads the data (two passes on the cluster)
    and returns a model whose ``fit()`` runs on the client from the cross-products.

    ``groups``: the grouping column's name; ``re_formula``: random coefficients (default a
    random intercept); ``vc_formula``: variance components nested in the groups (then a third
    pass finds each group's columns). ``client``: a ``distributed.Client``
    (default: the current one, else Dask's configured scheduler; ``client=False``: Dask's
    configured scheduler even when a client exists). ``progress``: True prints
    partitions done per pass to stderr; a callable receives (stage, partitions done, total).
    ``n_threads``: threads per partition task (default 1: Dask runs partitions in parallel).
    ``weights``, ``offset``: names of columns of prior weights and of an offset (lme4's meaning;
    zero weights drop their rows).
    """
    if not is_dask_dataframe(data):
        raise SpecificationError(f"data must be a dask.dataframe.DataFrame, not {type(data).__name__}")
    if int(split_every) < 2:
        raise SpecificationError(f"split_every must be at least 2, got {split_every}")
    plan = ChunkPlan.from_formula(formula, groups, re_formula, vc_formula, missing, weights, offset)
    source = DaskSource(data, client=client, split_every=split_every)
    return model_from_chunks(plan, source, progress_function(progress), n_threads)


class DaskSource(ChunkSource):
    """A Dask DataFrame as chunks: each pass a map on the workers and a tree reduction (merged
    as partitions finish with a distributed client; ``split_every`` at a time with Dask's
    local schedulers); lazy fitted values and predictions for a fitted model."""

    kind = "a Dask DataFrame"
    unit = "partitions"

    def __init__(self, data: Any, client: Any = None, split_every: int = 8) -> None:
        if not is_dask_dataframe(data):
            raise SpecificationError(f"data must be a dask.dataframe.DataFrame, not {type(data).__name__}")
        if int(split_every) < 2:
            raise SpecificationError(f"split_every must be at least 2, got {split_every}")
        self.data = data
        self.client = _default_client(client)
        self.split_every = int(split_every)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["client"] = None   # a client does not travel; the unpickled source uses the default
        return state

    def dtypes(self) -> pd.Series:
        return self.data.dtypes

    def shared(self, obj: Any) -> Any:
        return _shared(obj, self.client)

    def map_reduce(self, columns: list[str], fn: Any, args: tuple, merge: Any, *, stage: str,
                   progress: ProgressFn | None = None, fold: Any = None) -> Any:
        return _map_reduce(self.data, columns, fn, args, merge, client=self.client, progress=progress,
                           stage=stage, split_every=self.split_every)

    def fitted(self, res: MixedLMResults, resid: bool):
        return _lazy(res, self.data[self.payload(res).columns], resid=resid, fitted_rows=True,
                     include_random=True, new_levels="population",
                     name="resid" if resid else "fittedvalues")

    def fitted_chunks(self, res: MixedLMResults, progress: Any):
        raise SpecificationError("for a Dask fit, res.fittedvalues and res.resid are lazy Dask Series: "
                                 "compute them, iterate their partitions or write them with to_parquet")

    def predict(self, res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str):
        if newdata is None:
            if include_random:
                return self.fitted(res, resid=False)
            newdata = self.data
        if is_dask_dataframe(newdata):
            return predict_lazy(res, newdata, include_random, new_levels)
        if isinstance(newdata, pd.DataFrame):
            return predict_pandas(res, newdata, include_random, new_levels)
        raise SpecificationError(f"newdata must be a pandas or Dask DataFrame, not {type(newdata).__name__}")


def _lazy(res: MixedLMResults, ddf: Any, *, resid: bool, fitted_rows: bool, include_random: bool,
          new_levels: str, name: str):
    import dask

    payload = dask.delayed(res.model.source.payload(res), pure=True)
    meta = pd.Series(np.zeros(0), name=name, dtype=float)
    return ddf.map_partitions(_fitted_part, payload, resid, fitted_rows, include_random, new_levels, name,
                              meta=meta)


def predict_lazy(res: MixedLMResults, newdata: Any, include_random: bool, new_levels: str):
    """Predictions for a Dask DataFrame: a lazy Dask Series (partitions as newdata's)."""
    payload = res.model.source.payload(res)
    cols = [c for c in payload.columns
            if c not in payload.fit_only_columns and (include_random or c not in payload.group_columns)]
    absent = sorted(c for c in cols if c not in newdata.columns)
    if absent:
        raise SpecificationError(f"newdata is missing column(s) {absent}")
    return _lazy(res, newdata[cols], resid=False, fitted_rows=False, include_random=include_random,
                 new_levels=new_levels, name="predicted")

