"""lmer formulas on Parquet files and Dask DataFrames (one grouping factor)."""
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


def test_several_factors_out_of_core_are_refused(sleep_parquet: tuple[pd.DataFrame, Path]) -> None:
    _, path = sleep_parquet
    with pytest.raises(SpecificationError, match="one grouping factor"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject) + (1 | Days)", str(path))
    with pytest.raises(SpecificationError, match="single uncorrelated column"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject) + (1 + Days | Subject)", str(path))
