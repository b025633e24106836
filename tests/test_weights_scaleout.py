"""Prior weights and offsets on Parquet and Dask data (columns named by ``weights=`` and
``offset=``): the same fit as in memory, one and several grouping factors, zero weights and
missing values dropped as in memory, fitted values and residuals on the data's scale."""
from __future__ import annotations

from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scaleout_cases import close, write_parquet

import lmefast
from lmefast import SpecificationError
from lmefast.errors import PredictionError

DATA = Path(__file__).parent / "data"


def frame(name: str, zeros: bool = False, missing: bool = False) -> pd.DataFrame:
    """The weights reference data (columns w, o) in a random row order, so that groups span
    chunks; optionally some zero weights and missing responses."""
    df = pd.read_csv(DATA / f"weights_data_{name}.csv")
    df = df.iloc[np.random.default_rng(5).permutation(len(df))].reset_index(drop=True)
    if zeros:
        df.loc[[1, 7, 20], "w"] = 0.0
    if missing:
        y = "Reaction" if name == "sleepstudy" else "diameter"
        df.loc[[3, 11], y] = np.nan
    return df


CASES = [  # id, data, formula, reml
    ("sleep_corr", "sleepstudy", "Reaction ~ Days + (Days | Subject)", True),
    ("sleep_uncorr_ml", "sleepstudy", "Reaction ~ Days + (Days || Subject)", False),   # a component
    ("pen_crossed", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", True),
]


def same(big, mem) -> None:
    assert big.nobs == mem.nobs
    close(big.llf, mem.llf, 1e-8)
    close(big.fe_params.to_numpy(), mem.fe_params.to_numpy(), 1e-7)
    close(big.bse_fe.to_numpy(), mem.bse_fe.to_numpy(), 1e-6)
    close(big.scale, mem.scale, 1e-7)
    close(np.sort(big.theta), np.sort(mem.theta), 1e-6)   # θ's order: statsmodels' or lme4's


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parquet_weights_and_offset_equal_in_memory(case, tmp_path: Path) -> None:
    _, name, formula, reml = case
    df = frame(name, zeros=True, missing=True)
    path = write_parquet(df, tmp_path / "data", n_files=3, row_group_size=17)
    mem = lmefast.lmer(formula, df, reml=reml, weights="w", offset="o", missing="drop")
    big = lmefast.lmer(formula, path, reml=reml, weights="w", offset="o", missing="drop", batch_rows=17)
    same(big, mem)
    plain = lmefast.lmer(formula, path, reml=reml, missing="drop")
    assert abs(plain.llf - big.llf) > 1e-3 * abs(big.llf)       # the weights and offset were used
    # fitted values and residuals: o + Xβ̂ + Zb̂ on the data's scale, NaN for rows not in the fit
    chunks = pd.concat(list(big.fitted_chunks()), ignore_index=True)
    used = df.w.gt(0) & df[formula.split(" ~")[0]].notna()
    assert int(chunks.fittedvalues.notna().sum()) == mem.nobs
    np.testing.assert_array_equal(chunks.fittedvalues.notna().to_numpy(), used.to_numpy())
    close(chunks.fittedvalues[used].to_numpy(), np.asarray(mem.fittedvalues), 1e-7)
    close(chunks.resid[used].to_numpy(), np.asarray(mem.resid), 1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dask_weights_and_offset_equal_in_memory(case) -> None:
    _, name, formula, reml = case
    df = frame(name, zeros=True)
    ddf = dd.from_pandas(df, npartitions=4)
    mem = lmefast.lmer(formula, df, reml=reml, weights="w", offset="o")
    big = lmefast.lmer(formula, ddf, reml=reml, weights="w", offset="o", client=False)
    same(big, mem)
    fitted = big.fittedvalues.compute().to_numpy()
    keep = df.w.gt(0).to_numpy()
    assert np.all(np.isnan(fitted[~keep]))
    close(fitted[keep], np.asarray(mem.fittedvalues), 1e-7)
    # predictions for new data need neither the weights nor the response; with an offset they
    # are refused, as in memory
    new = df.drop(columns=["w", "o", formula.split(" ~")[0]]).iloc[:10]
    for model in (big, mem):
        with pytest.raises(PredictionError, match="offset"):
            model.predict(new)
    no_offset = lmefast.lmer(formula, ddf, reml=reml, weights="w", client=False)
    pred = no_offset.predict(dd.from_pandas(new, npartitions=2)).compute().to_numpy()
    close(pred, lmefast.lmer(formula, df, reml=reml, weights="w").predict(new), 1e-7)


def test_offset_term_in_the_formula(tmp_path: Path) -> None:
    df = frame("sleepstudy", zeros=True)
    path = write_parquet(df, tmp_path / "data", n_files=2, row_group_size=40)
    formula = "Reaction ~ Days + offset(o) + (Days | Subject)"
    same(lmefast.lmer(formula, path, weights="w"), lmefast.lmer(formula, df, weights="w"))
    pen = frame("penicillin")
    pen_path = write_parquet(pen, tmp_path / "pen", n_files=2, row_group_size=40)
    formula = "diameter ~ 1 + offset(o) + (1 | plate) + (1 | sample)"
    same(lmefast.lmer(formula, pen_path), lmefast.lmer(formula, pen))
    with pytest.raises(SpecificationError, match="one column"):
        lmefast.lmer("Reaction ~ Days + offset(o) + (1 | Subject)", path, offset="o")
    with pytest.raises(SpecificationError, match="one column"):
        lmefast.lmer("Reaction ~ Days + offset(log(w)) + (1 | Subject)", path)


def test_statsmodels_spelling_and_bad_weights(tmp_path: Path) -> None:
    df = frame("sleepstudy")
    path = write_parquet(df, tmp_path / "data", n_files=2, row_group_size=40)
    mem = lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days",
                          weights=df.w.to_numpy(), offset=df.o.to_numpy()).fit()
    big = lmefast.mixedlm("Reaction ~ Days", path, groups="Subject", re_formula="~Days",
                          weights="w", offset="o").fit()
    same(big, mem)
    with pytest.raises(SpecificationError, match="name of a column"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject)", path, weights=df.w.to_numpy())
    with pytest.raises(SpecificationError, match="not found|no column"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject)", path, weights="nope")
    bad = df.assign(w=np.where(np.arange(len(df)) == 4, -1.0, df.w))
    bad_path = write_parquet(bad, tmp_path / "bad", n_files=1, row_group_size=40)
    with pytest.raises(SpecificationError, match="non-negative"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject)", bad_path, weights="w")
    with pytest.raises(SpecificationError, match="non-negative"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject) + (1 | Days)", bad_path, weights="w")
