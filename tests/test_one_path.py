"""One data path: a DataFrame in memory is the one-chunk case of the evaluator that data in
chunks (Parquet files, Dask partitions) go through chunk by chunk — the same designs, the same estimates, the
same errors for the same bad input, in both spellings (statsmodels' and lme4's)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmefast
import lmefast.datasets
from lmefast import SpecificationError

pytest.importorskip("pyarrow")
dd = pytest.importorskip("dask.dataframe")

RTOL = 1e-7


def _data() -> pd.DataFrame:
    """sleepstudy with a categorical predictor (three string levels), prior weights and a
    second, crossed grouping factor."""
    df = lmefast.datasets.load_sleepstudy().reset_index(drop=True)
    rng = np.random.default_rng(8)
    df["kind"] = np.array(["low", "mid", "high"])[rng.integers(0, 3, len(df))]
    df["w"] = rng.uniform(0.5, 2.0, len(df))
    df["site"] = np.array(["s1", "s2", "s3", "s4"])[rng.integers(0, 4, len(df))]
    return df


def _parquet(df: pd.DataFrame, directory: Path, n_files: int) -> Path:
    """The rows in order, in n_files files (one chunk each: row groups larger than the file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(df)), n_files)):
        df.iloc[idx].to_parquet(directory / f"part-{i:03d}.parquet", index=False)
    return directory


def _sources(df: pd.DataFrame, tmp_path: Path) -> dict[str, object]:
    """The same rows in memory, in Parquet files (1 and 3 chunks) and in a Dask DataFrame of 3
    partitions (the local scheduler)."""
    return {"memory": df, "parquet, 1 chunk": _parquet(df, tmp_path / "one", 1),
            "parquet, 3 chunks": _parquet(df, tmp_path / "three", 3),
            "dask, 3 partitions": dd.from_pandas(df, npartitions=3, sort=False)}


def _close(a, b, rtol: float = RTOL) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    assert float(np.max(np.abs(a - b), initial=0.0)) <= rtol * scale


def _same_estimates(fits: dict[str, lmefast.MixedLMResults]) -> None:
    mem = fits["memory"]
    for name, res in fits.items():
        assert res.nobs == mem.nobs, name
        assert list(res.params.index) == list(mem.params.index), name
        _close(res.fe_params, mem.fe_params)
        _close(res.theta, mem.theta)
        _close(res.scale, mem.scale)
        _close(res.llf, mem.llf, 1e-10)


def _message(fit: Callable[[], object]) -> str:
    with pytest.raises(SpecificationError) as info:
        fit()
    return str(info.value)


# -- statsmodels' spelling ----------------------------------------------------------------------
def test_mixedlm_same_estimates_from_every_source(tmp_path: Path) -> None:
    """Categorical levels, weights with some zero (their rows dropped) and random slopes: the
    DataFrame as one chunk and the same rows in 1 and 3 Parquet chunks give one fit."""
    df = _data()
    df.loc[[4, 50, 120], "w"] = 0.0
    fits = {name: lmefast.mixedlm("Reaction ~ Days + kind", data, groups="Subject", re_formula="~Days",
                                  weights="w").fit()
            for name, data in _sources(df, tmp_path).items()}
    _same_estimates(fits)
    assert fits["memory"].nobs == len(df) - 3


def test_mixedlm_missing_drop_same_rows_from_every_source(tmp_path: Path) -> None:
    df = _data()
    df.loc[[3, 70], "Days"] = np.nan
    df.loc[[100], "kind"] = None
    fits = {name: lmefast.mixedlm("Reaction ~ Days + kind", data, groups="Subject",
                                  missing="drop").fit()
            for name, data in _sources(df, tmp_path).items()}
    _same_estimates(fits)
    assert fits["memory"].nobs == len(df) - 3


def _bad_inputs() -> list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame], dict, str]]:
    """(case, change to the data, keywords, the message every source gives)."""
    def nan_days(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df.loc[[1, 2], "Days"] = np.nan
        return df

    def text_response(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(Reaction=df["Reaction"].astype(str))

    def negative_weight(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df.loc[5, "w"] = -1.0
        return df

    return [
        ("missing column", lambda df: df.drop(columns="kind"), {}, r"column\(s\) \['kind'\] not found in"),
        ("non-numeric response", text_response, {}, r"response 'Reaction' is not numeric"),
        ("NaN, missing='raise'", nan_days, {},
         r"missing or infinite values in column\(s\) \{'Days': 2\} \(count per column\) in .*"
         r"pass missing='drop'"),
        ("negative weight", negative_weight, {"weights": "w"},
         r"weights must be non-negative \(1 are negative in "),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _bad_inputs()])
def test_mixedlm_same_errors_from_every_source(case: int, tmp_path: Path) -> None:
    _, change, kw, pattern = _bad_inputs()[case]
    bad = change(_data())
    for name, data in _sources(bad, tmp_path).items():
        message = _message(lambda data=data: lmefast.mixedlm("Reaction ~ Days + kind", data, groups="Subject",
                                                             **kw).fit())
        assert pd.Series([message]).str.contains(pattern, regex=True).all(), (name, message)


def test_mixedlm_empty_after_dropping_from_every_source(tmp_path: Path) -> None:
    df = _data()
    df["Days"] = np.nan
    for name, data in _sources(df, tmp_path).items():
        message = _message(lambda data=data: lmefast.mixedlm("Reaction ~ Days", data, groups="Subject",
                                                             missing="drop"))
        assert "the data are empty: no rows to fit after dropping" in message, name


def test_stateful_transforms_only_when_the_chunk_is_all_rows(tmp_path: Path) -> None:
    """In memory (one chunk of all rows) center() sees every row, as a centred column does; in
    chunks it is refused."""
    df = _data()
    centred = df.assign(Days_c=df["Days"] - df["Days"].mean())
    a = lmefast.mixedlm("Reaction ~ center(Days)", df, groups="Subject").fit()
    b = lmefast.mixedlm("Reaction ~ Days_c", centred, groups="Subject").fit()
    _close(a.fe_params.to_numpy(), b.fe_params.to_numpy())
    with pytest.raises(SpecificationError, match="stateful"):
        lmefast.mixedlm("Reaction ~ center(Days)", _parquet(df, tmp_path / "p", 2), groups="Subject")


def test_arrays_for_groups_and_weights_are_columns_of_the_one_chunk() -> None:
    """groups and weights given as arrays follow the rows kept, as the named columns do, and
    the errors name them by what they hold."""
    df = _data()
    df.loc[[7, 8], "Days"] = np.nan
    named = lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", weights="w", missing="drop").fit()
    arrays = lmefast.mixedlm("Reaction ~ Days", df, groups=df["Subject"].to_numpy(),
                             weights=df["w"].to_numpy(), missing="drop").fit()
    assert arrays.nobs == named.nobs == len(df) - 2
    _close(arrays.fe_params.to_numpy(), named.fe_params.to_numpy())
    _close(arrays.theta, named.theta)
    w = df["w"].to_numpy().copy()
    w[3] = np.nan
    message = _message(lambda: lmefast.mixedlm("Reaction ~ Days", df.dropna(), groups="Subject",
                                               weights=w[df["Days"].notna().to_numpy()]))
    assert "{'weights': 1}" in message


# -- lme4's spelling ----------------------------------------------------------------------------
LMER_FORMULAS = ["Reaction ~ Days + (Days | Subject)",                 # one factor
                 "Reaction ~ Days + (Days | Subject) + (1 | site)"]    # several: blocked


@pytest.mark.parametrize("formula", LMER_FORMULAS, ids=["one factor", "two factors"])
def test_lmer_same_estimates_from_every_source(formula: str, tmp_path: Path) -> None:
    """Weights with some zero, an offset, incomplete rows dropped: the DataFrame as one chunk
    and the same rows in 1 and 3 Parquet chunks give one fit."""
    df = _data()
    df["o"] = np.linspace(-1.0, 1.0, len(df))
    df.loc[[4, 50], "w"] = 0.0
    df.loc[[9], "Days"] = np.nan
    fits = {name: lmefast.lmer(formula, data, weights="w", offset="o", missing="drop")
            for name, data in _sources(df, tmp_path).items()}
    _same_estimates(fits)
    assert fits["memory"].nobs == len(df) - 3


def _lmer_bad_inputs() -> list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame], dict, str]]:
    """lme4's spelling: (case, change to the data, keywords, the message every source gives)."""
    cases = _bad_inputs()
    cases[0] = ("missing column", lambda df: df.drop(columns="site"), {}, r"\['site'\]")
    return cases


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _lmer_bad_inputs()])
@pytest.mark.parametrize("formula", LMER_FORMULAS, ids=["one factor", "two factors"])
def test_lmer_same_errors_from_every_source(case: int, formula: str, tmp_path: Path) -> None:
    _, change, kw, pattern = _lmer_bad_inputs()[case]
    if case == 0 and "site" not in formula:
        formula = formula.replace("Days +", "Days + site +")
    bad = change(_data())
    for name, data in _sources(bad, tmp_path).items():
        message = _message(lambda data=data: lmefast.lmer(formula, data, **kw))
        assert pd.Series([message]).str.contains(pattern, regex=True).all(), (name, message)


def test_lmer_offset_terms_and_weight_arrays_in_memory() -> None:
    """offset() terms and the offset= column add up; weights and offset given as arrays are
    columns of the one chunk (the rows kept follow them)."""
    df = _data()
    df["o"] = np.linspace(-1.0, 1.0, len(df))
    df.loc[[11], "Days"] = np.nan
    a = lmefast.lmer("Reaction ~ Days + offset(o) + (Days | Subject)", df, weights=df["w"].to_numpy(),
                     offset=df["o"].to_numpy(), missing="drop")
    b = lmefast.lmer("Reaction ~ Days + (Days | Subject)", df.assign(o2=2 * df["o"]), weights="w",
                     offset="o2", missing="drop")
    assert a.nobs == b.nobs == len(df) - 1
    _close(a.fe_params.to_numpy(), b.fe_params.to_numpy())
    _close(a.theta, b.theta)


def test_one_weights_rule_for_columns_arrays_and_many_responses() -> None:
    """Negative weights raise with the same message whether they come as a column of the data,
    as an array (statsmodels' arrays, lmer), or as per-response weights of fit_many."""
    df = _data()
    w = df["w"].to_numpy().copy()
    w[[3, 7]] = -1.0
    bad = df.assign(w=w)
    want = r"weights must be non-negative \(2 are negative in data\)"
    with pytest.raises(SpecificationError, match=want):
        lmefast.lmer("Reaction ~ Days + (Days | Subject)", bad, weights="w")
    with pytest.raises(SpecificationError, match=want):
        lmefast.lmer("Reaction ~ Days + (Days | Subject)", df, weights=w)
    X = np.column_stack([np.ones(len(df)), df["Days"].to_numpy(float)])
    with pytest.raises(SpecificationError, match=want):
        lmefast.MixedLM(df["Reaction"].to_numpy(), X, df["Subject"].to_numpy(), weights=w)
    W = np.column_stack([w, df["w"].to_numpy()])
    Y = np.column_stack([df["Reaction"].to_numpy()] * 2)
    with pytest.raises(SpecificationError, match=want):
        lmefast.fit_many("~ Days + (Days | Subject)", df, Y, weights=W)
