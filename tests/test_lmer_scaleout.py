"""lmer formulas on Parquet files and Dask DataFrames: one grouping factor (the core engine)
and several (the blocked cross-products summed over chunks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast.spec import SpecificationError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def sleep_parquet(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    df = pd.read_csv(DATA / "sleepstudy.csv")
    df["Subject"] = df["Subject"].astype(str)
    path = tmp_path_factory.mktemp("lmer") / "sleep.parquet"
    df.to_parquet(path, row_group_size=50)
    return df, path


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (Days | Subject)",
                                     "Reaction ~ Days + (1 | Subject)",
                                     "Reaction ~ Days + (Days || Subject)"])
@pytest.mark.parametrize("reml", [True, False])
def test_parquet_equals_in_memory(sleep_parquet: tuple[pd.DataFrame, Path], formula: str,
                                  reml: bool) -> None:
    df, path = sleep_parquet
    mem = lmefast.lmer(formula, df, reml=reml)
    ooc = lmefast.lmer(formula, str(path), reml=reml)
    assert ooc.llf == pytest.approx(mem.llf, rel=1e-10)
    np.testing.assert_allclose(ooc.fe_params.to_numpy(), mem.fe_params.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(ooc.bse_fe.to_numpy(), mem.bse_fe.to_numpy(), rtol=1e-8)
    assert ooc.scale == pytest.approx(mem.scale, rel=1e-10)


def test_dask_equals_in_memory(sleep_parquet: tuple[pd.DataFrame, Path]) -> None:
    dd = pytest.importorskip("dask.dataframe")
    df, _ = sleep_parquet
    ddf = dd.from_pandas(df, npartitions=3)
    mem = lmefast.lmer("Reaction ~ Days + (Days | Subject)", df)
    dsk = lmefast.lmer("Reaction ~ Days + (Days | Subject)", ddf, client=False)
    assert dsk.llf == pytest.approx(mem.llf, rel=1e-10)
    np.testing.assert_allclose(dsk.theta, mem.theta, rtol=1e-6)


def test_unsupported_terms_out_of_core_are_refused(sleep_parquet: tuple[pd.DataFrame, Path]) -> None:
    _, path = sleep_parquet
    with pytest.raises(SpecificationError, match="single uncorrelated column"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject) + (1 + Days | Subject)", str(path))


MULTI = [("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
         ("Pastes", "strength ~ 1 + (1|batch/cask)")]


def _split_parquet(df: pd.DataFrame, path: Path, parts: int) -> Path:
    path.mkdir()
    shuffled = df.sample(frac=1, random_state=1).reset_index(drop=True)
    for i in range(parts):
        shuffled.iloc[i::parts].to_parquet(path / f"part{i}.parquet")
    return path


@pytest.mark.parametrize(("data", "formula"), MULTI)
@pytest.mark.parametrize("reml", [True, False])
def test_several_factors_from_parquet_files(tmp_path: Path, data: str, formula: str,
                                            reml: bool) -> None:
    df = pd.read_csv(DATA / f"{data}.csv")
    path = _split_parquet(df, tmp_path / "data", 3)
    mem = lmefast.lmer(formula, df, reml=reml)
    ooc = lmefast.lmer(formula, str(path), reml=reml)
    assert ooc.llf == pytest.approx(mem.llf, rel=1e-10)
    np.testing.assert_allclose(ooc.theta, mem.theta, rtol=1e-7)
    np.testing.assert_allclose(ooc.fe_params.to_numpy(), mem.fe_params.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(ooc.bse_fe.to_numpy(), mem.bse_fe.to_numpy(), rtol=1e-8)
    for name, frame in mem.random_effects.items():
        np.testing.assert_allclose(ooc.random_effects[name].to_numpy(), frame.to_numpy(), rtol=1e-6,
                                   atol=1e-9)
    assert {k: v.tolist() for k, v in ooc._group_sizes().items()} == \
        {k: v.tolist() for k, v in mem._group_sizes().items()}
    with pytest.raises(RuntimeError, match="rows are not in memory"):
        _ = ooc.resid


@pytest.mark.slow
def test_several_factors_on_a_local_cluster() -> None:
    distributed = pytest.importorskip("distributed")
    dd = pytest.importorskip("dask.dataframe")
    df = pd.read_csv(DATA / "Penicillin.csv")
    formula = "diameter ~ 1 + (1|plate) + (1|sample)"
    mem = lmefast.lmer(formula, df)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster):
        dsk = lmefast.lmer(formula, dd.from_pandas(df, npartitions=4))
    assert dsk.llf == pytest.approx(mem.llf, rel=1e-10)
    np.testing.assert_allclose(dsk.theta, mem.theta, rtol=1e-7)


def test_several_factors_in_chunks_need_plain_numeric_designs(tmp_path: Path) -> None:
    df = pd.read_csv(DATA / "Pastes.csv")
    path = _split_parquet(df, tmp_path / "data", 2)
    with pytest.raises(SpecificationError, match="plain numeric"):
        lmefast.lmer("strength ~ C(cask) + (1|batch/cask)", str(path))


@pytest.mark.parametrize("kind", ["parquet", "dask"])
def test_several_factors_take_the_scale_out_options(tmp_path: Path, kind: str) -> None:
    """Several grouping factors on chunked data: the same options and progress reports as one factor
    (one map/reduce per pass for every source)."""
    dd = pytest.importorskip("dask.dataframe")
    df = pd.read_csv(DATA / "Penicillin.csv")
    formula = "diameter ~ 1 + (1|plate) + (1|sample)"
    calls: list[tuple[str, int, int]] = []
    if kind == "parquet":
        data: object = str(_split_parquet(df, tmp_path / "data", 3))
        options = {"batch_rows": 20}
    else:
        data = dd.from_pandas(df, npartitions=5)
        options = {"client": False, "split_every": 2}
    res = lmefast.lmer(formula, data, progress=lambda *c: calls.append(c), **options)
    assert res.llf == pytest.approx(lmefast.lmer(formula, df).llf, rel=1e-10)
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert len(stages) == 3 and "labels" in stages[0] and "cross-products" in stages[2], stages
    for stage in stages:
        done = [c[1] for c in calls if c[0] == stage]
        assert done == sorted(done) and done[-1] == calls[-1][2] > 0
    with pytest.raises(SpecificationError, match="batch_rows is an option of Parquet"):
        lmefast.lmer(formula, dd.from_pandas(df, npartitions=2), batch_rows=10)


def test_several_factors_in_chunks_drop_dependent_columns_as_in_memory(tmp_path: Path) -> None:
    """One rank-deficiency policy for every source (lme4's): dependent fixed-effects columns are
    dropped with a warning naming them, in memory and from chunks alike."""
    df = pd.read_csv(DATA / "Penicillin.csv")
    rng = np.random.default_rng(0)
    df["x"] = rng.standard_normal(len(df))
    df["x2"] = 2.0 * df["x"]
    formula = "diameter ~ x + x2 + (1|plate) + (1|sample)"
    with pytest.warns(UserWarning, match=r"rank deficient: dropping column\(s\) \['x2'\]"):
        mem = lmefast.lmer(formula, df)
    path = _split_parquet(df, tmp_path / "data", 3)
    with pytest.warns(UserWarning, match=r"rank deficient: dropping column\(s\) \['x2'\]"):
        ooc = lmefast.lmer(formula, str(path))
    assert list(ooc.fe_params.index) == list(mem.fe_params.index) == ["(Intercept)", "x"]
    assert ooc.llf == pytest.approx(mem.llf, rel=1e-10)
    np.testing.assert_allclose(ooc.fe_params.to_numpy(), mem.fe_params.to_numpy(), rtol=1e-9)


def test_several_factors_fitted_values_from_parquet_and_dask(tmp_path: Path) -> None:
    """Fitted values and residuals of a fit with several grouping factors from chunks: streamed from
    Parquet (fitted_chunks, write_fitted with both columns and progress) and lazy for Dask, equal to the
    in-memory fit's; predictions for new rows too."""
    dd = pytest.importorskip("dask.dataframe")
    df = pd.read_csv(DATA / "Penicillin.csv")
    df["x"] = np.random.default_rng(1).standard_normal(len(df))
    formula = "diameter ~ x + (1|plate) + (1|sample)"
    mem = lmefast.lmer(formula, df)
    path = tmp_path / "pen.parquet"
    df.to_parquet(path, row_group_size=40)
    ooc = lmefast.lmer(formula, str(path))
    parts = list(ooc.fitted_chunks())
    assert len(parts) == 4 and all(list(p.columns) == ["fittedvalues", "resid"] for p in parts)
    fitted = pd.concat(parts, ignore_index=True)
    np.testing.assert_allclose(fitted["fittedvalues"], mem.fittedvalues, rtol=1e-8)
    np.testing.assert_allclose(fitted["resid"], mem.resid, rtol=1e-6, atol=1e-9)
    calls: list[tuple[str, int, int]] = []
    n = ooc.write_fitted(tmp_path / "fitted.parquet", progress=lambda *c: calls.append(c))
    written = pd.read_parquet(tmp_path / "fitted.parquet")
    assert n == len(df) and list(written.columns) == ["fittedvalues", "resid"]
    np.testing.assert_allclose(written["fittedvalues"], mem.fittedvalues, rtol=1e-8)
    assert calls and calls[-1][1] == calls[-1][2] == len(df)
    new = df.iloc[:5].copy()
    np.testing.assert_allclose(ooc.predict(new), mem.predict(new), rtol=1e-8)
    dsk = lmefast.lmer(formula, dd.from_pandas(df, npartitions=3), client=False)
    np.testing.assert_allclose(dsk.fittedvalues.compute().to_numpy(), mem.fittedvalues, rtol=1e-8)
    np.testing.assert_allclose(dsk.resid.compute().to_numpy(), mem.resid, rtol=1e-6, atol=1e-9)
