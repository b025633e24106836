"""Dask (lmefast.dask) on a real distributed.LocalCluster (2 worker processes): the same fit as in
memory, lazy fitted values and predictions, progress, bad partitions."""
from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from scaleout_cases import MODEL_IDS, RTOL, assert_same_fit, close, in_memory, model_data, synthetic

import lmefast
import lmefast.dask as ldask
from lmefast import SpecificationError


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def from_parts(parts: list[pd.DataFrame], meta: pd.DataFrame) -> dd.DataFrame:
    """A Dask DataFrame whose partitions are exactly these frames (not checked against meta)."""
    return dd.from_delayed([dask.delayed(p) for p in parts], meta=meta, verify_meta=False)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_dask_equals_in_memory(model_id: str, reml: bool, client: Client) -> None:
    df, formula, groups, re_formula, vc = model_data(model_id)
    mem = in_memory(df, formula, groups, re_formula, reml, vc)
    ddf = dd.from_pandas(df, npartitions=5)  # rows in random order: groups span partitions
    model = ldask.mixedlm(formula, ddf, groups=groups, re_formula=re_formula, vc_formula=vc,
                          client=client)
    big = model.fit(reml=reml)
    assert isinstance(big, lmefast.MixedLMResults) and big.model.source is not None
    assert_same_fit(big, mem)


def test_lazy_fitted_values_residuals_predictions(client: Client) -> None:
    df, formula, groups, re_formula, _ = model_data("dietox_cat")
    mem = in_memory(df, formula, groups, re_formula, True)
    ddf = dd.from_pandas(df, npartitions=4)
    big = lmefast.mixedlm(formula, ddf, groups=groups, re_formula=re_formula).fit()  # default client
    fv, rs = big.fittedvalues, big.resid
    assert isinstance(fv, dd.Series) and isinstance(rs, dd.Series)
    assert fv.npartitions == ddf.npartitions
    close(fv.compute().to_numpy(), mem.fittedvalues)
    scale = np.abs(mem.fittedvalues).max()
    assert np.max(np.abs(rs.compute().to_numpy() - mem.resid)) <= RTOL * scale
    new = dd.from_pandas(df.drop(columns="Weight").iloc[:100], npartitions=3)
    pred = big.predict(new, include_random=True)
    assert isinstance(pred, dd.Series)
    close(pred.compute().to_numpy(), mem.predict(df.iloc[:100], include_random=True))
    close(big.predict(new, include_random=False).compute().to_numpy(),
          mem.predict(df.iloc[:100], include_random=False))
    close(big.predict(df.iloc[:100], include_random=True),
          mem.predict(df.iloc[:100], include_random=True))  # pandas newdata: numpy
    close(big.predict(include_random=True).compute().to_numpy(), mem.fittedvalues)
    with pytest.raises(SpecificationError, match="lazy"):
        next(iter(big.fitted_chunks()))


def test_missing_values_dropped(client: Client) -> None:
    df = synthetic(3_000, 60, seed=5)
    df.loc[[3, 50, 700], "x2"] = np.nan
    df.loc[[10], "y"] = np.nan
    ddf = dd.from_pandas(df, npartitions=3)
    with pytest.raises(SpecificationError, match=r"missing.*x2"):
        ldask.mixedlm("y ~ x1 + x2", ddf, "g", "~x1")
    mem = in_memory(df, "y ~ x1 + x2", "g", "~x1", True, missing="drop")
    big = ldask.mixedlm("y ~ x1 + x2", ddf, "g", "~x1", missing="drop").fit()
    assert_same_fit(big, mem)
    fv = big.fittedvalues.compute()
    assert fv.isna().sum() == 4 and fv.index.equals(df.index)


def test_progress_and_optimiser_output(client: Client, capsys: pytest.CaptureFixture) -> None:
    df, formula, groups, re_formula, _ = model_data("synthetic")
    ddf = dd.from_pandas(df, npartitions=6)
    calls: list[tuple[str, int, int]] = []
    model = ldask.mixedlm(formula, ddf, groups, re_formula, progress=lambda *a: calls.append(a))
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert len(stages) == 2 and "labels" in stages[0] and "cross-products" in stages[1]
    for stage in stages:
        done = [c[1] for c in calls if c[0] == stage]
        assert done == list(range(7))
    iters: list[float] = []
    model.fit(verbose=True, callback=lambda it, th, f: iters.append(f))
    assert len(iters) >= 2 and capsys.readouterr().out.strip()
    ldask.mixedlm(formula, ddf, groups, re_formula, progress=True)
    assert "pass 2/2 (cross-products), partitions: 6/6 (100%)" in capsys.readouterr().err


def test_local_scheduler_same_fit(client: Client) -> None:
    """client=False: Dask's own scheduler (a tree reduction), same numbers."""
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    mem = in_memory(df, formula, groups, re_formula, True)
    ddf = dd.from_pandas(df, npartitions=11)
    calls: list[tuple[str, int, int]] = []
    with dask.config.set(scheduler="threads"):
        big = ldask.mixedlm(formula, ddf, groups, re_formula, client=False, split_every=3,
                            progress=lambda *a: calls.append(a)).fit()
    assert_same_fit(big, mem)
    assert calls[-1][1:] == (11, 11)


# -- bad input -----------------------------------------------------------------------------------
def test_group_key_types_differ_across_partitions(client: Client) -> None:
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    a, b = df.iloc[:90], df.iloc[90:]
    ddf = from_parts([a, b.assign(Subject=b["Subject"].astype(str))], df.iloc[:0])
    with pytest.raises(SpecificationError, match=r"group column 'Subject'.*numeric.*partition 0.*string.*"
                                                 r"partition 1"):
        ldask.mixedlm(formula, ddf, groups, re_formula)
    mixed = df.assign(Subject=df["Subject"].astype(object))
    mixed.loc[5, "Subject"] = "x"
    with pytest.raises(SpecificationError, match="mixes values of different types"):
        ldask.mixedlm(formula, from_parts([mixed.iloc[:90], mixed.iloc[90:]], df.iloc[:0]), groups,
                      re_formula)


def test_partition_missing_a_column(client: Client) -> None:
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    ddf = from_parts([df.iloc[:90], df.iloc[90:].drop(columns="Days")], df.iloc[:0])
    with pytest.raises(SpecificationError, match=r"partition.*lacks a used column.*Days"):
        ldask.mixedlm(formula, ddf, groups, re_formula)
    with pytest.raises(SpecificationError, match=r"not found.*Dask DataFrame"):
        ldask.mixedlm("Reaction ~ Nights", dd.from_pandas(df, npartitions=2), groups, re_formula)


def test_empty_partitions_are_handled(client: Client) -> None:
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    mem = in_memory(df, formula, groups, re_formula, True)
    empty_object = pd.DataFrame({c: pd.Series([], dtype=object) for c in df.columns})
    ddf = from_parts([df.iloc[:0], df.iloc[:60], empty_object, df.iloc[60:]], df.iloc[:0])
    big = ldask.mixedlm(formula, ddf, groups, re_formula).fit()
    assert_same_fit(big, mem)
    fv = big.fittedvalues.compute()
    close(fv.to_numpy(), mem.fittedvalues)
    ddf_empty = from_parts([df.iloc[:0], df.iloc[:0]], df.iloc[:0])
    with pytest.raises(SpecificationError, match="empty"):
        ldask.mixedlm(formula, ddf_empty, groups, re_formula)


def test_not_a_dask_frame_and_options(client: Client) -> None:
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    with pytest.raises(SpecificationError, match="dask.dataframe.DataFrame"):
        ldask.mixedlm(formula, df, groups, re_formula)
    ddf = dd.from_pandas(df, npartitions=2)
    with pytest.raises(SpecificationError, match="name of a column"):
        ldask.mixedlm(formula, ddf, df[groups], re_formula)
    with pytest.raises(SpecificationError, match="split_every"):
        ldask.mixedlm(formula, ddf, groups, re_formula, split_every=1)


def test_variance_components_lazy_fitted_values(client: Client) -> None:
    df, formula, groups, re_formula, vc = model_data("synthetic_vc")
    mem = in_memory(df, formula, groups, re_formula, False, vc)
    big = lmefast.mixedlm(formula, dd.from_pandas(df, npartitions=4), groups=groups, re_formula=re_formula,
                          vc_formula=vc).fit(reml=False)
    assert_same_fit(big, mem)
    close(big.fittedvalues.compute().to_numpy(), mem.fittedvalues)
    scale = np.abs(mem.fittedvalues).max()
    assert np.max(np.abs(big.resid.compute().to_numpy() - mem.resid)) <= RTOL * scale
