"""R's formula idioms in lmefast.lmer against lme4 (tests/data/make_idioms_reference.R):
factor(x) and as.factor(x) in the fixed part and left of the bar, back-quoted names of the
response and of the grouping factor, and lme4's names of nested factors ((1|batch/cask) gives the
factor 'cask:batch' with levels 'a:A')."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_data

import lmefast
from lmefast import SpecificationError

REF = json.loads((Path(__file__).parent / "data" / "reference" / "idioms.json").read_text())


def _data(case: str) -> pd.DataFrame:
    if case == "nested_names":
        return read_data("Pastes")
    df = read_data("sleepstudy")
    df["phase"] = df["Days"] // 4
    if case == "backquoted_names":
        df = df.rename(columns={"Reaction": "Reaction time", "Subject": "Subject id"})
    return df


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case", ["factor_interaction", "factor_left_of_bar", "backquoted_names",
                                  "nested_names"])
def test_idiom_matches_lme4(case: str, reml: bool) -> None:
    ref = REF[f"{case}__{'reml' if reml else 'ml'}"]
    res = lmefast.lmer(ref["formula"], _data(case), reml=reml)
    # lme4's values are at the optimum; our optimiser stops within 1e-8 of it in −2ℓ, which moves a
    # parameter by at most ~1e-4 of its standard error (see test_reference)
    assert res.llf == pytest.approx(ref["loglik"], rel=1e-8)
    se = np.array(list(ref["se_fixef"].values()))
    np.testing.assert_allclose(res.fe_params.to_numpy(), list(ref["fixef"].values()), atol=1e-4 * se.min())
    np.testing.assert_allclose(res.bse_fe.to_numpy(), se, rtol=1e-4)
    np.testing.assert_allclose(res.theta, ref["theta"], rtol=2e-4, atol=1e-6)
    assert res.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    names = ref["ranef_names"]
    assert list(res.random_effects) == ([names] if isinstance(names, str) else names)  # jsonlite unboxes
    for name, levels in ref["ranef_levels"].items():
        assert [str(v) for v in res.random_effects[name].index] == levels


def test_factor_spellings_and_quoted_names_are_the_same_model() -> None:
    df = _data("factor_interaction")
    a = lmefast.lmer("Reaction ~ Days + factor(phase) + (1 | Subject)", df)
    b = lmefast.lmer("Reaction ~ Days + as.factor(phase) + (1 | Subject)", df)
    c = lmefast.lmer("Reaction ~ Days + C(phase) + (1 | Subject)", df)
    assert a.llf == pytest.approx(c.llf, rel=1e-12) and b.llf == pytest.approx(c.llf, rel=1e-12)
    q = df.rename(columns={"Subject": "Subject id"})
    d = lmefast.lmer("Reaction ~ Days + C(phase) + (1 | `Subject id`)", q)
    assert d.llf == pytest.approx(c.llf, rel=1e-12) and list(d.random_effects) == ["Subject id"]
    with pytest.raises(SpecificationError, match="malformed grouping factor"):
        lmefast.lmer("Reaction ~ Days + (1 | Subject id)", q)
