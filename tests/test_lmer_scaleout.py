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
