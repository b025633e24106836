"""lme4 formula syntax in lmefast.lmer: what each kind of term means (checked through equivalent spellings
and the fitted θ, varcorr and random effects), grouping-factor dtypes, categorical predictors, θ's order,
and bad input (a SpecificationError naming the culprit)."""
from __future__ import annotations

import re
from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import read_data

import lmefast
from lmefast import SpecificationError
from lmefast.multi import BlockedEngine


@cache
def _sleep() -> pd.DataFrame:
    """sleepstudy plus: grp (6 levels crossed with Subject, with an effect), phase (categorical: 'early'
    for days 0-4, 'late' after) and late (its 0/1 dummy)."""
    df = read_data("sleepstudy")
    rng = np.random.default_rng(11)
    df["grp"] = rng.permutation(np.arange(len(df)) % 6)
    df["Reaction"] = df["Reaction"] + rng.normal(0, 20, 6)[df["grp"]]
    df["phase"] = np.where(df["Days"] >= 5, "late", "early")
    df["late"] = (df["Days"] >= 5).astype(float)
    return df


def sleep() -> pd.DataFrame:
    return _sleep().copy()


def same_fit(a: lmefast.MixedLMResults, b: lmefast.MixedLMResults, theta: bool = True,
             rtol: float = 1e-6) -> None:
    assert a.llf == pytest.approx(b.llf, rel=1e-10, abs=1e-8)
    np.testing.assert_allclose(a.fe_params.to_numpy(), b.fe_params.to_numpy(), rtol=rtol, atol=1e-8)
    np.testing.assert_allclose(a.bse_fe.to_numpy(), b.bse_fe.to_numpy(), rtol=rtol)
    assert a.scale == pytest.approx(b.scale, rel=rtol)
    if theta:
        np.testing.assert_allclose(a.theta, b.theta, rtol=rtol, atol=1e-7)


def factors_of(res: lmefast.MixedLMResults) -> dict[str, list[str]]:
    """Grouping factor → its random coefficients."""
    return {name: list(frame.columns) for name, frame in res.random_effects.items()}


# -- the terms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_uncorrelated_term(reml: bool) -> None:
    """(1 + Days || Subject): diagonal T, θ of 2 entries, no correlation row in varcorr, zero covariance;
    the same model as (1|Subject) + (0 + Days|Subject)."""
    df = sleep()
    res = lmefast.lmer("Reaction ~ Days + (1 + Days || Subject)", df, reml=reml)
    assert res.theta.shape == (2,)
    vc = res.varcorr()
    assert vc["var2"].isna().all(), vc
    assert list(vc["grp"]) == ["Subject", "Subject", "Residual"]
    assert list(vc["var1"][:2]) == ["(Intercept)", "Days"]
    cov = res.cov_re["Subject"]      # lme4's API: per grouping factor
    assert cov.loc["(Intercept)", "Days"] == 0.0
    np.testing.assert_allclose(np.diag(cov.to_numpy()), res.scale * res.theta**2, rtol=1e-12)
    split = lmefast.lmer("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", df, reml=reml)
    same_fit(res, split, rtol=1e-10)
    assert isinstance(split.model, lmefast.MixedLM)  # merged into one factor
    short = lmefast.lmer("Reaction ~ Days + (Days || Subject)", df, reml=reml)
    same_fit(res, short, rtol=1e-10)
    correlated = lmefast.lmer("Reaction ~ Days + (Days | Subject)", df, reml=reml)
    assert correlated.theta.shape == (3,)
    assert correlated.llf >= res.llf - 1e-8  # the larger model fits at least as well


def test_uncorrelated_term_in_a_crossed_model() -> None:
    df = sleep()
    res = lmefast.lmer("Reaction ~ Days + (Days || Subject) + (1|grp)", df)
    assert isinstance(res.engine, BlockedEngine)
    assert res.theta.shape == (3,)
    vc = res.varcorr()
    assert vc["var2"].isna().all()
    assert list(vc["grp"]) == ["Subject", "Subject", "grp", "Residual"]
    split = lmefast.lmer("Reaction ~ Days + (1|Subject) + (1|grp) + (0 + Days|Subject)", df)
    # lme4 orders θ differently for the two spellings (its rev(order(nlevels)) reverses the
    # tied Subject terms only when the formula is not already in decreasing order)
    same_fit(res, split, theta=False, rtol=1e-7)
    assert sorted(res.theta) == pytest.approx(sorted(split.theta), rel=1e-6)


def test_slope_term_includes_the_intercept() -> None:
    """(Days|Subject) is (1 + Days|Subject); (0 + Days|Subject) has the slope alone."""
    df = sleep()
    implicit = lmefast.lmer("Reaction ~ Days + (Days|Subject)", df)
    explicit = lmefast.lmer("Reaction ~ Days + (1 + Days|Subject)", df)
    same_fit(implicit, explicit, rtol=1e-12)
    assert factors_of(implicit) == {"Subject": ["(Intercept)", "Days"]}
    assert implicit.theta.shape == (3,)
    slope = lmefast.lmer("Reaction ~ Days + (0 + Days|Subject)", df)
    assert factors_of(slope) == {"Subject": ["Days"]}
    assert slope.theta.shape == (1,)
    assert list(slope.varcorr()["var1"][:1]) == ["Days"]
    minus = lmefast.lmer("Reaction ~ Days + (Days - 1|Subject)", df)
    same_fit(slope, minus, rtol=1e-12)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_nested_slash_is_parent_plus_interaction(reml: bool) -> None:
    df = read_data("Pastes")
    nested = lmefast.lmer("strength ~ 1 + (1|batch/cask)", df, reml=reml)
    # lme4 names the nested factor cask:batch, levels "a:A" (cask's level first)
    expanded = lmefast.lmer("strength ~ 1 + (1|batch) + (1|cask:batch)", df, reml=reml)
    same_fit(nested, expanded, rtol=1e-12)
    assert list(nested.random_effects) == list(expanded.random_effects) == ["cask:batch", "batch"]
    for f in nested.random_effects:
        pd.testing.assert_frame_equal(nested.random_effects[f], expanded.random_effects[f])
    assert nested.random_effects["cask:batch"].index[0] == "a:A"
    # the interaction has one level per (batch, cask) pair present; cask alone only 3
    assert len(nested.random_effects["cask:batch"]) == len(df[["batch", "cask"]].drop_duplicates())
    crossed = lmefast.lmer("strength ~ 1 + (1|batch) + (1|cask)", df, reml=reml)
    assert len(crossed.random_effects["cask"]) == df["cask"].nunique()
    # crossed (cask's 3 levels shared by all batches) is another model than nested: fewer random
    # effects, and on these data a likelihood lower by about 27 (REML −150.7 vs −123.5): the casks
    # differ within batches, which the crossed model cannot express
    assert len(crossed.random_effects["cask"]) < len(nested.random_effects["cask:batch"])
    assert crossed.llf < nested.llf - 1.0
    # a:b spelled either way round is the same factor (up to the labels of its levels, so up to the
    # order of the sums: 1e-9)
    flipped = lmefast.lmer("strength ~ 1 + (1|batch) + (1|batch:cask)", df, reml=reml)
    same_fit(flipped, expanded, rtol=1e-9)


def test_three_level_nesting() -> None:
    """(1|a/b/c) = (1|a) + (1|b:a) + (1|c:b:a) (lme4's names: the inner factor first)."""
    rng = np.random.default_rng(3)
    a = np.repeat(np.arange(4), 24)
    b = np.tile(np.repeat(np.arange(3), 8), 4)
    c = np.tile(np.repeat(np.arange(2), 4), 12)
    y = rng.normal(0, 2, 4)[a] + rng.normal(0, 1, 12)[a * 3 + b] + rng.normal(0, 1, 24)[a * 6 + b * 2 + c] \
        + rng.normal(size=a.size)
    df = pd.DataFrame({"y": y, "a": a, "b": b, "c": c})
    nested = lmefast.lmer("y ~ 1 + (1|a/b/c)", df)
    expanded = lmefast.lmer("y ~ 1 + (1|a) + (1|b:a) + (1|c:b:a)", df)
    same_fit(nested, expanded, rtol=1e-10)
    assert nested.n_groups == {"c:b:a": 24, "b:a": 12, "a": 4}


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_several_terms_on_one_factor_are_merged(reml: bool) -> None:
    """(1|Subject) + (0 + Days|Subject) equals (1 + Days || Subject), also with another factor between."""
    df = sleep()
    a = lmefast.lmer("Reaction ~ Days + (1 + Days || Subject) + (1|grp)", df, reml=reml)
    b = lmefast.lmer("Reaction ~ Days + (1|Subject) + (1|grp) + (0 + Days|Subject)", df, reml=reml)
    same_fit(a, b, theta=False, rtol=1e-7)   # θ orders differ, as in lme4 (see above)
    assert sorted(a.theta) == pytest.approx(sorted(b.theta), rel=1e-6)
    assert list(b.random_effects) == ["Subject", "grp"]
    assert list(b.random_effects["Subject"].columns) == ["(Intercept)", "Days"]


def test_same_coefficient_twice_on_a_factor_is_an_error() -> None:
    with pytest.raises(SpecificationError, match="Subject"):
        lmefast.lmer("Reaction ~ Days + (Days|Subject) + (1|Subject)", sleep())


# -- grouping-factor dtypes --------------------------------------------------------------------------------
def _dtype_variants(df: pd.DataFrame, col: str) -> dict[str, pd.DataFrame]:
    codes, uniques = pd.factorize(df[col], sort=True)
    out = {}
    out["str"] = df.assign(**{col: [f"L{uniques[c]}" for c in codes]})
    out["int"] = df.assign(**{col: (codes * 7 + 3).astype(np.int64)})
    out["category"] = df.assign(**{col: pd.Categorical([f"L{uniques[c]}" for c in codes])})
    # categories in another order, with unused ones
    cats = [f"L{u}" for u in uniques][::-1] + ["unused1", "unused2"]
    labels = [f"L{uniques[c]}" for c in codes]
    out["category_unused"] = df.assign(**{col: pd.Categorical(labels, categories=cats)})
    out["object_mixed_order"] = df.assign(**{col: pd.Series([f"L{uniques[c]}" for c in codes], dtype=object)})
    return out


@pytest.mark.parametrize("formula, data, cols", [
    ("Reaction ~ Days + (Days|Subject)", "sleep", ["Subject"]),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin", ["plate", "sample"]),
    ("strength ~ 1 + (1|batch/cask)", "Pastes", ["batch", "cask"]),
])
def test_grouping_factor_dtypes_give_the_same_fit(formula: str, data: str, cols: list[str]) -> None:
    df = sleep() if data == "sleep" else read_data(data)
    base = lmefast.lmer(formula, df)
    n_levels = {f: len(v) for f, v in _frames(base).items()}
    for col in cols:
        for kind, variant in _dtype_variants(df, col).items():
            res = lmefast.lmer(formula, variant)
            same_fit(res, base, rtol=1e-8)
            assert {f: len(v) for f, v in _frames(res).items()} == n_levels, kind
            # the same random effects, level for level (levels relabelled by the variant)
            for f, frame in _frames(res).items():
                ours = np.sort(frame.to_numpy(), axis=0)
                np.testing.assert_allclose(ours, np.sort(_frames(base)[f].to_numpy(), axis=0), rtol=1e-6,
                                           atol=1e-8, err_msg=f"{kind} {col}: {f}")


def _frames(res: lmefast.MixedLMResults) -> dict[str, pd.DataFrame]:
    return dict(res.random_effects)


def test_integer_levels_keep_their_labels() -> None:
    df = read_data("Penicillin")
    codes, uniques = pd.factorize(df["sample"], sort=True)
    df["sample"] = codes + 10
    res = lmefast.lmer("diameter ~ 1 + (1|plate) + (1|sample)", df)
    assert sorted(res.random_effects["sample"].index.tolist()) == list(range(10, 10 + len(uniques)))


# -- categorical predictors --------------------------------------------------------------------------------
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_categorical_fixed_and_random_predictors(reml: bool) -> None:
    """A categorical predictor is its treatment-coded dummy, in the fixed part and left of the bar; with
    cell-means coding (0 + phase | Subject) the random part is a reparametrisation of (1 + late | Subject):
    the same likelihood and fixed effects."""
    df = sleep()
    cat = lmefast.lmer("Reaction ~ phase + (1 + phase|Subject)", df, reml=reml)
    num = lmefast.lmer("Reaction ~ late + (1 + late|Subject)", df, reml=reml)
    same_fit(cat, num, rtol=1e-8)
    assert list(cat.fe_params.index) == ["(Intercept)", "phase[T.late]"]
    assert list(cat.cov_re["Subject"].index) == ["(Intercept)", "phase[T.late]"]
    cells = lmefast.lmer("Reaction ~ phase + (0 + phase|Subject)", df, reml=reml)
    assert list(cells.cov_re["Subject"].index) == ["phase[early]", "phase[late]"]
    same_fit(cells, num, theta=False, rtol=1e-5)
    # the covariance of the cell means is that of (intercept, intercept + slope)
    A = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cells.cov_re["Subject"].to_numpy(), A @ num.cov_re["Subject"].to_numpy() @ A.T,
                               rtol=1e-4)
    # the same in a crossed model
    cat2 = lmefast.lmer("Reaction ~ phase + (1 + phase|Subject) + (1|grp)", df, reml=reml)
    num2 = lmefast.lmer("Reaction ~ late + (1 + late|Subject) + (1|grp)", df, reml=reml)
    same_fit(cat2, num2, rtol=1e-6)
    cells2 = lmefast.lmer("Reaction ~ late + (1|Subject) + (0 + phase|grp)", df, reml=reml)
    num3 = lmefast.lmer("Reaction ~ late + (1|Subject) + (1 + late|grp)", df, reml=reml)
    assert cells2.llf == pytest.approx(num3.llf, abs=1e-6)
    assert list(cells2.random_effects["grp"].columns) == ["phase[early]", "phase[late]"]


def test_spacing_does_not_matter() -> None:
    df = sleep()
    a = lmefast.lmer("Reaction~Days+(1+Days|Subject)+(1|grp)", df)
    b = lmefast.lmer("Reaction ~ Days + ( 1 + Days | Subject ) + ( 1 | grp )", df)
    same_fit(a, b, rtol=1e-12)


def test_expressions_left_of_the_bar() -> None:
    """Interactions and transformations are evaluated per row, as in the fixed part."""
    df = sleep()
    df["logd"] = np.log(df["Days"] + 1)
    df["days_late"] = df["Days"] * df["late"]
    same_fit(lmefast.lmer("Reaction ~ Days + (1 + np.log(Days + 1)|Subject) + (1|grp)", df),
             lmefast.lmer("Reaction ~ Days + (1 + logd|Subject) + (1|grp)", df), rtol=1e-10)
    same_fit(lmefast.lmer("Reaction ~ Days + (1 + Days:late|Subject) + (1|grp)", df),
             lmefast.lmer("Reaction ~ Days + (1 + days_late|Subject) + (1|grp)", df), rtol=1e-10)


@pytest.mark.parametrize("formula", ["Reaction ~ Days + D2 + (1|Subject)",
                                     "Reaction ~ Days + D2 + (1|Subject) + (1|grp)"])
def test_rank_deficient_fixed_effects_drop_a_column_with_a_warning(formula: str) -> None:
    df = sleep().assign(D2=lambda d: 2.0 * d["Days"])
    with pytest.warns(UserWarning, match="D2"):
        res = lmefast.lmer(formula, df)
    assert list(res.fe_params.index) == ["(Intercept)", "Days"]
    same_fit(res, lmefast.lmer(formula.replace(" + D2", ""), df), rtol=1e-10)


def test_explicit_C_in_fixed_part() -> None:
    df = read_data("dietox")
    a = lmefast.lmer("Weight ~ Time + C(Cu) + (1 + Time|Pig)", df)
    b = lmefast.lmer("Weight ~ Time + Cu + (1 + Time|Pig)", df)
    same_fit(a, b, rtol=1e-10)


# -- θ order: lme4's ---------------------------------------------------------------------------------------
def _crossed_three(levels: tuple[int, int, int], seed: int = 5) -> pd.DataFrame:
    """Factors a, b, c crossed with the given numbers of levels and clearly different variances."""
    rng = np.random.default_rng(seed)
    n = 240
    sds = {"a": 4.0, "b": 1.0, "c": 2.5}
    df = pd.DataFrame({"x": rng.normal(size=n)})
    y = rng.normal(size=n)
    for f, m in zip("abc", levels, strict=True):
        codes = rng.permutation(np.arange(n) % m)
        df[f] = [f"{f}{v}" for v in codes]
        y = y + rng.normal(0, sds[f], m)[codes]
    df["y"] = y
    return df


def lme4_term_order(nl: list[int]) -> list[int]:
    """lme4's mkReTrms: ``if (any(diff(nl) > 0)) ord <- rev(order(nl))`` — decreasing levels, and when it
    reorders at all, terms with equally many levels in reverse formula order."""
    if not any(b > a for a, b in zip(nl, nl[1:], strict=False)):
        return list(range(len(nl)))
    return sorted(range(len(nl)), key=lambda j: (nl[j], j))[::-1]


@pytest.mark.parametrize("levels", [(12, 6, 3), (3, 6, 12), (6, 12, 3), (6, 6, 3), (6, 6, 12), (6, 12, 6)])
def test_theta_is_in_lme4s_order(levels: tuple[int, int, int]) -> None:
    """res.theta lists the terms in lme4's order (so it is comparable with lme4's getME(fit, 'theta')):
    for scalar terms θ_j = sd_j / σ, read here from varcorr by factor name."""
    df = _crossed_three(levels)
    res = lmefast.lmer("y ~ x + (1|a) + (1|b) + (1|c)", df)
    vc = res.varcorr().set_index("grp")["sdcor"]
    order = lme4_term_order(list(levels))
    expected = np.array([vc["abc"[j]] for j in order]) / res.sigma
    np.testing.assert_allclose(res.theta, expected, rtol=1e-10,
                               err_msg=f"levels {levels}: lme4's order is {[('abc'[j]) for j in order]}")


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("formula, culprit", [
    ("Reaction ~ Days + (1 | )", "(1 | )"),
    ("Reaction ~ (Days | Subject", "(Days | Subject"),
    ("Reaction ~ Days + (|Subject)", "(|Subject)"),
    ("Reaction ~ Days + (Days | Subject | grp)", "(Days | Subject | grp)"),
    ("Reaction ~ Days + (1 | Subject/)", "Subject/"),
    ("Reaction ~ Days + (0 | Subject)", "Subject"),
    ("Reaction ~ Days + (1 | Subject))", "Subject"),
])
def test_malformed_terms(formula: str, culprit: str) -> None:
    with pytest.raises(SpecificationError, match=re.escape(culprit)):
        lmefast.lmer(formula, sleep())


@pytest.mark.parametrize("formula, culprit", [
    ("Reaction ~ Days + (1|nosuch)", "nosuch"),
    ("Reaction ~ Days + (1|Subject) + (1|nosuch)", "nosuch"),
    ("Reaction ~ Days + (1|Subject:nosuch)", "nosuch"),
    ("Reaction ~ Days + (1|Subject/nosuch)", "nosuch"),
    ("Reaction ~ Days + (nosuchvar|Subject)", "nosuchvar"),
    ("Reaction ~ Days + (1 + nosuchvar || Subject)", "nosuchvar"),
    ("Reaction ~ nosuchfixed + (1|Subject)", "nosuchfixed"),
    ("nosuchresponse ~ Days + (1|Subject)", "nosuchresponse"),
])
def test_unknown_columns(formula: str, culprit: str) -> None:
    with pytest.raises(SpecificationError, match=re.escape(culprit)):
        lmefast.lmer(formula, sleep())


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (1|one)", "Reaction ~ Days + (1|Subject) + (1|one)",
                                     "Reaction ~ Days + (Days|one) + (1|grp)"])
def test_grouping_factor_with_one_level(formula: str) -> None:
    df = sleep().assign(one="only")
    with pytest.raises(SpecificationError, match=r"'one'.*single level|single level.*'one'"):
        lmefast.lmer(formula, df)


@pytest.mark.parametrize("formula, culprit", [
    ("Reaction ~ Days + (1|id)", "id"),
    ("Reaction ~ Days + (1|id) + (1|grp)", "id"),
    ("Reaction ~ Days + (1|grp) + (1|Subject:Days)", "Subject:Days"),
    ("Reaction ~ Days + (1 + Days|half)", "half"),
    ("Reaction ~ Days + (1|Subject) + (1 + Days|half)", "half"),
])
def test_as_many_random_effects_as_observations(formula: str, culprit: str) -> None:
    """A term with at least as many random effects as observations is unidentifiable (lme4's check
    nlevels × ncoef < nobs)."""
    df = sleep()
    df["id"] = np.arange(len(df))
    df["half"] = np.arange(len(df)) // 2  # 90 levels × 2 coefficients = 180 = n
    with pytest.raises(SpecificationError, match=re.escape(culprit)):
        lmefast.lmer(formula, df)


def test_no_random_term() -> None:
    for formula in ["Reaction ~ Days", "Reaction ~ 1", "Reaction ~ Days + Subject"]:
        with pytest.raises(SpecificationError, match="random"):
            lmefast.lmer(formula, sleep())


@pytest.mark.parametrize("column", ["Days", "Reaction", "grp", "Subject"])
def test_nan_in_a_used_column(column: str) -> None:
    df = sleep()
    df[column] = df[column].astype(float)
    df.loc[[4, 77], column] = np.nan
    formula = "Reaction ~ Days + (Days|Subject) + (1|grp)"
    with pytest.raises(SpecificationError, match=column):
        lmefast.lmer(formula, df)
    dropped = lmefast.lmer(formula, df, missing="drop")
    complete = lmefast.lmer(formula, df.dropna(subset=[column]).reset_index(drop=True))
    assert dropped.nobs == len(df) - 2
    same_fit(dropped, complete, rtol=1e-10)


def test_nan_in_an_unused_column_is_ignored() -> None:
    df = sleep()
    df["unused"] = np.nan
    res = lmefast.lmer("Reaction ~ Days + (1|Subject) + (1|grp)", df)
    assert res.nobs == len(df)


@pytest.mark.parametrize("response", ["txt", "flag"])
def test_non_numeric_response(response: str) -> None:
    df = sleep()
    df["txt"] = df["Reaction"].astype(str)
    df["flag"] = df["Reaction"] > 300
    with pytest.raises(SpecificationError, match=response):
        lmefast.lmer(f"{response} ~ Days + (1|Subject) + (1|grp)", df)


def test_constant_response() -> None:
    df = sleep().assign(Reaction=1.0)
    for formula in ["Reaction ~ Days + (1|Subject)", "Reaction ~ Days + (1|Subject) + (1|grp)"]:
        with pytest.raises(SpecificationError, match="Reaction"):
            lmefast.lmer(formula, df)


def test_no_response_and_bad_missing() -> None:
    with pytest.raises(SpecificationError):
        lmefast.lmer("~ Days + (1|Subject)", sleep())
    with pytest.raises(SpecificationError, match="missing"):
        lmefast.lmer("Reaction ~ Days + (1|Subject)", sleep(), missing="omit")


def test_specification_error_leaves_no_model() -> None:
    """lmer_model raises the same errors as lmer (before any fitting)."""
    with pytest.raises(SpecificationError, match="nosuch"):
        lmefast.lmer_model("Reaction ~ Days + (1|nosuch)", sleep())
    model = lmefast.lmer_model("Reaction ~ Days + (1|Subject) + (1|grp)", sleep())
    assert isinstance(model.engine, BlockedEngine)
