"""Issue 10 item 1 on data in chunks: Parquet (and Dask) fits, one and several grouping factors,
with and without prior weights, do not depend on the units or origin of a predictor: the
chunk passes choose the same centring and scaling maps as the rows in memory (from the
cross-products of a first pass) and repeat the pass on the mapped designs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import datasets

pytest.importorskip("pyarrow")

TRANSFORMS = [("origin+2000", 2000.0, 1.0), ("epoch-seconds", 1.7e9, 86400.0), ("x1e-6", 0.0, 1e-6)]
FORMULAS = ["Weight ~ Time + (Time | Pig)", "Weight ~ Time + (Time | Pig) + (1 | Litter)"]


def _frame(a: float = 0.0, b: float = 1.0) -> pd.DataFrame:
    df = datasets.load_dietox()[["Weight", "Time", "Pig", "Litter"]].copy()
    df["Time"] = a + b * df["Time"].astype(float)
    df["w"] = np.random.default_rng(2).uniform(0.5, 2.0, len(df))
    return df


def _parquet(df: pd.DataFrame, path: Path) -> str:
    path.mkdir()
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    for i, rows in enumerate(np.array_split(np.arange(len(shuffled)), 3)):
        shuffled.iloc[rows].to_parquet(path / f"part{i}.parquet")
    return str(path)


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("weights", [None, "w"])
def test_parquet_fits_in_other_units_equal_the_natural_fit(formula: str, weights: str | None,
                                                         tmp_path: Path) -> None:
    base = lmefast.lmer(formula, _frame(), reml=False, weights=weights)
    for name, a, b in TRANSFORMS:
        path = _parquet(_frame(a, b), tmp_path / name)
        res = lmefast.lmer(formula, path, reml=False, weights=weights)
        assert res.converged, name
        assert res.llf == pytest.approx(base.llf, rel=1e-9), name
        assert res.fe_params.iloc[1] == pytest.approx(base.fe_params.iloc[1] / b, rel=1e-5), name
        assert not res.model.engine.scaling.is_identity, name


def test_mixedlm_on_parquet_in_other_units(tmp_path: Path) -> None:
    base = lmefast.mixedlm("Weight ~ Time", _frame(), groups="Pig", re_formula="~Time").fit(reml=False)
    for name, a, b in TRANSFORMS:
        path = _parquet(_frame(a, b), tmp_path / name)
        res = lmefast.mixedlm("Weight ~ Time", path, groups="Pig", re_formula="~Time").fit(reml=False)
        assert res.llf == pytest.approx(base.llf, rel=1e-9), name
        cov = res.cov_re.to_numpy()
        assert cov[1, 1] == pytest.approx(base.cov_re.to_numpy()[1, 1] / b**2, rel=1e-4), name


def test_dask_fit_in_other_units() -> None:
    dd = pytest.importorskip("dask.dataframe")
    base = lmefast.lmer(FORMULAS[1], _frame(), reml=False)
    ddf = dd.from_pandas(_frame(1.7e9, 86400.0), npartitions=3)
    res = lmefast.lmer(FORMULAS[1], ddf, reml=False)
    assert res.llf == pytest.approx(base.llf, rel=1e-9)


@pytest.mark.parametrize("formula", FORMULAS)
def test_predictions_from_parquet_in_other_units_equal_memory(formula: str, tmp_path: Path) -> None:
    """Predictions of a chunked fit use β on the user's scale (the designs the engine saw were
    centred and scaled)."""
    df = _frame(1.7e9, 86400.0)
    path = _parquet(df, tmp_path / "epoch")
    mem, ooc = lmefast.lmer(formula, df), lmefast.lmer(formula, path)
    np.testing.assert_allclose(np.asarray(ooc.predict(df.head(20))), np.asarray(mem.predict(df.head(20))),
                               rtol=1e-7)


def test_lmer_with_one_factor_on_parquet_has_lme4_shapes(tmp_path: Path) -> None:
    """lmer on Parquet data with one grouping factor: lme4's shapes and names, as in memory
    (it is built by the one-factor chunk passes)."""
    df = datasets.load_sleepstudy()
    path = _parquet(df, tmp_path / "sleep")
    mem = lmefast.lmer("Reaction ~ Days + (Days | Subject)", df)
    ooc = lmefast.lmer("Reaction ~ Days + (Days | Subject)", path)
    assert ooc.model.api == "lme4"
    assert list(ooc.fe_params.index) == ["(Intercept)", "Days"]
    assert isinstance(ooc.cov_re, dict) and list(ooc.cov_re) == ["Subject"]
    np.testing.assert_allclose(ooc.cov_re["Subject"].to_numpy(), mem.cov_re["Subject"].to_numpy(), rtol=1e-6)
    assert str(ooc.summary()) == str(mem.summary())


@pytest.mark.parametrize("formula, column", [
    ("Reaction ~ Days + (1 + zero | Subject)", "zero"),
    ("Reaction ~ Days + (1 + z | Subject)", "z"),
    ("Reaction ~ Days + (1 + z | Subject) + (1 | Days)", "z"),
    ("Reaction ~ Days + (Days + d2 | Subject) + (1 | Days)", "d2"),
])
def test_degenerate_random_slopes_on_parquet_are_errors_as_in_memory(formula: str, column: str,
                                                                     tmp_path: Path) -> None:
    """An all-zero slope, a constant slope beside an intercept, a slope that is a multiple of
    another: errors naming the term's column, from Parquet as from rows in memory (the chunk
    paths judge each term's Z'Z)."""
    df = datasets.load_sleepstudy().copy()
    df["z"], df["zero"], df["d2"] = 3.0, 0.0, 2.0 * df["Days"]
    path = _parquet(df, tmp_path / "sleep")
    for data in (df, path):
        with pytest.raises(lmefast.SpecificationError, match=rf"\['{column}'\]"):
            lmefast.lmer(formula, data)
