"""Out of core from Parquet (lmefast.outofcore): the same fit as in memory, chunk by chunk; the
passes for fitted values; progress; bad input."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scaleout_cases import (
    MODEL_IDS,
    RTOL,
    assert_same_fit,
    close,
    in_memory,
    model_data,
    synthetic,
    write_parquet,
)

import lmefast
from lmefast import SpecificationError
from lmefast.errors import RowsUnavailableError
from lmefast.outofcore import mixedlm_parquet


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory):
    """Each model's rows (random order) in 3 files of 50-row row groups."""
    base = tmp_path_factory.mktemp("parquet")
    cache: dict[str, Path] = {}

    def get(model_id: str) -> Path:
        if model_id not in cache:
            df = model_data(model_id)[0]
            cache[model_id] = write_parquet(df, base / model_id, n_files=3, row_group_size=50)
        return cache[model_id]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_parquet_equals_in_memory(model_id: str, reml: bool, parquet_dir) -> None:
    df, formula, groups, re_formula, vc = model_data(model_id)
    mem = in_memory(df, formula, groups, re_formula, reml, vc)
    # batch_rows below the row-group size: row groups are read in slices too
    model = mixedlm_parquet(formula, parquet_dir(model_id), groups=groups, re_formula=re_formula,
                            vc_formula=vc, batch_rows=37)
    big = model.fit(reml=reml)
    assert isinstance(big, lmefast.MixedLMResults) and big.model.source is not None
    assert_same_fit(big, mem)


def test_mixedlm_dispatches_paths(parquet_dir) -> None:
    """lmefast.mixedlm with a path (str or Path, directory or one file) is the Parquet fit."""
    df, formula, groups, re_formula, _ = model_data("sleepstudy")
    mem = in_memory(df, formula, groups, re_formula, True)
    d = parquet_dir("sleepstudy")
    for data in (str(d), d, d / "part-001.parquet", [d / "part-000.parquet"]):
        if isinstance(data, list):
            res = mixedlm_parquet(formula, data, groups, re_formula).fit()
            sub = pd.read_parquet(data[0])
            assert res.nobs == len(sub)
            continue
        res = lmefast.mixedlm(formula, data, groups=groups, re_formula=re_formula).fit()
        if isinstance(data, Path) and data.is_file():
            assert res.nobs == len(pd.read_parquet(data))
        else:
            assert_same_fit(res, mem)


def test_string_group_keys_and_one_file(tmp_path: Path) -> None:
    df = synthetic(5_000, 120, seed=11, string_keys=True)
    path = tmp_path / "one.parquet"
    df.to_parquet(path, row_group_size=700, index=False)
    mem = in_memory(df, "y ~ x1 + x2", "g", "~x1", True)
    big = lmefast.mixedlm("y ~ x1 + x2", str(path), groups="g", re_formula="~x1", batch_rows=1000).fit()
    assert_same_fit(big, mem)
    assert big.random_effects_frame.index[0] == "g0"


def test_random_intercept_default(parquet_dir) -> None:
    df, formula, groups, _, _ = model_data("dietox")
    mem = in_memory(df, formula, groups, None, True)
    big = mixedlm_parquet(formula, parquet_dir("dietox"), groups=groups).fit()
    assert_same_fit(big, mem)


def test_fitted_values_need_another_pass(parquet_dir, tmp_path: Path) -> None:
    df, formula, groups, re_formula, _ = model_data("dietox_cat")
    mem = in_memory(df, formula, groups, re_formula, True)
    big = mixedlm_parquet(formula, parquet_dir("dietox_cat"), groups, re_formula).fit()
    with pytest.raises(RowsUnavailableError, match="fitted_chunks"):
        big.fittedvalues  # noqa: B018
    with pytest.raises(RowsUnavailableError, match="write_fitted"):
        big.resid  # noqa: B018
    with pytest.raises(RowsUnavailableError):
        big.predict(include_random=True)
    with pytest.raises(RowsUnavailableError, match="rows"):
        big.model.spec.X  # noqa: B018
    chunks = list(big.fitted_chunks())
    assert len(chunks) > 3
    fc = pd.concat(chunks, ignore_index=True)
    scale = np.abs(mem.fittedvalues).max()
    close(fc["fittedvalues"], mem.fittedvalues)
    assert np.max(np.abs(fc["resid"].to_numpy() - mem.resid)) <= RTOL * scale
    out = tmp_path / "fitted.parquet"
    assert big.write_fitted(out) == len(df)
    back = pd.read_parquet(out)
    close(back["fittedvalues"], mem.fittedvalues)
    # predictions for a DataFrame: the design of the fit (same categorical levels)
    new = df.iloc[:40]
    close(big.predict(new, include_random=True), mem.predict(new, include_random=True))
    close(big.predict(new, include_random=False), mem.predict(new, include_random=False))
    unseen = new.assign(**{groups: 10**9})
    close(big.predict(unseen, include_random=True), mem.predict(new, include_random=False))
    with pytest.raises(SpecificationError, match="not in the fit"):
        big.predict(unseen, include_random=True, new_levels="error")
    with pytest.raises(SpecificationError, match="not among the levels"):
        big.predict(new.assign(Cu="Cu999"), include_random=True)


@pytest.mark.slow
def test_progress_of_both_passes_and_optimiser(parquet_dir, capsys: pytest.CaptureFixture) -> None:
    df, formula, groups, re_formula, _ = model_data("synthetic")
    calls: list[tuple[str, int, int]] = []
    model = lmefast.mixedlm(formula, parquet_dir("synthetic"), groups=groups, re_formula=re_formula,
                            batch_rows=1000, progress=lambda *a: calls.append(a))
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert len(stages) == 2 and "labels" in stages[0] and "cross-products" in stages[1]
    for stage in stages:
        done = [c[1] for c in calls if c[0] == stage]
        assert done[0] == 0 and done[-1] == len(df) and all(c[2] == len(df) for c in calls)
        assert np.all(np.diff(done) > 0) and np.max(np.diff(done)) <= 1000  # bounded chunks
    iters: list[tuple[int, float]] = []
    res = model.fit(verbose=True, callback=lambda it, th, f: iters.append((it, f)))
    assert len(iters) >= 2 and iters[-1][1] == pytest.approx(res.objective, rel=1e-8)
    assert capsys.readouterr().out.strip()  # verbose prints the objective per iteration
    lmefast.mixedlm(formula, parquet_dir("synthetic"), groups=groups, re_formula=re_formula,
                    progress=True)
    err = capsys.readouterr().err
    assert "pass 1/2" in err and "pass 2/2" in err and "100%" in err


def test_missing_values(tmp_path: Path) -> None:
    df = synthetic(3_000, 60, seed=5)
    df.loc[[3, 50, 700], "x2"] = np.nan
    df.loc[[10, 900], "y"] = np.inf
    df["g"] = df["g"].astype(float)
    df.loc[[20], "g"] = np.nan
    df.loc[df["g"] == 7, "x1"] = np.nan  # a group whose rows are all dropped
    d = write_parquet(df, tmp_path / "na", n_files=2, row_group_size=400)
    with pytest.raises(SpecificationError, match="missing"):
        mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1")
    mem = in_memory(df, "y ~ x1 + x2", "g", "~x1", True, missing="drop")
    big = mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1", missing="drop").fit()
    assert big.n_groups == 59
    assert_same_fit(big, mem)
    fc = pd.concat(list(big.fitted_chunks()), ignore_index=True)
    assert fc["fittedvalues"].isna().sum() == len(df) - mem.nobs


def test_rank_deficient_design_drops_columns(tmp_path: Path) -> None:
    df = synthetic(4_000, 80, seed=9)
    df["x3"] = 2.0 * df["x1"] - df["x2"]
    d = write_parquet(df, tmp_path / "rank", n_files=2, row_group_size=500)
    with pytest.warns(UserWarning, match="rank deficient"):
        mem = in_memory(df, "y ~ x1 + x2 + x3", "g", "~x1", True)
    with pytest.warns(UserWarning, match="rank deficient"):
        big = mixedlm_parquet("y ~ x1 + x2 + x3", d, "g", "~x1").fit()
    assert big.model.spec.dropped_exog == mem.model.spec.dropped_exog == ("x3",)
    assert_same_fit(big, mem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(big.predict(df.iloc[:10], include_random=True), mem.predict(df.iloc[:10], include_random=True))


# -- bad input -----------------------------------------------------------------------------------
def test_file_missing_a_column(tmp_path: Path) -> None:
    df = synthetic(2_000, 50)
    d = write_parquet(df, tmp_path / "d", n_files=2)
    df.iloc[:100].drop(columns="x2").to_parquet(d / "part-002.parquet", index=False)
    with pytest.raises(SpecificationError, match=r"part-002.parquet.*no column.*x2"):
        mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1")


def test_group_key_types_differ_across_files(tmp_path: Path) -> None:
    df = synthetic(2_000, 50)
    d = write_parquet(df.iloc[:1000], tmp_path / "d", n_files=1)
    df.iloc[1000:].assign(g=df["g"].iloc[1000:].astype(str)).to_parquet(d / "part-009.parquet", index=False)
    with pytest.raises(SpecificationError, match=r"group column 'g'.*part-009.parquet.*one type"):
        mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1")


def test_predictor_type_differs_across_files(tmp_path: Path) -> None:
    df = synthetic(2_000, 50)
    d = write_parquet(df.iloc[:1000], tmp_path / "d", n_files=1)
    df.iloc[1000:].assign(x2=df["x2"].iloc[1000:].astype(str)).to_parquet(d / "part-009.parquet",
                                                                          index=False)
    with pytest.raises(SpecificationError, match=r"column 'x2'.*part-009.parquet"):
        mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1")


def test_empty_files_and_row_groups_are_skipped(tmp_path: Path) -> None:
    df = synthetic(2_000, 50)
    d = write_parquet(df, tmp_path / "d", n_files=2, row_group_size=300)
    df.iloc[:0].to_parquet(d / "part-000a.parquet", index=False)
    mem = in_memory(df, "y ~ x1 + x2", "g", "~x1", True)
    assert_same_fit(mixedlm_parquet("y ~ x1 + x2", d, "g", "~x1").fit(), mem)


def test_all_files_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    synthetic(100, 5).iloc[:0].to_parquet(path, index=False)
    with pytest.raises(SpecificationError, match="empty"):
        mixedlm_parquet("y ~ x1", path, "g")


def test_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(SpecificationError, match="does not exist"):
        lmefast.mixedlm("y ~ x1", str(tmp_path / "nope.parquet"), groups="g")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SpecificationError, match="no Parquet files"):
        mixedlm_parquet("y ~ x1", tmp_path / "empty_dir", "g")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(SpecificationError, match="cannot read"):
        mixedlm_parquet("y ~ x1", tmp_path / "bad.parquet", "g")
    path = tmp_path / "ok.parquet"
    synthetic(500, 10).to_parquet(path, index=False)
    with pytest.raises(SpecificationError, match="crossed effects"):
        mixedlm_parquet("y ~ x1", _with(path, one=lambda d: 1), "one", "0", vc_formula={"g": "0 + C(g)"})
    with pytest.raises(SpecificationError, match="stateful"):
        mixedlm_parquet("y ~ center(x1)", path, "g")
    with pytest.raises(SpecificationError, match="column"):
        mixedlm_parquet("y ~ x1", path, groups=np.zeros(500))
    with pytest.raises(SpecificationError, match=r"zz.*not found"):
        mixedlm_parquet("y ~ zz", path, "g")
    with pytest.raises(SpecificationError, match="progress"):
        mixedlm_parquet("y ~ x1", path, "g", progress="yes")
    with pytest.raises(TypeError, match="unexpected keyword"):
        lmefast.mixedlm("y ~ x1", synthetic(500, 10), groups="g", progress=True)
    with pytest.raises(SpecificationError, match="not numeric"):
        mixedlm_parquet("g2 ~ x1", _with(path, g2=lambda d: d["g"].astype(str)), "g")


def _with(path: Path, **cols) -> Path:
    df = pd.read_parquet(path).assign(**cols)
    out = path.with_name("with.parquet")
    df.to_parquet(out, index=False)
    return out


def test_constant_response_and_too_few_rows(tmp_path: Path) -> None:
    df = synthetic(500, 10)
    p1 = tmp_path / "c.parquet"
    df.assign(y=1.0).to_parquet(p1, index=False)
    with pytest.raises(SpecificationError, match="constant"):
        mixedlm_parquet("y ~ x1", p1, "g")
    p2 = tmp_path / "few.parquet"
    df.iloc[:20].assign(g=np.arange(20)).to_parquet(p2, index=False)
    with pytest.raises(SpecificationError, match="unidentifiable"):
        mixedlm_parquet("y ~ x1", p2, "g")
    p3 = tmp_path / "one.parquet"
    df.assign(g=1).to_parquet(p3, index=False)
    with pytest.raises(SpecificationError, match="single level"):
        mixedlm_parquet("y ~ x1", p3, "g")


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["pastes_nested", "synthetic_vc"])
def test_variance_components_fitted_values(model_id: str, parquet_dir) -> None:
    """Three passes (labels, each group's component columns, cross-products); the fitted values
    include the components' modes."""
    df, formula, groups, re_formula, vc = model_data(model_id)
    mem = in_memory(df, formula, groups, re_formula, True, vc)
    stages: list[str] = []
    big = mixedlm_parquet(formula, parquet_dir(model_id), groups, re_formula, vc, batch_rows=64,
                          progress=lambda stage, done, total: stages.append(stage)).fit()
    assert len(dict.fromkeys(stages)) == 3 and "variance-component" in list(dict.fromkeys(stages))[1]
    fc = pd.concat(list(big.fitted_chunks()), ignore_index=True)
    close(fc["fittedvalues"], mem.fittedvalues)
    close(big.predict(df.iloc[:20], include_random=False), mem.predict(df.iloc[:20], include_random=False))
    with pytest.raises(SpecificationError, match="variance components"):
        big.predict(df.iloc[:20], include_random=True)


def test_one_changed_row_is_beyond_the_tolerances() -> None:
    """The scale-out tolerances (scaleout_cases.RTOL) are loose enough for rounding and tight enough
    to see one row of the 20,000 changed: its fit does not pass assert_same_fit's θ̂ comparison."""
    df = synthetic()
    mem = in_memory(df, "y ~ x1 + x2", "g", "~x1", True)
    df.loc[0, "y"] += 3.0   # three residual standard deviations on one row
    moved = in_memory(df, "y ~ x1 + x2", "g", "~x1", True)
    err = np.max(np.abs(moved.theta - mem.theta)) / np.max(np.abs(mem.theta))
    assert err > 10 * RTOL, f"one changed row moves θ̂ by only {err:.2g} (relative)"


def test_eval_env_on_parquet_is_refused_not_ignored(parquet_dir) -> None:
    """Formulas on Parquet data see only the data's columns: a caller's namespace would be
    ignored, so it raises (the default, depth 0, is accepted)."""
    path = parquet_dir(MODEL_IDS[0])
    with pytest.raises(lmefast.SpecificationError, match="eval_env"):
        lmefast.mixedlm("y ~ x", str(path), groups="g", eval_env={"f": abs})
    with pytest.raises(lmefast.SpecificationError, match="eval_env"):
        lmefast.lmer("y ~ x + (1 | g)", str(path), eval_env={"f": abs})
