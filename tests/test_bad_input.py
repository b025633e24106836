"""Bad input: a SpecificationError (a ValueError) whose message names the culprit, or a UserWarning
where the model can still be fitted; never a crash or a hang."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import SpecificationError


def test_specification_error_is_a_value_error() -> None:
    assert issubclass(SpecificationError, ValueError)


# -- missing and non-finite values ---------------------------------------------------------------
def test_nan_in_used_column_names_the_column(dietox: pd.DataFrame) -> None:
    assert dietox["Feed"].isna().any()
    with pytest.raises(SpecificationError, match="Feed"):
        lmefast.mixedlm("Weight ~ Time + Feed", dietox, groups="Pig")


def test_nan_in_unused_column_is_ignored(dietox: pd.DataFrame) -> None:
    res = lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig").fit()
    assert res.nobs == len(dietox)


def test_missing_drop_drops_incomplete_rows(dietox: pd.DataFrame) -> None:
    res = lmefast.mixedlm("Weight ~ Time + Feed", dietox, groups="Pig", missing="drop").fit()
    complete = dietox.dropna(subset=["Feed"])
    assert res.nobs == len(complete)
    assert res.converged
    ref = lmefast.mixedlm("Weight ~ Time + Feed", complete, groups="Pig").fit()
    assert res.llf == pytest.approx(ref.llf, rel=1e-12)
    np.testing.assert_allclose(res.fe_params.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-10)


def test_nan_in_response_names_the_response(dietox: pd.DataFrame) -> None:
    dietox.loc[5, "Weight"] = np.nan
    with pytest.raises(SpecificationError, match="Weight"):
        lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig")


def test_nan_in_groups_names_the_grouping_column(sleepstudy: pd.DataFrame) -> None:
    sleepstudy["Subject"] = sleepstudy["Subject"].astype(float)
    sleepstudy.loc[3, "Subject"] = np.nan
    with pytest.raises(SpecificationError, match="Subject"):
        lmefast.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject")


def test_nan_in_re_formula_column_names_it(sleepstudy: pd.DataFrame) -> None:
    sleepstudy["D2"] = sleepstudy["Days"].astype(float)
    sleepstudy.loc[7, "D2"] = np.nan
    with pytest.raises(SpecificationError, match="D2"):
        lmefast.mixedlm("Reaction ~ Days", sleepstudy, groups="Subject", re_formula="~D2")


def test_inf_in_used_column_names_the_column(dietox: pd.DataFrame) -> None:
    dietox["Time"] = dietox["Time"].astype(float)
    dietox.loc[3, "Time"] = np.inf
    with pytest.raises(SpecificationError, match="Time"):
        lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig")


def test_inf_with_missing_drop_is_dropped_like_the_arrays_api(dietox: pd.DataFrame) -> None:
    """missing='drop' drops rows with NaN or ±inf in the arrays API (np.isfinite); the formula API must
    agree with it (and must not answer 'pass missing='drop'' to a call that passed it)."""
    dietox["Time"] = dietox["Time"].astype(float)
    dietox.loc[3, "Time"] = np.inf
    X = np.column_stack([np.ones(len(dietox)), dietox["Time"].to_numpy()])
    arrays = lmefast.MixedLM(dietox["Weight"], X, dietox["Pig"], missing="drop").fit()
    assert arrays.nobs == len(dietox) - 1
    res = lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig", missing="drop").fit()
    assert res.nobs == len(dietox) - 1
    assert res.llf == pytest.approx(arrays.llf, rel=1e-12)


def test_arrays_api_nan_names_the_column(dietox: pd.DataFrame) -> None:
    exog = pd.DataFrame({"const": 1.0, "Feed": dietox["Feed"]})
    with pytest.raises(SpecificationError, match="Feed"):
        lmefast.MixedLM(dietox["Weight"], exog, dietox["Pig"])
    res = lmefast.MixedLM(dietox["Weight"], exog, dietox["Pig"], missing="drop").fit()
    assert res.nobs == int(dietox["Feed"].notna().sum())


def test_bad_missing_option_arrays_api(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="ignore"):
        lmefast.MixedLM(dietox["Weight"], np.ones((len(dietox), 1)), dietox["Pig"], missing="ignore")


def test_bad_missing_option_formula_api(dietox: pd.DataFrame) -> None:
    """An unknown missing= option is an error in the formula API too (as in statsmodels and in
    lmefast's arrays API), not silently treated as 'raise'."""
    with pytest.raises(SpecificationError, match="ignore"):
        lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig", missing="ignore")


# -- unknown or unusable columns ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("formula", "groups", "re_formula", "vc_formula", "culprit"),
    [
        ("Weight ~ Tme", "Pig", None, None, "Tme"),
        ("Wght ~ Time", "Pig", None, None, "Wght"),
        ("Weight ~ Time", "Pg", None, None, "Pg"),
        ("Weight ~ Time", "Pig", "~Tim", None, "Tim"),
        ("Weight ~ Time", "Pig", None, {"lit": "0 + C(Litterr)"}, "Litterr"),
    ],
    ids=["predictor", "response", "groups", "re_formula", "vc_formula"],
)
def test_unknown_column_is_named(dietox: pd.DataFrame, formula: str, groups: str, re_formula: str | None,
                                 vc_formula: dict[str, str] | None, culprit: str) -> None:
    with pytest.raises(SpecificationError, match=re.escape(culprit)):
        lmefast.mixedlm(formula, dietox, groups=groups, re_formula=re_formula, vc_formula=vc_formula)


def test_non_numeric_response_is_named(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="Cu"):
        lmefast.mixedlm("Cu ~ Time", dietox, groups="Pig")


def test_non_numeric_response_arrays_api(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="numeric"):
        lmefast.MixedLM(dietox["Cu"].to_numpy(dtype=object), np.ones((len(dietox), 1)), dietox["Pig"])


def test_non_numeric_exog_column_is_named(dietox: pd.DataFrame) -> None:
    exog = pd.DataFrame({"const": 1.0, "Evit": dietox["Evit"]})
    with pytest.raises(SpecificationError, match="Evit"):
        lmefast.MixedLM(dietox["Weight"], exog, dietox["Pig"])


# -- unidentifiable random effects --------------------------------------------------------------
def test_one_row_in_every_group(dietox: pd.DataFrame) -> None:
    """n = number of groups = number of random intercepts: σ² and the RE variance are confounded.
    statsmodels' API fits it with a warning naming the factor and flags the results; lme4's
    spelling refuses it (lme4's check.nobs.vs.nRE = "stop")."""
    one = dietox.sample(frac=1.0, random_state=0).groupby("Pig").head(1)  # Time varies across rows
    assert one["Time"].nunique() > 1
    with pytest.warns(lmefast.UnidentifiableWarning, match="Pig"):
        res = lmefast.mixedlm("Weight ~ Time", one, groups="Pig").fit()
    assert res.unidentifiable and np.isfinite(res.llf)
    assert not lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig").fit().unidentifiable
    with pytest.raises(SpecificationError, match="Pig"):
        lmefast.lmer("Weight ~ Time + (1 | Pig)", one)


def test_single_group_with_random_intercept(dietox: pd.DataFrame) -> None:
    single = dietox[dietox["Pig"] == dietox["Pig"].iloc[0]]
    with pytest.raises(SpecificationError, match="Pig"):
        lmefast.mixedlm("Weight ~ Time", single, groups="Pig")


def test_more_random_effects_than_rows(sleepstudy: pd.DataFrame) -> None:
    # three rows per subject at days 0, 4, 9 (so 1, Days, Days² are not collinear): as many
    # random effects as rows
    three = sleepstudy[sleepstudy["Days"].isin([0, 4, 9])]
    with pytest.warns(lmefast.UnidentifiableWarning, match="Subject"):
        model = lmefast.mixedlm("Reaction ~ Days", three, groups="Subject", re_formula="~Days + I(Days**2)")
    assert not model.engine.identifiable


def test_group_of_one_row_among_normal_groups(dietox: pd.DataFrame) -> None:
    """A singleton group next to ordinary ones is fine: fitted, converged, its BLUPs finite."""
    extra = pd.DataFrame({"Pig": [99999], "Weight": [50.0], "Time": [3]})
    df = pd.concat([dietox[["Pig", "Weight", "Time"]], extra], ignore_index=True)
    for re_formula in (None, "~Time"):
        res = lmefast.mixedlm("Weight ~ Time", df, groups="Pig", re_formula=re_formula).fit()
        assert res.converged
        assert np.isfinite(res.llf)
        assert res.n_groups == dietox["Pig"].nunique() + 1
        assert np.all(np.isfinite(res.random_effects[99999].to_numpy()))
        assert np.all(np.isfinite(res.random_effects_cov[99999].to_numpy()))


# -- degenerate data -----------------------------------------------------------------------------
def test_constant_response(dietox: pd.DataFrame) -> None:
    dietox["Weight"] = 3.0
    with pytest.raises(SpecificationError, match="Weight"):
        lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig")


def test_empty_dataframe(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="empty"):
        lmefast.mixedlm("Weight ~ Time", dietox.iloc[:0], groups="Pig")


def test_empty_arrays() -> None:
    with pytest.raises(SpecificationError, match="empty"):
        lmefast.MixedLM(np.zeros(0), np.zeros((0, 1)), np.zeros(0))


def test_all_rows_dropped(dietox: pd.DataFrame) -> None:
    dietox["Feed"] = np.nan
    with pytest.raises(SpecificationError, match="no .*rows|empty"):
        lmefast.mixedlm("Weight ~ Feed", dietox, groups="Pig", missing="drop")


# -- rank-deficient fixed effects: a warning naming the dropped column, then a fit ---------------------
@pytest.mark.parametrize(
    ("extra", "make"),
    [("TimeCopy", lambda d: d["Time"]), ("Const", lambda d: pd.Series(5.0, index=d.index)),
     ("TwiceTime", lambda d: 2.0 * d["Time"] + 1.0)],
    ids=["duplicate", "constant", "affine"],
)
def test_rank_deficient_fixed_effects(dietox: pd.DataFrame, extra: str, make) -> None:
    dietox[extra] = make(dietox)
    with pytest.warns(UserWarning, match=extra):
        model = lmefast.mixedlm(f"Weight ~ Time + {extra}", dietox, groups="Pig")
    assert extra in model.spec.dropped_exog
    assert extra not in model.exog_names
    res = model.fit()
    assert res.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = lmefast.mixedlm("Weight ~ Time", dietox, groups="Pig").fit()
    assert res.llf == pytest.approx(base.llf, rel=1e-8)
    assert list(res.fe_params.index) == ["Intercept", "Time"]
    np.testing.assert_allclose(res.fe_params.to_numpy(), base.fe_params.to_numpy(), rtol=1e-6)


# -- formula syntax ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"formula": "Weight ~ Time +"}, "Weight ~ Time +"),
        ({"formula": "Weight ~ (Time"}, "Weight ~ (Time"),
        ({"formula": "Weight ~ Time", "re_formula": "~Time *"}, "~Time *"),
        ({"formula": "Weight Time"}, "Weight Time"),
        ({"formula": " ~ Time"}, "~ Time"),
    ],
    ids=["dangling-plus", "unbalanced", "re-formula", "no-tilde", "no-response"],
)
def test_bad_formula_syntax(dietox: pd.DataFrame, kwargs: dict[str, str], culprit: str) -> None:
    with pytest.raises(SpecificationError, match=re.escape(culprit)):
        lmefast.mixedlm(data=dietox, groups="Pig", **kwargs)


def test_groups_length_mismatch(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="groups"):
        lmefast.MixedLM(dietox["Weight"], np.ones((len(dietox), 1)), dietox["Pig"].iloc[:-1])


def test_exog_length_mismatch(dietox: pd.DataFrame) -> None:
    with pytest.raises(SpecificationError, match="exog"):
        lmefast.MixedLM(dietox["Weight"], np.ones((len(dietox) - 1, 1)), dietox["Pig"])


def test_lme4_formula_given_to_mixedlm_says_use_lmer(dietox: pd.DataFrame) -> None:
    """formulaic's message arrives without terminal colour codes, with a hint to use lmer."""
    with pytest.raises(SpecificationError) as info:
        lmefast.mixedlm("Weight ~ Time + (Time | Pig)", dietox, groups="Pig")
    text = str(info.value)
    assert "\x1b[" not in text
    assert "lmefast.lmer" in text
